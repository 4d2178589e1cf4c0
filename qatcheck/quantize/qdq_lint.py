"""Lint of an exported Q/DQ ONNX graph against TensorRT's placement rules for Adds and Concats.

What TensorRT wants from explicit quantization (its "Q/DQ layer placement" recommendations), checked
on the graph a backend actually receives:

* ``add_unquantized_input`` - an ``Add`` of two activations (a residual Add) with an input that is
  not the output of a ``DequantizeLinear``. TensorRT fuses a residual Add into the int8 conv that
  produces one of its inputs only when both inputs are quantized; otherwise the Add and often the
  conv around it run in higher precision. Adds with a constant input (bias-like) are not residual
  Adds and are skipped.
* ``concat_scale_mismatch`` - a ``Concat`` whose inputs come from ``DequantizeLinear`` nodes with
  different scales (or zero points). TensorRT can only concatenate int8 tensors in place when they
  share one scale; otherwise it re-quantizes between int8 tensors.
* ``concat_unquantized_input`` - a ``Concat`` in the int8 part of the graph (one of its inputs is
  dequantized, or its output feeds a ``QuantizeLinear``) with an input that is not the output of a
  ``DequantizeLinear``. Concats of plain fp32 tensors (e.g. a head's outputs) are not findings.

Only *direct* producers count: an input reaching the op through a Reshape or a MaxPool is
unquantized for this lint, which is what the placement rules of :mod:`qatcheck.quantize.qdq_rules`
produce (every Concat input passes through the shared quantizer).

The report also counts the graph's QuantizeLinear / DequantizeLinear nodes and Q->DQ pairs
(activation pairs vs weight pairs, whose Q reads a constant).

    python -m qatcheck lint model.onnx [--ignore REGEX ...]     # exit 1 when there are findings
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from qatcheck.errors import ArtifactError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["Finding", "LintReport", "lint_qdq", "FINDING_KINDS", "QDQGraph", "load_qdq_model"]

FINDING_KINDS = ("concat_scale_mismatch", "concat_unquantized_input", "add_unquantized_input")


@dataclass(frozen=True)
class Finding:
    """One violation: the node, its op, the input tensors concerned and, per input, the scale of
    the ``DequantizeLinear`` producing it (None when it is not produced by one)."""

    kind: str
    node: str
    op: str
    inputs: tuple[str, ...]
    scales: tuple[float | None, ...]
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class LintReport:
    """Findings plus Q/DQ counts of one graph. ``ok`` is True when there is no finding."""

    source: str
    findings: list[Finding] = field(default_factory=list)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    qdq_pairs: int = 0
    activation_pairs: int = 0
    weight_pairs: int = 0
    concats: int = 0
    adds: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def by_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def summary(self) -> str:
        counts = ", ".join(f"{len(self.by_kind(k))} {k}" for k in FINDING_KINDS if self.by_kind(k))
        return (f"{self.source}: {len(self.findings)} finding(s)" + (f" ({counts})" if counts else "")
                + f"; {self.qdq_pairs} Q/DQ pairs ({self.activation_pairs} activation, {self.weight_pairs} "
                  f"weight), {self.quantize_nodes} QuantizeLinear, {self.dequantize_nodes} DequantizeLinear; "
                  f"{self.concats} Concat, {self.adds} Add checked")

    def __str__(self) -> str:
        return "\n".join([self.summary(), *(f"  {f}" for f in self.findings)])


def _fmt(scale: float | None) -> str:
    return "unquantized" if scale is None else f"{scale:.6g}"


class QDQGraph:
    """A Q/DQ graph's lookup tables: constants (initializers and Constant nodes), each tensor's
    producer and consumers. Shared with :mod:`qatcheck.quantize.structure`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                    elif a.name in ("value_float", "value_floats"):
                        self.consts[n.output[0]] = np.asarray(a.f if a.name == "value_float" else list(a.floats),
                                                              np.float32)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_inputs = {i.name for i in g.input} - set(self.consts)

    def is_constant(self, tensor: str) -> bool:
        if tensor in self.consts:
            return True
        p = self.producer.get(tensor)
        # a constant weight fed through Q/DQ is still a constant (per-channel weights, biases)
        return p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear", "Cast", "Identity") \
            and bool(p.input) and self.is_constant(p.input[0])

    def dq_params(self, tensor: str) -> tuple[tuple, tuple] | None:
        """(scale, zero point) of the DequantizeLinear producing ``tensor``, else None."""
        p = self.producer.get(tensor)
        if p is None or p.op_type != "DequantizeLinear":
            return None
        scale = self.consts.get(p.input[1]) if len(p.input) > 1 else None
        zero = self.consts.get(p.input[2]) if len(p.input) > 2 and p.input[2] else None
        s = tuple(np.asarray(scale, np.float64).ravel().tolist()) if scale is not None else (p.input[1],)
        z = tuple(np.asarray(zero).ravel().tolist()) if zero is not None else (0,)
        return s, z


