"""The session's options (from the command line), as plain data.

Imported by the plugin in every pytest run: nothing heavy here. :func:`active` gives recipe
factories, which run lazily inside a session, the options of the session that runs them (the COCO
root, for instance) without an environment-variable side channel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CUDA_GRAPH_CHOICES = ("auto", "on", "off")
TRT_PTQ_CHOICES = ("auto", "native", "qdq")


@dataclass
class Options:
    baselines_dir: Path = Path("baselines")
    reports_dir: Path = Path("reports")
    cache_dir: Path = Path(".qatcheck_cache")
    use_cache: bool = True
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
    progress: bool = True
    #: CUDA timing: replay a captured CUDA graph (auto: fall back to eager events if capture fails)
    cuda_graph: str = "auto"
    #: TensorRT int8 form for trt_ptq/partial: auto | native (TensorRT calibrator) | qdq
    trt_ptq: str = "auto"
    #: COCO folder for recipes that use qatcheck.data.coco.coco_val2017()
    coco_root: Path | None = None


_ACTIVE: list[Options] = []


def active() -> Options | None:
    """The options of the qatcheck session now running (None outside one)."""
    return _ACTIVE[-1] if _ACTIVE else None


def activate(options: Options) -> None:
    _ACTIVE.append(options)


def deactivate(options: Options) -> None:
    if options in _ACTIVE:
        _ACTIVE.remove(options)
