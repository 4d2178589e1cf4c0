"""The ``torch_ptq`` mode: Q/DQ inserted in PyTorch with pytorch-quantization, calibrated, exported.

Why this module exists rather than the library's own helpers:

* ``quant_modules.initialize()`` monkeypatches ``torch.nn`` for the whole process; a test session
  builds fp32 and int8 models side by side, so we replace modules in a *copy* of the model instead.
* pytorch-quantization 2.1.3's ``mse`` search calls ``.cuda()``; development machines and CI have no
  GPU, so :func:`_compute_amax_mse` repeats the same search on the CPU (used when CUDA is absent).
* A calibrated model is an expensive artifact. :func:`save_quantized` / :func:`load_quantized` let the
  artifact cache keep it as a state dict (amax buffers included) and rebuild it without calibrating.

Quantization follows TensorRT's explicit-quantization conventions: symmetric int8, per-tensor
activations, per-channel weights (output channels), exported as ONNX QuantizeLinear/DequantizeLinear.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from absl import logging as absl_logging
from pytorch_quantization import calib
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.nn import TensorQuantizer
from pytorch_quantization.nn.modules._utils import QuantMixin
from pytorch_quantization.tensor_quant import QuantDescriptor, fake_tensor_quant
from torch import nn

from qatcheck.errors import ArtifactError, ConfigError, DataError
from qatcheck.fsutil import atomic_path
from qatcheck.modes import TORCH_CALIBRATORS
from qatcheck.quantize.torch_common import TorchQuantizer, device_of, feed_calibration, read_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from qatcheck.quantize.qdq_rules import QDQRules
    from qatcheck.recipe import QuantSettings

__all__ = [
    "PytorchQuantization", "TorchQuantConfig", "quantize_model", "calibrate", "quantizer_names",
    "export_qdq_onnx", "save_quantized", "load_quantized", "feed_calibration", "read_checkpoint",
]

log = logging.getLogger(__name__)

#: Float module type -> pytorch-quantization replacement. Exact types only (see quantize_model).
_QUANT_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: quant_nn.QuantConv1d,
    nn.Conv2d: quant_nn.QuantConv2d,
    nn.Conv3d: quant_nn.QuantConv3d,
    nn.ConvTranspose1d: quant_nn.QuantConvTranspose1d,
    nn.ConvTranspose2d: quant_nn.QuantConvTranspose2d,
    nn.ConvTranspose3d: quant_nn.QuantConvTranspose3d,
    nn.Linear: quant_nn.QuantLinear,
    nn.MaxPool1d: quant_nn.QuantMaxPool1d,
    nn.MaxPool2d: quant_nn.QuantMaxPool2d,
    nn.MaxPool3d: quant_nn.QuantMaxPool3d,
    nn.AvgPool1d: quant_nn.QuantAvgPool1d,
    nn.AvgPool2d: quant_nn.QuantAvgPool2d,
    nn.AvgPool3d: quant_nn.QuantAvgPool3d,
    nn.AdaptiveAvgPool1d: quant_nn.QuantAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: quant_nn.QuantAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: quant_nn.QuantAdaptiveAvgPool3d,
}
#: Transposed convs store weights as (in, out, ...): their output channels are axis 1.
_CHANNEL_SECOND = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: The entropy / mse searches start at this bin (pytorch-quantization's ``start_bin`` default).
_START_BIN = 128
#: Smallest amax we keep. A dead channel calibrates to amax 0, which exports as a zero Q/DQ scale
#: (invalid ONNX, NaN in ONNX Runtime); pytorch-quantization treats amax <= 2**-24 as "all zero",
#: so this floor changes nothing in PyTorch while keeping the exported scale positive.
_AMAX_FLOOR = 2.0 ** -23
_SAVE_FORMAT = "qatcheck.torch_quant/1"


@dataclass(frozen=True)
class TorchQuantConfig:
    """How pytorch-quantization is applied (``torch_ptq`` and ``qat`` modes).

    ``calibrator`` picks the activation range: ``max`` (running abs max) or a histogram method
    (``entropy``: KL search, ``mse``, ``percentile``). Weights always use per-channel (or per-tensor,
    ``per_channel=False``) max. ``exclude`` holds regexes, full-matched against module names, whose
    quantizers stay disabled (the layer runs in fp32 and gets no Q/DQ). ``num_bins`` sizes the
    activation histograms; entropy calibration costs O(num_bins**2) Python steps per quantizer
    (~1.4 s at 2048 on a laptop CPU), so small test models may want fewer bins. ``qdq_rules``
    (:class:`qatcheck.quantize.qdq_rules.QDQRules`) adds TensorRT's placement rules for residual Adds,
    Concats and MaxPools and the ``ignore`` policy; None keeps pytorch-quantization's placement.
    """

    calibrator: str = "entropy"
    percentile: float = 99.99
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    num_bins: int = 2048
    qdq_rules: QDQRules | None = None

    def __post_init__(self) -> None:
        if self.calibrator not in TORCH_CALIBRATORS:
            raise ConfigError(f"TorchQuantConfig.calibrator {self.calibrator!r} is unknown; "
                              f"choose one of {', '.join(TORCH_CALIBRATORS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"TorchQuantConfig.percentile must be in (50, 100]; got {self.percentile}")
        if self.num_bins <= _START_BIN:
            raise ConfigError(f"TorchQuantConfig.num_bins must be > {_START_BIN} (the entropy and mse "
                              f"searches start at bin {_START_BIN}); got {self.num_bins}")
        if isinstance(self.exclude, str):
            raise ConfigError("TorchQuantConfig.exclude must be a tuple of regexes, not a string")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"TorchQuantConfig.exclude pattern {pattern!r} is not a valid "
                                  f"regex: {exc}") from None
        if self.qdq_rules is not None:
            from qatcheck.quantize.qdq_rules import QDQRules

            if not isinstance(self.qdq_rules, QDQRules):
                raise ConfigError(f"TorchQuantConfig.qdq_rules must be a QDQRules or None; "
                                  f"got {type(self.qdq_rules).__name__}")

    @property
    def histogram(self) -> bool:
        """Whether activations are calibrated from a histogram (everything but ``max``)."""
        return self.calibrator != "max"

    @classmethod
    def from_settings(cls, quant: QuantSettings, exclude: Sequence[str] = ()) -> TorchQuantConfig:
        """The config a recipe's :class:`~qatcheck.recipe.QuantSettings` asks for."""
        return cls(calibrator=quant.torch_calibrator, percentile=quant.percentile,
                   per_channel=quant.per_channel, exclude=tuple(exclude),
                   qdq_rules=quant.qdq_rules)


