"""The session's options (from the command line), as plain data.

Imported by the plugin in every pytest run: nothing heavy here. :func:`active` gives recipe
factories, which run lazily inside a session, the options of the session that runs them (the COCO
root, for instance) without an environment-variable side channel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CUDA_GRAPH_CHOICES = ("auto", "on", "off")
LOCALIZE_CHOICES = ("auto", "off")
LATENCY_CHOICES = ("judged", "always", "never")


@dataclass
class Options:
    baselines_dir: Path = Path("baselines")
    reports_dir: Path = Path("reports")
    cache_dir: Path = Path(".qatcheck_cache")
    #: where recorded latency-baseline artifacts are kept (None: <cache_dir>/latency-reference)
    latency_reference_dir: Path | None = None
    use_cache: bool = True
    #: measure every case again, reusing no stored result (--qatcheck-remeasure; qatcheck.results)
    remeasure: bool = False
    update_baselines: bool = False
    #: record a case's values even when it failed a floor or budget (--qatcheck-force-update)
    force_update: bool = False
    require: tuple[str, ...] = ()
    device: str = "auto"
    ort_provider: str = "auto"
    latency_iterations: int = 200
    warmup_s: float = 0.2
    #: cap on the timed loop per case (seconds; None = always ``latency_iterations``)
    latency_duration_s: float | None = 3.0
    #: stop a timed loop once its median's 95% interval is within this fraction of the case's latency
    #: tolerance (0: always the whole loop, latency_iterations / latency_duration_s)
    latency_precision: float = 0.25
    progress: bool = True
    #: CUDA timing: replay a captured CUDA graph (auto: fall back to eager events if capture fails)
    cuda_graph: str = "auto"
    #: TensorRT int8 form for trt_ptq/partial: auto | native (TensorRT calibrator) | qdq | the name of
    #: a registered ONNX quantizer (qatcheck.backends.trt_plan.check_ptq_form)
    trt_ptq: str = "auto"
    #: COCO folder for recipes that use qatcheck.data.coco.coco_val2017()
    coco_root: Path | None = None
    #: under pytest-xdist: (this worker's index, the worker count); see qatcheck.parallel
    xdist_worker: tuple[int, int] | None = None
    #: which cases are timed: judged (those a baseline, a recording or a speedup floor reads),
    #: always, never
    latency: str = "judged"
    #: why this process times nothing (xdist workers sharing a device); "" when it does
    latency_off: str = ""
    #: CPU intra-op threads for ONNX Runtime and PyTorch (None: each library's default)
    threads: int | None = None
    #: how many times a latency case that looks slower is re-measured before it is judged
    latency_retries: int = 2
    #: an inconclusive latency verdict (noise larger than the tolerance) fails the test
    latency_strict: bool = False
    #: a value better than its baseline beyond the tolerance fails (the baseline is stale)
    strict: bool = False
    #: print pytest-benchmark's own table after qatcheck's
    benchmark_table: bool = False
    #: a failed parity check of a quantized case is localized (auto) or not (off)
    localize: str = "auto"
    #: seconds the automatic localizations of this process may take together (None: no limit)
    localize_budget_s: float | None = 60.0
    #: the run's Markdown job summary is appended here (None: none; the plugin defaults it to
    #: $GITHUB_STEP_SUMMARY)
    summary_path: Path | None = None
    #: each failure is also printed as a GitHub annotation (the plugin sets it where GITHUB_ACTIONS is true)
    annotations: bool = False
    #: the run's cases are appended here, a JSON line each (None: no history)
    history_path: Path | None = None
    #: the run's self-contained HTML report (None: none)
    html_path: Path | None = None


def physical_cores() -> int:
    """Physical CPU cores available to this process (SMT siblings counted once): the default
    thread count, since two threads on one core's siblings only add noise to a latency."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    try:
        cpu = phys = None
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor":
                    cpu, phys = int(value), "0"
                elif key == "physical id":
                    phys = value.strip()
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value.strip()))
    except (OSError, ValueError):
        pass
    return max(1, len(cores) or len(allowed))


_ACTIVE: list[Options] = []


def active() -> Options | None:
    """The options of the qatcheck session now running (None outside one)."""
    return _ACTIVE[-1] if _ACTIVE else None


def activate(options: Options) -> None:
    _ACTIVE.append(options)


def deactivate(options: Options) -> None:
    if options in _ACTIVE:
        _ACTIVE.remove(options)
