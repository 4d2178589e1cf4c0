"""The recipe: everything that determines how one model is quantized, checked and judged.

A recipe is plain data plus lazy factories (model, datasets). Nothing is loaded when a suite is
collected; the plugin calls the factories the first time a case needs them, so ``pytest --co`` and
``-k`` stay instant even for ImageNet-sized recipes.
"""
from __future__ import annotations

import re
from pathlib import Path
from collections import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.fsutil import file_digest
from qatcheck.registry import BACKENDS, DEFAULT_TORCH_QUANTIZER, TORCH_QUANTIZERS, check_backend
from qatcheck.modes import (FAMILIES, FP8_CALIBRATORS, MODE_SPECS, MODES, MODELOPT_CALIBRATORS,
                            ONNX_CALIBRATORS, TORCH_CALIBRATORS, check_mode, spec as mode_spec)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from qatcheck.data.base import Dataset

_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+$")


# ---- ONNX-only recipes --------------------------------------------------------------------------
# ``Recipe(model=onnx_file("model.onnx"), ...)``: the model is an ONNX file (the usual TensorRT starting
# point). The graph modes run from it - fp32 (the file, its input pinned to the recipe's shape), fp16,
# trt_ptq, partial and dynamic - on onnxruntime (and TensorRT); the PyTorch backend and the PyTorch
# quantization modes have nothing to run and skip, saying so (qatcheck.cases). Parity is judged
# against the fp32 graph on ONNX Runtime, the only fp32 there is. ``keep_precision`` names ONNX node
# names, or the module-style names qatcheck derives from them (/layer1/conv1/Conv -> layer1.conv1).

#: why the PyTorch side of an ONNX-only recipe is skipped
NO_TORCH = "ONNX-only recipe (Recipe.model is an onnx_file): there is no PyTorch model to run or quantize"


