"""How stable is an ONNX Runtime CPU latency from one process to the next? (issue 10)

A merge gate compares a fresh process with a baseline recorded by another one, so the noise that
matters is between processes, not within one loop. This script builds a recipe's ONNX artifacts
once, then starts ``--processes`` fresh Python processes; each times every model under every
``--threads`` setting (and, with ``--pin``, also with the process pinned to that many physical
cores) and reports the loop's minimum, 5th/10th percentile and median. The summary gives, per
statistic, the worst ratio between two processes (max/min) and the between-process CV.

    python benchmarks/ort_stability.py --modes fp32,trt_ptq --processes 8 --threads 1,2,0 --pin \
        --out benchmarks/ort-stability-cpu

``--threads 0`` means qatcheck's default (the physical cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STATS = ("min", "p5", "p10", "median")


def build(modes: list[str], cache: Path) -> tuple[dict[str, str], list[int]]:
    """The digits recipe's ONNX artifacts (mode -> path) and the latency input's shape."""
    from qatcheck.measurement import Case
    from qatcheck.options import Options
    from qatcheck.session import QatcheckSession
    from qatcheck.zoo.recipes import digits_recipe

    s = QatcheckSession(Options(cache_dir=cache, baselines_dir=cache / "b", progress=False))
    s.register(digits_recipe())
    paths = {m: str(s.builder("digits").onnx_artifact(m).path) for m in modes}
    return paths, list(s.shape(Case("digits", "fp32", "onnxruntime")))


def cpu_set(n: int, allowed: set[int]) -> set[int]:
    """``n`` logical CPUs of ``allowed``, one per physical core where /proc/cpuinfo says."""
    allowed = sorted(allowed)
    seen, out = set(), []
    cpu = phys = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "processor":
                cpu, phys = int(value), "0"
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed and (phys, value) not in seen:
                seen.add((phys, value))
                out.append(cpu)
    except OSError:
        out = allowed
    return set((out or allowed)[:n])


def child(spec: dict) -> dict:
    import onnxruntime as ort

    from qatcheck import timing
    from qatcheck.backends.onnxruntime_backend import session_options
    from qatcheck.options import physical_cores

    x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(np.float32)
    full = os.sched_getaffinity(0)
    default = physical_cores()
    out = {}
    for pin in ([False, True] if spec["pin"] else [False]):
        for t in spec["threads"]:
            threads = t or default
            os.sched_setaffinity(0, cpu_set(threads, full) if pin else full)
            for mode, path in spec["paths"].items():
                sess = ort.InferenceSession(path, session_options(ort, threads), providers=["CPUExecutionProvider"])
                name = sess.get_inputs()[0].name
                call = type("Call", (), {"run": staticmethod(lambda: sess.run(None, {name: x})),
                                         "device_times_ms": None})()
                ms, _ = timing.collect(call, 100_000, spec["warmup"], None, spec["duration"])
                a = np.asarray(ms)
                out[f"{mode} t={threads}{' pinned' if pin else ''}"] = {
                    "min": float(a.min()), "p5": float(np.percentile(a, 5)),
                    "p10": float(np.percentile(a, 10)), "median": float(np.median(a)),
                    "ci_rel": timing.median_ci_rel(a), "n": int(a.size)}
    os.sched_setaffinity(0, full)
    return out


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        row = {}
        for st in STATS:
            v = np.array([r[key][st] for r in runs])
            row[st] = {"worst_ratio": float(v.max() / v.min()), "cv": float(v.std(ddof=1) / v.mean()),
                       "mean_ms": float(v.mean())}
        row["within_ci_rel"] = float(np.median([r[key]["ci_rel"] for r in runs]))
        out[key] = row
    return out


def markdown(summary: dict, n: int) -> str:
    lines = [f"between-process stability over {n} processes: worst ratio between two processes "
             "(between-process CV)", "",
             "| model, threads | mean median ms | " + " | ".join(STATS) + " | within-loop CI |",
             "|---|---|" + "---|" * len(STATS) + "---|"]
    for key, row in summary.items():
        cells = [f"x{row[s]['worst_ratio']:.3f} ({row[s]['cv']:.1%})" for s in STATS]
        lines.append(f"| {key} | {row['median']['mean_ms']:.3f} | " + " | ".join(cells)
                     + f" | ±{row['within_ci_rel']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="fp32,trt_ptq")
    p.add_argument("--processes", type=int, default=8)
    p.add_argument("--threads", default="0", help="comma-separated intra-op thread counts; 0: physical cores")
    p.add_argument("--pin", action="store_true", help="also time each setting pinned to that many cores")
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.2)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    cache = a.cache or Path(tempfile.mkdtemp(prefix="ort-stability-"))
    paths, shape = build(a.modes.split(","), cache)
    spec = {"paths": paths, "shape": shape, "threads": [int(t) for t in a.threads.split(",")],
            "pin": a.pin, "duration": a.duration, "warmup": a.warmup}
    runs = []
    for i in range(a.processes):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--out", str(a.out), "--child", json.dumps(spec)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(proc.stderr)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"process {i}: {time.perf_counter() - t:.0f} s "
              + ", ".join(f"{k} {v['median']:.3f}/{v['min']:.3f}" for k, v in runs[-1].items()), flush=True)
    summary = summarize(runs)
    (a.out / "ort-stability.json").write_text(json.dumps({"spec": spec, "runs": runs, "summary": summary}, indent=1))
    md = markdown(summary, len(runs))
    (a.out / "ort-stability.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
