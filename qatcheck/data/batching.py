"""Batching helpers shared by measurement, calibration and the sensitivity profile.

Static-shape graphs (every exported ONNX but the dynamic variants) need batches of exactly the
build batch, so a short final batch is padded and its real sample count travels with it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from qatcheck.data.base import Dataset


def pad_batch(x: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """Zero-pad a short final batch for static-shape graphs; return it and the real count."""
    n = len(x)
    if n >= size:
        return x, n
    pad = np.zeros((size - n, *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad]), n


def resize(x: np.ndarray, hw: tuple[int, ...]) -> np.ndarray:
    """Resize NCHW inputs to the case's spatial shape (dynamic H/W profiles): bilinear, each axis
    on its own (no letterbox), so a pixel coordinate scales by ``new / old`` per axis."""
    if tuple(x.shape[2:]) == tuple(hw):
        return x
    import torch

    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=tuple(hw), mode="bilinear",
                                        align_corners=False)
    return t.numpy()


def eval_batches(ds: Dataset, shape: tuple[int, ...], *, pad: bool = True, max_samples: int | None = None,
                 resize_targets: Callable[[Any, tuple, tuple], Any] | None = None
                 ) -> Iterator[tuple[np.ndarray, Any, int]]:
    """``(inputs, targets, real count)`` over ``ds`` at ``shape`` (batch first): inputs resized to
    the shape's spatial size and, with ``pad``, zero-padded to its batch; at most ``max_samples``.
    Resized inputs get their targets through ``resize_targets(targets, from_hw, to_hw)`` (the
    task's, when it has targets in input pixels); without it the targets pass unchanged."""
    bs = int(shape[0])
    hw = tuple(shape[2:])
    left = len(ds) if max_samples is None else int(max_samples)
    for x, y in ds.batches(bs):
        if left <= 0:
            return
        if len(x) > left:
            x, y = x[:left], y[:left]
        left -= len(x)
        if resize_targets is not None and tuple(x.shape[2:]) != hw:
            y = resize_targets(y, tuple(x.shape[2:]), hw)
        x = resize(x, hw)
        xb, n = pad_batch(x, bs) if pad else (x, len(x))
        yield xb, y, n


def fixed_batches(ds: Dataset, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """Batches of exactly ``batch_size`` inputs (static-shape graphs need them): a short final
    batch is filled by wrapping around to the first samples, which is harmless for calibration."""
    head = None
    for x, _ in ds.batches(batch_size, limit):
        if head is None:
            head = x
        if len(x) < batch_size:
            reps = int(np.ceil(batch_size / len(head))) + 1
            x = np.concatenate([x, *([head] * reps)])[:batch_size]
        yield x
