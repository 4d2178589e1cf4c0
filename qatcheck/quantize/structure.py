"""The quantization structure of an int8 artifact: which tensors are quantized, and with what scale.

Why: accuracy and parity metrics average over the whole network, so a structural regression can
pass them. On the digits recipe each of these passes the metric checks:

* one mid-network input quantizer with its amax x8 (``layer1.conv1`` in torch_ptq: cosine vs fp32
  0.99982 -> 0.99948, top-1 unchanged) - a calibration bug that a harder dataset would expose;
* one activation Q/DQ pair dropped from the trt_ptq graph - that layer silently runs in fp32 in
  ONNX Runtime, and TensorRT runs it (and often its neighbours) in higher precision;
* the fp32 ONNX copied over the trt_ptq artifact - "int8" with cosine 1.0.

The structure is the list of quantizers, named after the PyTorch layer each one feeds, with its
scale: compared against a stored baseline it names the layer and both scales (the CPU-side
counterpart of the TensorRT precision audit), and :func:`vanished` fails an int8 artifact with no
Q/DQ at all even without a baseline.

Naming rule (one name per quantized *input of a layer*, the same for every exporter):

* ``<module>:input`` / ``<module>:weight`` - a DequantizeLinear feeding input 0 / the constant
  input 1 of a Conv, ConvTranspose, Gemm or MatMul exported from ``<module>`` (module name from
  the node name, :func:`qatcheck.quantize.onnx_ptq.module_name_of`; a top-level node is named by
  its node name, as in :func:`qatcheck.quantize.qdq_edit.quantized_layers`). A MatMul of two
  activations has ``:input`` and ``:input1``.
* ``<module>:input`` - input 0 of a pooling op exported from ``<module>`` (pytorch-quantization's
  QuantMaxPool / QuantAvgPool / QuantAdaptiveAvgPool quantize their input).
* ``<module>.<op>:input<i>`` - input ``i`` of any other op, ``<op>`` being the node name's last
  part, lower-cased: the residual Add ``/layer1/Add`` -> ``layer1.add:input1``, ``/Concat`` ->
  ``concat:input0``; ``weight<i>`` when the quantized tensor is a constant.
* a DequantizeLinear read by several layers (one activation shared by a block's conv and its
  downsample) gives one entry per reader, all with the pair's scale: that is what each layer
  sees, and it is how the torch side names them (each layer has its own input quantizer).
* a DQ nothing reads: ``<module or tensor>:unused``; a name taken twice gets ``#2``, ``#3``...

On a pytorch-quantization model (:func:`torch_structure`) ``<m>._input_quantizer`` is
``<m>:input`` and ``<m>._weight_quantizer`` is ``<m>:weight``, so a calibrated model and its
exported ONNX give the same names and scales (checked on digits torch_ptq and qat: identical).
Not matched: quantizers added by the Q/DQ placement rules (:mod:`qatcheck.quantize.qdq_rules`)
keep their module path (``layer1._qdq_add_residual:input``), while the ONNX names the op they feed
(``layer1.add:input0``; a rule that reuses a layer's quantizer for the Add's identity input adds
``layer1.add:input1`` on the ONNX side only), so compare torch with torch and ONNX with ONNX
there. And :attr:`QuantStructure.qdq_pairs` of a torch model counts enabled quantizers, one more
than its ONNX for every pair the exporter merges (two quantizers with equal scales on one tensor:
digits' ``layer2.conv1`` and ``layer2.downsample.conv``, 15 quantizers -> 14 pairs).

Flat entries (:func:`to_entries`, for the baseline store; all values are numbers)::

    {"qdq_pairs": 13,
     "layer1.conv1:input.scale": 0.0212,                       # per-tensor
     "layer1.conv1:weight.channels": 16,                       # per-channel (size > 1)
     "layer1.conv1:weight.scale_min": 0.0018, "layer1.conv1:weight.scale_max": 0.0031,
     "x:input.zero_point": 3}                                  # only when not 0

The per-channel digest stays out of the flat entries: the store holds numbers, and a hash has no
tolerance (a move inside ``scale_rel`` would fail it); min / max catch a moved range.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np

from qatcheck.errors import ArtifactError, BaselineError
from qatcheck.quantize.onnx_ptq import QUANTIZABLE_OPS, module_name_of
from qatcheck.quantize.qdq_lint import QDQGraph, load_qdq_model

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    from torch import nn

__all__ = ["QuantEntry", "QuantStructure", "onnx_structure", "torch_structure", "to_entries",
           "from_entries", "compare_structure", "vanished"]

#: pooling ops pytorch-quantization's Quant*Pool modules export; their input is the module's input
_POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")
#: fields of one quantizer in the flat entries
_FIELDS = ("scale", "channels", "scale_min", "scale_max", "zero_point")
#: at most this many per-quantizer messages; the rest are counted
_MAX_MESSAGES = 8


@dataclass(frozen=True)
class QuantEntry:
    """One quantizer. Per-tensor: ``scale``. Per-channel (more than one scale): ``channels``,
    ``scale_min``, ``scale_max`` and ``digest`` (sha256 of the scales at 6 significant digits, for
    telling two vectors apart by eye). ``zero_point`` is 0 for TensorRT-style symmetric int8;
    otherwise the largest-magnitude zero point."""

    kind: str  # "activation" | "weight"
    scale: float | None = None
    channels: int = 0
    scale_min: float | None = None
    scale_max: float | None = None
    digest: str = ""
    zero_point: int = 0

    @property
    def per_channel(self) -> bool:
        return self.channels > 0

    def describe(self) -> str:
        if self.per_channel:
            return f"scale {_num(self.scale_min)}..{_num(self.scale_max)} over {self.channels} channels"
        return f"scale {_num(self.scale)}"


@dataclass(frozen=True)
class QuantStructure:
    """Quantizers by name (see the module doc for the naming rule), in graph / module order, and
    the number of Q->DQ pairs."""

    quantizers: dict[str, QuantEntry] = field(default_factory=dict)
    qdq_pairs: int = 0


def _entry(kind: str, scales: np.ndarray, zero_points: np.ndarray | None = None) -> QuantEntry:
    s = np.asarray(scales, dtype=np.float32).ravel()
    zp = 0
    if zero_points is not None and np.asarray(zero_points).size:
        z = np.asarray(zero_points).ravel().astype(np.int64)
        zp = int(z[np.argmax(np.abs(z))])
    if s.size == 1:  # a one-channel "per-channel" scale exports per-tensor: treat both alike
        return QuantEntry(kind, scale=float(s[0]), zero_point=zp)
    digest = hashlib.sha256(",".join(f"{v:.6g}" for v in s).encode()).hexdigest()[:12]
    return QuantEntry(kind, channels=int(s.size), scale_min=float(s.min()), scale_max=float(s.max()),
                      digest=digest, zero_point=zp)


def _put(quantizers: dict[str, QuantEntry], name: str, entry: QuantEntry) -> None:
    key, n = name, 1
    while key in quantizers:
        n += 1
        key = f"{name}#{n}"
    quantizers[key] = entry


# ---- ONNX ------------------------------------------------------------------------------------

def _reader_name(node: onnx.NodeProto, index: int, kind: str) -> str:
    """The name of the quantized input ``index`` of ``node`` (the module doc's rule)."""
    module = module_name_of(node.name)
    role = "weight" if kind == "weight" else "input"
    if node.op_type in QUANTIZABLE_OPS:
        layer = module or node.name
        plain = (index, role) in ((0, "input"), (1, "weight"))
        return f"{layer}:{role}" if plain else f"{layer}:{role}{index}"
    if node.op_type in _POOL_OPS and module and (index, role) == (0, "input"):
        return f"{module}:input"
    op = (node.name.rstrip("/").rsplit("/", 1)[-1] or node.op_type).lower()
    return f"{module}.{op}:{role}{index}" if module else f"{op}:{role}{index}"


def onnx_structure(model_or_path: str | os.PathLike[str] | onnx.ModelProto) -> QuantStructure:
    """The quantizers of a Q/DQ ONNX (our ONNX PTQ or pytorch-quantization's export): one per
    (DequantizeLinear, reader input); scales and zero points from initializers or Constant nodes.
    A DequantizeLinear of a constant int8 weight with no QuantizeLinear before it counts as a
    weight quantizer but not as a pair."""
    model, source = load_qdq_model(model_or_path)
    g = QDQGraph(model)
    position = {id(n): i for i, n in enumerate(g.nodes)}
    found: list[tuple[int, int, str, QuantEntry]] = []  # (reader position, input, name, entry)
    pairs = 0
    for dq in g.nodes:
        if dq.op_type != "DequantizeLinear":
            continue
        q = g.producer.get(dq.input[0])
        pairs += q is not None and q.op_type == "QuantizeLinear"
        scale = g.consts.get(dq.input[1])
        if scale is None:
            raise ArtifactError(f"{source}: the scale of DequantizeLinear {dq.name!r} ({dq.input[1]}) is "
                                "computed in the graph, not a constant; cannot read its quantization")
        zero = g.consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        entry = _entry("weight" if g.is_constant(dq.input[0]) else "activation", scale, zero)
        # a node reading the tensor twice (Add(x, x)) is listed twice among the consumers
        consumers = {id(n): n for n in g.consumers.get(dq.output[0], [])}.values()
        readers = [(n, i) for n in consumers for i, t in enumerate(n.input) if t == dq.output[0]]
        if not readers:
            found.append((position[id(dq)], 0, f"{module_name_of(dq.name) or dq.input[0]}:unused", entry))
        found += [(position[id(n)], i, _reader_name(n, i, entry.kind), entry) for n, i in readers]
    # in the order layers run (our PTQ puts every weight's Q/DQ first), so messages read in order
    quantizers: dict[str, QuantEntry] = {}
    for _, _, name, entry in sorted(found, key=lambda f: f[:2]):
        _put(quantizers, name, entry)
    return QuantStructure(quantizers, pairs)


# ---- PyTorch ---------------------------------------------------------------------------------

def torch_structure(module: nn.Module) -> QuantStructure:
    """The enabled quantizers of a calibrated PyTorch model, by its TorchQuantizer
    (:func:`qatcheck.quantize.torch_common.quantizer_of`), with the scales its Q/DQ export writes
    (``TorchQuantizer.scales``); ``qdq_pairs`` counts the quantizers (see the module doc). A model
    without quantizers has none."""
    from qatcheck.quantize.torch_common import quantizer_of

    tq = quantizer_of(module)
    found = tq.scales(module) if tq is not None else []
    quantizers: dict[str, QuantEntry] = {}
    for key, kind, scales in found:
        _put(quantizers, key, _entry(kind, scales))
    return QuantStructure(quantizers, len(found))


# ---- flat entries ----------------------------------------------------------------------------

Entries = Mapping[str, float]


def to_entries(structure: QuantStructure) -> dict[str, float]:
    """The flat, JSON-friendly form (see the module doc); round-trips through :func:`from_entries`
    except for the per-channel digest."""
    out: dict[str, float] = {"qdq_pairs": structure.qdq_pairs}
    for name, e in structure.quantizers.items():
        if e.per_channel:
            out.update({f"{name}.channels": e.channels, f"{name}.scale_min": e.scale_min,
                        f"{name}.scale_max": e.scale_max})
        else:
            out[f"{name}.scale"] = e.scale
        if e.zero_point:
            out[f"{name}.zero_point"] = e.zero_point
    return out


def from_entries(entries: Entries) -> QuantStructure:
    """The structure stored by :func:`to_entries`. The kind comes from the name's role (``weight``
    roles are weights). An unknown key is a BaselineError naming it."""
    fields: dict[str, dict[str, float]] = {}
    for key, value in entries.items():
        if key == "qdq_pairs":
            continue
        name, _, attr = key.rpartition(".")
        if ":" not in name or attr not in _FIELDS:
            raise BaselineError(f"quantization structure entry {key!r} is not '<quantizer>.<field>' "
                             f"with a field in {', '.join(_FIELDS)}")
        fields.setdefault(name, {})[attr] = value
    quantizers = {}
    for name, f in fields.items():
        kind = "weight" if name.rpartition(":")[2].startswith("weight") else "activation"
        quantizers[name] = QuantEntry(
            kind, scale=f.get("scale"), channels=int(f.get("channels", 0)), scale_min=f.get("scale_min"),
            scale_max=f.get("scale_max"), zero_point=int(f.get("zero_point", 0)))
    return QuantStructure(quantizers, int(entries.get("qdq_pairs", 0)))


# ---- comparison ------------------------------------------------------------------------------

def vanished(structure: QuantStructure | Entries) -> bool:
    """True when an (int8) artifact has no quantizer and no Q/DQ pair at all."""
    s = structure if isinstance(structure, QuantStructure) else from_entries(structure)
    return not s.quantizers and s.qdq_pairs == 0


def _num(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


def _moved(name: str, what: str, now: float | None, base: float | None, scale_rel: float) -> str | None:
    """A message when ``now`` is more than ``scale_rel`` (relative) away from ``base``."""
    if base is None or now is None:
        same = base is None and now is None
        return None if same else f"quantizer {name!r} {what} {_num(now)} vs baseline {_num(base)}"
    if math.isfinite(now) and abs(now - base) <= scale_rel * abs(base):
        return None
    a, b = _num(now), _num(base)
    if a == b:  # a move the 4 digits hide: show them all
        a, b = f"{now:.9g}", f"{base:.9g}"
    if not base:
        ratio = "baseline 0"
    elif not math.isfinite(now):
        ratio = "not finite"
    else:
        ratio = f"x{now / base:.2f}"
    return f"quantizer {name!r} {what} {a} vs baseline {b} ({ratio}, tolerance ±{scale_rel * 100:g}%)"


def _differences(name: str, now: QuantEntry, base: QuantEntry, scale_rel: float) -> list[str]:
    if now.per_channel != base.per_channel:
        return [f"quantizer {name!r} is now {'per-channel' if now.per_channel else 'per-tensor'} "
                f"({now.describe()}) vs baseline {base.describe()}"]
    out = []
    if now.per_channel:
        if now.channels != base.channels:
            out.append(f"quantizer {name!r} has {now.channels} channels vs baseline {base.channels}")
        out += [_moved(name, "scale_min", now.scale_min, base.scale_min, scale_rel),
                _moved(name, "scale_max", now.scale_max, base.scale_max, scale_rel)]
    else:
        out.append(_moved(name, "scale", now.scale, base.scale, scale_rel))
    if now.zero_point != base.zero_point:
        out.append(f"quantizer {name!r} zero point {now.zero_point} vs baseline {base.zero_point}")
    return [m for m in out if m]


def compare_structure(current: QuantStructure | Entries, stored: Entries, *,
                      scale_rel: float | Mapping[str, float]) -> list[str]:
    """Failure messages for ``current`` against the stored flat entries; empty when they agree.

    Reports quantizers dropped (naming the layer and its baseline scale), added, and whose scale
    (per-channel: min / max, channel count) moved more than ``scale_rel`` relative, zero points,
    then the Q/DQ pair count. An artifact with no Q/DQ at all gives the single "quantization
    vanished" message instead. At most 8 per-quantizer messages, then a count of the rest.
    """
    now = current if isinstance(current, QuantStructure) else from_entries(current)
    base = from_entries(stored)
    if vanished(now):
        return [f"quantization vanished: the int8 artifact has no Q/DQ (0 quantizers; baseline "
                f"{len(base.quantizers)})"]
    messages = []
    for name, b in base.quantizers.items():
        if name not in now.quantizers:
            messages.append(f"quantizer {name!r} was dropped (baseline {b.describe()})")
    for name, e in now.quantizers.items():
        if name not in base.quantizers:
            messages.append(f"quantizer {name!r} was added ({e.describe()})")
    for name, b in base.quantizers.items():
        if name in now.quantizers:
            # a per-quantizer tolerance (from the baseline file, editable by hand) or one for all
            rel = (scale_rel.get(name, max(scale_rel.values(), default=0.0))
                   if isinstance(scale_rel, Mapping) else scale_rel)
            messages += _differences(name, now.quantizers[name], b, rel)
    if len(messages) > _MAX_MESSAGES:
        rest = len(messages) - _MAX_MESSAGES
        messages = messages[:_MAX_MESSAGES] + [f"... and {rest} more quantizer difference(s)"]
    if now.qdq_pairs != base.qdq_pairs:
        messages.append(f"Q/DQ pair count changed: {base.qdq_pairs} -> {now.qdq_pairs}")
    return messages
