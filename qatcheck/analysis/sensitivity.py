"""Sensitivity profiling and accuracy-budgeted partial quantization (issue #5).

Partial quantization is how TensorRT sample repos recover PTQ accuracy: a few sensitive layers stay
in higher precision. This module finds them, explains them and hands back a list that goes straight
into ``QuantSettings.keep_precision`` (PyTorch module names, on both paths).

* :func:`profile` - for each quantized layer, the output SQNR vs fp32 (the ranking key), the
  output cosine and the task metric with only that layer's quantization disabled, optionally also
  with only that layer quantized, on a subset of the eval data; ranked; cached under the artifact
  cache dir.
  - ``path="onnx"`` (``trt_ptq``): the recipe's calibrated Q/DQ ONNX is built ONCE (it is the
    cached ``trt_ptq`` artifact); each variant is derived with
    :func:`qatcheck.quantize.qdq_edit.strip_qdq`, which removes that layer's Q/DQ from the quantized
    graph. That equals ``quantize_onnx(exclude=...)`` exactly: activation ranges are per tensor and
    calibrated on the fp32 graph, so they do not depend on which other layers are quantized.
    Evaluated with ONNX Runtime (:class:`~qatcheck.backends.onnxruntime_backend.OrtRunner`).
  - ``path="torch"`` (``torch_ptq``): the calibrated pytorch-quantization model; a variant disables
    the layer's ``_input_quantizer`` / ``_weight_quantizer``. Evaluated with PyTorch
    (:class:`~qatcheck.backends.torch_backend.TorchRunner`).
  Every evaluation goes through :func:`qatcheck.evaluate.evaluate` on
  :func:`qatcheck.data.batching.eval_batches`, like the session's measurements, so a metric here and
  in the pytest table mean the same.
* :func:`choose_layers` - given a :class:`Budget`, the fewest layers to keep in higher precision,
  verified by full evaluations of the partial model (see its docstring for the search).
* :func:`check_keep_precision` - keeps a chosen list under test in a suite.

The keep-list file lives in :mod:`qatcheck.analysis.keeplist`, the JSON / Markdown / PNG reports
and the CLI table in :mod:`qatcheck.analysis.sensitivity_report`.

Ranking (why not the metric): layers are ranked by a continuous measure, the SQNR (dB) of the
model's outputs vs fp32's on the profiled subset with only that layer in higher precision (higher:
excluding the layer brings the model closer to fp32, so the layer is more sensitive). The task
metric is measured and shown in every row but never decides the order: on a small subset an arg-max
metric moves in whole samples and is mostly noise. Measured (issue #12): on 256 samples trt_ptq was
0.39 points (one sample) below fp32 where the full eval set shows 2.96; eight layers tied on top-1
and the stem - the real culprit, output cosine 0.956 -> 0.995 when excluded - ranked 9th behind
layers whose exclusion happened to flip a sample. A continuous measure also sees damage that only
shows together: when two layers each break top-1 on their own, excluding either alone recovers no
sample, but removing one of two error sources still raises the SQNR. Ties on the SQNR (a layer
whose exclusion changes no output bit) fall back to the cosine, then the metric gain, then the
name. SQNR measures closeness to fp32, not the metric: where the two disagree (a layer whose error
happens not to flip arg-maxes) it may put a layer early that the budget does not need. The budget
search verifies every candidate on the full eval set and prunes, so a ranking that is off costs
evaluations, never a wrong answer.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx

from qatcheck import evaluate as evaluation
from qatcheck.backends.onnxruntime_backend import OrtRunner
from qatcheck.backends.torch_backend import TorchRunner
from qatcheck.data.batching import eval_batches
from qatcheck.errors import ConfigError, DataError
from qatcheck.fsutil import write_text_atomic
from qatcheck.modes import sensitivity_modes, spec
from qatcheck.parity import SQNR_CAP_DB, sqnr_db
from qatcheck.quantize.qdq_edit import quantized_layers, strip_qdq
from qatcheck.recipe import Recipe
from qatcheck.workspace import RecipeWorkspace, workspace_of

__all__ = ["Budget", "BudgetResult", "BudgetStep", "LayerSensitivity", "Profile", "PATHS",
           "PATH_MODE", "profile", "choose_layers", "check_keep_precision", "with_calibrator",
           "SensitivityRunner", "sqnr_db", "RANKED_BY"]

PATHS = ("onnx", "torch")
#: bump when the profile's meaning changes: old cache entries are then ignored
#: (2: evaluated by the shared loop - the cosine of a multi-output model is its worst output's,
#: inputs are resized to the recipe's opt shape; 3: rows carry the output SQNR vs fp32 and are
#: ranked by it, not by the metric)
_PROFILE_VERSION = 3
#: what a profile is ranked by (stored in the profile and its reports)
RANKED_BY = "excluded_sqnr_db"
#: SQNR's clamp (qatcheck.parity.SQNR_CAP_DB): outputs equal to fp32 have an infinite SQNR,
#: non-finite outputs (NaN / inf) read as the floor; both stay valid JSON
_SQNR_CAP_DB = SQNR_CAP_DB
#: the mode each path profiles, from the mode table (ModeSpec.sensitivity_path)
PATH_MODE = sensitivity_modes()


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """An accuracy budget vs fp32: ``points`` (absolute drop in percentage points, 0.5 means fp32
    99.26% may become 98.76%) or ``relative`` (fraction of fp32 to keep, 0.99). Exactly one."""

    points: float | None = None
    relative: float | None = None

    def __post_init__(self) -> None:
        if (self.points is None) == (self.relative is None):
            raise ConfigError("Budget needs exactly one of points (e.g. 0.5) or relative (e.g. 0.99); "
                              f"got points={self.points}, relative={self.relative}")
        if self.points is not None and not (math.isfinite(self.points) and self.points >= 0):
            raise ConfigError(f"Budget.points must be >= 0 percentage points; got {self.points}")
        if self.relative is not None and not 0.0 < self.relative <= 1.0:
            raise ConfigError(f"Budget.relative must be in (0, 1] (a fraction of fp32); "
                              f"got {self.relative}")

    def floor(self, fp32: float) -> float:
        """The lowest metric that meets the budget."""
        return fp32 - self.points / 100.0 if self.points is not None else fp32 * self.relative

    def met(self, value: float, fp32: float) -> bool:
        return value >= self.floor(fp32) - 1e-9

    def describe(self) -> str:
        if self.points is not None:
            return f"at most {self.points:g} points below fp32"
        return f"at least {self.relative:g} x fp32"


@dataclass
class LayerSensitivity:
    """One quantized layer's row in a profile. Metrics are fractions (0.9926), like everywhere in
    qatcheck; ``*_points`` are percentage points."""

    layer: str  # PyTorch module name (what keep_precision takes)
    targets: list[str]  # ONNX node names (onnx path) or quantizer names (torch path)
    excluded_metric: float  # metric with only this layer in higher precision
    excluded_cosine: float  # output cosine vs fp32, same variant
    gain_points: float  # excluded_metric - ptq, in points
    only_metric: float | None = None  # metric with only this layer quantized
    only_cosine: float | None = None
    only_drop_points: float | None = None  # fp32 - only_metric, in points
    rank: int = 0
    #: the ranking key: SQNR (dB) of the outputs vs fp32 with only this layer in higher precision
    #: (with several outputs, the mean over outputs, see sqnr_db); higher = the layer matters more
    excluded_sqnr_db: float | None = None
    sqnr_gain_db: float | None = None  # excluded_sqnr_db - the all-quantized model's SQNR
    only_sqnr_db: float | None = None  # SQNR with only this layer quantized (only_quantized)


@dataclass
class Profile:
    recipe: str
    path: str
    mode: str
    calibrator: str
    metric: str
    samples: int
    fp32: float  # on the subset
    ptq: float  # on the subset
    ptq_cosine: float
    layers: list[LayerSensitivity]  # ranked, most sensitive first
    key: str = ""
    seconds: float = 0.0  # wall time of the computation (not of a cache hit)
    evaluations: int = 0  # subset evaluations the computation needed
    cached: bool = False  # True when this object came from the cache
    ptq_sqnr_db: float | None = None  # the all-quantized model's output SQNR vs fp32 (subset)
    ranked_by: str = RANKED_BY  # the LayerSensitivity field the rows are ordered by (descending)

    @property
    def ranked(self) -> list[str]:
        return [row.layer for row in self.layers]

    def row(self, layer: str) -> LayerSensitivity:
        for r in self.layers:
            if r.layer == layer:
                return r
        raise ConfigError(f"layer {layer!r} is not in the {self.path} profile of {self.recipe}; "
                          f"profiled layers: {', '.join(self.ranked)}")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Profile":
        d = dict(d)
        d["layers"] = [LayerSensitivity(**r) for r in d["layers"]]
        return cls(**d)


@dataclass
class BudgetStep:
    """One full evaluation made by :func:`choose_layers`."""

    kind: str  # "bound" (all layers excluded), "add", "prune"
    layers: list[str]  # layers kept in higher precision in this evaluation
    metric: float
    met: bool


@dataclass
class BudgetResult:
    recipe: str
    path: str
    budget: Budget
    metric: str
    samples: int
    fp32: float
    ptq: float
    partial: float  # metric with ``layers`` in higher precision (== ptq when layers is empty)
    floor: float  # the lowest metric meeting the budget
    layers: list[str]  # the chosen layers (PyTorch module names), in the order they were added
    met: bool
    steps: list[BudgetStep] = field(default_factory=list)
    message: str = ""
    #: the same models on the profile's subset (its first ``subset_samples`` eval samples): what the
    #: profile saw, stated next to the full eval set's figures above, which decide. None: unknown.
    subset_samples: int = 0
    subset_fp32: float | None = None
    subset_ptq: float | None = None
    subset_partial: float | None = None  # the chosen layers in higher precision, on the subset
    subset_partial_sqnr_db: float | None = None
    subset_met: bool | None = None  # would the subset say the chosen layers meet the budget?
    subset_ptq_met: bool | None = None  # would the subset say ptq alone meets it (no layer)?

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# the two paths: layers, variants, inference
# --------------------------------------------------------------------------------------------

Infer = Callable[[np.ndarray], list]

#: Both paths infer on the CPU: the profile cache key names no device, so its numbers must not
#: depend on the machine (a GPU provider, TF32 convolutions) that computed them.
_DEVICE = "cpu"


def _calibrator_field(path: str) -> str:
    """The QuantSettings field holding the calibrator of ``path``'s mode."""
    return spec(PATH_MODE[path]).calibrator_field


