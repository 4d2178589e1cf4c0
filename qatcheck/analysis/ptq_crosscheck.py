"""Cross-check of qatcheck's ONNX PTQ against NVIDIA ModelOpt's on the same fp32 ONNX and the same
calibration batches (``python -m qatcheck crosscheck``, issue 14).

Both quantizers write TensorRT-style explicit Q/DQ graphs. They are compared where it matters for
a deployment:

* **scales**, site by site. An activation site is keyed by the tensor its QuantizeLinear
  quantizes, traced back through value-preserving shape ops (Flatten, Reshape, Squeeze, Unsqueeze,
  Transpose, Identity), so ours on ``/Flatten_output_0`` and ModelOpt's on the GlobalAveragePool
  output before it are the same site. A weight site is keyed by the node that reads the
  dequantized weight (``weight of /layer1/conv1/Conv``), so renamed or duplicated initializers
  still match; per-channel weight scales are compared channel by channel and the worst channel
  speaks for the tensor. Ratio = ModelOpt's scale / ours.
* **placement**: sites only one of them quantizes, with the nodes that read them (residual-Add
  inputs, pooling outputs, the classifier...).
* **accuracy**: each graph's metric on the recipe's eval set on ONNX Runtime (CPU), through the
  project's one evaluation loop, and the two graphs' output agreement.

:data:`DISAGREE_RATIO` (10 %) is where a scale counts as disagreeing: two correct max calibrations
of the same data agree to float rounding (< 1e-6), one int8 step is 1/127 of the range, and
the planted calibration bugs the tests use are x2 and more.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.modes import of_family, spec as mode_spec
from qatcheck.report_files import markdown_table, write_bundle

#: |ratio| beyond this (either way) is a disagreement; see the module docstring
DISAGREE_RATIO = 1.10
#: value-preserving ops an activation site is traced back through
PASS_THROUGH_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity")
CALIBRATORS = ("minmax", "entropy")
OURS, MODELOPT = "ours", "modelopt"


# --------------------------------------------------------------------------------------------
# Q/DQ sites of one graph
# --------------------------------------------------------------------------------------------

@dataclass
class Site:
    """One Q/DQ pair: what it quantizes, with which scale, and who reads the result."""

    key: str
    kind: str  # activation | weight
    tensor: str  # the QuantizeLinear's input
    scale: np.ndarray  # 0-d (per tensor) or 1-d (per channel)
    axis: int | None
    zero_point: str  # e.g. "int8 0", "uint8 128", "int8 nonzero"
    readers: list[str] = field(default_factory=list)  # "node (op) #input"


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _zero_point(q: onnx.NodeProto, consts: dict[str, np.ndarray]) -> str:
    if len(q.input) < 3 or not q.input[2]:
        return "uint8 0"  # ONNX's default zero point type
    zp = consts.get(q.input[2])
    if zp is None:
        return "dynamic"
    return f"{zp.dtype} {'0' if not np.any(zp) else 'nonzero'}"


def qdq_sites(model: onnx.ModelProto | str | Path) -> dict[str, Site]:
    """Every QuantizeLinear -> DequantizeLinear pair of ``model``, keyed for matching across
    graphs (see the module docstring)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    consts = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in graph.node:
        for i, t in enumerate(n.input):
            readers.setdefault(t, []).append((n, i))

    def root(tensor: str) -> str:
        seen = set()
        while tensor in producer and producer[tensor].op_type in PASS_THROUGH_OPS and tensor not in seen:
            seen.add(tensor)
            tensor = producer[tensor].input[0]
        return tensor

    sites: dict[str, Site] = {}
    for q in graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        if q.input[1] not in consts:
            raise ArtifactError(f"QuantizeLinear {q.name!r} has a scale {q.input[1]!r} that is not a constant")
        scale = np.asarray(consts[q.input[1]], dtype=np.float64)
        axis = next((a.i for a in q.attribute if a.name == "axis"), 1) if scale.ndim else None
        dqs = [n for n, _ in readers.get(q.output[0], []) if n.op_type == "DequantizeLinear"]
        users = [(n, i) for dq in dqs for n, i in readers.get(dq.output[0], [])]
        shown = [f"{n.name} ({n.op_type}) #{i}" for n, i in users]
        zp = _zero_point(q, consts)
        is_weight = q.input[0] in consts
        if is_weight:
            keys = [f"weight of {n.name}" for n, _ in users] or [f"weight {q.input[0]}"]
        else:
            keys = [root(q.input[0])]
        for key in keys:
            k, i = key, 2
            while k in sites:  # the same site quantized twice in one graph (rare): keep both
                k, i = f"{key} #{i}", i + 1
            sites[k] = Site(k, "weight" if is_weight else "activation", q.input[0], scale, axis, zp, shown)
    return sites


