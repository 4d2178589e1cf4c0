"""Evaluation streams: peak memory during a case does not grow with the eval set.

The eval set here is generated batch by batch (never held in memory), so any growth would come
from qatcheck keeping outputs around. tracemalloc sees numpy's allocations (ONNX Runtime outputs
and the metric's inputs are numpy arrays).
"""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import torch

from qatcheck.backends.onnxruntime_backend import OrtBackend
from qatcheck.backends.torch_backend import TorchBackend
from qatcheck.measurement import Case
from qatcheck.recipe import InputSpec, Recipe
from qatcheck.session import Options, QatcheckSession


class GeneratedDataset:
    """n samples of 3x32x32 noise, produced on demand (1000 classes: kept logits would show)."""

    def __init__(self, n: int) -> None:
        self.n, self.name = n, f"generated{n}"

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size, limit=None):
        for i, start in enumerate(range(0, self.n, batch_size)):
            if limit is not None and i >= limit:
                return
            m = min(batch_size, self.n - start)
            rng = np.random.default_rng(start)
            yield rng.standard_normal((m, 3, 32, 32), dtype=np.float32), rng.integers(0, 1000, m)

    def fingerprint(self) -> str:
        return self.name


def peak_bytes(n: int, tmp_path: Path) -> tuple[int, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 1000))
    recipe = Recipe(name="stream", task="classification", model=lambda: model,
                    eval_data=lambda: GeneratedDataset(n), calib_data=lambda: GeneratedDataset(64),
                    input=InputSpec(shape=(64, 3, 32, 32)), modes=("fp32",),
                    backends=("torch", "onnxruntime"))
    session = QatcheckSession(Options(cache_dir=tmp_path / f"c{n}", progress=False),
                              {"torch": TorchBackend("cpu"), "onnxruntime": OrtBackend()})
    session.register(recipe)
    case = Case("stream", "fp32", "onnxruntime")
    session.runner(case), session.runner(Case("stream", "fp32", "torch"))  # build outside the trace
    tracemalloc.start()
    m = session.measure(case)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert m.eval_samples == n and m.parity["top1_agreement"] == 1.0
    return peak, m.metrics["top1"]


def test_eval_memory_does_not_grow_with_the_eval_set(tmp_path):
    small, _ = peak_bytes(640, tmp_path)
    large, _ = peak_bytes(6400, tmp_path)   # 10x the data: +23 MB of logits if they were kept
    assert large < small * 1.5 + 1_000_000, (small, large)


def test_the_memory_check_sees_kept_outputs(tmp_path, monkeypatch):
    """Planted leak: a metric that keeps every batch's logits makes peak memory scale."""
    from qatcheck.tasks.classification import TopKAccuracy

    kept = []
    original = TopKAccuracy.update
    monkeypatch.setattr(TopKAccuracy, "update",
                        lambda self, outputs, targets: (kept.append(outputs[0].copy()),
                                                        original(self, outputs, targets)))
    small, _ = peak_bytes(640, tmp_path)
    large, _ = peak_bytes(6400, tmp_path)
    assert large > small * 1.5 + 1_000_000