class _OnnxPath:
    """trt_ptq: ONNX Runtime on the calibrated Q/DQ graph, variants by :func:`strip_qdq`."""

    name = "onnx"
    #: the exported graphs have a static batch: a short final batch is padded
    static_batch = True

    def __init__(self, builder, recipe: Recipe) -> None:
        self.recipe = recipe
        art = builder.onnx_artifact(PATH_MODE[self.name])
        self.digest = art.digest
        self.qmodel = onnx.load(str(art.path))
        self.fp32_path = builder.onnx_artifact("fp32").path
        self.layers = quantized_layers(self.qmodel)
        if not self.layers:
            raise ConfigError(f"the {PATH_MODE[self.name]} model of {recipe.name} has no "
                              "quantized layer to profile")
        self.calibrator = getattr(recipe.quant, _calibrator_field(self.name))

    def key_parts(self) -> dict:
        return {"qdq_onnx": self.digest, "calibrator": repr(self.recipe.quant)}

    def _infer(self, model: onnx.ModelProto | Path) -> Infer:
        return OrtRunner(model, provider="CPUExecutionProvider", input_name=self.recipe.input.name).infer

    @contextlib.contextmanager
    def fp32(self) -> Iterator[Infer]:
        yield self._infer(self.fp32_path)

    @contextlib.contextmanager
    def variant(self, excluded: Sequence[str]) -> Iterator[Infer]:
        """Inference with ``excluded`` layers (module names) in higher precision."""
        excluded = _expand(excluded, self.layers, self.name)
        nodes = [n for layer in excluded for n in self.layers[layer]]
        yield self._infer(strip_qdq(self.qmodel, nodes) if nodes else self.qmodel)


