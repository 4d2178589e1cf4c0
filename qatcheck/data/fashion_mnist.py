"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package: the optional second built-in dataset.

Why it exists: digits is so easy that almost any quantization keeps its accuracy; Fashion-MNIST
(28x28 grayscale, 10 clothing classes) leaves a few points of headroom where a bad calibrator
shows. It is optional because it comes from a system package, not from Python wheels: suites call
:func:`fashion_mnist_available` and skip with its reason.

Splits: ``train`` is the 60k train set, ``val`` the full 10k test set (a small CNN evaluates it in
about a second on a CPU, so no subset is needed and accuracy deltas keep 0.01-point resolution),
``calib`` the first 256 train images after the same seeded shuffle as digits. Images keep their
native 28x28 size and are normalized with fixed train-set constants.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np

from qatcheck.data.base import ArrayDataset
from qatcheck.data.digits import calib_indices, check_split
from qatcheck.errors import DataError

#: where ``apt-get install dataset-fashion-mnist`` puts the files, searched in order
FASHION_ROOTS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",
                                  "/usr/local/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
#: file stems per split; each may be stored gzipped (``.gz``, as Debian ships them) or plain
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
#: mean / std of the 60k train images scaled to [0, 1]
MEAN = 0.28604060
STD = 0.35302424
SIZE = 28
NUM_CLASSES = 10
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _missing(root: Path) -> list[str]:
    return [stem for stems in FILES.values() for stem in stems if _find(root, stem) is None]


def _resolve_root(root: str | Path | None) -> Path:
    """The directory holding all four files: ``root`` if given, else the first complete FASHION_ROOTS
    entry. The error names every place looked at and what was missing there."""
    candidates = [Path(root)] if root is not None else [Path(r) for r in FASHION_ROOTS]
    problems = []
    for cand in candidates:
        missing = _missing(cand)
        if not missing:
            return cand
        problems.append(f"{cand}: " + ("directory does not exist" if not cand.is_dir()
                                       else "missing " + ", ".join(m + "[.gz]" for m in missing)))
    raise DataError("Fashion-MNIST files not found (" + "; ".join(problems) + "); install them with "
                    f"`{INSTALL_HINT}` or pass the directory holding the idx files as root")


def fashion_mnist_available(root: str | Path | None = None) -> str | None:
    """None when the files are present, else the reason they are not, for ``pytest.skip(reason)``."""
    try:
        _resolve_root(root)
    except DataError as exc:
        return str(exc)
    return None


def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Read an idx file (uint8 payload), checking magic and size so a truncated or swapped file is
    reported with its path rather than as a reshape error."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    header = 4 + 4 * expect_dims
    if len(raw) < header or raw[:3] != b"\x00\x00\x08" or raw[3] != expect_dims:
        raise DataError(f"{path} is not a uint8 idx file with {expect_dims} dims "
                        f"(header {raw[:4].hex() or 'empty'})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expect_dims))
    if len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds "
                        f"{len(raw) - header} bytes; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@lru_cache(maxsize=4)
def _fashion_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode and normalize one split once per process (the 60k train set takes about a second)."""
    img_stem, lbl_stem = FILES[split]
    img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
    assert img_path is not None and lbl_path is not None  # _resolve_root checked
    images = read_idx(img_path, 3)
    labels = read_idx(lbl_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    x = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    return np.ascontiguousarray(x), labels


def fashion_mnist_split(split: str, root: str | Path | None = None) -> ArrayDataset:
    """``train`` (60,000), ``val`` (the 10,000 test images) or ``calib`` (256, from train) as NCHW
    float32 28x28 images with int64 class targets."""
    check_split(split)
    where = _resolve_root(root).resolve()
    if split == "calib":
        x, y = _fashion_arrays(where, "train")
        idx = calib_indices(len(y))
        x, y = x[idx], y[idx]
    else:
        x, y = _fashion_arrays(where, split)
    return ArrayDataset(f"fashion_mnist.{split}", x, y, source=str(where))
