"""What a task supplies: a streaming metric and task-level parity.

Backends produce raw outputs; everything task-specific (decoding, metrics, agreement) lives here so
every backend is judged by the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is judged. The default - a fraction in [0, 1], higher is better, shown in
    percent with its tolerance in points - fits top-k and mAP. A regression error (landmark L2,
    lower is better, in pixels) is ``MetricSpec(higher_is_better=False, fraction=False)``: stored
    as a plain value, its tolerance relative to the baseline (``Tolerances.value_metric_rel``)."""

    #: False for an error (a larger value is worse)
    higher_is_better: bool = True
    #: a fraction in [0, 1] (percent, tolerance in points); False: a plain value (relative tolerance)
    fraction: bool = True


def metric_spec(task, name: str) -> MetricSpec:
    """A task's spec for one of its metrics (``Task.metric_specs``; the default when it has none)."""
    return dict(getattr(task, "metric_specs", None) or {}).get(name, MetricSpec())


class MetricAccumulator(Protocol):
    """A task's streaming metric: counts, never the outputs (memory does not grow with the eval set)."""

    def update(self, outputs: Sequence[np.ndarray], targets: Any) -> None: ...

    def result(self) -> dict[str, float]: ...


class AgreementAccumulator(Protocol):
    """Task-level agreement of a case's outputs with its reference's (top-1 agreement, box match)."""

    def update(self, ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None: ...

    def result(self) -> dict[str, float]: ...


class Task(Protocol):
    """What ``register_task(name, factory)`` factories return (``factory(recipe, eval_data)``;
    ``eval_data()`` gives the loaded eval set, e.g. for ground truth). ``metric()`` is a fresh
    streaming accumulator per evaluation: ``update(outputs, targets)`` per batch (``outputs``: the
    model's outputs - with ``Recipe.task_output`` / ``heads``, just this task's output - as numpy
    arrays without padding; ``targets``: the batch's targets), ``result()`` the metrics at the end.
    ``agreement()`` compares a case's outputs with its reference's on the same batches."""

    name: str
    #: the metric budgets and tables lead with
    primary_metric: str
    #: metrics in table order
    metric_names: tuple[str, ...]
    #: the task-level agreement number that parity thresholds apply to
    agreement_name: str

    def metric(self) -> MetricAccumulator: ...

    def agreement(self) -> AgreementAccumulator: ...

    # optional:
    #: metric_specs: Mapping[str, MetricSpec] - direction and scale of each metric (default: a
    #: fraction, higher is better)
    #: check_model(outputs) - called on the first batch's outputs; raise DataError when they cannot
    #: be what the task reads (a class count below top_k, a detector's class count)
    #: resize_targets(targets, from_hw, to_hw) - a dynamic H/W profile point resizes the inputs
    #: (bilinear, each axis on its own: a pixel coordinate scales by to / from); return the batch's
    #: targets in the resized input's coordinates. Without it targets are passed unchanged, in the
    #: eval set's own (a task whose targets are pixel positions, boxes or masks must rescale them)
