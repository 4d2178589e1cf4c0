"""Sensitivity profiling and accuracy-budgeted partial quantization (issue #5).

Partial quantization is how TensorRT sample repos recover PTQ accuracy: a few sensitive layers stay
in higher precision. This module finds them, explains them and hands back a list that goes straight
into ``QuantSettings.keep_precision`` (PyTorch module names, on both paths).

* :func:`profile` - for each quantized layer, the task metric (and the output cosine vs fp32) with
  only that layer's quantization disabled, optionally also with only that layer quantized, on a
  subset of the eval data; ranked; cached under the artifact cache dir; written as JSON + PNG.
  - ``path="onnx"`` (``trt_ptq``): the recipe's calibrated Q/DQ ONNX is built ONCE (it is the
    cached ``trt_ptq`` artifact); each variant is derived with :func:`strip_qdq`, which removes
    that layer's Q/DQ from the quantized graph. That equals ``quantize_onnx(exclude=...)`` exactly:
    activation ranges are per tensor and calibrated on the fp32 graph, so they do not depend on
    which other layers are quantized. Evaluated with ONNX Runtime.
  - ``path="torch"`` (``torch_ptq``): the calibrated pytorch-quantization model; a variant disables
    the layer's ``_input_quantizer`` / ``_weight_quantizer``. Evaluated with PyTorch.
* :func:`choose_layers` - given a :class:`Budget`, the fewest layers to keep in higher precision,
  verified by full evaluations of the partial model (see its docstring for the search).

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

from qatcheck.build.onnx_ptq import QUANTIZABLE_OPS, module_name_of, resolve_layers
from qatcheck.errors import ConfigError, DataError
from qatcheck.fsutil import write_text_atomic
from qatcheck.parity import ParityAccumulator
from qatcheck.recipe import Recipe
from qatcheck.tasks import make_task

__all__ = ["Budget", "BudgetResult", "check_keep_precision", "KeepList", "keep_list", "load_keep_list", "BudgetStep", "LayerSensitivity", "Profile", "PATHS",
           "strip_qdq", "quantized_layers", "profile", "choose_layers", "write_reports",
           "with_calibrator", "SensitivityRunner"]

PATHS = ("onnx", "torch")
#: bump when the profile's meaning changes: old cache entries are then ignored
_PROFILE_VERSION = 1
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
# ONNX: removing Q/DQ from a quantized graph
# --------------------------------------------------------------------------------------------

def _qdq_fed_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Quantizable nodes that have at least one input fed by Q -> DQ (i.e. that are quantized)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        for t in node.input[:2]:
            dq = producer.get(t)
            if dq is not None and dq.op_type == "DequantizeLinear":
                out.append(node)
                break
    return out


def quantized_layers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """PyTorch module name -> the quantized ONNX nodes exported from it, in graph order. A node
    exported from no module (a top-level op) is its own layer, named by its node name."""
    layers: dict[str, list[str]] = {}
    for node in _qdq_fed_nodes(model):
        layers.setdefault(module_name_of(node.name) or node.name, []).append(node.name)
    return layers


def strip_qdq(model: onnx.ModelProto, layers: Iterable[str]) -> onnx.ModelProto:
    """A copy of a Q/DQ ONNX with the given layers back in higher precision.

    ``layers`` are ONNX node names or PyTorch module names (as in ``OnnxPTQConfig.exclude``); an
    entry that matches no Conv/ConvTranspose/Gemm/MatMul node is a :class:`ConfigError` naming it.
    Each matched node's inputs 0 and 1 that come from QuantizeLinear -> DequantizeLinear are
    rewired to the tensor before the pair; pairs (and their scale / zero-point initializers) that
    nothing uses any more are dropped, while a pair shared with a still-quantized layer stays. On
    a model made by :func:`qatcheck.build.onnx_ptq.quantize_onnx` the result computes exactly what
    ``quantize_onnx(..., exclude=layers)`` would, without recalibrating.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    targets = {n for hits in resolve_layers(out, list(layers)).values() for n in hits}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name not in targets:
            continue
        for i in range(min(2, len(node.input))):
            dq = producer.get(node.input[i])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    _drop_dead_qdq(graph)
    return out


