"""The one evaluation loop: a model's outputs over batches, streamed into the task's metric, and
optionally compared with a reference's outputs on the same batches.

The session's measurements and the sensitivity profile both evaluate through here, with the same
runners and the same task metrics, so a number in the profile and in the table mean the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from qatcheck.data.base import TargetsDigest
from qatcheck.errors import DataError
from qatcheck.parity import ParityAccumulator

Infer = Callable[[np.ndarray], Sequence[np.ndarray]]


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    #: per output (in output order): cosine / max_abs / mean_abs vs the reference; None without one
    parity: tuple[dict[str, float], ...] | None
    #: task-level agreement with the reference (top-1 agreement, box match); None without one
    agreement: dict[str, float] | None
    samples: int
    seconds: float
    #: NaN / inf values among the outputs (a metric over them means nothing); NaN / inf inputs
    #: are an error before any model runs on them
    nonfinite_outputs: int = 0
    #: samples with at least one NaN / inf output value
    nonfinite_samples: int = 0
    #: each output's per-sample shape (batch dimension dropped), in output order
    output_shapes: tuple[tuple[int, ...], ...] = ()
    #: a digest of the targets the metric read (data.base.TargetsDigest; "" when they have no
    #: canonical bytes)
    targets: str = ""


def evaluate(infer: Infer, batches: Iterable[tuple[np.ndarray, Any, int]], task, *,
             reference: Infer | Sequence[Sequence[np.ndarray]] | None = None,
             keep: list | None = None, on_batch: Callable[[], None] | None = None,
             source: str = "the eval data",
             check_outputs: Callable[[Sequence[np.ndarray]], None] | None = None) -> Evaluation:
    """Run ``infer`` over ``(inputs, targets, real count)`` batches.

    ``reference`` is another model (run on the same batches) or the outputs it produced earlier, one
    list per batch (the sensitivity profile keeps fp32's). ``keep`` collects this model's outputs.
    ``check_outputs`` sees the first batch's outputs before any metric does (and may raise).
    """
    metric = task.metric()
    agreement = task.agreement() if reference is not None else None
    parities: list[ParityAccumulator] = []
    samples = bad_out = bad_samples = 0
    bad_inputs: list[int] = []
    shapes: tuple[tuple[int, ...], ...] = ()
    targets = TargetsDigest()
    t0 = time.perf_counter()
    for i, (x, y, n) in enumerate(batches):
        bad = _nonfinite_rows(x[:n]) + samples
        if bad.size or bad_inputs:
            # NaN / inf in an input is the data's fault: from the first such sample on no model
            # runs, but the rest of the set is still scanned so the error counts every bad sample
            bad_inputs += bad.tolist()
            samples += n
            if on_batch is not None:
                on_batch()
            continue
        outs = [np.asarray(o)[:n] for o in infer(x)]
        finite = [np.isfinite(o.reshape(n, -1)) for o in outs]
        bad_out += sum(int(f.size - f.sum()) for f in finite)
        bad_samples += int(n - np.logical_and.reduce([f.all(axis=1) for f in finite]).sum()) if finite else 0
        if i == 0:
            shapes = tuple(tuple(int(d) for d in o.shape[1:]) for o in outs)
            if check_outputs is not None:
                check_outputs(outs)
            if hasattr(task, "check_model"):
                task.check_model(outs)  # e.g. a detector's class count vs the data's, top_k vs classes
        metric.update(outs, y)
        targets.update(y, n)
        samples += n
        if reference is not None:
            refs = ([np.asarray(o)[:n] for o in reference(x)] if callable(reference)
                    else list(reference[i]))
            if not parities:
                parities = [ParityAccumulator() for _ in refs]
            for acc, r, o in zip(parities, refs, outs):
                acc.update(r, o)
            agreement.update(refs, outs)
        if keep is not None:
            keep.append(outs)
        if on_batch is not None:
            on_batch()
    if bad_inputs:
        # said before any model ran on them, naming the samples (a model's non-finite outputs
        # would otherwise blame fp16 range or a scale)
        shown = ", ".join(str(i) for i in bad_inputs[:8]) + (", ..." if len(bad_inputs) > 8 else "")
        raise DataError(f"{source}: {len(bad_inputs)} of {samples} input samples hold NaN/inf values (sample "
                        f"index {shown}); no model was run on them - fix or filter the data")
    return Evaluation(metrics=metric.result(),
                      parity=tuple(p.result() for p in parities) if reference is not None else None,
                      agreement=agreement.result() if agreement is not None else None,
                      samples=samples, seconds=time.perf_counter() - t0,
                      nonfinite_outputs=bad_out, nonfinite_samples=bad_samples, output_shapes=shapes,
                      targets=targets.hexdigest())


def _nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices (within the batch) of the samples holding a NaN / inf value."""
    return np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))


def combined_parity(ev: Evaluation) -> dict[str, float] | None:
    """One parity record for the model: with several outputs the worst cosine speaks for the model
    and max-abs is the largest over outputs; the task-level agreement is added."""
    if ev.parity is None:
        return None
    par = dict(ev.parity[0]) if ev.parity else {"cosine": 0.0, "max_abs": float("inf"), "mean_abs": float("inf")}
    if len(ev.parity) > 1:
        worst = min(ev.parity, key=lambda d: d["cosine"])
        par = {**worst, "max_abs": max(p["max_abs"] for p in ev.parity)}
    return {**par, **(ev.agreement or {})}