class _TorchPath:
    """torch_ptq: the calibrated model (by its TorchQuantizer), variants by disabling quantizers."""

    name = "torch"
    #: PyTorch takes any batch: no padding
    static_batch = False

    def __init__(self, builder, recipe: Recipe) -> None:
        from qatcheck.quantize.torch_common import quantizer_of

        self.recipe = recipe
        art = builder.torch_artifact(PATH_MODE[self.name])
        self.digest = art.digest
        self.qmodel = art.module.eval()
        # one runner per model: a variant toggles the quantizers of self.qmodel in place
        self._fp32 = TorchRunner(builder.state.model, precision="fp32", device=_DEVICE)
        self._int8 = TorchRunner(self.qmodel, precision="int8", device=_DEVICE)
        self.layers: dict[str, list[str]] = {}
        self.quantizer = quantizer_of(self.qmodel)
        for qname in (self.quantizer.names(self.qmodel) if self.quantizer is not None else ()):
            module, _, _ = qname.rpartition(".")
            self.layers.setdefault(module, []).append(qname)
        if not self.layers:
            raise ConfigError(f"the {PATH_MODE[self.name]} model of {recipe.name} has no enabled "
                              "quantizer to profile")
        self.calibrator = getattr(recipe.quant, _calibrator_field(self.name))

    def key_parts(self) -> dict:
        return {"torch_state": self.digest, "calibrator": repr(self.recipe.quant)}

    @contextlib.contextmanager
    def fp32(self) -> Iterator[Infer]:
        yield self._fp32.infer

    @contextlib.contextmanager
    def variant(self, excluded: Sequence[str]) -> Iterator[Infer]:
        excluded = _expand(excluded, self.layers, self.name)
        quantizers = [self.qmodel.get_submodule(q) for layer in excluded for q in self.layers[layer]]
        for q in quantizers:
            self.quantizer.set_enabled(q, False)
        try:
            with self.quantizer.quiet():
                yield self._int8.infer
        finally:
            for q in quantizers:
                self.quantizer.set_enabled(q, True)


