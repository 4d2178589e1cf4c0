"""Seeded, reproducible training of the built-in detector: ``python -m qatcheck.zoo.train_detector``.

CenterNet recipe (Zhou et al., "Objects as Points"): Gaussian centre heatmaps trained with the
penalty-reduced focal loss, L1 on box size and centre offset at the centre cells. AdamW + OneCycle.
Epoch 1 reads the generated ``train`` split; every later epoch trains on fresh compositions of the
same train digits (``digit_detection.synthesize``): on a fixed 3,000 images the net overfits at
mAP@.5 ~0.79, with fresh compositions it generalizes. Bit-identical reruns
for the same torch version and thread count (seeds, deterministic algorithms, fixed batch order).

:func:`centernet_loss` takes the per-image target dicts of :class:`qatcheck.data.coco.CocoDataset`,
so QAT can fine-tune the detector with it (``finetune(..., loss_fn=centernet_loss)``).

    python -m qatcheck.zoo.train_detector            # -> qatcheck/zoo/digit_detector.pt
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from qatcheck.zoo.checkpoint import save_checkpoint, training_main
from qatcheck.zoo.digit_detector import DETECTOR_CHECKPOINT, STRIDE, DigitDetector
from qatcheck.zoo.train_digits import seed_everything

EPOCHS = 20
BATCH_SIZE = 32
MAX_LR = 4e-3
SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0


def gaussian_radius(h: float, w: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest centre shift that keeps IoU >= ``min_overlap``."""
    a1, b1, c1 = 1, h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def build_targets(targets: Sequence[dict], num_classes: int, out_hw: tuple[int, int],
                  stride: int = STRIDE) -> dict[str, torch.Tensor]:
    """Dense CenterNet targets from per-image ``boxes`` (input pixels) and ``labels``:
    ``heat`` (N, C, h, w), ``size`` / ``offset`` (N, 2, h, w) and ``mask`` (N, 1, h, w)."""
    h, w = out_hw
    n = len(targets)
    heat = np.zeros((n, num_classes, h, w), np.float32)
    reg = np.zeros((n, 4, h, w), np.float32)
    mask = np.zeros((n, 1, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), c in zip(np.asarray(t["boxes"], np.float32), np.asarray(t["labels"])):
            bw, bh = (x2 - x1) / stride, (y2 - y1) / stride
            if bw <= 0 or bh <= 0:
                continue
            cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            ix, iy = min(int(cx), w - 1), min(int(cy), h - 1)
            sigma = (2 * max(0, int(gaussian_radius(bh, bw))) + 1) / 6
            g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma ** 2))
            heat[i, c] = np.maximum(heat[i, c], g)
            reg[i, :, iy, ix] = (bw, bh, cx - ix, cy - iy)
            mask[i, 0, iy, ix] = 1.0
    return {"heat": torch.from_numpy(heat), "size": torch.from_numpy(reg[:, :2]),
            "offset": torch.from_numpy(reg[:, 2:]), "mask": torch.from_numpy(mask)}


