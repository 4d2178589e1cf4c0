"""Seeded, reproducible training of the built-in YOLO: ``python -m qatcheck.zoo.train_yolo``.

An ultralytics YOLOv8n-P2 built from ``yolov8n-p2.yaml`` (1 input channel, the data's 10 classes; the
stride-4 level is what the 10-28 px digits on 64x64 images need, see :mod:`qatcheck.zoo.yolo`) trained
by a plain PyTorch loop with ultralytics' own loss (:class:`qatcheck.zoo.yolo.YoloLoss`: task-aligned
assignment, BCE classes, CIoU + DFL boxes) - no ultralytics trainer, nothing downloaded. AdamW with a
one-cycle schedule and an exponential moving average of the weights (what ultralytics validates and
saves). Like :mod:`qatcheck.zoo.train_detector`, epoch 1 reads the generated ``train`` split and every
later epoch trains on fresh compositions of the same train digits (``digit_detection.synthesize``),
so val digits stay unseen. Bit-identical reruns for the same torch version and thread count
(seeds, deterministic algorithms, fixed batch order).

The checkpoint keeps the EMA weights in fp16 storage (~6 MB; the model runs in fp32) and the
metrics below are those of the stored (fp16-rounded, BN-folded) weights, measured on the val split
through qatcheck's own ``DetectionTask`` (COCOeval) with the ``yolov8`` decoder.

    python -m qatcheck.zoo.train_yolo                 # -> qatcheck/zoo/digit_yolo.pt
    python -m qatcheck.zoo.train_yolo --threads 1     # bit-identical only for the same thread count
"""
from __future__ import annotations

import copy
import math
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from qatcheck.zoo.checkpoint import save_checkpoint, training_main
from qatcheck.zoo.train_detector import evaluate as _evaluate, load_split
from qatcheck.zoo.yolo import (
    DEFAULT_CFG,
    YOLO_CHECKPOINT,
    YoloLoss,
    YoloRaw,
    build_yolo,
    compact_state_dict,
    fuse_batchnorm,
    import_ultralytics,
)

EPOCHS = 30
BATCH_SIZE = 32
MAX_LR = 2e-3
WEIGHT_DECAY = 5e-4
#: EMA decay ramps up as ``EMA_DECAY * (1 - exp(-step / EMA_TAU))`` (ultralytics' ModelEMA)
EMA_DECAY = 0.999
EMA_TAU = 300


class EMA:
    """Exponential moving average of a model's floating state (weights and BN statistics)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = EMA_DECAY * (1 - math.exp(-self.updates / EMA_TAU))
        src = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].detach(), alpha=1 - d)
            else:
                v.copy_(src[k])


def evaluate(model: nn.Module, ds, batch_size: int = 100) -> dict[str, float]:
    """COCO metrics through the shared task code with the ``yolov8`` decoder."""
    return _evaluate(model, ds, batch_size, decoder="yolov8")


def stored_model(model: YoloRaw) -> YoloRaw:
    """What :func:`qatcheck.zoo.yolo.load_digit_yolo` rebuilds from the checkpoint: the weights
    rounded through fp16 storage, BN folded."""
    out = copy.deepcopy(model).eval()
    out.load_state_dict({k: v.to(out.state_dict()[k].dtype) for k, v in compact_state_dict(model).items()})
    return fuse_batchnorm(out)


def train(epochs: int = EPOCHS, out: Path | None = None, seed: int = 0, threads: int | None = None,
          root: str | Path | None = None, cfg: str = DEFAULT_CFG) -> tuple[YoloRaw, dict[str, Any]]:
    from qatcheck.data.digit_detection import digit_detection_split, synthesize
    from qatcheck.zoo.train_digits import seed_everything

    ultralytics = import_ultralytics()
    out = YOLO_CHECKPOINT if out is None else Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(seed)
    train_ds, val_ds = digit_detection_split("train", root), digit_detection_split("val", root)
    x_all, y_all = load_split(train_ds)
    model = build_yolo(cfg, num_classes=train_ds.num_classes, in_channels=int(x_all.shape[1]))
    criterion = YoloLoss(model.num_classes, model.reg_max, model.strides)
    ema = EMA(model)
    steps_per_epoch = -(-len(x_all) // BATCH_SIZE)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # no weight decay on BN and biases (ultralytics' groups)
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=MAX_LR / 25)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.1)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        if epoch:  # fresh compositions of the same train digits: the only augmentation
            xs, y_all = synthesize(len(y_all), seed=seed * 1000 + epoch)
            x_all = torch.from_numpy(xs)
        order = np.random.default_rng(seed * 1000 + epoch).permutation(len(x_all))
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * BATCH_SIZE:(b + 1) * BATCH_SIZE]
            loss = criterion(model(x_all[torch.from_numpy(idx)]), [y_all[i] for i in idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            sched.step()
            ema.update(model)
            total += loss.item() * len(idx)
        msg = f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(x_all):.4f}"
        if epoch + 1 == epochs or (epoch + 1) % 5 == 0:
            m = evaluate(ema.model, val_ds)
            msg += f"  val (EMA) mAP {m['map50_95']:.4f}  mAP@.5 {m['map50']:.4f}"
        print(f"{msg}  ({time.perf_counter() - start:.1f}s)", flush=True)
    seconds = time.perf_counter() - start
    final = stored_model(ema.model)
    metrics = evaluate(final, val_ds)
    meta = {
        "dataset": "digit_detection", "epochs": epochs, "seed": seed,
        "val_map50_95": round(metrics["map50_95"], 4), "val_map50": round(metrics["map50"], 4),
        "arch": ema.model.arch(), "input_shape": list(x_all.shape[1:]), "output_names": list(ema.model.output_names),
        "decoder": "yolov8", "weights_dtype": "float16", "batchnorm": "unfused (load_digit_yolo folds it)",
        "train_fingerprint": train_ds.fingerprint(), "val_fingerprint": val_ds.fingerprint(),
        "torch": str(torch.__version__), "ultralytics": str(ultralytics.__version__),
        "threads": torch.get_num_threads(), "train_seconds": round(seconds, 1), "machine": platform.machine(),
    }
    save_checkpoint(out, compact_state_dict(ema.model), meta, f"val mAP@.5:.95 {metrics['map50_95']:.4f}, "
                    f"mAP@.5 {metrics['map50']:.4f} in {seconds:.1f}s on {torch.get_num_threads()} thread(s)")
    return final, meta


def main(argv: Sequence[str] | None = None) -> int:
    return training_main("qatcheck.zoo.train_yolo", __doc__, EPOCHS, train, argv,
                         cfg=(DEFAULT_CFG, f"ultralytics model yaml (default {DEFAULT_CFG})"))


if __name__ == "__main__":
    raise SystemExit(main())
