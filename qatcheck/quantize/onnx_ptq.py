"""ONNX-level post-training quantization: explicit, TensorRT-style Q/DQ in a plain fp32 ONNX.

This is the ``trt_ptq`` and ``partial`` modes. TensorRT 11 dropped its calibrators, so the int8
decisions have to live in the graph (DESIGN.md, principle 1). We place the Q/DQ exactly where
TensorRT's explicit-quantization fusions expect them, so that the same file is both runnable in
ONNX Runtime on a CPU (for parity checks) and buildable into an int8 engine:

* every Conv / ConvTranspose / Gemm / MatMul that is not excluded gets QuantizeLinear ->
  DequantizeLinear on its activation input (per-tensor, symmetric int8, zero point 0) and on its
  weight (per output channel when ``per_channel``); biases stay float because TensorRT quantizes
  them itself from the input and weight scales;
* one activation tensor feeding several quantized layers gets ONE shared Q/DQ pair: different
  scales on the same tensor would force TensorRT to requantize;
* activation ranges come from running the fp32 model in ONNX Runtime over calibration batches and
  reducing per-tensor statistics with minmax, entropy (KL divergence, TensorRT's entropy
  calibrator, via pytorch-quantization's implementation) or percentile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qatcheck.errors import ArtifactError, ConfigError, DataError
from qatcheck.fsutil import atomic_path
from qatcheck.modes import ONNX_CALIBRATORS

#: Operators whose inputs TensorRT runs in int8 when they are fed by Q/DQ.
QUANTIZABLE_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: QuantizeLinear/DequantizeLinear gained the per-axis ``axis`` attribute in opset 13.
MIN_OPSET = 13
#: pytorch-quantization's KL search starts at this bin (8-bit: 128 quantized levels).
_ENTROPY_START_BIN = 128
#: amax used for a tensor that was exactly zero on all calibration data: any positive scale
#: represents zero exactly, and a zero scale would make QuantizeLinear divide by zero.
_ZERO_TENSOR_AMAX = 1.0
#: amax at or below this counts as zero and gets _ZERO_TENSOR_AMAX too (pytorch-quantization's
#: tensor_quant draws the same line, 2**-24). Testing ``amax > 0`` alone is not enough: a pruned
#: channel left at subnormal magnitudes (1e-44) has amax > 0, and amax / 127 underflows to a scale
#: of 0 in float32, or to a subnormal that GPU kernels flush to 0. TensorRT's ONNX parser refuses a
#: non-positive scale ("Scale coefficients must all be positive"); ModelOpt clamps its exported
#: amax for the same reason. Values that small quantize to 0 either way.
_ZERO_AMAX_BOUND = 2.0 ** -24
_INT8_MAX = 127.0


@dataclass(frozen=True)
class OnnxPTQConfig:
    """How :func:`quantize_onnx` calibrates and which layers it leaves in higher precision.

    ``exclude`` takes ONNX node names (``"/layer1/layer1.0/conv1/Conv"``) or PyTorch module names
    (``"layer1.0.conv1"``, which matches every node exported from that module and its children).
    """

    calibrator: str = "entropy"
    percentile: float = 99.99
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    num_bins: int = 2048

    def __post_init__(self) -> None:
        # A bare string would otherwise be iterated character by character.
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        else:
            object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.calibrator not in ONNX_CALIBRATORS:
            raise ConfigError(f"OnnxPTQConfig.calibrator {self.calibrator!r} is unknown; "
                              f"choose one of {', '.join(ONNX_CALIBRATORS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"OnnxPTQConfig.percentile must be in (0, 100]; got {self.percentile}")
        if self.num_bins <= _ENTROPY_START_BIN:
            raise ConfigError(f"OnnxPTQConfig.num_bins must be > {_ENTROPY_START_BIN} (the KL search "
                              f"starts at bin {_ENTROPY_START_BIN}); got {self.num_bins}")


@dataclass
class PTQResult:
    """What :func:`quantize_onnx` did, for reports and for tests that check placement."""

    quantized_nodes: list[str]
    excluded_nodes: list[str]
    activation_amax: dict[str, float]
    qdq_pairs: int


@dataclass(frozen=True)
class _QuantInput:
    """One input of a quantizable node: either a weight initializer (quantized per channel along
    ``axis``) or an activation (calibrated, per tensor; ``axis`` is None)."""

    node_index: int
    input_index: int
    tensor: str
    axis: int | None
    is_weight: bool


# --------------------------------------------------------------------------------------------
# loading and layer names
# --------------------------------------------------------------------------------------------

def _load_model(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file; every failure names the file (principle 5)."""
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError as exc:
        raise ArtifactError(f"ONNX model {path} does not exist") from exc
    except Exception as exc:  # DecodeError, ValidationError, OSError...: all mean "bad file"
        raise ArtifactError(f"cannot read ONNX model {path}: {type(exc).__name__}: {exc}") from exc
    if not _data_inputs(model.graph):
        raise ArtifactError(f"ONNX model {path} has no graph input to feed calibration data to")
    return model


