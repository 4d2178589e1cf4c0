"""The fp16 ONNX as TensorRT deploys it: constants folded in fp32 first, out-of-range ones kept.

TensorRT reads a BatchNormalization's four constants in fp32 at build time (folded into the
convolution it follows, or turned into a per-channel scale and shift) and folds arithmetic on
constants in fp32, before any layer runs in fp16. Converting the graph as it stands
(onnxruntime's ``convert_float_to_float16``) rounds every constant to fp16 first instead: PP-OCRv4's
text detector keeps an unfused BatchNorm whose variance reaches 9.79e7, clamped to 65504, and its
fp16 map fell to cosine 0.33 vs fp32 although the engine TensorRT builds from the same file is
fine. So before the conversion (:func:`prepare`), in fp32:

1. a float elementwise node whose inputs are all constants (initializers or ``Constant`` nodes)
   is computed and becomes an initializer;
2. a BatchNormalization with constant parameters is folded into the ``Conv`` it follows (when it
   is that conv's only reader and the conv's weights are constants), else into a ``Mul`` and an
   ``Add`` by its per-channel scale and shift; its output keeps its name;
3. a node that still reads a float constant fp16 cannot hold - beyond fp16's largest finite value
   (65504), or with every non-zero value below its smallest subnormal (all of them would become
   +-6e-8) - is kept in fp32 (the converter's node block list), its constants given to it as fp32
   initializers of its own.

A graph with nothing to fold or keep is converted exactly as before (byte for byte): the built-in
recipes' exports have their BatchNorms folded by the PyTorch exporter already.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: fp16's largest finite value and its smallest subnormal
FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24

#: the float elementwise ops computed on constant inputs (numpy broadcasts as ONNX does)
_FOLDABLE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
             "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Abs": np.abs,
             "Exp": np.exp, "Log": np.log}


@dataclass
class Fp16Plan:
    """What :func:`prepare` did to the fp32 graph before its fp16 conversion."""

    #: one line per node folded in fp32 ("BatchNormalization bn1 into Conv conv1")
    folded: list[str] = field(default_factory=list)
    #: node name -> why it stays in fp32 ("BatchNormalization bn0: constant 'var' up to 9.79e+07 ...")
    kept: dict[str, str] = field(default_factory=dict)

    def notes(self, shown: int = 8) -> list[str]:
        """The lines the report prints under the table for the cases that ran this fp16 graph."""
        out = []
        if self.folded:
            more = f", and {len(self.folded) - shown} more" if len(self.folded) > shown else ""
            out.append(f"fp16 ONNX: {len(self.folded)} node(s) folded in fp32 before the conversion, as "
                       f"TensorRT folds them at build time: {'; '.join(self.folded[:shown])}{more}")
        if self.kept:
            out.append("fp16 kept in fp32 (constants outside fp16's range): " + "; ".join(self.kept.values()))
        return out

    def info(self) -> dict:
        """The artifact's info (Artifact.info; the cache keeps it with the file)."""
        return {"fp16_folded": list(self.folded), "fp16_kept": dict(self.kept), "notes": self.notes()}


