"""Judges: pure functions of (measurement, baseline, tolerances) -> :class:`Verdict`.

A judge never measures, never reads a file and never writes one. It says pass / fail / skip with
messages that name the cause, and lists the values the recorder may store under
``--update-baselines``; :meth:`qatcheck.session.QatcheckSession.record` decides whether it does.
``base`` is the case's stored baseline, or None while recording (``--update-baselines``): then
nothing is compared with the stored values, but floors and fp32 budgets still apply.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from qatcheck.baselines import Update
from qatcheck.measurement import Measurement, Verdict

#: comparisons of floats read back from JSON
EPS = 1e-9


@dataclass(frozen=True)
class CaseBaseline:
    """One case's stored entries (``section -> name -> {"value", "tolerance"}``; latency one level
    deeper, under the device fingerprint), and the file they came from (for messages)."""

    path: str
    entries: Mapping[str, Any] = field(default_factory=dict)

    def get(self, section: str, name: str, fingerprint: str | None = None) -> dict | None:
        entries = self.entries.get(section, {})
        if fingerprint is not None:
            entries = entries.get(fingerprint, {})
        return entries.get(name)

    def missing(self, key: str, what: str) -> str:
        return f"no baseline for {key} {what} in {self.path}; record it with --update-baselines"


def _verdict(check: str, m: Measurement, failures: list[str], updates: list[Update],
             notes: tuple[str, ...] = ()) -> Verdict:
    return Verdict(check, m.case, "fail" if failures else "pass", tuple(failures), notes=notes,
                   updates=tuple(updates))


def judge_accuracy(m: Measurement, base: CaseBaseline | None, *, metric_names: tuple[str, ...],
                   primary: str, tolerance_points: float, fp32: Measurement | None = None,
                   budget_points: float | None = None) -> Verdict:
    """Each metric vs its baseline (tolerance in points); and, with ``budget_points``, the primary
    metric vs fp32 on the same backend."""
    failures: list[str] = []
    updates = []
    key = m.case.key
    for name in metric_names:
        value = m.metrics[name]
        updates.append(Update(key, "metrics", name, float(value), float(tolerance_points)))
        if not math.isfinite(value):
            failures.append(f"{name} is {value}: the metric is not a finite number")
            continue
        if base is None:
            continue
        b = base.get("metrics", name)
        if b is None:
            failures.append(base.missing(key, f"metrics.{name}"))
        elif value < b["value"] - b["tolerance"] / 100 - EPS:
            failures.append(
                f"{name} {value:.2%} is below the baseline {b['value']:.2%} by "
                f"{(b['value'] - value) * 100:.2f} points (tolerance {b['tolerance']:g} points) [{base.path}]")
    if budget_points is not None and fp32 is not None:
        drop = (fp32.metrics[primary] - m.metrics[primary]) * 100
        if not drop <= budget_points + EPS:
            failures.append(f"{primary} {m.metrics[primary]:.2%} is {drop:.2f} points below fp32 "
                            f"{fp32.metrics[primary]:.2%} on {m.case.backend} (budget {budget_points:g} points)")
    return _verdict("accuracy", m, failures, updates)


def judge_parity(m: Measurement, base: CaseBaseline | None, *, thresholds, agreement_name: str,
                 cosine_tolerance: float, agreement_tolerance: float) -> Verdict:
    """Outputs vs the case's reference: absolute floors (``thresholds``, a ParityThresholds) and
    the stored values minus their tolerance."""
    if m.parity is None or thresholds is None:
        return Verdict("parity", m.case, "skip", reason=f"{m.case.id} is the parity reference "
                                                          "(PyTorch fp32) itself")
    p, agree = m.parity, agreement_name
    vs = f"vs {m.parity_reference}"
    bad = [k for k in ("cosine", agree, "max_abs") if not math.isfinite(p.get(k, 0.0))]
    if bad:  # NaN compares False against every floor: it must fail explicitly
        return _verdict("parity", m, [f"non-finite parity {', '.join(f'{k}={p[k]}' for k in bad)} {vs}: "
                                      "the outputs contain NaN or inf (fp16 overflow, a zero scale?)"], [])
    failures: list[str] = []
    worst = ""
    if m.output_parity and len(m.output_parity) > 1:
        name, d = min(m.output_parity.items(), key=lambda kv: kv[1]["cosine"])
        worst = f" (worst output {name!r})"
    if p["cosine"] < thresholds.min_cosine - EPS:
        failures.append(f"cosine {p['cosine']:.6f}{worst} {vs} is below the floor {thresholds.min_cosine}")
    if p[agree] < thresholds.min_top1_agreement - EPS:
        failures.append(f"{agree} {p[agree]:.2%} {vs} is below the floor {thresholds.min_top1_agreement:.2%}")
    if thresholds.max_abs is not None and p["max_abs"] > thresholds.max_abs + EPS:
        failures.append(f"max_abs {p['max_abs']:.3g} {vs} is above the ceiling {thresholds.max_abs:g}")
    updates = []
    key = m.case.key
    for name, t in (("cosine", cosine_tolerance), (agree, agreement_tolerance)):
        updates.append(Update(key, "parity", name, float(p[name]), float(t)))
        if base is None:
            continue
        b = base.get("parity", name)
        if b is None:
            failures.append(base.missing(key, f"parity.{name}"))
        elif p[name] < b["value"] - b["tolerance"] - EPS:
            failures.append(f"{name} {p[name]:.6f} {vs} fell below the baseline "
                            f"{b['value']:.6f} - tolerance {b['tolerance']:g}")
    return _verdict("parity", m, failures, updates)


def judge_latency(m: Measurement, base: CaseBaseline | None, *, tolerance_rel: float,
                  device: str = "") -> Verdict:
    """Median latency vs the baseline recorded on the same device fingerprint."""
    if m.latency is None:
        return Verdict("latency", m.case, "skip",
                       reason="latency not measured: pytest-benchmark is disabled (--benchmark-disable)")
    stats, fid = m.latency, m.fingerprint_id
    updates = [Update(m.case.key, "latency", "median_ms", float(stats.median_ms), float(tolerance_rel),
                      fid, device)]
    failures: list[str] = []
    if base is not None:
        b = base.get("latency", "median_ms", fid)
        if b is None:
            return Verdict("latency", m.case, "skip", updates=tuple(updates),
                           reason=(f"no latency baseline for {m.case.key} on this device (fingerprint "
                                   f"{fid}: {device}); record one with --update-baselines"))
        if stats.median_ms > b["value"] * (1 + b["tolerance"]) + EPS:
            failures.append(
                f"median latency {stats.median_ms:.4f} ms is {stats.median_ms / b['value'] - 1:+.1%} "
                f"vs the baseline {b['value']:.4f} ms on this device (tolerance "
                f"+{b['tolerance']:.0%}; p90 {stats.p90_ms:.4f} ms, CV {stats.cv:.1%})")
    return _verdict("latency", m, failures, updates)


def judge_precision(case, audit, expect: Mapping[str, Any], kept: tuple[str, ...] = ()) -> Verdict:
    """The TensorRT precision audit against a recipe's expectation: ``expect`` maps a layer kind
    (``conv``, ``gemm``) to the precision(s) it must run in, plus optional ``max_reformats``;
    ``kept`` layers (partial's keep list) are exempt. No audit (not TensorRT): skip."""
    if audit is None:
        return Verdict("precision", case, "skip", reason=f"{case.backend} has no engine precision audit "
                                                         "(TensorRT only)")
    from qatcheck.backends.trt_audit import PrecisionAuditError

    expect = dict(expect)
    max_reformats = expect.pop("max_reformats", None)
    failures = []
    try:
        for kind, precision in expect.items():
            audit.assert_all(kind, precision, except_layers=kept)
        if max_reformats is not None:
            audit.assert_reformats(int(max_reformats))
    except PrecisionAuditError as exc:
        failures.append(f"{exc} [{audit.describe()}]")
    return Verdict("precision", case, "fail" if failures else "pass", tuple(failures),
                   notes=(audit.describe(),))