def _expand(entries: Sequence[str], layers: dict[str, list[str]], path: str) -> list[str]:
    """Layer entries as in ``keep_precision``: a module name means that module and its children
    (``"layer1"`` -> ``layer1.conv1``, ``layer1.conv2``); an entry matching nothing is an error."""
    out: dict[str, None] = {}
    unknown = []
    for entry in entries:
        hits = [l for l in layers if l == entry or l.startswith(entry + ".")]
        if not hits:
            unknown.append(entry)
        out.update(dict.fromkeys(hits))
    if unknown:
        _unknown_layers(unknown, layers, path)
    return list(out)


def _unknown_layers(unknown: Sequence[str], layers: dict[str, list[str]], path: str) -> None:
    shown = ", ".join(list(layers)[:16]) + (" ..." if len(layers) > 16 else "")
    raise ConfigError(f"layer(s) {', '.join(map(repr, unknown))} are not quantized layers of the "
                      f"{path} path (PyTorch module names); quantized layers: {shown}")


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------

def with_calibrator(recipe: Recipe, calibrator: str | None, path: str = "onnx") -> Recipe:
    """The recipe with its calibrator for ``path`` replaced (``--calibrator``): ``calibrator`` for
    the ONNX path, ``torch_calibrator`` for the torch path. Validated like any recipe field."""
    if calibrator is None:
        return recipe
    _check_path(path)
    return replace(recipe, quant=replace(recipe.quant, **{_calibrator_field(path): calibrator}))


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ConfigError(f"unknown sensitivity path {path!r}; choose one of {', '.join(PATHS)} "
                          f"(onnx profiles {PATH_MODE['onnx']}, torch profiles {PATH_MODE['torch']})")


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    stream = sys.__stderr__
    show = enabled and stream is not None and stream.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, file=stream, disable=not show,
                unit="layer")