# --------------------------------------------------------------------------------------------
# comparing two graphs' sites
# --------------------------------------------------------------------------------------------

@dataclass
class ScaleRow:
    """One site both graphs quantize. ``ratio`` = ModelOpt / ours (for per-channel weights the
    worst channel's; ``median_ratio`` the median channel's)."""

    key: str
    kind: str
    ours_tensor: str
    modelopt_tensor: str
    ours_scale: float  # per-tensor scale, or the median channel's for per-channel weights
    modelopt_scale: float
    ratio: float
    median_ratio: float
    channels: int  # 1 for per-tensor sites
    channels_off: int  # channels beyond DISAGREE_RATIO
    note: str = ""

    @property
    def abs_log2(self) -> float:
        return abs(math.log2(self.ratio))


@dataclass
class Placement:
    """A site only one graph quantizes."""

    key: str
    kind: str
    tensor: str
    readers: list[str]
    scale: float


@dataclass
class Summary:
    kind: str  # all | activation | weight
    matched: int
    median_abs_log2: float
    max_abs_log2: float
    worst: str | None
    worst_ratio: float
    over_10pct: int
    over_2x: int


@dataclass
class ScaleComparison:
    rows: list[ScaleRow]
    only_ours: list[Placement]
    only_modelopt: list[Placement]
    threshold: float = DISAGREE_RATIO

    def disagreements(self, threshold: float | None = None) -> list[ScaleRow]:
        """Matched sites whose scales differ by more than ``threshold`` (either way), worst first."""
        t = abs(math.log2(threshold or self.threshold))
        return sorted((r for r in self.rows if r.abs_log2 > t + 1e-12), key=lambda r: -r.abs_log2)

    @property
    def worst(self) -> ScaleRow | None:
        return max(self.rows, key=lambda r: r.abs_log2, default=None)

    def summary(self, kind: str = "all") -> Summary:
        rows = [r for r in self.rows if kind == "all" or r.kind == kind]
        logs = [r.abs_log2 for r in rows]
        worst = max(rows, key=lambda r: r.abs_log2, default=None)
        return Summary(kind=kind, matched=len(rows),
                       median_abs_log2=float(np.median(logs)) if logs else 0.0,
                       max_abs_log2=max(logs, default=0.0), worst=worst.key if worst else None,
                       worst_ratio=worst.ratio if worst else 1.0,
                       over_10pct=sum(v > math.log2(DISAGREE_RATIO) + 1e-12 for v in logs),
                       over_2x=sum(v > 1.0 + 1e-12 for v in logs))


def _reader_nodes(s: Site) -> set[str]:
    return {r.rsplit(" #", 1)[0] for r in s.readers}


def _placement(s: Site) -> Placement:
    return Placement(s.key, s.kind, s.tensor, s.readers, float(np.median(s.scale)))


