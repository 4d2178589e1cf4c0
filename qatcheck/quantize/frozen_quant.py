"""A capture-safe, output-identical twin of a calibrated pytorch-quantization model.

Why. On CUDA the torch backend times a case by capturing its forward in a CUDA graph and timing
replays (:mod:`qatcheck.backends.cuda_timing`). pytorch-quantization 2.1.3's ``TensorQuantizer``
cannot be captured: every call evaluates tensors on the host (``if amax.min() < 0``, the
``amax <= 2**-24`` guard, ``inputs.min() < 0`` for unsigned quantizers, ``amax.item()`` on the
``use_fb_fake_quant`` path), and a host read of a device value is not allowed while a stream is
capturing. torch_ptq / qat models therefore fell back to eager CUDA events, whose per-launch jitter
(CV 15-21 %) raised false latency alarms. Those reads only re-check the calibrated amax, which is
a constant in eval, so the scales can be computed once, ahead of time.

What. :func:`freeze_fake_quant` deep-copies the model and replaces every ``TensorQuantizer`` with
a :class:`FrozenFakeQuant` holding precomputed scale buffers (on the quantizer's device; they
move with ``.to()``). Its forward has no host read and no Python branch on a tensor value, only on
configuration and dtype. By default it repeats the original's arithmetic op for op, so its
outputs are bit-identical:

* the default path (``TensorQuantizer.use_fb_fake_quant`` False, what qatcheck evaluates):
  ``clamp(round(x * s), lo, hi) / s`` with ``s = (2**(bits - 1 + unsigned) - 1) / amax`` (zeroed
  for amax <= 2**-24), range ``[-2**(bits-1), 2**(bits-1) - 1]``, ``[-m, m]`` when narrow_range,
  ``[0, m]`` when unsigned; fp16 inputs are quantized in fp32 and divided in fp16, as the original.
  Integer output (``fake_quant=False``) skips the division and is always narrow-range, because
  ``tensor_quant`` is called without ``narrow_range`` (default True);
* the ``use_fb_fake_quant`` path (read when freezing): ATen's fake-quant kernels compute
  ``clamp(round(x * (1 / step)), lo, hi) * step`` with ``step = amax / bound`` in float32 and
  ``lo = -bound - 1`` whatever narrow_range says; the twin computes exactly that.

``fused=True`` calls ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``
instead (one kernel per quantizer, step = amax / bound, the path's range). On the default path it
is *not* bit-identical: ``x * (1 / step)`` and ``q * step`` round differently from
``x * (127 / amax)`` and ``q / (127 / amax)``, which moves activations across rounding boundaries
(digits torch_ptq logits: max-abs 0.032, two thirds of them differ; top-1 unchanged). Its
per-channel zero point is float32 because ATen validates an int32 one with ``aminmax().item()``,
a host read; the per-tensor kernel reads its scale on the host on the CPU only (on CUDA it reads a
device pointer, and capture works).

What the original does and the twin does not: statistics collection (``_if_calib``; it changes
no output), and the errors raised on negative inputs to unsigned quantizers or fp16 scales above
65504 (they need a host read; a negative calibrated amax is refused when freezing).

Proof, in ``tests/test_frozen_quant.py``: every configuration against a ``TensorQuantizer`` on
inputs at rounding ties (bit-identical); the built-in digits recipe's torch_ptq and qat models on
the whole eval set and the detection recipe's torch_ptq on 4 batches (bit-identical, so 100 %
top-1 agreement and cosine 1); no ``aten::item`` / ``_local_scalar_dense`` / ``is_nonzero`` in
the twin's forward under the torch profiler, which sees ATen's C++-side reads too (the digits
original makes 135); and on CUDA, capture with the harness's own
:func:`~qatcheck.backends.cuda_timing.capture_graph`, replayed on new batches, equal to eager.
Measured on an H200 (torch 2.11): the original fails capture; the twin's replays equal the eager
original bit for bit (digits torch_ptq / qat, digitdet torch_ptq).

This is pytorch-quantization's ``TorchQuantizer.freeze``
(:class:`qatcheck.quantize.torch_quant.PytorchQuantization`); other libraries freeze their own
quantizers (:mod:`qatcheck.quantize.frozen_modelopt`), through the same walk
(:func:`qatcheck.quantize.torch_common.replace_quantizers`).
"""
from __future__ import annotations

import torch
from pytorch_quantization.nn import TensorQuantizer
from torch import nn

from qatcheck.quantize.torch_common import FreezeRefused, replace_quantizers

