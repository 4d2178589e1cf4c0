"""Seeded, reproducible pruning + fine-tuning of the built-in detector:
``python -m qatcheck.zoo.train_pruned``.

Takes the shipped ``digit_detector.pt``, ranks every prunable conv's output channels by L1 norm
and removes the weakest (:data:`qatcheck.zoo.pruning.DETECTOR_PLAN`: 30 % of the prunable
channels, odd counts), then fine-tunes the pruned network for :data:`EPOCHS` epochs on fresh
compositions of the train digits (the detector's own loss, AdamW, cosine decay). Pruned and not
fine-tuned, the detector falls from mAP@.5:.95 65.3 to 39.4 on val; fine-tuned it is back within
about 2 points. The checkpoint stores the kept channel indices (``meta["kept"]``), from which
:func:`qatcheck.zoo.pruning.load_pruned_detector` rebuilds both the structural and the mask variant.
Bit-identical reruns for the same torch version and thread count.

    python -m qatcheck.zoo.train_pruned            # -> qatcheck/zoo/digit_detector_pruned.pt
"""
from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from qatcheck.zoo.checkpoint import save_checkpoint, training_main
from qatcheck.zoo.digit_detector import DETECTOR_CHECKPOINT, load_digit_detector
from qatcheck.zoo.pruning import DETECTOR_PLAN, PRUNED_CHECKPOINT, channel_counts, remove_channels, select_channels
from qatcheck.zoo.train_detector import build_targets, dense_loss, evaluate
from qatcheck.zoo.train_digits import seed_everything

EPOCHS = 4
BATCH_SIZE = 32
LR = 1e-3
#: synthesize() seeds of the fine-tuning epochs: none of the detector's own training epochs used them
SEED_BASE = 7000


def train(epochs: int = EPOCHS, out: Path | None = None, seed: int = 0, threads: int | None = None,
          root: str | Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    from qatcheck.data.digit_detection import digit_detection_split, synthesize
    from qatcheck.zoo.digits_net import read_checkpoint

    out = PRUNED_CHECKPOINT if out is None else Path(out)
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(seed)
    val_ds = digit_detection_split("val", root)
    model = load_digit_detector(DETECTOR_CHECKPOINT)
    before = evaluate(model, val_ds)
    kept = select_channels(model, DETECTOR_PLAN)
    remove_channels(model, kept)
    pruned = evaluate(model, val_ds)
    print(f"pruned {channel_counts(model)}: val mAP@.5:.95 {before['map50_95']:.4f} -> "
          f"{pruned['map50_95']:.4f} before fine-tuning", flush=True)
    with torch.no_grad():
        out_hw = tuple(model(torch.zeros(1, 1, 64, 64))[0].shape[2:])
    steps_per_epoch = -(-3000 // BATCH_SIZE)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for epoch in range(epochs):
        xs, ys = synthesize(3000, seed=SEED_BASE + seed * 1000 + epoch)
        x_all, dense = torch.from_numpy(xs), build_targets(ys, val_ds.num_classes, out_hw)
        order = torch.from_numpy(np.random.default_rng(SEED_BASE + seed * 1000 + epoch).permutation(len(x_all)))
        model.train()
        for b in range(steps_per_epoch):
            idx = order[b * BATCH_SIZE:(b + 1) * BATCH_SIZE]
            loss = dense_loss(model(x_all[idx]), {k: v[idx] for k, v in dense.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        m = evaluate(model, val_ds)
        print(f"epoch {epoch + 1}/{epochs}  val mAP@.5:.95 {m['map50_95']:.4f}  mAP@.5 {m['map50']:.4f}",
              flush=True)
    metrics = evaluate(model, val_ds)
    base_meta = read_checkpoint(DETECTOR_CHECKPOINT).get("meta", {})
    meta = {
        "dataset": "digit_detection", "pruned_from": DETECTOR_CHECKPOINT.name,
        "arch": base_meta["arch"], "plan": dict(DETECTOR_PLAN), "kept": kept,
        "channels": channel_counts(model), "criterion": "L1 norm of each output filter",
        "finetune_epochs": epochs, "finetune_lr": LR, "seed": seed,
        "val_map50_95_unpruned": round(before["map50_95"], 4),
        "val_map50_95_pruned_no_finetune": round(pruned["map50_95"], 4),
        "val_map50_95": round(metrics["map50_95"], 4), "val_map50": round(metrics["map50"], 4),
        "params": sum(p.numel() for p in model.parameters()),
        "val_fingerprint": val_ds.fingerprint(),
        "torch": str(torch.__version__), "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    save_checkpoint(out, model.state_dict(), meta, f"val mAP@.5:.95 {metrics['map50_95']:.4f}, "
                    f"mAP@.5 {metrics['map50']:.4f}, {meta['params']} parameters")
    return model, meta


def main(argv: Sequence[str] | None = None) -> int:
    return training_main("qatcheck.zoo.train_pruned", __doc__, EPOCHS, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