class OnnxFile:
    """A recipe's model given as an ONNX file (see the module docstring). Calling it returns the
    path, so ``Recipe.model`` keeps its type: a zero-argument factory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self) -> Path:
        if not self.path.is_file():
            raise ArtifactError(f"ONNX model {self.path} does not exist")
        return self.path

    def __repr__(self) -> str:
        return f"onnx_file({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, OnnxFile) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def digest(self) -> str:
        return file_digest(self())


def onnx_file(path: str | Path) -> OnnxFile:
    """``Recipe.model`` for a model that exists only as an ONNX file: fp32 (the file, its input
    pinned to ``InputSpec.shape``), fp16, trt_ptq, partial and dynamic run from it on ONNX Runtime
    (and TensorRT), judged against the fp32 graph on ONNX Runtime; the PyTorch backend, torch_ptq
    and qat skip with the reason. The graph's input and output names must be ``InputSpec.name`` and
    ``Recipe.output_names``."""
    return OnnxFile(path)


def is_onnx_only(recipe) -> bool:
    return isinstance(recipe.model, OnnxFile)



@dataclass(frozen=True)
class QDQRules:
    """Which placement rules the ``torch_ptq`` / ``qat`` path applies (see :mod:`qatcheck.quantize.qdq_rules`).

    ``ignore``: regexes full-matched against module names (``"model\\.22\\..*"``, ``"stem"``); the
    matching modules and everything below them get no Q/DQ. A pattern that is not a valid regex or
    matches no module is a ConfigError naming it.
    """

    residual_add: bool = True
    shared_concat: bool = True
    shared_maxpool: bool = True
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str) or not all(isinstance(p, str) for p in self.ignore):
            raise ConfigError(f"QDQRules.ignore must be a tuple of regexes (strings); got {self.ignore!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"QDQRules.ignore pattern {pattern!r} is not a valid regex: {exc}") from None

    def enabled(self, kind: str) -> bool:
        return bool(getattr(self, kind))


@dataclass(frozen=True)
class InputSpec:
    """The model input. ``shape`` is the optimum shape (batch first); ``dynamic`` maps an axis to its
    (min, opt, max) range: the ``dynamic`` mode, ``Recipe.dynamic_modes`` and TensorRT optimization
    profiles use it."""

    #: the ONNX input name
    name: str = "input"
    #: the optimum (build) shape, batch first: evaluation, calibration and latency run at it
    shape: tuple[int, ...] = (32, 3, 224, 224)
    #: float32 or float16
    dtype: str = "float32"
    #: axis -> (min, opt, max) for the dynamic builds; opt must equal ``shape[axis]``
    dynamic: Mapping[int, tuple[int, int, int]] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("InputSpec.name must not be empty")
        if len(self.shape) < 2 or any(int(d) <= 0 for d in self.shape):
            raise ConfigError(f"InputSpec.shape must be positive dims, batch first; got {self.shape}")
        if self.dtype not in ("float32", "float16"):
            raise ConfigError(f"InputSpec.dtype must be float32 or float16; got {self.dtype!r}")
        for axis, rng in self.dynamic.items():
            if not 0 <= axis < len(self.shape):
                raise ConfigError(f"InputSpec.dynamic axis {axis} is outside shape {self.shape}")
            if len(rng) != 3 or not (0 < rng[0] <= rng[1] <= rng[2]):
                raise ConfigError(f"InputSpec.dynamic[{axis}] must be (min, opt, max) with "
                                  f"0 < min <= opt <= max; got {rng}")
            if rng[1] != self.shape[axis]:
                raise ConfigError(f"InputSpec.dynamic[{axis}] opt={rng[1]} differs from "
                                  f"shape[{axis}]={self.shape[axis]}; the opt shape is the shape")

    @property
    def batch_size(self) -> int:
        return int(self.shape[0])

    def profile(self) -> dict[str, tuple[int, ...]]:
        """min / opt / max shapes (all equal to ``shape`` when nothing is dynamic)."""
        out = {}
        for i, label in enumerate(("min", "opt", "max")):
            out[label] = tuple(self.dynamic[a][i] if a in self.dynamic else d
                               for a, d in enumerate(self.shape))
        return out


@dataclass(frozen=True)
class QuantSettings:
    """How int8 modes are calibrated.

    ``calibrator`` drives the ONNX-level PTQ modes (``trt_ptq``, ``partial``): minmax, entropy (KL
    search, TensorRT's entropy calibration) or percentile. ``torch_calibrator`` drives
    pytorch-quantization (``torch_ptq``, ``qat``): max, entropy, mse or percentile.
    ``keep_precision`` lists the layers (PyTorch module names, e.g. ``"stem.conv"``) that ``partial``
    keeps in higher precision. ``qdq_rules`` (:class:`qatcheck.recipe.QDQRules`) declares
    the Q/DQ placement rules of the pytorch-quantization modes: quantized residual-Add inputs, one
    shared quantizer per Concat / MaxPool, a module-name ignore policy; None keeps
    pytorch-quantization's placement (a Q/DQ in front of each conv / linear / pooling input).

    ``torch_quantizer="modelopt"`` quantizes ``torch_ptq`` / ``qat`` with NVIDIA ModelOpt
    (``modelopt.torch.quantization``, ``pip install -e '.[modelopt]'``) instead of
    pytorch-quantization: ``INT8_DEFAULT_CFG`` with ``torch_calibrator`` max, entropy or percentile
    (mse is refused: ModelOpt has no activation MSE calibration that works, see
    :mod:`qatcheck.quantize.modelopt_quant`), or the config ``modelopt_config`` gives. The opt-in
    ``fp8`` mode always uses ModelOpt (``FP8_DEFAULT_CFG``, calibrated with ``fp8_calibrator``).
    """

    #: ONNX-level PTQ (trt_ptq, partial): minmax, entropy or percentile
    calibrator: str = "entropy"
    #: pytorch-quantization (torch_ptq, qat): max, entropy, mse or percentile (ModelOpt, with
    #: torch_quantizer="modelopt": max, entropy or percentile)
    torch_calibrator: str = "entropy"
    #: the percentile calibrators' percentile, in (50, 100]
    percentile: float = 99.99
    #: calibration batches (of the input's batch size) drawn from calib_data
    calib_batches: int = 8
    #: per-output-channel weight scales (TensorRT's default); False: one scale per tensor
    per_channel: bool = True
    #: layers (PyTorch module names) that partial keeps in higher precision
    keep_precision: tuple[str, ...] = ()
    #: why each kept layer is kept (from the sensitivity command's keep file; shown in the report).
    #: Not part of the artifact cache key: it explains the list, it does not change the build.
    keep_precision_why: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: Q/DQ placement rules of the pytorch-quantization modes (None: pytorch-quantization's own)
    qdq_rules: QDQRules | None = None
    #: the library torch_ptq / qat quantize with: "pytorch-quantization" or "modelopt" (NVIDIA
    #: ModelOpt: pip install -e '.[modelopt]'; its cases skip with that hint without it), or the
    #: name of one registered with qatcheck.registry.register_torch_quantizer
    torch_quantizer: str = DEFAULT_TORCH_QUANTIZER
    #: with torch_quantizer="modelopt": a ModelOpt quantization config (a dict such as
    #: modelopt.torch.quantization.INT8_DEFAULT_CFG, with its own "algorithm") used as given;
    #: None: INT8_DEFAULT_CFG calibrated with torch_calibrator (which must be max when this is set)
    modelopt_config: Mapping[str, Any] | None = None
    #: the fp8 mode's calibrator (ModelOpt FP8_DEFAULT_CFG, E4M3): max or percentile (activations)
    fp8_calibrator: str = "max"

    def validate(self) -> None:
        if self.calibrator not in ONNX_CALIBRATORS:
            raise ConfigError(f"QuantSettings.calibrator {self.calibrator!r} is unknown; "
                              f"choose one of {', '.join(ONNX_CALIBRATORS)}")
        if self.torch_calibrator not in TORCH_CALIBRATORS:
            raise ConfigError(f"QuantSettings.torch_calibrator {self.torch_calibrator!r} is unknown; "
                              f"choose one of {', '.join(TORCH_CALIBRATORS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"QuantSettings.percentile must be in (50, 100]; got {self.percentile}")
        if self.calib_batches < 1:
            raise ConfigError(f"QuantSettings.calib_batches must be >= 1; got {self.calib_batches}")
        if self.qdq_rules is not None:
            if not isinstance(self.qdq_rules, QDQRules):
                raise ConfigError(f"QuantSettings.qdq_rules must be a qatcheck.recipe.QDQRules "
                                  f"or None; got {type(self.qdq_rules).__name__}")
        self._validate_modelopt()

    def _validate_modelopt(self) -> None:
        """torch_quantizer, modelopt_config and fp8_calibrator (nothing here imports ModelOpt)."""
        if self.torch_quantizer not in TORCH_QUANTIZERS:
            raise ConfigError(f"QuantSettings.torch_quantizer {self.torch_quantizer!r} is unknown; "
                              f"choose one of {', '.join(TORCH_QUANTIZERS.names())} (or register one: "
                              "qatcheck.registry.register_torch_quantizer)")
        if self.fp8_calibrator not in FP8_CALIBRATORS:
            raise ConfigError(f"QuantSettings.fp8_calibrator {self.fp8_calibrator!r} is not available; choose "
                              f"one of {', '.join(FP8_CALIBRATORS)} (entropy and mse search the int8 grid, "
                              "which E4M3 does not have)")
        if self.torch_quantizer != "modelopt":
            if self.modelopt_config is not None:
                raise ConfigError("QuantSettings.modelopt_config is set but torch_quantizer is "
                                  f"{self.torch_quantizer!r}; it configures torch_quantizer='modelopt' only")
            return
        if self.modelopt_config is not None:
            if not isinstance(self.modelopt_config, Mapping) or "quant_cfg" not in self.modelopt_config:
                raise ConfigError("QuantSettings.modelopt_config must be a ModelOpt quantization config: a dict "
                                  "with 'quant_cfg' (and 'algorithm'), e.g. mtq.INT8_DEFAULT_CFG")
            if self.torch_calibrator != "max":
                raise ConfigError(f"QuantSettings.torch_calibrator {self.torch_calibrator!r} with a modelopt_config: "
                                  "the config's 'algorithm' calibrates; set torch_calibrator='max'")
        elif self.torch_calibrator not in MODELOPT_CALIBRATORS:
            raise ConfigError(
                f"QuantSettings.torch_calibrator {self.torch_calibrator!r} is not available with "
                f"torch_quantizer='modelopt'; choose one of {', '.join(MODELOPT_CALIBRATORS)}. ModelOpt 0.47 has "
                "no working activation MSE calibration (its 'mse' algorithm searches weight ranges only; "
                "HistogramCalibrator's 'mse' method returns wrong ranges): use "
                "modelopt_config={..., 'algorithm': 'mse'} for ModelOpt's weight search, or "
                "torch_quantizer='pytorch-quantization' for the activation MSE search")
        if self.qdq_rules is not None:
            raise ConfigError("QuantSettings.qdq_rules are pytorch-quantization's placement rules; with "
                              "torch_quantizer='modelopt' the ModelOpt config decides where Q/DQ go "
                              "(set qdq_rules=None, or use torch_quantizer='pytorch-quantization')")


@dataclass(frozen=True)
class QATSettings:
    """Quantization-aware fine-tuning: a few epochs at a low learning rate from the calibrated model,
    with ``Recipe.loss`` (what it receives is documented there)."""

    #: fine-tuning epochs over train_data
    epochs: int = 1
    #: learning rate (SGD with momentum, from the calibrated model)
    lr: float = 1e-4
    #: training batch size
    batch_size: int = 64
    #: cap on the batches per epoch (None: the whole train set)
    max_batches_per_epoch: int | None = None

    def validate(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ConfigError(f"QATSettings needs epochs >= 1, lr > 0, batch_size >= 1; got {self}")


@dataclass(frozen=True)
class ParityThresholds:
    """Floors for agreement between a case and its reference outputs."""

    #: the outputs' cosine similarity floor (every output, when there are several)
    min_cosine: float = 0.999
    #: the task agreement floor (top-1 agreement; detection: box match)
    min_top1_agreement: float = 0.99
    #: a ceiling on the largest absolute difference (None: not checked)
    max_abs: float | None = None


def _default_export_parity() -> dict[str, ParityThresholds]:
    fp = ParityThresholds(min_cosine=0.99999, min_top1_agreement=0.999, max_abs=1e-3)
    return {
        "fp32": fp,
        "dynamic": fp,
        "fp16": ParityThresholds(min_cosine=0.9995, min_top1_agreement=0.99),
        # whole-network fake-quant vs ONNX Runtime: cosine ~0.9999, max-abs ~0.06 (see docs/checks.md)
        "torch_ptq": ParityThresholds(min_cosine=0.999, min_top1_agreement=0.99),
        "qat": ParityThresholds(min_cosine=0.999, min_top1_agreement=0.99),
        # ModelOpt's E4M3 fake-quant vs ONNX Runtime's FP8 Q/DQ: cosine 1.00000 on digits/digitdet
        "fp8": ParityThresholds(min_cosine=0.999, min_top1_agreement=0.99),
    }


@dataclass(frozen=True)
class Tolerances:
    """What counts as a regression. Metric tolerances are in *points* (percentage points: 0.5 means
    a top-1 of 98.1% may drop to 97.6%)."""

    #: how far (points) a fraction metric may fall below its baseline
    metric_points: float = 0.5
    #: mode -> how far (points) its primary metric may fall below fp32 on the same backend (a metric
    #: that is not a fraction: percent of fp32's value); None: no budget for that mode. A mode not
    #: named here gets fp32_budget_default
    fp32_budget_points: Mapping[str, float | None] = field(default_factory=dict)
    #: the fp32 budget (points) of every mode that is not the fp32 reference (the mode table's
    #: ModeSpec.is_reference): fp16, trt_ptq, partial, torch_ptq, qat, fp8, a registered mode, and
    #: their dynamic builds; None: only the modes named in fp32_budget_points have one
    fp32_budget_default: float | None = 1.0
    #: how much slower (relative) than its baseline a case may be (see docs/checks.md, Latency verdicts)
    latency_rel: float = 0.15
    #: how far the cosine may fall below its parity baseline
    parity_cosine: float = 0.0005
    #: how far the agreement may fall below its parity baseline
    parity_agreement: float = 0.01
    #: export parity: a mode in PyTorch vs the same mode's exported graph on another backend
    export_parity: Mapping[str, ParityThresholds] = field(default_factory=_default_export_parity)
    #: quantization parity: a low-precision mode vs the fp32 reference
    quant_parity: ParityThresholds = ParityThresholds(min_cosine=0.98, min_top1_agreement=0.95)
    #: how far (relative) a quantizer's scale may move from its baseline (quantization structure)
    scale_rel: float = 0.05
    #: a metric that is not a fraction (a regression error in pixels: MetricSpec(fraction=False))
    #: may move this much relative to its baseline
    value_metric_rel: float = 0.05
    #: per-output cosine floors replacing the parity floor for that output, per mode: a mode, a mode
    #: family (float, int8_graph, int8_torch) or "*" (every mode) -> {output name: min cosine}, e.g.
    #: {"fp8": {"boxes": 0.975}}; the most specific key wins (mode, then family, then "*"). Every
    #: output is held to a floor and named when below
    output_min_cosine: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    #: latency gates that hold on any machine: a mode at least this many times faster than a
    #: reference mode on the same backend in the same session, e.g. {"trt_ptq": 1.5} (vs fp32) or
    #: {"trt_ptq": (1.2, "fp16")}
    speedup_floor: Mapping[str, float | tuple[float, str]] = field(default_factory=dict)

    def speedup_for(self, mode: str) -> tuple[float, str] | None:
        floor = self.speedup_floor.get(mode)
        if floor is None:
            return None
        return (float(floor), "fp32") if isinstance(floor, (int, float)) else (float(floor[0]), str(floor[1]))

    def fp32_budget(self, mode: str) -> float | None:
        """The mode's accuracy budget against fp32 (points), or None: its own entry in
        fp32_budget_points, else fp32_budget_default for every mode but the fp32 reference."""
        if mode in self.fp32_budget_points:
            return self.fp32_budget_points[mode]
        return None if mode_spec(mode).is_reference else self.fp32_budget_default

    def output_floors(self, mode: str) -> dict[str, float]:
        """The per-output cosine floors that hold for ``mode``: "*", then the mode's family, then
        the mode itself (a later key overrides an earlier one, output by output)."""
        floors: dict[str, float] = {}
        for key in ("*", mode_spec(mode).family, mode):
            floors.update(self.output_min_cosine.get(key, {}))
        return floors

    def validate(self) -> None:
        for field_name in ("fp32_budget_points", "export_parity"):
            for mode in getattr(self, field_name):
                if mode not in MODE_SPECS:
                    raise ConfigError(f"Tolerances.{field_name} names unknown mode {mode!r}; "
                                      f"choose from {', '.join(MODE_SPECS)}")
        for where, points in [*((f"fp32_budget_points[{m!r}]", p) for m, p in self.fp32_budget_points.items()),
                              ("fp32_budget_default", self.fp32_budget_default)]:
            if points is not None and not points >= 0:
                raise ConfigError(f"Tolerances.{where} must be >= 0 (or None: no budget); got {points!r}")
        for mode in self.speedup_floor:
            check_mode(mode)
            floor, ref = self.speedup_for(mode)
            check_mode(ref)
            if not floor > 0:
                raise ConfigError(f"Tolerances.speedup_floor[{mode!r}] must be > 0; got {floor!r}")
        self._validate_output_floors()
        for field_name in ("metric_points", "latency_rel", "parity_cosine", "parity_agreement", "scale_rel",
                           "value_metric_rel"):
            value = getattr(self, field_name)
            if not value >= 0:  # also rejects NaN
                raise ConfigError(f"Tolerances.{field_name} must be >= 0; got {value!r}")

    def _validate_output_floors(self) -> None:
        keys = ("*", *FAMILIES, *MODE_SPECS)
        for key, floors in self.output_min_cosine.items():
            if not isinstance(floors, abc.Mapping):
                # the flat {output: floor} form held every mode to the floor, fp32 included: the
                # mode it was meant for must be said
                raise ConfigError(f"Tolerances.output_min_cosine[{key!r}] is {floors!r}; the floors are per "
                                  f"mode: {{mode, family or '*': {{output: floor}}}}, e.g. "
                                  f"{{'fp8': {{{key!r}: {floors!r}}}}} for one mode or "
                                  f"{{'*': {{{key!r}: {floors!r}}}}} for every mode")
            if key not in keys:
                raise ConfigError(f"Tolerances.output_min_cosine names {key!r}, which is not a mode, a mode "
                                  f"family or '*'; choose from {', '.join(keys)}")
            for out, floor in floors.items():
                if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not -1.0 <= floor <= 1.0:
                    raise ConfigError(f"Tolerances.output_min_cosine[{key!r}][{out!r}] must be a cosine in "
                                      f"[-1, 1]; got {floor!r}")


@dataclass(frozen=True)
class Recipe:
    """One model's quantization recipe.

    ``model`` returns the fp32 ``torch.nn.Module`` with weights loaded (in eval mode). ``eval_data``,
    ``calib_data`` and ``train_data`` return :class:`qatcheck.data.base.Dataset` objects; they are
    called lazily and at most once per session.
    """

    #: names the test ids, the baselines file and the report (letters, digits, '_', '.')
    name: str
    #: a registered task: "classification", "detection" or one of register_task's
    task: str
    #: returns the fp32 torch.nn.Module with its weights (called once, lazily); or
    #: qatcheck.recipe.onnx_file("model.onnx") for a model that exists only as ONNX
    model: Callable[[], "torch.nn.Module"]
    #: returns the eval Dataset: metrics and parity run over all of it
    eval_data: Callable[[], "Dataset"]
    #: returns the calibration Dataset (keep it apart from eval_data)
    calib_data: Callable[[], "Dataset"]
    #: the model input (InputSpec)
    input: InputSpec
    #: returns the training Dataset (needed by qat)
    train_data: Callable[[], "Dataset"] | None = None
    #: calibration settings (QuantSettings)
    quant: QuantSettings = QuantSettings()
    #: QAT settings (QATSettings)
    qat: QATSettings = QATSettings()
    #: what counts as a regression (Tolerances)
    tolerances: Tolerances = Tolerances()
    #: the modes measured (qatcheck.modes; docs/modes.md, The mode table)
    modes: tuple[str, ...] = MODES
    #: the backends measured: torch, onnxruntime, tensorrt (TensorRT cases skip where it is absent)
    backends: tuple[str, ...] = BACKENDS
    #: the model's outputs, in the order forward() returns them (ONNX output names)
    output_names: tuple[str, ...] = ("logits",)
    #: the output the task scores, by name; required when a classification model has several
    #: outputs (scoring output 0 by default once read box regressions as class logits)
    task_output: str | None = None
    #: other judged heads: output name -> registered task name (e.g. {"landmarks": "landmark_l2"});
    #: each head's metrics are columns and baselines of their own, named "<output>.<metric>", and
    #: the eval targets are then a qatcheck.tasks.heads.HeadTargets (targets per output name)
    heads: Mapping[str, str] = field(default_factory=dict)
    #: free-form identity of the weights (a path, a digest) for the artifact cache key; the
    #: state dict is hashed as well, so this only speeds up keying.
    weights_id: str = ""
    #: classification: the top-k accuracies reported (k must stay below the class count)
    top_k: tuple[int, ...] = (1, 5)
    #: detection: how raw head outputs become boxes (a name in qatcheck.tasks.detection.DECODERS,
    #: or a Decoder object); the same decoder serves every backend
    decoder: object = "centernet"
    #: QAT loss ``loss(outputs, targets) -> scalar tensor``: ``outputs`` is what forward() returns
    #: (a tuple of every output, in output_names order, when there are several), ``targets`` the
    #: train batch's (a tensor for numeric labels; a HeadTargets when given per head). None:
    #: cross-entropy on int labels of the output the task scores (task_output, or the only one),
    #: read from a HeadTargets at that name (classification); detection recipes pass their loss.
    loss: Callable | None = None
    #: modes also measured with their dynamic-axes build at the profile's min / opt / max
    #: (InputSpec.dynamic), e.g. ("fp16", "trt_ptq", "torch_ptq"): int8 x dynamic shape is then
    #: checked like everything else. The ``dynamic`` mode is fp32's such variant. Entries not in
    #: ``modes`` are not measured (so overriding ``modes`` needs no second override).
    dynamic_modes: tuple[str, ...] = ()
    #: the eval samples a dynamic build is checked on at its min and max profile points - what can
    #: break at another shape: it runs, its output shapes, its parity against the reference at that
    #: shape - the eval set's first N; its accuracy is judged at opt and in the static case, which
    #: keep the whole set. None: the whole set at every point, accuracy judged there too
    profile_samples: int | None = 128

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not _NAME_RE.match(self.name or ""):
            raise ConfigError(f"Recipe.name {self.name!r} must be letters, digits, '_' or '.' "
                              "(it is used in test ids and file names)")
        from qatcheck.tasks import task_names

        if self.task not in task_names():
            raise ConfigError(f"Recipe({self.name}).task {self.task!r} is unknown; "
                              f"choose one of {', '.join(task_names())} (or register_task)")
        for m in self.modes:
            check_mode(m)
        for b in self.backends:
            check_backend(b)
        for m in self.dynamic_modes:  # a mode the recipe does not run is simply not measured
            check_mode(m)
            if mode_spec(m).profile_only:
                raise ConfigError(f"Recipe({self.name}).dynamic_modes lists {m!r}, which is already "
                                  "measured at min / opt / max")
        if self.profile_samples is not None and (not isinstance(self.profile_samples, int) or self.profile_samples < 1):
            raise ConfigError(f"Recipe({self.name}).profile_samples must be a positive number of samples or None "
                              f"(the whole eval set at every profile point), got {self.profile_samples!r}")
        if set(self.dynamic_modes) & set(self.modes) and not self.input.dynamic:
            raise ConfigError(f"Recipe({self.name}).dynamic_modes needs InputSpec.dynamic axes "
                              "(e.g. {0: (1, 32, 64)} for the batch)")

        for m in self.modes:
            if is_onnx_only(self) and mode_spec(m).family == "int8_torch":
                continue  # an ONNX-only recipe's PyTorch quantization modes skip (qatcheck.cases.skip_reason)
            for need in mode_spec(m).requires:
                if not self._field(need):
                    raise ConfigError(self._requires_message(m, need))
        trained = [m for m in self.modes if mode_spec(m).trained]
        if trained and self.task == "detection" and self.loss is None:
            raise ConfigError(f"Recipe({self.name}) lists mode {trained[0]!r} for a detection task but sets "
                              "no Recipe.loss (the training loss QAT fine-tunes with)")
        if not self.output_names:
            raise ConfigError(f"Recipe({self.name}).output_names must name the model outputs")
        self.tolerances.validate()  # before the outputs: their check reads its per-mode floors
        self._validate_outputs(task_names())
        self.input.validate()
        self.quant.validate()
        self.qat.validate()

    def _validate_outputs(self, known_tasks) -> None:
        names = self.output_names
        if len(set(names)) != len(names):
            raise ConfigError(f"Recipe({self.name}).output_names has a name twice: {names}")
        for where, out in [("task_output", self.task_output), *((f"heads[{o!r}]", o) for o in self.heads)]:
            if out is not None and out not in names:
                raise ConfigError(f"Recipe({self.name}).{where} names output {out!r}, which is not in "
                                  f"output_names {names}")
        if self.task == "classification" and len(names) > 1 and self.task_output is None:
            raise ConfigError(f"Recipe({self.name}) is a classification recipe whose model has {len(names)} "
                              f"outputs ({', '.join(names)}): set task_output to the one holding the class "
                              "scores (scoring output 0 by default would read whatever comes first)")
        if self.heads and self.task_output is None:
            raise ConfigError(f"Recipe({self.name}).heads needs task_output: the output the recipe's "
                              f"task {self.task!r} scores")
        if self.heads and self.task == "detection":
            raise ConfigError(f"Recipe({self.name}): heads are for single-output tasks; a detection "
                              "task reads every output of its decoder")
        for out, task in self.heads.items():
            if task not in known_tasks:
                raise ConfigError(f"Recipe({self.name}).heads[{out!r}] names task {task!r}, which is "
                                  f"unknown; registered tasks: {', '.join(known_tasks)}")
            if out == self.task_output:
                raise ConfigError(f"Recipe({self.name}).heads[{out!r}]: that output is task_output, "
                                  "scored by the recipe's task already")
        for key, floors in self.tolerances.output_min_cosine.items():
            for out in floors:
                if out not in names:
                    raise ConfigError(f"Recipe({self.name}).tolerances.output_min_cosine[{key!r}] names output "
                                      f"{out!r}, which is not in output_names {names}")
        if not self.top_k or any(not isinstance(k, int) or k < 1 for k in self.top_k):
            raise ConfigError(f"Recipe({self.name}).top_k must be positive integers; got {self.top_k}")

    def _field(self, dotted: str):
        value = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    def _requires_message(self, mode: str, need: str) -> str:
        hints = {"train_data": "but has no train_data",
                 "input.dynamic": "but InputSpec.dynamic declares no dynamic axis (e.g. {0: (1, 32, 64)} "
                                  "for the batch)",
                 "quant.keep_precision": "but QuantSettings.keep_precision is empty (the layers to keep "
                                         "in higher precision)"}
        return f"Recipe({self.name}) lists mode {mode!r} " + hints.get(need, f"but {need} is not set")
