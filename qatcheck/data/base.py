"""The dataset interface every task and backend reads from.

Evaluation *streams*: a dataset yields batches and the task's metric accumulates counts, so memory
does not grow with the eval set. Datasets fingerprint themselves so the artifact cache knows when
calibration or QAT data changed: ``fingerprint()`` covers the whole set (inputs and targets: QAT
trains on both), the optional ``inputs_fingerprint()`` the inputs alone (all calibration reads). The
targets an eval pass reads are digested by qatcheck itself (:class:`TargetsDigest`), so a baseline
names which part of a changed eval set changed.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Iterator, Protocol, runtime_checkable

import numpy as np

from qatcheck.errors import DataError


@runtime_checkable
class Dataset(Protocol):
    """What qatcheck needs from data: a length, batches of NCHW float32 inputs with targets, and a
    fingerprint for cache keys (of the inputs and the targets). A dataset may also define
    ``inputs_fingerprint()`` (of the inputs alone: what calibration reads; the built-in datasets
    do), so a change of its targets alone rebuilds nothing calibrated and is named as what it is."""

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
        self._inputs_fingerprint = ""

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
            inputs = h.copy()  # the images alone: one pass over them for both fingerprints
            inputs.update(repr(self.images.shape).encode())
            self._inputs_fingerprint = inputs.hexdigest()[:16]
            t = self.targets
            h.update(t.tobytes() if hasattr(t, "tobytes") else repr(list(t)).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def inputs_fingerprint(self) -> str:
        """The images alone (what calibration reads): new labels leave it as it is."""
        self.fingerprint()
        return self._inputs_fingerprint


def inputs_fingerprint(ds: "Dataset") -> str:
    """The fingerprint of what ``ds`` feeds a model: its ``inputs_fingerprint()`` where it has one,
    else its ``fingerprint()`` (which may cover its targets too)."""
    fn = getattr(ds, "inputs_fingerprint", None)
    return fn() if callable(fn) else ds.fingerprint()


class _Opaque(Exception):
    """A target without a stable byte form (its repr would hold a memory address)."""


def _feed(h: Any, obj: Any) -> None:
    """A target's canonical bytes: arrays by dtype, shape and content; mappings by sorted key."""
    if hasattr(obj, "detach") and hasattr(obj, "numpy"):  # a torch tensor
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, (np.ndarray, np.generic)):
        a = np.ascontiguousarray(obj)
        h.update(f"a{a.dtype.str}{a.shape}".encode())
        if a.dtype == object:  # its bytes are pointers: the items themselves
            for item in a.ravel():
                _feed(h, item)
        else:
            h.update(a.tobytes())
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"s{obj!r};".encode())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(f"{k!r}:".encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        raise _Opaque(type(obj).__name__)


class TargetsDigest:
    """A digest of the targets an eval pass reads (labels, boxes, any per-sample annotation), fed
    sample by sample so it does not depend on the batch size. qatcheck computes it from what the
    task scores, so a dataset whose ``fingerprint()`` leaves its targets out still has a changed
    label named. Targets it cannot put in canonical bytes give no digest ("")."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._ok = True

    def update(self, targets: Any, count: int) -> None:
        """The first ``count`` samples of a batch's ``targets``."""
        if not self._ok:
            return
        try:
            for i in range(count):
                _feed(self._h, targets[i])
        except (_Opaque, TypeError, IndexError, KeyError):
            self._ok = False

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16] if self._ok else ""


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