@contextlib.contextmanager
def _quiet_quantization_logs() -> Iterator[None]:
    """pytorch-quantization logs a warning per quantizer per call (absl); silence it while we run,
    or a ResNet's calibration buries the pytest report under hundreds of lines."""
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous)


def _iter_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def _enabled_quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    return ((n, q) for n, q in _iter_quantizers(model) if not q._disabled)


def quantizer_names(qmodel: nn.Module) -> list[str]:
    """Names of the enabled TensorQuantizers (e.g. ``"layer1.conv._input_quantizer"``): exactly the
    tensors that get Q/DQ in the exported graph."""
    return [name for name, _ in _enabled_quantizers(qmodel)]


class _BoundedHistogramCalibrator(calib.HistogramCalibrator):
    """pytorch-quantization's histogram, kept within ``num_bins .. 2 * num_bins`` bins.

    The library's histogram keeps its first bin width and appends bins whenever a tensor exceeds
    the range seen so far. A quantizer shared by several tensors (the Q/DQ placement rules: every
    input of a Concat) is typically fed a narrow tensor first and a wide one next, so it grows to
    tens of thousands of bins, and the entropy / mse searches are quadratic in the bin count
    (minutes per quantizer). Here adjacent bins are merged pairwise whenever the count passes
    ``2 * num_bins``: the range stays covered, the resolution never drops below ``num_bins`` bins.
    Used for the quantizers the rules add; layer input quantizers keep the library's histogram.
    """

    def __init__(self, num_bits: int, axis: Any, unsigned: bool, num_bins: int = 2048) -> None:
        super().__init__(num_bits, axis, unsigned, num_bins=num_bins)
        self._base_bins = int(num_bins)

    def collect(self, x: torch.Tensor) -> None:
        super().collect(x)
        hist = self._calib_hist
        while hist.numel() > 2 * self._base_bins:
            if hist.numel() % 2:
                hist = torch.cat([hist, hist.new_zeros(1)])
            hist = hist.view(-1, 2).sum(1)
            width = float(self._calib_bin_edges[1] - self._calib_bin_edges[0]) * 2
            self._num_bins = hist.numel()
            self._calib_bin_edges = torch.arange(self._num_bins + 1, dtype=torch.float32,
                                                 device=hist.device) * width
        self._calib_hist = hist

    def reset(self) -> None:
        super().reset()
        self._num_bins = self._base_bins


