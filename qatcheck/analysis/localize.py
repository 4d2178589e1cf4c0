"""Localize where low precision (int8, fp16, fp8) departs from fp32 in a model (issue #13, item 2;
issue 21, item 9).

This module holds what both paths share - the result types (:class:`LayerRow`,
:class:`Localization`), the naming rule (:func:`conclude`), the JSON / Markdown / PNG writers and
the entry points that dispatch on the mode (:func:`localize`, :func:`for_failed_case`) - and the
ONNX Runtime path for the graphs made from the fp32 export (:func:`onnx_modes`: ``fp16``,
``trt_ptq``, ``partial``). The PyTorch path for the modes with a PyTorch form (:func:`torch_modes`:
``fp16`` in half, ``torch_ptq`` / ``qat`` / ``fp8`` fake-quant; module outputs through forward
hooks, each layer's own SQNR from its low-precision module on the fp32 module's input) is
:mod:`qatcheck.analysis.localize_torch`. Which modes take which path comes from the mode table.

ONNX Runtime path
-----------------
:func:`localize_graphs` runs the low-precision graph (the mode's artifact, or any ONNX given by
path) and the recipe's fp32 graph on ONNX Runtime (CPU) with every intermediate tensor exposed as
an extra output, over the first N eval samples at the recipe's opt shape. Only tensors present in
BOTH graphs with the same name, float type and shape are compared: Q/DQ insertion
(:mod:`qatcheck.quantize.onnx_ptq`) rewires the consumers' inputs to new ``*_dequantized`` tensors
and keeps every original compute node's output name (``/layer1/conv2/Conv_output_0``), so each
Conv / Gemm / Relu / Add output of the quantized graph has its fp32 twin; the fp16 conversion keeps
them too (fp16 tensors; a BatchNorm folded into its conv leaves the BN's output name to the conv).
Each compared tensor is one row (named by the fp32 graph's node that produces it; the PyTorch
module from :func:`~qatcheck.quantize.onnx_ptq.module_name_of`), in the low-precision graph's
topological order, with its SQNR (dB, :func:`~qatcheck.analysis.sensitivity.sqnr_db`) and cosine
vs fp32.

The rule (what is named)
------------------------
A row's *contribution* is the error the layer makes by itself, not the error it inherits: its
*own SQNR* (dB) is measured by running that node of the QUANTIZED graph - with its input and
weight Q/DQ, extracted with :class:`onnx.utils.Extractor` - on the FP32 graph's values of its
inputs, and comparing the result with the fp32 output (an fp16 node gets them rounded to fp16,
and computes with its fp16 constants: a clamped BatchNorm variance shows there). A layer's input
and weight Q/DQ are its own quantization, so the pair on ``/layer1/relu1/Relu_output_0`` counts in ``layer1.conv2`` (the
layer that reads it: the layer ``keep_precision`` would name). Nodes with no Q/DQ (ReLU, an
unquantized Add, pooling) compute exactly what fp32 computes on the same inputs and get the cap
(300 dB). Layers are ranked by own SQNR, lowest first.

Why not the drop ``SQNR_in - SQNR_out`` of the end-to-end run: it is infinite for the first
quantized layer (its input is exact), and the difference of the cumulative error energies is
inflated downstream of real damage - a conv amplifies the relative error it reads (measured on
digits with the scale of ``layer1.conv2``'s input x64: ``layer2.downsample.conv``'s cumulative
NSR grew by 0.22 vs 0.27 at the planted layer; its own SQNR is 35.9 dB vs 5.6). Both the
cumulative SQNR / cosine and the drop are still reported per row.

Named layer (:func:`conclude`, both paths): if some row's cumulative cosine vs fp32 is below
``floor`` (default 0.99), the first such row in topological (execution) order marks where the
damage crosses the floor; the named layer is the worst own-SQNR layer among that row and its
ancestors (the damage that pushed it below entered there or upstream, never downstream).
Otherwise no layer is below the floor and nothing is named (``named`` is None); the worst five by
own SQNR are reported either way.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx.utils
from onnx import helper, shape_inference

from qatcheck.errors import ConfigError, DataError
from qatcheck.fsutil import file_digest, write_text_atomic
from qatcheck.modes import MODE_SPECS, localization_paths, spec as mode_spec
from qatcheck.quantize.onnx_ptq import module_name_of
from qatcheck.report_files import markdown_table

__all__ = ["LayerRow", "Localization", "localize", "localize_graphs", "write_reports",
           "table_rows", "verdict", "expose_tensors", "conclude", "for_failed_case", "AutoLocalization", "RULE",
           "onnx_modes", "torch_modes", "modes", "PATHS"]

#: where a mode is localized: its ONNX graph on ONNX Runtime, or its PyTorch module
PATHS = ("onnx", "torch")


def onnx_modes() -> tuple[str, ...]:
    """Modes localized on their ONNX graph (ONNX Runtime), from the mode table
    (:func:`qatcheck.modes.localization_paths`): low precision and made from the fp32 export (the
    fp16 conversion, the ONNX-level PTQ graphs), so every compared tensor keeps its name AND its
    meaning."""
    return tuple(n for n in MODE_SPECS if "onnx" in localization_paths(n))


def torch_modes() -> tuple[str, ...]:
    """Modes localized in PyTorch (:mod:`qatcheck.analysis.localize_torch`), from the mode table:
    low precision with a PyTorch form. The exports of the quantized ones keep BatchNorm unfused,
    so ``/stem/conv/Conv_output_0`` there is the pre-BN conv output while the fp32 export's (BN
    folded) is post-BN - same name and shape, different values (measured on digits: cosine 0.93 at
    stem.conv against 0.99995 at stem.relu right after it). Their modules keep the fp32 model's
    module names instead, so they are compared module by module."""
    return tuple(n for n in MODE_SPECS if "torch" in localization_paths(n))


def modes() -> tuple[str, ...]:
    """Every mode that can be localized (table order)."""
    return tuple(n for n in MODE_SPECS if localization_paths(n))


#: +-dB cap, like sqnr_db's
_CAP_DB = 300.0
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)

RULE = ("contribution = own SQNR: the layer of the low-precision graph (fp16, or with its input "
        "and weight Q/DQ) run on fp32 inputs vs the fp32 output, lowest first; named = the lowest "
        "own SQNR among the first layer whose cosine vs fp32 < floor and its ancestors; none when no layer "
        "is below the floor")


@dataclass
class LayerRow:
    index: int  # topological (ONNX) / execution (torch) position among the compared rows
    tensor: str  # the row's key: the ONNX tensor, or the module name (``name#2``: second call)
    node: str  # the ONNX node, or the module (or quantizer) name
    op: str  # the ONNX op type, or the module's class
    layer: str  # PyTorch module name (the node name for a top-level op)
    sqnr_db: float  # end to end (cumulative) vs fp32
    cosine: float  # end to end (cumulative) vs fp32
    input_sqnr_db: float  # SQNR of the worst input (cap: exact input)
    drop_db: float  # input_sqnr_db - sqnr_db
    own_nsr: float  # 10^(-own_sqnr_db/10): the layer's own error energy / signal energy
    own_sqnr_db: float  # the contribution (ranking key): the layer alone, on fp32 inputs
    inputs: list[str] = field(default_factory=list)  # compared rows this one depends on directly
    rank: int = 0  # by contribution, 1 = largest
    #: torch path: own SQNR measured after this module (the BatchNorm right after a conv, fp32's:
    #: deployment folds it into the conv), None when measured on the row's own output
    own_after: str | None = None
    #: torch path, a layer whose weights differ from fp32's (qat): its quantized output vs the SAME
    #: module with its quantizers off, on the fp32 input - the quantization alone, without the
    #: fine-tuning drift; None where the weights are fp32's (own SQNR already is that)
    quant_only_sqnr_db: float | None = None


@dataclass
class Localization:
    recipe: str
    mode: str
    calibrator: str | None
    samples: int
    floor: float
    quantized: str  # the quantized artifact (Q/DQ ONNX, or the torch state file)
    fp32: str  # the fp32 reference (ONNX, or the recipe's PyTorch model)
    rows: list[LayerRow]
    named: str | None  # the named layer (module name), None when no layer is below the floor
    named_tensor: str | None
    first_below_floor: str | None  # tensor of the first row with cosine < floor
    worst: list[str]  # tensors of the worst five contributors
    skipped: list[str]  # intermediate tensors (modules) present in one model only, or other shapes
    seconds: float = 0.0
    rule: str = RULE
    path: str = "onnxruntime"  # onnxruntime | torch
    order: str = "topological"  # the rows' order: topological (ONNX graph) | execution (torch)
    #: how the rows were measured and what they are compared with (one or two sentences)
    method: str = ""

    def row(self, tensor: str) -> LayerRow:
        for r in self.rows:
            if r.tensor == tensor:
                return r
        raise KeyError(tensor)

    def ranked(self) -> list[LayerRow]:
        return sorted(self.rows, key=lambda r: r.rank)

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# graphs
# --------------------------------------------------------------------------------------------

def _typed_values(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """tensor name -> (elem type, static shape or None), by ONNX shape inference."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are then checked at run time only
        inferred = model
    out = {}
    g = inferred.graph
    for v in list(g.value_info) + list(g.output) + list(g.input):
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        out[v.name] = (t.elem_type, dims if t.HasField("shape") and None not in dims else None)
    return out


