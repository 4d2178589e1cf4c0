"""Signal vs error of a low-precision tensor against its reference, accumulated batch by batch: the
one accumulator behind output parity (:mod:`qatcheck.evaluate`), the per-layer localization
(:mod:`qatcheck.analysis.localize_kernel`) and the sensitivity profile's SQNR
(:func:`sqnr_db`).

Why cosine and agreement rather than a tight atol: int8 fake-quant in PyTorch and ONNX Runtime round
differently at a handful of elements (max-abs ~0.06 on whole networks) while agreeing to cosine
~0.9999. Cosine over all outputs, max-abs, and the task-level agreement (top-1 for classification)
are what a deployment decision rests on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: SQNR is clamped to +-this many dB: tensors equal to the reference have an infinite SQNR,
#: non-finite ones (NaN / inf) read as the floor; both stay valid JSON
SQNR_CAP_DB = 300.0


def _f64(x: Any):
    """``x`` flattened in float64: a torch tensor stays one (its sums run on its device, in
    torch's order - this module imports no torch), anything else becomes a numpy array."""
    if hasattr(x, "double"):
        return x.double().reshape(-1)
    return np.asarray(x).astype(np.float64).ravel()


@dataclass
class ParityAccumulator:
    """Streaming cosine similarity / SQNR / max-abs / mean-abs between a reference tensor and a
    low-precision one (numpy arrays, or torch tensors)."""

    dot: float = 0.0
    ref_sq: float = 0.0  # signal energy
    out_sq: float = 0.0
    err_sq: float = 0.0  # error energy
    max_abs: float = 0.0
    abs_sum: float = 0.0
    count: int = 0

    def update(self, ref, out) -> None:
        if tuple(ref.shape) != tuple(out.shape):
            raise ValueError(f"parity: output shape {tuple(out.shape)} differs from reference {tuple(ref.shape)}")
        r, o = _f64(ref), _f64(out)
        self.dot += float(r @ o)
        self.ref_sq += float(r @ r)
        self.out_sq += float(o @ o)
        d = r - o
        self.err_sq += float(d @ d)
        if d.shape[0]:
            diff = abs(d)
            # np.max propagates NaN (Python's max() would silently keep the old value)
            self.max_abs = float(np.max([self.max_abs, float(diff.max())]))
            self.abs_sum += float(diff.sum())
            self.count += int(d.shape[0])

    def cosine(self) -> float:
        """A non-finite output (fp16 overflow, NaN) must never read as agreement: its cosine is 0."""
        if not all(math.isfinite(v) for v in (self.dot, self.ref_sq, self.out_sq)):
            return 0.0
        denom = np.sqrt(self.ref_sq) * np.sqrt(self.out_sq)
        return float(self.dot / denom) if denom > 0 else (1.0 if self.ref_sq == self.out_sq else 0.0)

    def sqnr_db(self) -> float:
        """10 log10(signal / error energy), clamped to +-:data:`SQNR_CAP_DB`; non-finite: the floor."""
        if not (math.isfinite(self.ref_sq) and math.isfinite(self.err_sq)):
            return -SQNR_CAP_DB
        if self.err_sq <= 0.0:
            return SQNR_CAP_DB  # equal to the reference
        if self.ref_sq <= 0.0:
            return -SQNR_CAP_DB
        return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(self.ref_sq / self.err_sq)))

    def finite(self) -> bool:
        return math.isfinite(self.ref_sq) and math.isfinite(self.err_sq)

    def result(self) -> dict[str, float]:
        """The output parity record (cosine, max-abs, mean-abs); non-finite: cosine 0, mean-abs inf."""
        if not all(math.isfinite(v) for v in (self.dot, self.ref_sq, self.out_sq)):
            return {"cosine": 0.0, "max_abs": float("inf") if np.isfinite(self.max_abs) else self.max_abs,
                    "mean_abs": float("inf")}
        return {"cosine": self.cosine(), "max_abs": self.max_abs,
                "mean_abs": self.abs_sum / self.count if self.count else 0.0}


def sqnr_db(reference: Sequence[Sequence[Any]], outputs: Sequence[Sequence[Any]]) -> float:
    """SQNR in dB of ``outputs`` vs ``reference`` (one list of output arrays per batch, as
    :func:`qatcheck.evaluate.evaluate` keeps them): 10 log10(signal energy / error energy) over all
    batches, per output, clamped to +-:data:`SQNR_CAP_DB`; non-finite outputs give the floor.

    With several outputs, the mean of the per-output SQNRs (dB), unlike the cosine, which reports
    the worst output: as a ranking key the worst output alone ties every layer that only feeds
    another head (measured on digitdet: ``size.out`` and ``heatmap.out`` tied to the last bit,
    both equal to the all-quantized model's worst output). The mean moves with every output."""
    if len(reference) != len(outputs):
        raise ValueError(f"sqnr: {len(outputs)} output batches vs {len(reference)} reference batches")
    if not reference:
        return SQNR_CAP_DB
    accs = [ParityAccumulator() for _ in reference[0]]
    for refs, outs in zip(reference, outputs):
        for acc, r, o in zip(accs, refs, outs):
            acc.update(np.asarray(r), np.asarray(o))
    if not all(a.finite() for a in accs):
        return -SQNR_CAP_DB
    return float(np.mean([a.sqnr_db() for a in accs]))