class SensitivityRunner:
    """Builds what both operations need for one recipe and one path, and counts evaluations.

    ``recipe``: a Recipe, or a :class:`~qatcheck.workspace.RecipeWorkspace` (a session's, or one
    made without one). ``cache_dir`` is the artifact cache of a Recipe's workspace (the fp32 / Q/DQ
    ONNX and calibrated torch models come from there too, so a profile after a pytest session reuses
    its artifacts).
    """

    def __init__(self, recipe: Recipe | RecipeWorkspace, path: str = "onnx",
                 cache_dir: str | Path = ".qatcheck_cache", use_cache: bool = True, progress: bool = True) -> None:
        _check_path(path)
        self.workspace = workspace_of(recipe, cache_dir, use_cache=use_cache)
        self.recipe = self.workspace.recipe
        self.path_name = path
        self.cache, self.state, self.builder = self.workspace.cache, self.workspace.state, self.workspace.builder
        self.progress = progress
        self.task = self.workspace.task
        self.evaluations = 0  # subset + full evaluations run by this object
        self._path = None

    @property
    def path(self):
        if self._path is None:
            cls = _OnnxPath if self.path_name == "onnx" else _TorchPath
            self._path = cls(self.builder, self.recipe)
        return self._path

    # ---- data ---------------------------------------------------------------------------------
    def _batches(self, max_samples: int | None) -> Iterator[tuple[np.ndarray, object, int]]:
        """(inputs, targets, real count) at the recipe's opt shape, at most ``max_samples``
        samples; padded to the batch on the static-shape ONNX path."""
        return eval_batches(self.state.eval_data, self.recipe.input.profile()["opt"],
                            pad=self.path.static_batch, max_samples=max_samples)

    def subset(self, max_samples: int | None) -> list[tuple[np.ndarray, object, int]]:
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1; got {max_samples}")
        return list(self._batches(max_samples))

    def evaluate(self, infer: Infer, batches: Iterable[tuple[np.ndarray, object, int]],
                 reference: list[list[np.ndarray]] | None = None,
                 keep: list | None = None) -> tuple[float, float | None]:
        """(primary metric, output cosine vs ``reference``) of one model on the batches, by the
        shared evaluation loop. With several outputs the worst output's cosine speaks for the
        model (as in the session's parity). ``keep`` collects the outputs (to serve as a
        reference)."""
        self.evaluations += 1
        ev = evaluation.evaluate(infer, batches, self.task, reference=reference, keep=keep)
        parity = evaluation.combined_parity(ev)
        return ev.metrics[self.task.primary_metric], (parity["cosine"] if parity else None)

    def compare(self, infer: Infer, batches: Sequence[tuple[np.ndarray, object, int]],
                reference: list[list[np.ndarray]]) -> tuple[float, float, float]:
        """(primary metric, output cosine, output SQNR in dB) of one model vs ``reference`` (the
        fp32 outputs kept on the same batches)."""
        outputs: list = []
        metric, cos = self.evaluate(infer, batches, reference, keep=outputs)
        return metric, float(cos), sqnr_db(reference, outputs)

    def subset_figures(self, excluded: Sequence[str], samples: int) -> dict[str, float]:
        """fp32 and the variant with ``excluded`` layers in higher precision on the first
        ``samples`` eval samples (a profile's subset): their metrics and the variant's SQNR."""
        subset = self.subset(samples)
        reference: list = []
        with self.path.fp32() as infer:
            fp32, _ = self.evaluate(infer, subset, keep=reference)
        with self.path.variant(list(excluded)) as infer:
            metric, cos, sqnr = self.compare(infer, subset, reference)
        return {"fp32": fp32, "metric": metric, "cosine": cos, "sqnr_db": sqnr}

    def full_metric(self, excluded: Sequence[str] | None) -> float:
        """Metric on the whole eval set: fp32 when ``excluded`` is None, else the quantized model
        with ``excluded`` layers in higher precision."""
        ctx = self.path.fp32() if excluded is None else self.path.variant(list(excluded))
        with ctx as infer:
            return self.evaluate(infer, self._batches(None))[0]

    # ---- cache --------------------------------------------------------------------------------
    def profile_key_parts(self, max_samples: int | None, only_quantized: bool) -> dict:
        from qatcheck.fsutil import source_digest
        from qatcheck.cache import library_versions

        # the model's traced graph and qatcheck's analysis, evaluation, metric and Q/DQ code shape
        # a profile as much as its settings do
        code = source_digest(("analysis", "evaluate.py", "tasks", "quantize", "data/batching.py"))
        return {"profile_version": _PROFILE_VERSION, "recipe": self.recipe.name,
                "model": self.builder.model_graph(), "code": code,
                "path": self.path_name, **self.path.key_parts(),
                "eval": self.state.eval_data.fingerprint(), "max_samples": max_samples,
                "batch": self.recipe.input.batch_size, "only_quantized": bool(only_quantized),
                "metric": self.task.primary_metric, "versions": library_versions()}