def _candidates(qmodel: onnx.ModelProto, fmodel: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Outputs of the quantized graph's compute nodes (not Q/DQ / Constant) that the fp32 graph
    produces too, with a float type and the same static shape where both are known; and the
    skipped ones."""
    qtypes, ftypes = _typed_values(qmodel), _typed_values(fmodel)
    fprod = {o for n in fmodel.graph.node for o in n.output}
    keep, skipped = [], []
    for node in qmodel.graph.node:
        if node.op_type in _QDQ or node.op_type == "Constant":
            continue
        for t in node.output:
            if not t:
                continue
            qt, ft = qtypes.get(t), ftypes.get(t)
            ok = (t in fprod and qt is not None and ft is not None and qt[0] in _FLOAT
                  and ft[0] in _FLOAT and (qt[1] is None or ft[1] is None or qt[1] == ft[1]))
            (keep if ok else skipped).append(t)
    return keep, skipped


def expose_tensors(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``tensors`` added as graph outputs (their own float type: fp16 in an
    fp16 graph; shape left open)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    types = _typed_values(model)
    for t in tensors:
        if t not in present:
            elem = types.get(t, (onnx.TensorProto.FLOAT, None))[0]
            elem = elem if elem in _FLOAT else onnx.TensorProto.FLOAT
            m.graph.output.append(helper.make_tensor_value_info(t, elem, None))
    return m


def _feed_types(session) -> dict[str, np.dtype]:
    """input name -> the numpy dtype an ONNX Runtime session takes (fp32 values are cast to it:
    an fp16 node is fed the fp32 graph's values rounded to fp16)."""
    return {i.name: np.float16 if i.type == "tensor(float16)" else np.float64 if i.type == "tensor(double)"
            else np.float32 for i in session.get_inputs()}


class _Acc:
    __slots__ = ("sig", "err", "dot", "oo")

    def __init__(self) -> None:
        self.sig = self.err = self.dot = self.oo = 0.0

    def update(self, r: np.ndarray, o: np.ndarray) -> None:
        r64, o64 = r.astype(np.float64).ravel(), o.astype(np.float64).ravel()
        d = r64 - o64
        self.sig += float(r64 @ r64)
        self.err += float(d @ d)
        self.dot += float(r64 @ o64)
        self.oo += float(o64 @ o64)

    def sqnr_db(self) -> float:
        if not all(math.isfinite(v) for v in (self.sig, self.err)):
            return -_CAP_DB
        if self.err <= 0.0:
            return _CAP_DB
        if self.sig <= 0.0:
            return -_CAP_DB
        return max(-_CAP_DB, min(_CAP_DB, 10.0 * math.log10(self.sig / self.err)))

    def cosine(self) -> float:
        if not all(math.isfinite(v) for v in (self.sig, self.dot, self.oo)):
            return 0.0
        denom = math.sqrt(self.sig) * math.sqrt(self.oo)
        return self.dot / denom if denom > 0 else (1.0 if self.sig == self.oo else 0.0)


def _nsr(db: float) -> float:
    return 10.0 ** (-db / 10.0)


def check_floor(floor: float) -> None:
    if not 0.0 < floor <= 1.0:
        raise ConfigError(f"floor cosine must be in (0, 1]; got {floor}")


def conclude(rows: list[LayerRow], floor: float
             ) -> tuple[LayerRow | None, LayerRow | None, list[str]]:
    """The rule, on rows in topological / execution order whose ``inputs`` name the rows they
    depend on directly: ranks them by own SQNR (in place; ties: the earlier row first) and returns
    (the named row or None, the first row below the floor or None, the worst five's tensors)."""
    for rank, r in enumerate(sorted(rows, key=lambda r: (r.own_sqnr_db, r.index)), start=1):
        r.rank = rank
    by_tensor = {r.tensor: r for r in rows}
    first = next((r for r in rows if r.cosine < floor), None)
    named = None
    if first is not None:
        cone, stack = set(), [first.tensor]
        while stack:
            t = stack.pop()
            if t in cone or t not in by_tensor:
                continue
            cone.add(t)
            stack.extend(by_tensor[t].inputs)
        named = min((by_tensor[t] for t in cone), key=lambda r: r.rank)
    worst = [r.tensor for r in sorted(rows, key=lambda r: r.rank)[:5]]
    return named, first, worst


# --------------------------------------------------------------------------------------------
# the localization (ONNX Runtime path)
# --------------------------------------------------------------------------------------------

def localize_graphs(quantized: str | Path | onnx.ModelProto, fp32: str | Path | onnx.ModelProto,
                    batches, *, input_name: str | None = None, floor: float = 0.99,
                    recipe: str = "", mode: str = "", calibrator: str | None = None,
                    quantized_tensors=None, path: str = "onnxruntime") -> Localization:
    """Localize on two ONNX graphs over ``(inputs, targets, real count)`` batches (see the module
    docstring for the rule). ``quantized`` may be any Q/DQ graph, e.g. a planted one.

    ``quantized_tensors(names) -> (batch -> {name: array})`` supplies the quantized side's values of
    the compared tensors from elsewhere - the TensorRT backend's engine with those tensors marked
    as debug tensors (``TensorRTBackend.debug_tensors``); ``path`` names it. Default: ONNX Runtime
    with the tensors exposed as graph outputs. Own SQNR is always the quantized graph's node on
    ONNX Runtime (what the layer's Q/DQ does by itself)."""
    from qatcheck.backends.onnxruntime_backend import OrtRunner

    check_floor(floor)
    t0 = time.perf_counter()
    qpath = str(quantized) if not isinstance(quantized, onnx.ModelProto) else "(in memory)"
    fpath = str(fp32) if not isinstance(fp32, onnx.ModelProto) else "(in memory)"
    qmodel = quantized if isinstance(quantized, onnx.ModelProto) else onnx.load(str(quantized))
    fmodel = fp32 if isinstance(fp32, onnx.ModelProto) else onnx.load(str(fp32))
    tensors, skipped = _candidates(qmodel, fmodel)
    if not tensors:
        raise ConfigError(f"the quantized graph {qpath} and the fp32 graph {fpath} share no "
                          "intermediate tensor (same name and shape) to compare")
    if quantized_tensors is None:
        quantized_tensors = (lambda names: OrtRunner(expose_tensors(qmodel, names), input_name=input_name,
                                                     provider="CPUExecutionProvider").named_outputs)
    quantized_values = quantized_tensors(list(tensors))
    frun = OrtRunner(expose_tensors(fmodel, tensors), provider="CPUExecutionProvider",
                     input_name=input_name)
    producer = {o: node for node in qmodel.graph.node for o in node.output}
    graph_inputs = {v.name for v in qmodel.graph.input} - {i.name for i in qmodel.graph.initializer}
    compared = set(tensors)
    memo: dict[str, tuple[str, ...]] = {}

    def boundary(t: str) -> tuple[str, ...]:
        """The compared tensors and graph inputs tensor ``t`` is computed from, walking back
        through Q/DQ and uncompared nodes (weights and constants are part of the layer)."""
        if t in compared or t in graph_inputs:
            return (t,)
        if t not in memo:
            node = producer.get(t)
            memo[t] = () if node is None else _node_boundary(node)
        return memo[t]

    def _node_boundary(node) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b for i in node.input if i for b in boundary(i)))

    # each layer alone: the quantized graph's node (with its input / weight Q/DQ) fed fp32 inputs
    extractor = onnx.utils.Extractor(shape_inference.infer_shapes(qmodel))
    isolated: dict[str, tuple[object, dict[str, np.dtype]]] = {}
    for t in tensors:
        feeds = list(_node_boundary(producer[t]))
        if feeds:
            sub = extractor.extract_model(feeds, [t])
            sess = OrtRunner(sub, provider="CPUExecutionProvider").session
            isolated[t] = (sess, _feed_types(sess))

    accs = {t: _Acc() for t in tensors}
    own = {t: _Acc() for t in isolated}
    samples = 0
    for x, _, n in batches:
        qo = quantized_values(x)
        fo = frun.named_outputs(x)
        ref = {**fo, **{name: np.ascontiguousarray(x, dtype=np.float32) for name in graph_inputs}}
        for t in tensors:
            r, o = np.asarray(fo[t])[:n], np.asarray(qo[t])[:n]
            if r.shape != o.shape:
                raise ConfigError(f"tensor {t!r} has shape {o.shape} in the quantized graph and "
                                  f"{r.shape} in the fp32 graph")
            accs[t].update(r, o)
            if t in isolated:
                sess, feeds = isolated[t]
                (y,) = sess.run([t], {f: np.asarray(ref[f], dtype=dt) for f, dt in feeds.items()})
                own[t].update(r, np.asarray(y, dtype=np.float32)[:n])
        samples += n
    if samples == 0:
        raise DataError("localize: the eval data yielded no samples")

    rows = []
    fproducer = {o: node for node in fmodel.graph.node for o in node.output}
    for idx, t in enumerate(tensors):
        node = producer[t]
        deps = [d for d in _node_boundary(node) if d in compared]
        # named by the fp32 graph's node: the fp16 conversion's casts (graph outputs, nodes kept
        # in fp32) take over the names of the tensors they convert
        node = fproducer.get(t, node)
        sq = accs[t].sqnr_db()
        sq_in = min((accs[d].sqnr_db() for d in deps), default=_CAP_DB)
        own_db = own[t].sqnr_db() if t in own else _CAP_DB
        rows.append(LayerRow(index=idx, tensor=t, node=node.name, op=node.op_type,
                             layer=module_name_of(node.name) or node.name, sqnr_db=sq,
                             cosine=accs[t].cosine(), input_sqnr_db=sq_in, drop_db=sq_in - sq,
                             own_nsr=_nsr(own_db), own_sqnr_db=own_db, inputs=deps))
    named, first, worst = conclude(rows, floor)
    return Localization(recipe=recipe, mode=mode, calibrator=calibrator, samples=samples,
                        floor=floor, quantized=qpath, fp32=fpath, rows=rows,
                        named=named.layer if named else None,
                        named_tensor=named.tensor if named else None,
                        first_below_floor=first.tensor if first else None, worst=worst,
                        skipped=list(dict.fromkeys(skipped)),
                        seconds=time.perf_counter() - t0, path=path, order="topological",
                        method=(f"Quantized graph `{qpath}` vs fp32 `{fpath}` on ONNX Runtime (CPU) "
                                "at the opt shape" if path == "onnxruntime" else
                                f"Quantized side from {path} (the case's engine, the compared tensors "
                                f"marked as debug tensors; own SQNR: `{qpath}`'s node on ONNX Runtime) "
                                f"vs fp32 `{fpath}` on ONNX Runtime (CPU) at the opt shape"))