__all__ = ["FreezeRefused", "FrozenFakeQuant", "freeze_quantizer", "freeze_fake_quant", "is_fake_quant_model"]

#: pytorch-quantization treats amax <= 2**-24 as "all zero" (tensor_quant._tensor_quant)
_ZERO_AMAX = 1.0 / (1 << 24)


def is_fake_quant_model(model: nn.Module) -> bool:
    """Whether ``model`` holds a pytorch-quantization ``TensorQuantizer``: CUDA-graph capture of it
    fails and :func:`freeze_fake_quant` should be timed instead."""
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


def _default_scales(amax: torch.Tensor, max_bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier, divisor) of the default path, with _tensor_quant's ops and dtypes: the
    multiplier is 0 where amax is "zero" (the output is then 0), the divisor 1 there."""
    if amax.dtype == torch.half:
        amax = amax.float()
    scale = torch.tensor(max_bound, device=amax.device) / amax
    dead = amax <= _ZERO_AMAX
    return scale.masked_fill(dead, 0.0), scale.masked_fill(dead, 1.0)


def _fb_step(amax: torch.Tensor, bound: int) -> torch.Tensor:
    """The step ``_fb_fake_quant`` hands ATen: per tensor ``amax.item() / bound`` (a double the
    kernel takes as float), per channel ``amax / bound`` in float32."""
    if amax.numel() == 1:
        return (amax.double() / bound).float()
    return amax.float() / bound


class FrozenFakeQuant(nn.Module):
    """One ``TensorQuantizer``'s forward with its scales precomputed; build it with
    :func:`freeze_quantizer`, which returns ``nn.Identity`` where the original passes its input
    through. Buffers: ``mul`` / ``dq`` (quantize multiplier, dequantize divisor on the default path or
    multiplier on the fb path; absent for a dynamic amax, computed on the device per call),
    ``clip_min`` / ``clip_max`` (learned range), ``step`` / ``zero_point`` (``fused``)."""

    def __init__(self, quantizer: TensorQuantizer, fused: bool = False) -> None:
        super().__init__()
        q = quantizer
        self.fb = bool(TensorQuantizer.use_fb_fake_quant)  # the path the original would take now
        self.quant = bool(q._if_quant)
        self.fake = bool(q._fake_quant)
        self.axis = q._axis
        self.scale_amax = q._scale_amax
        bits, unsigned = q._num_bits, bool(q._unsigned)
        bound = (1 << (bits - 1 + int(unsigned))) - 1
        if self.fb and self.fake:
            narrow = False  # _fb_fake_quant: full range whatever narrow_range says, as ONNX
        else:  # tensor_quant (integer output) is called without narrow_range: its default, True
            narrow = q._narrow_range if self.fake else True
        self.lo, self.hi = (0 if unsigned else (-bound if narrow else -bound - 1)), bound

        # Learned amax: the input is clipped to the learned range (Clip: min, then max) before
        # quantization; the clip stage alone (quant off) clips and returns.
        learned = bool(q._learn_amax)
        if q._if_clip and not learned:
            raise ValueError("TensorQuantizer with the clip stage on but no learned amax (its forward "
                             "raises 'Clip without learning amax is not implemented')")
        for name in ("clip_min", "clip_max", "mul", "dq", "step", "zero_point"):
            self.register_buffer(name, None)  # set below where they apply
        if learned and (self.quant or q._if_clip):
            self.clip_min = q.clip.clip_value_min.detach().clone()
            self.clip_max = q.clip.clip_value_max.detach().clone()

        if learned:
            amax = torch.max(-q.clip.clip_value_min, q.clip.clip_value_max).detach()
        elif q.amax is not None:
            amax = q.amax.detach()
            if self.scale_amax is not None:
                amax = amax * self.scale_amax
        else:
            amax = None  # dynamic: the max of each input (per axis), computed on the device
        self.bound = bound
        self.fused_axis: int | None = None
        if amax is None or not self.quant:
            return
        # the original's only value checks, done once here
        if bool((amax < 0).any()):
            raise ValueError("negative amax")
        if self.fb and self.fake and amax.dtype == torch.half:
            raise ValueError("use_fb_fake_quant with a fp16 amax (pytorch-quantization refuses it)")

        if fused and self.fake and not bool((amax <= _ZERO_AMAX).any()):
            self._init_fused(amax)
        elif self.fb and self.fake:
            step = _fb_step(amax, bound)
            self.mul = 1.0 / step
            self.dq = step
        else:
            mul, dq = _default_scales(amax, float(bound))
            self.mul = mul
            self.dq = dq

    def _init_fused(self, amax: torch.Tensor) -> None:
        """ATen's fake-quant kernels. A zero amax stays on the elementwise path (a zero step is
        1 / 0 in the kernel), and so does a dynamic one."""
        step = _fb_step(amax, self.bound)
        if amax.numel() == 1:
            self.step = step.reshape(1)
            self.zero_point = torch.zeros(1, dtype=torch.int32, device=amax.device)
            return
        squeezed = step.squeeze()
        if squeezed.dim() != 1:
            raise ValueError(f"fused per-channel fake quant needs one channel axis; amax shape "
                             f"{tuple(amax.shape)}")
        self.fused_axis = list(amax.shape).index(squeezed.numel())
        self.step = squeezed.contiguous()
        # float32, not int32: ATen checks an int32 zero point's range with .item() (a host read)
        self.zero_point = torch.zeros_like(squeezed)

    def _dynamic_scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TensorQuantizer._get_amax without a buffer: abs max over every dim but ``axis``."""
        if self.axis is None:
            amax = x.detach().abs().amax()
        else:
            keep = self.axis if isinstance(self.axis, (list, tuple)) else [self.axis]
            dims = [i for i in range(x.dim()) if i not in keep]
            amax = x.detach().abs().amax(dim=dims, keepdim=True)
        if self.scale_amax is not None:
            amax = amax * self.scale_amax
        if self.fb and self.fake:
            step = _fb_step(amax, self.bound)
            return 1.0 / step, step
        return _default_scales(amax, float(self.bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip_min is not None:
            x = torch.max(torch.min(x, self.clip_max), self.clip_min)
        if not self.quant:
            return x
        if self.fb and self.fake and x.dtype == torch.half:
            raise TypeError("use_fb_fake_quant does not take fp16 inputs (pytorch-quantization "
                            "refuses them: 'Exporting to ONNX in fp16 is not supported')")
        if self.step is not None:
            if self.fused_axis is None:
                return torch.fake_quantize_per_tensor_affine(x, self.step, self.zero_point,
                                                             self.lo, self.hi)
            return torch.fake_quantize_per_channel_affine(x, self.step, self.zero_point,
                                                          self.fused_axis, self.lo, self.hi)
        mul, dq = (self.mul, self.dq) if self.mul is not None else self._dynamic_scales(x)
        if self.fb and self.fake:  # ATen's kernel: round(x * (1 / step)), clamp, times step
            return torch.clamp(torch.round(x * mul), self.lo, self.hi) * dq
        # _tensor_quant: fp16 is quantized in fp32; the fake-quant division happens in the input dtype
        dtype = x.dtype
        xf = x.float() if dtype == torch.half else x
        out = torch.clamp((xf * mul).round_(), self.lo, self.hi)
        if dtype == torch.half:
            out = out.half()
        return out / dq.to(dtype) if self.fake else out

    def extra_repr(self) -> str:
        kind = "fused" if self.step is not None else ("fb" if self.fb else "default")
        amax = "dynamic" if (self.mul is None and self.step is None) else (
            "per-tensor" if (self.step if self.step is not None else self.mul).numel() == 1
            else "per-channel")
        s = f"{kind} [{self.lo}, {self.hi}] {amax}"
        s += "" if self.quant else " quant off"
        s += " clip" if self.clip_min is not None else ""
        return s + ("" if self.fake else " integer output")


def freeze_quantizer(quantizer: TensorQuantizer, fused: bool = False) -> nn.Module:
    """The frozen form of one quantizer: ``nn.Identity`` when it returns its input unchanged
    (disabled, or quant and clip stages both off), else a :class:`FrozenFakeQuant`."""
    if quantizer._disabled or not (quantizer._if_quant or quantizer._if_clip):
        return nn.Identity()
    return FrozenFakeQuant(quantizer, fused=fused)


def freeze_fake_quant(model: nn.Module, fused: bool = False) -> nn.Module:
    """A deep copy of ``model`` whose ``TensorQuantizer`` modules are frozen (:func:`freeze_quantizer`).

    Freeze the model where it will run, or move the twin afterwards (its scale buffers follow
    ``.to(device)``; keep them float32: ``.to(torch.half)`` would round them). A quantizer
    registered under several names (qatcheck's shared Concat quantizers) stays one module.
    ``fused`` is described in the module doc; the default reproduces the original bit for bit.
    The original model is not modified.
    """
    return replace_quantizers(model, lambda m: isinstance(m, TensorQuantizer),
                              lambda q, name: freeze_quantizer(q, fused))
