"""PyTorch backend: fp32, fp16 and fake-quant modules on CPU or CUDA."""
from __future__ import annotations

import numpy as np

from qatcheck.backends.base import Artifact, Backend, Runner, TimedCall


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from qatcheck.errors import ConfigError

        raise ConfigError(f"--qatcheck-device={requested} but torch sees no CUDA device")
    return requested


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, module, precision: str, device: str) -> None:
        import torch

        self._torch = torch
        self._device = device
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.module = module.to(device=device, dtype=self.dtype).eval()

    @property
    def device(self) -> str:
        return self._device

    def _to_device(self, x: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(x)).to(self._device, self.dtype)

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        with self._torch.inference_mode():
            out = self.module(self._to_device(x))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().float().cpu().numpy() for o in outs]

    def timed_call(self, x: np.ndarray) -> TimedCall:
        torch = self._torch
        xt = self._to_device(x)
        module = self.module
        if not self._device.startswith("cuda"):
            def run() -> None:
                with torch.inference_mode():
                    module(xt)
            return TimedCall(run)
        times: list[float] = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run_cuda() -> None:
            with torch.inference_mode():
                start.record()
                module(xt)
                end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return TimedCall(run_cuda, times)

    def versions(self) -> dict[str, str]:
        torch = self._torch
        v = {"torch": torch.__version__, "torch_threads": str(torch.get_num_threads())}
        if self._device.startswith("cuda"):
            v["cuda"] = str(torch.version.cuda)
        return v


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "auto") -> None:
        self.requested_device = device

    def unavailable_reason(self) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:  # pragma: no cover - torch is a dependency
            return f"torch is not importable: {exc}"
        return None

    def accepts(self) -> tuple[str, ...]:
        return ("torch",)

    def runner(self, artifact: Artifact) -> Runner:
        return TorchRunner(artifact.module, artifact.precision, resolve_device(self.requested_device))
