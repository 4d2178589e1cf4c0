"""Localize where low precision (int8, fp16, fp8) departs from fp32 in a model (issue #13, item 2;
issue 21, item 9).

This module holds the entry points that dispatch on the mode (:func:`localize`,
:func:`for_failed_case`) and the ONNX Runtime path for the graphs made from the fp32 export
(:func:`onnx_modes`: ``fp16``, ``trt_ptq``, ``partial``). What both paths share - the result types
(:class:`LayerRow`, :class:`Localization`), the naming rule (:func:`conclude`), the accumulators,
the JSON / Markdown / PNG reports - is the kernel, :mod:`qatcheck.analysis.localize_kernel`
(its names are re-exported here). The PyTorch path for the modes with a PyTorch form (:func:`torch_modes`:
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
topological order, with its SQNR (dB, :meth:`qatcheck.parity.ParityAccumulator.sqnr_db`) and cosine
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

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx.utils
from onnx import helper, shape_inference

from qatcheck.analysis.localize_kernel import (  # noqa: F401 (the kernel's names, re-exported)
    _CAP_DB, PATHS, RULE, AutoLocalization, LayerRow, Localization, calibrator_of, check_floor, conclude,
    failure_floor, failure_lines, layer_row, localization, localize_command, markdown_report, modes,
    onnx_modes, path_for, table_rows, torch_modes, verdict, with_mode_calibrator, worst_line, write_reports)
from qatcheck.errors import ConfigError, DataError
from qatcheck.fsutil import file_digest
from qatcheck.parity import ParityAccumulator
from qatcheck.quantize.onnx_ptq import module_name_of

__all__ = ["LayerRow", "Localization", "localize", "localize_graphs", "write_reports",
           "table_rows", "verdict", "expose_tensors", "conclude", "for_failed_case", "AutoLocalization", "RULE",
           "onnx_modes", "torch_modes", "modes", "PATHS"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


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

    accs = {t: ParityAccumulator() for t in tensors}
    own = {t: ParityAccumulator() for t in isolated}
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
        rows.append(layer_row(idx, t, node.name, node.op_type, module_name_of(node.name) or node.name,
                              accs[t], own.get(t), min((accs[d].sqnr_db() for d in deps), default=_CAP_DB),
                              deps))
    return localization(rows, floor, skipped, t0, recipe=recipe, mode=mode, calibrator=calibrator,
                        samples=samples, quantized=qpath, fp32=fpath, path=path, order="topological",
                        method=(f"Quantized graph `{qpath}` vs fp32 `{fpath}` on ONNX Runtime (CPU) "
                                "at the opt shape" if path == "onnxruntime" else
                                f"Quantized side from {path} (the case's engine, the compared tensors "
                                f"marked as debug tensors; own SQNR: `{qpath}`'s node on ONNX Runtime) "
                                f"vs fp32 `{fpath}` on ONNX Runtime (CPU) at the opt shape"))


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