def path_for(recipe, mode: str, path: str | None = None) -> str:
    """Where ``mode`` is localized: ``path`` when given and possible, else its graph where it is
    made from the fp32 export (and always for an ONNX-only recipe), else its PyTorch module."""
    from qatcheck.recipe import NO_TORCH, is_onnx_only

    if mode not in modes():
        raise ConfigError(f"localize: mode {mode!r} is not a low-precision mode; choose one of "
                          f"{', '.join(modes())}")
    if path is not None and path not in PATHS:
        raise ConfigError(f"localize: path {path!r}: choose one of {', '.join(PATHS)}")
    can = list(localization_paths(mode))
    if recipe is not None and is_onnx_only(recipe):
        can = [p for p in can if p == "onnx"]
        if not can:
            raise ConfigError(f"localize: mode {mode!r} of Recipe({recipe.name}): {NO_TORCH}")
    if path is None:
        return can[0]
    if path not in can:
        raise ConfigError(f"localize: mode {mode!r} cannot be localized on the {path} path; it can on "
                          f"{' / '.join(can)}")
    return path


def with_mode_calibrator(recipe, mode: str, calibrator: str | None):
    """The recipe with ``mode``'s calibrator (its row's ``calibrator_field``) replaced."""
    from dataclasses import replace

    if calibrator is None:
        return recipe
    field_ = mode_spec(mode).calibrator_field
    if field_ is None:
        raise ConfigError(f"localize: mode {mode!r} is not calibrated; --calibrator does not apply")
    return replace(recipe, quant=replace(recipe.quant, **{field_: calibrator}))


