"""COCO-format detection data: an instances JSON plus an image folder (COCO val2017, or any set
written in the same format, such as the built-in digits-detection set).

Why our own loader rather than ``torchvision.datasets.CocoDetection``: qatcheck streams NCHW float32
batches with per-image targets that say how each image was resized (scale and padding), so that
predictions can be mapped back to the original image and scored with pycocotools' COCOeval — the
number every detection paper reports. Bad input is reported with the file and the offending entry.

Targets are dicts, one per image::

    {"image_id": int, "orig_size": (h, w), "scale": (sx, sy), "pad": (px, py),
     "boxes": float32 (K, 4) x1 y1 x2 y2 in *input* pixels, "labels": int64 (K,) class indices}

A point ``x`` of the original image is ``x * sx + px`` in the network input. ``labels`` index
:attr:`CocoDataset.category_ids` (the contiguous order a model's class axis follows); crowd boxes
are left out of ``boxes`` (training ignores them, COCOeval reads them from :attr:`coco`).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from qatcheck.errors import DataError

#: ImageNet statistics, the convention for RGB detectors trained on COCO
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: relative slack for boxes that end a rounding error past the image border (COCO has some)
_BORDER_SLACK = 1.0


def _quiet(fn, *args, **kwargs):
    """pycocotools prints progress lines; keep test and pytest output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_coco_json(path: str | Path) -> dict[str, Any]:
    """Read and structurally check an instances JSON; every problem names the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO annotations {path} do not exist")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"COCO annotations {path} are not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"COCO annotations {path}: expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"COCO annotations {path}: '{key}' must be a list"
                            + ("" if key in data else " (missing)"))
    return data


def _check_entries(data: dict[str, Any], path: Path) -> None:
    """Ids, categories and boxes must be consistent; fills COCOeval's ``area`` / ``iscrowd``
    defaults where a hand-written file omits them."""
    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not {"id", "file_name", "width", "height"} <= set(img):
            raise DataError(f"COCO annotations {path}: images[{i}] needs id, file_name, width, height")
        if img["id"] in images:
            raise DataError(f"COCO annotations {path}: image id {img['id']} appears twice")
        if not (img["width"] > 0 and img["height"] > 0):
            raise DataError(f"COCO annotations {path}: image {img['id']} ({img['file_name']}) has "
                            f"size {img['width']}x{img['height']}")
        images[img["id"]] = img
    cats = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise DataError(f"COCO annotations {path}: categories[{i}] needs an id")
        cats.add(cat["id"])
    if not cats:
        raise DataError(f"COCO annotations {path} declare no categories")
    seen_ann = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"COCO annotations {path}: annotations[{i}]"
        if not isinstance(ann, dict) or not {"image_id", "category_id", "bbox"} <= set(ann):
            raise DataError(f"{where} needs image_id, category_id and bbox")
        ann.setdefault("id", i + 1)
        where += f" (id {ann['id']})"
        if ann["id"] in seen_ann:
            raise DataError(f"{where}: annotation id appears twice")
        seen_ann.add(ann["id"])
        img = images.get(ann["image_id"])
        if img is None:
            raise DataError(f"{where} references image id {ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in cats:
            raise DataError(f"{where} has category_id {ann['category_id']}, which is not among the "
                            f"declared categories {sorted(cats)}")
        box = ann["bbox"]
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise DataError(f"{where}: bbox must be [x, y, width, height], got {box!r}")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise DataError(f"{where}: bbox {box} has a negative width or height")
        if (x < -_BORDER_SLACK or y < -_BORDER_SLACK or x + w > img["width"] + _BORDER_SLACK
                or y + h > img["height"] + _BORDER_SLACK):
            raise DataError(f"{where}: bbox {box} lies outside image {img['id']} ({img['file_name']}, "
                            f"{img['width']}x{img['height']})")
        ann.setdefault("area", float(w * h))
        ann.setdefault("iscrowd", 0)


class CocoDataset:
    """A COCO instances set, streamed as letterboxed (or stretched) NCHW float32 batches.

    ``category_ids`` picks and orders the classes (default: every declared category, by id);
    class index ``i`` of a model's output is category ``category_ids[i]``. ``max_images`` keeps the
    first images by id (a quick subset of val2017). ``channels`` is 1 (grayscale) or 3 (RGB);
    pixels are scaled to [0, 1] and normalized with ``mean`` / ``std``. ``cache`` keeps the
    preprocessed images in memory (for small sets that are read many times per session).
    """

    def __init__(self, images_dir: str | Path, annotations_json: str | Path,
                 input_size: tuple[int, int] = (640, 640), letterbox: bool = True,
                 max_images: int | None = None, category_ids: Sequence[int] | None = None, *,
                 channels: int = 3, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 pad_value: float = 114 / 255, name: str | None = None, cache: bool = False) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        if channels not in (1, 3):
            raise DataError(f"CocoDataset channels must be 1 or 3, got {channels}")
        if len(input_size) != 2 or min(input_size) < 1:
            raise DataError(f"CocoDataset input_size must be (H, W), got {input_size}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.letterbox = bool(letterbox)
        self.channels = channels
        default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.25,))
        self.mean = np.asarray(mean if mean is not None else default_mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std if std is not None else default_std, np.float32).reshape(-1, 1, 1)
        self.pad_value = float(pad_value)
        self.name = name or f"coco:{self.annotations_json.stem}"
        if not self.images_dir.is_dir():
            raise DataError(f"COCO image folder {self.images_dir} does not exist")

        data = load_coco_json(self.annotations_json)
        _check_entries(data, self.annotations_json)
        declared = sorted(c["id"] for c in data["categories"])
        if category_ids is None:
            self.category_ids = tuple(declared)
        else:
            unknown = [c for c in category_ids if c not in declared]
            if unknown or len(set(category_ids)) != len(category_ids) or not category_ids:
                raise DataError(f"category_ids {list(category_ids)} must be distinct ids declared in "
                                f"{self.annotations_json} (unknown: {unknown}; declared: {declared})")
            self.category_ids = tuple(int(c) for c in category_ids)
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self._class_of = {cid: i for i, cid in enumerate(self.category_ids)}

        images = sorted(data["images"], key=lambda im: im["id"])
        if max_images is not None:
            if max_images < 1:
                raise DataError(f"max_images must be >= 1, got {max_images}")
            images = images[:max_images]
        if not images:
            raise DataError(f"COCO annotations {self.annotations_json} list no images")
        for img in images:
            if not (self.images_dir / img["file_name"]).is_file():
                raise DataError(f"image {img['file_name']} (id {img['id']}) listed in "
                                f"{self.annotations_json} is missing from {self.images_dir}")
        self.images = images
        self.image_ids = tuple(int(im["id"]) for im in images)
        self._anns: dict[int, list[dict]] = {i: [] for i in self.image_ids}
        for ann in data["annotations"]:
            if ann["image_id"] in self._anns:
                self._anns[ann["image_id"]].append(ann)

        from pycocotools.coco import COCO

        self.coco = COCO()
        self.coco.dataset = data
        _quiet(self.coco.createIndex)
        self._cache: dict[int, tuple[np.ndarray, dict]] | None = {} if cache else None
        self._fingerprint: str | None = None

    # ---- Dataset protocol -----------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, list[dict]]]:
        if batch_size < 1:
            raise DataError(f"dataset {self.name!r}: batch_size must be >= 1, got {batch_size}")
        for n, start in enumerate(range(0, len(self.images), batch_size)):
            if limit is not None and n >= limit:
                return
            items = [self.item(i) for i in range(start, min(start + batch_size, len(self.images)))]
            yield np.stack([x for x, _ in items]), [t for _, t in items]

    def fingerprint(self) -> str:
        """Annotations content + the selection and preprocessing + image names and sizes (hashing
        5,000 COCO JPEGs per session would cost more than evaluating them)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            with open(self.annotations_json, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            h.update(repr((self.input_size, self.letterbox, self.image_ids, self.category_ids,
                           self.channels, self.mean.ravel().tolist(), self.std.ravel().tolist(),
                           self.pad_value)).encode())
            for line in self._image_files():
                h.update(line)
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def inputs_fingerprint(self) -> str:
        """The images and their preprocessing without the annotations (what calibration reads):
        edited boxes or labels leave it as it is."""
        h = hashlib.sha256(repr((self.input_size, self.letterbox, self.image_ids, self.channels,
                                 self.mean.ravel().tolist(), self.std.ravel().tolist(),
                                 self.pad_value)).encode())
        for line in self._image_files():
            h.update(line)
        return h.hexdigest()[:16]

    def _image_files(self) -> Iterator[bytes]:
        for img in self.images:
            yield f"{img['file_name']}:{(self.images_dir / img['file_name']).stat().st_size}".encode()

    # ---- items ----------------------------------------------------------------------------
    def item(self, index: int) -> tuple[np.ndarray, dict]:
        """The preprocessed image (C, H, W) and its target dict."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img = self.images[index]
        path = self.images_dir / img["file_name"]
        from PIL import Image

        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                w0, h0 = im.size
                H, W = self.input_size
                if self.letterbox:
                    s = min(H / h0, W / w0)
                    nw, nh = max(1, round(w0 * s)), max(1, round(h0 * s))
                    sx, sy = nw / w0, nh / h0
                    px, py = (W - nw) // 2, (H - nh) // 2
                else:
                    nw, nh, sx, sy, px, py = W, H, W / w0, H / h0, 0, 0
                if (nw, nh) != (w0, h0):
                    im = im.resize((nw, nh), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise DataError(f"image {path} cannot be read ({type(exc).__name__}: {exc})") from exc
        if (w0, h0) != (img["width"], img["height"]):
            raise DataError(f"image {path} is {w0}x{h0} but {self.annotations_json} says "
                            f"{img['width']}x{img['height']}")
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        canvas = np.full((self.channels, *self.input_size), self.pad_value, np.float32)
        canvas[:, py:py + nh, px:px + nw] = arr
        x = ((canvas - self.mean) / self.std).astype(np.float32)
        boxes, labels = [], []
        for ann in self._anns[img["id"]]:
            if ann.get("iscrowd", 0) or ann["category_id"] not in self._class_of:
                continue
            bx, by, bw, bh = ann["bbox"]
            boxes.append([bx * sx + px, by * sy + py, (bx + bw) * sx + px, (by + bh) * sy + py])
            labels.append(self._class_of[ann["category_id"]])
        target = {"image_id": int(img["id"]), "orig_size": (int(h0), int(w0)), "scale": (sx, sy),
                  "pad": (px, py), "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                  "labels": np.asarray(labels, np.int64)}
        if self._cache is not None:
            self._cache[index] = (x, target)
        return x, target

    def gt_area_ranges(self) -> tuple[str, ...]:
        """COCOeval's area ranges ("small", "medium", "large") that hold at least one non-crowd
        ground-truth box of the selected classes in the selected images."""
        present = set()
        for anns in self._anns.values():
            for a in anns:
                if a.get("iscrowd", 0) or a["category_id"] not in self._class_of:
                    continue
                area = a["area"]
                present.add("small" if area < 32 ** 2 else "medium" if area < 96 ** 2 else "large")
        return tuple(r for r in ("small", "medium", "large") if r in present)

    def __repr__(self) -> str:
        return (f"CocoDataset({self.name!r}, {len(self)} images, {self.num_classes} classes, "
                f"input {self.input_size}, letterbox={self.letterbox})")


#: an environment variable a user may set instead of passing --qatcheck-coco-root
COCO_ROOT_ENV = "QATCHECK_COCO_ROOT"


def coco_val2017(root: str | Path | None = None, **kwargs: Any) -> CocoDataset:
    """COCO val2017 from its standard layout: ``<root>/val2017/*.jpg`` and
    ``<root>/annotations/instances_val2017.json``.

    ``root`` defaults to the running session's ``--qatcheck-coco-root`` (read from
    :func:`qatcheck.options.active` when the factory runs), then to the environment variable
    ``QATCHECK_COCO_ROOT``, so a recipe can name the data without a path in the code; ``kwargs`` go
    to :class:`CocoDataset` (``input_size``, ``max_images`` for a quick subset, ...).
    """
    import os

    from qatcheck.options import active

    options = active()
    value = (root if root is not None else
             options.coco_root if options is not None and options.coco_root else os.environ.get(COCO_ROOT_ENV))
    if not value:
        raise DataError("no COCO root given: pass --qatcheck-coco-root DIR (or set "
                        f"{COCO_ROOT_ENV}) pointing at the folder holding val2017/ and annotations/")
    base = Path(value).expanduser()
    images, ann = base / "val2017", base / "annotations" / "instances_val2017.json"
    for p in (images, ann):
        if not p.exists():
            raise DataError(f"COCO root {base}: {p} does not exist (expected val2017/ and "
                            "annotations/instances_val2017.json)")
    kwargs.setdefault("name", "coco-val2017")
    return CocoDataset(images, ann, **kwargs)
