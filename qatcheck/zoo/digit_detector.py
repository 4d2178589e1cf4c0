"""The built-in detector (``DigitDetector``): a small CenterNet-style network and its loader.

Why this shape: it holds the constructs an int8 detection recipe must get right — conv+BN+ReLU,
a MaxPool, a residual Add, an upsample + Concat skip (the two Concat inputs need one scale for
TensorRT to fuse it) and three regression heads whose ranges differ wildly (heatmap logits, sizes,
sub-pixel offsets) — while training in about a minute on a CPU.

Outputs, stride 4 (64x64 input -> 16x16 maps), in :data:`OUTPUT_NAMES` order:

* ``heatmap``: (N, classes, H/4, W/4) logits of object centres (sigmoid in the decoder),
* ``size``: (N, 2, H/4, W/4) box width and height in output cells (pixels / 4),
* ``offset``: (N, 2, H/4, W/4) sub-cell position of the centre (x, y), in cells.

The decode lives in :mod:`qatcheck.tasks.detection` (``CenterNetDecoder``), shared by every backend.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatcheck.errors import ArtifactError
from qatcheck.zoo.digits_net import read_checkpoint

ZOO_DIR = Path(__file__).resolve().parent
DETECTOR_CHECKPOINT = ZOO_DIR / "digit_detector.pt"
OUTPUT_NAMES = ("heatmap", "size", "offset")
STRIDE = 4
TRAIN_HINT = "retrain it with `python -m qatcheck.zoo.train_detector`"
#: heatmap bias at init: sigmoid(-2.19) = 0.1, CenterNet's prior for rare positives
HEATMAP_PRIOR_BIAS = -math.log((1 - 0.1) / 0.1)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)),
        ("bn", nn.BatchNorm2d(cout)),
        ("relu", nn.ReLU(inplace=False)),
    ]))


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN, identity added before the last ReLU (the residual Add)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(ch, ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + x)


class Head(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, bias: float = 0.0) -> None:
        super().__init__()
        self.conv = conv_bn(cin, mid)
        self.out = nn.Conv2d(mid, cout, 1)
        nn.init.constant_(self.out.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x))


class DigitDetector(nn.Module):
    """stem (conv 3x3, full res) -> pool (MaxPool 2) -> expand (conv, 1/2) -> down1 (conv s2, 1/4)
    -> block1 (residual Add, 1/4) -> down2 (conv s2 + conv, 1/8) -> up (nearest x2) -> Concat
    with block1 -> fuse (conv, 1/4) -> heatmap / size / offset heads (conv 3x3 + conv 1x1)."""

    def __init__(self, widths: tuple[int, int, int, int] = (8, 16, 32, 64), in_channels: int = 1,
                 num_classes: int = 10, head_width: int = 24) -> None:
        super().__init__()
        w0, w1, w2, w3 = (int(w) for w in widths)
        self.widths = (w0, w1, w2, w3)
        self.in_channels, self.num_classes, self.head_width = int(in_channels), int(num_classes), int(head_width)
        self.stem = conv_bn(in_channels, w0)
        self.pool = nn.MaxPool2d(2)
        self.expand = conv_bn(w0, w1)
        self.down1 = conv_bn(w1, w2, stride=2)
        self.block1 = ResidualBlock(w2)
        self.down2 = nn.Sequential(OrderedDict([("a", conv_bn(w2, w3, stride=2)), ("b", conv_bn(w3, w3))]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = conv_bn(w2 + w3, w2)
        self.heatmap = Head(w2, head_width, num_classes, bias=HEATMAP_PRIOR_BIAS)
        self.size = Head(w2, head_width, 2)
        self.offset = Head(w2, head_width, 2)

    def arch(self) -> dict[str, Any]:
        return {"widths": list(self.widths), "in_channels": self.in_channels,
                "num_classes": self.num_classes, "head_width": self.head_width, "stride": STRIDE}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c4 = self.block1(self.down1(self.expand(self.pool(self.stem(x)))))
        c8 = self.down2(c4)
        f = self.fuse(torch.cat([c4, self.up(c8)], dim=1))
        return self.heatmap(f), self.size(f), self.offset(f)


def load_digit_detector(checkpoint: str | Path | None = None) -> DigitDetector:
    """The trained detector in eval mode; default: the shipped checkpoint. Every problem with the
    file is an ArtifactError naming it."""
    path = Path(checkpoint) if checkpoint is not None else DETECTOR_CHECKPOINT
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist; {TRAIN_HINT}")
    ckpt = read_checkpoint(path)
    arch = ckpt.get("meta", {}).get("arch")
    if not isinstance(arch, dict):
        raise ArtifactError(f"checkpoint {path} has no meta['arch']; it is not a DigitDetector "
                            f"checkpoint ({TRAIN_HINT})")
    try:
        model = DigitDetector(widths=tuple(arch["widths"]), in_channels=arch.get("in_channels", 1),
                              num_classes=arch.get("num_classes", 10), head_width=arch.get("head_width", 24))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {path}: meta['arch'] = {arch!r} is not a DigitDetector "
                            f"configuration ({exc})") from exc
    from qatcheck.zoo.checkpoint import check_state_dict

    state = ckpt["state_dict"]
    check_state_dict(path, state, model, f"DigitDetector({arch})")
    model.load_state_dict(state, strict=True)
    return model.eval()