def profile(recipe: Recipe | SensitivityRunner, path: str = "onnx", *, max_samples: int | None = 256,
            only_quantized: bool = False, cache_dir: str | Path = ".qatcheck_cache",
            use_cache: bool = True, progress: bool = True) -> Profile:
    """The sensitivity profile of ``recipe`` on ``path`` ("onnx" = trt_ptq, "torch" = torch_ptq),
    on the first ``max_samples`` eval samples (None: all), ranked most sensitive first.

    Cached as JSON under ``cache_dir``, keyed by the quantized model's digest (which covers weights,
    calibrator settings and calibration data), the quantization settings, the eval data
    fingerprint, the subset, the options and library versions; a cache hit evaluates nothing.
    """
    runner = recipe if isinstance(recipe, SensitivityRunner) else SensitivityRunner(
        recipe, path, cache_dir, use_cache, progress)
    parts = runner.profile_key_parts(max_samples, only_quantized)
    built: list[Profile] = []

    def build(target: Path) -> None:
        prof = _compute_profile(runner, max_samples, only_quantized)
        from qatcheck.cache import cache_key
        prof.key = cache_key(parts)
        write_text_atomic(target, json.dumps(prof.to_json(), indent=1))
        built.append(prof)

    name = f"{runner.recipe.name}-sensitivity-{runner.path_name}"
    target = runner.cache.get_or_build(name, parts, ".profile.json", build)
    if built:
        return built[0]
    try:
        prof = Profile.from_json(json.loads(target.read_text()))
    except (ValueError, TypeError, KeyError):  # a damaged cache entry: recompute, never trust it
        target.unlink(missing_ok=True)
        return profile(runner, runner.path_name, max_samples=max_samples,
                       only_quantized=only_quantized, progress=progress)
    prof.cached = True
    return prof


def _rank(rows: list[LayerSensitivity], samples: int | None = None) -> list[LayerSensitivity]:
    """Most sensitive first, by the output SQNR with the layer excluded (continuous: see the
    module docstring for why the metric must not decide). ``samples`` is unused (kept for callers
    of the old signature)."""

    def key(r: LayerSensitivity):
        sqnr = r.excluded_sqnr_db if r.excluded_sqnr_db is not None else -math.inf
        return (-sqnr, -r.excluded_cosine, -r.gain_points, r.layer)
    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, start=1):
        r.rank = i
    return ranked


def _compute_profile(runner: SensitivityRunner, max_samples: int | None,
                     only_quantized: bool) -> Profile:
    t0 = time.perf_counter()
    evals0 = runner.evaluations
    p = runner.path
    subset = runner.subset(max_samples)
    samples = sum(n for _, _, n in subset)
    if samples == 0:
        raise DataError(f"Recipe({runner.recipe.name}).eval_data yielded no samples to profile on")
    reference: list = []
    with p.fp32() as infer:
        fp32, _ = runner.evaluate(infer, subset, keep=reference)
    with p.variant([]) as infer:
        ptq, ptq_cos, ptq_sqnr = runner.compare(infer, subset, reference)
    layers = list(p.layers)
    total = len(layers) * (2 if only_quantized else 1)
    rows = []
    bar = _progress(None, total, f"sensitivity {runner.recipe.name} ({p.name})", runner.progress)
    try:
        for layer in layers:
            with p.variant([layer]) as infer:
                m, cos, sqnr = runner.compare(infer, subset, reference)
            bar.update()
            row = LayerSensitivity(layer=layer, targets=list(p.layers[layer]), excluded_metric=m,
                                   excluded_cosine=cos, gain_points=(m - ptq) * 100,
                                   excluded_sqnr_db=sqnr, sqnr_gain_db=sqnr - ptq_sqnr)
            if only_quantized:
                with p.variant([x for x in layers if x != layer]) as infer:
                    m1, cos1, sqnr1 = runner.compare(infer, subset, reference)
                bar.update()
                row.only_metric, row.only_cosine, row.only_sqnr_db = m1, cos1, sqnr1
                row.only_drop_points = (fp32 - m1) * 100
            rows.append(row)
    finally:
        bar.close()
    return Profile(recipe=runner.recipe.name, path=p.name, mode=PATH_MODE[p.name],
                   calibrator=p.calibrator, metric=runner.task.primary_metric, samples=samples,
                   fp32=fp32, ptq=ptq, ptq_cosine=ptq_cos, layers=_rank(rows),
                   seconds=time.perf_counter() - t0, evaluations=runner.evaluations - evals0,
                   ptq_sqnr_db=ptq_sqnr)


