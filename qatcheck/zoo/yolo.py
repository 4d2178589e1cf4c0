"""The built-in YOLO: an ultralytics YOLOv8n-P2 built from its yaml, wrapped to return raw head maps.

ultralytics is an optional extra (``pip install -e '.[yolo]'``); nothing here downloads anything.
:func:`import_ultralytics` keeps it offline before the first import: ``YOLO_OFFLINE=1``, a
``YOLO_CONFIG_DIR`` under qatcheck's cache (``~/.cache/qatcheck/ultralytics``) and a local font
(matplotlib's DejaVuSans copied as ``Arial.ttf``), so nothing reaches for the network even if
ultralytics plots. Variables the user already set are respected.

The built-in model is ``yolov8n-p2.yaml`` (ultralytics' YOLOv8 with a stride-4 P2 level, scale n):
on 64x64 inputs a digit of 10-14 px covers about one stride-8 cell, and plain yolov8n (P3-P5)
misses nearly half of them (recall 55% vs 95% for digits over 20 px); the stride-4 level fixes it:
after the same 30 epochs, val mAP@.5:.95 / mAP@.5 are 0.662 / 0.870 for yolov8n and 0.739 / 0.933
for yolov8n-p2 (which has slightly fewer parameters and ~1.4x the compute at 64x64).

:class:`YoloRaw` runs the ultralytics layer graph exactly like ``DetectionModel._predict_once`` but
stops the ``Detect`` head before its decode: it returns one raw map per level, finest first, in
:data:`OUTPUT_NAMES` order (strides 4, 8, 16, 32; 64x64 input -> 16x16, 8x8, 4x4, 2x2)::

    p2, p3, p4, p5: (N, 4 * reg_max + classes, h, w)   # DFL box logits (l, t, r, b x reg_max bins), class logits

Box decoding (DFL softmax, anchor points), the sigmoid and NMS live in
:mod:`qatcheck.tasks.detection` (``YoloV8Decoder``, registered as ``"yolov8"``) and are shared by
every backend, so a quantization regression in the head shows up the same way on PyTorch, ONNX
Runtime and TensorRT; the exported graph holds the network only (no DFL conv, no anchor math). The
DFL module is therefore replaced by ``nn.Identity`` (its fixed ``arange`` weights are not part of the
checkpoint).

The shipped checkpoint ``digit_yolo.pt`` stores the *unfused* state dict (conv + BN, fp16 storage,
~6 MB) and ``meta['arch']`` (yaml, classes, channels, reg_max, strides); :func:`load_digit_yolo`
folds BN into the convs by default, which is how the model is deployed and quantized (a Q/DQ
weight quantizer must see the folded weights TensorRT will run).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from qatcheck.errors import ArtifactError, ConfigError

ZOO_DIR = Path(__file__).resolve().parent
YOLO_CHECKPOINT = ZOO_DIR / "digit_yolo.pt"
OUTPUT_NAMES = ("p2", "p3", "p4", "p5")
DEFAULT_CFG = "yolov8n-p2.yaml"
TRAIN_HINT = "retrain it with `python -m qatcheck.zoo.train_yolo`"
INSTALL_HINT = "pip install -e '.[yolo]'"


def _default_config_dir() -> Path:
    base = Path(os.environ.get("QATCHECK_DATA_CACHE", Path.home() / ".cache" / "qatcheck"))
    return base / "ultralytics"


def _offline_environment() -> None:
    """Environment ultralytics reads at import: offline, quiet, a writable config dir with fonts."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    # ultralytics keeps settings and fonts in $YOLO_CONFIG_DIR/Ultralytics
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(_default_config_dir()))) / "Ultralytics"
    try:
        config_dir.mkdir(parents=True, exist_ok=True)
        missing = [n for n in ("Arial.ttf", "Arial.Unicode.ttf") if not (config_dir / n).is_file()]
        if missing:
            import matplotlib

            font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            for name in missing:
                if font.is_file():
                    shutil.copyfile(font, config_dir / name)
    except OSError:  # a read-only home: ultralytics falls back to a temp dir and we never plot
        pass


def import_ultralytics() -> Any:
    """The ``ultralytics`` module, imported offline; a ConfigError saying how to install it.

    Importing ultralytics changes numpy's and torch's print options for the whole process (a
    custom float formatter); they are restored, so a test session's messages do not change."""
    import numpy as np

    _offline_environment()
    np_options = np.get_printoptions()
    torch_options = dict(vars(torch._tensor_str.PRINT_OPTS))
    try:
        import ultralytics
        from ultralytics.nn import tasks  # noqa: F401 - the part we need; fails early if broken
    except ImportError as exc:
        raise ConfigError(f"the YOLO recipe needs ultralytics, which is not installed ({exc}); "
                          f"install the extra: {INSTALL_HINT}") from exc
    finally:
        np.set_printoptions(**np_options)
        vars(torch._tensor_str.PRINT_OPTS).update(torch_options)
    return ultralytics