def focal_loss(logits: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
    """Penalty-reduced pixel-wise focal loss (alpha 2, beta 4), normalized by the object count."""
    pos = heat.eq(1).float()
    logp = nn.functional.logsigmoid(logits)
    log1mp = nn.functional.logsigmoid(-logits)
    p = logp.exp()
    pos_loss = (log1mp.exp() ** 2) * logp * pos
    neg_loss = ((1 - heat) ** 4) * (p ** 2) * log1mp * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def dense_loss(outputs: Sequence[torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    heat, size, off = outputs
    m = t["mask"].to(size.device)
    npos = m.sum().clamp(min=1.0)
    l_size = (nn.functional.l1_loss(size, t["size"].to(size.device), reduction="none") * m).sum() / npos
    l_off = (nn.functional.l1_loss(off, t["offset"].to(off.device), reduction="none") * m).sum() / npos
    return focal_loss(heat, t["heat"].to(heat.device)) + SIZE_WEIGHT * l_size + OFFSET_WEIGHT * l_off


def centernet_loss(outputs: Sequence[torch.Tensor], targets: Sequence[dict]) -> torch.Tensor:
    """The training loss from CocoDataset target dicts (the QAT ``loss_fn``)."""
    heat = outputs[0]
    t = build_targets(targets, heat.shape[1], tuple(heat.shape[2:]))
    return dense_loss(outputs, t)


def load_split(ds) -> tuple[torch.Tensor, list[dict]]:
    """A whole (small) detection split in memory: inputs as one tensor, targets as a list."""
    xs, ys = [], []
    for x, y in ds.batches(512):
        xs.append(x)
        ys.extend(y)
    return torch.from_numpy(np.concatenate(xs)), ys


@torch.no_grad()
def evaluate(model: nn.Module, ds, batch_size: int = 200, decoder: str = "centernet") -> dict[str, float]:
    """COCO metrics of ``model`` on ``ds`` through the shared task code (model left in eval mode);
    the training scripts report exactly what the suites will measure."""
    from qatcheck.tasks.detection import DetectionTask

    model.eval()
    task = DetectionTask.for_dataset(ds, decoder)
    metric = task.metric()
    for x, y in ds.batches(batch_size):
        metric.update([o.numpy() for o in model(torch.from_numpy(x))], y)
    return metric.result()


def train(epochs: int = EPOCHS, out: Path | None = None, seed: int = 0, threads: int | None = None,
          root: str | Path | None = None) -> tuple[DigitDetector, dict[str, Any]]:
    from qatcheck.data.digit_detection import digit_detection_split, synthesize

    out = DETECTOR_CHECKPOINT if out is None else Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(seed)
    train_ds, val_ds = digit_detection_split("train", root), digit_detection_split("val", root)
    x_all, y_all = load_split(train_ds)
    model = DigitDetector(num_classes=train_ds.num_classes)
    with torch.no_grad():
        out_hw = tuple(model(x_all[:1])[0].shape[2:])
    dense = build_targets(y_all, train_ds.num_classes, out_hw)
    steps_per_epoch = -(-len(x_all) // BATCH_SIZE)
    opt = torch.optim.AdamW(model.parameters(), lr=MAX_LR / 25, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=MAX_LR, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.2)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        if epoch:  # fresh compositions of the same train digits: the only augmentation
            xs, ys = synthesize(len(y_all), seed=seed * 1000 + epoch)
            x_all, dense = torch.from_numpy(xs), build_targets(ys, train_ds.num_classes, out_hw)
        order = torch.from_numpy(np.random.default_rng(seed * 1000 + epoch).permutation(len(x_all)))
        total = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * BATCH_SIZE:(b + 1) * BATCH_SIZE]
            loss = dense_loss(model(x_all[idx]), {k: v[idx] for k, v in dense.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        msg = f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(x_all):.4f}"
        if epoch + 1 == epochs or (epoch + 1) % 6 == 0:
            m = evaluate(model, val_ds)
            msg += f"  val mAP {m['map50_95']:.4f}  mAP@.5 {m['map50']:.4f}"
        print(f"{msg}  ({time.perf_counter() - start:.1f}s)", flush=True)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, val_ds)
    meta = {
        "dataset": "digit_detection", "epochs": epochs, "seed": seed,
        "val_map50_95": round(metrics["map50_95"], 4), "val_map50": round(metrics["map50"], 4),
        "arch": model.arch(), "input_shape": list(x_all.shape[1:]),
        "output_names": ["heatmap", "size", "offset"],
        "train_fingerprint": train_ds.fingerprint(), "val_fingerprint": val_ds.fingerprint(),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(),
        "train_seconds": round(seconds, 1), "machine": platform.machine(),
    }
    save_checkpoint(out, model.state_dict(), meta, f"val mAP@.5:.95 {metrics['map50_95']:.4f}, "
                    f"mAP@.5 {metrics['map50']:.4f} in {seconds:.1f}s on {torch.get_num_threads()} thread(s)")
    return model, meta


def main(argv: Sequence[str] | None = None) -> int:
    return training_main("qatcheck.zoo.train_detector", __doc__, EPOCHS, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
