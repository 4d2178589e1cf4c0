"""Device fingerprints: a latency baseline is only comparable on the same hardware and software.

The fingerprint is a small dict (device model, core count, backend versions); its short hash keys
latency baselines so one baseline file holds figures for several machines side by side.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache


@lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        return {}
    info = {"gpu": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    try:
        import subprocess

        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
        if drv:
            info["driver"] = drv[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def device_fingerprint(device: str, versions: dict[str, str]) -> dict[str, str]:
    """Fingerprint for a runner executing on ``device`` with backend ``versions``."""
    fp = {"cpu": cpu_name(), "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count())}
    if "cuda" in device.lower():
        fp.update(gpu_info())
    fp.update(versions)
    return dict(sorted(fp.items()))


def fingerprint_id(fp: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def describe(fp: dict[str, str]) -> str:
    dev = fp.get("gpu") or f"{fp.get('cpu', '?')} x{fp.get('cpus', '?')}"
    rest = ", ".join(f"{k} {v}" for k, v in fp.items() if k not in ("gpu", "cpu", "cpus"))
    return f"{dev} ({rest})"