def compare_scales(ours: onnx.ModelProto | str | Path, modelopt: onnx.ModelProto | str | Path,
                   threshold: float = DISAGREE_RATIO) -> ScaleComparison:
    """Match the Q/DQ sites of two graphs quantized from the same fp32 ONNX and compare scales."""
    a, b = qdq_sites(ours), qdq_sites(modelopt)
    rows = []
    t = abs(math.log2(threshold))
    for key in [k for k in a if k in b]:
        sa, sb = a[key], b[key]
        x, y = np.broadcast_arrays(sa.scale.ravel() if sa.scale.ndim else sa.scale,
                                   sb.scale.ravel() if sb.scale.ndim else sb.scale)
        if x.size == 0 or np.any(x <= 0) or np.any(y <= 0):
            raise ArtifactError(f"site {key!r} has a non-positive scale (ours {sa.scale}, ModelOpt {sb.scale})")
        r = np.atleast_1d(y / x)
        logs = np.abs(np.log2(r))
        notes = []
        if sa.tensor != sb.tensor:
            notes.append(f"ours quantizes {sa.tensor}, ModelOpt {sb.tensor}")
        if sa.scale.ndim != sb.scale.ndim:
            notes.append("per-tensor vs per-channel")
        elif sa.kind == "activation":  # same tensor: do the same nodes read it quantized?
            ra, rb = _reader_nodes(sa), _reader_nodes(sb)
            if rb - ra:
                notes.append("also read quantized by ModelOpt's " + ", ".join(sorted(rb - ra)))
            if ra - rb:
                notes.append("also read quantized by our " + ", ".join(sorted(ra - rb)))
        if sa.zero_point != sb.zero_point:
            notes.append(f"zero point {sa.zero_point} vs {sb.zero_point}")
        rows.append(ScaleRow(
            key=key, kind=sa.kind, ours_tensor=sa.tensor, modelopt_tensor=sb.tensor,
            ours_scale=float(np.median(x)), modelopt_scale=float(np.median(y)),
            ratio=float(r[int(np.argmax(logs))]), median_ratio=float(np.median(r)),
            channels=int(r.size), channels_off=int(np.sum(logs > t + 1e-12)), note="; ".join(notes)))
    return ScaleComparison(rows=rows, only_ours=[_placement(a[k]) for k in a if k not in b],
                           only_modelopt=[_placement(b[k]) for k in b if k not in a], threshold=threshold)


# --------------------------------------------------------------------------------------------
# building both graphs and evaluating them
# --------------------------------------------------------------------------------------------

@dataclass
class CrossCheck:
    recipe: str
    mode: str
    calibrator: str
    modelopt_method: str
    modelopt_version: str
    graphs: dict[str, str]  # fp32 / ours / modelopt -> ONNX path
    scales: ScaleComparison
    metric_name: str = ""
    #: fp32 / ours / modelopt -> the primary metric on the eval set (None: not evaluated)
    metrics: dict[str, float] | None = None
    metric_is_fraction: bool = True
    samples: int = 0
    #: ModelOpt's outputs vs ours on the same batches (cosine, task agreement)
    agreement: dict[str, float] | None = None
    #: each graph's output cosine vs fp32
    cosine_vs_fp32: dict[str, float] | None = None

    @property
    def metric_delta(self) -> float | None:
        """ModelOpt minus ours, in the metric's unit (points for fractions)."""
        if not self.metrics:
            return None
        scale = 100.0 if self.metric_is_fraction else 1.0
        return (self.metrics[MODELOPT] - self.metrics[OURS]) * scale

    def to_json(self) -> dict:
        comp = self.scales
        return {
            "recipe": self.recipe, "mode": self.mode, "calibrator": self.calibrator,
            "modelopt": {"version": self.modelopt_version, "calibration_method": self.modelopt_method},
            "graphs": self.graphs, "threshold_ratio": comp.threshold,
            "summary": {k: asdict(comp.summary(k)) for k in ("all", "activation", "weight")},
            "disagreements": [r.key for r in comp.disagreements()],
            "metric": {"name": self.metric_name, "values": self.metrics, "samples": self.samples,
                       "delta_modelopt_minus_ours": self.metric_delta,
                       "unit": "points" if self.metric_is_fraction else "value"},
            "agreement_modelopt_vs_ours": self.agreement, "cosine_vs_fp32": self.cosine_vs_fp32,
            "rows": [{**asdict(r), "abs_log2": r.abs_log2} for r in comp.rows],
            "only_ours": [asdict(p) for p in comp.only_ours],
            "only_modelopt": [asdict(p) for p in comp.only_modelopt],
        }


