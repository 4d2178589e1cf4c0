"""The built-in detection data: real handwritten digits pasted onto real photographs and textures.

Why: a detection recipe needs data that ships without a download and is hard enough for int8 to
visibly regress. scikit-learn's digits (1,797 real 8x8 scans) are pasted at 10-28 px onto random
crops of scikit-image's sample images (camera, brick, grass, gravel, coffee, ...; grayscale), 1-4
digits per 64x64 image with little overlap. Ten classes, one per digit.

Train and val never share a source digit: they draw from the stratified train / val indices of
:mod:`qatcheck.data.digits` (the same split the classification recipe uses). ``calib`` is the first
:data:`CALIB_IMAGES` train images, so PTQ never sees a val digit.

The set is written in COCO format (``<root>/<split>/images/*.png`` + ``<root>/<split>/instances.json``)
under ``~/.cache/qatcheck/digit_detection`` (or ``root``), generated once and reused; a
``complete.json`` marker written last holds the generator version and parameters, so an
interrupted or outdated set is regenerated. It is then read back through
:class:`qatcheck.data.coco.CocoDataset`, the loader real COCO uses.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from qatcheck.data.coco import CocoDataset
from qatcheck.errors import ConfigError, DataError

#: bump when the generator's output changes; a cached set with another version is regenerated
VERSION = 1
SPLITS = ("train", "val", "calib")
IMAGE_SIZE = 64
#: images per generated split (calib is a prefix of train, read through max_images)
COUNTS = {"train": 3000, "val": 400}
CALIB_IMAGES = 256
SEEDS = {"train": 1, "val": 2}
DIGIT_SIZE = (10, 28)
DIGITS_PER_IMAGE = (1, 4)
#: largest IoU a new digit may have with one already placed (tries again otherwise)
MAX_IOU = 0.1
#: fixed normalization of the grayscale [0, 1] pixels (close to the train set's mean and std)
MEAN = 0.45
STD = 0.25
NUM_CLASSES = 10
BACKGROUNDS = ("camera", "brick", "grass", "gravel", "coffee", "astronaut", "chelsea", "coins",
               "moon", "rocket", "hubble_deep_field", "immunohistochemistry", "cell", "retina",
               "clock")
#: category ids are 1..10 (not 0..9) so the class index <-> category id mapping is exercised, as in COCO
CATEGORIES = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(NUM_CLASSES)]


def default_root() -> Path:
    return Path(os.environ.get("QATCHECK_DATA_CACHE", Path.home() / ".cache" / "qatcheck")) / "digit_detection"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


@lru_cache(maxsize=1)
def source_digits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{"train"|"val": (indices into load_digits, raw 8x8 images 0..16, labels)}`` — exactly the
    stratified split behind :func:`qatcheck.data.digits.digits_split`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from qatcheck.data import digits

    raw = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(raw.target)), test_size=digits.VAL_FRACTION,
                                          stratify=raw.target, random_state=digits.SPLIT_SEED)
    return {s: (i, raw.images[i].astype(np.float32), raw.target[i].astype(np.int64))
            for s, i in (("train", idx_train), ("val", idx_val))}


@lru_cache(maxsize=1)
def backgrounds() -> tuple[np.ndarray, ...]:
    """The scikit-image sample images that ship in the wheel, as grayscale float32 in [0, 1]."""
    from skimage import data as skdata
    from skimage.color import rgb2gray, rgba2rgb

    out = []
    for name in BACKGROUNDS:
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception as exc:  # noqa: BLE001 - skimage raises several types for missing files
            raise DataError(f"scikit-image sample image {name!r} cannot be loaded ({exc}); the "
                            "digit-detection set needs the images that ship in scikit-image") from exc
        if img.ndim == 3:
            img = rgb2gray(rgba2rgb(img) if img.shape[-1] == 4 else img)
        img = img.astype(np.float32)
        if img.max() > 1.0:
            img = img / 255.0
        out.append(img)
    return tuple(out)


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def _background(rng: np.random.Generator, bgs: tuple[np.ndarray, ...]) -> np.ndarray:
    bg = bgs[rng.integers(len(bgs))]
    side = int(rng.integers(IMAGE_SIZE, min(4 * IMAGE_SIZE, min(bg.shape)) + 1))
    y, x = (int(rng.integers(0, bg.shape[i] - side + 1)) for i in (0, 1))
    crop = _resize(bg[y:y + side, x:x + side], IMAGE_SIZE, IMAGE_SIZE)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.clip(crop, 0.0, 1.0)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def generate_image(rng: np.random.Generator, digits: tuple[np.ndarray, np.ndarray, np.ndarray],
                   bgs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, list[dict]]:
    """One uint8 image and its annotations (``bbox`` tight around the ink, ``category_id``,
    ``source_index`` into load_digits)."""
    indices, images, labels = digits
    canvas = _background(rng, bgs)
    anns: list[dict] = []
    boxes: list[tuple[float, ...]] = []
    for _ in range(int(rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1))):
        for _attempt in range(20):
            k = int(rng.integers(len(labels)))
            size = int(rng.integers(DIGIT_SIZE[0], DIGIT_SIZE[1] + 1))
            aspect = float(rng.uniform(0.8, 1.25))
            h, w = size, max(6, min(IMAGE_SIZE, round(size * aspect)))
            alpha = np.clip(_resize(images[k] / 16.0, h, w), 0.0, 1.0)
            ys, xs = np.nonzero(alpha > 0.25)
            if not len(ys):
                continue
            y0, x0 = int(rng.integers(0, IMAGE_SIZE - h + 1)), int(rng.integers(0, IMAGE_SIZE - w + 1))
            box = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
            if any(_iou(box, b) > MAX_IOU for b in boxes):
                continue
            patch = canvas[y0:y0 + h, x0:x0 + w]
            # ink contrasts with what it is pasted on: light strokes on dark ground and vice versa
            ink = float(rng.uniform(0.0, 0.25)) if patch.mean() > 0.5 else float(rng.uniform(0.75, 1.0))
            canvas[y0:y0 + h, x0:x0 + w] = patch * (1 - alpha) + ink * alpha
            boxes.append(box)
            anns.append({"category_id": int(labels[k]) + 1,
                         "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                         "area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0,
                         "source_index": int(indices[k])})
            break
    noise = rng.normal(0.0, 0.02, canvas.shape)
    return (np.clip(canvas + noise, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), anns


def _params(split: str) -> dict:
    return {"version": VERSION, "split": split, "count": COUNTS[split], "seed": SEEDS[split],
            "image_size": IMAGE_SIZE, "digit_size": list(DIGIT_SIZE),
            "digits_per_image": list(DIGITS_PER_IMAGE), "max_iou": MAX_IOU,
            "backgrounds": list(BACKGROUNDS)}


def write_split(split: str, out_dir: Path) -> None:
    """Generate ``split`` ("train" or "val") into ``out_dir`` (images/ + instances.json)."""
    from PIL import Image

    params = _params(split)
    rng = np.random.default_rng(params["seed"])
    digits, bgs = source_digits()[split], backgrounds()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(params["count"]):
        img, anns = generate_image(rng, digits, bgs)
        name = f"{split}_{i:05d}.png"
        Image.fromarray(img, mode="L").save(out_dir / "images" / name, optimize=False)
        images.append({"id": i + 1, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
    coco = {"info": {"description": f"qatcheck digit_detection {split}", **params},
            "images": images, "annotations": annotations, "categories": CATEGORIES}
    (out_dir / "instances.json").write_text(json.dumps(coco), encoding="utf-8")
    (out_dir / "complete.json").write_text(json.dumps(params), encoding="utf-8")


def ensure_split(split: str, root: str | Path | None = None) -> Path:
    """The folder of a generated split, generating it first when missing, incomplete or outdated.
    Generation happens in a temporary sibling folder that is renamed into place, so concurrent
    sessions and interrupted runs never see a half-written set."""
    root = Path(root) if root is not None else default_root()
    final = root / split
    marker = final / "complete.json"
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == _params(split):
            return final
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=root))
    try:
        write_split(split, tmp)
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process put a complete set there first
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def digit_detection_split(split: str, root: str | Path | None = None) -> CocoDataset:
    """The ``train`` (3,000 images), ``val`` (400) or ``calib`` (first 256 train) split as a
    :class:`CocoDataset` of 1x64x64 inputs (normalized with :data:`MEAN` / :data:`STD`)."""
    check_split(split)
    folder = ensure_split("train" if split == "calib" else split, root)
    return CocoDataset(folder / "images", folder / "instances.json", input_size=(IMAGE_SIZE, IMAGE_SIZE),
                       letterbox=False, max_images=CALIB_IMAGES if split == "calib" else None,
                       channels=1, mean=(MEAN,), std=(STD,), name=f"digit_detection.{split}", cache=True)


def synthesize(count: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[dict]]:
    """``count`` fresh images drawn from ``split``'s source digits, in memory, preprocessed like
    :func:`digit_detection_split` (the training script's per-epoch augmentation: new compositions
    of the same train digits, so val digits stay unseen)."""
    if split not in ("train", "val"):
        raise ConfigError(f"synthesize draws from 'train' or 'val' digits, not {split!r}")
    rng = np.random.default_rng([seed, SEEDS[split]])
    digits, bgs = source_digits()[split], backgrounds()
    xs, targets = np.empty((count, 1, IMAGE_SIZE, IMAGE_SIZE), np.float32), []
    for i in range(count):
        img, anns = generate_image(rng, digits, bgs)
        xs[i, 0] = (img.astype(np.float32) / 255.0 - MEAN) / STD
        boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                            for a in anns], np.float32).reshape(-1, 4)
        targets.append({"image_id": i + 1, "orig_size": (IMAGE_SIZE, IMAGE_SIZE), "scale": (1.0, 1.0),
                        "pad": (0, 0), "boxes": boxes,
                        "labels": np.asarray([a["category_id"] - 1 for a in anns], np.int64)})
    return xs, targets