@contextlib.contextmanager
def _quiet_ultralytics() -> Iterator[None]:
    """ultralytics logs model summaries and 'Overriding model.yaml nc=80' at INFO on every build."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_detection_model(cfg: str = DEFAULT_CFG, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """An untrained ultralytics ``DetectionModel`` from its yaml (``yolov8n-p2.yaml``,
    ``yolov8n.yaml``...: the letter is the scale) with ``num_classes`` classes and ``in_channels``
    input channels."""
    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    with _quiet_ultralytics():
        try:
            return DetectionModel(cfg, ch=int(in_channels), nc=int(num_classes), verbose=False)
        except FileNotFoundError as exc:
            raise ConfigError(f"ultralytics has no model yaml {cfg!r}: {exc}") from exc


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ultralytics ``Conv``/``DWConv`` BatchNorm into its conv, in place (what
    ``DetectionModel.fuse`` does, without its FLOPs summary)."""
    from ultralytics.nn.modules.conv import Conv
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    for m in model.modules():
        if isinstance(m, Conv) and hasattr(m, "bn"):
            m.conv = fuse_conv_and_bn(m.conv, m.bn)
            delattr(m, "bn")
            m.forward = m.forward_fuse
    return model


class YoloRaw(nn.Module):
    """An ultralytics detection model that returns the raw per-level head maps (see the module doc).

    ``model`` is the ultralytics layer ``Sequential`` (module names match ultralytics' own state-dict
    keys: ``model.2.m.0.cv1.conv``...); ``save`` the layer indices whose outputs later layers read.
    """

    def __init__(self, detection_model: nn.Module, cfg: str = DEFAULT_CFG) -> None:
        super().__init__()
        head = detection_model.model[-1]
        if not all(hasattr(head, a) for a in ("cv2", "cv3", "nc", "reg_max", "f")):
            raise ConfigError(f"{type(head).__name__} is not an ultralytics Detect head "
                              "(needs cv2, cv3, nc, reg_max)")
        if getattr(head, "one2one_cv2", None) is not None:
            raise ConfigError("end-to-end (one-to-one) YOLO heads are not supported; use a v8-style yaml")
        self.model = detection_model.model
        self.save = sorted(int(i) for i in detection_model.save)
        self.cfg = str(cfg)
        self.in_channels = int(detection_model.yaml.get("channels", detection_model.yaml.get("ch", 1)))
        self.num_classes, self.reg_max = int(head.nc), int(head.reg_max)
        self.strides = tuple(int(s) for s in head.stride.tolist())
        head.dfl = nn.Identity()  # decoding happens in qatcheck.tasks.detection

    @property
    def output_names(self) -> tuple[str, ...]:
        """``p<level>`` per output map (stride 2**level): ``("p2", "p3", "p4", "p5")`` for yolov8n-p2."""
        return tuple(f"p{int(s).bit_length() - 1}" for s in self.strides)

    def arch(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "in_channels": self.in_channels, "num_classes": self.num_classes,
                "reg_max": self.reg_max, "strides": list(self.strides)}

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The Detect head's inputs (``DetectionModel._predict_once`` up to the head)."""
        y: list[torch.Tensor | None] = []
        layers = list(self.model)
        for m in layers[:-1]:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        head = layers[-1]
        return [x if j == -1 else y[j] for j in head.f]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        head = self.model[-1]
        return tuple(torch.cat((head.cv2[i](f), head.cv3[i](f)), 1) for i, f in enumerate(self.features(x)))


def build_yolo(cfg: str = DEFAULT_CFG, num_classes: int = 10, in_channels: int = 1) -> YoloRaw:
    """An untrained :class:`YoloRaw` (what the training script starts from)."""
    return YoloRaw(build_detection_model(cfg, num_classes, in_channels), cfg)


def _check_state(path: Path, state: dict, model: nn.Module, arch: dict) -> None:
    from qatcheck.zoo.checkpoint import check_state_dict

    check_state_dict(path, state, model, f"YoloRaw({arch})")


