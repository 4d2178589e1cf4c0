"""Pruned variants of the built-in detector: channels removed (structural) or zeroed (mask).

The first sample repo quantizes a *pruned* YOLOv5s with QAT. Pruning leaves two things an int8
recipe has to survive, and these helpers make both out of
:class:`~qatcheck.zoo.digit_detector.DigitDetector`:

* **structural** (:func:`remove_channels`): output channels removed from convs, ranked by the L1
  norm of their filters (:func:`select_channels`; Li et al., "Pruning Filters for Efficient
  ConvNets"), with the BatchNorm behind each conv and the input channels of every conv that reads
  them cut to match. Channel counts become odd (7, 13, 27, 51, 45, 19), as a pruner's do, and the
  Q/DQ graph carries per-channel scales of those lengths.
* **mask** (:func:`mask_channels`): the same channels zeroed in place with
  ``torch.nn.utils.prune`` (the mask made permanent with ``prune.remove``), shapes unchanged. The
  BN behind a masked conv gets weight and bias 0 too, so the channel is exactly 0 after BN, and
  the BN-folded conv of the ONNX export has weight 0 and bias 0 there. Every zeroed channel
  calibrates to amax 0: the case where a per-channel weight scale of 0 would reach QuantizeLinear
  (TensorRT's parser refuses it: "Scale coefficients must all be positive").

Both use the same channels, so the mask-pruned model computes the same function as the
structurally pruned one (a zero channel contributes nothing to the layer that reads it);
:func:`expand_to_mask` turns a structurally pruned model back into full width with zeros, which is
how the mask variant of a fine-tuned pruned checkpoint is made.

Which convs may lose channels is decided by the graph, not by the ranking
(:func:`detector_groups`): ``down1`` and ``block1.conv2`` meet in the residual Add (their channels
must stay aligned) and the head output convs are the outputs. Everything else is prunable;
``down2.b`` feeds the upsample + Concat, so its reader ``fuse.conv`` is cut at the Concat offset
(after ``down1``'s channels).

The shipped pruned checkpoint (``digit_detector_pruned.pt``) is the shipped detector pruned by
:data:`DETECTOR_PLAN` and fine-tuned for 4 epochs (``python -m qatcheck.zoo.train_pruned``,
seeded): pruning without fine-tuning costs this small net too much (mAP@.5:.95 65.3 -> 39.4), and a
pruned checkpoint is what the sample repos quantize. Loading it (:func:`load_pruned_detector`)
trains nothing, so the suites pay nothing for the fine-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from qatcheck.errors import ArtifactError

__all__ = ["PruneGroup", "DETECTOR_PLAN", "PRUNED_CHECKPOINT", "KINDS", "detector_groups",
           "l1_keep_indices", "select_channels", "remove_channels", "zero_channels", "mask_channels",
           "expand_to_mask", "prune_structural", "prune_mask", "load_pruned_detector",
           "channel_counts"]

PRUNED_CHECKPOINT = Path(__file__).resolve().parent / "digit_detector_pruned.pt"
PRUNE_HINT = "rebuild it with `python -m qatcheck.zoo.train_pruned`"
KINDS = ("structural", "mask")


@dataclass(frozen=True)
class PruneGroup:
    """One set of channels that must be pruned together: the ``conv`` that produces them, the
    ``bn`` behind it (or None) and the convs that read them, each with the offset of these channels
    in its input (non-zero behind a Concat)."""

    conv: str
    bn: str | None
    readers: tuple[tuple[str, int], ...]


def detector_groups(model: nn.Module) -> dict[str, PruneGroup]:
    """The prunable channel groups of a DigitDetector, by the name of their producing block.

    ``fuse.conv`` reads ``cat([c4, up(c8)])``: c4 (``down1``'s channels) comes first, so the
    channels of ``down2.b`` start at ``down1``'s output width in its input.
    """
    c4 = model.get_submodule("down1.conv").out_channels
    groups = {
        "stem": PruneGroup("stem.conv", "stem.bn", (("expand.conv", 0),)),
        "expand": PruneGroup("expand.conv", "expand.bn", (("down1.conv", 0),)),
        "block1.conv1": PruneGroup("block1.conv1.conv", "block1.conv1.bn", (("block1.conv2", 0),)),
        "down2.a": PruneGroup("down2.a.conv", "down2.a.bn", (("down2.b.conv", 0),)),
        "down2.b": PruneGroup("down2.b.conv", "down2.b.bn", (("fuse.conv", c4),)),
        "fuse": PruneGroup("fuse.conv", "fuse.bn", tuple((f"{h}.conv.conv", 0)
                                                          for h in ("heatmap", "size", "offset"))),
    }
    for head in ("heatmap", "size", "offset"):
        groups[f"{head}.conv"] = PruneGroup(f"{head}.conv.conv", f"{head}.conv.bn", ((f"{head}.out", 0),))
    return groups


#: Output channels each group keeps (shipped widths 8, 16, 32, 64, 64, 32 and 24 per head): 93 of
#: 312 prunable channels (30 %) removed, odd counts everywhere.
DETECTOR_PLAN: dict[str, int] = {
    "stem": 7, "expand": 13, "block1.conv1": 27, "down2.a": 51, "down2.b": 45, "fuse": 27,
    "heatmap.conv": 19, "size.conv": 13, "offset.conv": 13,
}


def l1_keep_indices(conv: nn.Module, keep: int) -> list[int]:
    """Indices (ascending) of the ``keep`` output channels of ``conv`` with the largest L1 filter
    norm; ties go to the lower index, so the choice is deterministic."""
    weight = conv.weight.detach()
    n = weight.shape[0]
    if not 0 < keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} output channels")
    norms = weight.abs().reshape(n, -1).double().sum(1).tolist()
    order = sorted(range(n), key=lambda i: (-norms[i], i))
    return sorted(order[:keep])


def _check_plain_conv(conv: nn.Module, name: str) -> None:
    # exact type: quantize_model only swaps exact nn.Conv2d, and a subclass may override forward
    if type(conv) is not nn.Conv2d or conv.groups != 1:
        raise ValueError(f"{name}: only ungrouped nn.Conv2d layers are pruned, got {conv}")


def _resolve(model: nn.Module, names: Iterable[str]) -> dict[str, PruneGroup]:
    groups = detector_groups(model)
    unknown = sorted(set(names) - set(groups))
    if unknown:
        raise ValueError(f"unknown prune group(s) {unknown}; prunable: {', '.join(groups)}")
    for name in names:
        _check_plain_conv(model.get_submodule(groups[name].conv), groups[name].conv)
        for reader, _ in groups[name].readers:
            _check_plain_conv(model.get_submodule(reader), reader)
    return {name: groups[name] for name in names}


def select_channels(model: nn.Module, plan: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """The output channels each group of ``plan`` (default :data:`DETECTOR_PLAN`) keeps: the
    ``plan[group]`` with the largest L1 norm. Every group is ranked on the weights as they are now,
    before any cut ("independent" pruning in Li et al.): ranking a reader after its inputs were cut
    would change its norms."""
    plan = DETECTOR_PLAN if plan is None else plan
    groups = _resolve(model, plan)
    return {name: l1_keep_indices(model.get_submodule(groups[name].conv), int(keep))
            for name, keep in plan.items()}


def _cut(module: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    """Keep ``idx`` along ``dim`` of the parameter or buffer ``name`` (absent: nothing)."""
    t = getattr(module, name, None)
    if t is None:
        return
    with torch.no_grad():
        new = t.detach().index_select(dim, idx).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


def remove_channels(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> nn.Module:
    """Structural pruning, in place (the model is returned): each group's conv keeps only the
    output channels ``kept[group]``; the BN behind it and every reader's input channels are cut to
    match. The modules stay ``nn.Conv2d`` / ``nn.BatchNorm2d`` with new channel counts."""
    groups = _resolve(model, kept)
    for name, channels in kept.items():
        group = groups[name]
        idx = torch.as_tensor(sorted(set(int(c) for c in channels)), dtype=torch.long)
        conv = model.get_submodule(group.conv)
        width = conv.out_channels
        if len(idx) == 0 or int(idx[-1]) >= width:
            raise ValueError(f"{name}: channels {list(channels)} do not fit {group.conv} ({width} channels)")
        for p in ("weight", "bias"):
            _cut(conv, p, idx, 0)
        conv.out_channels = len(idx)
        if group.bn is not None:
            bn = model.get_submodule(group.bn)
            for p in ("weight", "bias", "running_mean", "running_var"):
                _cut(bn, p, idx, 0)
            bn.num_features = len(idx)
        for reader_name, offset in group.readers:
            reader = model.get_submodule(reader_name)
            all_in = torch.arange(reader.in_channels)
            _cut(reader, "weight", torch.cat([all_in[:offset], idx + offset, all_in[offset + width:]]), 1)
            reader.in_channels = reader.weight.shape[1]
    return model


def zero_channels(model: nn.Module, conv_name: str, bn_name: str | None, channels: Iterable[int]) -> None:
    """Zero whole output channels of one conv in place (weight, bias) and, when given, the weight
    and bias of the BN behind it, so those channels output exactly 0 for every input. Shapes
    unchanged."""
    conv = model.get_submodule(conv_name)
    idx = torch.as_tensor(sorted(set(int(c) for c in channels)), dtype=torch.long)
    mask = torch.ones_like(conv.weight)
    mask[idx] = 0
    # torch.nn.utils.prune's mask, made permanent at once: a plain ``weight`` parameter again, no
    # forward pre-hook and no weight_orig / weight_mask entries, so export, quantization and the
    # state dict see an ordinary conv
    prune.custom_from_mask(conv, "weight", mask)
    prune.remove(conv, "weight")
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias[idx] = 0
        if bn_name is not None:
            bn = model.get_submodule(bn_name)
            bn.weight[idx] = 0
            bn.bias[idx] = 0


def mask_channels(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> nn.Module:
    """Mask pruning, in place: every output channel of a group's conv not in ``kept[group]`` is
    zeroed (:func:`zero_channels`: weight, bias, BN weight and bias). Shapes unchanged."""
    groups = _resolve(model, kept)
    for name, channels in kept.items():
        conv = model.get_submodule(groups[name].conv)
        keep = set(int(c) for c in channels)
        zero_channels(model, groups[name].conv, groups[name].bn,
                      [c for c in range(conv.out_channels) if c not in keep])
    return model


def prune_structural(model: nn.Module, plan: Mapping[str, int] | None = None) -> nn.Module:
    """:func:`select_channels` then :func:`remove_channels`, in place."""
    return remove_channels(model, select_channels(model, plan))


def prune_mask(model: nn.Module, plan: Mapping[str, int] | None = None) -> nn.Module:
    """:func:`select_channels` then :func:`mask_channels`, in place: the channels
    :func:`prune_structural` removes for the same plan, and the ones
    ``torch.nn.utils.prune.ln_structured(conv, "weight", amount, n=1, dim=0)`` masks (the same L1
    ranking; ties at the cut broken by index rather than by ``torch.topk``)."""
    return mask_channels(model, select_channels(model, plan))


def expand_to_mask(pruned: nn.Module, full: nn.Module, kept: Mapping[str, Sequence[int]]) -> nn.Module:
    """The mask-pruned twin of a structurally pruned model: ``full`` (an unpruned model of the
    original widths, whose values are all replaced) receives ``pruned``'s weights at the kept
    channels and zeros everywhere else (BN of a removed channel: weight, bias and mean 0, var 1).
    It computes what ``pruned`` computes. Returns ``full``."""
    groups = _resolve(full, kept)
    out_idx: dict[str, torch.Tensor] = {}
    in_idx: dict[str, torch.Tensor] = {}
    for name, channels in kept.items():
        group = groups[name]
        idx = torch.as_tensor(sorted(set(int(c) for c in channels)), dtype=torch.long)
        width = full.get_submodule(group.conv).out_channels
        out_idx[group.conv] = idx
        if group.bn is not None:
            out_idx[group.bn] = idx
        for reader_name, offset in group.readers:
            reader_in = in_idx.get(reader_name, torch.arange(full.get_submodule(reader_name).in_channels))
            # positions, in the reader's full input, of the channels the pruned reader still reads
            keep_in = torch.cat([torch.arange(offset), idx + offset,
                                 torch.arange(offset + width, full.get_submodule(reader_name).in_channels)])
            in_idx[reader_name] = reader_in[torch.isin(reader_in, keep_in)]
    small = pruned.state_dict()
    state = {}
    for key, value in full.state_dict().items():
        module, _, leaf = key.rpartition(".")
        src = small[key]
        if leaf == "num_batches_tracked" or src.shape == value.shape:
            state[key] = src.clone()
            continue
        dst = torch.ones_like(value) if leaf == "running_var" else torch.zeros_like(value)
        rows = out_idx.get(module, torch.arange(value.shape[0]))
        if value.dim() > 1:
            cols = in_idx.get(module, torch.arange(value.shape[1]))
            dst[rows.unsqueeze(1), cols.unsqueeze(0)] = src
        else:
            dst[rows] = src
        state[key] = dst
    full.load_state_dict(state, strict=True)
    return full.eval()


def load_pruned_detector(kind: str = "structural", checkpoint: str | Path | None = None) -> nn.Module:
    """The shipped pruned detector in eval mode: ``structural`` (channels removed, odd counts) or
    ``mask`` (the same weights at full width, the removed channels zero). Every problem with the
    file is an ArtifactError naming it."""
    from qatcheck.zoo.checkpoint import check_state_dict
    from qatcheck.zoo.digit_detector import DigitDetector
    from qatcheck.zoo.digits_net import read_checkpoint

    if kind not in KINDS:
        raise ValueError(f"pruned detector kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    path = Path(checkpoint) if checkpoint is not None else PRUNED_CHECKPOINT
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist; {PRUNE_HINT}")
    ckpt = read_checkpoint(path)
    meta: dict[str, Any] = ckpt.get("meta", {})
    arch, kept = meta.get("arch"), meta.get("kept")
    if not isinstance(arch, dict) or not isinstance(kept, dict):
        raise ArtifactError(f"checkpoint {path} has no meta['arch'] / meta['kept']; it is not a pruned "
                            f"DigitDetector checkpoint ({PRUNE_HINT})")

    def unpruned() -> nn.Module:
        return DigitDetector(widths=tuple(arch["widths"]), in_channels=arch.get("in_channels", 1),
                             num_classes=arch.get("num_classes", 10), head_width=arch.get("head_width", 24))

    try:
        model = remove_channels(unpruned(), kept)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {path}: meta arch {arch!r} / kept channels do not describe a "
                            f"pruned DigitDetector ({exc})") from exc
    check_state_dict(path, ckpt["state_dict"], model, f"pruned DigitDetector({channel_counts(model)})")
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.eval()
    return expand_to_mask(model, unpruned(), kept) if kind == "mask" else model


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every conv, by module name."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
