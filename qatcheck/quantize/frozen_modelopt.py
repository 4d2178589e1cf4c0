"""The frozen twin's ModelOpt part: a capture-safe, output-identical form of ModelOpt 0.47's INT8
``TensorQuantizer`` (``modelopt.torch.quantization.nn``): ModelOpt's ``TorchQuantizer.freeze``
(:func:`freeze_model`, :class:`qatcheck.quantize.modelopt_quant.ModelOpt`).

Why. In eval an enabled INT8 ModelOpt quantizer computes, per call, on its pure-PyTorch path
(every CPU call, and CUDA without the JIT extension: ``QATCHECK_MODELOPT_CUDA_EXT=0``, as the GPU
runs use) ``FakeTensorQuantFunction.forward`` -> ``quantize_op`` -> ``fake_quant_impl``, whose
``get_cuda_ext()`` is None, so ``AttributeError`` -> ``tensor_quant._tensor_quant``, which reads
device values on the host:

* ``if min_amax < 0`` and twice ``if min_amax <= epsilon`` (``min_amax = amax.min()``): a
  ``bool(tensor)`` each (``aten::is_nonzero`` / ``_local_scalar_dense``), three per call;
* ``if unsigned and inputs.min() < 0.0``: one more for an unsigned quantizer;
* ``torch.tensor(max_bound, device=amax.device)``: a Python scalar copied host -> device per call
  (a synchronous pageable copy on CUDA);
* with an amax <= 2**-24: ``scale[zero_amax_mask] = 0`` and ``= 1``, boolean-mask ``index_put_``
  (a ``nonzero``, which synchronises), plus one ``torch.tensor`` per index.

Any of these invalidates a CUDA-graph capture (cudaErrorStreamCaptureInvalidated, measured on an
H200). The rest of the eval forward (``TensorQuantizer.forward``, ``_get_amax``,
``same_device_as``, the ``QuantModule`` wrappers) only branches on configuration and tensor
metadata. FP8 (``scaled_e4m3`` -> ``fp8_eager``, or the FP8 extension) has no host read and
captures as it is: FP8 quantizers are left in the twin unchanged.

What. :class:`FrozenModelOptQuant` holds ``_tensor_quant``'s scale precomputed (``mul`` and
``dq`` buffers, float32 on the quantizer's device) and repeats its ops in its order:
``x.contiguous()`` (what ``TensorQuantizer.forward`` does to a non-contiguous input),
``x.float()``, ``* scale``, ``round_()``, ``clamp`` to ``[lo, hi]``, ``/ scale``, ``.to(dtype)``
- fp16 / bf16 inputs are quantized *and divided* in float32, then cast (unlike
pytorch-quantization, which divides in the input dtype). ``scale = torch.tensor(2**(bits - 1 +
unsigned) - 1) / amax.float()``; where ``amax.min() <= 2**-24`` the channels with amax <= 2**-24
multiply by 0 and divide by 1, exactly as the original's masked assignments (and only then: a
NaN amax makes ``amax.min()`` NaN and the original masks nothing, so neither does the twin).
Range: unsigned ``[0, bound]``, ``narrow_range`` ``[-bound, bound]``, else ``[-bound - 1, bound]``.
Per-channel amax is ModelOpt's keepdim shape (``(C, 1, 1, 1)`` for conv weights, ``(C, 1)`` for
linear), broadcast against the input as the original broadcasts it. A disabled quantizer (or one
with quantization off) becomes :class:`ModelOptPassthrough`, an identity.

Refused (:class:`FreezeRefused`, naming the quantizer; the torch backend then times the model
itself, as before): block / MX / NVFP4 formats (``block_sizes``), dynamic quantization or no
calibrated amax, ``pre_quant_scale`` (SmoothQuant / AWQ; applied even when disabled), ``rotate``,
a ``bias``, a custom ``backend``, real quantization (``fake_quant=False``), a constant amax,
quantizer subclasses other than ``HardDisabledTensorQuantizer`` (their forwards differ) and
``SequentialQuantizer`` / ``GroupedQuantizer`` containers, floating-point formats other than
plain E4M3, a meta amax, and a negative ``amax.min()`` (the original raises).

What the original does and the twin does not: statistics collection (``_if_calib``; it changes
no output) and the errors on negative inputs to an unsigned quantizer (a host read).

With ModelOpt's CUDA extension loaded, the original on CUDA runs its ``fake_tensor_quant`` kernel
instead (``rint(x * (bound / amax))``, clamp, ``/ scale`` in float32): the same values, except that
it zeroes amax < 2**-24 where the fallback zeroes amax <= 2**-24 (differs only for an amax of
exactly 2**-24). The extension path has no host read; the twin reproduces the fallback.

Proof: ``tests/test_frozen_modelopt.py`` (configurations at rounding ties, the digits ModelOpt
torch_ptq / qat models, the host-read recorder) and ``benchmarks/device_frozen_modelopt.py``
(CUDA: identical outputs, graph capture).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from qatcheck.quantize.torch_common import FreezeRefused, replace_quantizers

__all__ = ["FreezeRefused", "FrozenModelOptQuant", "ModelOptPassthrough", "is_modelopt_quantizer",
           "needs_freeze", "check_containers", "freeze_modelopt_quantizer", "freeze_model"]

#: ``_tensor_quant``'s epsilon: amax <= 2**-24 quantizes to 0
_ZERO_AMAX = 1.0 / (1 << 24)
_TQ_MODULE = "modelopt.torch.quantization.nn.modules.tensor_quantizer"
#: subclasses whose eval forward is TensorQuantizer's (HardDisabled only forces ``_disabled``)
_ACCEPTED = ("TensorQuantizer", "HardDisabledTensorQuantizer")




def _tq_module():
    """ModelOpt's tensor_quantizer module if this process imported it (never imports ModelOpt: a
    process that has not has no ModelOpt quantizer)."""
    return sys.modules.get(_TQ_MODULE)


def is_modelopt_quantizer(module: nn.Module) -> bool:
    mod = _tq_module()
    return mod is not None and isinstance(module, mod.TensorQuantizer)


def _is_plain_fp8(q) -> bool:
    return q._num_bits == (4, 3) and q._block_sizes is None and getattr(q, "backend", None) is None


def _captures_as_is(q) -> bool:
    """Whether the original quantizer's eval forward already has no host read: disabled (input
    passed through, after any pre_quant_scale / rotate, which are tensor ops), or plain FP8."""
    return bool(q._disabled) or _is_plain_fp8(q)


def needs_freeze(model: nn.Module) -> bool:
    """Whether ``model`` holds a ModelOpt quantizer that breaks CUDA-graph capture (an enabled
    integer one, or a format this module does not know), or a quantizer container."""
    mod = _tq_module()
    if mod is None:
        return False
    containers = (mod.SequentialQuantizer, mod.GroupedQuantizer)
    return any((isinstance(m, mod.TensorQuantizer) and not _captures_as_is(m)) or isinstance(m, containers)
               for m in model.modules())


def check_containers(model: nn.Module) -> None:
    """Refuse ``SequentialQuantizer`` / ``GroupedQuantizer`` (several formats on one tensor,
    attribute delegation): not reproduced."""
    mod = _tq_module()
    if mod is None:
        return
    for name, m in model.named_modules():
        if isinstance(m, (mod.SequentialQuantizer, mod.GroupedQuantizer)):
            raise FreezeRefused(f"ModelOpt {type(m).__name__} {name!r}: quantizer containers are not "
                                "reproduced by the frozen twin")


class _Facts:
    """The read-only configuration a ``QuantModule`` wrapper may consult on its quantizers in
    forward (e.g. ``_QuantConv3d._should_use_implicit_gemm`` reads ``num_bits`` / ``block_sizes``)."""

    def _set_facts(self, q, enabled: bool) -> None:
        self.num_bits = q._num_bits
        self.axis = q._axis
        self.unsigned = bool(q._unsigned)
        self.narrow_range = bool(q._narrow_range)
        self.block_sizes = None
        self.pre_quant_scale = None
        self.fake_quant = True
        self.is_enabled = enabled
        self._if_calib = False


class ModelOptPassthrough(_Facts, nn.Identity):
    """A disabled ModelOpt quantizer (or one with quantization off): returns its input."""

    def __init__(self, quantizer) -> None:
        super().__init__()
        self._set_facts(quantizer, enabled=not quantizer._disabled)

    def extra_repr(self) -> str:
        return "disabled" if not self.is_enabled else "quant off"


class FrozenModelOptQuant(_Facts, nn.Module):
    """One enabled INT ModelOpt ``TensorQuantizer``'s eval forward with its scale precomputed;
    build it with :func:`freeze_modelopt_quantizer`. Buffers ``mul`` (quantize multiplier, 0 for
    a "zero" amax) and ``dq`` (divisor, 1 there)."""

    def __init__(self, quantizer, name: str = "") -> None:
        super().__init__()
        q = quantizer
        self._set_facts(q, enabled=True)
        bits, unsigned = int(q._num_bits), bool(q._unsigned)
        # _tensor_quant's ops and dtypes, done once: max_bound is a default-dtype tensor on amax's device
        amax = q._amax.detach().float()
        max_bound = torch.tensor((2.0 ** (bits - 1 + int(unsigned))) - 1.0, device=amax.device)
        min_amax = amax.min()
        if bool(min_amax < 0):
            raise FreezeRefused(f"ModelOpt quantizer {name!r}: negative amax (ModelOpt raises 'Negative "
                                "values in amax')")
        bound = float(max_bound)
        self.lo = 0.0 if unsigned else (-bound if q._narrow_range else -bound - 1.0)
        self.hi = bound
        scale = max_bound / amax
        mul, dq = scale, scale
        if bool(min_amax <= _ZERO_AMAX):  # the original's masked assignments, only in that case
            dead = amax <= _ZERO_AMAX
            mul, dq = scale.masked_fill(dead, 0.0), scale.masked_fill(dead, 1.0)
        self.register_buffer("mul", mul.clone())
        self.register_buffer("dq", dq.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():  # TensorQuantizer.forward; a layout branch, not a value read
            x = x.contiguous()
        dtype = x.dtype
        out = torch.clamp((x.float() * self.mul).round_(), self.lo, self.hi)
        return (out / self.dq).to(dtype)

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.mul.numel() == 1 else f"per-channel {tuple(self.mul.shape)}"
        return f"int{self.num_bits} [{self.lo:g}, {self.hi:g}] {kind}"


def freeze_modelopt_quantizer(quantizer, name: str = "") -> nn.Module:
    """The frozen form of one ModelOpt quantizer: :class:`ModelOptPassthrough` where the original
    returns its input, a :class:`FrozenModelOptQuant` for an enabled INT fake quantizer, the
    quantizer itself for plain FP8 (it captures as it is). Raises :class:`FreezeRefused` for
    anything else (see the module doc)."""
    q = quantizer

    def refuse(why: str) -> FreezeRefused:
        return FreezeRefused(f"ModelOpt quantizer {name!r} ({type(q).__name__}): {why}; the frozen twin "
                             "reproduces static-amax integer fake quant only")

    if type(q).__name__ not in _ACCEPTED or type(q).__module__ != _TQ_MODULE:
        raise refuse("a TensorQuantizer subclass with its own forward")
    if q.pre_quant_scale is not None:
        raise refuse("pre_quant_scale")
    if q.rotate_is_enabled:
        raise refuse("rotate")
    if q._disabled:
        return ModelOptPassthrough(q)
    if isinstance(q._num_bits, tuple):
        if _is_plain_fp8(q):
            return q
        raise refuse(f"floating-point format {q._num_bits} with block_sizes={q._block_sizes}")
    if getattr(q, "backend", None) is not None:
        raise refuse(f"custom backend {q.backend!r}")
    if q._block_sizes is not None:
        raise refuse(f"block quantization (block_sizes={q._block_sizes})")
    if q._dynamic:
        raise refuse("dynamic quantization")
    if not q._fake_quant or q._dequantize:
        raise refuse("real quantization (fake_quant=False)")
    if q.bias is not None:
        raise refuse(f"bias {q.bias}")
    if q._use_constant_amax:
        raise refuse("use_constant_amax")
    if not q._if_quant:
        return ModelOptPassthrough(q)
    amax = getattr(q, "_amax", None)
    if amax is None:
        raise refuse("no calibrated amax (a per-call dynamic range)")
    if amax.is_meta:
        raise refuse("amax on the meta device")
    return FrozenModelOptQuant(q, name)


def freeze_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose ModelOpt quantizers are frozen (:func:`freeze_modelopt_quantizer`;
    plain FP8 ones are kept); the original is not modified. A configuration the twin does not
    reproduce raises :class:`FreezeRefused`."""
    check_containers(model)
    return replace_quantizers(model, is_modelopt_quantizer, freeze_modelopt_quantizer)