def load_qdq_model(model_or_path: str | os.PathLike[str] | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A loaded model (returned as is) or an ONNX file, with a name for messages."""
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, model_or_path.graph.name or "<model>"
    path = Path(model_or_path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ONNX file")
    try:
        return onnx.load(str(path)), str(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise ArtifactError(f"{path}: cannot read ONNX model: {exc}") from exc


def _scale_value(params: tuple[tuple, tuple] | None) -> float | None:
    """The (first) scale of a DequantizeLinear producer; NaN when the scale is not a constant."""
    if params is None:
        return None
    s = params[0]
    return float(s[0]) if s and isinstance(s[0], float) else float("nan")


def lint_qdq(model_or_path: str | os.PathLike[str] | onnx.ModelProto,
             ignore: Sequence[str] = ()) -> LintReport:
    """Lint a Q/DQ ONNX model (a path or a loaded ``onnx.ModelProto``); see the module doc.

    ``ignore``: regexes searched in node names (``"/model.22/"``) whose Adds / Concats are not
    checked. Unreadable files are an ArtifactError naming the file."""
    patterns = []
    for p in ignore:
        try:
            patterns.append(re.compile(p))
        except re.error as exc:
            raise ConfigError(f"lint ignore pattern {p!r} is not a valid regex: {exc}") from None
    model, source = load_qdq_model(model_or_path)
    g = QDQGraph(model)
    report = LintReport(source=source)
    for n in g.nodes:
        if n.op_type == "QuantizeLinear":
            report.quantize_nodes += 1
            paired = any(c.op_type == "DequantizeLinear" for c in g.consumers.get(n.output[0], []))
            if paired:
                report.qdq_pairs += 1
                if g.is_constant(n.input[0]):
                    report.weight_pairs += 1
                else:
                    report.activation_pairs += 1
        elif n.op_type == "DequantizeLinear":
            report.dequantize_nodes += 1
    for index, n in enumerate(g.nodes):
        if n.op_type not in ("Concat", "Add"):
            continue
        name = n.name or f"{n.op_type}_{index}"
        if any(p.search(name) for p in patterns):
            continue
        if n.op_type == "Add":
            acts = [i for i in n.input if i and not g.is_constant(i)]
            if len(acts) < 2:
                continue
            report.adds += 1
            params = [g.dq_params(i) for i in acts]
            bad = [i for i, p in zip(acts, params) if p is None]
            if bad:
                scales = tuple(_scale_value(p) for p in params)
                report.findings.append(Finding(
                    "add_unquantized_input", name, "Add", tuple(bad), scales,
                    f"Add {name}: input(s) {', '.join(bad)} not produced by DequantizeLinear (scales: "
                    f"{', '.join(f'{i}={_fmt(s)}' for i, s in zip(acts, scales))}); quantize both inputs "
                    "of a residual Add"))
            continue
        inputs = [i for i in n.input if i]
        params = [g.dq_params(i) for i in inputs]
        out_quantized = any(c.op_type == "QuantizeLinear" for c in g.consumers.get(n.output[0], []))
        if all(p is None for p in params) and not out_quantized:
            continue  # an fp32 Concat (e.g. of head outputs): not part of the int8 graph
        report.concats += 1
        scales = tuple(_scale_value(p) for p in params)
        listing = ", ".join(f"{i}={_fmt(s)}" for i, s in zip(inputs, scales))
        bad = [i for i, p in zip(inputs, params) if p is None]
        if bad:
            report.findings.append(Finding(
                "concat_unquantized_input", name, "Concat", tuple(bad), scales,
                f"Concat {name}: input(s) {', '.join(bad)} not produced by DequantizeLinear in an int8 "
                f"Concat (scales: {listing}); give every input the Concat's shared quantizer"))
        distinct = {p for p in params if p is not None}
        if len(distinct) > 1:
            report.findings.append(Finding(
                "concat_scale_mismatch", name, "Concat", tuple(i for i, p in zip(inputs, params) if p is not None),
                scales, f"Concat {name}: inputs carry {len(distinct)} different scales ({listing}); "
                        "TensorRT must re-quantize - share one quantizer for all inputs"))
    return report