def build_graphs(recipe, calibrator: str, mode: str = "trt_ptq", cache_dir: str | Path = ".qatcheck_cache",
                 use_cache: bool = True):
    """(workspace, {"fp32", "ours", "modelopt"} -> path): the recipe's fp32 ONNX and its ``mode``
    graph written by each quantizer from it with the same calibration batches and ``calibrator``:
    two workspaces that differ only in ``onnx_quantizer``, so both graphs land in the cache
    under the keys a pytest session uses (with and without ``--qatcheck-trt-ptq modelopt``).
    ``recipe``: a Recipe, or a :class:`~qatcheck.workspace.RecipeWorkspace` (its cache)."""
    from qatcheck.analysis.sensitivity import with_calibrator
    from qatcheck.quantize import modelopt_onnx
    from qatcheck.workspace import workspace_of

    if calibrator not in CALIBRATORS:
        raise ConfigError(f"crosscheck: calibrator {calibrator!r}: choose {' or '.join(CALIBRATORS)} "
                          "(ModelOpt's int8 ONNX PTQ has max and entropy only)")
    graph_modes = of_family("int8_graph")  # the graphs both quantizers write: int8 Q/DQ in the fp32 ONNX
    if mode not in graph_modes:
        raise ConfigError(f"crosscheck: mode {mode!r}: choose one of {', '.join(graph_modes)}")
    reason = modelopt_onnx.unavailable_reason()
    if reason:
        raise ConfigError(f"crosscheck: {reason}")
    ws = workspace_of(recipe, cache_dir, use_cache=use_cache)
    recipe = with_calibrator(ws.recipe, calibrator, "onnx")
    recipe.quant.validate()
    if mode_spec(mode).keeps_layers and not recipe.quant.keep_precision:
        raise ConfigError(f"crosscheck --mode {mode}: Recipe({recipe.name}).quant.keep_precision is empty")
    ws = ws.derive(recipe, onnx_quantizer="qatcheck")
    ours, theirs = ws.builder, ws.derive(onnx_quantizer="modelopt").builder  # one loaded model, one cache
    paths = {"fp32": ours.onnx_artifact("fp32").path, OURS: ours.onnx_artifact(mode).path,
             MODELOPT: theirs.onnx_artifact(mode).path}
    return ws, paths


def evaluate_graphs(ws, paths: dict[str, Path], max_samples: int | None = None) -> dict:
    """Each graph's primary metric on the recipe's eval set (ONNX Runtime, CPU), its output cosine
    vs fp32, and ModelOpt's outputs vs ours (``ws``: the recipe's RecipeWorkspace)."""
    from qatcheck import evaluate as evaluation
    from qatcheck.backends.onnxruntime_backend import OrtRunner
    from qatcheck.tasks.base import metric_spec

    recipe, task = ws.recipe, ws.task
    batches = list(ws.eval_batches(pad=True, max_samples=max_samples))
    outputs: dict[str, list] = {}
    metrics, cosine = {}, {}
    samples = 0
    for who in ("fp32", OURS, MODELOPT):
        infer = OrtRunner(paths[who], provider="CPUExecutionProvider", input_name=recipe.input.name).infer
        keep: list = []
        ev = evaluation.evaluate(infer, batches, task, keep=keep,
                                 reference=outputs.get("fp32"), source=f"{recipe.name} eval data")
        outputs[who], metrics[who], samples = keep, ev.metrics[task.primary_metric], ev.samples
        if who != "fp32":
            cosine[who] = evaluation.combined_parity(ev)["cosine"]
    replay = iter(outputs[MODELOPT])
    ev = evaluation.evaluate(lambda x: next(replay), batches, task, reference=outputs[OURS])
    return {"metric_name": task.primary_metric, "metrics": metrics, "samples": samples,
            "fraction": metric_spec(task, task.primary_metric).fraction,
            "agreement": evaluation.combined_parity(ev), "cosine_vs_fp32": cosine}