# --------------------------------------------------------------------------------------------
# budget -> layers
# --------------------------------------------------------------------------------------------

def choose_layers(recipe: Recipe | SensitivityRunner, budget: Budget, path: str = "onnx", *,
                  prof: Profile | None = None, max_samples: int | None = 256,
                  cache_dir: str | Path = ".qatcheck_cache", use_cache: bool = True,
                  progress: bool = True) -> BudgetResult:
    """The fewest layers to keep in higher precision so that the metric on the FULL eval set
    meets ``budget``.

    The profile only orders the candidates; nothing is decided on its subset. Every candidate is
    verified by a full evaluation of the partial model, because a subset can mislead badly (issue
    #12: 256 samples put trt_ptq 0.39 points below fp32, the full eval set 2.96 - a 0.5-point
    budget "met" on the subset with no layer at all). The result states both: the full eval set's
    figures (``fp32``, ``ptq``, ``partial``, which decide ``met``) and the same models on the
    profile's subset (``subset_*``, one extra subset evaluation of fp32 and of the chosen variant),
    and the message says when the subset alone would have judged differently.

    Search:

    1. fp32 and ptq. If ptq already meets the budget: no layer.
    2. Bound: all profiled layers excluded. If even that misses the budget, stop and say so
       (1 evaluation instead of N).
    3. Forward greedy: add layers in profile order (most sensitive first) until the budget is met.
       Because layers accumulate, two layers that only matter together (neither recovers anything
       alone) are both picked as soon as both are in; the profile's SQNR ranking puts such layers
       early even when no single exclusion moves the metric.
    4. Backward pruning: try dropping each chosen layer, least sensitive first; a layer the budget
       does not need is removed. So no chosen layer is redundant (a minimal, though not
       necessarily minimum, set).
    """
    runner = recipe if isinstance(recipe, SensitivityRunner) else SensitivityRunner(
        recipe, path, cache_dir, use_cache, progress)
    if prof is None:
        prof = profile(runner, runner.path_name, max_samples=max_samples, progress=progress)
    if prof.path != runner.path_name or prof.recipe != runner.recipe.name:
        raise ConfigError(f"profile is for {prof.recipe}/{prof.path}, not "
                          f"{runner.recipe.name}/{runner.path_name}")
    order = prof.ranked
    fp32 = runner.full_metric(None)
    ptq = runner.full_metric([])
    floor = budget.floor(fp32)
    samples = len(runner.state.eval_data)
    res = BudgetResult(recipe=runner.recipe.name, path=runner.path_name, budget=budget,
                       metric=prof.metric, samples=samples, fp32=fp32, ptq=ptq, partial=ptq,
                       floor=floor, layers=[], met=budget.met(ptq, fp32))
    name = prof.metric

    def fmt(v: float) -> str:
        return f"{v * 100:.2f}%"

    mode = PATH_MODE[runner.path_name]
    res.subset_samples, res.subset_fp32, res.subset_ptq = prof.samples, prof.fp32, prof.ptq
    res.subset_ptq_met = budget.met(prof.ptq, prof.fp32)

    def subset_check(layers: list[str], full_value: float) -> str:
        """Fill the subset_* figures for ``layers`` and say them (and any disagreement)."""
        if layers and prof.samples >= samples:  # the profile saw the whole eval set
            res.subset_partial, res.subset_partial_sqnr_db = full_value, None
        elif layers:
            fig = runner.subset_figures(layers, prof.samples)
            res.subset_partial, res.subset_partial_sqnr_db = fig["metric"], fig["sqnr_db"]
        else:
            res.subset_partial, res.subset_partial_sqnr_db = prof.ptq, prof.ptq_sqnr_db
        res.subset_met = budget.met(res.subset_partial, prof.fp32)
        which = (f"with {', '.join(layers)} in higher precision " if layers else f"{mode} ")
        text = (f"on the profile's {prof.samples}-sample subset {which}{name} is "
                f"{fmt(res.subset_partial)} (fp32 {fmt(prof.fp32)}, {mode} {fmt(prof.ptq)}: "
                f"{(prof.fp32 - prof.ptq) * 100:.2f} points below; budget "
                f"{'met' if res.subset_met else 'missed'} there)")
        if res.subset_ptq_met and not budget.met(ptq, fp32):
            text += (f"; NOTE: the subset alone would have needed no layer - {mode} is "
                     f"{(prof.fp32 - prof.ptq) * 100:.2f} points below fp32 on it but "
                     f"{(fp32 - ptq) * 100:.2f} on the full eval set, which decides")
        elif res.subset_met != budget.met(full_value, fp32):
            text += (f"; NOTE: the subset {'meets' if res.subset_met else 'misses'} the budget where "
                     "the full eval set, which decides, does not")
        return text

    if res.met:
        res.message = (f"{res.recipe} {runner.path_name}: {mode} {name} {fmt(ptq)} on the full eval "
                       f"set of {samples} already meets the budget ({budget.describe()}, floor "
                       f"{fmt(floor)}; fp32 {fmt(fp32)}): no layer needs higher precision; "
                       + subset_check([], ptq))
        return res
    bound = runner.full_metric(order)
    res.steps.append(BudgetStep("bound", list(order), bound, budget.met(bound, fp32)))
    if not res.steps[-1].met:
        res.partial = bound
        res.message = (f"{res.recipe} {runner.path_name}: the budget ({budget.describe()}, floor "
                       f"{fmt(floor)}) cannot be met on the full eval set of {samples}: even with "
                       f"all {len(order)} quantized layers in higher precision {name} is "
                       f"{fmt(bound)} (fp32 {fmt(fp32)}, {mode} {fmt(ptq)}); "
                       + subset_check(list(order), bound))
        return res
    chosen: list[str] = []
    metric = ptq
    bar = _progress(None, len(order), f"budget {runner.recipe.name} ({runner.path_name})", progress)
    try:
        for layer in order:
            chosen.append(layer)
            if len(chosen) == len(order):
                metric = bound  # already evaluated
            else:
                metric = runner.full_metric(chosen)
                res.steps.append(BudgetStep("add", list(chosen), metric, budget.met(metric, fp32)))
            bar.update()
            if budget.met(metric, fp32):
                break
    finally:
        bar.close()
    for layer in reversed(chosen[:-1] if len(chosen) > 1 else []):
        trial = [x for x in chosen if x != layer]
        m = runner.full_metric(trial)
        ok = budget.met(m, fp32)
        res.steps.append(BudgetStep("prune", trial, m, ok))
        if ok:
            chosen, metric = trial, m
    res.layers, res.partial, res.met = chosen, metric, True
    res.message = (f"{res.recipe} {runner.path_name}: keep {len(chosen)} layer(s) in higher "
                   f"precision: {', '.join(chosen)} -> {name} {fmt(metric)} on the full eval set of "
                   f"{samples} (fp32 {fmt(fp32)}, {mode} {fmt(ptq)}, floor {fmt(floor)} for "
                   f"{budget.describe()}: met); {subset_check(chosen, metric)}; "
                   f"keep_precision={tuple(chosen)!r}")
    return res