def calibrator_of(recipe, mode: str) -> str | None:
    field_ = mode_spec(mode).calibrator_field
    return getattr(recipe.quant, field_) if field_ else None


def localize(recipe, mode: str = "trt_ptq", *, quantized_onnx: str | Path | None = None,
             max_samples: int | None = 64, floor: float = 0.99,
             cache_dir: str | Path = ".qatcheck_cache", calibrator: str | None = None,
             device: str | None = None, path: str | None = None) -> Localization:
    """Localize ``recipe``'s ``mode`` (a Recipe, or a :class:`~qatcheck.workspace.RecipeWorkspace`:
    its cache and device) against fp32 on the first ``max_samples`` eval samples, on
    ``path`` (:func:`path_for`: ``onnx`` for the modes made from the fp32 export, else ``torch``).
    ``onnx``: the mode's graph (from the artifact builder, or ``quantized_onnx`` when given: e.g. a
    planted graph) vs the fp32 ONNX on ONNX Runtime, at the opt shape. ``torch``: the mode's
    PyTorch module vs the recipe's fp32 model, on ``device`` (None: the workspace's; cpu)
    (:func:`qatcheck.analysis.localize_torch.localize_torch`)."""
    from qatcheck.workspace import workspace_of

    ws = workspace_of(recipe, cache_dir, device=device)
    path = path_for(ws.recipe, mode, path)
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1; got {max_samples}")
    check_floor(floor)
    ws = ws.derive(with_mode_calibrator(ws.recipe, mode, calibrator))
    recipe = ws.recipe
    if path == "torch":
        if quantized_onnx is not None:
            raise ConfigError(f"localize: --onnx gives a graph for the onnx path "
                              f"({' / '.join(onnx_modes())}); {mode} is localized on its PyTorch module here")
        from qatcheck.analysis.localize_torch import localize_torch

        return localize_torch(ws, mode, max_samples=max_samples, floor=floor)
    builder = ws.builder
    qpath = Path(quantized_onnx) if quantized_onnx is not None else builder.onnx_artifact(mode).path
    fpath = builder.onnx_artifact("fp32").path
    batches = ws.eval_batches(pad=True, max_samples=max_samples)
    return localize_graphs(qpath, fpath, batches, input_name=recipe.input.name, floor=floor,
                           recipe=recipe.name, mode=mode, calibrator=calibrator_of(recipe, mode))