def _drop_dead_qdq(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    removable = ("QuantizeLinear", "DequantizeLinear", "Constant")
    while True:
        used = {t for n in graph.node for t in n.input} | outputs
        dead = [i for i, n in enumerate(graph.node)
                if n.op_type in removable and not any(o in used for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = {t for n in graph.node for t in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


# --------------------------------------------------------------------------------------------
# the two paths: layers, variants, inference
# --------------------------------------------------------------------------------------------

Infer = Callable[[np.ndarray], list]


class _OnnxPath:
    """trt_ptq: ONNX Runtime on the calibrated Q/DQ graph, variants by :func:`strip_qdq`."""

    name = "onnx"

    def __init__(self, builder) -> None:
        self.builder = builder
        self.recipe = builder.recipe
        art = builder.onnx_artifact(PATH_MODE["onnx"])
        self.digest = art.digest
        self.qmodel = onnx.load(str(art.path))
        self.fp32_path = builder.onnx_artifact("fp32").path
        self.layers = quantized_layers(self.qmodel)
        if not self.layers:
            raise ConfigError(f"the {PATH_MODE['onnx']} model of {self.recipe.name} has no "
                              "quantized layer to profile")
        self.calibrator = self.recipe.quant.calibrator
        self.static_batch = True

    def key_parts(self) -> dict:
        return {"qdq_onnx": self.digest, "calibrator": repr(self.recipe.quant)}

    def _session(self, model: onnx.ModelProto | Path) -> Infer:
        import onnxruntime as ort

        src = str(model) if isinstance(model, Path) else model.SerializeToString()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        name = self.recipe.input.name
        return lambda x: sess.run(None, {name: x})

    @contextlib.contextmanager
    def fp32(self) -> Iterator[Infer]:
        yield self._session(self.fp32_path)

    @contextlib.contextmanager
    def variant(self, excluded: Sequence[str]) -> Iterator[Infer]:
        """Inference with ``excluded`` layers (module names) in higher precision."""
        excluded = _expand(excluded, self.layers, self.name)
        nodes = [n for layer in excluded for n in self.layers[layer]]
        yield self._session(strip_qdq(self.qmodel, nodes) if nodes else self.qmodel)


class _TorchPath:
    """torch_ptq: the calibrated pytorch-quantization model, variants by disabling quantizers."""

    name = "torch"

    def __init__(self, builder) -> None:
        from qatcheck.build import torch_quant

        self.builder = builder
        self.recipe = builder.recipe
        art = builder.torch_artifact(PATH_MODE["torch"])
        self.digest = art.digest
        self.qmodel = art.module.eval()
        self.fp32_model = builder.state.model
        self.layers: dict[str, list[str]] = {}
        for qname in torch_quant.quantizer_names(self.qmodel):
            module, _, _ = qname.rpartition(".")
            self.layers.setdefault(module, []).append(qname)
        if not self.layers:
            raise ConfigError(f"the {PATH_MODE['torch']} model of {self.recipe.name} has no enabled "
                              "quantizer to profile")
        self.calibrator = self.recipe.quant.torch_calibrator
        self.static_batch = False

    def key_parts(self) -> dict:
        return {"torch_state": self.digest, "calibrator": repr(self.recipe.quant)}

    @staticmethod
    def _infer(module) -> Infer:
        import torch

        def run(x: np.ndarray) -> list:
            with torch.no_grad():
                out = module(torch.from_numpy(np.ascontiguousarray(x)))
            outs = out if isinstance(out, (tuple, list)) else [out]
            return [o.detach().float().cpu().numpy() for o in outs]
        return run

    @contextlib.contextmanager
    def fp32(self) -> Iterator[Infer]:
        yield self._infer(self.fp32_model)

    @contextlib.contextmanager
    def variant(self, excluded: Sequence[str]) -> Iterator[Infer]:
        from qatcheck.build.torch_quant import _quiet_quantization_logs

        excluded = _expand(excluded, self.layers, self.name)
        quantizers = [self.qmodel.get_submodule(q) for layer in excluded for q in self.layers[layer]]
        for q in quantizers:
            q.disable()
        try:
            with _quiet_quantization_logs():
                yield self._infer(self.qmodel)
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
    fieldname = "calibrator" if path == "onnx" else "torch_calibrator"
    return replace(recipe, quant=replace(recipe.quant, **{fieldname: calibrator}))


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
            self._path = _OnnxPath(self.builder) if self.path_name == "onnx" else _TorchPath(self.builder)
        return self._path

    # ---- data ---------------------------------------------------------------------------------
    def _batches(self, max_samples: int | None) -> Iterator[tuple[np.ndarray, object, int]]:
        """(padded inputs, targets, real count), at most ``max_samples`` samples."""
        from qatcheck.session import pad_batch

        bs = self.recipe.input.batch_size
        left = max_samples if max_samples is not None else len(self.state.eval_data)
        for x, y in self.state.eval_data.batches(bs):
            if left <= 0:
                return
            if len(x) > left:
                x, y = x[:left], y[:left]
            left -= len(x)
            xb, n = pad_batch(x, bs) if self.path.static_batch else (x, len(x))
            yield xb, y, n

    def subset(self, max_samples: int | None) -> list[tuple[np.ndarray, object, int]]:
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"max_samples must be >= 1; got {max_samples}")
        return list(self._batches(max_samples))

    def evaluate(self, infer: Infer, batches: Iterable[tuple[np.ndarray, object, int]],
                 reference: list[list[np.ndarray]] | None = None,
                 keep: list | None = None) -> tuple[float, float | None]:
        """(primary metric, output cosine vs ``reference``) of one model on the batches.
        ``keep`` collects the outputs (to serve as a reference)."""
        self.evaluations += 1
        metric = self.task.metric()
        parity = ParityAccumulator() if reference is not None else None
        for i, (x, y, n) in enumerate(batches):
            outs = [np.asarray(o)[:n] for o in infer(x)]
            metric.update(outs, y)
            if parity is not None:
                for r, o in zip(reference[i], outs):
                    parity.update(r, o)
            if keep is not None:
                keep.append(outs)
        value = metric.result()[self.task.primary_metric]
        return value, (parity.result()["cosine"] if parity is not None else None)

    def full_metric(self, excluded: Sequence[str] | None) -> float:
        """Metric on the whole eval set: fp32 when ``excluded`` is None, else the quantized model
        with ``excluded`` layers in higher precision."""
        ctx = self.path.fp32() if excluded is None else self.path.variant(list(excluded))
        with ctx as infer:
            return self.evaluate(infer, self._batches(None))[0]

    # ---- cache --------------------------------------------------------------------------------
    def profile_key_parts(self, max_samples: int | None, only_quantized: bool) -> dict:
        from qatcheck.cache import library_versions

        return {"profile_version": _PROFILE_VERSION, "recipe": self.recipe.name,
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


# --------------------------------------------------------------------------------------------
# the keep list: the chosen layers with their reasons, as a file a recipe reads
# --------------------------------------------------------------------------------------------

_KEEP_FORMAT = "qatcheck.keep_precision/1"


@dataclass(frozen=True)
class KeepList:
    """Layers to keep in higher precision and why, as ``python -m qatcheck sensitivity
    --write-keep`` records them. A recipe passes ``layers`` and ``reasons`` to
    ``QuantSettings(keep_precision=..., keep_precision_why=...)``; the report prints the reasons."""

    recipe: str
    layers: tuple[str, ...]
    reasons: dict[str, str]
    summary: str
    source: str = ""

    def to_json(self) -> dict:
        return {"format": _KEEP_FORMAT, "recipe": self.recipe, "layers": list(self.layers),
                "reasons": dict(self.reasons), "summary": self.summary}


def keep_list(prof: Profile, result: BudgetResult) -> KeepList:
    """The chosen layers with a one-line reason each: rank and gain in the profile, and the full
    evaluations that justified the choice."""
    if not result.met:
        raise ConfigError(f"{result.recipe}: the budget was not met, so there is no layer list to keep")
    def pct(v: float) -> str:
        return f"{v * 100:.2f}%"
    reasons = {}
    for layer in result.layers:
        row = prof.row(layer)
        reasons[layer] = (f"rank {row.rank} of {len(prof.layers)} in the {prof.path} sensitivity profile "
                          f"({prof.calibrator}, {prof.samples} samples): keeping it alone in higher "
                          f"precision gains {row.gain_points:+.2f} pt, output cosine vs fp32 "
                          f"{prof.ptq_cosine:.4f} -> {row.excluded_cosine:.4f}")
    summary = (f"{PATH_MODE[result.path]} {result.metric} {pct(result.ptq)} -> partial {pct(result.partial)} "
               f"(fp32 {pct(result.fp32)}, full eval set of {result.samples}); budget "
               f"{result.budget.describe()}; {len(result.steps)} full evaluation(s) chose "
               f"{len(result.layers)} of {len(prof.layers)} quantized layers")
    return KeepList(result.recipe, tuple(result.layers), reasons, summary)


def write_keep_list(keep: KeepList, path: str | Path) -> Path:
    path = Path(path)
    write_text_atomic(path, json.dumps(keep.to_json(), indent=1) + "\n")
    return path


def load_keep_list(path: str | Path) -> KeepList:
    """Read a keep file written by ``--write-keep``; ConfigError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"keep-precision file {path} does not exist; write it with `python -m qatcheck "
                          "sensitivity --recipe <module:callable> --budget-points 0.5 --write-keep "
                          f"{path}`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"keep-precision file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _KEEP_FORMAT:
        raise ConfigError(f"keep-precision file {path}: 'format' must be {_KEEP_FORMAT!r}")
    layers, reasons = data.get("layers"), data.get("reasons", {})
    if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
        raise ConfigError(f"keep-precision file {path}: 'layers' must be a list of module names")
    if not isinstance(reasons, dict):
        raise ConfigError(f"keep-precision file {path}: 'reasons' must be an object")
    return KeepList(str(data.get("recipe", "")), tuple(layers), {k: str(v) for k, v in reasons.items()},
                    str(data.get("summary", "")), str(path))


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------

def report_stem(recipe_name: str, path: str) -> str:
    """``digits-sensitivity`` for the ONNX path (the default), ``digits-sensitivity-torch`` else."""
    return f"{recipe_name}-sensitivity" + ("" if path == "onnx" else f"-{path}")


def write_reports(prof: Profile, reports_dir: str | Path,
                  budget: BudgetResult | None = None) -> list[Path]:
    """``<recipe>-sensitivity[-torch].json`` and ``.png`` in ``reports_dir``."""
    reports_dir = Path(reports_dir)
    stem = report_stem(prof.recipe, prof.path)
    payload = {"profile": prof.to_json(), "budget": budget.to_json() if budget else None,
               "keep_precision": list(budget.layers) if budget and budget.met else None}
    jpath = reports_dir / f"{stem}.json"
    write_text_atomic(jpath, json.dumps(payload, indent=1))
    ppath = reports_dir / f"{stem}.png"
    _plot(prof, ppath, budget)
    return [jpath, ppath]


def _plot(prof: Profile, out: Path, budget: BudgetResult | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from qatcheck.fsutil import atomic_path

    rows = prof.layers
    labels = [r.layer for r in rows][::-1]
    panels = 3 if any(r.only_metric is not None for r in rows) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 0.9 + 0.38 * max(len(rows), 2)),
                             sharey=True, squeeze=False)
    axes = axes[0]
    chosen = set(budget.layers) if budget and budget.met else set()
    colors = ["tab:red" if r.layer in chosen else "tab:blue" for r in rows][::-1]
    ax = axes[0]
    ax.barh(labels, [r.excluded_metric * 100 for r in rows][::-1], color=colors)
    ax.axvline(prof.ptq * 100, color="gray", ls="--", label=f"{prof.mode} {prof.ptq * 100:.2f}")
    ax.axvline(prof.fp32 * 100, color="green", ls=":", label=f"fp32 {prof.fp32 * 100:.2f}")
    lo = min([prof.ptq] + [r.excluded_metric for r in rows]) * 100
    ax.set_xlim(max(0.0, lo - 2), min(100.0, prof.fp32 * 100 + 2) if prof.fp32 <= 1 else None)
    ax.set_xlabel(f"{prof.metric} (%) with the layer excluded")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.barh(labels, [1.0 - r.excluded_cosine for r in rows][::-1], color=colors)
    ax.axvline(1.0 - prof.ptq_cosine, color="gray", ls="--", label=f"{prof.mode}")
    ax.set_xlabel("1 - output cosine vs fp32 (layer excluded)")
    ax.legend(fontsize=7)
    if panels == 3:
        ax = axes[2]
        ax.barh(labels, [(r.only_drop_points or 0.0) for r in rows][::-1], color=colors)
        ax.set_xlabel(f"{prof.metric} drop (points), only this layer quantized")
    fig.suptitle(f"{prof.recipe}: {prof.mode} sensitivity ({prof.calibrator}, {prof.samples} samples)"
                 + ("; red = kept for budget" if chosen else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table_rows(prof: Profile, top: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ranked table (used by the CLI)."""
    header = ["#", "layer", f"{prof.metric} excl. (%)", "gain (pt)", "cosine excl."]
    only = any(r.only_metric is not None for r in prof.layers)
    if only:
        header += [f"{prof.metric} only (%)", "drop only (pt)"]
    header.append("ONNX nodes" if prof.path == "onnx" else "quantizers")
    rows = []
    for r in prof.layers[:top]:
        row = [str(r.rank), r.layer, f"{r.excluded_metric * 100:.2f}", f"{r.gain_points:+.2f}",
               f"{r.excluded_cosine:.5f}"]
        if only:
            row += [f"{(r.only_metric or 0) * 100:.2f}", f"{(r.only_drop_points or 0):+.2f}"]
        row.append(", ".join(r.targets))
        rows.append(row)
    return header, rows
