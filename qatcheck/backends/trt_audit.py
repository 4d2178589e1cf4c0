"""Precision audit of a TensorRT engine, from the engine inspector's JSON.

``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` on an engine built with
``ProfilingVerbosity.DETAILED`` (or ``trtexec --profilingVerbosity=detailed --exportLayerInfo=f.json``)
returns ``{"Layers": [...], <the engine's I/O>}``. Each layer has ``Name``, ``LayerType`` (the
implementation: ``CaskConvolution``, ``Reformat``, ``NoOp``, ...), usually ``ParameterType`` (the
logical layer: ``Convolution``, ``MatrixMultiply``, ``Reformat``), ``Inputs`` / ``Outputs`` (each
with ``Name``, ``Location``, ``Dimensions`` and its type, see below), ``Weights``/``Bias``
(``{"Type": "Int8", "Count": n}``), ``TacticName``, ``Metadata`` (``"[ONNX Layer: /stem/conv/Conv]"``,
several joined for fused layers) and, in recent versions, ``Origin`` (``"QDQ"`` for layers made
from Q/DQ nodes, ``"REFORMAT"`` for inserted reformats). With LAYER_NAMES_ONLY verbosity
``Layers`` is a list of names and no precision can be read: the audit says so.

Two layouts exist; which one a JSON has is read from the fields present, never from a flag or the
installed version (an engine's JSON may be audited anywhere, TensorRT or not):

* TensorRT 8.2 - 10.x: the engine's I/O is ``"Bindings": ["input", "logits"]`` (names); a layer
  tensor's type and layout are one string, ``"Format/Datatype": "Thirty-two wide channel vectorized
  row major Int8 format"`` (``"N/A due to dynamic shapes"`` under dynamic shapes).
* TensorRT 11: the engine's I/O is ``"I/O Tensors": [{"Name", "IOMode", "DataType", "Dimensions",
  "Location", "IsShapeInferenceIO", "ProfileInfo": [{"MinShape", "OptShape", "MaxShape",
  "Format"}]}, ...]``; a layer tensor's type and layout are two fields, ``"Datatype": "Int8"`` and
  ``"Format"``.

Sources of the field names:

* ``Bindings`` (10.x) and ``I/O Tensors`` with its members (11): NVIDIA, "Migrating IEngineInspector
  Usage from TensorRT 10.x to 11.x",
  https://docs.nvidia.com/deeplearning/tensorrt/11.0.0/api/migration/tensorrt-10x-to-11x-IEngineInspector.html
  (its summary on the parent page, .../api/migration/tensorrt-10x-to-11x.html, also names "the split
  of the Format/DataType field").
* ``Format/Datatype`` (8.2 - 10.x): NVIDIA/TensorRT ``tools/Polygraphy/polygraphy/backend/trt/util.py``
  (``elem["Format/Datatype"]``) and ``tools/experimental/trt-engine-explorer/trex/activations.py``
  (``raw_dict['Format/Datatype']``); an example dump in NVIDIA/TensorRT issue #4020.
* ``Datatype`` and ``Format`` (11): NVIDIA/TensorRT
  ``tools/Polygraphy/polygraphy/tools/inspect/subtool/model/extractors/_trt.py`` ("TensorRT 11 split
  the combined "Format/Datatype" field into separate "Datatype" and "Format" keys") and
  NVIDIA/trt-samples-for-hackathon-cn ``cookbook/tensorrt_cookbook/utils_engine.py``
  (``get_engine_tensor_info``: ``tensor["Datatype"]``, ``tensor.get("Format", "")``, "Support both
  schemas"). Both read the data type as a DataType name (``Float``, ``Half``, ``Int8``, ...).

Not confirmed from NVIDIA's own page (its layer section could not be read here): the exact
spelling of the per-layer data-type key (the sources above write ``Datatype``, the I/O Tensors
objects ``DataType``), and what a per-layer ``Format`` string holds. So the data-type key is found
whatever its case or spacing (``Datatype``, ``DataType``, ``Data Type``), its value may be a DataType
name or an enum spelling (``Int8``, ``INT8``, ``kINT8``, ``DataType.INT8``), and a ``Format`` string
that names a type (``"Row major linear FP32 format (kLINEAR)"``, the I/O Tensors example) is read
when the data-type field says nothing. A JSON whose tensors carry none of these fields is not
guessed at: :class:`InspectorFormatError` names the file, the layer and the keys it found.

The layer's precision is read, in order, from its weights' type, its first input's type, its first
output's type and finally its tactic name (TensorRT 10 writes ``N/A`` formats under dynamic
shapes). This mirrors trt-engine-explorer (trex), which takes a layer's precision from its first
input.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

# ---- the inspector's field names (sources: see the module docstring) -------------------------------
#: TensorRT 8.2 - 10.x: a layer tensor's type and layout, one string
FORMAT_DATATYPE = "Format/Datatype"
#: TensorRT 11: the same, split (the data-type key is matched case- and space-insensitively)
DATATYPE = "Datatype"
FORMAT = "Format"
#: the engine's I/O: TensorRT 10.x lists names, TensorRT 11 objects with ``Name``, ``IOMode``, ...
BINDINGS = "Bindings"
IO_TENSORS = "I/O Tensors"
#: what :attr:`PrecisionAudit.schema` says
SCHEMA_10 = "tensorrt-10"
SCHEMA_11 = "tensorrt-11"

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
#: a data-type field's value (DataType names as TensorRT prints them, and enum spellings), lowercased
_DTYPE_NAMES = {
    "float": "fp32", "float32": "fp32", "fp32": "fp32",
    "half": "fp16", "float16": "fp16", "fp16": "fp16",
    "bfloat16": "bf16", "bf16": "bf16",
    "int8": "int8",
    "fp8": "fp8", "float8": "fp8", "fp8e4m3": "fp8", "float8e4m3": "fp8",
    "int32": "int32", "int64": "int64", "bool": "bool",
}
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


class InspectorFormatError(ValueError):
    """The JSON is not an engine inspector output this module can read (neither the TensorRT 10.x
    nor the TensorRT 11 layout). The message names the file, when known, and the field."""


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
    verbosity: str = "detailed"  # detailed | names-only | none (the inspector listed no layer)
    notes: list[str] = field(default_factory=list)
    #: which inspector layout was read: tensorrt-10 | tensorrt-11 | mixed (...) | "" (not known)
    schema: str = ""
    #: the engine's I/O tensor names (``Bindings`` or ``I/O Tensors``), when the JSON lists them
    io_tensors: tuple[str, ...] = ()
    #: where the JSON came from (a file path), for messages; "" when it was passed as text
    source: str = ""

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
                "reformat_layers": self.reformats, "qdq_layers": self.qdq, "verbosity": self.verbosity,
                "inspector": self.schema}

    def describe(self) -> str:
        s = self.summary()
        prec = ", ".join(f"{n} {p}" for p, n in s["precision"].items()) or "none"
        return f"{s['layers']} layers ({prec}); {s['reformat_layers']} reformat, {s['qdq_layers']} Q/DQ"

    # ---- assertions -------------------------------------------------------------------------
    def assert_all(self, kind: str, precision: str | Iterable[str], *, except_layers: Iterable[str] = (),
                   allow_none: bool = False) -> None:
        """Every layer of ``kind`` runs in ``precision`` (one or several), apart from layers that
        ``except_layers`` names (module or ONNX node names, e.g. the recipe's keep_precision).

        Raises :class:`PrecisionAuditError` naming each offending layer, its precision and type;
        an engine with no layer of ``kind`` fails too (unless ``allow_none``): an audit that read
        nothing must not pass.
        """
        from qatcheck.backends.trt_plan import layer_matches

        want = {precision} if isinstance(precision, str) else set(precision)
        excepted = tuple(except_layers)
        src = f"{self.source}: " if self.source else ""
        if self.verbosity == "none":
            raise PrecisionAuditError(f"{src}the engine inspector listed no layers (an engine built with "
                                      "ProfilingVerbosity.NONE?), so no precision can be checked")
        if self.verbosity != "detailed":
            raise PrecisionAuditError(f"{src}the engine was built without ProfilingVerbosity.DETAILED: the "
                                      "inspector lists layer names only, so no precision can be checked")
        layers = self.of_kind(kind)
        if not layers and not allow_none:
            raise PrecisionAuditError(f"{src}the engine has no {kind} layers (layer types seen: "
                                      f"{', '.join(sorted({l.layer_type for l in self.layers})) or 'none'})")

        def excused(l: LayerInfo) -> bool:
            names = (l.name, *l.onnx_nodes)
            return any(layer_matches(e, n) for e in excepted for n in names)

        bad = [l for l in layers if l.precision not in want and not excused(l)]
        if bad:
            shown = "; ".join(f"{l.name!r} runs {l.precision} ({l.layer_type}, read from {l.precision_from})"
                              for l in bad[:10])
            more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
            hint = (" (precision unknown: the layer's tensors name no type - TensorRT 10 writes 'N/A' "
                    "formats under dynamic shapes - and its weights and tactic name say none either)"
                    if any(l.precision == "unknown" for l in bad) else "")
            raise PrecisionAuditError(f"{src}{len(bad)} of {len(layers)} {kind} layers do not run in "
                                      f"{'/'.join(sorted(want))}: {shown}{more}{hint}")

    def assert_reformats(self, at_most: int) -> None:
        if self.reformats > at_most:
            names = ", ".join(repr(l.name) for l in self.of_kind("reformat")[:8])
            raise PrecisionAuditError(f"{self.reformats} reformat layers (at most {at_most} expected): {names}")


# ---- reading one tensor / layer ----------------------------------------------------------------------
def _precision_of_text(text: str) -> str | None:
    """The type a format description names (``"Row major linear FP32"``, ``"Half(64,1:8,8,1)"``)."""
    if not text or text.startswith("N/A"):
        return None
    for name, rx in _TOKENS:
        if rx.search(text):
            return name
    return None


def _precision_of_type(text: str) -> str | None:
    """The precision a data-type value names: ``Int8``, ``INT8``, ``kINT8``, ``DataType.INT8``, or
    failing that any type token in it."""
    s = text.strip()
    low = re.sub(r"^(?:trt\.|nvinfer1::)?datatype(?:\.|::)", "", s.lower())
    if low.startswith("k") and low[1:] in _DTYPE_NAMES:
        low = low[1:]
    return _DTYPE_NAMES.get(low) or _precision_of_text(s)


def _datatype_key(tensor: Mapping[str, Any]) -> str | None:
    """The tensor's TensorRT 11 data-type key (``Datatype``; ``DataType`` / ``Data Type`` tolerated)."""
    if DATATYPE in tensor:
        return DATATYPE
    for k in tensor:
        if isinstance(k, str) and re.sub(r"[^a-z]", "", k.lower()) == "datatype":
            return k
    return None


def tensor_layout(tensor: Mapping[str, Any]) -> str | None:
    """Which layout a layer tensor is written in: ``"Format/Datatype"`` (TensorRT 10.x),
    ``"Datatype/Format"`` (TensorRT 11) or None (neither: a field this module does not know)."""
    if FORMAT_DATATYPE in tensor:
        return FORMAT_DATATYPE
    if _datatype_key(tensor) or FORMAT in tensor:
        return "Datatype/Format"
    return None


def tensor_precision(tensor: Mapping[str, Any]) -> str | None:
    """A layer tensor's precision from its type fields, either layout; None when they name none
    (``N/A`` under dynamic shapes, or no type field)."""
    if FORMAT_DATATYPE in tensor:
        p = _precision_of_text(str(tensor[FORMAT_DATATYPE]))
        if p:
            return p
    key = _datatype_key(tensor)
    if key is not None:
        p = _precision_of_type(str(tensor[key]))
        if p:
            return p
    if FORMAT in tensor:  # a format description that names its type, as I/O Tensors' Format does
        return _precision_of_text(str(tensor[FORMAT]))
    return None


def layer_precision(layer: Mapping[str, Any]) -> tuple[str, str]:
    """(precision, where it was read from) for one inspector layer dict."""
    # a fused conv + activation + pooling layer (LayerType ConvActPool) writes "ConvWeights"
    # (trt-engine-explorer's example engines, examples/pytorch/resnet/A100/qat*/...graph.json)
    for wkey in ("Weights", "ConvWeights"):
        w = layer.get(wkey)
        if isinstance(w, Mapping) and w.get("Count", 1):
            wtype = w.get("Type")
            if wtype is None:
                key = _datatype_key(w)
                wtype = w.get(key) if key else None
            p = _precision_of_type(str(wtype or ""))
            if p:
                return p, "weights"
    for key, label in (("Inputs", "input"), ("Outputs", "output")):
        tensors = layer.get(key) or []
        if tensors and isinstance(tensors[0], Mapping):
            p = tensor_precision(tensors[0])
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
    if re.search(r"Convolution|Deconvolution|ConvActPool", both) or layer.get("ConvParameterType") == "Convolution":
        return "conv"
    if re.search(r"MatrixMultiply|FullyConnected|Gemm|gemm", both):
        return "gemm"
    return "other"


# ---- reading the whole JSON ------------------------------------------------------------------------
def _keys(d: Mapping[str, Any], limit: int = 10) -> str:
    ks = [str(k) for k in d]
    return ", ".join(map(repr, ks[:limit])) + (f", ... ({len(ks)} keys)" if len(ks) > limit else "") or "none"


def _io_tensors(data: Mapping[str, Any], src: str) -> tuple[str, tuple[str, ...]]:
    """(which I/O field the JSON has, the I/O tensor names); a field of the wrong shape is an error."""
    found = []
    names: list[str] = []
    if BINDINGS in data:
        b = data[BINDINGS]
        if not isinstance(b, list) or not all(isinstance(n, str) for n in b):
            raise InspectorFormatError(f"{src}: {BINDINGS!r} is not a list of tensor names (the TensorRT "
                                       f"10.x layout): got {repr(b)[:120]}")
        found.append(BINDINGS)
        names += b
    if IO_TENSORS in data:
        io = data[IO_TENSORS]
        if not isinstance(io, list) or not all(isinstance(t, Mapping) and "Name" in t for t in io):
            raise InspectorFormatError(f"{src}: {IO_TENSORS!r} is not a list of objects with a 'Name' (the "
                                       f"TensorRT 11 layout): got {repr(io)[:120]}")
        found.append(IO_TENSORS)
        names += [str(t["Name"]) for t in io if str(t["Name"]) not in names]
    return (" and ".join(found) or "none"), tuple(names)


def _schema(io_field: str, layouts: Counter) -> str:
    """tensorrt-10 / tensorrt-11 when the engine I/O and the layer tensors agree (either may be
    absent), "" when neither says, else "mixed (...)" naming both."""
    tensors = "+".join(sorted(layouts)) or "none"
    if tensors in (FORMAT_DATATYPE, "none") and io_field in (BINDINGS, "none"):
        return SCHEMA_10 if (tensors, io_field) != ("none", "none") else ""
    if tensors in ("Datatype/Format", "none") and io_field in (IO_TENSORS, "none"):
        return SCHEMA_11
    return f"mixed (engine I/O: {io_field}; layer tensors: {tensors})"


def load_engine_info(path: str | os.PathLike) -> PrecisionAudit:
    """The audit of an inspector JSON file (``trtexec --exportLayerInfo`` output, or a saved
    ``get_engine_information`` string); errors name the file."""
    return parse_engine_info(Path(path), source=os.fspath(path))


def parse_engine_info(info: str | bytes | os.PathLike | Mapping[str, Any],
                      source: str | os.PathLike | None = None) -> PrecisionAudit:
    """The audit of an inspector JSON (a string, the parsed dict, or a path to the file), in the
    TensorRT 10.x or the TensorRT 11 layout - told apart by the fields present.

    ``source`` names where the JSON came from in messages (a path's own name by default). A JSON
    that is neither layout raises :class:`InspectorFormatError` (a ValueError) naming the source and
    the field it could not read, rather than being audited as an engine with nothing to check.
    """
    if isinstance(info, os.PathLike):
        source = source if source is not None else os.fspath(info)
        try:
            info = Path(info).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InspectorFormatError(f"{os.fspath(source)}: cannot be read ({type(exc).__name__}: {exc})") from exc
    src = os.fspath(source) if source is not None else "engine inspector JSON"
    if isinstance(info, (str, bytes)):
        try:
            data = json.loads(info)
        except ValueError as exc:
            raise InspectorFormatError(f"{src}: not JSON ({exc})") from exc
    else:
        data = info
    if not isinstance(data, Mapping) or "Layers" not in data:
        seen = _keys(data) if isinstance(data, Mapping) else f"a JSON {type(data).__name__}"
        raise InspectorFormatError(f"{src}: not an engine inspector JSON: no 'Layers' key (found: {seen})")
    raw = data["Layers"]
    if not isinstance(raw, list):
        raise InspectorFormatError(f"{src}: 'Layers' is a JSON {type(raw).__name__}, not a list")
    io_field, io_names = _io_tensors(data, src)
    common = dict(io_tensors=io_names, source=os.fspath(source) if source is not None else "")
    if not raw:
        return PrecisionAudit([], verbosity="none", schema="", notes=["the inspector listed no layers"], **common)
    if all(isinstance(l, str) for l in raw):
        return PrecisionAudit([LayerInfo(n, "other", "", "unknown", "none") for n in raw],
                              verbosity="names-only", schema="",
                              notes=["built without ProfilingVerbosity.DETAILED: names only"], **common)
    for i, l in enumerate(raw):
        if isinstance(l, str):
            raise InspectorFormatError(f"{src}: 'Layers' mixes layer names (Layers[{i}]) and layer objects: "
                                       "expected all objects (ProfilingVerbosity.DETAILED) or all names")
        if not isinstance(l, Mapping):
            raise InspectorFormatError(f"{src}: Layers[{i}] is a JSON {type(l).__name__}: expected an object "
                                       "(ProfilingVerbosity.DETAILED) or, for every layer, a name (LAYER_NAMES_ONLY)")
    if not any("LayerType" in l or "ParameterType" in l for l in raw):
        raise InspectorFormatError(f"{src}: no layer has a 'LayerType' (or 'ParameterType') field, so no "
                                   f"convolution can be told apart; Layers[0] has {_keys(raw[0])}")
    if not any("Inputs" in l or "Outputs" in l for l in raw):
        raise InspectorFormatError(f"{src}: no layer has 'Inputs' or 'Outputs', so no tensor type can be "
                                   f"read; Layers[0] has {_keys(raw[0])}")

    layouts: Counter = Counter()
    unread: list[str] = []
    for i, l in enumerate(raw):
        lname = str(l.get("Name", f"Layers[{i}]"))
        for key in ("Inputs", "Outputs"):
            tensors = l.get(key)
            if tensors is None:
                continue
            if not isinstance(tensors, list):
                raise InspectorFormatError(f"{src}: layer {lname!r}: {key!r} is a JSON "
                                           f"{type(tensors).__name__}, not a list")
            for j, t in enumerate(tensors):
                if not isinstance(t, Mapping):
                    raise InspectorFormatError(f"{src}: layer {lname!r}: {key}[{j}] is a JSON "
                                               f"{type(t).__name__}, not an object")
                layout = tensor_layout(t)
                if layout:
                    layouts[layout] += 1
                else:
                    unread.append(f"layer {lname!r} {key}[{j}] (fields: {_keys(t)})")
    if unread and not layouts:
        raise InspectorFormatError(
            f"{src}: cannot read the layers' tensor types: {unread[0]} has neither {FORMAT_DATATYPE!r} "
            f"(TensorRT 8.2-10.x) nor {DATATYPE!r}/{FORMAT!r} (TensorRT 11)"
            + (f"; nor do {len(unread) - 1} other tensor(s)" if len(unread) > 1 else ""))
    schema = _schema(io_field, layouts)
    notes = []
    if unread:
        notes.append(f"{len(unread)} layer tensor(s) carry no type field, e.g. {unread[0]}")
    if schema.startswith("mixed"):
        notes.append(f"inspector JSON in neither documented layout but readable: {schema}")

    layers = []
    for l in raw:
        prec, src_field = layer_precision(l)
        nodes = tuple(_ONNX_LAYER.findall(str(l.get("Metadata", ""))))
        layers.append(LayerInfo(name=str(l.get("Name", "")), kind=layer_kind(l),
                                layer_type=str(l.get("LayerType", l.get("ParameterType", ""))),
                                precision=prec, precision_from=src_field, onnx_nodes=nodes,
                                tactic=str(l.get("TacticName", ""))))
    return PrecisionAudit(layers, schema=schema, notes=notes, **common)