def _new_input_quantizer(config: TorchQuantConfig, shared: bool = False) -> TensorQuantizer:
    """A per-tensor activation quantizer with the config's calibrator: layers' inputs, and with
    ``shared`` the quantizers the Q/DQ placement rules add (bounded histogram, see
    :class:`_BoundedHistogramCalibrator`)."""
    desc_input = QuantDescriptor(num_bits=8, calib_method="histogram" if config.histogram else "max")
    quantizer = TensorQuantizer(desc_input)
    if config.histogram:
        cls = _BoundedHistogramCalibrator if shared else calib.HistogramCalibrator
        quantizer._calibrator = cls(num_bits=8, axis=None, unsigned=False, num_bins=config.num_bins)
    return quantizer


def _make_quant_module(module: nn.Module, config: TorchQuantConfig) -> nn.Module:
    """The Quant* twin of ``module``, sharing its parameters and attributes.

    The twin is built by transplanting ``module.__dict__`` instead of calling the Quant* constructor:
    constructors re-derive arguments (``padding="same"``, ``padding_mode``, ``divisor_override``...)
    and are easy to get subtly wrong, while the transplant keeps every attribute the float module had.
    """
    quant_cls = _QUANT_MAP[type(module)]
    qmodule = quant_cls.__new__(quant_cls)
    qmodule.__dict__.update({k: (copy.copy(v) if isinstance(v, dict) else v)
                             for k, v in vars(module).items()})
    # What QuantMixin.init_quantizer sets; it is not called because it insists on being invoked
    # from an ``__init__`` frame (it inspects the call stack).
    qmodule._fake_quant = True
    qmodule._input_quantizer = _new_input_quantizer(config)
    if isinstance(qmodule, QuantMixin):
        axis = ((1,) if isinstance(module, _CHANNEL_SECOND) else (0,)) if config.per_channel else None
        qmodule._weight_quantizer = TensorQuantizer(
            QuantDescriptor(num_bits=8, axis=axis, calib_method="max"))
    return qmodule


