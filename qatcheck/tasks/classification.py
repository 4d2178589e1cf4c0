"""Classification: streaming top-k accuracy and top-1 agreement between two backends."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qatcheck.errors import DataError


class TopKAccuracy:
    """Counts correct predictions; holds O(1) memory whatever the eval set's size."""

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        self.ks = tuple(sorted(set(ks)))
        self.correct = {k: 0 for k in self.ks}
        self.total = 0

    def update(self, outputs: Sequence[np.ndarray], targets: Any) -> None:
        logits = outputs[0]
        labels = np.asarray(targets).astype(np.int64).ravel()
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise DataError(f"classification expects logits (N, classes) for {labels.shape[0]} "
                            f"labels; the model produced {logits.shape}")
        bad = labels[(labels < 0) | (labels >= logits.shape[1])]
        if bad.size:
            raise DataError(f"label {int(bad[0])} is outside the model's "
                            f"{logits.shape[1]} classes (0..{logits.shape[1] - 1})")
        kmax = min(max(self.ks), logits.shape[1])
        top = np.argsort(-logits, axis=1, kind="stable")[:, :kmax]
        hits = top == labels[:, None]
        for k in self.ks:
            self.correct[k] += int(hits[:, :k].any(axis=1).sum())
        self.total += labels.shape[0]

    def result(self) -> dict[str, float]:
        if not self.total:
            raise DataError("no samples were evaluated (empty eval set?)")
        return {f"top{k}": self.correct[k] / self.total for k in self.ks}


class Top1Agreement:
    """Share of samples whose arg-max class is the same in both outputs."""

    def __init__(self) -> None:
        self.same = 0
        self.total = 0

    def update(self, ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
        a, b = ref[0].argmax(axis=1), out[0].argmax(axis=1)
        self.same += int((a == b).sum())
        self.total += a.shape[0]

    def result(self) -> dict[str, float]:
        return {"top1_agreement": self.same / self.total if self.total else 0.0}


class ClassificationTask:
    """Top-k accuracy (``Recipe.top_k``) of class scores (N, classes) against int labels, and top-1
    agreement for parity. Reads ``Recipe.task_output`` (a multi-output model must name it), or the
    only output; a k at or above the class count is an error."""

    name = "classification"
    agreement_name = "top1_agreement"

    def __init__(self, top_k: Sequence[int] = (1, 5), output: str = "output 0") -> None:
        self.top_k = tuple(top_k)
        self.metric_names = tuple(f"top{k}" for k in self.top_k)
        self.primary_metric = self.metric_names[0]
        self.output = output  # named in errors

    def check_model(self, outputs: Sequence[np.ndarray]) -> None:
        """Top-5 of a 2-class model is 100% whatever the model does: an error, not a figure."""
        logits = outputs[0]
        if logits.ndim != 2:
            raise DataError(f"classification reads class scores (N, classes) from output {self.output!r}; "
                            f"it has shape {tuple(logits.shape)} (Recipe.task_output names the output to score)")
        if any(k > 1 and k >= logits.shape[1] for k in self.top_k):
            raise DataError(f"Recipe.top_k={self.top_k} asks for top-{max(self.top_k)}, but output "
                            f"{self.output!r} has {logits.shape[1]} classes: a top-k with k >= the class "
                            f"count is 100% whatever the model does; use top_k=(1,)")

    def metric(self) -> TopKAccuracy:
        return TopKAccuracy(self.top_k)

    def agreement(self) -> Top1Agreement:
        return Top1Agreement()



def for_recipe(recipe, eval_data=None) -> ClassificationTask:
    """The registry's factory (``Recipe.task = "classification"``)."""
    return ClassificationTask(recipe.top_k, output=recipe.task_output or recipe.output_names[0])