class AutoLocalization:
    """The automatic localizations of one test session (one process; each pytest-xdist worker has
    its own): each distinct artifact is localized once - a failed case whose artifact is
    byte-identical to one already localized (``partial`` keeping nothing is ``trt_ptq``) gets the
    first one's lines, saying so - and together they take at most ``budget_s`` seconds
    (``--qatcheck-localize-budget``; None: no limit). A localization stops reading eval batches
    when the budget runs out (the batch under way finishes); once it is spent, a failure gets the
    command that localizes its case instead."""

    def __init__(self, budget_s: float | None = None) -> None:
        self.budget_s = budget_s
        self.spent = 0.0
        #: key (what the localization compared: the artifacts' digests, floor, samples) -> (the
        #: case it was made for, its lines)
        self.done: dict[tuple, tuple[str, list[str]]] = {}

    def lines(self, case_id: str, key: tuple, localize, reports_dir: str | Path, command: str) -> list[str]:
        """The failure message's lines for ``case_id``: ``localize(until)`` runs the localization
        over ``until(batches)`` (the budget's cut), unless ``key`` was localized already or the
        budget is spent; ``command`` localizes the case outside pytest."""
        if key in self.done:
            first, lines = self.done[key]
            return [f"(the localization of {first}: this case's artifact is byte-identical, so it was "
                    "not localized again)", *lines]
        left = None if self.budget_s is None else self.budget_s - self.spent
        if left is not None and left <= 0:
            return [f"(not localized: this run's --qatcheck-localize-budget of {self.budget_s:g} s is spent; "
                    f"localize it with: {command})"]
        t0 = time.monotonic()
        cut: list[int] = []

        def until(batches):
            for i, batch in enumerate(batches):
                if i and left is not None and time.monotonic() - t0 > left:
                    cut.append(i)
                    return
                yield batch

        try:
            loc = localize(until)
            lines = failure_lines(loc, reports_dir)
        finally:
            self.spent += time.monotonic() - t0
        if cut:
            lines.append(f"(localized on its first {loc.samples} samples only: the "
                         f"--qatcheck-localize-budget of {self.budget_s:g} s ran out; all of them: {command})")
        self.done[key] = (case_id, lines)
        return lines