def check_keep_precision(recipe: Recipe | SensitivityRunner, budget: Budget, path: str = "onnx",
                         layers: Sequence[str] | None = None, *,
                         cache_dir: str | Path = ".qatcheck_cache") -> list[str]:
    """Keep a chosen layer list under test: failure lines (empty when fine) for the partial model
    with ``layers`` (default: the recipe's ``QuantSettings.keep_precision``) in higher precision,
    evaluated on the whole eval set against ``budget``. For suites::

        failures = check_keep_precision(recipe, Budget(points=0.5))
        assert not failures, "\\n".join(failures)
    """
    runner = recipe if isinstance(recipe, SensitivityRunner) else SensitivityRunner(
        recipe, path, cache_dir, progress=False)
    layers = tuple(runner.recipe.quant.keep_precision if layers is None else layers)
    fp32 = runner.full_metric(None)
    value = runner.full_metric(list(layers))
    if budget.met(value, fp32):
        return []
    name = runner.task.primary_metric
    return [f"{runner.recipe.name} {PATH_MODE[runner.path_name]} with keep_precision={layers!r}: "
            f"{name} {value:.2%} misses the budget ({budget.describe()}: floor "
            f"{budget.floor(fp32):.2%}, fp32 {fp32:.2%}); re-run `python -m qatcheck sensitivity "
            f"--recipe <module:callable> --path {runner.path_name} --budget-"
            + (f"points {budget.points:g}`" if budget.points is not None
               else f"relative {budget.relative:g}`") + " to choose the layers again"]
