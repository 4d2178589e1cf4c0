"""Editing a calibrated Q/DQ ONNX graph: which layers are quantized, and taking layers back to
higher precision without recalibrating.

The sensitivity profile derives each of its variants from the one cached ``trt_ptq`` graph with
:func:`strip_qdq` instead of re-running :func:`qatcheck.quantize.onnx_ptq.quantize_onnx` per layer.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import onnx

from qatcheck.quantize.onnx_ptq import QUANTIZABLE_OPS, module_name_of, resolve_layers

__all__ = ["quantized_layers", "strip_qdq"]


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


def strip_qdq(model: onnx.ModelProto, layers: Iterable[str],
              inputs: Sequence[int] = (0, 1)) -> onnx.ModelProto:
    """A copy of a Q/DQ ONNX with the given layers back in higher precision.

    ``layers`` are ONNX node names or PyTorch module names (as in ``OnnxPTQConfig.exclude``); an
    entry that matches no Conv/ConvTranspose/Gemm/MatMul node is a :class:`ConfigError` naming it.
    Each matched node's ``inputs`` (default 0 and 1: activation and weight; ``(0,)`` takes back
    only the activation) that come from QuantizeLinear -> DequantizeLinear are rewired to the
    tensor before the pair; pairs (and their scale / zero-point initializers) that nothing uses
    any more are dropped, while a pair shared with a still-quantized layer stays. On
    a model made by :func:`qatcheck.quantize.onnx_ptq.quantize_onnx` the result computes exactly what
    ``quantize_onnx(..., exclude=layers)`` would, without recalibrating: activation ranges are per
    tensor and calibrated on the fp32 graph, so they do not depend on which other layers are
    quantized.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    targets = {n for hits in resolve_layers(out, list(layers)).values() for n in hits}
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name not in targets:
            continue
        for i in inputs:
            if i >= len(node.input):
                continue
            dq = producer.get(node.input[i])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    _drop_dead_qdq(graph)
    return out


def _drop_dead_qdq(graph: onnx.GraphProto) -> None:
    """Remove Q/DQ (and Constant) nodes whose outputs nothing reads, repeatedly (a dead DQ makes
    its Q dead), then the initializers nothing reads any more."""
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
