"""Checking a checkpoint's state dict against the model it is loaded into.

Why not just ``load_state_dict(strict=True)``: its error lists every key, which for a wrong
architecture is hundreds of lines. A user needs the file, the model it was meant for and the first
few mismatches.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qatcheck.errors import ArtifactError
from qatcheck.fsutil import atomic_path


def save_checkpoint(out: Path, state_dict: dict, meta: dict, summary: str = "") -> None:
    """``{"state_dict", "meta"}`` written atomically: an interrupted training run never leaves a
    half-written checkpoint in the zoo. ``summary`` (what the training reached) is printed with
    the file's name and size."""
    with atomic_path(out) as tmp:
        torch.save({"state_dict": state_dict, "meta": meta}, tmp)
    if summary:
        print(f"saved {out} ({out.stat().st_size / 1024:.0f} KB): {summary}")


def training_parser(prog: str, doc: str | None, epochs: int, detection: bool = True):
    """The zoo's training scripts' common options: --out, --epochs, --seed, --threads (and, for the
    detection sets, --data-root); a script adds its own."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=(doc or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="checkpoint path (default: the zoo's)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads; results are bit-identical only for the same count")
    if detection:
        parser.add_argument("--data-root", type=Path, default=None,
                            help="where the generated set lives (default ~/.cache/qatcheck/digit_detection)")
    return parser


def training_main(prog: str, doc: str | None, epochs: int, train, argv=None, **extra_options) -> int:
    """The detection training scripts' ``main``: :func:`training_parser`'s options (plus
    ``extra_options``: ``name=(default, help)``, passed to ``train`` by name) into ``train``."""
    parser = training_parser(prog, doc, epochs)
    for name, (default, help_) in extra_options.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, help=help_)
    args = parser.parse_args(argv)
    train(epochs=args.epochs, out=args.out, seed=args.seed, threads=args.threads, root=args.data_root,
          **{name: getattr(args, name) for name in extra_options})
    return 0


def check_state_dict(path: Path, state: dict, model: nn.Module, what: str) -> None:
    """ArtifactError naming ``path`` and ``what`` (e.g. ``DigitDetector({...})``) when ``state`` has
    missing or unexpected keys or tensors of the wrong shape for ``model``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:5]}{' ...' if len(items) > 5 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("wrong shapes", wrong)) if items]
        raise ArtifactError(f"checkpoint {path} does not match {what}: " + "; ".join(parts))