def localize_command(view, max_samples: int, floor: float, *extra: str) -> str:
    """``python -m qatcheck localize ...`` for a failed case (a CaseView), where pytest did not localize it."""
    import shlex

    case = view.case
    args = ["python", "-m", "qatcheck", "localize", "--recipe", f"<module:function returning Recipe({case.recipe})>",
            "--mode", case.mode, *extra, "--max-samples", str(max_samples), "--floor-cosine", f"{floor:g}",
            "--cache", str(view.cache_dir), "--reports", str(view.reports_dir)]
    return " ".join(shlex.quote(a) for a in args)


def for_failed_case(view, max_samples: int = 32, auto: AutoLocalization | None = None) -> list[str]:
    """Localization run automatically when a case's parity fails (the plugin calls it with the
    case's :class:`~qatcheck.workspace.CaseView`): the
    case's own low-precision model vs the recipe's fp32 model on its first ``max_samples`` eval
    samples, the case's parity floor as the per-layer floor; reports written next to the recipe's.
    Returns the lines the failure message adds: nothing for modes it cannot localize or dynamic
    cases. A mode with a PyTorch form on the torch backend (fp16, torch_ptq, qat, fp8), or without
    a graph made from the fp32 export: in PyTorch
    (:func:`qatcheck.analysis.localize_torch.for_failed_case`); a graph made from the fp32 export
    on a graph backend (fp16, trt_ptq, partial): the case's own graph on ONNX Runtime. ``auto``: the
    session's budget and the localizations already made (None: no limit, no reuse)."""
    from qatcheck.backends import executes

    auto = auto or AutoLocalization()
    case = view.case
    if case.shape:
        return []
    if case.mode in torch_modes() and (executes(case.backend) == "torch" or case.mode not in onnx_modes()):
        from qatcheck.analysis import localize_torch

        return localize_torch.for_failed_case(view, max_samples, auto)
    if case.mode not in onnx_modes():
        return []
    runner = view.runner
    qpath = getattr(runner, "artifact_path", None)
    if qpath is None:
        return []
    recipe = view.recipe
    builder = view.builder
    floor = failure_floor(view)
    batches = view.workspace.eval_batches(max_samples=max_samples)
    debug = view.debug_tensors
    if debug is not None:  # TensorRT: the engine's own intermediate values (debug tensors)
        qpath = builder.onnx_artifact(case.mode).path  # own SQNR: the mode's graph's nodes
        path = f"{case.backend} debug tensors"
        # the engine: its plan key holds the graph's digest and everything else that built it
        quantized = getattr(getattr(runner, "plan", None), "cache_key", "") or builder.onnx_artifact(case.mode).digest
    else:
        path, quantized = "onnxruntime", file_digest(qpath)
    fp32 = builder.onnx_artifact("fp32")

    def localize(until):
        kwargs = dict(quantized_tensors=debug(), path=path) if debug is not None else {}
        return localize_graphs(qpath, fp32.path, until(batches), input_name=recipe.input.name,
                               floor=floor, recipe=recipe.name, mode=case.mode,
                               calibrator=calibrator_of(recipe, case.mode), **kwargs)

    return auto.lines(case.id, (path, quantized, fp32.digest, floor, max_samples), localize,
                      view.reports_dir,
                      localize_command(view, max_samples, floor, "--path", "onnx", "--onnx", str(qpath)))


