"""Q/DQ placement rules for residual, CSP and SPP blocks (YOLO-style graphs), torch_ptq / qat path.

pytorch-quantization puts one Q/DQ in front of each conv / linear / pooling input and nothing else.
TensorRT's explicit-quantization rules want more, and want it consistent:

* **residual Add** (``residual_add``): both Add inputs quantized, so TensorRT fuses the Add into the
  int8 conv that produces the residual branch instead of running it in fp32. The identity input
  reuses the quantizer the block's first conv already applies to the same tensor (one tensor, one
  scale); the residual branch gets a new quantizer, ``<block>._qdq_add_residual``.
* **Concat** (``shared_concat``): every Concat input passes through a quantizer, and all of them
  are *the same* ``TensorQuantizer`` object (``<block>._qdq_concat``, a ``ModuleList`` with one
  entry per input, every entry the same module). The quantizer that consumes the Concat's output
  (the next conv's input quantizer) and the quantizers of blocks that read a Concat input (a C2f's
  bottlenecks) are replaced by that same object too. All inputs then carry one scale and the
  output the same scale, so TensorRT concatenates int8 tensors in place, with no re-quantization
  between int8 tensors.
* **MaxPool** (``shared_maxpool``): a MaxPool's input quantizer is the shared quantizer of the
  tensors it pools (SPPF / SPP: the Concat quantizer; a MaxPool layer of an ultralytics layer graph:
  it becomes its consumers' input quantizer), so the pooled int8 tensor needs no re-quantization.
* **ignore**: regexes full-matched against module names; every quantizer inside a matching module
  (or a module below it) is disabled and no rule touches it - the layer runs unquantized.

*Sharing* means literally one module registered under several names: calibration collects one
histogram over every tensor it sees (its amax covers all Concat inputs), QAT trains one amax, and
:func:`qatcheck.quantize.torch_quant.save_quantized` / ``load_quantized`` store and restore it under each
name (``load_quantized`` re-applies the rules, so the rebuilt model shares the same objects).

Rules are keyed by block class (exact class, by qualified name, so ultralytics need not be
imported): ultralytics ``Bottleneck``, ``C2f``, ``C3``, ``SPPF``, ``SPP``, ``Concat``; qatcheck's
``ResidualBlock`` (DigitDetector) and ``BasicBlock`` (DigitsNet); and pytorch-quantization's
``QuantMaxPool2d`` when it is a layer of an ultralytics layer graph. A rule adds quantizer
submodules and installs a quantization-aware copy of the block's ``forward`` (an instance
attribute, as ultralytics' own ``fuse`` does), which reads the optional quantizers: with every
quantizer disabled it computes exactly what the original forward does. Other blocks with the same
structure (attribute names) can reuse a rule: ``register_block_rule(MyC2f, "shared_concat", c2f_rule,
c2f_forward)``.

Which quantizers read a block's input is found by convention (``input_slots``): a Quant layer's own
``_input_quantizer``; what a rule recorded in ``_qdq_input_slots``; else the block's ``cv1``
(ultralytics blocks) or ``conv`` (ultralytics ``Conv``, ``conv_bn`` sequences).
"""
from __future__ import annotations

import re
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from qatcheck.errors import ConfigError
from qatcheck.recipe import QDQRules  # noqa: F401 (the rules' settings are recipe vocabulary)

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["QDQRules", "RuleContext", "apply_qdq_rules", "register_block_rule", "input_slots",
           "bottleneck_rule", "c2f_rule", "c3_rule", "sppf_rule", "spp_rule", "concat_rule",
           "RULE_KINDS"]

RULE_KINDS = ("residual_add", "shared_concat", "shared_maxpool")


# ---- registry ----------------------------------------------------------------------------------
Rule = Callable[["nn.Module", "RuleContext"], "str | None"]


@dataclass
class _BlockSpec:
    forward: Callable[..., Any] | None
    rules: dict[str, Rule] = field(default_factory=dict)


_REGISTRY: dict[str, _BlockSpec] = {}