def crosscheck(recipe, calibrator: str, *, mode: str = "trt_ptq", cache_dir: str | Path = ".qatcheck_cache",
               use_cache: bool = True, max_samples: int | None = None, evaluate: bool = True,
               threshold: float = DISAGREE_RATIO) -> CrossCheck:
    """Build ``recipe``'s ``mode`` graph with ours and with ModelOpt (same fp32 ONNX, same
    calibration batches, ``calibrator``), compare their scales and placement and, with
    ``evaluate``, their metric on the first ``max_samples`` eval samples (None: all)."""
    from qatcheck.quantize import modelopt_onnx

    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1; got {max_samples}")
    ws, paths = build_graphs(recipe, calibrator, mode, cache_dir, use_cache)
    check = CrossCheck(recipe=ws.recipe.name, mode=mode, calibrator=calibrator,
                       modelopt_method=modelopt_onnx.MODELOPT_METHODS[calibrator],
                       modelopt_version=modelopt_onnx.version(),
                       graphs={k: str(v) for k, v in paths.items()},
                       scales=compare_scales(paths[OURS], paths[MODELOPT], threshold))
    if evaluate:
        ev = evaluate_graphs(ws, paths, max_samples)
        check.metric_name, check.metrics, check.samples = ev["metric_name"], ev["metrics"], ev["samples"]
        check.metric_is_fraction, check.agreement = ev["fraction"], ev["agreement"]
        check.cosine_vs_fp32 = ev["cosine_vs_fp32"]
    return check


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------

def _fmt_ratio(r: float) -> str:
    return f"{r:.4f}" if 0.1 <= r <= 10 else f"{r:.3g}"


