"""Detection: shared decode + NMS, streaming COCO mAP (pycocotools COCOeval) and box-level parity.

Every backend returns the model's *raw head outputs* (a list of numpy arrays); turning them into
boxes is done here, once, by a :class:`Decoder`, so a quantization regression in a head shows up the
same way on PyTorch, ONNX Runtime and TensorRT. Decoders work in network-input pixels; the metric
maps boxes back to the original image with each target's ``scale`` / ``pad`` (see
:mod:`qatcheck.data.coco`) and scores them with pycocotools' COCOeval, the reference
implementation the published numbers come from.

Head formats: ``"centernet"`` (:class:`CenterNetDecoder`, the built-in DigitDetector) and ``"yolov8"``
(:class:`YoloV8Decoder`, ultralytics' anchor-free Detect head, raw per-level maps). Adding one means
writing a class with ``num_classes(outputs)`` and ``decode(outputs)`` and registering it in
:data:`DECODERS`.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from qatcheck.errors import ConfigError, DataError

#: COCOeval.stats index -> metric name
_STATS = {"map50_95": 0, "map50": 1, "ap_small": 3, "ap_medium": 4, "ap_large": 5}
_AREA_METRIC = {"small": "ap_small", "medium": "ap_medium", "large": "ap_large"}


@dataclass
class Detections:
    """One image's boxes in network-input pixels: ``boxes`` (K, 4) x1 y1 x2 y2 float32,
    ``scores`` (K,) float32, ``labels`` (K,) int64 class indices; sorted by score, descending."""

    #: (K, 4) x1 y1 x2 y2, float32, network-input pixels
    boxes: np.ndarray
    #: (K,) float32, descending
    scores: np.ndarray
    #: (K,) int64 class indices (0-based; mapped to the eval set's COCO category ids)
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, threshold: float) -> "Detections":
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep])


class Decoder(Protocol):
    """Raw head outputs of a batch -> one :class:`Detections` per image."""

    def num_classes(self, outputs: Sequence[np.ndarray]) -> int: ...

    def decode(self, outputs: Sequence[np.ndarray]) -> list[Detections]: ...


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """Class-wise NMS; returns kept indices by descending score. torchvision's ``batched_nms``
    on the CPU, operation for operation in float32 (the same boxes kept, in the same order): boxes
    of different classes are moved apart by ``label * (max coordinate + 1)`` - or, past 1,000
    boxes, each class is suppressed alone - then greedy NMS by descending score (ties: the lower
    index first), suppressing IoU > ``iou``. Why not torchvision itself: it is the one thing
    qatcheck needed it for, and its wheels are built for one torch build each."""
    boxes = np.ascontiguousarray(boxes, np.float32).reshape(-1, 4)
    scores = np.ascontiguousarray(scores, np.float32).reshape(-1)
    labels = np.ascontiguousarray(labels, np.int64).reshape(-1)
    if not len(scores):
        return np.zeros(0, np.int64)
    if boxes.size > 4000:  # torchvision's _batched_nms_vanilla on the CPU
        keep = np.zeros(len(scores), bool)
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            keep[idx[_nms(boxes[idx], scores[idx], iou)]] = True
        kept = np.flatnonzero(keep)
        return kept[np.argsort(-scores[kept], kind="stable")]
    # torchvision's _batched_nms_coordinate_trick
    offsets = labels.astype(np.float32) * (boxes.max() + np.float32(1))
    return _nms(boxes + offsets[:, None], scores, iou)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS with torchvision's CPU kernel's arithmetic (float32 IoU, compared with the
    threshold as a double). Every pair's IoU at once, in score order; then one pass keeps a box
    unless a kept, higher-ranked box overlaps it."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[order].T
    areas = (x2 - x1) * (y2 - y1)
    w = np.maximum(np.float32(0), np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1))
    h = np.maximum(np.float32(0), np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):  # two empty boxes: 0/0, NaN, never over (as torchvision)
        over = (inter / (areas[:, None] + areas - inter)).astype(np.float64) > iou
    over &= np.triu(np.ones_like(over), 1)  # only a higher-ranked box suppresses
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= over[i]
    return order[keep].astype(np.int64)


class CenterNetDecoder:
    """CenterNet heads: ``heatmap`` (N, C, h, w) logits, ``size`` (N, 2, h, w) width/height and
    ``offset`` (N, 2, h, w) sub-cell centre (x, y), both in output cells of ``stride`` pixels.

    Peaks are local maxima of the sigmoid heatmap (3x3 max-pool), the ``top_k`` best above
    ``score_threshold`` become boxes, then class-wise NMS at ``nms_iou`` and ``max_detections``
    (COCO's 100)."""

    def __init__(self, stride: int = 4, top_k: int = 100, score_threshold: float = 0.01,
                 nms_iou: float = 0.5, max_detections: int = 100, heads: tuple[int, int, int] = (0, 1, 2)) -> None:
        self.stride = float(stride)
        self.top_k, self.score_threshold = int(top_k), float(score_threshold)
        self.nms_iou, self.max_detections = float(nms_iou), int(max_detections)
        self.heads = heads

    def _split(self, outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(outputs) < 3:
            raise DataError(f"the CenterNet decoder needs 3 outputs (heatmap, size, offset); the model "
                            f"produced {len(outputs)}")
        heat, size, off = (np.asarray(outputs[i], np.float32) for i in self.heads)
        n, _, h, w = heat.shape if heat.ndim == 4 else (0, 0, 0, 0)
        if heat.ndim != 4 or size.shape != (n, 2, h, w) or off.shape != (n, 2, h, w):
            raise DataError(f"CenterNet heads must be heatmap (N, C, h, w), size and offset (N, 2, h, w); "
                            f"got {heat.shape}, {size.shape}, {off.shape}")
        return heat, size, off

    def num_classes(self, outputs: Sequence[np.ndarray]) -> int:
        return int(self._split(outputs)[0].shape[1])

    def decode(self, outputs: Sequence[np.ndarray]) -> list[Detections]:
        import torch

        heat, size, off = self._split(outputs)
        n, c, h, w = heat.shape
        with torch.no_grad():
            prob = torch.sigmoid(torch.from_numpy(heat))
            peaks = prob * (torch.nn.functional.max_pool2d(prob, 3, stride=1, padding=1) == prob)
            scores, flat = peaks.reshape(n, -1).topk(min(self.top_k, c * h * w), dim=1)
        scores, flat = scores.numpy(), flat.numpy()
        out = []
        for i in range(n):
            keep = scores[i] >= self.score_threshold
            s, f = scores[i][keep], flat[i][keep]
            cls, pix = f // (h * w), f % (h * w)
            ys, xs = pix // w, pix % w
            cx = (xs + off[i, 0, ys, xs]) * self.stride
            cy = (ys + off[i, 1, ys, xs]) * self.stride
            bw = np.maximum(size[i, 0, ys, xs], 0.0) * self.stride
            bh = np.maximum(size[i, 1, ys, xs], 0.0) * self.stride
            boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1).astype(np.float32)
            labels = cls.astype(np.int64)
            k = nms(boxes, s, labels, self.nms_iou)[: self.max_detections]
            out.append(Detections(boxes[k].reshape(-1, 4), s[k].astype(np.float32), labels[k]))
        return out


class YoloV8Decoder:
    """Anchor-free YOLOv8 heads (ultralytics ``Detect``, raw): one map per level, (N, 4 * reg_max + C,
    h, w), finest level first. Channels ``[0, 4 * reg_max)`` are the DFL logits of the distances
    (left, top, right, bottom) from the cell centre, ``reg_max`` bins each, in cells; the remaining
    ``C`` channels are class logits (see :mod:`qatcheck.zoo.yolo`).

    ``strides`` are the levels' strides in input pixels; None infers them from the map sizes with
    the coarsest level at ``top_stride`` (32: P5, true of every P3-P5 and P2-P5 ultralytics yaml, so
    yolov8n gives 8, 16, 32 and yolov8n-p2 4, 8, 16, 32; pass ``strides`` for a P6 model).

    Decoding follows ultralytics' validator: the distance is the softmax expectation over the bins,
    boxes are ``centre -/+ distance`` times the stride, class scores the sigmoid of the logits;
    every (anchor, class) pair above ``score_threshold`` is a candidate (multi-label), the
    ``pre_nms_top_k`` best go through class-wise NMS at ``nms_iou`` and ``max_detections`` remain
    (COCO's 100)."""

    def __init__(self, strides: Sequence[int] | None = None, reg_max: int = 16, score_threshold: float = 0.001,
                 nms_iou: float = 0.7, max_detections: int = 100, pre_nms_top_k: int = 1000,
                 top_stride: int = 32) -> None:
        self.strides = tuple(float(s) for s in strides) if strides is not None else None
        if (self.strides is not None and (not self.strides or any(s <= 0 for s in self.strides))) or top_stride <= 0:
            raise ConfigError(f"YoloV8Decoder strides must be positive; got {strides}, top_stride {top_stride}")
        self.top_stride = float(top_stride)
        if int(reg_max) < 1:
            raise ConfigError(f"YoloV8Decoder reg_max must be >= 1; got {reg_max}")
        self.reg_max = int(reg_max)
        self.score_threshold, self.nms_iou = float(score_threshold), float(nms_iou)
        self.max_detections, self.pre_nms_top_k = int(max_detections), int(pre_nms_top_k)

    def __repr__(self) -> str:
        return (f"YoloV8Decoder(strides={self.strides}, reg_max={self.reg_max}, score_threshold="
                f"{self.score_threshold}, nms_iou={self.nms_iou}, max_detections={self.max_detections})")

    def level_strides(self, outputs: Sequence[np.ndarray]) -> tuple[float, ...]:
        """The stride of each output map (given, or inferred from the map heights)."""
        if self.strides is not None:
            return self.strides
        coarsest = float(np.shape(outputs[-1])[2])
        return tuple(self.top_stride * coarsest / float(np.shape(o)[2]) for o in outputs)

    def _check(self, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if not len(outputs) or (self.strides is not None and len(outputs) != len(self.strides)):
            raise DataError(f"the YOLOv8 decoder needs {len(self.strides or ()) or 'one or more'} "
                            f"outputs (one raw map per stride {self.strides or ''}); the model "
                            f"produced {len(outputs)}")
        maps = [np.asarray(o, np.float32) for o in outputs]
        shapes = [m.shape for m in maps]
        box = 4 * self.reg_max
        if any(m.ndim != 4 for m in maps) or len({s[:2] for s in shapes}) != 1 or shapes[0][1] <= box:
            raise DataError(f"YOLOv8 heads must be (N, 4*reg_max + classes, h, w) with one N and channel "
                            f"count per level and more than {box} channels (reg_max {self.reg_max}); "
                            f"got {shapes}")
        return maps

    def num_classes(self, outputs: Sequence[np.ndarray]) -> int:
        return int(self._check(outputs)[0].shape[1] - 4 * self.reg_max)

    def decode(self, outputs: Sequence[np.ndarray]) -> list[Detections]:
        import torch

        maps = self._check(outputs)
        n, channels = maps[0].shape[:2]
        r, c = self.reg_max, channels - 4 * self.reg_max
        boxes, scores = [], []
        with torch.no_grad():
            bins = torch.arange(r, dtype=torch.float32)
            for m, stride in zip(maps, self.level_strides(maps)):
                t = torch.from_numpy(m)
                h, w = t.shape[2:]
                dist = (t[:, :4 * r].reshape(n, 4, r, h * w).softmax(2) * bins[:, None]).sum(2)  # N,4,hw
                ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5,
                                        torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
                cx, cy = xs.reshape(-1), ys.reshape(-1)
                boxes.append(torch.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]],
                                         2) * stride)  # N,hw,4
                scores.append(torch.sigmoid(t[:, 4 * r:].reshape(n, c, h * w)).transpose(1, 2))  # N,hw,C
            all_boxes, all_scores = torch.cat(boxes, 1).numpy(), torch.cat(scores, 1).numpy()
        out = []
        for i in range(n):
            anchor, cls = np.nonzero(all_scores[i] >= self.score_threshold)
            s = all_scores[i][anchor, cls]
            if len(s) > self.pre_nms_top_k:
                top = np.argsort(-s, kind="stable")[: self.pre_nms_top_k]
                anchor, cls, s = anchor[top], cls[top], s[top]
            b, labels = all_boxes[i][anchor], cls.astype(np.int64)
            k = nms(b, s, labels, self.nms_iou)[: self.max_detections]
            out.append(Detections(b[k].reshape(-1, 4).astype(np.float32), s[k].astype(np.float32), labels[k]))
        return out