def quantize_model(model: nn.Module, config: TorchQuantConfig) -> nn.Module:
    """A copy of ``model`` with Q/DQ: supported layers become pytorch-quantization Quant* modules.

    Only exact types in ``_QUANT_MAP`` are replaced: a subclass of ``nn.Conv2d`` may override
    ``forward`` (weight standardization, custom padding), and swapping it would silently drop that.
    Excluded modules are replaced too but their quantizers are disabled, so module names and
    state-dict keys do not depend on ``exclude``. ``config.qdq_rules`` is applied last (after
    ``exclude``, whose layers no rule re-enables): see :mod:`qatcheck.quantize.qdq_rules`. Every
    quantizer a rule adds is a submodule, so calibration, QAT, export and
    :func:`save_quantized` / :func:`load_quantized` all see it.
    """
    qmodel = copy.deepcopy(model)
    replaced: dict[int, nn.Module] = {}
    quantizable: list[str] = []
    for name, module in list(qmodel.named_modules(remove_duplicate=False)):
        if not name or type(module) not in _QUANT_MAP:
            continue
        if id(module) not in replaced:  # a module registered twice stays one module
            replaced[id(module)] = _make_quant_module(module, config)
            quantizable.append(name)
        parent_name, _, child_name = name.rpartition(".")
        setattr(qmodel.get_submodule(parent_name), child_name, replaced[id(module)])
    if not quantizable:
        raise ConfigError(f"{type(model).__name__} has no layer pytorch-quantization can quantize "
                          f"(supported: {', '.join(t.__name__ for t in _QUANT_MAP)})")
    _apply_exclude(qmodel, quantizable, config.exclude)
    if config.qdq_rules is not None:
        from qatcheck.quantize.qdq_rules import apply_qdq_rules

        for line in apply_qdq_rules(qmodel, config.qdq_rules, lambda: _new_input_quantizer(config, shared=True)):
            log.debug("Q/DQ rule: %s", line)
    return qmodel


def _apply_exclude(qmodel: nn.Module, quantizable: list[str], patterns: Sequence[str]) -> None:
    for pattern in patterns:
        matched = [n for n in quantizable if re.fullmatch(pattern, n)]
        if not matched:
            shown = ", ".join(quantizable[:12]) + (" ..." if len(quantizable) > 12 else "")
            raise ConfigError(f"TorchQuantConfig.exclude pattern {pattern!r} matches no quantizable "
                              f"module (full match on module names); quantizable modules: {shown}")
        for name in matched:
            for _, quantizer in _iter_quantizers(qmodel.get_submodule(name)):
                quantizer.disable()