class _Constants:
    """Float constants of a graph by tensor name: initializers and ``Constant`` nodes' values."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self._names = {t for n in graph.node for t in (n.name, *n.input, *n.output)} | set(self.inits) | \
            {v.name for v in (*graph.input, *graph.output)}

    def value(self, name: str) -> np.ndarray | None:
        """The float32 constant named ``name`` (None: not a constant, or not float32)."""
        if name in self.inits:
            v = numpy_helper.to_array(self.inits[name])
        elif name in self.nodes:
            attr = next((a for a in self.nodes[name].attribute if a.name == "value"), None)
            if attr is None:
                return None
            v = numpy_helper.to_array(attr.t)
        else:
            return None
        return v if v.dtype == np.float32 else None

    def fresh(self, stem: str) -> str:
        """A tensor / node name not yet in the graph, from ``stem``."""
        name, i = stem, 1
        while name in self._names:
            i += 1
            name = f"{stem}_{i}"
        self._names.add(name)
        return name

    def add(self, stem: str, value: np.ndarray) -> str:
        """A new fp32 initializer (a fresh name from ``stem``); returns its name."""
        name = self.fresh(stem)
        t = numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
        self.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def drop_unused(self, candidates: set[str]) -> None:
        """Remove the initializers / Constant nodes among ``candidates`` nothing reads any more."""
        g = self.graph
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        gone = {c for c in candidates if c not in used}
        keep_inits = [t for t in g.initializer if t.name not in gone]
        del g.initializer[:]
        g.initializer.extend(keep_inits)
        keep_inputs = [v for v in g.input if v.name not in gone]
        del g.input[:]
        g.input.extend(keep_inputs)
        keep_nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output and n.output[0] in gone)]
        del g.node[:]
        g.node.extend(keep_nodes)


def _attr(node: onnx.NodeProto, name: str, default):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} {node.name or node.output[0]}"


def _fold_constants(model: onnx.ModelProto, plan: Fp16Plan) -> set[str]:
    """Step 1: float elementwise nodes on constant inputs computed in fp32. Returns the constants
    they read (to drop once unused)."""
    g = model.graph
    c = _Constants(g)
    outputs = {o.name for o in g.output}
    read: set[str] = set()
    kept_nodes = []
    for node in g.node:
        fn = (_FOLDABLE.get(node.op_type) if node.domain in ("", "ai.onnx") and len(node.output) == 1
              and node.output[0] not in outputs else None)
        values = [c.value(i) for i in node.input] if fn is not None else [None]
        if fn is None or not node.input or any(v is None for v in values):
            kept_nodes.append(node)
            continue
        with np.errstate(all="ignore"):
            out = np.asarray(fn(*values), dtype=np.float32)
        t = numpy_helper.from_array(out, node.output[0])
        g.initializer.append(t)
        c.inits[t.name] = t
        read.update(node.input)
        plan.folded.append(f"{_label(node)} (constant inputs)")
    if len(kept_nodes) != len(g.node):
        del g.node[:]
        g.node.extend(kept_nodes)
    return read


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """tensor name -> rank, by shape inference (on a copy: the model itself is not touched)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - a BatchNorm of unknown rank is then left as it is
        return {}
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in (*g.value_info, *g.input, *g.output)
            if v.type.tensor_type.HasField("shape")}


def _fold_batchnorms(model: onnx.ModelProto, plan: Fp16Plan) -> set[str]:
    """Step 2: each BatchNormalization with constant parameters, into its Conv or a Mul/Add.
    Returns the constants it read (to drop once unused)."""
    g = model.graph
    c = _Constants(g)
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    outputs = {o.name for o in g.output}
    ranks: dict[str, int] | None = None
    read: set[str] = set()
    new_nodes = []
    for bn in g.node:
        params = [c.value(i) for i in bn.input[1:5]] if bn.op_type == "BatchNormalization" else []
        if (len(params) != 4 or any(p is None for p in params) or any(bn.output[1:])
                or _attr(bn, "training_mode", 0) or bn.domain not in ("", "ai.onnx")):
            new_nodes.append(bn)
            continue
        scale, bias, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        s = scale / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        t = bias - mean * s
        x = bn.input[0]
        conv = producer.get(x)
        w = c.value(conv.input[1]) if conv is not None and conv.op_type == "Conv" and len(conv.input) > 1 else None
        b = (c.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(len(s), np.float32)) \
            if w is not None else None
        if (w is not None and b is not None and readers.get(x) == 1 and x not in outputs
                and w.shape[0] == len(s) and b.size == len(s)):
            stem = conv.name or conv.output[0]
            w_name = c.add(f"{stem}_bnfold_w", w.astype(np.float64) * s.reshape(-1, *[1] * (w.ndim - 1)))
            b_name = c.add(f"{stem}_bnfold_b", b.astype(np.float64) * s + t)
            read.update(conv.input[1:3])
            del conv.input[1:]
            conv.input.extend([w_name, b_name])
            conv.output[0] = bn.output[0]
            plan.folded.append(f"{_label(bn)} into Conv {conv.name or conv.output[0]}")
        else:
            if ranks is None:
                ranks = _ranks(model)
            rank = ranks.get(x)
            if rank is None or rank < 2:
                new_nodes.append(bn)  # left as it is: the range scan decides
                continue
            shape = (len(s),) + (1,) * (rank - 2)
            stem = bn.name or bn.output[0]
            s_name = c.add(f"{stem}_scale", s.reshape(shape))
            t_name = c.add(f"{stem}_shift", t.reshape(shape))
            scaled = c.fresh(f"{bn.output[0]}_scaled")
            new_nodes.append(helper.make_node("Mul", [x, s_name], [scaled], name=f"{stem}/scale"))
            new_nodes.append(helper.make_node("Add", [scaled, t_name], [bn.output[0]], name=f"{stem}/shift"))
            plan.folded.append(f"{_label(bn)} into Mul/Add")
        read.update(bn.input[1:5])
    if len(new_nodes) != len(g.node) or any(a is not b for a, b in zip(new_nodes, g.node)):
        del g.node[:]
        g.node.extend(new_nodes)
    return read


