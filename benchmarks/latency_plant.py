"""A pytest plugin for benchmarks/latency_gate.py: plants a latency regression in named cases.

    QATCHECK_PLANT="digits-fp32-torch=0.10,digits-trt_ptq-onnxruntime=1.0" \
        python -m pytest -p benchmarks.latency_plant suites/test_digits.py -k test_latency

Each named case becomes ``1 + factor`` times slower the way a regression would make it:
- cases that execute an ONNX file (ONNX Runtime): **a slower graph** - the case's artifact gets a
  chain of extra MatMuls whose result is added to the first output times zero (outputs unchanged),
  sized in this process to cost ``factor`` x the original's median. The artifact's digest changes,
  as a real regression's would;
- PyTorch on CUDA: a spin kernel (``torch.cuda._sleep``) after the forward, sized to ``factor`` x
  the case's own median, so it is part of the captured CUDA graph and of the CUDA-event time;
- PyTorch on the CPU: the inference runs ``floor(factor)`` extra times (more compute: it slows down
  with the machine, as real work does) plus a busy-wait for the fraction;
- ``CASE=runtime:FACTOR`` (any backend): that same runner-level plant on an ONNX case too - the
  artifact stays byte-identical and the runtime got slower (the regression judges.SAME_BYTES_DRIFT
  is about).
Only timing is touched: accuracy and parity are unchanged. Nothing here ships with qatcheck.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np


RUNTIME = "runtime:"


def _items() -> list[tuple[str, str]]:
    return [(case.strip(), factor.strip()) for case, _, factor in
            (item.partition("=") for item in filter(None, os.environ.get("QATCHECK_PLANT", "").split(",")))]


def plants() -> dict[str, float]:
    return {case: float(factor.removeprefix(RUNTIME)) for case, factor in _items()}


def runtime_plants() -> set[str]:
    """Cases planted at the runner, their artifact unchanged (``CASE=runtime:FACTOR``)."""
    return {case for case, factor in _items() if factor.startswith(RUNTIME)}


def _median_ms(call, n: int = 30, warm_s: float = 0.0) -> float:
    """The call's median over ``n`` runs, after ``warm_s`` seconds of sustained running (a GPU
    left idle between short bursts runs at lower clocks than in a timed loop)."""
    t_end = time.perf_counter() + warm_s
    for i in range(1 << 30):
        call.run()
        if i >= 4 and time.perf_counter() >= t_end:
            break
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

    def planted(x, cycles: int):
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

    def timed_call(x):
        base = _median_ms(original(x), n=300, warm_s=0.3)
        cycles = int(factor * base * _cuda_cycles_per_ms())
        for _ in range(3):  # a short spin inside a graph need not last what a long one promised
            call = planted(x, cycles)
            got = _median_ms(call, n=300, warm_s=0.3) / _median_ms(original(x), n=300, warm_s=0.3) - 1
            if factor <= got <= 1.2 * factor:
                break
            cycles = int(cycles * min(10.0, factor * 1.05 / max(got, 1e-3)))
        return call
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


def slower_graph(src, dst, factor: float, shape, threads=None, matmuls: int | None = None) -> None:
    """``src`` with extra MatMul work costing ``factor`` x its median latency, written to ``dst``
    (sized by timing here; ``matmuls``: that many extra MatMuls, untimed - a test that needs only
    "much slower" need not pay the sizing's ~20 s)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from qatcheck.backends.base import TimedCall
    from qatcheck.backends.onnxruntime_backend import session_options
    from qatcheck.timing import paired

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    def call(model):
        sess = ort.InferenceSession(model.SerializeToString(), session_options(ort, threads),
                                    providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return TimedCall(lambda: sess.run(None, {name: x}))

    original = call(onnx.load(src))

    def slowdown(model) -> float:
        """Its cost over the original's, timed interleaved (a shared machine drifts in between);
        the median of three such measurements, so one noisy stretch cannot size the plant."""
        planted = call(model)
        return float(np.median([paired(planted, original, "", duration_s=1.0, warmup_s=0.1).ratio
                                for _ in range(3)])) - 1

    def with_work(matmuls: int):
        m = onnx.load(src)
        g, n = m.graph, 256
        rng = np.random.default_rng(1)
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))  # orthogonal: the chain neither grows nor shrinks
        d = int(np.prod(shape[1:]))
        g.initializer.extend([numpy_helper.from_array((rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32), "plant_w"),
                              numpy_helper.from_array(q.astype(np.float32), "plant_q"),
                              numpy_helper.from_array(np.zeros((), np.float32), "plant_zero")])
        out = g.output[0]
        nodes = [helper.make_node("Flatten", [g.input[0].name], ["plant_flat"], axis=1),
                 helper.make_node("MatMul", ["plant_flat", "plant_w"], ["plant_h0"])]
        for i in range(matmuls):
            nodes.append(helper.make_node("MatMul", [f"plant_h{i}", "plant_q"], [f"plant_h{i + 1}"]))
        nodes += [helper.make_node("ReduceSum", [f"plant_h{matmuls}"], ["plant_s"], keepdims=0),
                  helper.make_node("Mul", ["plant_s", "plant_zero"], ["plant_z"]),
                  helper.make_node("Cast", ["plant_z"], ["plant_zc"], to=out.type.tensor_type.elem_type)]
        for node in g.node:  # the first output now comes out of an Add of zero
            node.output[:] = [o if o != out.name else "plant_pre" for o in node.output]
        nodes.append(helper.make_node("Add", ["plant_pre", "plant_zc"], [out.name]))
        g.node.extend(nodes)
        return m

    if matmuls is not None:
        onnx.save(with_work(matmuls), dst)
        return
    probe = 32
    matmuls = max(1, round(probe * factor / max(slowdown(with_work(probe)), 1e-3)))
    for _ in range(5):  # settle the size against what it actually costs here: at least the factor
        got = slowdown(with_work(matmuls))
        if factor <= got <= 1.2 * factor:
            break
        step = round(matmuls * min(10.0, factor * 1.05 / max(got, 1e-3)))
        matmuls = max(1, step if step != matmuls else matmuls + (1 if got < factor else -1))
    onnx.save(with_work(matmuls), dst)
    print(f"latency_plant: {dst.name}: {matmuls} extra MatMuls, measured +{got:.1%} (asked +{factor:.0%})",
          file=sys.stderr)