def failure_floor(view) -> float:
    """The per-layer floor of an automatic localization: the case's parity cosine floor."""
    thresholds = view.thresholds
    return thresholds.min_cosine if thresholds is not None else 0.99


def failure_lines(loc: Localization, reports_dir: str | Path) -> list[str]:
    """Write the reports; the lines a failed parity check adds to its message."""
    files = write_reports(loc, reports_dir)
    return [verdict(loc), f"per-layer table: {files[1] if len(files) > 1 else files[0]}"]


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------

def _where(r: LayerRow) -> str:
    """``layer (tensor)``, or just the layer when the row's key is its name (torch path)."""
    return r.layer if r.tensor == r.layer else f"{r.layer} ({r.tensor})"


def verdict(loc: Localization) -> str:
    head = f"localize {loc.recipe} {loc.mode} ({loc.samples} samples, floor cosine {loc.floor:g}): "
    worst = loc.row(loc.worst[0]) if loc.worst else None
    if loc.named is None:
        w = (f"; largest contribution {_where(worst)}: own SQNR {worst.own_sqnr_db:.1f} dB"
             if worst else "")
        return head + "no layer below the floor" + w
    r = loc.row(loc.named_tensor)
    f = loc.row(loc.first_below_floor)
    return (head + f"damage enters at {_where(r)}: own SQNR {r.own_sqnr_db:.1f} dB, "
            f"SQNR {r.input_sqnr_db:.1f} -> {r.sqnr_db:.1f} dB, cosine {r.cosine:.4f}; first "
            f"below the floor: {_where(f)}, cosine {f.cosine:.4f}")


def worst_line(loc: Localization) -> str:
    return "worst five by contribution: " + ", ".join(
        f"{loc.row(t).layer} ({loc.row(t).own_sqnr_db:.1f} dB)" for t in loc.worst)


