"""Tables of replaceable parts, chosen once by name: backends here, torch and ONNX quantizers in
:mod:`qatcheck.quantize`. An entry is the object or a ``"module:attr"`` string, so naming a part (a
pytest marker, ``--qatcheck-backends``, ``QuantSettings.torch_quantizer``) imports nothing; its
module loads when it is first used."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

from qatcheck.errors import ConfigError


def resolve(ref: Any) -> Any:
    """``"module:attr"`` -> the attribute (anything else passes through)."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


class Table:
    """name -> implementation (or ``"module:attr"``), resolved on first use."""

    def __init__(self, what: str, entries: dict[str, Any]):
        self.what = what
        self.entries: dict[str, Any] = dict(entries)

    def register(self, name: str, impl: Any, *, replace: bool = False) -> None:
        if name in self.entries and not replace:
            raise ConfigError(f"{self.what} {name!r} is already registered")
        self.entries[name] = impl

    def unregister(self, name: str) -> None:
        self.entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def check(self, name: str) -> str:
        if name not in self.entries:
            raise ConfigError(f"unknown {self.what} {name!r}; known: {', '.join(self.entries)}")
        return name

    def get(self, name: str) -> Any:
        impl = self.entries[self.check(name)]
        if isinstance(impl, str):
            impl = self.entries[name] = resolve(impl)
        return impl

    def instance(self, name: str) -> Any:
        """``name``'s implementation as one object: a class is made once (no arguments) and named."""
        impl = self.get(name)
        if isinstance(impl, type):
            impl = self.entries[name] = impl()
            impl.name = name
        return impl

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)


# --- backends --------------------------------------------------------------------------------
# A backend is created from the session's options (``factory(options) -> Backend``) and turns a
# qatcheck.backends.base.BuildContext into a runner.

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
    return resolve(BACKEND_FACTORIES[check_backend(name)])(options)


# --- quantizers ------------------------------------------------------------------------------
# Which library inserts Q/DQ is a name looked up here, once, where an artifact is built (or found
# from a model: qatcheck.quantize.torch_common.quantizer_of); nothing else names a library.

#: QuantSettings.torch_quantizer's default (its calibrator column carries no "(name)")
DEFAULT_TORCH_QUANTIZER = "pytorch-quantization"
#: name -> a qatcheck.quantize.torch_common.TorchQuantizer (class or instance, or "module:Class")
TORCH_QUANTIZERS = Table("torch quantizer", {
    "pytorch-quantization": "qatcheck.quantize.torch_quant:PytorchQuantization",
    "modelopt": "qatcheck.quantize.modelopt_quant:ModelOpt",
})
#: name -> the module whose presence in sys.modules means a model may hold its quantizers
#: (quantizer_of asks only those: it never imports a library); absent: the implementation's module
_TORCH_QUANTIZER_LIBRARIES: dict[str, str] = {
    "pytorch-quantization": "pytorch_quantization",
    "modelopt": "modelopt.torch.quantization",
}


def register_torch_quantizer(name: str, impl: Any, *, library: str | None = None,
                             replace: bool = False) -> None:
    """Add a PyTorch-side quantizer: ``impl`` is a
    :class:`~qatcheck.quantize.torch_common.TorchQuantizer` subclass or instance, or its
    ``"module:Class"``. ``QuantSettings(torch_quantizer=name)`` then quantizes torch_ptq / qat with
    it. ``library``: the module a process has imported when a model holds its quantizers (default:
    the implementation's own module)."""
    TORCH_QUANTIZERS.register(name, impl, replace=replace)
    _TORCH_QUANTIZER_LIBRARIES.pop(name, None)
    if library is not None:
        _TORCH_QUANTIZER_LIBRARIES[name] = library


def unregister_torch_quantizer(name: str) -> None:
    TORCH_QUANTIZERS.unregister(name)
    _TORCH_QUANTIZER_LIBRARIES.pop(name, None)


#: the TorchQuantizer registered as a name (one instance, made on first use)
torch_quantizer = TORCH_QUANTIZERS.instance


def torch_quantizer_library(name: str) -> str | None:
    """The module that must be imported before a model can hold ``name``'s quantizers (None: any
    time - an implementation given as an object)."""
    if name in _TORCH_QUANTIZER_LIBRARIES:
        return _TORCH_QUANTIZER_LIBRARIES[name]
    impl = TORCH_QUANTIZERS.entries.get(name)
    return impl.partition(":")[0] if isinstance(impl, str) else None


#: name -> a qatcheck.quantize.onnx_ptq.OnnxQuantizer (--qatcheck-trt-ptq picks it: "modelopt", else "qatcheck")
ONNX_QUANTIZERS = Table("ONNX quantizer", {
    "qatcheck": "qatcheck.quantize.onnx_ptq:QatcheckPTQ",
    "modelopt": "qatcheck.quantize.modelopt_onnx:ModelOptPTQ",
})
DEFAULT_ONNX_QUANTIZER = "qatcheck"


def register_onnx_quantizer(name: str, impl: Any, *, replace: bool = False) -> None:
    """Add an ONNX-level quantizer (writes the trt_ptq / partial Q/DQ graph): an
    :class:`~qatcheck.quantize.onnx_ptq.OnnxQuantizer` subclass or instance, or its ``"module:Class"``."""
    ONNX_QUANTIZERS.register(name, impl, replace=replace)


#: the OnnxQuantizer registered as a name (one instance, made on first use)
onnx_quantizer = ONNX_QUANTIZERS.instance
