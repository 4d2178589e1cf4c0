"""The PyTorch-side quantizer interface: :class:`TorchQuantizer`, and what every implementation shares.

``torch_ptq`` / ``qat`` (and ``fp8``) insert Q/DQ in PyTorch with a quantizing library. Which one is
a name (``QuantSettings.torch_quantizer``; the ``fp8`` row names its own) looked up in
:data:`qatcheck.registry.TORCH_QUANTIZERS`: pytorch-quantization
(:class:`qatcheck.quantize.torch_quant.PytorchQuantization`) and NVIDIA ModelOpt
(:class:`qatcheck.quantize.modelopt_quant.ModelOpt`) are built in, more are added with
:func:`qatcheck.registry.register_torch_quantizer`. The rest of qatcheck asks the table once where an
artifact is built (the artifact builder) or :func:`quantizer_of` where it holds a model, and never
names a library: a new implementation gets the structure check, sensitivity, localization and the
CUDA-graph timing with no other change.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from qatcheck.errors import ArtifactError, DataError
from qatcheck.registry import TORCH_QUANTIZERS, torch_quantizer, torch_quantizer_library

if TYPE_CHECKING:  # pragma: no cover
    from qatcheck.recipe import QuantSettings

__all__ = ["TorchQuantizer", "FreezeRefused", "quantizer_of", "is_quantizer", "is_enabled", "set_enabled",
           "quiet", "replace_quantizers", "feed_calibration", "read_checkpoint"]

#: one quantizer's scales as its Q/DQ export writes them: ``(key, kind, scales)`` with key
#: ``<module>:weight`` / ``<module>:input`` (a quantizer outside a layer: ``<its path>:input``) and
#: kind ``weight`` / ``activation`` - the structure check's names (qatcheck.quantize.structure)
Scales = tuple[str, str, "np.ndarray | np.float32"]


class FreezeRefused(ValueError):
    """A quantizer configuration the frozen twin does not reproduce exactly; the message names it.
    The torch backend then times the model itself (eager CUDA events)."""


class TorchQuantizer(ABC):
    """One quantizing library, as qatcheck uses it. Implementations are stateless; the table holds
    the class (or one instance) under :attr:`name`."""

    #: the table's name for it (``QuantSettings.torch_quantizer``, the "(name)" in the calibrator column)
    name: str = ""

    # ---- availability, cache keys -------------------------------------------------------------
    @abstractmethod
    def version(self) -> str:
        """The installed library's version ("absent" without it)."""

    def missing_reason(self, what: str = "this case") -> str | None:
        """Why the library cannot be used here, with what to install (None: it can)."""
        return None

    def require(self, what: str) -> None:
        """Skip the running test with :meth:`missing_reason` (an optional extra is a skip, not a failure)."""
        reason = self.missing_reason(what)
        if reason:
            import pytest

            pytest.skip(reason)

    def cache_id(self) -> str:
        """What the ``torch_quantizer`` key field holds: the name and what of the library shapes an artifact."""
        return f"{self.name}=={self.version()}"

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """The library's per-call logging and printing silenced (a calibration would bury the report)."""
        yield

    # ---- build -------------------------------------------------------------------------------
    @abstractmethod
    def quantize(self, model: nn.Module, quant: QuantSettings, batches: Iterable[Any], *, fp8: bool = False,
                 device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
        """A quantized, calibrated copy of ``model`` (int8 by ``quant``, or FP8 E4M3), in eval mode on
        ``device``; ``model`` is not modified. A quantizer that saw no data is disabled."""

    @abstractmethod
    def save(self, qmodel: nn.Module, path: str | Path, quant: QuantSettings, fp8: bool = False) -> None:
        """Store a calibrated (or fine-tuned) model, atomically, the same bytes for the same state."""

    @abstractmethod
    def load(self, model: nn.Module, path: str | Path, quant: QuantSettings, fp8: bool = False) -> nn.Module:
        """Rebuild a model stored by :meth:`save` on the fp32 ``model`` (not modified), in eval mode,
        without calibrating: bit-identical outputs. A file of other settings is an ArtifactError."""

    @abstractmethod
    def export_onnx(self, qmodel: nn.Module, example: torch.Tensor, path: str | Path, input_name: str,
                    output_names: Sequence[str], dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
        """Export a calibrated model as a Q/DQ ONNX (QuantizeLinear / DequantizeLinear), atomically."""

    # ---- inspect, toggle ---------------------------------------------------------------------
    @abstractmethod
    def is_quantizer(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this library's quantizers (a fake-quant of one tensor)."""

    @abstractmethod
    def is_enabled(self, quantizer: nn.Module) -> bool:
        """Whether the quantizer quantizes (a disabled one passes its input through, and gets no Q/DQ)."""

    @abstractmethod
    def set_enabled(self, quantizer: nn.Module, on: bool) -> None:
        """Enable or disable one quantizer in place (sensitivity and localization toggle them)."""

    @abstractmethod
    def scales(self, qmodel: nn.Module) -> list[Scales]:
        """``(key, kind, scales)`` per enabled quantizer, as its export writes them (see :data:`Scales`)."""

    def owns(self, module: nn.Module) -> bool:
        """Whether ``module`` holds this library's quantizers (whether it was quantized by it)."""
        return any(self.is_quantizer(m) for m in module.modules())

    def quantizers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """``(name, quantizer)`` for every quantizer of ``model``, enabled or not."""
        return ((n, m) for n, m in model.named_modules() if self.is_quantizer(m))

    def names(self, qmodel: nn.Module) -> list[str]:
        """The enabled quantizers' module names: exactly the tensors that get Q/DQ in the export."""
        return [n for n, q in self.quantizers(qmodel) if self.is_enabled(q)]

    # ---- CUDA-graph capture -------------------------------------------------------------------
    def needs_freeze(self, model: nn.Module) -> bool:
        """Whether ``model``'s quantizers break CUDA-graph capture (they read device values on the host)."""
        return False

    def freeze(self, model: nn.Module) -> nn.Module:
        """A capture-safe, output-identical copy of ``model`` (its quantizers' scales precomputed), or
        :class:`FreezeRefused` naming the quantizer it cannot reproduce."""
        raise FreezeRefused(f"{self.name}: no frozen twin")


# ---- which quantizer a model has -----------------------------------------------------------------

def _loaded() -> Iterator[TorchQuantizer]:
    """The registered quantizers that can own a model in this process: those whose library (or, not
    given, implementation module) is imported - never imports one (a process that has not imported
    a library holds none of its quantizers)."""
    for name in TORCH_QUANTIZERS:
        library = torch_quantizer_library(name)
        if library is None or library in sys.modules:
            yield torch_quantizer(name)


def quantizer_of(module: nn.Module) -> TorchQuantizer | None:
    """The registered quantizer whose quantizers ``module`` holds (None: a float model)."""
    return next((q for q in _loaded() if q.owns(module)), None)


def _owner_of(quantizer: nn.Module) -> TorchQuantizer | None:
    return next((q for q in _loaded() if q.is_quantizer(quantizer)), None)


def is_quantizer(module: nn.Module) -> bool:
    """Whether ``module`` is a quantizer of any registered library."""
    return _owner_of(module) is not None


def is_enabled(quantizer: nn.Module) -> bool:
    owner = _owner_of(quantizer)
    return owner is not None and owner.is_enabled(quantizer)


def set_enabled(quantizer: nn.Module, on: bool) -> None:
    owner = _owner_of(quantizer)
    if owner is None:
        raise TypeError(f"{type(quantizer).__name__} is not a registered quantizer")
    owner.set_enabled(quantizer, on)


@contextlib.contextmanager
def quiet(module: nn.Module) -> Iterator[None]:
    """The logs of ``module``'s quantizer silenced (nothing for a float model)."""
    q = quantizer_of(module)
    with (q.quiet() if q is not None else contextlib.nullcontext()):
        yield


# ---- shared by the implementations ---------------------------------------------------------------

def replace_quantizers(model: nn.Module, is_quantizer: Callable[[nn.Module], bool],
                       replace: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with each quantizer ``q`` (``is_quantizer(q)``) swapped for
    ``replace(q, name)`` (the frozen twins' walk). A quantizer registered under several names (the
    Q/DQ rules' shared quantizers) stays one module; one ``replace`` returns as it is stays; the
    model itself may be a quantizer."""
    twin = copy.deepcopy(model)
    if is_quantizer(twin):
        return replace(twin, "<model>")
    done: dict[int, nn.Module] = {}
    for name, module in list(twin.named_modules(remove_duplicate=False)):
        if not is_quantizer(module):
            continue
        if id(module) not in done:
            done[id(module)] = replace(module, name)
        if done[id(module)] is module:
            continue
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, done[id(module)])
    return twin


def device_of(module: nn.Module) -> torch.device:
    """Where a module lives (a pooling-only model has buffers at most, possibly nothing)."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _as_input(batch: Any) -> torch.Tensor:
    """A calibration batch as a float32 tensor. ``(inputs, targets)`` pairs are accepted because
    that is what :meth:`qatcheck.data.base.Dataset.batches` yields."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("calibration batch is an empty tuple")
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    if torch.is_tensor(batch):
        return batch.float()
    raise DataError(f"calibration batch must be a numpy array or a torch tensor; "
                    f"got {type(batch).__name__}")


def feed_calibration(model: nn.Module, batches: Iterable[Any], device, expected: tuple | None = None,
                     progress: bool = False, desc: str = "calibrate") -> int:
    """Run ``model`` (no grad) on every calibration batch: all of one shape (``expected``, batch
    dim excluded; default the first batch's), a batch of another shape or one the model rejects is
    a DataError naming it, and no batch at all is one too. Returns how many batches ran. Every
    implementation's calibration feeds its data through this."""
    iterator: Iterable[Any] = batches
    if progress:
        from tqdm import tqdm
        iterator = tqdm(batches, desc=desc, unit="batch")
    seen = 0
    with torch.no_grad():
        for seen, batch in enumerate(iterator, start=1):
            x = _as_input(batch)
            expected = expected or tuple(x.shape[1:])
            if tuple(x.shape[1:]) != expected:
                raise DataError(f"calibration batch {seen} has shape {tuple(x.shape)}; "
                                f"expected (N, {', '.join(map(str, expected))})")
            try:
                model(x.to(device))
            except RuntimeError as exc:
                raise DataError(f"calibration batch {seen} of shape {tuple(x.shape)} does not fit "
                                f"the model: {exc}") from exc
    if seen == 0:
        raise DataError("calibration data yielded no batches")
    return seen


def read_checkpoint(path: Path, fmt: str, what: str) -> dict:
    """A qatcheck checkpoint's payload (tensors only: ``weights_only``); an unreadable file or one
    of another format is one ArtifactError naming the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise ArtifactError(f"{path}: cannot read {what}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ArtifactError(f"{path}: not a qatcheck {what} ({fmt})")
    return payload

