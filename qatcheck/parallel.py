"""pytest-xdist: ``pytest suites/ -n N``.

Design (why not judge on the controller): a recipe's table needs every case of the recipe (fp32
is every int8 row's reference), and its baselines and reports are one file each. So the plugin
sends all of a suite module's tests to one worker (``--dist loadscope`` in place of xdist's default
``load``; ``loadgroup`` did not group at all with pytest 9.2 and xdist 3.8 here); that worker
measures, judges, records (the baseline commit holds a directory lock, so workers recording
different recipes at once both land) and writes its recipes' reports, and the controller prints
every worker's tables once, at the end. Suites run in parallel; a suite's cases do not. A recipe
must therefore live in one suite module (the built-in suites do).

Latency on a worker: with at least as many GPUs as workers each worker pins its own GPU
(``cuda:<worker index>``) and times there with qatcheck's own loop (pytest-benchmark disables itself
under xdist); otherwise nothing is timed, and the verdict says why - workers share the CPUs, so
their timings would measure each other.

Imported by the plugin: nothing heavy here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Worker:
    index: int  # 0-based (gw0 -> 0)
    count: int  # how many workers the run has


def worker(config) -> Worker | None:
    """This process's place among pytest-xdist workers, or None outside a worker."""
    info = getattr(config, "workerinput", None)
    if info is None:
        return None
    wid = str(info.get("workerid", "gw0"))
    count = int(info.get("workercount") or os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    return Worker(int(wid[2:]) if wid[2:].isdigit() else 0, count)


def is_controller(config) -> bool:
    return worker(config) is None and getattr(config.option, "dist", "no") != "no" \
        and bool(getattr(config.option, "numprocesses", None))


def latency_placement(w: Worker, device: str) -> tuple[str | None, str]:
    """(the CUDA device this worker measures on, or None and the reason it times nothing).
    ``device`` is --qatcheck-device: ``auto`` / ``cuda`` spread the workers over the GPUs; a
    named device (``cuda:1``) or the CPU is shared by every worker."""
    import torch

    if w.count == 1:  # one worker has the machine to itself: time where asked
        return None, ""
    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if gpus >= w.count:
        return f"cuda:{w.index}", ""
    where = (f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else
             "no GPU" if device in ("auto", "cuda") else f"one device ({device})")
    return None, (f"latency not measured under pytest-xdist: {w.count} workers and {where} - workers sharing "
                  "a device would time each other; run without -n for latency (or with -n <= the GPU count)")