def _key(cls: type | str) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def register_block_rule(block: type | str, kind: str, rule: Rule,
                        forward: Callable[..., Any] | None = None) -> None:
    """Apply ``rule(module, ctx)`` to every module of exactly class ``block`` (a class or its
    ``"module.QualName"``) when the rule ``kind`` is on; ``forward`` (a function taking the module
    first) replaces the module's forward once any rule applied to it. A rule returns a one-line
    description of what it did (or None when it did nothing)."""
    if kind not in RULE_KINDS:
        raise ConfigError(f"unknown Q/DQ rule kind {kind!r}; choose one of {', '.join(RULE_KINDS)}")
    spec = _REGISTRY.setdefault(_key(block), _BlockSpec(forward))
    if forward is not None:
        spec.forward = forward
    spec.rules[kind] = rule


# ---- context -------------------------------------------------------------------------------------
class RuleContext:
    """What a rule may use: the model, the rules, a factory for new quantizers (calibrated like the
    layers' input quantizers) and slot tying that respects ``ignore`` and disabled quantizers."""

    def __init__(self, model: nn.Module, rules: QDQRules, new_quantizer: Callable[[], nn.Module]) -> None:
        self.model, self.rules, self._new = model, rules, new_quantizer
        self.names = {id(m): n for n, m in model.named_modules()}
        self._patterns = [re.compile(p) for p in rules.ignore]
        self.ties = 0

    def name(self, module: nn.Module) -> str:
        return self.names.get(id(module), "?")

    def ignored(self, module_or_name: nn.Module | str) -> bool:
        """Whether a module (or a module name) is, or sits below, a module ``ignore`` matches."""
        name = module_or_name if isinstance(module_or_name, str) else self.names.get(id(module_or_name))
        if name is None or not self._patterns:
            return False
        parts = name.split(".") if name else []
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(p.fullmatch(pre) for p in self._patterns for pre in prefixes)

    def new_quantizer(self) -> nn.Module:
        return self._new()

    def parent(self, module: nn.Module) -> nn.Module | None:
        name = self.names.get(id(module))
        if not name:
            return None
        return self.model.get_submodule(name.rpartition(".")[0])

    def tie(self, slots: Sequence[tuple[nn.Module, str]], quantizer: nn.Module) -> int:
        """Make every slot ``(owner, attribute)`` hold ``quantizer``, skipping slots of ignored
        modules and slots whose quantizer is disabled (``exclude``d layers stay unquantized)."""
        n = 0
        for owner, attr in slots:
            current = getattr(owner, attr, None)
            if self.ignored(owner) or (current is not None and getattr(current, "_disabled", False)):
                continue
            if current is not quantizer:
                setattr(owner, attr, quantizer)
                n += 1
        self.ties += n
        return n


def _is_quantizer(obj: Any) -> bool:
    from pytorch_quantization.nn import TensorQuantizer

    return isinstance(obj, TensorQuantizer)