def _short(readers: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(readers[:limit])
    return shown + (f", ... ({len(readers) - limit} more)" if len(readers) > limit else "") or "(graph output)"


def summary_lines(check: CrossCheck) -> list[str]:
    comp = check.scales
    lines = []
    for kind in ("all", "activation", "weight"):
        s = comp.summary(kind)
        lines.append(f"{kind}: {s.matched} matched sites, median |log2 ratio| {s.median_abs_log2:.4f}, "
                     f"max {s.max_abs_log2:.4f} (ratio {_fmt_ratio(s.worst_ratio)} at {s.worst}), "
                     f"{s.over_10pct} beyond 10 %, {s.over_2x} beyond x2")
    lines.append(f"placement: {len(comp.only_ours)} site(s) only ours quantizes, "
                 f"{len(comp.only_modelopt)} only ModelOpt")
    if check.metrics:
        unit = 100.0 if check.metric_is_fraction else 1.0
        m = check.metrics
        lines.append(f"{check.metric_name} on {check.samples} eval samples: fp32 {m['fp32'] * unit:.2f}, "
                     f"ours {m[OURS] * unit:.2f}, ModelOpt {m[MODELOPT] * unit:.2f} "
                     f"(ModelOpt - ours {check.metric_delta:+.2f}"
                     f"{' pt' if check.metric_is_fraction else ''})")
    if check.agreement:
        extra = ", ".join(f"{k} {v:.4f}" for k, v in check.agreement.items()
                          if k not in ("cosine", "max_abs", "mean_abs"))
        lines.append(f"ModelOpt vs ours outputs: cosine {check.agreement['cosine']:.5f}"
                     + (f", {extra}" if extra else ""))
    return lines


def markdown_report(check: CrossCheck) -> str:
    comp = check.scales
    out = [f"# PTQ cross-check: {check.recipe} {check.mode}, calibrator {check.calibrator}", "",
           f"qatcheck's ONNX PTQ (`qatcheck.quantize.onnx_ptq`, {check.calibrator}) vs NVIDIA ModelOpt "
           f"{check.modelopt_version} ONNX PTQ (`calibration_method={check.modelopt_method!r}`, CPU, "
           "fp32), the same fp32 ONNX and calibration batches. Ratio = ModelOpt scale / ours; a site "
           f"disagrees beyond x{comp.threshold:g} either way.", ""]
    out += [f"- {line}" for line in summary_lines(check)] + [""]
    if check.metrics:
        unit = 100.0 if check.metric_is_fraction else 1.0
        rows = [[who, f"{check.metrics[k] * unit:.2f}",
                 "-" if k == "fp32" else f"{(check.metrics[k] - check.metrics['fp32']) * unit:+.2f}",
                 "-" if k == "fp32" else f"{check.cosine_vs_fp32[k]:.5f}"]
                for k, who in (("fp32", "fp32"), (OURS, "ours"), (MODELOPT, "ModelOpt"))]
        out += [f"## {check.metric_name} ({check.samples} eval samples, ONNX Runtime CPU)", "",
                markdown_table(["graph", check.metric_name, "Δ fp32", "output cosine vs fp32"], rows), ""]
    out += ["## Scales of the sites both quantize", ""]
    rows = [[r.key, r.kind, f"{r.ours_scale:.6g}", f"{r.modelopt_scale:.6g}", _fmt_ratio(r.ratio),
             f"{r.channels_off}/{r.channels}" if r.channels > 1 else "-", r.note]
            for r in sorted(comp.rows, key=lambda r: -r.abs_log2)]
    out += [markdown_table(["site", "kind", "ours", "ModelOpt", "ratio (worst ch.)",
                            "channels > 10 %", "note"], rows), ""]
    for title, items in (("Quantized only by ours", comp.only_ours),
                         ("Quantized only by ModelOpt", comp.only_modelopt)):
        out += [f"## {title}", ""]
        if items:
            out += [markdown_table(["site", "kind", "scale", "read by"],
                                   [[p.key, p.kind, f"{p.scale:.6g}", _short(p.readers)] for p in items]), ""]
        else:
            out += ["(none)", ""]
    out += ["Per-channel weights: the scale columns show the median channel, the ratio the worst "
            "channel. Activation sites are matched through Flatten/Reshape/Squeeze/Unsqueeze/"
            "Transpose/Identity.", ""]
    return "\n".join(out)


def _plot(check: CrossCheck, plt):
    rows = check.scales.rows
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for kind, marker in (("activation", "o"), ("weight", ".")):
        sel = [r for r in rows if r.kind == kind]
        ax.scatter([r.ours_scale for r in sel], [r.ratio for r in sel], marker=marker, label=kind, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    t = check.scales.threshold
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhspan(1 / t, t, color="green", alpha=0.1, label=f"within x{t:g}")
    for r in sorted(rows, key=lambda r: -r.abs_log2)[:4]:
        if r.abs_log2 > math.log2(t):
            ax.annotate(r.key, (r.ours_scale, r.ratio), fontsize=7)
    ratios = [r.ratio for r in rows] + [1 / t, t]
    lo, hi = min(ratios) / 1.05, max(ratios) * 1.05
    ticks = [v for v in (1 / 8, 1 / 4, 1 / 2, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 8) if lo <= v <= hi]
    ax.set_ylim(lo, hi)
    ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
    ax.minorticks_off()
    ax.set_xlabel("our scale (per-channel weights: median channel)")
    ax.set_ylabel("ModelOpt scale / ours (weights: worst channel)")
    ax.set_title(f"{check.recipe} {check.mode}, {check.calibrator}: ModelOpt vs ours", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_reports(check: CrossCheck, reports_dir: str | Path) -> list[Path]:
    """``<recipe>-<mode>-<calibrator>.{json,md,png}`` under ``reports_dir``."""
    return write_bundle(Path(reports_dir) / f"{check.recipe}-{check.mode}-{check.calibrator}",
                        json_doc=check.to_json(), markdown=markdown_report(check),
                        plot=lambda plt: _plot(check, plt), indent=2, default=float, json_end="\n")


def table_rows(check: CrossCheck, top: int | None = 12) -> tuple[list[str], list[list[str]]]:
    rows = sorted(check.scales.rows, key=lambda r: -r.abs_log2)[:top]
    return (["site", "kind", "ours", "ModelOpt", "ratio"],
            [[r.key, r.kind, f"{r.ours_scale:.5g}", f"{r.modelopt_scale:.5g}", _fmt_ratio(r.ratio)]
             for r in rows])


def run(recipe, calibrators: Iterable[str], **kw) -> list[CrossCheck]:
    return [crosscheck(recipe, c, **kw) for c in calibrators]
