"""scikit-learn's digits as the built-in classification data.

Why digits: 1,797 real handwritten 8x8 images ship inside scikit-learn, so the built-in suites need no
download, load in milliseconds and still give a model whose int8 accuracy can visibly regress.

Images are upsampled to 16x16 so a small CNN has room for a stride-2 stage (and its quantized
downsample conv), scaled to [0, 1] and normalized with fixed constants. The constants are written
here, not recomputed per call, so the numbers a checkpoint was trained on can never drift with a
split or a size change.

The split is stratified and seeded: 70% train / 30% val. Calibration data (``calib``) is drawn from
train, never val, so PTQ cannot see the images it is judged on.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from qatcheck.data.base import ArrayDataset, shuffled_batches  # noqa: F401  (re-exported: the QAT API)
from qatcheck.errors import ConfigError

SPLITS = ("train", "val", "calib")
SPLIT_SEED = 0
VAL_FRACTION = 0.3
#: calibration set: the first CALIB_SIZE train images after a shuffle seeded with CALIB_SEED
CALIB_SIZE = 256
CALIB_SEED = 0
DEFAULT_SIZE = 16
#: mean / std of the 16x16 train split after scaling to [0, 1] (computed once with this module's
#: split and interpolation; other sizes reuse them, which keeps inputs close to zero-mean)
MEAN = 0.30555451
STD = 0.31903937
NUM_CLASSES = 10


def check_split(split: str) -> None:
    """Reject unknown split names early, with the valid choices, instead of a KeyError later."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def calib_indices(n_train: int, count: int = CALIB_SIZE, seed: int = CALIB_SEED) -> np.ndarray:
    """Indices of the calibration subset of a train split of ``n_train`` images.

    A seeded shuffle rather than the first ``count`` images, so calibration sees every class even
    when the train split happens to be ordered; seeded so the calibration cache key is stable.
    """
    return np.random.default_rng(seed).permutation(n_train)[: min(count, n_train)]


@lru_cache(maxsize=None)
def _digits_arrays(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load, split, resize and normalize once per process and size; datasets share these arrays."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    images = raw.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    targets = raw.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        images, targets, test_size=VAL_FRACTION, stratify=targets, random_state=SPLIT_SEED)

    def prepare(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)[:, None] / 16.0
        if size != x.shape[-1]:
            t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        return ((t - MEAN) / STD).numpy().astype(np.float32)

    train = (prepare(x_train), y_train)
    calib_idx = calib_indices(len(y_train))
    out = {
        "train": train,
        "val": (prepare(x_val), y_val),
        "calib": (train[0][calib_idx], train[1][calib_idx]),
    }
    # Left writable on purpose: torch.from_numpy warns on read-only arrays, and every backend feeds
    # batches through it. Callers must not edit batches in place (they are views of these arrays).
    return out


def digits_split(split: str, size: int = DEFAULT_SIZE) -> ArrayDataset:
    """The ``train`` (1,257), ``val`` (540) or ``calib`` (256, from train) split as NCHW float32
    images of ``size`` x ``size`` with int64 class targets."""
    check_split(split)
    if not isinstance(size, int) or size < 8:
        raise ConfigError(f"digits size must be an int >= 8 (the native size); got {size!r}")
    images, targets = _digits_arrays(size)[split]
    return ArrayDataset(f"digits{size}.{split}", images, targets,
                        source=f"sklearn.datasets.load_digits, {size}x{size}")
