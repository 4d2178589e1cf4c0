"""Models with several outputs: the recipe's task scores the output it names (``Recipe.task_output``)
and every other judged head has a task of its own (``Recipe.heads``: output name -> task name).

Why outputs are chosen by name: a three-headed face model (boxes, landmarks, face probability) was
scored on output 0 - the boxes - as class logits: 12% top-1 in every mode, every test green, and
that recorded as the baseline. Now a multi-output classification recipe must say which output it
scores, and each head's metrics are its own columns and baselines, named ``<output>.<metric>``.

Targets: with heads, the eval data's targets are a :class:`HeadTargets` - one target array (or
per-sample sequence) per output name - and each task reads its own output's.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from qatcheck.errors import DataError
from qatcheck.tasks.base import MetricSpec, metric_spec


class HeadTargets:
    """Targets for several heads, by output name; slices like an array (``[a:b]`` slices every
    head's targets), so :class:`qatcheck.data.base.ArrayDataset` batches it like labels."""

    def __init__(self, targets: Mapping[str, Any]) -> None:
        self.targets = dict(targets)
        lengths = {name: len(t) for name, t in self.targets.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise DataError(f"HeadTargets: every head needs one target per sample; got lengths {lengths}")
        self._len = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key):
        """``["landmarks"]``: one head's targets; a slice or an index array: every head's, for those
        samples; an int: one sample's, by head."""
        if isinstance(key, str):
            if key not in self.targets:
                raise DataError(f"the eval data holds targets for {sorted(self.targets)}, none for output {key!r}")
            return self.targets[key]
        if isinstance(key, (int, np.integer)):
            return {name: t[key] for name, t in self.targets.items()}
        return HeadTargets({name: t[key] if isinstance(t, np.ndarray) or isinstance(key, slice)
                            else [t[i] for i in key] for name, t in self.targets.items()})

    def tobytes(self) -> bytes:
        """For the dataset fingerprint: every head's targets, by name."""
        return b"".join(name.encode() + (t.tobytes() if isinstance(t, np.ndarray) else repr(list(t)).encode())
                        for name, t in sorted(self.targets.items()))

    def __repr__(self) -> str:
        return f"HeadTargets({sorted(self.targets)}, {self._len} samples)"


def _select(targets: Any, output: str, multi: bool) -> Any:
    if not multi:
        return targets
    if not isinstance(targets, HeadTargets):
        raise DataError(f"a recipe with heads needs its eval targets as qatcheck.tasks.heads.HeadTargets "
                        f"(one target set per output name); got {type(targets).__name__}")
    return targets[output]


class _Metric:
    def __init__(self, parts, multi: bool) -> None:
        self.parts = parts  # (prefix, output index, output name, accumulator)
        self.multi = multi

    def update(self, outputs: Sequence[np.ndarray], targets: Any) -> None:
        for _, index, name, acc in self.parts:
            acc.update([outputs[index]], _select(targets, name, self.multi))

    def result(self) -> dict[str, float]:
        out = {}
        for prefix, _, _, acc in self.parts:
            out.update({f"{prefix}{k}": v for k, v in acc.result().items()})
        return out


class _Agreement:
    def __init__(self, acc, index: int) -> None:
        self.acc, self.index = acc, index

    def update(self, ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
        self.acc.update([ref[self.index]], [out[self.index]])

    def result(self) -> dict[str, float]:
        return self.acc.result()


class HeadsTask:
    """The recipe's task on its named output plus each head's task on its own (see the module
    docstring); the primary task's metric leads the table and its agreement is the parity's."""

    def __init__(self, primary, output_names: Sequence[str], task_output: str | None,
                 heads: Mapping[str, Any]) -> None:
        self.output_names = tuple(output_names)
        self.primary = primary
        self.primary_output = task_output
        self.heads = dict(heads)
        self.name = primary.name
        self.primary_metric = primary.primary_metric
        self.agreement_name = primary.agreement_name
        specs: dict[str, MetricSpec] = {n: metric_spec(primary, n) for n in primary.metric_names}
        names = list(primary.metric_names)
        for out, task in self.heads.items():
            for n in task.metric_names:
                names.append(f"{out}.{n}")
                specs[f"{out}.{n}"] = metric_spec(task, n)
        self.metric_names = tuple(names)
        self.metric_specs = specs

    def _index(self, output: str) -> int:
        return self.output_names.index(output)

    def metric(self) -> _Metric:
        parts = [("", self._index(self.primary_output), self.primary_output, self.primary.metric())]
        parts += [(f"{out}.", self._index(out), out, task.metric()) for out, task in self.heads.items()]
        return _Metric(parts, multi=bool(self.heads))

    def agreement(self) -> _Agreement:
        return _Agreement(self.primary.agreement(), self._index(self.primary_output))

    def resize_targets(self, targets: Any, from_hw: Sequence[int], to_hw: Sequence[int]) -> Any:
        """Each task's targets through its own ``resize_targets`` (see tasks.base.Task), if it has one."""
        def resized(task, t):
            hook = getattr(task, "resize_targets", None)
            return hook(t, from_hw, to_hw) if hook is not None else t
        if not self.heads:
            return resized(self.primary, targets)
        if not isinstance(targets, HeadTargets):
            return targets  # the metric names the problem (_select)
        tasks = {self.primary_output: self.primary, **self.heads}
        return HeadTargets({name: resized(tasks[name], t) if name in tasks else t
                            for name, t in targets.targets.items()})

    def check_model(self, outputs: Sequence[np.ndarray]) -> None:
        if len(outputs) != len(self.output_names):
            raise DataError(f"the model returns {len(outputs)} outputs; Recipe.output_names names "
                            f"{len(self.output_names)}: {', '.join(self.output_names)}")
        for out, task in [(self.primary_output, self.primary), *self.heads.items()]:
            if hasattr(task, "check_model"):
                task.check_model([outputs[self._index(out)]])


def wrap(recipe, primary, make) -> Any:
    """The recipe's task, wrapped when it names an output or has heads (``make(task_name)`` builds
    a head's task)."""
    if recipe.task_output is None and not recipe.heads:
        return primary
    return HeadsTask(primary, recipe.output_names, recipe.task_output or recipe.output_names[0],
                     {out: make(name) for out, name in recipe.heads.items()})
