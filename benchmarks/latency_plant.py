"""A pytest plugin for benchmarks/latency_gate.py: plants a latency regression in named cases.

    QATCHECK_PLANT="digits-fp32-torch=0.10,digits-trt_ptq-onnxruntime=1.0" \
        python -m pytest -p benchmarks.latency_plant suites/test_digits.py -k test_latency

Each named case's timed call becomes ``1 + factor`` times slower *inside the timed region*, the way
a slower op would make it:
- PyTorch on CUDA: a spin kernel (``torch.cuda._sleep``) after the forward, sized to ``factor`` x
  the case's own median, so it is part of the captured CUDA graph and of the CUDA-event time;
- PyTorch on the CPU and ONNX Runtime: the inference runs ``floor(factor)`` extra times (more
  compute: it slows down with the machine, as real work does) plus a busy-wait for the fraction.
Only timing is touched: ``infer`` (accuracy, parity) is unchanged. Nothing here ships with qatcheck.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np


def plants() -> dict[str, float]:
    out = {}
    for item in filter(None, os.environ.get("QATCHECK_PLANT", "").split(",")):
        case, _, factor = item.partition("=")
        out[case.strip()] = float(factor)
    return out


def _median_ms(call, n: int = 30) -> float:
    for _ in range(5):
        call.run()
    if call.device_times_ms is not None:
        call.device_times_ms.clear()
    wall = []
    for _ in range(n):
        t = time.perf_counter()
        call.run()
        wall.append((time.perf_counter() - t) * 1e3)
    return float(np.median(call.device_times_ms[-n:] if call.device_times_ms else wall))


def _spin(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def _cuda_cycles_per_ms() -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(2_000_000)
    end.record()
    end.synchronize()
    return 2_000_000 / start.elapsed_time(end)


def plant_torch_cuda(runner, factor: float) -> None:
    import torch

    original = runner.timed_call

    def timed_call(x):
        base = _median_ms(original(x))
        cycles = int(factor * base * _cuda_cycles_per_ms())

        class Ballast(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, t):
                out = self.inner(t)
                torch.cuda._sleep(cycles)  # a kernel: inside the graph and the events
                return out
        inner, runner.module = runner.module, Ballast(runner.module)
        try:
            return original(x)
        finally:
            runner.module = inner
    runner.timed_call = timed_call


def plant_repeat(runner, factor: float) -> None:
    original = runner.timed_call

    def timed_call(x):
        call = original(x)
        base = _median_ms(call)
        inner, repeats, frac = call.run, int(math.floor(factor)), factor - math.floor(factor)

        def run():
            for _ in range(1 + repeats):
                inner()
            if frac:
                _spin(frac * base)
        call.run = run
        return call
    runner.timed_call = timed_call


def pytest_configure(config) -> None:
    wanted = plants()
    if not wanted:
        return
    from qatcheck import session as qs

    runner_of = qs.QatcheckSession.runner

    def runner(self, case):
        r = runner_of(self, case)
        factor = wanted.get(case.id)
        if factor and not getattr(r, "_planted", False):
            if str(getattr(r, "device", "")).startswith("cuda") and hasattr(r, "module"):
                plant_torch_cuda(r, factor)
            else:
                plant_repeat(r, factor)
            r._planted = True
        return r
    qs.QatcheckSession.runner = runner