def _ensure_opset(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Per-channel Q/DQ needs opset >= 13; older models are converted rather than refused."""
    version = _default_opset(model)
    if version >= MIN_OPSET:
        return model
    try:
        from onnx import version_converter
        converted = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise ConfigError(f"ONNX model {path} uses opset {version}; per-channel Q/DQ needs opset "
                          f">= {MIN_OPSET} and the conversion failed ({exc}); re-export it with "
                          f"opset_version>={MIN_OPSET}") from exc
    return converted


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 1


def _name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    """Give nameless nodes a stable name: results and ``exclude`` refer to nodes by name."""
    taken = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = _unique_name(f"{node.op_type}_{i}", taken)


def module_name_of(node_name: str) -> str:
    """The PyTorch module a node was exported from ("" for top-level ops).

    The legacy exporter names the node of module ``layer1.0.conv1`` ``/layer1/layer1.0/conv1/Conv``:
    children of containers repeat the container's path (``layer1`` -> ``layer1.0``), other
    children add their attribute name; older exporters wrote ``/layer1/0/conv1/Conv``. A scope
    component that extends the previous one by ``.<child>`` therefore adds only ``<child>``.
    """
    parts = [p for p in node_name.strip("/").split("/")[:-1] if p]
    module: list[str] = []
    previous = ""
    for part in parts:
        if previous and part.startswith(previous + "."):
            module.append(part[len(previous) + 1:])
        else:
            module.append(part)
        previous = part
    return ".".join(module)


def _matches(entry: str, node_name: str) -> bool:
    if entry == node_name:
        return True
    if "/" in entry:  # a node name: only exact matches (plus the literal scope-prefix rule)
        return node_name.startswith(entry.rstrip("/") + "/")
    module = module_name_of(node_name)
    return bool(module) and (module == entry or module.startswith(entry + "."))


def resolve_layers(model: onnx.ModelProto, names: Iterable[str],
                   op_types: Sequence[str] = QUANTIZABLE_OPS) -> dict[str, list[str]]:
    """Map each name (ONNX node name or PyTorch module name) to the quantizable nodes it means.

    Only nodes of ``op_types`` count: excluding a layer is only meaningful for nodes that would
    get Q/DQ, and an entry matching nothing is almost always a typo or a renamed layer, so it is
    an error that names the entry and shows what is available.
    """
    nodes = [n.name for n in model.graph.node if n.op_type in op_types]
    resolved = {name: [n for n in nodes if _matches(name, n)] for name in names}
    unmatched = [name for name, hits in resolved.items() if not hits]
    if unmatched:
        raise ConfigError(f"layer name(s) {', '.join(map(repr, unmatched))} match no "
                          f"{'/'.join(op_types)} node; available: {_describe_layers(nodes)}")
    return resolved


def _describe_layers(nodes: Sequence[str], limit: int = 8) -> str:
    shown = [f"{n} ({module_name_of(n)})" if module_name_of(n) else n for n in nodes[:limit]]
    more = f", ... ({len(nodes) - limit} more)" if len(nodes) > limit else ""
    return (", ".join(shown) + more) if shown else "(none)"


# --------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------

def _weight_axis(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The output-channel axis of a weight: what TensorRT expects per-channel scales along."""
    if node.op_type == "Conv":
        return 0  # [C_out, C_in/g, k...]
    if node.op_type == "ConvTranspose":
        return 1  # [C_in, C_out/g, k...]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1  # B is [N, K] when transposed, else [K, N]
    return weight.ndim - 1  # MatMul: B is [..., K, N]


def _plan(graph: onnx.GraphProto, excluded: set[str]) -> list[_QuantInput]:
    """Which inputs of which nodes get Q/DQ.

    Conv-like nodes quantize input 0 (activation) and input 1 (weight). MatMul may multiply two
    activations (attention); every non-constant input is then an activation. A weight that is not
    an initializer is calibrated like an activation. Inputs already fed by a DequantizeLinear are
    left alone so a partially quantized model is not quantized twice.
    """
    inits = {t.name: t for t in graph.initializer}
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    plan = []
    for ni, node in enumerate(graph.node):
        if node.op_type not in QUANTIZABLE_OPS or node.name in excluded:
            continue
        for ii, tensor in enumerate(node.input[:2]):
            if not tensor or tensor in dq_outputs:
                continue
            if ii == 1 and tensor in inits:
                weight = numpy_helper.to_array(inits[tensor])
                plan.append(_QuantInput(ni, ii, tensor, _weight_axis(node, weight), True))
            else:
                plan.append(_QuantInput(ni, ii, tensor, None, False))
    return plan


def _activation_tensors(plan: Sequence[_QuantInput]) -> list[str]:
    """Distinct activation tensors in graph order: one shared Q/DQ pair (and one amax) each."""
    return list(dict.fromkeys(q.tensor for q in plan if not q.is_weight))


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------

class _AbsStats:
    """Streaming statistics of |x| for one tensor: the running max and, for the histogram
    calibrators, a histogram over [0, range] with a FIXED number of bins.

    The bin count stays fixed because the KL search is quadratic in it: when a batch exceeds the
    range, the range doubles (as often as needed) and adjacent bins merge, which is exact since
    the old edges are a subset of the new ones. Memory stays O(num_bins) however many batches.
    """

    def __init__(self, num_bins: int, histogram: bool) -> None:
        self.num_bins = num_bins
        self.histogram = histogram
        self.amax = 0.0
        self.range = 0.0
        self.counts: np.ndarray | None = None
        self._leading_zeros = 0  # zeros seen before the first non-zero value fixed the range

    def add(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, dtype=np.float32)).ravel()
        if a.size == 0:
            return
        batch_max = float(a.max())
        self.amax = max(self.amax, batch_max)
        if not self.histogram:
            return
        if batch_max == 0.0 and self.counts is None:
            self._leading_zeros += a.size
            return
        if self.counts is None:
            self.range = batch_max
            self.counts = np.zeros(self.num_bins, dtype=np.int64)
            self.counts[0] += self._leading_zeros
        elif batch_max > self.range:
            self._grow(batch_max)
        self.counts += np.histogram(a, bins=self.num_bins, range=(0.0, self.range))[0]

    def _grow(self, new_max: float) -> None:
        factor = 1
        while self.range * factor < new_max:
            factor *= 2
        groups = -(-self.num_bins // factor)
        padded = np.zeros(groups * factor, dtype=np.int64)
        padded[:self.num_bins] = self.counts
        self.counts = np.zeros(self.num_bins, dtype=np.int64)
        self.counts[:groups] = padded.reshape(groups, factor).sum(axis=1)
        self.range *= factor

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.range, self.num_bins + 1)