def _why_kept(v: np.ndarray | None) -> str | None:
    """Why fp16 cannot hold the constant ``v`` (None when it can, or ``v`` is no float constant)."""
    if v is None:
        return None
    a = np.abs(v[np.isfinite(v)]).astype(np.float64)
    if a.size == 0:
        return None
    top = float(a.max())
    if top > FP16_MAX:
        return f"up to {top:.3g}, beyond fp16's largest value {FP16_MAX:g}"
    if 0.0 < top < FP16_TINY:
        return f"at most {top:.3g}, every value below fp16's smallest subnormal {FP16_TINY:.3g}"
    return None


def _keep_out_of_range(model: onnx.ModelProto, plan: Fp16Plan) -> list[str]:
    """Step 3: the nodes reading a constant fp16 cannot hold, kept in fp32 (their names, made unique
    where needed, for the converter's node block list); each reads its constants from fp32
    initializers only it and other kept nodes read."""
    g = model.graph
    c = _Constants(g)
    kept: list[tuple[onnx.NodeProto, list[str]]] = []
    for node in g.node:
        if node.op_type == "Constant":
            continue
        why = [f"constant {i!r} {r}" for i in dict.fromkeys(node.input) if i
               for r in [_why_kept(c.value(i))] if r]
        if why:
            kept.append((node, why))
    if not kept:
        return []
    names = [n.name for n in g.node]
    for node, why in kept:  # the block list goes by name: a kept node's must be its own
        if not node.name or names.count(node.name) > 1:
            node.name = c.fresh(f"{node.op_type}_{node.output[0]}_fp32")
        plan.kept[node.name] = f"{_label(node)} ({'; '.join(why)})"
    ids = {id(n) for n, _ in kept}
    fp16_readers = {i for n in g.node if id(n) not in ids for i in n.input}
    private: dict[str, str] = {}
    moved: set[str] = set()
    for node, _ in kept:
        for k, i in enumerate(node.input):
            v = c.value(i) if i else None
            if v is None or (i in c.inits and i not in fp16_readers):
                continue  # not a float constant, or an initializer the converter leaves fp32
            if i not in private:
                private[i] = c.add(f"{i}_fp32", v)
            node.input[k] = private[i]
            moved.add(i)
    c.drop_unused(moved)
    return [n.name for n, _ in kept]


def prepare(model: onnx.ModelProto) -> tuple[Fp16Plan, list[str]]:
    """Fold and scan ``model`` (fp32) in place for its fp16 conversion (the module docstring):
    returns what was done and the node block list. Untouched when there is nothing to do."""
    plan = Fp16Plan()
    read = _fold_constants(model, plan)
    read |= _fold_batchnorms(model, plan)
    if read:
        _Constants(model.graph).drop_unused(read)
    return plan, _keep_out_of_range(model, plan)