def _compute_amax_mse(calibrator: calib.HistogramCalibrator, stride: int = 1,
                      start_bin: int = _START_BIN) -> torch.Tensor:
    """The amax minimizing the histogram's quantization MSE, computed on the CPU.

    Same search as pytorch-quantization's ``_compute_amax_mse`` (which moves the histogram to CUDA):
    every bin center from ``start_bin`` on is tried as amax, the histogram's bin centers are
    fake-quantized with it, and the count-weighted MSE is minimized (first minimum wins, like
    ``np.argmin``). Candidates are evaluated in chunks instead of one at a time.
    """
    hist, edges = calibrator._calib_hist, calibrator._calib_bin_edges
    counts = torch.as_tensor(np.asarray(hist.int().cpu() if torch.is_tensor(hist) else hist,
                                        dtype=np.int32)).float()
    edges = torch.as_tensor(np.asarray(edges.cpu() if torch.is_tensor(edges) else edges)).float()
    centers = (edges[1:] + edges[:-1]) / 2
    candidates = centers[start_bin::stride]
    if candidates.numel() == 0:
        raise DataError(f"the mse search needs more than {start_bin} histogram bins; "
                        f"got {centers.numel()}")
    chunk = max(1, (1 << 22) // centers.numel())
    mses = []
    with torch.no_grad():
        for amax in candidates.split(chunk):
            quant = fake_tensor_quant(centers.expand(amax.numel(), -1), amax.unsqueeze(1),
                                      calibrator._num_bits, calibrator._unsigned)
            mses.append(((quant - centers) ** 2 * counts).mean(dim=1))
    best = int(torch.cat(mses).argmin())
    return centers[start_bin + best * stride].clone()


def _set_amax(quantizer: TensorQuantizer, amax: torch.Tensor) -> None:
    amax = amax.detach().float()
    if quantizer.amax is None or quantizer.amax.shape != amax.shape:
        quantizer.register_buffer("_amax", amax.clone())
    else:
        quantizer._amax.data.copy_(amax)


def _calibrator_is_empty(quantizer: TensorQuantizer) -> bool:
    cal = quantizer._calibrator
    if isinstance(cal, calib.HistogramCalibrator):
        return cal._calib_hist is None
    return cal._calib_amax is None


def _load_amax(quantizer: TensorQuantizer, config: TorchQuantConfig) -> None:
    """Turn a quantizer's collected statistics into its amax buffer."""
    cal = quantizer._calibrator
    if isinstance(cal, calib.MaxCalibrator):
        quantizer.load_calib_amax()
    elif config.calibrator == "mse" and not torch.cuda.is_available():
        _set_amax(quantizer, _compute_amax_mse(cal))
    else:
        quantizer.load_calib_amax(config.calibrator, percentile=config.percentile)
    quantizer._amax.data.clamp_(min=_AMAX_FLOOR)


def calibrate(qmodel: nn.Module, batches: Iterable[torch.Tensor | np.ndarray],
              config: TorchQuantConfig, device: str | torch.device = "cpu", progress: bool = False,
              *, input_shape: Sequence[int] | None = None) -> None:
    """Calibrate every enabled quantizer of ``qmodel`` in place from ``batches``; leaves it in eval.

    Statistics collection runs with quantization off (the library's recipe: ranges of fp32
    activations), then amax is computed per quantizer and quantization re-enabled. Calling it again
    recalibrates from scratch. ``input_shape`` (batch first; the batch dim is not checked) rejects
    batches of the wrong shape with a message naming both shapes; without it the first batch's
    shape is the reference. A quantizer that saw no data (its layer is not called in eval, e.g. an
    auxiliary head) is disabled with a log line: it has no range and is absent from the export.
    """
    device = torch.device(device)
    qmodel.eval().to(device)
    quantizers = list(_enabled_quantizers(qmodel))
    expected = tuple(input_shape[1:]) if input_shape is not None else None
    with _quiet_quantization_logs():
        for _, q in quantizers:
            q._calibrator.reset()
            q.disable_quant()
            q.enable_calib()
        try:
            feed_calibration(qmodel, batches, device, expected, progress)
        finally:
            for _, q in quantizers:
                q.disable_calib()
                q.enable_quant()
        for name, q in quantizers:
            if _calibrator_is_empty(q):
                log.warning("quantizer %s saw no data during calibration (layer not called in "
                            "eval?); disabling it", name)
                q.disable()
            else:
                _load_amax(q, config)
    qmodel.to(device)  # amax from a CUDA search lands on CUDA; keep the model on one device


def export_qdq_onnx(qmodel: nn.Module, example: torch.Tensor, path: str | os.PathLike[str],
                    input_name: str, output_names: Sequence[str],
                    dynamic_axes: dict[str, dict[int, str]] | None = None, opset: int = 17) -> None:
    """Export ``qmodel`` as a Q/DQ ONNX graph (QuantizeLinear/DequantizeLinear around each quantized
    tensor), written atomically so an interrupted export never leaves a truncated file in the cache.

    ``TensorQuantizer.use_fb_fake_quant`` routes quantizers through ``torch.fake_quantize_*``, which
    the TorchScript exporter maps to Q/DQ; it is a class-wide switch, so it is set only for the
    export and restored afterwards (even on failure). Per-channel Q/DQ needs opset >= 13.

    """
    if opset < 13:
        raise ConfigError(f"Q/DQ ONNX export needs opset >= 13 (per-channel QuantizeLinear); got {opset}")
    uncalibrated = [n for n, q in _enabled_quantizers(qmodel)
                    if q.amax is None or not bool(torch.isfinite(q.amax).all())]
    if uncalibrated:
        raise ArtifactError(f"cannot export: {len(uncalibrated)} quantizer(s) have no finite amax "
                            f"(calibrate first): {', '.join(uncalibrated[:8])}")
    was_training = qmodel.training
    previous = TensorQuantizer.use_fb_fake_quant
    device = device_of(qmodel)
    qmodel.eval()
    # An amax of 0 (a pruned channel, a dead tensor) exports as a Q/DQ scale of 0, which TensorRT's
    # parser refuses ("Scale coefficients must all be positive"). calibrate() floors amax already;
    # a model calibrated any other way (pytorch-quantization's own load_calib_amax) is floored
    # here, for the export only, and its amax restored afterwards. A zero channel stays exactly 0
    # either way; any other value in it moves by at most the floor, 2**-23. (A negative amax is
    # left alone: pytorch-quantization refuses it.)
    floored = [(q, q._amax.detach().clone()) for _, q in _enabled_quantizers(qmodel)
               if bool(((q.amax >= 0) & (q.amax < _AMAX_FLOOR)).any())]
    TensorQuantizer.use_fb_fake_quant = True
    try:
        for q, amax in floored:
            q._amax.data.copy_(torch.where((amax >= 0) & (amax < _AMAX_FLOOR),
                                           torch.full_like(amax, _AMAX_FLOOR), amax))
        with atomic_path(path) as tmp, torch.no_grad(), _quiet_quantization_logs(), \
                warnings.catch_warnings():
            # The tracer warns that amax becomes a constant: that is exactly what Q/DQ wants.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning,
                                    module=r"pytorch_quantization\.")
            # dynamo=False is deliberate (the TorchScript exporter maps torch.fake_quantize_* to
            # Q/DQ); its own deprecation notice is not actionable here.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            torch.onnx.export(qmodel, (example.to(device),), str(tmp), input_names=[input_name],
                              output_names=list(output_names), dynamic_axes=dynamic_axes,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    finally:
        for q, amax in floored:
            q._amax.data.copy_(amax)
        TensorQuantizer.use_fb_fake_quant = previous
        qmodel.train(was_training)