def _compute_amax(stats: _AbsStats, config: OnnxPTQConfig) -> float:
    """Reduce one tensor's statistics to its amax with the configured calibrator.

    The result never exceeds the observed max: after range doubling the histogram may extend past
    it, and a clipping threshold above every value only wastes int8 resolution.
    """
    if config.calibrator == "minmax" or stats.counts is None:
        amax = stats.amax  # also the all-zero case, where a histogram never started
    else:
        # pytorch-quantization 2.1.3 (pinned) holds TensorRT's KL search; its HistogramCalibrator
        # grows its bin count without bound when later batches exceed the first one's max (and
        # the search is quadratic in bins), so we keep our own bounded histogram and call the
        # reduction functions HistogramCalibrator.compute_amax is built on.
        from pytorch_quantization.calib.histogram import (_compute_amax_entropy,
                                                          _compute_amax_percentile)
        counts, edges = _trimmed_histogram(stats)
        if config.calibrator == "entropy":
            amax = float(_compute_amax_entropy(counts.copy(), edges, 8, False,
                                               stride=1, start_bin=_ENTROPY_START_BIN))
        else:
            amax = float(_compute_amax_percentile(counts, edges, config.percentile))
        amax = min(amax, stats.amax)
    if math.isfinite(amax) and amax > _ZERO_AMAX_BOUND:
        return amax
    return stats.amax if stats.amax > _ZERO_AMAX_BOUND else _ZERO_TENSOR_AMAX


