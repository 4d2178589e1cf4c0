"""The built-in small residual CNN (``DigitsNet``) and its checkpoint loader.

Why this shape: it has every construct an int8 recipe must handle — a stem conv, a residual add, a
stride-2 block with a 1x1 downsample conv, global average pooling and a linear head — while
training in seconds on a CPU. BatchNorm follows every conv because that is what real models look
like: pytorch-quantization quantizes the convs and BN is folded at export.

Module names are chosen to read well in ONNX node names and in ``QuantSettings.keep_precision``:
``stem.conv``, ``layer1.conv1``, ``layer2.downsample.conv``, ``pool``, ``fc``.

The same class serves Fashion-MNIST with wider channels; the widths are stored in each
checkpoint's metadata so a checkpoint rebuilds the network it was trained with.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatcheck.errors import ArtifactError

ZOO_DIR = Path(__file__).resolve().parent
DIGITS_CHECKPOINT = ZOO_DIR / "digits_net.pt"
FASHION_CHECKPOINT = ZOO_DIR / "fashion_net.pt"
#: per-dataset architecture: (stem/layer1 width, layer2 width); the only difference between nets
ARCHS: dict[str, tuple[int, int]] = {"digits": (16, 32), "fashion": (16, 32)}
TRAIN_HINT = "retrain it with `python -m qatcheck.zoo.train_digits`"


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """conv (no bias: BN supplies it) + BN [+ ReLU], as a named Sequential so names stay readable."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv", nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)),
        ("bn", nn.BatchNorm2d(cout)),
    ]
    if relu:
        layers.append(("relu", nn.ReLU(inplace=False)))
    return nn.Sequential(OrderedDict(layers))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity (or 1x1 conv+BN when the shape changes) added
    before the last ReLU. The add is the op int8 recipes most often get wrong (its two inputs need
    matching scales for TensorRT to fuse it), which is why the zoo model has one per stage."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (_conv_bn(cin, cout, 1, stride=stride, relu=False)
                           if stride != 1 or cin != cout else None)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class DigitsNet(nn.Module):
    """stem (conv 3x3 + BN + ReLU) -> layer1 (basic block, width1) -> layer2 (basic block, width2,
    stride 2, 1x1 downsample) -> global average pool -> fc. Input: N x in_channels x H x W, any
    H, W >= 2; output: N x num_classes logits."""

    def __init__(self, widths: tuple[int, int] = ARCHS["digits"], in_channels: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        w1, w2 = widths
        self.widths = (int(w1), int(w2))
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.stem = _conv_bn(in_channels, w1, 3)
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def arch(self) -> dict[str, Any]:
        """Constructor arguments, stored in checkpoints so loading rebuilds the same network."""
        return {"widths": list(self.widths), "in_channels": self.in_channels,
                "num_classes": self.num_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``{"state_dict", "meta"}`` checkpoint with ``weights_only=True`` (no code runs from
    the file); any problem becomes an ArtifactError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist; {TRAIN_HINT}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, EOF, runtime) for bad files
        raise ArtifactError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or ['no detail'])[0][:160]}); {TRAIN_HINT}") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ArtifactError(f"checkpoint {path} is not a qatcheck zoo checkpoint: expected a dict "
                            f"with a 'state_dict' dict and 'meta', got {type(ckpt).__name__}"
                            + (f" with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else ""))
    if not isinstance(ckpt.get("meta", {}), dict):
        raise ArtifactError(f"checkpoint {path}: 'meta' must be a dict")
    return ckpt


def load_net(checkpoint: str | Path, default_arch: str = "digits") -> DigitsNet:
    """Build a DigitsNet from a checkpoint's ``meta["arch"]`` (``ARCHS[default_arch]`` when the
    checkpoint has none) and load its weights strictly, in eval mode."""
    path = Path(checkpoint)
    ckpt = read_checkpoint(path)
    arch = ckpt.get("meta", {}).get("arch") or {"widths": list(ARCHS[default_arch])}
    try:
        model = DigitsNet(widths=tuple(arch["widths"]), in_channels=arch.get("in_channels", 1),
                          num_classes=arch.get("num_classes", 10))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {path}: meta['arch'] = {arch!r} is not a DigitsNet "
                            f"configuration ({exc})") from exc
    from qatcheck.zoo.checkpoint import check_state_dict

    state = ckpt["state_dict"]
    check_state_dict(path, state, model, f"DigitsNet(widths={model.widths})")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_digits_net(checkpoint: str | Path | None = None) -> DigitsNet:
    """The trained digits model (16x16 inputs) in eval mode; default: the shipped checkpoint."""
    return load_net(DIGITS_CHECKPOINT if checkpoint is None else checkpoint, "digits")


def load_fashion_net(checkpoint: str | Path | None = None) -> DigitsNet:
    """The trained Fashion-MNIST model (28x28 inputs) in eval mode; default: the shipped checkpoint."""
    return load_net(FASHION_CHECKPOINT if checkpoint is None else checkpoint, "fashion")
