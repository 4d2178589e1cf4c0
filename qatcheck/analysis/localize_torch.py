"""Localize where low precision departs from fp32 in a PyTorch model (``torch_ptq`` / ``qat`` /
``fp8`` fake-quant, ``fp16`` in half: :func:`qatcheck.analysis.localize.torch_modes`).

The ONNX Runtime path (:mod:`qatcheck.analysis.localize`) cannot take the quantized modes: their
pytorch-quantization export keeps BatchNorm unfused, so its tensor names match the fp32 graph's
but not their values. Their PyTorch modules keep the fp32 model's module names instead
(:func:`qatcheck.quantize.torch_quant.quantize_model` swaps ``Conv2d`` for ``QuantConv2d`` in
place; ModelOpt's fake-quant modules likewise), so :func:`localize_modules` compares the two
models module by module, with forward hooks. An fp16 module is the fp32 model in half: every
module computes in fp16, and is fed the fp32 model's values rounded to fp16 for its own SQNR.

Rows
----
A row is one call of a *leaf* module: a module whose children are only quantizers
(``QuantConv2d`` / ``QuantLinear`` / ``QuantMaxPool2d``... with their ``_input_quantizer`` and
``_weight_quantizer``) or that has no children (BatchNorm, ReLU, Upsample...); a module called
twice gives rows ``name`` and ``name#2``. A quantizer called outside any leaf (a Q/DQ placement
rule's residual-Add or Concat quantizer, :mod:`qatcheck.quantize.qdq_rules`) is a row of its own.
Rows are in execution order. Each row has, over the eval samples:

* SQNR and cosine of the quantized model's output of that module vs the fp32 model's output of
  the module with the same name (end to end: the error it inherits included), and the worst
  SQNR of its inputs (the same comparison on what the module reads);
* its **own SQNR**: the quantized module (its input and weight quantizers included) run on the
  fp32 model's input to that module, vs the fp32 module on the same input - the layer's own
  contribution, so downstream layers are not blamed for the error they inherit (the idea of the
  ONNX path's own SQNR). A module with no enabled quantizer and fp32's weights computes exactly
  what fp32 computes: cap (300 dB), not run.
  A conv whose output only its BatchNorm reads has its own SQNR measured *after* that BatchNorm
  (fp32's BN applied to both): deployment folds BN into the conv, so this is the error the next
  layer sees (what the ONNX path measures on the BN-folded conv), and the BN row itself is exact
  (torch_ptq) or carries the BN's own fine-tuning drift (qat). BN outputs are rows too: their
  cumulative cosine is the one the fp32 ONNX graph calls the conv's output.
* a rule quantizer's own SQNR is the quantizer applied to its input in the quantized model run
  with every quantizer off (for torch_ptq that is fp32's value at that point; for qat the
  fine-tuned float model's), and its end-to-end row compares with that value too.

``qat``: the fine-tuned weights differ from fp32's. Every row is still compared with the fp32
model, so own SQNR is "the fine-tuned quantized layer vs the fp32 layer on the fp32 layer's
input": quantization and fine-tuning drift together, which is what the parity check against fp32
sees. Layers whose weights differ also get ``quant_only_sqnr_db``: the same quantized layer vs
itself with its quantizers off, on the same input - the quantization alone.

The rule (:func:`qatcheck.analysis.localize_kernel.conclude`) is the ONNX path's: the first row whose
cosine vs fp32 is below the floor, and the lowest own SQNR among it and its ancestors. Ancestors
are the data flow, not the execution order: one traced forward of the quantized model on one
sample, with autograd on, links each row's inputs back through functional ops (``+``,
``torch.cat``, ``flatten``) to the rows that produced them (a parallel head that runs earlier is
not an ancestor). Where a row reads a tensor autograd cannot trace (detached, a constant), the
previous row in execution order counts as its producer, which keeps every earlier row in its cone.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from qatcheck.analysis.localize_kernel import (_CAP_DB, AutoLocalization, Localization, calibrator_of,
                                               check_floor, failure_floor, layer_row, localization,
                                               localize_command, torch_modes, with_mode_calibrator)
from qatcheck.errors import ConfigError, DataError
# a fake-quant module of any registered TorchQuantizer; its own implementation answers the rest
from qatcheck.quantize.torch_common import is_enabled as _enabled, is_quantizer as _is_quantizer, \
    set_enabled as _set_enabled
from qatcheck.parity import ParityAccumulator

__all__ = ["localize_modules", "localize_torch", "for_failed_case", "leaf_modules", "RULE"]

RULE = ("contribution = own SQNR: the quantized module (with its input and weight quantizers) "
        "run on the fp32 module's input vs the fp32 module's output, lowest first; named = the "
        "lowest own SQNR among the first module whose cosine vs fp32 < floor and its ancestors "
        "(data flow); none when no module is below the floor")
#: bytes the stored fp32 activations of one sub-batch may take (a batch is split to fit)
ACTIVATION_BUDGET = 256 << 20
_MODEL = "(model)"  # the display name of a root module that is itself a leaf


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------

def _quantizers_only(m: nn.Module) -> bool:
    """A quantizer, or a container (ModuleList...) holding only quantizers."""
    if _is_quantizer(m):
        return True
    if not isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
        return False
    children = list(m.children())
    return bool(children) and all(_quantizers_only(c) for c in children)


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> module for the modules a row is made of: not a quantizer, and no child but
    quantizers (``QuantConv2d`` with its two quantizers; BatchNorm; ReLU)."""
    out = {}
    for name, m in model.named_modules():
        if _quantizers_only(m) or not all(_quantizers_only(c) for c in m.children()):
            continue
        out[name] = m
    return out


