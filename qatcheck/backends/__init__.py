"""Backends: one small runner module each (torch, onnxruntime, tensorrt), found through a registry.

A backend is created from the session's options (``factory(options) -> Backend``) and turns a
:class:`qatcheck.backends.base.BuildContext` into a runner. The registry holds ``"module:Class"``
strings for the built-in ones, so naming a backend (a pytest marker, ``--qatcheck-backends``)
imports nothing; the module loads when a suite first needs a runner.
"""
from __future__ import annotations

from typing import Any, Callable

from qatcheck.errors import ConfigError

#: name -> factory ``(options) -> Backend`` or ``"module:Class"``
BACKEND_FACTORIES: dict[str, Any] = {
    "torch": "qatcheck.backends.torch_backend:TorchBackend",
    "onnxruntime": "qatcheck.backends.onnxruntime_backend:OrtBackend",
    "tensorrt": "qatcheck.backends.tensorrt_backend:TensorRTBackend",
}
#: name -> what it executes: "torch" (modules) or "onnx" (graphs; TensorRT builds engines from them)
BACKEND_INPUTS: dict[str, str] = {"torch": "torch", "onnxruntime": "onnx", "tensorrt": "onnx"}
#: the built-in backends (a recipe's default ``backends``)
BACKENDS: tuple[str, ...] = tuple(BACKEND_FACTORIES)


def register_backend(name: str, factory: Callable[[Any], Any] | str, *, executes: str = "onnx",
                     replace: bool = False) -> None:
    """Add a backend: ``factory(options)`` returns a :class:`~qatcheck.backends.base.Backend`;
    ``executes`` says whether it runs torch modules or ONNX graphs (graph-only modes such as
    trt_ptq never reach a torch backend)."""
    if name in BACKEND_FACTORIES and not replace:
        raise ConfigError(f"backend {name!r} is already registered")
    if executes not in ("torch", "onnx"):
        raise ConfigError(f"register_backend({name!r}): executes must be 'torch' or 'onnx', got {executes!r}")
    BACKEND_FACTORIES[name] = factory
    BACKEND_INPUTS[name] = executes


def unregister_backend(name: str) -> None:
    BACKEND_FACTORIES.pop(name, None)
    BACKEND_INPUTS.pop(name, None)


def executes(name: str) -> str:
    return BACKEND_INPUTS.get(check_backend(name), "onnx")


def backend_names() -> tuple[str, ...]:
    return tuple(BACKEND_FACTORIES)


def check_backend(name: str) -> str:
    if name not in BACKEND_FACTORIES:
        raise ConfigError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_FACTORIES)}")
    return name


def create_backend(name: str, options: Any):
    from qatcheck.modes import resolve

    return resolve(BACKEND_FACTORIES[check_backend(name)])(options)