def input_slots(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """The ``(owner, attribute)`` of every quantizer that reads ``module``'s input tensor directly
    (see the module doc for the convention); empty when unknown."""
    if _is_quantizer(getattr(module, "_input_quantizer", None)):
        return [(module, "_input_quantizer")]
    recorded = module.__dict__.get("_qdq_input_slots")
    if recorded is not None:
        return [(module.get_submodule(path), attr) for path, attr in recorded]
    for attr in ("cv1", "conv"):
        sub = module._modules.get(attr)
        if sub is not None:
            return input_slots(sub)
    return []


def _relative(block: nn.Module, slots: Sequence[tuple[nn.Module, str]]) -> list[tuple[str, str]]:
    paths = {id(m): n for n, m in block.named_modules()}
    return [(paths[id(owner)], attr) for owner, attr in slots if id(owner) in paths]


def _quant(module: nn.Module, attr: str, index: int | None = None) -> Callable[[Any], Any]:
    """The quantizer a rule installed (an entry of a ModuleList when ``index`` is given), or the
    identity when the rule is off."""
    q = module._modules.get(attr)
    if q is None:
        return _identity
    return q[min(index, len(q) - 1)] if index is not None else q


def _identity(x: Any) -> Any:
    return x


def _shared(ctx: RuleContext, count: int) -> tuple[nn.Module, nn.Module]:
    """One new quantizer and a ModuleList holding it ``count`` times (one entry per Concat input)."""
    from torch import nn

    q = ctx.new_quantizer()
    return q, nn.ModuleList([q] * max(1, count))


# ---- residual Add ----------------------------------------------------------------------------
def _residual(block: nn.Module, ctx: RuleContext, first: Sequence[nn.Module],
              identity_is_input: bool) -> str:
    """Install ``_qdq_add_identity`` / ``_qdq_add_residual`` on ``block``. When the identity is the
    block input, its quantizer is the one ``first`` (the modules reading the input) already apply,
    if there is exactly one enabled; the block's input slots are recorded for enclosing rules."""
    slots = [s for m in first for s in input_slots(m)]
    current = {id(getattr(o, a)): getattr(o, a) for o, a in slots}
    enabled = [q for q in current.values() if not q._disabled]
    if identity_is_input and len(current) == 1 and enabled:
        identity, how = enabled[0], "shares the first conv's input quantizer"
    else:
        identity, how = ctx.new_quantizer(), "own quantizer"
    block._qdq_add_identity = identity
    block._qdq_add_residual = ctx.new_quantizer()
    if identity_is_input:
        block.__dict__["_qdq_input_slots"] = _relative(block, slots) + [("", "_qdq_add_identity")]
    return f"residual Add: both inputs quantized (identity: {how})"


def bottleneck_rule(block: nn.Module, ctx: RuleContext) -> str | None:
    """ultralytics ``Bottleneck``: ``x + cv2(cv1(x))`` when ``add``."""
    if not getattr(block, "add", False):
        return None
    return _residual(block, ctx, [block.cv1], identity_is_input=True)


def bottleneck_forward(self: nn.Module, x: Any) -> Any:
    if not self.add:
        return self.cv2(self.cv1(x))
    return _quant(self, "_qdq_add_identity")(x) + _quant(self, "_qdq_add_residual")(self.cv2(self.cv1(x)))


def residual_block_rule(block: nn.Module, ctx: RuleContext) -> str:
    """qatcheck ``ResidualBlock`` (DigitDetector): ``relu(bn2(conv2(conv1(x))) + x)``."""
    return _residual(block, ctx, [block.conv1], identity_is_input=True)


def residual_block_forward(self: nn.Module, x: Any) -> Any:
    branch = self.bn2(self.conv2(self.conv1(x)))
    return self.relu(_quant(self, "_qdq_add_residual")(branch) + _quant(self, "_qdq_add_identity")(x))


def basic_block_rule(block: nn.Module, ctx: RuleContext) -> str:
    """qatcheck ``BasicBlock`` (DigitsNet): identity is ``x`` or ``downsample(x)``."""
    first = [block.conv1] + ([block.downsample] if block.downsample is not None else [])
    text = _residual(block, ctx, first, identity_is_input=block.downsample is None)
    if block.downsample is not None:
        block.__dict__["_qdq_input_slots"] = _relative(block, [s for m in first for s in input_slots(m)])
    return text


def basic_block_forward(self: nn.Module, x: Any) -> Any:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
    return self.relu2(_quant(self, "_qdq_add_residual")(out) + _quant(self, "_qdq_add_identity")(identity))


# ---- Concat / MaxPool --------------------------------------------------------------------------
def c2f_rule(block: nn.Module, ctx: RuleContext) -> str:
    """ultralytics ``C2f``: ``cv2(cat([*cv1(x).chunk(2), m0(y1), m1(m0(y1)), ...]))``; the
    bottlenecks read Concat inputs, so their input quantizers become the shared one."""
    q, block._qdq_concat = _shared(ctx, 2 + len(block.m))
    ctx.tie(input_slots(block.cv2), q)
    for m in block.m:
        ctx.tie(input_slots(m), q)
    return f"Concat of {2 + len(block.m)} inputs shares one quantizer with cv2 and the bottleneck inputs"


def c2f_forward(self: nn.Module, x: Any) -> Any:
    import torch

    y = [_quant(self, "_qdq_concat", i)(t) for i, t in enumerate(self.cv1(x).chunk(2, 1))]
    for i, m in enumerate(self.m):
        y.append(_quant(self, "_qdq_concat", i + 2)(m(y[-1])))
    return self.cv2(torch.cat(y, 1))


def c3_rule(block: nn.Module, ctx: RuleContext) -> str:
    """ultralytics ``C3``: ``cv3(cat((m(cv1(x)), cv2(x))))``."""
    q, block._qdq_concat = _shared(ctx, 2)
    ctx.tie(input_slots(block.cv3), q)
    return "Concat of 2 inputs shares one quantizer with cv3"


def c3_forward(self: nn.Module, x: Any) -> Any:
    import torch

    return self.cv3(torch.cat((_quant(self, "_qdq_concat", 0)(self.m(self.cv1(x))),
                               _quant(self, "_qdq_concat", 1)(self.cv2(x))), 1))


def sppf_rule(block: nn.Module, ctx: RuleContext) -> str:
    """ultralytics ``SPPF``: ``cv2(cat([y, m(y), m(m(y)), ...]))`` with ``y = cv1(x)``; the MaxPool
    reads Concat inputs, so with ``shared_maxpool`` its input quantizer is the shared one."""
    n = int(getattr(block, "n", 3))
    q, block._qdq_concat = _shared(ctx, n + 1)
    ctx.tie(input_slots(block.cv2), q)
    text = f"Concat of {n + 1} inputs shares one quantizer with cv2"
    if ctx.rules.shared_maxpool and ctx.tie(input_slots(block.m), q):
        text += " and the MaxPool input"
    return text


def sppf_residual_rule(block: nn.Module, ctx: RuleContext) -> str | None:
    """``SPPF(shortcut=True)``: ``cv2(...) + x``."""
    if not getattr(block, "add", False):
        return None
    return _residual(block, ctx, [block.cv1], identity_is_input=True)


def sppf_forward(self: nn.Module, x: Any) -> Any:
    import torch

    y = [_quant(self, "_qdq_concat", 0)(self.cv1(x))]
    for i in range(int(getattr(self, "n", 3))):
        y.append(_quant(self, "_qdq_concat", i + 1)(self.m(y[-1])))
    out = self.cv2(torch.cat(y, 1))
    if getattr(self, "add", False):
        return _quant(self, "_qdq_add_residual")(out) + _quant(self, "_qdq_add_identity")(x)
    return out


def spp_rule(block: nn.Module, ctx: RuleContext) -> str:
    """ultralytics ``SPP``: ``cv2(cat([y] + [m(y) for m in self.m]))`` with ``y = cv1(x)``."""
    q, block._qdq_concat = _shared(ctx, 1 + len(block.m))
    ctx.tie(input_slots(block.cv2), q)
    text = f"Concat of {1 + len(block.m)} inputs shares one quantizer with cv2"
    if ctx.rules.shared_maxpool and ctx.tie([s for m in block.m for s in input_slots(m)], q):
        text += " and the MaxPool inputs"
    return text


def spp_forward(self: nn.Module, x: Any) -> Any:
    import torch

    y = _quant(self, "_qdq_concat", 0)(self.cv1(x))
    return self.cv2(torch.cat([y] + [_quant(self, "_qdq_concat", i + 1)(m(y)) for i, m in enumerate(self.m)], 1))


def _graph_consumers(layer: nn.Module, ctx: RuleContext) -> list[nn.Module]:
    """Layers of an ultralytics layer graph (a Sequential whose layers carry ``i`` and ``f``) that
    read ``layer``'s output alone (``f == -1`` right after it, or ``f == layer.i``)."""
    parent = ctx.parent(layer)
    index = getattr(layer, "i", None)
    if parent is None or index is None:
        return []
    out = []
    for other in parent.children():
        f, j = getattr(other, "f", None), getattr(other, "i", None)
        if j is not None and ((f == -1 and j == index + 1) or (isinstance(f, int) and f == index and f != -1)):
            out.append(other)
    return out


def concat_rule(block: nn.Module, ctx: RuleContext) -> str:
    """ultralytics ``Concat`` layer: ``cat(x, d)`` over the layers ``f`` names; the layer that reads
    its output (in the ultralytics layer graph) gets the shared quantizer as its input quantizer."""
    f = getattr(block, "f", None)
    q, block._qdq_concat = _shared(ctx, len(f) if isinstance(f, (list, tuple)) else 1)
    tied = sum(ctx.tie(input_slots(c), q) for c in _graph_consumers(block, ctx))
    return f"Concat inputs share one quantizer ({tied} consumer quantizer(s) tied)"


def concat_forward(self: nn.Module, x: Sequence[Any]) -> Any:
    import torch

    return torch.cat([_quant(self, "_qdq_concat", i)(t) for i, t in enumerate(x)], self.d)


def maxpool_layer_rule(block: nn.Module, ctx: RuleContext) -> str | None:
    """A ``QuantMaxPool2d`` layer of an ultralytics layer graph: the layers reading its output use
    its input quantizer (max-pooling keeps int8 values on their grid)."""
    consumers = _graph_consumers(block, ctx)
    q = block._input_quantizer
    if not consumers or q._disabled:
        return None
    tied = sum(ctx.tie(input_slots(c), q) for c in consumers)
    return f"MaxPool input quantizer shared with {tied} consumer quantizer(s)" if tied else None


def _register_builtin() -> None:
    ul = "ultralytics.nn.modules"
    register_block_rule(f"{ul}.block.Bottleneck", "residual_add", bottleneck_rule, bottleneck_forward)
    register_block_rule(f"{ul}.block.C2f", "shared_concat", c2f_rule, c2f_forward)
    register_block_rule(f"{ul}.block.C3", "shared_concat", c3_rule, c3_forward)
    register_block_rule(f"{ul}.block.SPPF", "shared_concat", sppf_rule, sppf_forward)
    register_block_rule(f"{ul}.block.SPPF", "residual_add", sppf_residual_rule, sppf_forward)
    register_block_rule(f"{ul}.block.SPP", "shared_concat", spp_rule, spp_forward)
    register_block_rule(f"{ul}.conv.Concat", "shared_concat", concat_rule, concat_forward)
    register_block_rule("pytorch_quantization.nn.modules.quant_pooling.QuantMaxPool2d", "shared_maxpool",
                        maxpool_layer_rule)
    register_block_rule("qatcheck.zoo.digit_detector.ResidualBlock", "residual_add", residual_block_rule,
                        residual_block_forward)
    register_block_rule("qatcheck.zoo.digits_net.BasicBlock", "residual_add", basic_block_rule,
                        basic_block_forward)


_register_builtin()


# ---- entry point -------------------------------------------------------------------------------
def _disable_ignored(model: nn.Module, ctx: RuleContext) -> None:
    names = [n for n, m in model.named_modules() if n and not _is_quantizer(m)]
    for pattern in ctx.rules.ignore:
        if not any(re.fullmatch(pattern, n) for n in names):
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise ConfigError(f"QDQRules.ignore pattern {pattern!r} matches no module (full match on "
                              f"module names); modules: {shown}")
    for name, module in model.named_modules():
        if _is_quantizer(module) and ctx.ignored(name.rpartition(".")[0]):
            module.disable()


def apply_qdq_rules(model: nn.Module, rules: QDQRules,
                    new_quantizer: Callable[[], nn.Module]) -> list[str]:
    """Apply ``rules`` in place to a model whose layers pytorch-quantization already replaced
    (:func:`qatcheck.quantize.torch_quant.quantize_model` calls this). Returns one line per block the
    rules changed (``"model.2 (C2f): Concat of 3 inputs shares one quantizer ..."``).

    Blocks are visited children first, so a C2f sees the input quantizers its bottlenecks' rules
    set up. ``new_quantizer()`` returns a fresh input quantizer (same calibrator as the layers')."""
    ctx = RuleContext(model, rules, new_quantizer)
    _disable_ignored(model, ctx)
    done: list[str] = []
    for name, module in reversed(list(model.named_modules())):
        spec = _REGISTRY.get(_key(type(module)))
        if spec is None or ctx.ignored(name):
            continue
        applied = []
        for kind, rule in spec.rules.items():
            if rules.enabled(kind):
                text = rule(module, ctx)
                if text:
                    applied.append(text)
        if applied:
            if spec.forward is not None:
                module.forward = types.MethodType(spec.forward, module)
            done.append(f"{name} ({type(module).__name__}): " + "; ".join(applied))
    return done
