"""The dataset interface every task and backend reads from.

Evaluation *streams*: a dataset yields batches and the task's metric accumulates counts, so memory
does not grow with the eval set. Datasets fingerprint themselves so the artifact cache knows when
calibration or QAT data changed.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np

from qatcheck.errors import DataError


@runtime_checkable
class Dataset(Protocol):
    """What qatcheck needs from data: a length, batches of NCHW float32 inputs with targets, and a
    fingerprint for cache keys."""

    name: str

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, Any]]:
        """Yield ``(inputs, targets)``; ``limit`` caps the number of batches."""
        ...

    def fingerprint(self) -> str: ...


class ArrayDataset:
    """A dataset held in memory as arrays (the built-in digits sets are a few hundred KB).

    ``targets`` is an array of class indices for classification; any per-sample sequence works for
    other tasks.
    """

    def __init__(self, name: str, images: np.ndarray, targets: Any, *, source: str = "") -> None:
        images = np.asarray(images)
        if images.size == 0 or len(images) == 0:
            raise DataError(f"dataset {name!r} is empty" + (f" (source: {source})" if source else ""))
        if images.ndim != 4:
            raise DataError(f"dataset {name!r}: images must be NCHW, got shape {images.shape}")
        if len(targets) != len(images):
            raise DataError(f"dataset {name!r}: {len(images)} images but {len(targets)} targets")
        require_float(images, f"dataset {name!r}")
        self.name = name
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.targets = targets
        self.source = source
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, Any]]:
        if batch_size < 1:
            raise DataError(f"dataset {self.name!r}: batch_size must be >= 1, got {batch_size}")
        for n, start in enumerate(range(0, len(self.images), batch_size)):
            if limit is not None and n >= limit:
                return
            yield self.images[start:start + batch_size], self.targets[start:start + batch_size]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256(self.images.tobytes())
            t = self.targets
            h.update(t.tobytes() if hasattr(t, "tobytes") else repr(list(t)).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def require_float(images: np.ndarray, what: str) -> None:
    """Model inputs are floats, fed to the model as they are: integer images (uint8 pixels) would be
    converted to 0..255 floats, which a model trained on 0..1 or normalised inputs reads as
    garbage - and a 16% top-1 recorded as a fresh baseline. Which scale and normalisation the model
    expects is the recipe's to say, so qatcheck refuses rather than guesses."""
    if np.issubdtype(images.dtype, np.floating):
        return
    lo, hi = (images.min(), images.max()) if images.size else (0, 0)
    raise DataError(f"{what}: images are {images.dtype} (values {lo}..{hi}); inputs go to the model unchanged "
                    "and qatcheck does not guess their scale - convert them the way the model was trained, "
                    "e.g. images.astype(np.float32) / 255 and its mean/std normalisation, before handing them over")


def shuffled_batches(ds: "Dataset", batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, Any]]:
    """Training batches in an order seeded by ``seed`` (pass ``seed + epoch`` for a new order per
    epoch). :meth:`ArrayDataset.batches` is deliberately in order, since evaluation and calibration
    must be reproducible; datasets that cannot be indexed are streamed in their own order."""
    if not isinstance(ds, ArrayDataset):
        yield from ds.batches(batch_size)
        return
    order = np.random.default_rng(seed).permutation(len(ds))
    # arrays (and qatcheck.tasks.heads.HeadTargets) index with the permutation itself
    targets = ds.targets if isinstance(ds.targets, np.ndarray) or hasattr(ds.targets, "tobytes") else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield ds.images[idx], (targets[idx] if targets is not None else [ds.targets[i] for i in idx])
