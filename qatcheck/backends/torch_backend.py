"""PyTorch backend: fp32, fp16 and fake-quant modules on CPU or CUDA."""
from __future__ import annotations

import contextlib

import numpy as np

from qatcheck.backends.base import Backend, BuildContext, Runner, TimedCall


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from qatcheck.errors import ConfigError

        raise ConfigError(f"--qatcheck-device={requested} but torch sees no CUDA device")
    return requested


@contextlib.contextmanager
def strict_fp32(enabled: bool):
    """fp32 means fp32: PyTorch runs CUDA convolutions in TF32 by default (10-bit mantissa), which
    moves outputs by ~1e-3..1e-2 and would make the fp32 *reference* disagree with an exact fp32
    ONNX Runtime run. TF32 is switched off while a fp32 module runs, and restored afterwards."""
    if not enabled:
        yield
        return
    import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, module, precision: str, device: str, cuda_graph: str = "auto") -> None:
        import torch

        self._torch = torch
        self._device = device
        self.cuda_graph = cuda_graph
        # the clock it will time with, until a timed call says which it did (a failed CUDA-graph
        # capture falls back to eager events): the session decides whether to time from it
        from qatcheck.backends.cuda_timing import EAGER_CLOCK, GRAPH_CLOCK

        self._clock = "wall" if not device.startswith("cuda") else EAGER_CLOCK if cuda_graph == "off" else GRAPH_CLOCK
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.module = module.to(device=device, dtype=self.dtype).eval()
        self._probe = None

    @property
    def device(self) -> str:
        return self._device

    def _to_device(self, x: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(x)).to(self._device, self.dtype)

    @property
    def _strict(self) -> bool:
        return self._device.startswith("cuda") and self.dtype == self._torch.float32

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        with self._torch.inference_mode(), strict_fp32(self._strict):
            out = self.module(self._to_device(x))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().float().cpu().numpy() for o in outs]

    def timed_call(self, x: np.ndarray) -> TimedCall:
        call = self._timed(self.module, self._to_device(x), self._strict)
        self._clock = call.clock
        return call

    def _timed(self, module, xt, strict: bool) -> TimedCall:
        torch = self._torch
        if not self._device.startswith("cuda"):
            def run() -> None:
                with torch.inference_mode():
                    module(xt)
            return TimedCall(run, clock="wall")
        from qatcheck.backends import cuda_timing
        from qatcheck.quantize.torch_common import FreezeRefused, quantizer_of

        note = refused = ""
        tq = quantizer_of(module)
        if tq is not None and tq.needs_freeze(module) and self.cuda_graph != "off":
            # fake quantizers that synchronise with the host (pytorch-quantization's, ModelOpt's
            # INT8 ones) cannot be captured in a CUDA graph; their frozen twin computes
            # bit-identical outputs with the calibrated scales precomputed (tests/test_frozen_quant.py,
            # tests/test_frozen_modelopt.py) and can be. A configuration the twin does not
            # reproduce is timed as it is (capture fails: eager events, with cuda_timing's note).
            try:
                module = tq.freeze(module).to(self._device)
                note = "fake-quant timed through its frozen twin (identical outputs, capture-safe)"
            except FreezeRefused as exc:
                refused = f"no frozen twin: {exc}"

        # CUDA events around a CUDA-graph replay (trtexec's GPU compute time); eager events when
        # --qatcheck-cuda-graph off or capture fails (the call's note says so)
        def forward():
            with strict_fp32(strict):
                return module(xt)
        call = cuda_timing.timed_call(forward, self.cuda_graph)
        if note and not call.note:
            call.note = note
        elif refused and call.note:
            call.note = f"{call.note} ({refused})"
        return call

    def probe(self) -> TimedCall | None:
        """On CUDA, the probe network timed like the model (GPU clocks and other tenants move
        both alike). None on the CPU: there contention is measured directly (timing.CpuLoad) -
        a fixed CPU workload was seen not to slow down with a busy core the way models do."""
        from qatcheck.backends import probe

        if not self._device.startswith("cuda"):
            return None
        if self._probe is None:
            self._probe = probe.torch_module(probe.CUDA_SHAPE[1]).to(self._device)
        xt = self._torch.from_numpy(probe.probe_input(probe.CUDA_SHAPE)).to(self._device)
        return self._timed(self._probe, xt, True)

    def versions(self) -> dict[str, str]:
        """What a latency baseline depends on besides the device; the clock is included so eager
        and graph-replay figures are never compared with each other."""
        torch = self._torch
        v = {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads()), "timing": self._clock}
        if self._device.startswith("cuda"):
            v["cuda"] = str(torch.version.cuda)
        return v


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, options=None) -> None:
        self.requested_device = getattr(options, "device", "auto")
        self.cuda_graph = getattr(options, "cuda_graph", "auto")
        threads = getattr(options, "threads", None)
        if threads is not None:  # CPU intra-op threads (a process-wide setting in PyTorch)
            import torch

            torch.set_num_threads(int(threads))

    def unavailable_reason(self) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:  # pragma: no cover - torch is a dependency
            return f"torch is not importable: {exc}"
        return None

    def identity(self, context: BuildContext) -> dict | None:
        """The torch module by its artifact's identity (cache key and file), torch's version and
        the device: on CUDA the GPU and CUDA version, on the CPU the intra-op thread count (it
        orders the sums: see OrtBackend.identity)."""
        import torch

        if context.torch_identity is None:
            return None
        device = resolve_device(self.requested_device)
        runtime = {"torch": torch.__version__, "device": device.split(":")[0]}
        if device.startswith("cuda"):
            runtime.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=str(torch.version.cuda))
        else:
            runtime.update(threads=str(torch.get_num_threads()))
        return {"artifact": context.torch_identity(context.mode), "runtime": runtime}

    def runner(self, context: BuildContext) -> Runner:
        artifact = context.torch_artifact(context.mode)
        return TorchRunner(artifact.module, artifact.precision, resolve_device(self.requested_device),
                           self.cuda_graph)
