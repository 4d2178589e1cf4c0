"""TensorRT backend placeholder for availability: the engine builder arrives with the GPU issue.

Until then the backend reports itself unavailable with the reason, so suites skip (or fail under
``--qatcheck-require tensorrt``) instead of silently omitting TensorRT.
"""
from __future__ import annotations

from qatcheck.backends.base import Artifact, Backend, Runner


class TensorRTBackend(Backend):
    name = "tensorrt"

    def unavailable_reason(self) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except Exception as exc:  # the PyPI stub raises on import without its index
            return f"TensorRT is not installed here ({type(exc).__name__}: {exc})"
        return "the TensorRT engine builder is not implemented in this version of qatcheck"

    def runner(self, artifact: Artifact) -> Runner:  # pragma: no cover - unavailable
        raise NotImplementedError(self.unavailable_reason())
