"""Modes and backends: names, and which (mode, backend) pairs make sense.

Why a table and not if-statements scattered across builders: the suite parametrization, the report
and the error messages all need the same answer to "can backend B run mode M, and if not, why".
"""
from __future__ import annotations

from qatcheck.errors import ConfigError

MODES: tuple[str, ...] = ("fp32", "fp16", "trt_ptq", "partial", "torch_ptq", "qat", "dynamic")
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")

#: Modes whose quantization exists only in the ONNX graph (ONNX-level PTQ): PyTorch cannot run them.
ONNX_ONLY_MODES = frozenset({"trt_ptq", "partial"})
#: Modes that carry int8 Q/DQ.
INT8_MODES = frozenset({"trt_ptq", "partial", "torch_ptq", "qat"})

#: Which calibrators each mode family accepts (checked when the recipe is built).
ONNX_CALIBRATORS: tuple[str, ...] = ("minmax", "entropy", "percentile")
TORCH_CALIBRATORS: tuple[str, ...] = ("max", "entropy", "mse", "percentile")


def check_mode(name: str) -> str:
    if name not in MODES:
        raise ConfigError(f"unknown mode {name!r}; known modes: {', '.join(MODES)}")
    return name


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return name


def unsupported_reason(mode: str, backend: str) -> str | None:
    """Why ``backend`` cannot execute ``mode`` by design (None when it can).

    This is about the pairing, not about what is installed: an uninstalled backend is a runtime skip
    decided by the backend itself.
    """
    if backend == "torch" and mode in ONNX_ONLY_MODES:
        return (f"mode {mode!r} quantizes the ONNX graph (ONNX-level PTQ); PyTorch has no executor "
                "for it - run it on onnxruntime or tensorrt")
    return None


def parity_reference(mode: str, backend: str) -> tuple[str, str] | None:
    """The PyTorch case a (mode, backend) case is compared with, and the relation's name.

    - ``export``: the same mode in PyTorch vs its exported graph on another backend (is the
      export faithful?);
    - ``quantization``: a low-precision mode vs fp32 (how far did precision move the outputs?).
      ONNX-only modes have no PyTorch twin, so they are compared with fp32.
    PyTorch fp32 (and ``dynamic``, which is fp32 at other shapes) is the reference itself: None.
    """
    if backend == "torch":
        return None if mode in ("fp32", "dynamic") else ("fp32", "quantization")
    if mode in ONNX_ONLY_MODES:
        return ("fp32", "quantization")
    return (mode, "export")
