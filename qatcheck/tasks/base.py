"""What a task supplies: a streaming metric and task-level parity.

Backends produce raw outputs; everything task-specific (decoding, metrics, agreement) lives here so
every backend is judged by the same code.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np


class MetricAccumulator(Protocol):
    def update(self, outputs: Sequence[np.ndarray], targets: Any) -> None: ...

    def result(self) -> dict[str, float]: ...


class AgreementAccumulator(Protocol):
    def update(self, ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None: ...

    def result(self) -> dict[str, float]: ...


class Task(Protocol):
    name: str
    #: the metric budgets and tables lead with
    primary_metric: str
    #: metrics in table order
    metric_names: tuple[str, ...]
    #: the task-level agreement number that parity thresholds apply to
    agreement_name: str

    def metric(self) -> MetricAccumulator: ...

    def agreement(self) -> AgreementAccumulator: ...
