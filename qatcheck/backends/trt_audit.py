"""Precision audit of a TensorRT engine, from the engine inspector's JSON.

``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` on an engine built with
``ProfilingVerbosity.DETAILED`` returns ``{"Layers": [...], "Bindings": [...]}``; each layer has
``Name``, ``LayerType`` (the implementation: ``CaskConvolution``, ``Reformat``, ``NoOp``, ...),
usually ``ParameterType`` (the logical layer: ``Convolution``, ``MatrixMultiply``, ``Reformat``),
``Inputs`` / ``Outputs`` (each with ``Format/Datatype``, e.g. ``"Row major linear FP32"``,
``"Thirty-two wide channel vectorized row major Int8 format"``, ``"Half(64,1:8,...)"`` or, for
dynamic shapes, ``"N/A due to dynamic shapes"``), ``Weights``/``Bias`` (``{"Type": "Int8",
"Count": n}``), ``TacticName``, ``Metadata`` (``"[ONNX Layer: /stem/conv/Conv]"``, several joined
for fused layers) and, in recent versions, ``Origin`` (``"QDQ"`` for layers made from Q/DQ nodes,
``"REFORMAT"`` for inserted reformats). With LAYER_NAMES_ONLY verbosity ``Layers`` is a list of
names and no precision can be read: the audit says so.

The layer's precision is read, in order, from its weights' type, its first input's format, its
first output's format and finally its tactic name (the format is ``N/A`` under dynamic shapes).
This mirrors trt-engine-explorer (trex), which takes a layer's precision from its first input.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

#: type tokens in formats / weight types -> precision
_TOKENS = (
    ("int8", re.compile(r"\b(?:Int8|INT8)\b")),
    ("fp16", re.compile(r"\b(?:FP16|Half)\b")),
    ("bf16", re.compile(r"\b(?:BFloat16|BF16)\b")),
    ("fp8", re.compile(r"\bFP8\b")),
    ("fp32", re.compile(r"\b(?:FP32|Float)\b")),
    ("int32", re.compile(r"\b(?:Int32|INT32)\b")),
    ("int64", re.compile(r"\b(?:Int64|INT64)\b")),
    ("bool", re.compile(r"\b(?:BOOL|Bool)\b")),
)
#: tactic-name hints, tried last (cask/xmma kernel names spell their input types)
_TACTIC_HINTS = (
    ("int8", re.compile(r"i8i8|i8f32|int8|imma|_i8_", re.I)),
    ("fp16", re.compile(r"f16f16|h16|fp16|hmma|884|1688|_f16_", re.I)),
    ("fp32", re.compile(r"f32f32|sgemm|scudnn|fp32|tf32", re.I)),
)
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
PRECISIONS = ("int8", "fp16", "bf16", "fp8", "fp32", "int32", "int64", "bool", "unknown")
KINDS = ("conv", "gemm", "reformat", "qdq", "noop", "other")


class PrecisionAuditError(AssertionError):
    """A recipe's precision expectation does not hold for the engine (an AssertionError, so a
    pytest test that calls the assertion fails rather than errors)."""


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str  # conv | gemm | reformat | qdq | noop | other
    layer_type: str
    precision: str
    precision_from: str  # weights | input | output | tactic | none
    onnx_nodes: tuple[str, ...] = ()
    tactic: str = ""


@dataclass
class PrecisionAudit:
    layers: list[LayerInfo]
    verbosity: str = "detailed"  # detailed | names-only
    notes: list[str] = field(default_factory=list)

    @property
    def compute_layers(self) -> list[LayerInfo]:
        """Layers that compute: everything but reformats, Q/DQ conversions and no-ops."""
        return [l for l in self.layers if l.kind not in ("reformat", "qdq", "noop")]

    def precision_counts(self, kind: str | None = None) -> dict[str, int]:
        layers = self.compute_layers if kind is None else self.of_kind(kind)
        c = Counter(l.precision for l in layers)
        return {p: c[p] for p in PRECISIONS if c[p]}

    def of_kind(self, kind: str) -> list[LayerInfo]:
        if kind not in KINDS:
            raise ValueError(f"unknown layer kind {kind!r}; known: {', '.join(KINDS)}")
        return [l for l in self.layers if l.kind == kind]

    @property
    def reformats(self) -> int:
        return len(self.of_kind("reformat"))

    @property
    def qdq(self) -> int:
        return len(self.of_kind("qdq"))

    def summary(self) -> dict[str, Any]:
        """The figures a report shows: layers per precision, reformat and Q/DQ counts, per kind."""
        return {"layers": len(self.compute_layers), "precision": self.precision_counts(),
                "conv": self.precision_counts("conv"), "gemm": self.precision_counts("gemm"),
                "reformat_layers": self.reformats, "qdq_layers": self.qdq, "verbosity": self.verbosity}

    def describe(self) -> str:
        s = self.summary()
        prec = ", ".join(f"{n} {p}" for p, n in s["precision"].items()) or "none"
        return f"{s['layers']} layers ({prec}); {s['reformat_layers']} reformat, {s['qdq_layers']} Q/DQ"

    # ---- assertions -------------------------------------------------------------------------
    def assert_all(self, kind: str, precision: str | Iterable[str], *, except_layers: Iterable[str] = (),
                   allow_none: bool = False) -> None:
        """Every layer of ``kind`` runs in ``precision`` (one or several), apart from layers that
        ``except_layers`` names (module or ONNX node names, e.g. the recipe's keep_precision).

        Raises :class:`PrecisionAuditError` naming each offending layer, its precision and type.
        """
        from qatcheck.backends.trt_plan import layer_matches

        want = {precision} if isinstance(precision, str) else set(precision)
        excepted = tuple(except_layers)
        if self.verbosity != "detailed":
            raise PrecisionAuditError("the engine was built without ProfilingVerbosity.DETAILED: the "
                                      "inspector lists layer names only, so no precision can be checked")
        layers = self.of_kind(kind)
        if not layers and not allow_none:
            raise PrecisionAuditError(f"the engine has no {kind} layers (layer types seen: "
                                      f"{', '.join(sorted({l.layer_type for l in self.layers})) or 'none'})")

        def excused(l: LayerInfo) -> bool:
            names = (l.name, *l.onnx_nodes)
            return any(layer_matches(e, n) for e in excepted for n in names)

        bad = [l for l in layers if l.precision not in want and not excused(l)]
        if bad:
            shown = "; ".join(f"{l.name!r} runs {l.precision} ({l.layer_type}, read from {l.precision_from})"
                              for l in bad[:10])
            more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
            hint = (" (precision unknown: with dynamic shapes the inspector writes no formats; weights "
                    "or tactic names were missing too)" if any(l.precision == "unknown" for l in bad) else "")
            raise PrecisionAuditError(f"{len(bad)} of {len(layers)} {kind} layers do not run in "
                                      f"{'/'.join(sorted(want))}: {shown}{more}{hint}")

    def assert_reformats(self, at_most: int) -> None:
        if self.reformats > at_most:
            names = ", ".join(repr(l.name) for l in self.of_kind("reformat")[:8])
            raise PrecisionAuditError(f"{self.reformats} reformat layers (at most {at_most} expected): {names}")


def _precision_of_text(text: str) -> str | None:
    if not text or text.startswith("N/A"):
        return None
    for name, rx in _TOKENS:
        if rx.search(text):
            return name
    return None


def layer_precision(layer: Mapping[str, Any]) -> tuple[str, str]:
    """(precision, where it was read from) for one inspector layer dict."""
    w = layer.get("Weights")
    if isinstance(w, Mapping) and w.get("Count", 1):
        p = _precision_of_text(str(w.get("Type", "")))
        if p:
            return p, "weights"
    for key, label in (("Inputs", "input"), ("Outputs", "output")):
        tensors = layer.get(key) or []
        if tensors and isinstance(tensors[0], Mapping):
            p = _precision_of_text(str(tensors[0].get("Format/Datatype", "")))
            if p:
                return p, label
    tactic = str(layer.get("TacticName", ""))
    for name, rx in _TACTIC_HINTS:
        if rx.search(tactic):
            return name, "tactic"
    return "unknown", "none"


def layer_kind(layer: Mapping[str, Any]) -> str:
    ltype = str(layer.get("LayerType", ""))
    ptype = str(layer.get("ParameterType", ""))
    origin = str(layer.get("Origin", "")).upper()
    both = f"{ltype} {ptype}"
    if ltype == "NoOp" or ptype == "NoOp":
        return "noop"
    if origin == "QDQ" or re.search(r"\b(?:Quantize|Dequantize|QuantizeLinear|DequantizeLinear)\b", both):
        return "qdq"
    if ltype == "Reformat" or ptype == "Reformat" or origin == "REFORMAT":
        return "reformat"
    if re.search(r"Convolution|Deconvolution", both):
        return "conv"
    if re.search(r"MatrixMultiply|FullyConnected|Gemm|gemm", both):
        return "gemm"
    return "other"


def parse_engine_info(info: str | Mapping[str, Any]) -> PrecisionAudit:
    """The audit of an inspector JSON (a string or the parsed dict)."""
    data = json.loads(info) if isinstance(info, (str, bytes)) else info
    if not isinstance(data, Mapping) or "Layers" not in data:
        raise ValueError("not an engine inspector JSON: no 'Layers' key")
    raw = data["Layers"]
    if raw and all(isinstance(l, str) for l in raw):
        return PrecisionAudit([LayerInfo(n, "other", "", "unknown", "none") for n in raw],
                              verbosity="names-only",
                              notes=["built without ProfilingVerbosity.DETAILED: names only"])
    layers = []
    for l in raw:
        prec, src = layer_precision(l)
        nodes = tuple(_ONNX_LAYER.findall(str(l.get("Metadata", ""))))
        layers.append(LayerInfo(name=str(l.get("Name", "")), kind=layer_kind(l),
                                layer_type=str(l.get("LayerType", l.get("ParameterType", ""))),
                                precision=prec, precision_from=src, onnx_nodes=nodes,
                                tactic=str(l.get("TacticName", ""))))
    return PrecisionAudit(layers)
