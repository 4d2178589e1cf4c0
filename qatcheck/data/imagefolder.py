"""ImageNet-style folders (``root/<class>/<image>``) for classification recipes on real data.

Preprocessing is the torchvision reference evaluation transform: resize the shorter side to
``resize`` (default size/0.875, i.e. 256 for 224), center-crop ``size``, scale to [0, 1], normalize
with ImageNet mean/std. Images are decoded lazily, batch by batch, so ImageNet val (50k images)
streams in constant memory.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from qatcheck.errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolderDataset:
    def __init__(self, root: str | Path, size: int = 224, resize: int | None = None,
                 classes: Sequence[str] | None = None, max_images: int | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 grayscale: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise DataError(f"image folder {self.root}: class folders {unknown[:5]} are not in the "
                            f"model's {len(self.classes)} classes")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, index[c]) for c in found for p in sorted((self.root / c).iterdir())
                        if p.suffix.lower() in IMAGE_SUFFIXES]
        if max_images is not None:
            self.samples = self.samples[:max_images]
        if not self.samples:
            raise DataError(f"image folder {self.root} has no images in class sub-folders "
                            f"(expected {self.root}/<class>/<image>{IMAGE_SUFFIXES[0]})")
        self.name = f"imagefolder:{self.root.name}"
        self.size = size
        self.resize = resize or int(round(size / 0.875))
        self.grayscale = grayscale
        channels = 1 if grayscale else 3
        self.mean = np.asarray(mean[:channels], np.float32).reshape(channels, 1, 1)
        self.std = np.asarray(std[:channels], np.float32).reshape(channels, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.grayscale else "RGB")
                w, h = im.size
                scale = self.resize / min(w, h)
                im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                a = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return (a - self.mean) / self.std

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for n, start in enumerate(range(0, len(self.samples), batch_size)):
            if limit is not None and n >= limit:
                return
            chunk = self.samples[start:start + batch_size]
            yield (np.stack([self._load(p) for p, _ in chunk]).astype(np.float32),
                   np.asarray([c for _, c in chunk], dtype=np.int64))

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.size}/{self.resize}/{self.grayscale}".encode())
        for p, c in self.samples:
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}:{c}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]

    def inputs_fingerprint(self) -> str:
        """The image files and their preprocessing without the class indices (what calibration
        reads): a new class order leaves it as it is."""
        h = hashlib.sha256(f"{self.size}/{self.resize}/{self.grayscale}/{self.mean.ravel().tolist()}/"
                           f"{self.std.ravel().tolist()}".encode())
        for p, _ in self.samples:
            st = p.stat()
            h.update(f"{p.relative_to(self.root)}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:16]


def imagefolder_dataset(root: str | Path, size: int = 224, **kwargs) -> ImageFolderDataset:
    """ImageNet-style class folders (``<root>/<class>/<image>``) as a classification dataset:
    resized to ``resize`` (default ``size`` * 8/7, as torchvision's eval transform) and center-cropped
    to ``size`` x ``size``, scaled to [0, 1], normalized with ``mean`` / ``std`` (ImageNet's by
    default; ``grayscale=True`` for one channel). ``classes`` fixes the label order (default: the
    sorted folder names); ``max_images`` keeps a quick subset."""
    return ImageFolderDataset(root, size=size, **kwargs)