def table_rows(loc: Localization) -> tuple[list[str], list[list[str]]]:
    quant_only = any(r.quant_only_sqnr_db is not None for r in loc.rows)
    header = ["#", "layer", "tensor" if loc.path == "onnxruntime" else "call", "op", "SQNR dB",
              "cosine", "in SQNR dB", "drop dB", "own SQNR dB"]
    header += ["quant-only dB"] if quant_only else []
    header += ["rank", ""]
    rows = []
    for r in loc.rows:
        mark = []
        if r.tensor == loc.named_tensor:
            mark.append("NAMED")
        if r.tensor == loc.first_below_floor:
            mark.append("first < floor")
        elif r.cosine < loc.floor:
            mark.append("< floor")
        if r.own_after:
            mark.append(f"own after {r.own_after}")
        row = [str(r.index), r.layer, r.tensor, r.op, f"{r.sqnr_db:.2f}", f"{r.cosine:.5f}",
               f"{r.input_sqnr_db:.2f}", f"{r.drop_db:.2f}", f"{r.own_sqnr_db:.2f}"]
        if quant_only:
            row.append("" if r.quant_only_sqnr_db is None else f"{r.quant_only_sqnr_db:.2f}")
        rows.append(row + [str(r.rank), ", ".join(mark)])
    return header, rows


def markdown_report(loc: Localization) -> str:
    out = [f"# {loc.recipe}: {loc.mode} damage localization\n",
           f"{loc.method}.\n", f"First {loc.samples} eval samples"
           + (f", calibrator {loc.calibrator}" if loc.calibrator else "") + f"; rows in {loc.order} order.\n",
           f"Rule: {loc.rule}.\n", f"**{verdict(loc)}**\n", markdown_table(*table_rows(loc))]
    worst = [loc.row(t) for t in loc.worst]
    out.append("\nWorst five by contribution: " + ", ".join(
        f"{r.layer} ({r.own_sqnr_db:.1f} dB)" for r in worst) + "\n")
    if loc.skipped:
        what = "tensors" if loc.path == "onnxruntime" else "module calls"
        out.append(f"\nNot compared (in one model only, or another shape): {len(loc.skipped)} {what}"
                   + (f": {', '.join(loc.skipped[:12])}" if loc.path != "onnxruntime" else "") + ".\n")
    return "\n".join(out)


def _plot(loc: Localization, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from qatcheck.fsutil import atomic_path

    rows = loc.rows
    xs = np.arange(len(rows))
    colors = ["tab:red" if r.tensor == loc.named_tensor else "tab:blue" for r in rows]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(rows) + 2), 7), sharex=True)
    a1.bar(xs, [r.sqnr_db for r in rows], color=colors)
    a1.plot(xs, [r.input_sqnr_db if r.input_sqnr_db < _CAP_DB else np.nan for r in rows],
            "k.--", lw=0.8, label="worst input SQNR")
    a1.set_ylabel("SQNR vs fp32 (dB)")
    a1.legend(loc="upper right", fontsize=8)
    a1.set_title(verdict(loc), fontsize=8, wrap=True)
    # exact layers (no Q/DQ of their own: ReLU, pooling...) have no bar
    a2.bar(xs, [r.own_sqnr_db if r.own_sqnr_db < _CAP_DB else np.nan for r in rows], color=colors)
    a2.set_ylabel("own SQNR (dB, lower = adds more;\nno bar: exact)")
    a2.set_xticks(xs)
    a2.set_xticklabels([r.layer or r.node for r in rows], rotation=75, ha="right", fontsize=7)
    a2.set_xlabel(f"{loc.order} order")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_reports(loc: Localization, reports_dir: str | Path) -> list[Path]:
    """``<recipe>-localize-<mode>.json``, ``.md`` and ``.png`` in ``reports_dir`` (``-torch`` after
    the mode for the PyTorch path of a mode that has both)."""
    d = Path(reports_dir)
    d.mkdir(parents=True, exist_ok=True)
    # a mode localized on both paths (fp16) keeps the torch path's reports apart
    both = loc.path == "torch" and loc.mode in onnx_modes()
    stem = f"{loc.recipe}-localize-{loc.mode}" + ("-torch" if both else "")
    j, m, p = d / f"{stem}.json", d / f"{stem}.md", d / f"{stem}.png"
    write_text_atomic(j, json.dumps({**loc.to_json(), "verdict": verdict(loc)}, indent=1))
    write_text_atomic(m, markdown_report(loc))
    _plot(loc, p)
    return [j, m, p]