def _trimmed_histogram(stats: _AbsStats) -> tuple[np.ndarray, np.ndarray]:
    """Drop the empty bins past the last value (left by range doubling), as pytorch-quantization's
    own histogram would end there; keep enough bins for the KL search to have candidates."""
    used = int(np.flatnonzero(stats.counts)[-1]) + 1
    n = min(stats.num_bins, max(used, _ENTROPY_START_BIN + 1))
    return stats.counts[:n], stats.edges[:n + 1]


def _data_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _pick_input(graph: onnx.GraphProto, input_name: str | None) -> onnx.ValueInfoProto:
    inputs = _data_inputs(graph)
    if input_name is None:
        return inputs[0]
    for value in inputs:
        if value.name == input_name:
            return value
    raise ConfigError(f"input_name {input_name!r} is not a graph input; inputs are "
                      f"{', '.join(i.name for i in inputs)}")


def _as_feed(batch: object, value: onnx.ValueInfoProto, index: int) -> np.ndarray:
    """Convert a batch to the input's dtype and check it against the input's static dims."""
    tensor_type = value.type.tensor_type
    array = np.asarray(batch, dtype=helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if tensor_type.HasField("shape") and (
            len(dims) != array.ndim or any(d not in (None, s) for d, s in zip(dims, array.shape))):
        shown = tuple(d if d is not None else "?" for d in dims)
        raise DataError(f"calibration batch {index} has shape {tuple(array.shape)} but ONNX input "
                        f"{value.name!r} expects {shown}")
    return array


def _augmented_session(model: onnx.ModelProto, tensors: Sequence[str], path: Path):
    """An ONNX Runtime session whose outputs are the tensors to calibrate."""
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in tensors:
        if name not in existing:
            augmented.graph.output.append(helper.make_empty_tensor_value_info(name))
    try:
        return ort.InferenceSession(augmented.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot load {path} for calibration: {exc}") from exc


def _calibrate(model: onnx.ModelProto, tensors: Sequence[str], batches: Iterable[np.ndarray],
               config: OnnxPTQConfig, input_name: str | None, progress: bool,
               path: Path) -> dict[str, float]:
    """Run the fp32 model over the batches and return tensor -> amax, one batch in memory at a
    time. Tensors that are graph inputs come straight from the batch (no session output)."""
    feed_input = _pick_input(model.graph, input_name)
    from_feed = [t for t in tensors if t == feed_input.name]
    from_session = [t for t in tensors if t != feed_input.name]
    session = _augmented_session(model, from_session, path)
    stats = {t: _AbsStats(config.num_bins, config.calibrator != "minmax") for t in tensors}
    seen = 0
    for index, batch in enumerate(_progress(batches, progress, "calibrating", "batch")):
        feed = _as_feed(batch, feed_input, index)
        outputs = _run(session, from_session, feed_input.name, feed, index)
        for name, value in zip(from_session + from_feed, outputs + [feed] * len(from_feed)):
            if not np.isfinite(value).all():
                raise DataError(f"tensor {name!r} has NaN/Inf on calibration batch {index}; "
                                "check the calibration data and the fp32 model")
            stats[name].add(value)
        seen += 1
    if seen == 0:
        raise DataError(f"no calibration batches were given for {path}; ONNX PTQ needs at least one")
    names = _progress(tensors, progress and config.calibrator != "minmax", "computing amax", "tensor")
    return {t: _compute_amax(stats[t], config) for t in names}


def _run(session, outputs: list[str], input_name: str, feed: np.ndarray, index: int) -> list:
    if not outputs:
        return []
    try:
        return session.run(outputs, {input_name: feed})
    except Exception as exc:  # ORT raises its own types (Fail, InvalidArgument...) for bad shapes
        raise DataError(f"the model rejected calibration batch {index} of shape {feed.shape} on "
                        f"input {input_name!r}: {exc}") from exc


def _progress(items: Iterable, enabled: bool, desc: str, unit: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit=unit)


# --------------------------------------------------------------------------------------------
# Q/DQ insertion
# --------------------------------------------------------------------------------------------

def _unique_name(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _weight_scale(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """Symmetric scale amax/127, per slice along ``axis`` or per tensor (axis None)."""
    if axis is None:
        amax = np.abs(weight).max(initial=0.0)
    else:
        other = tuple(i for i in range(weight.ndim) if i != axis)
        amax = np.abs(weight).max(axis=other, initial=0.0)
    amax = np.where(amax > _ZERO_AMAX_BOUND, amax, _ZERO_TENSOR_AMAX)  # never a zero scale
    return np.asarray(amax / _INT8_MAX, dtype=np.float32)


def _qdq(tensor: str, scale: np.ndarray, axis: int | None, taken: set[str]
         ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Build QuantizeLinear -> DequantizeLinear for ``tensor`` (int8, zero point 0).

    Q and DQ share one scale initializer, so a broken or edited scale moves both, as it would in
    a TensorRT-fused int8 layer.
    """
    scale_name = _unique_name(f"{tensor}_scale", taken)
    zp_name = _unique_name(f"{tensor}_zero_point", taken)
    q_out = _unique_name(f"{tensor}_quantized", taken)
    dq_out = _unique_name(f"{tensor}_dequantized", taken)
    axis_attr = {} if axis is None else {"axis": axis}
    nodes = [
        helper.make_node("QuantizeLinear", [tensor, scale_name, zp_name], [q_out],
                         name=_unique_name(f"{tensor}_QuantizeLinear", taken), **axis_attr),
        helper.make_node("DequantizeLinear", [q_out, scale_name, zp_name], [dq_out],
                         name=_unique_name(f"{tensor}_DequantizeLinear", taken), **axis_attr),
    ]
    inits = [numpy_helper.from_array(scale, scale_name),
             numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), zp_name)]
    return nodes, inits, dq_out


def _insert_qdq(model: onnx.ModelProto, plan: Sequence[_QuantInput], amax: dict[str, float],
                per_channel: bool) -> int:
    """Rewire the planned inputs through Q/DQ pairs; returns the number of pairs inserted.

    Pairs are keyed by (tensor, axis), so a shared activation or a tied weight gets one pair.
    Each pair goes right after its tensor's producer (or first, for inputs and initializers),
    which keeps the node list topologically sorted as ONNX requires.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    taken = ({n.name for n in graph.node} | set(inits) | {v.name for v in graph.input}
             | {o for n in graph.node for o in n.output} | {v.name for v in graph.output})
    head: list[onnx.NodeProto] = []
    after: dict[int, list[onnx.NodeProto]] = {}
    rewired: dict[tuple[str, int | None], str] = {}
    for q in plan:
        axis = q.axis if (q.is_weight and per_channel) else None
        key = (q.tensor, axis)
        if key not in rewired:
            if q.is_weight:
                scale = _weight_scale(numpy_helper.to_array(inits[q.tensor]), axis)
            else:
                scale = np.asarray(amax[q.tensor] / _INT8_MAX, dtype=np.float32)
            nodes, new_inits, rewired[key] = _qdq(q.tensor, scale, axis, taken)
            graph.initializer.extend(new_inits)
            target = head if q.tensor not in producer else after.setdefault(producer[q.tensor], [])
            target.extend(nodes)
        graph.node[q.node_index].input[q.input_index] = rewired[key]
    ordered = head + [n for i, node in enumerate(graph.node) for n in [node, *after.get(i, [])]]
    del graph.node[:]
    graph.node.extend(ordered)
    return len(rewired)


def _save_atomic(model: onnx.ModelProto, out_path: Path) -> None:
    """A crash or Ctrl-C never leaves a truncated model where a cached artifact is expected."""
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------

def quantize_onnx(model_path: str | Path, out_path: str | Path, calib_batches: Iterable[np.ndarray],
                  config: OnnxPTQConfig, input_name: str | None = None,
                  progress: bool = False) -> PTQResult:
    """Calibrate a plain fp32 ONNX and write it with TensorRT-style explicit Q/DQ.

    ``calib_batches`` is consumed once, one batch at a time (a generator is fine); each batch is
    fed to ``input_name`` (default: the graph's first input). The output is checked with
    ``onnx.checker`` before it is written atomically to ``out_path``.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    model = _ensure_opset(_load_model(model_path), model_path)
    _name_unnamed_nodes(model.graph)
    excluded = [n for hits in resolve_layers(model, config.exclude).values() for n in hits]
    excluded = list(dict.fromkeys(excluded))
    plan = _plan(model.graph, set(excluded))
    tensors = _activation_tensors(plan)
    amax = _calibrate(model, tensors, calib_batches, config, input_name, progress, model_path)
    quantized = list(dict.fromkeys(model.graph.node[q.node_index].name for q in plan))
    pairs = _insert_qdq(model, plan, amax, config.per_channel)
    _check(model, model_path)
    _save_atomic(model, out_path)
    return PTQResult(quantized_nodes=quantized, excluded_nodes=excluded,
                     activation_amax=amax, qdq_pairs=pairs)


def _check(model: onnx.ModelProto, source: Path) -> None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:  # a bug here, not the user's: say so
        raise ArtifactError(f"quantizing {source} produced an invalid ONNX model: {exc}") from exc


def scale_qdq(model_path: str | Path, out_path: str | Path, tensor_substring: str,
              factor: float) -> list[str]:
    """Multiply the scales of the Q/DQ pairs whose quantized tensor name contains
    ``tensor_substring`` by ``factor``; returns the scale tensors changed.

    For planting a broken calibration in tests: a parity or accuracy check that does not fail on
    the result cannot see calibration regressions. Works on any Q/DQ ONNX (ours or an exported
    pytorch-quantization model), whether scales are initializers or Constant nodes.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    model = _load_model(model_path)
    graph = model.graph
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    matched = [n for n in quantizers if tensor_substring in n.input[0]]
    if not matched:
        available = ", ".join(sorted({n.input[0] for n in quantizers})[:8]) or "(none)"
        raise ConfigError(f"no QuantizeLinear in {model_path} quantizes a tensor containing "
                          f"{tensor_substring!r}; quantized tensors include: {available}")
    q_outputs = {n.output[0] for n in matched}
    dequantizers = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in q_outputs]
    scales = list(dict.fromkeys(n.input[1] for n in matched + dequantizers))
    for name in scales:
        _multiply_constant(graph, name, factor, model_path)
    _save_atomic(model, out_path)
    return scales


def _multiply_constant(graph: onnx.GraphProto, name: str, factor: float, path: Path) -> None:
    def scaled(tensor: onnx.TensorProto) -> onnx.TensorProto:
        array = numpy_helper.to_array(tensor)
        return numpy_helper.from_array((array * factor).astype(array.dtype), tensor.name)

    for tensor in graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(scaled(tensor))
            return
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(scaled(attr.t))
                    return
    raise ArtifactError(f"scale {name!r} in {path} is neither an initializer nor a Constant value")


# --------------------------------------------------------------------------------------------
# the ONNX-quantizer interface (qatcheck.registry.ONNX_QUANTIZERS; --qatcheck-trt-ptq picks one)
# --------------------------------------------------------------------------------------------

class OnnxQuantizer:
    """Writes the ``trt_ptq`` / ``partial`` Q/DQ graph from the fp32 ONNX. Registered by name in
    :data:`qatcheck.registry.ONNX_QUANTIZERS`; the artifact builder asks the table once."""

    #: the table's name for it (``--qatcheck-trt-ptq <name>``; the "(name)" in the calibrator column)
    name: str = ""

    def quantize(self, model_path: str | Path, out_path: str | Path, calib_batches: Iterable[np.ndarray],
                 config: OnnxPTQConfig, input_name: str | None = None, progress: bool = False) -> object:
        """Calibrate ``model_path`` on ``calib_batches`` and write the Q/DQ graph to ``out_path``
        (atomically), as :func:`quantize_onnx` does."""
        raise NotImplementedError

    def cache_id(self) -> str | None:
        """What, besides the settings, shapes the graph and so enters its cache key (None: qatcheck's
        own build code, already in every key)."""
        return None

    def setting(self) -> str:
        """Who wrote the graph, as a baseline keeps it (qatcheck.judges names it when it changes)."""
        return self.name

    def missing_reason(self) -> str | None:
        """Why it cannot run here, with what to install (None: it can)."""
        return None


class QatcheckPTQ(OnnxQuantizer):
    """qatcheck's own ONNX PTQ (:func:`quantize_onnx`): the default."""

    name = "qatcheck"

    def quantize(self, model_path, out_path, calib_batches, config, input_name=None, progress=False):
        return quantize_onnx(model_path, out_path, calib_batches, config, input_name=input_name,
                             progress=progress)