def load_digit_yolo(checkpoint: str | Path | None = None, fuse: bool = True) -> YoloRaw:
    """The trained YOLO in eval mode (fp32; BN folded unless ``fuse=False``); default: the shipped
    checkpoint. Every problem with the file is an ArtifactError naming it; a missing ultralytics
    is a ConfigError saying how to install it."""
    from qatcheck.zoo.digits_net import read_checkpoint

    path = Path(checkpoint) if checkpoint is not None else YOLO_CHECKPOINT
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist; {TRAIN_HINT}")
    ckpt = read_checkpoint(path)
    arch = ckpt.get("meta", {}).get("arch")
    if not isinstance(arch, dict) or "cfg" not in arch:
        raise ArtifactError(f"checkpoint {path} has no meta['arch'] with a 'cfg'; it is not a "
                            f"qatcheck YOLO checkpoint ({TRAIN_HINT})")
    try:
        model = build_yolo(str(arch["cfg"]), int(arch.get("num_classes", 10)), int(arch.get("in_channels", 1)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {path}: meta['arch'] = {arch!r} is not a YOLO "
                            f"configuration ({exc})") from exc
    state = ckpt["state_dict"]
    _check_state(path, state, model, arch)
    expected = model.state_dict()
    # weights are stored in fp16 to keep the file small; the model runs in fp32
    model.load_state_dict({k: (v.to(expected[k].dtype) if v.is_floating_point() else v)
                           for k, v in state.items()}, strict=True)
    model.eval()
    if fuse:
        fuse_batchnorm(model)
    return model


def compact_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors in fp16 storage (what the checkpoint holds)."""
    return {k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
            for k, v in model.state_dict().items()}


def split_outputs(outputs: Sequence[torch.Tensor], reg_max: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level raw maps -> (box logits (N, 4*reg_max, A), class logits (N, C, A)) over all anchors."""
    n = outputs[0].shape[0]
    boxes = torch.cat([o[:, :4 * reg_max].reshape(n, 4 * reg_max, -1) for o in outputs], 2)
    scores = torch.cat([o[:, 4 * reg_max:].reshape(n, o.shape[1] - 4 * reg_max, -1) for o in outputs], 2)
    return boxes, scores


#: ultralytics' default loss gains (``ultralytics/cfg/default.yaml``: box, cls, dfl)
LOSS_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


class YoloLoss:
    """ultralytics' own ``v8DetectionLoss`` (task-aligned assignment, BCE classes, CIoU + DFL boxes)
    on :class:`YoloRaw`'s per-level maps and :class:`qatcheck.data.coco.CocoDataset` targets
    (``boxes`` x1 y1 x2 y2 in input pixels, ``labels`` class indices).

    Returns the per-image loss (``box + cls + dfl`` with ultralytics' gains); ultralytics' trainer
    multiplies it by the batch size, which only rescales the learning rate.
    """

    def __init__(self, num_classes: int, reg_max: int = 16, strides: Sequence[int] = (4, 8, 16, 32),
                 gains: dict[str, float] | None = None) -> None:
        from types import SimpleNamespace

        import_ultralytics()
        from ultralytics.utils.loss import v8DetectionLoss

        self.num_classes, self.reg_max, self.strides = int(num_classes), int(reg_max), tuple(strides)
        head = SimpleNamespace(stride=torch.tensor([float(s) for s in strides]), nc=self.num_classes,
                               reg_max=self.reg_max)

        class _Model(nn.Module):  # what v8DetectionLoss reads from a DetectionModel
            def __init__(self) -> None:
                super().__init__()
                self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)  # device probe
                self.args = SimpleNamespace(**(gains or LOSS_GAINS))
                self.model = [head]

        self.criterion = v8DetectionLoss(_Model())

    def batch(self, targets: Sequence[dict], image_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """CocoDataset targets -> ultralytics' batch dict (normalized xywh boxes)."""
        import numpy as np

        h, w = image_hw
        idx, cls, boxes = [], [], []
        for i, t in enumerate(targets):
            b = np.asarray(t["boxes"], np.float32).reshape(-1, 4)
            idx.append(np.full(len(b), i, np.float32))
            cls.append(np.asarray(t["labels"], np.float32).reshape(-1))
            boxes.append(np.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                                   (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1))
        return {"batch_idx": torch.from_numpy(np.concatenate(idx)), "cls": torch.from_numpy(np.concatenate(cls)),
                "bboxes": torch.from_numpy(np.concatenate(boxes).reshape(-1, 4))}

    def __call__(self, outputs: Sequence[torch.Tensor], targets: Sequence[dict]) -> torch.Tensor:
        if len(outputs) != len(self.strides):
            raise ConfigError(f"YoloLoss expects {len(self.strides)} per-level maps; got {len(outputs)}")
        boxes, scores = split_outputs(outputs, self.reg_max)
        if scores.shape[1] != self.num_classes:
            raise ConfigError(f"YoloLoss was built for {self.num_classes} classes; the outputs carry "
                              f"{scores.shape[1]}")
        self.criterion.device = outputs[0].device
        self.criterion.bbox_loss.to(outputs[0].device)
        self.criterion.proj = self.criterion.proj.to(outputs[0].device)
        hw = (int(outputs[0].shape[2] * self.strides[0]), int(outputs[0].shape[3] * self.strides[0]))
        batch = self.batch(targets, hw)
        loss, _ = self.criterion({"boxes": boxes, "scores": scores, "feats": list(outputs)}, batch)
        return loss.sum() / boxes.shape[0]


_LOSSES: dict[tuple, YoloLoss] = {}


def yolo_loss(outputs: Sequence[torch.Tensor], targets: Sequence[dict]) -> torch.Tensor:
    """:class:`YoloLoss` for the outputs' class count (reg_max 16) and levels (strides inferred like
    the ``yolov8`` decoder does: the coarsest map is P5, stride 32): the QAT ``loss_fn`` of the YOLO
    recipe (``finetune(..., loss_fn=yolo_loss)``)."""
    coarsest = int(outputs[-1].shape[2])
    strides = tuple(32 * coarsest // int(o.shape[2]) for o in outputs)
    key = (int(outputs[0].shape[1]) - 64, strides)
    if key not in _LOSSES:
        _LOSSES[key] = YoloLoss(num_classes=key[0], strides=strides)
    return _LOSSES[key](outputs, targets)