def _quantizers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if _is_quantizer(m)]


@contextlib.contextmanager
def _quantizers_off(quantizers: Iterable[nn.Module]) -> Iterator[None]:
    """Every given quantizer disabled (a pass-through), its state restored afterwards."""
    saved = [(q, _enabled(q)) for q in dict.fromkeys(quantizers)]
    for q, _ in saved:
        _set_enabled(q, False)
    try:
        yield
    finally:
        for q, on in saved:
            _set_enabled(q, on)


def _free_quantizers(model: nn.Module, leaves: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """name -> enabled quantizer, for the hooks that catch quantizer calls outside any leaf. A
    quantizer shared by a layer and a rule (a residual Add's identity reuses the block's first
    conv's input quantizer) is named by the rule's slot (``layer1._qdq_add_identity``), the name a
    call outside the layer is made through."""
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not _is_quantizer(m) or not _enabled(m):
            continue
        in_leaf = name.rpartition(".")[0] in leaves
        if id(m) not in names or (not in_leaf and names[id(m)].rpartition(".")[0] in leaves):
            names[id(m)] = name
    by_id = {id(m): m for m in model.modules()}
    return {name: by_id[i] for i, name in names.items()}


def _same_weights(qm: nn.Module, fm: nn.Module) -> bool:
    """Whether ``qm`` holds ``fm``'s parameters and buffers (its quantizers' amax aside), in its
    own precision (an fp16 module holds fp32's weights rounded to fp16)."""
    qs = qm.state_dict()
    for k, v in fm.state_dict().items():
        if k not in qs or qs[k].shape != v.shape or not torch.equal(qs[k].to(v.device), v.to(qs[k].dtype)):
            return False
    return True


def _float_dtype(model: nn.Module) -> torch.dtype:
    """What a model computes in: its first floating parameter's dtype (fp32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _to(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating tensor in it converted to ``dtype`` (an fp16 module is fed the
    fp32 model's values rounded to fp16)."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, dtype) for k, v in obj.items()}
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _flat(obj: Any) -> torch.Tensor | None:
    """Every float tensor in ``obj``, flattened into one fp32 copy (None when there is none)."""
    ts = _tensors(obj)
    if not ts:
        return None
    return torch.cat([t.detach().reshape(-1).float() for t in ts])


def _clone(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_clone(o) for o in obj)
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------

class _Calls:
    """Forward hooks on a model's leaves and quantizers, while in a ``with`` block. Each leaf call,
    and each quantizer call outside any leaf, gets a key (``name``, ``name#2``...) and is handed
    to ``pre(key, name, module, args, kwargs)`` / ``post(key, name, module, args, kwargs,
    output)``. Calls made while :meth:`paused` are not seen (a hook that runs a module itself)."""

    def __init__(self, leaves: dict[str, nn.Module], quantizers: dict[str, nn.Module],
                 pre: Callable | None = None, post: Callable | None = None) -> None:
        self.leaves, self.quantizers = leaves, quantizers
        self.pre, self.post = pre, post
        self._handles: list = []
        self._depth = 0
        self._paused = 0
        self._count: dict[str, int] = defaultdict(int)
        self._keys: list[str] = []

    def __enter__(self) -> _Calls:
        for kind, mods in (("leaf", self.leaves), ("quantizer", self.quantizers)):
            for name, m in mods.items():
                self._handles.append(m.register_forward_pre_hook(
                    partial(self._on_pre, name, kind), with_kwargs=True))
                self._handles.append(m.register_forward_hook(
                    partial(self._on_post, name, kind), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _on_pre(self, name, kind, module, args, kwargs):
        if self._paused:
            return None
        if kind == "leaf":
            self._depth += 1
            if self._depth > 1:
                return None
        elif self._depth:  # a quantizer inside a leaf is that leaf's own
            return None
        self._count[name] += 1
        n = self._count[name]
        key = (name or _MODEL) + (f"#{n}" if n > 1 else "")
        self._keys.append(key)
        if self.pre is not None:
            self.pre(key, name or _MODEL, module, args, kwargs)
        return None

    def _on_post(self, name, kind, module, args, kwargs, output):
        if self._paused:
            return None
        if kind == "leaf":
            self._depth -= 1
            if self._depth > 0:
                return None
        elif self._depth:
            return None
        key = self._keys.pop()
        if self.post is not None:
            self.post(key, name or _MODEL, module, args, kwargs, output)
        return None


# --------------------------------------------------------------------------------------------
# structure: rows in execution order, and who feeds whom
# --------------------------------------------------------------------------------------------

_INPUT = "<input>"
_UNKNOWN = "<unknown>"


@dataclass
class _Row:
    key: str
    name: str
    op: str
    quantizer: bool  # a rule quantizer called outside any leaf
    producers: list[str] = field(default_factory=list)


def _trace(qmodel: nn.Module, leaves: dict[str, nn.Module], quantizers: dict[str, nn.Module],
           x: torch.Tensor) -> tuple[list[_Row], int]:
    """One forward of the quantized model on ``x`` (one sample) with autograd on: the rows in
    execution order with their producers (the data flow, see the module doc), and the bytes one
    sample's stored activations take."""
    x = x.detach().clone().requires_grad_(True)
    rows: list[_Row] = []
    inputs: dict[str, list] = {}
    out_fn: dict[Any, str] = {}  # grad_fn -> the row that produced it (the first one)
    nbytes = 0

    def pre(key, name, module, args, kwargs):
        nonlocal nbytes
        ins = []
        for t in _tensors((args, kwargs)):
            nbytes += t.numel() * 4
            if t.grad_fn is not None:
                ins.append(t.grad_fn)
            elif t is x:
                ins.append(_INPUT)
            elif not t.requires_grad:  # detached, or a constant: autograd cannot say
                ins.append(_UNKNOWN)
        inputs[key] = ins

    def post(key, name, module, args, kwargs, output):
        nonlocal nbytes
        rows.append(_Row(key, name, "TensorQuantizer" if _is_quantizer(module) else type(module).__name__,
                         quantizer=_is_quantizer(module)))
        own_inputs = set(g for g in inputs[key] if not isinstance(g, str))
        for t in _tensors(output):
            nbytes += t.numel() * 4
            # a module that returns its input unchanged (Identity, a disabled quantizer) does not
            # produce it
            if t.grad_fn is not None and t.grad_fn not in own_inputs:
                out_fn.setdefault(t.grad_fn, key)

    with torch.enable_grad(), _Calls(leaves, quantizers, pre, post):
        qmodel(x)

    memo: dict[Any, frozenset] = {}

    def frontier(fn) -> frozenset:
        stack = [(fn, False)]
        while stack:
            node, expanded = stack.pop()
            if node in memo:
                continue
            if node in out_fn:
                memo[node] = frozenset((out_fn[node],))
                continue
            children = [c for c, _ in node.next_functions if c is not None]
            if not expanded:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in memo)
                continue
            acc: set = set()
            for c in children:
                acc |= memo[c]
            if type(node).__name__ == "AccumulateGrad" and getattr(node, "variable", None) is x:
                acc.add(_INPUT)
            memo[node] = frozenset(acc)
        return memo[fn]

    order = {r.key: i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        found: set[str] = set()
        for g in inputs[r.key]:
            if g == _UNKNOWN:
                if i:
                    found.add(rows[i - 1].key)
            elif g != _INPUT:
                found |= frontier(g)
        r.producers = sorted((p for p in found if p in order and order[p] < i), key=order.get)
    return rows, max(1, nbytes)


def _bn_after(rows: list[_Row], fmodel_leaves: dict[str, nn.Module]) -> dict[str, str]:
    """conv row key -> the BatchNorm row key, where the BN is the conv output's only reader and
    reads nothing else (deployment folds it into the conv)."""
    consumers: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        for p in r.producers:
            consumers[p].append(r.key)
    by_key = {r.key: r for r in rows}
    out = {}
    for r in rows:
        if r.quantizer or not r.op.startswith("Quant") or "Conv" not in r.op:
            continue
        readers = consumers.get(r.key, [])
        if len(readers) != 1:
            continue
        bn = by_key[readers[0]]
        fbn = fmodel_leaves.get(bn.name)
        if (isinstance(fbn, nn.modules.batchnorm._BatchNorm) and bn.producers == [r.key]
                and "#" not in bn.key):
            out[r.key] = bn.key
    return out


# --------------------------------------------------------------------------------------------
# the localization
# --------------------------------------------------------------------------------------------

def _as_tensor(x: Any, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def localize_modules(qmodel: nn.Module, fmodel: nn.Module, batches, *, floor: float = 0.99,
                     recipe: str = "", mode: str = "", calibrator: str | None = None,
                     quantized: str = "(in memory)", fp32: str = "the recipe's fp32 model",
                     device: str = "cpu") -> Localization:
    """Localize on two PyTorch models with the same module names (see the module doc) over
    ``(inputs, targets, real count)`` batches. ``qmodel`` may be planted (an amax scaled)."""
    from qatcheck.backends.torch_backend import strict_fp32

    check_floor(floor)
    t0 = time.perf_counter()
    qmodel = qmodel.to(device).eval()
    # a low-precision module (fp16) computes in its own dtype: every layer of it differs from fp32
    qdtype = _float_dtype(qmodel)
    lowp = qdtype != torch.float32
    fmodel = fmodel.to(device).eval()
    qleaves, fleaves = leaf_modules(qmodel), leaf_modules(fmodel)
    free_q = _free_quantizers(qmodel, qleaves)
    all_q = _quantizers(qmodel)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise DataError("localize: the eval data yielded no samples")
    with strict_fp32(str(device).startswith("cuda")):
        rows, per_sample = _trace(qmodel, qleaves, free_q, _as_tensor(first[0][:1], device).to(qdtype))
    rows = [r for r in rows if r.quantizer or r.name in fleaves]  # a leaf must have its fp32 twin
    if not rows:
        raise ConfigError("the quantized model and the fp32 model share no module name to compare")
    keys = {r.key for r in rows}
    row_of = {r.key: r for r in rows}
    skipped = [n for n in qleaves if n not in fleaves]
    bn_after = _bn_after(rows, fleaves)
    plan: dict[str, tuple[bool, bool]] = {}  # key -> (run own, run quant-only)
    moved = False  # some module's weights are not fp32's (qat)
    for r in rows:
        if r.quantizer:
            continue
        qm, fm = qleaves[r.name], fleaves[r.name]
        quant = any(_enabled(q) for q in _quantizers(qm))
        same = _same_weights(qm, fm)
        moved |= not same
        plan[r.key] = (quant or not same or lowp, quant and not same)
    chunk = max(1, ACTIVATION_BUDGET // per_sample)

    cum = {k: ParityAccumulator() for k in keys}
    own = {k: ParityAccumulator() for k in keys}
    qonly = {k: ParityAccumulator() for k, (_, quant_only) in plan.items() if quant_only}
    ins: dict[str, list[ParityAccumulator]] = defaultdict(list)
    seen: set[str] = set()
    samples = 0

    def sub_batches():
        for x, _, n in itertools.chain([first], batches):
            x = np.asarray(x)[:n]
            for i in range(0, n, chunk):
                yield _as_tensor(x[i:i + chunk], device)

    with torch.no_grad(), strict_fp32(str(device).startswith("cuda")):
        for xb in sub_batches():
            ref_out: dict[str, torch.Tensor | None] = {}
            ref_in: dict[str, list[torch.Tensor]] = {}
            saved: dict[str, Any] = {}

            # 1. fp32: every leaf's output and inputs; each layer's own error on those inputs
            def f_pre(key, name, module, args, kwargs):
                if key in keys:
                    ref_in[key] = [t.detach().reshape(-1).float().clone() for t in _tensors((args, kwargs))]
                    if plan[key][0]:
                        saved[key] = _clone((args, kwargs))

            def f_post(key, name, module, args, kwargs, output):
                if key not in keys:
                    return
                ref_out[key] = _flat(output)
                if key not in saved:
                    return
                args_, kwargs_ = saved.pop(key)
                qm = qleaves[name]
                with fcalls.paused():
                    ref = output
                    bn = fleaves[row_of[bn_after[key]].name] if key in bn_after else None
                    if key in qonly:
                        with _quantizers_off(_quantizers(qm)):
                            yf = qm(*_to(_clone(args_), qdtype), **_to(_clone(kwargs_), qdtype))
                    yq = qm(*_to(args_, qdtype), **_to(kwargs_, qdtype))
                    if bn is not None:
                        ref, yq = bn(ref), bn(_to(yq, torch.float32))
                        if key in qonly:
                            yf = bn(yf)
                    r_, o_ = _flat(ref), _flat(yq)
                    if r_ is None or o_ is None or r_.shape != o_.shape:
                        raise ConfigError(f"{name}: the quantized module's output does not match "
                                          "the fp32 module's")
                    own[key].update(r_, o_)
                    if key in qonly:
                        qonly[key].update(_flat(yf), o_)

            with _Calls(fleaves, {}, f_pre, f_post) as fcalls:
                fmodel(xb)

            # 2. rule quantizers: their input in the quantized model with every quantizer off
            twin: dict[str, torch.Tensor] = {}
            if any(r.quantizer for r in rows):
                def t_pre(key, name, module, args, kwargs):
                    if key in keys and row_of[key].quantizer:
                        twin[key] = _clone(args[0])

                with _quantizers_off(all_q), _Calls(qleaves, free_q, t_pre, None):
                    qmodel(xb.to(qdtype))
                for key, v in twin.items():
                    own[key].update(v.reshape(-1).float(), _flat(free_q[row_of[key].name](v)))
                    ref_out[key] = v.reshape(-1).float()
                    ref_in[key] = [v.reshape(-1).float()]

            # 3. the quantized model: every row's output and inputs vs the references
            def q_pre(key, name, module, args, kwargs):
                if key not in keys or key not in ref_in:
                    return
                cur = _tensors((args, kwargs))
                if len(cur) != len(ref_in[key]):
                    return
                accs = ins[key]
                while len(accs) < len(cur):
                    accs.append(ParityAccumulator())
                for acc, r_, t in zip(accs, ref_in[key], cur):
                    o_ = t.detach().reshape(-1).float()
                    if r_.shape == o_.shape:
                        acc.update(r_, o_)

            def q_post(key, name, module, args, kwargs, output):
                if key not in keys or ref_out.get(key) is None:
                    return
                o_ = _flat(output)
                r_ = ref_out[key]
                if o_ is None or o_.shape != r_.shape:
                    raise ConfigError(f"{key}: output of {0 if o_ is None else o_.numel()} values "
                                      f"in the quantized model and {r_.numel()} in the fp32 model")
                cum[key].update(r_, o_)
                seen.add(key)

            with _Calls(qleaves, free_q, q_pre, q_post):
                qmodel(xb.to(qdtype))
            samples += len(xb)

    out_rows = []
    kept = [r for r in rows if r.key in seen]
    skipped += [r.key for r in rows if r.key not in seen]
    kept_keys = {r.key for r in kept}
    for idx, r in enumerate(kept):
        run_own = r.quantizer or plan[r.key][0]
        out_rows.append(layer_row(
            idx, r.key, r.name, r.op, r.name, cum[r.key], own[r.key] if run_own else None,
            min((a.sqnr_db() for a in ins.get(r.key, [])), default=_CAP_DB),
            [p for p in r.producers if p in kept_keys],
            own_after=row_of[bn_after[r.key]].name if r.key in bn_after else None,
            quant_only_sqnr_db=qonly[r.key].sqnr_db() if r.key in qonly else None))
    if not out_rows:
        raise ConfigError("localize: no module of the quantized model ran in both models")
    return localization(
        out_rows, floor, skipped, t0, recipe=recipe, mode=mode, calibrator=calibrator, samples=samples,
        quantized=quantized, fp32=fp32, rule=RULE, path="torch", order="execution",
        method=_method(mode, quantized, fp32, device, moved, any(r.quantizer for r in kept)))


def _method(mode: str, quantized: str, fp32: str, device: str, drift: bool, rule_q: bool) -> str:
    text = (f"The {mode or 'quantized'} PyTorch model (`{quantized}`) vs {fp32} in PyTorch "
            f"({device}), module by module (forward hooks on the same module names); own SQNR: "
            "the low-precision module on the fp32 module's input (in its own precision) vs the fp32 "
            "module (a quantized conv read only by its BatchNorm: after that BatchNorm, as deployment "
            "folds it)")
    if drift:
        text += (". The reference is the fp32 model, whose weights are not this model's (QAT "
                 "fine-tuned them, BatchNorm statistics included): own SQNR is quantization and "
                 "fine-tuning drift together; quant-only is a quantized layer whose weights moved "
                 "vs itself with its quantizers off (the quantization alone)")
    if rule_q:
        text += (". A Q/DQ rule's quantizer (residual Add, Concat) is compared with its input in "
                 "the quantized model run with every quantizer off")
    return text


def low_precision_module(artifact) -> nn.Module:
    """The module a torch artifact computes with: an fp16 artifact's module in half (what the
    torch runner runs); a fake-quant one as it is."""
    return artifact.module.half() if artifact.precision == "fp16" else artifact.module


def _described(artifact, mode: str) -> str:
    return str(artifact.path) if artifact.path is not None else f"the fp32 model in {artifact.precision} ({mode})"


def localize_torch(recipe, mode: str = "torch_ptq", *, max_samples: int | None = 64,
                   floor: float = 0.99, cache_dir: str | Path = ".qatcheck_cache",
                   calibrator: str | None = None, device: str | None = None) -> Localization:
    """Localize ``recipe``'s ``mode`` module (fp16: the fp32 model in half; torch_ptq / qat / fp8:
    the fake-quant module from the artifact cache, built there on ``device`` when missing) against
    its fp32 model on the first ``max_samples`` eval samples. ``recipe``: a Recipe, or a
    :class:`~qatcheck.workspace.RecipeWorkspace` (its cache; its device unless ``device`` is given)."""
    from qatcheck.workspace import workspace_of

    if mode not in torch_modes():
        raise ConfigError(f"localize_torch: mode {mode!r} has no low-precision PyTorch module; "
                          f"choose one of {', '.join(torch_modes())}")
    ws = workspace_of(recipe, cache_dir, device=device)
    ws = ws.derive(with_mode_calibrator(ws.recipe, mode, calibrator))
    recipe, builder = ws.recipe, ws.builder
    qa = builder.torch_artifact(mode)
    batches = ws.eval_batches(pad=False, max_samples=max_samples)
    return localize_modules(low_precision_module(qa), builder.torch_artifact("fp32").module, batches,
                            floor=floor, recipe=recipe.name, mode=mode,
                            calibrator=calibrator_of(recipe, mode), quantized=_described(qa, mode),
                            device=ws.device)


def for_failed_case(view, max_samples: int = 32, auto=None) -> list[str]:
    """The automatic localization of a failed parity case of a mode with a low-precision PyTorch
    module (fp16, torch_ptq, qat, fp8; static shape): the mode's module vs the recipe's fp32 model,
    where the run built them (``view``: the case's :class:`~qatcheck.workspace.CaseView`). A case
    judged against its own PyTorch model (an exported graph on another backend: export parity)
    gets one line saying why there is none - its quantization is the PyTorch case's. ``auto``: the
    session's :class:`~qatcheck.analysis.localize.AutoLocalization` (budget, reuse)."""
    from qatcheck.modes import parity_reference, spec as mode_spec

    case = view.case
    if case.mode not in torch_modes() or case.shape:
        return []
    ref = parity_reference(case.mode, case.backend)
    if ref is None:
        return []
    if ref[1] != "quantization":
        return [f"(no localization: {case.backend} runs the export of {case.mode} and is compared "
                f"with {ref[0]} in PyTorch; where quantization damage enters is localized on the "
                f"{case.recipe}-{case.mode}-torch case)"]
    recipe = view.recipe
    builder = view.builder
    qa, fp32 = builder.torch_artifact(case.mode), builder.torch_artifact("fp32")
    floor = failure_floor(view)
    batches = view.workspace.eval_batches(pad=False, max_samples=max_samples)

    def localize(until):
        return localize_modules(low_precision_module(qa), fp32.module, until(batches), floor=floor,
                                recipe=recipe.name, mode=case.mode, calibrator=calibrator_of(recipe, case.mode),
                                quantized=_described(qa, case.mode), device=builder.device)

    # fp16's module is fp32's weights run in half: the precision is part of what was localized
    key = ("torch", mode_spec(case.mode).precision, qa.digest, fp32.digest, floor, max_samples, builder.device)
    return (auto or AutoLocalization()).lines(
        case.id, key, localize, view.reports_dir,
        localize_command(view, max_samples, floor, "--path", "torch", "--device", builder.device))