#: head format name -> decoder factory (keyword arguments come from the recipe)
DECODERS: dict[str, Callable[..., Decoder]] = {"centernet": CenterNetDecoder, "yolov8": YoloV8Decoder}


def make_decoder(spec: str | Decoder | Mapping[str, Any] = "centernet") -> Decoder:
    """A decoder from a name (``"centernet"``), ``{"name": ..., **kwargs}`` or a ready instance."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", "centernet")
        if name not in DECODERS:
            raise ConfigError(f"unknown detection head format {name!r}; choose one of {', '.join(DECODERS)}")
        return DECODERS[name](**kwargs)
    if not hasattr(spec, "decode") or not hasattr(spec, "num_classes"):
        raise ConfigError(f"{spec!r} is not a detection Decoder (needs decode() and num_classes())")
    return spec


# ---- coordinates ---------------------------------------------------------------------------
def to_original(det: Detections, target: Mapping[str, Any]) -> np.ndarray:
    """Boxes in network-input pixels -> COCO ``[x, y, w, h]`` in the original image, clipped to it."""
    sx, sy = target.get("scale", (1.0, 1.0))
    px, py = target.get("pad", (0, 0))
    b = det.boxes.astype(np.float64).copy()
    b[:, [0, 2]] = (b[:, [0, 2]] - px) / sx
    b[:, [1, 3]] = (b[:, [1, 3]] - py) / sy
    if "orig_size" in target:
        h0, w0 = target["orig_size"]
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w0)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h0)
    b[:, 2:] -= b[:, :2]
    return b


def _quiet(fn: Callable, *args: Any) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def coco_evaluate(coco_gt: Any, predictions: np.ndarray, image_ids: Sequence[int] | None = None,
                  category_ids: Sequence[int] | None = None, backend: str = "pycocotools") -> np.ndarray:
    """COCOeval's 12 ``stats`` for ``predictions`` (rows ``[image_id, x, y, w, h, score, category_id]``).

    ``backend`` is ``"pycocotools"`` (the reference) or ``"faster_coco_eval"`` (a C++
    reimplementation with the same numbers, several times faster on val2017-sized sets)."""
    predictions = np.asarray(predictions, np.float64).reshape(-1, 7)
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    elif backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval
    else:
        raise ConfigError(f"unknown COCOeval backend {backend!r}; choose pycocotools or faster_coco_eval")
    if not len(predictions):  # loadRes refuses an empty result list; nothing found scores 0
        return np.zeros(12)
    if backend == "pycocotools":
        dt = _quiet(coco_gt.loadRes, predictions)
        ev = COCOeval(coco_gt, dt, "bbox")
    else:
        gt = COCO()
        gt.dataset = coco_gt.dataset
        _quiet(gt.createIndex)
        dt = _quiet(gt.loadRes, predictions)
        ev = COCOeval(gt, dt, "bbox", print_function=lambda *a, **k: None)
    if image_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in image_ids)
    if category_ids is not None:
        ev.params.catIds = sorted(int(c) for c in category_ids)
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    return np.asarray(ev.stats, np.float64)


class CocoMAP:
    """Streams predictions (a compact float array, 7 numbers per box) and runs COCOeval once, at
    :meth:`result`, over exactly the images that were evaluated."""

    def __init__(self, coco_gt: Any, category_ids: Sequence[int], decoder: Decoder,
                 metric_names: Sequence[str], backend: str = "pycocotools") -> None:
        self.coco_gt, self.category_ids = coco_gt, tuple(category_ids)
        self.decoder, self.metric_names, self.backend = decoder, tuple(metric_names), backend
        self._rows: list[np.ndarray] = []
        self.image_ids: list[int] = []

    def update(self, outputs: Sequence[np.ndarray], targets: Any) -> None:
        classes = self.decoder.num_classes(outputs)
        if classes != len(self.category_ids):
            raise DataError(f"the model predicts {classes} classes but the eval data declares "
                            f"{len(self.category_ids)} categories {list(self.category_ids)[:12]}")
        dets = self.decoder.decode(outputs)
        if len(dets) != len(targets):
            raise DataError(f"{len(targets)} targets for a batch of {len(dets)} outputs")
        cats = np.asarray(self.category_ids, np.float64)
        for det, t in zip(dets, targets):
            if not isinstance(t, Mapping) or "image_id" not in t:
                raise DataError("detection targets must be dicts with an 'image_id' (see qatcheck.data.coco)")
            self.image_ids.append(int(t["image_id"]))
            if len(det):
                xywh = to_original(det, t)
                self._rows.append(np.column_stack([np.full(len(det), t["image_id"], np.float64), xywh,
                                                   det.scores.astype(np.float64), cats[det.labels]]))

    def predictions(self) -> np.ndarray:
        return np.concatenate(self._rows) if self._rows else np.zeros((0, 7))

    def result(self) -> dict[str, float]:
        if not self.image_ids:
            raise DataError("no images were evaluated (empty eval set?)")
        stats = coco_evaluate(self.coco_gt, self.predictions(), self.image_ids, self.category_ids,
                              self.backend)
        return {name: max(float(stats[_STATS[name]]), 0.0) for name in self.metric_names}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of x1 y1 x2 y2 boxes: (len(a), len(b))."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class BoxAgreement:
    """Task-level parity between two outputs of the same batch.

    Reference boxes with score >= ``score_threshold`` are matched greedily (highest score first,
    each candidate used once) to the other output's boxes of the same class with score >=
    ``candidate_threshold`` (lower, so a box whose score merely crosses the threshold is not a
    miss) at IoU >= ``iou_threshold``. ``box_match`` is the matched share of reference boxes (1.0
    when the reference has none), ``box_iou`` the mean IoU of matches, ``box_score_delta`` the mean
    |score difference| of matches."""

    def __init__(self, decoder: Decoder, score_threshold: float = 0.3, iou_threshold: float = 0.5,
                 candidate_threshold: float = 0.1) -> None:
        self.decoder = decoder
        self.score_threshold, self.iou_threshold = float(score_threshold), float(iou_threshold)
        self.candidate_threshold = min(float(candidate_threshold), self.score_threshold)
        self.ref_boxes = self.matched = 0
        self.iou_sum = self.delta_sum = 0.0

    def update(self, ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
        for r, o in zip(self.decoder.decode(ref), self.decoder.decode(out)):
            r, o = r.above(self.score_threshold), o.above(self.candidate_threshold)
            self.ref_boxes += len(r)
            if not len(r) or not len(o):
                continue
            iou = box_iou(r.boxes, o.boxes)
            iou[r.labels[:, None] != o.labels[None, :]] = 0.0
            used = np.zeros(len(o), bool)
            for i in np.argsort(-r.scores, kind="stable"):
                cand = np.where(used, -1.0, iou[i])
                j = int(cand.argmax())
                if cand[j] >= self.iou_threshold:
                    used[j] = True
                    self.matched += 1
                    self.iou_sum += float(cand[j])
                    self.delta_sum += abs(float(r.scores[i]) - float(o.scores[j]))

    def result(self) -> dict[str, float]:
        return {"box_match": self.matched / self.ref_boxes if self.ref_boxes else 1.0,
                "box_iou": self.iou_sum / self.matched if self.matched else 0.0,
                "box_score_delta": self.delta_sum / self.matched if self.matched else 0.0}


class DetectionTask:
    """COCO mAP and box agreement for a detector whose raw heads ``decoder`` understands.

    The metric needs the ground truth, so the task is built for an eval set: ``coco_gt`` (a
    pycocotools ``COCO``) and ``category_ids`` (class index -> category id). ``area_ranges`` lists
    the COCO area ranges with ground truth (``CocoDataset.gt_area_ranges()``); only those get an
    ``ap_*`` metric, since COCOeval reports -1 for an empty range.
    """

    name = "detection"
    primary_metric = "map50_95"
    agreement_name = "box_match"

    def __init__(self, coco_gt: Any, category_ids: Sequence[int], decoder: str | Decoder | Mapping = "centernet",
                 area_ranges: Sequence[str] = ("small", "medium", "large"), *,
                 score_threshold: float = 0.3, iou_threshold: float = 0.5,
                 evaluator: str = "pycocotools") -> None:
        self.coco_gt, self.category_ids = coco_gt, tuple(category_ids)
        self.decoder = make_decoder(decoder)
        unknown = [a for a in area_ranges if a not in _AREA_METRIC]
        if unknown:
            raise ConfigError(f"unknown COCO area ranges {unknown}; choose from small, medium, large")
        self.metric_names = ("map50_95", "map50") + tuple(_AREA_METRIC[a] for a in area_ranges)
        self.score_threshold, self.iou_threshold, self.evaluator = score_threshold, iou_threshold, evaluator

    @classmethod
    def for_dataset(cls, data: Any, decoder: str | Decoder | Mapping = "centernet", **kwargs: Any) -> "DetectionTask":
        """The task for a :class:`~qatcheck.data.coco.CocoDataset` (anything with ``coco``,
        ``category_ids`` and ``gt_area_ranges()``)."""
        if not hasattr(data, "coco") or not hasattr(data, "category_ids"):
            raise DataError(f"detection needs COCO-format eval data (qatcheck.data.coco.CocoDataset); "
                            f"got {type(data).__name__} {getattr(data, 'name', '')!r}")
        ranges = data.gt_area_ranges() if hasattr(data, "gt_area_ranges") else ("small", "medium", "large")
        return cls(data.coco, data.category_ids, decoder, ranges, **kwargs)

    def check_model(self, outputs: Sequence[np.ndarray]) -> None:
        """DataError when the model's class count disagrees with the eval set's categories."""
        classes = self.decoder.num_classes(outputs)
        if classes != len(self.category_ids):
            raise DataError(f"the model predicts {classes} classes but the eval data declares "
                            f"{len(self.category_ids)} categories {list(self.category_ids)[:12]}")

    def resize_targets(self, targets: Sequence[Mapping[str, Any]], from_hw: Sequence[int],
                       to_hw: Sequence[int]) -> list[dict]:
        """Targets for inputs resized from ``from_hw`` to ``to_hw`` (a dynamic H/W profile point):
        the decoder's boxes are then in the resized input's pixels, so each image's ``scale`` and
        ``pad`` (and its ``boxes``) follow the resize, and boxes map back to the same original."""
        ry, rx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
        out = []
        for t in targets:
            t = dict(t)
            sx, sy = t.get("scale", (1.0, 1.0))
            px, py = t.get("pad", (0, 0))
            t["scale"], t["pad"] = (sx * rx, sy * ry), (px * rx, py * ry)
            if "boxes" in t:
                t["boxes"] = np.asarray(t["boxes"], np.float32).reshape(-1, 4) * np.float32([rx, ry, rx, ry])
            out.append(t)
        return out

    def metric(self) -> CocoMAP:
        return CocoMAP(self.coco_gt, self.category_ids, self.decoder, self.metric_names, self.evaluator)

    def agreement(self) -> BoxAgreement:
        return BoxAgreement(self.decoder, self.score_threshold, self.iou_threshold)


def for_recipe(recipe, eval_data=None) -> DetectionTask:
    """The registry's factory (``Recipe.task = "detection"``): the ground truth and categories
    come from the eval set, the decoder from ``Recipe.decoder``."""
    if eval_data is None:
        raise ConfigError(f"Recipe({recipe.name}): a detection task needs the eval data")
    return DetectionTask.for_dataset(eval_data(), decoder=recipe.decoder)