def save_quantized(qmodel: nn.Module, path: str | os.PathLike[str],
                   config: TorchQuantConfig | None = None) -> None:
    """Store a calibrated (or fine-tuned) model: its state dict with amax buffers, plus which
    quantizers are disabled. Disabled quantizers are recorded because calibration can disable one
    that saw no data, which ``exclude`` alone would not reproduce. Passing ``config`` lets
    :func:`load_quantized` refuse a file made with different quantization settings."""
    payload = {
        "format": _SAVE_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in qmodel.state_dict().items()},
        "disabled": [n for n, q in _iter_quantizers(qmodel) if q._disabled],
        "config": dataclasses.asdict(config) if config is not None else None,
    }
    # into a file object: given a path, torch.save names its archive after the (random temp) file
    # name, and every build of the same state got another digest
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_quantized(model: nn.Module, config: TorchQuantConfig,
                   path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model stored by :func:`save_quantized` without calibrating: ``model`` is the fp32
    model from the recipe's factory (its weights are overwritten by the stored ones). The result is
    in eval mode, on ``model``'s device, and gives bit-identical outputs to the saved model."""
    path = Path(path)
    payload = read_checkpoint(path, _SAVE_FORMAT, "quantized checkpoint")
    stored_config = payload["config"]
    if stored_config is not None:
        stored_config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in stored_config.items()}
        wanted = dataclasses.asdict(config)
        diff = {k: (stored_config.get(k), v) for k, v in wanted.items() if stored_config.get(k) != v}
        if diff:
            raise ArtifactError(f"{path}: saved with different TorchQuantConfig (field: saved vs "
                                f"requested): {diff}")
    qmodel = quantize_model(model, config)
    state = payload["state_dict"]
    device = device_of(qmodel)
    disabled = set(payload["disabled"])
    for name, q in _iter_quantizers(qmodel):
        if name in disabled:
            q.disable()
        key = f"{name}._amax" if name else "_amax"
        # TensorQuantizer creates a missing _amax buffer with .cuda() while loading; pre-create it.
        if key in state and q.amax is None:
            q.register_buffer("_amax", torch.empty_like(state[key], device=device))
    try:
        with _quiet_quantization_logs():
            qmodel.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: does not match the model built from the recipe: {exc}") from exc
    return qmodel.eval()


