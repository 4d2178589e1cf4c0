"""Sensitivity profiling and accuracy-budgeted partial quantization (issue #5).

Partial quantization is how TensorRT sample repos recover PTQ accuracy: a few sensitive layers stay
in higher precision. This module finds them, explains them and hands back a list that goes straight
into ``QuantSettings.keep_precision`` (PyTorch module names, on both paths).

* :func:`profile` - for each quantized layer, the task metric (and the output cosine vs fp32) with
  only that layer's quantization disabled, optionally also with only that layer quantized, on a
  subset of the eval data; ranked; cached under the artifact cache dir.
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

The keep-list file lives in :mod:`qatcheck.analysis.keeplist`, the JSON / PNG reports and the CLI
table in :mod:`qatcheck.analysis.sensitivity_report`.

Ranking (why not the metric alone): with one layer excluded the metric often moves by nothing when
the damage comes from two layers at once (digits + entropy: ``stem.conv`` and ``fc`` each break
top-1 on their own, so excluding either alone recovers nothing). Arg-max metrics are blind to that;
the output cosine vs fp32 is not - removing one of two error sources always moves it. Layers are
therefore ranked by metric gain, then (when ``only_quantized`` was profiled) by the metric drop
with only that layer quantized, then by the cosine gain. Metric gains smaller than one sample's
worth of the subset are treated as ties so that noise does not outrank a real cosine signal.
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
from qatcheck.modes import spec
from qatcheck.quantize.qdq_edit import quantized_layers, strip_qdq
from qatcheck.recipe import Recipe
from qatcheck.tasks import make_task

__all__ = ["Budget", "BudgetResult", "BudgetStep", "LayerSensitivity", "Profile", "PATHS",
           "PATH_MODE", "profile", "choose_layers", "check_keep_precision", "with_calibrator",
           "SensitivityRunner"]

PATHS = ("onnx", "torch")
#: bump when the profile's meaning changes: old cache entries are then ignored
#: (2: evaluated by the shared loop - the cosine of a multi-output model is its worst output's,
#: inputs are resized to the recipe's opt shape)
_PROFILE_VERSION = 2
#: modes each path profiles
PATH_MODE = {"onnx": "trt_ptq", "torch": "torch_ptq"}


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
    """torch_ptq: the calibrated pytorch-quantization model, variants by disabling quantizers."""

    name = "torch"
    #: PyTorch takes any batch: no padding
    static_batch = False

    def __init__(self, builder, recipe: Recipe) -> None:
        from qatcheck.quantize import torch_quant

        self.recipe = recipe
        art = builder.torch_artifact(PATH_MODE[self.name])
        self.digest = art.digest
        self.qmodel = art.module.eval()
        # one runner per model: a variant toggles the quantizers of self.qmodel in place
        self._fp32 = TorchRunner(builder.state.model, precision="fp32", device=_DEVICE)
        self._int8 = TorchRunner(self.qmodel, precision="int8", device=_DEVICE)
        self.layers: dict[str, list[str]] = {}
        for qname in torch_quant.quantizer_names(self.qmodel):
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
        from qatcheck.quantize.torch_quant import _quiet_quantization_logs

        excluded = _expand(excluded, self.layers, self.name)
        quantizers = [self.qmodel.get_submodule(q) for layer in excluded for q in self.layers[layer]]
        for q in quantizers:
            q.disable()
        try:
            with _quiet_quantization_logs():
                yield self._int8.infer
        finally:
            for q in quantizers:
                q.enable()


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

    ``cache_dir`` is the artifact cache (the fp32 / Q/DQ ONNX and calibrated torch models come from
    there too, so a profile after a pytest session reuses its artifacts).
    """

    def __init__(self, recipe: Recipe, path: str = "onnx", cache_dir: str | Path = ".qatcheck_cache",
                 use_cache: bool = True, progress: bool = True) -> None:
        from qatcheck.artifacts import ArtifactBuilder, RecipeState
        from qatcheck.cache import ArtifactCache

        _check_path(path)
        self.recipe = recipe
        self.path_name = path
        self.cache = ArtifactCache(cache_dir, enabled=use_cache)
        self.state = RecipeState(recipe)
        self.builder = ArtifactBuilder(self.state, self.cache, progress=False)
        self.progress = progress
        self.task = make_task(recipe, lambda: self.state.eval_data)
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

    def full_metric(self, excluded: Sequence[str] | None) -> float:
        """Metric on the whole eval set: fp32 when ``excluded`` is None, else the quantized model
        with ``excluded`` layers in higher precision."""
        ctx = self.path.fp32() if excluded is None else self.path.variant(list(excluded))
        with ctx as infer:
            return self.evaluate(infer, self._batches(None))[0]

    # ---- cache --------------------------------------------------------------------------------
    def profile_key_parts(self, max_samples: int | None, only_quantized: bool) -> dict:
        from qatcheck.artifacts import source_digest
        from qatcheck.cache import library_versions

        # the model's code and qatcheck's analysis, evaluation, metric and Q/DQ code shape a
        # profile as much as its settings do
        code = source_digest(("analysis", "evaluate.py", "tasks", "quantize", "data/batching.py"))
        return {"profile_version": _PROFILE_VERSION, "recipe": self.recipe.name,
                "model_code": self.state.model_code, "code": code,
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


def _rank(rows: list[LayerSensitivity], samples: int) -> list[LayerSensitivity]:
    resolution = 100.0 / max(samples, 1)  # one sample, in points

    def key(r: LayerSensitivity):
        gain = math.floor(r.gain_points / resolution + 0.5 + 1e-9) if r.gain_points > resolution / 2 else 0
        only = r.only_metric if r.only_metric is not None else 0.0  # lower: more damage
        return (-gain, round(only, 9), -r.excluded_cosine)
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
        ptq, ptq_cos = runner.evaluate(infer, subset, reference)
    layers = list(p.layers)
    total = len(layers) * (2 if only_quantized else 1)
    rows = []
    bar = _progress(None, total, f"sensitivity {runner.recipe.name} ({p.name})", runner.progress)
    try:
        for layer in layers:
            with p.variant([layer]) as infer:
                m, cos = runner.evaluate(infer, subset, reference)
            bar.update()
            row = LayerSensitivity(layer=layer, targets=list(p.layers[layer]), excluded_metric=m,
                                   excluded_cosine=float(cos), gain_points=(m - ptq) * 100)
            if only_quantized:
                with p.variant([x for x in layers if x != layer]) as infer:
                    m1, cos1 = runner.evaluate(infer, subset, reference)
                bar.update()
                row.only_metric, row.only_cosine = m1, float(cos1)
                row.only_drop_points = (fp32 - m1) * 100
            rows.append(row)
    finally:
        bar.close()
    return Profile(recipe=runner.recipe.name, path=p.name, mode=PATH_MODE[p.name],
                   calibrator=p.calibrator, metric=runner.task.primary_metric, samples=samples,
                   fp32=fp32, ptq=ptq, ptq_cosine=float(ptq_cos), layers=_rank(rows, samples),
                   seconds=time.perf_counter() - t0, evaluations=runner.evaluations - evals0)


# --------------------------------------------------------------------------------------------
# budget -> layers
# --------------------------------------------------------------------------------------------

def choose_layers(recipe: Recipe | SensitivityRunner, budget: Budget, path: str = "onnx", *,
                  prof: Profile | None = None, max_samples: int | None = 256,
                  cache_dir: str | Path = ".qatcheck_cache", use_cache: bool = True,
                  progress: bool = True) -> BudgetResult:
    """The fewest layers to keep in higher precision so that the metric on the FULL eval set
    meets ``budget``.

    Search (every candidate is verified by a full evaluation of the partial model):

    1. fp32 and ptq. If ptq already meets the budget: no layer.
    2. Bound: all profiled layers excluded. If even that misses the budget, stop and say so
       (1 evaluation instead of N).
    3. Forward greedy: add layers in profile order (most sensitive first) until the budget is met.
       Because layers accumulate, two layers that only matter together (neither recovers anything
       alone) are both picked as soon as both are in; the profile's cosine tie-break puts such
       layers early even when no single exclusion moves the metric.
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

    if res.met:
        res.message = (f"{res.recipe} {runner.path_name}: {PATH_MODE[runner.path_name]} {name} "
                       f"{fmt(ptq)} already meets the budget ({budget.describe()}, floor "
                       f"{fmt(floor)}; fp32 {fmt(fp32)}): no layer needs higher precision")
        return res
    bound = runner.full_metric(order)
    res.steps.append(BudgetStep("bound", list(order), bound, budget.met(bound, fp32)))
    if not res.steps[-1].met:
        res.partial = bound
        res.message = (f"{res.recipe} {runner.path_name}: the budget ({budget.describe()}, floor "
                       f"{fmt(floor)}) cannot be met: even with all {len(order)} quantized layers in "
                       f"higher precision {name} is {fmt(bound)} (fp32 {fmt(fp32)}, "
                       f"{PATH_MODE[runner.path_name]} {fmt(ptq)})")
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
                   f"precision: {', '.join(chosen)} -> {name} {fmt(metric)} (fp32 {fmt(fp32)}, "
                   f"{PATH_MODE[runner.path_name]} {fmt(ptq)}, floor {fmt(floor)} for "
                   f"{budget.describe()}); keep_precision={tuple(chosen)!r}")
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
