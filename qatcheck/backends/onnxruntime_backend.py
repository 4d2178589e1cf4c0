"""ONNX Runtime backend: any installed execution provider.

Q/DQ graphs run on the CPU provider as fake-quant (slower than fp32): good for accuracy and parity,
not for int8 latency claims - the report says so next to such latencies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qatcheck.backends.base import Backend, BuildContext, Runner, TimedCall
from qatcheck.backends.polygraphy_runner import PolygraphyRunner
from qatcheck.errors import ArtifactError, ConfigError

#: providers that do not execute graphs locally
_NOT_COMPUTE = {"AzureExecutionProvider"}
_PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def compute_providers() -> list[str]:
    import onnxruntime as ort

    return [p for p in ort.get_available_providers() if p not in _NOT_COMPUTE]


def choose_provider(requested: str = "auto") -> str:
    available = compute_providers()
    if requested != "auto":
        if requested not in available:
            raise ConfigError(f"--qatcheck-ort-provider={requested} is not in this onnxruntime "
                              f"build; available: {', '.join(available)}")
        return requested
    for p in _PREFERENCE:
        if p in available:
            return p
    return available[0]


class OrtRunner(PolygraphyRunner):
    """ONNX Runtime through Polygraphy's ``OnnxrtRunner`` (see :mod:`.polygraphy_runner`), on a
    session qatcheck creates: Polygraphy's ``SessionFromOnnx`` takes no session options, and the
    thread settings below are what makes a CPU latency repeatable."""

    backend = "onnxruntime"

    def __init__(self, path, provider: str, input_name: str | None = None,
                 threads: int | None = None) -> None:
        """``path``: an ONNX file, or an in-memory model (``onnx.ModelProto`` or its serialized
        bytes) - the sensitivity profile's stripped variants are never written to disk.
        ``threads``: intra-op threads (None: ONNX Runtime's default, one per logical CPU)."""
        import onnxruntime as ort
        from polygraphy.backend.onnxrt import OnnxrtRunner

        self._ort = ort
        self.threads = threads
        opts = session_options(ort, threads)
        if hasattr(path, "SerializeToString"):  # onnx.ModelProto
            path = path.SerializeToString()
        in_memory = isinstance(path, (bytes, bytearray))
        src = bytes(path) if in_memory else str(path)
        label = "an in-memory ONNX model" if in_memory else src
        self._src, self._opts = src, opts
        #: the ONNX file it runs (None: in memory) - the latency judge keeps it as a reference
        self.artifact_path = None if in_memory else Path(src)
        try:
            self.session = ort.InferenceSession(src, opts, providers=[provider])
        except Exception as exc:
            raise ArtifactError(f"onnxruntime cannot load {label}: {exc}") from exc
        self.provider = provider
        super().__init__(OnnxrtRunner(self.session, name=f"onnxrt:{Path(label).name}"), input_name,
                         [o.name for o in self.session.get_outputs()], label)

    @property
    def device(self) -> str:
        return self.provider

    def polygraphy_run_args(self, bundle: Path) -> list[str]:
        """``polygraphy run`` flags that run the graph as this runner does."""
        if self.provider == "CPUExecutionProvider":
            return ["--onnxrt"]
        return ["--onnxrt", "--providers", self.provider]

    def timed_call(self, x: np.ndarray) -> TimedCall:
        """``session.run`` alone - the call Polygraphy's OnnxrtRunner times - in a fresh session
        per timed loop: a new thread pool lands on the cores anew, so a re-measurement is a second
        look at the model, not at one unlucky thread placement."""
        feed = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        run = self._ort.InferenceSession(self._src, self._opts, providers=[self.provider]).run
        return TimedCall(lambda: run(None, feed))

    def versions(self) -> dict[str, str]:
        v = {"onnxruntime": self._ort.__version__, "ort_provider": self.provider}
        if self.threads is not None:
            v["ort_threads"] = str(self.threads)
        return v


def session_options(ort, threads: int | None):
    """Session options timed like a benchmark: a fixed intra-op thread count, one inter-op thread,
    sequential execution, and no spin-waiting - spinning threads hold the cores between runs and
    turn any other process on the machine into latency noise."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, options=None) -> None:
        self.requested_provider = getattr(options, "ort_provider", "auto")
        self.threads = getattr(options, "threads", None)

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc}); pip install onnxruntime"
        return None

    def runner(self, context: BuildContext) -> Runner:
        artifact = context.onnx_artifact(context.mode)
        return OrtRunner(artifact.path, choose_provider(self.requested_provider), threads=self.threads)

    def identity(self, context: BuildContext) -> dict:
        """The ONNX file by content, ONNX Runtime's version and provider, and the intra-op thread
        count: it orders the sums, so figures can differ in their last digits (the detector's
        batch-1 parity at the min profile point did, at 1 and 2 threads - a pytest-xdist worker's
        share of the cores and a plain run's): a result is reused only at the count it was measured at."""
        import onnxruntime as ort

        return {"artifact": context.onnx_artifact(context.mode).digest,
                "runtime": {"onnxruntime": ort.__version__, "provider": choose_provider(self.requested_provider),
                            "threads": str(self.threads) if self.threads is not None else "default"}}

    def reference_runner(self, context: BuildContext, onnx_path) -> Runner:
        return OrtRunner(onnx_path, choose_provider(self.requested_provider), threads=self.threads)