class PytorchQuantization(TorchQuantizer):
    """pytorch-quantization as a :class:`~qatcheck.quantize.torch_common.TorchQuantizer` (the
    default ``QuantSettings.torch_quantizer``): the functions of this module, configured by
    :meth:`TorchQuantConfig.from_settings`."""

    name = "pytorch-quantization"

    def version(self) -> str:
        from importlib import metadata

        try:
            return metadata.version("pytorch-quantization")
        except metadata.PackageNotFoundError:
            return "absent"

    def cache_id(self) -> str:
        # its version is in every artifact's key already (qatcheck.cache.library_versions)
        return self.name

    def quiet(self):
        return _quiet_quantization_logs()

    @staticmethod
    def _config(quant: QuantSettings, fp8: bool) -> TorchQuantConfig:
        if fp8:
            raise ConfigError("pytorch-quantization has no FP8 quantizer (the fp8 mode is ModelOpt's)")
        return TorchQuantConfig.from_settings(quant)

    def quantize(self, model, quant, batches, *, fp8=False, device="cpu", progress=False):
        config = self._config(quant, fp8)
        qmodel = quantize_model(model, config)
        calibrate(qmodel, batches, config, device=device, progress=progress)
        return qmodel

    def save(self, qmodel, path, quant, fp8=False):
        save_quantized(qmodel, path, self._config(quant, fp8))

    def load(self, model, path, quant, fp8=False):
        return load_quantized(model, self._config(quant, fp8), path)  # quantize_model copies model

    def export_onnx(self, qmodel, example, path, input_name, output_names, dynamic_axes=None):
        export_qdq_onnx(qmodel, example, path, input_name, output_names, dynamic_axes)

    def is_quantizer(self, module):
        return isinstance(module, TensorQuantizer)

    def is_enabled(self, quantizer):
        return not quantizer._disabled

    def set_enabled(self, quantizer, on):
        (quantizer.enable if on else quantizer.disable)()

    def names(self, qmodel):
        return quantizer_names(qmodel)

    def scales(self, qmodel):
        """amax / 127 for signed int8: float64 then float32 per tensor, float32 per channel, as
        ``TensorQuantizer._fb_fake_quant`` computes what the export writes."""
        names = quantizer_names(qmodel)
        missing = [n for n in names if qmodel.get_submodule(n).amax is None]
        if missing:
            raise ArtifactError(f"{len(missing)} enabled quantizer(s) have no amax (calibrate first): "
                                f"{', '.join(missing[:8])}")
        out = []
        for name in names:
            q = qmodel.get_submodule(name)
            bound = (1 << (q.num_bits - 1 + int(q.unsigned))) - 1
            amax = q.amax.detach().cpu()
            if amax.numel() == 1:
                scales = np.float32(amax.item() / bound)
            else:
                scales = (amax.squeeze().float() / bound).numpy()
            owner, _, attr = name.rpartition(".")
            if attr == "_weight_quantizer":
                out.append((f"{owner}:weight", "weight", scales))
            elif attr == "_input_quantizer":
                out.append((f"{owner}:input", "activation", scales))
            else:  # a placement-rule quantizer: its own path
                out.append((f"{name}:input", "activation", scales))
        return out

    def needs_freeze(self, model):
        return any(isinstance(m, TensorQuantizer) for m in model.modules())

    def freeze(self, model):
        from qatcheck.quantize.frozen_quant import freeze_fake_quant

        return freeze_fake_quant(model)