def plant_onnx(wanted: dict[str, float]) -> None:
    """Planted ONNX cases: the builder hands out the slower graph for that (recipe, mode, shape)."""
    import dataclasses
    from pathlib import Path

    from qatcheck.artifacts import ArtifactBuilder
    from qatcheck.fsutil import file_digest
    from qatcheck.options import active

    targets = {}
    for case_id, factor in wanted.items():
        recipe, mode_point, _backend = case_id.rsplit("-", 2)
        mode, sep, point = mode_point.rpartition("_")
        if not sep or point not in ("min", "opt", "max"):  # a static case: trt_ptq, torch_ptq
            mode, point = mode_point, ""
        targets[(recipe, mode, bool(point))] = (factor, point or "opt")
    original = ArtifactBuilder.onnx_artifact
    done: dict = {}

    def onnx_artifact(self, mode, dynamic=False):
        art = original(self, mode, dynamic)
        key = (self.recipe.name, mode, bool(dynamic))
        if key not in targets:
            return art
        if key not in done:
            factor, point = targets[key]
            dst = Path(str(art.path).replace(".onnx", f"-planted{factor:g}.onnx"))
            opts = active()
            slower_graph(art.path, dst, factor, self.recipe.input.profile()[point],
                           getattr(opts, "threads", None))
            done[key] = dataclasses.replace(art, path=dst, digest=file_digest(dst))
        return done[key]
    ArtifactBuilder.onnx_artifact = onnx_artifact


def pytest_configure(config) -> None:
    wanted = plants()
    if not wanted:
        return
    from qatcheck import session as qs
    from qatcheck.backends import executes

    onnx_cases = {c: f for c, f in wanted.items()
                  if executes(c.rsplit("-", 1)[1]) == "onnx" and c not in runtime_plants()}
    plant_onnx(onnx_cases)
    runner_of = qs.QatcheckSession.runner

    def runner(self, case):
        r = runner_of(self, case)
        factor = wanted.get(case.id)
        if factor and case.id not in onnx_cases and not getattr(r, "_planted", False):
            if str(getattr(r, "device", "")).startswith("cuda") and hasattr(r, "module"):
                plant_torch_cuda(r, factor)
            else:
                plant_repeat(r, factor)
            r._planted = True
        return r
    qs.QatcheckSession.runner = runner
