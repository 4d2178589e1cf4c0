"""Output parity between a case and its reference, accumulated batch by batch.

Why cosine and agreement rather than a tight atol: int8 fake-quant in PyTorch and ONNX Runtime round
differently at a handful of elements (max-abs ~0.06 on whole networks) while agreeing to cosine
~0.9999. Cosine over all outputs, max-abs, and the task-level agreement (top-1 for classification)
are what a deployment decision rests on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ParityAccumulator:
    """Streaming cosine similarity / max-abs / mean-abs between two output tensors."""

    dot: float = 0.0
    ref_sq: float = 0.0
    out_sq: float = 0.0
    max_abs: float = 0.0
    abs_sum: float = 0.0
    count: int = 0

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        if ref.shape != out.shape:
            raise ValueError(f"parity: output shape {out.shape} differs from reference {ref.shape}")
        r = ref.astype(np.float64).ravel()
        o = out.astype(np.float64).ravel()
        self.dot += float(r @ o)
        self.ref_sq += float(r @ r)
        self.out_sq += float(o @ o)
        diff = np.abs(r - o)
        if diff.size:
            # np.max propagates NaN (Python's max() would silently keep the old value)
            self.max_abs = float(np.max([self.max_abs, diff.max()]))
            self.abs_sum += float(diff.sum())
            self.count += diff.size

    def result(self) -> dict[str, float]:
        """A non-finite output (fp16 overflow, NaN) must never read as agreement: its cosine is 0."""
        if not all(np.isfinite(v) for v in (self.dot, self.ref_sq, self.out_sq)):
            return {"cosine": 0.0, "max_abs": float("inf") if np.isfinite(self.max_abs) else self.max_abs,
                    "mean_abs": float("inf")}
        denom = np.sqrt(self.ref_sq) * np.sqrt(self.out_sq)
        cosine = float(self.dot / denom) if denom > 0 else (1.0 if self.ref_sq == self.out_sq else 0.0)
        return {"cosine": cosine, "max_abs": self.max_abs,
                "mean_abs": self.abs_sum / self.count if self.count else 0.0}
