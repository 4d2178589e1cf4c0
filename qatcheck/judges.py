"""Judges: pure functions of (measurement, baseline, tolerances) -> :class:`Verdict`.

A judge never measures, never reads a file and never writes one. It says pass / fail / skip with
messages that name the cause, and lists the values the recorder may store under
``--update-baselines``; :meth:`qatcheck.session.QatcheckSession.record` decides whether it does.
``base`` is the case's stored baseline, or None while recording (``--update-baselines``): then
nothing is compared with the stored values, but floors and fp32 budgets still apply.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from qatcheck.baselines import Update
from qatcheck.measurement import Measurement, Verdict

#: comparisons of floats read back from JSON
EPS = 1e-9
#: backend -> the runtime's name in messages (an ONNX-only recipe's reference is ONNX Runtime's)
_RUNTIME = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


@dataclass(frozen=True)
class CaseBaseline:
    """One case's stored entries (``section -> name -> {"value", "tolerance"}``; latency one level
    deeper, under the device fingerprint), and the file they came from (for messages)."""

    path: str
    entries: Mapping[str, Any] = field(default_factory=dict)
    #: the eval data the stored metrics were measured on (``eval_data`` in the file), if recorded
    eval_data: Mapping[str, Any] | None = None
    #: each output's per-sample shape when the baseline was recorded (``outputs`` in the file)
    outputs: Mapping[str, Any] | None = None
    #: the settings that shaped the case's artifact when it was recorded (the case's ``settings``)
    settings: Mapping[str, Any] | None = None

    def get(self, section: str, name: str, fingerprint: str | None = None) -> dict | None:
        entries = self.entries.get(section, {})
        if fingerprint is not None:
            entries = entries.get(fingerprint, {})
        return entries.get(name)

    def missing(self, key: str, what: str, hint: str = "") -> str:
        return f"no baseline for {key} {what} in {self.path}; {hint or record_hint([])}"


def record_hint(blockers: list[str] | tuple[str, ...], what: str = "it") -> str:
    """How to record a value: ``record it with --update-baselines`` - unless the check also fails
    on what holds while recording too (``blockers``: its floor, its fp32 budget, NaN outputs).
    --update-baselines refuses a failing check, so that hint would go in a circle: this one says
    the value will not be recorded, and the verdict adds :data:`REFUSED` once, saying what to do."""
    if not blockers:
        return f"record {what} with --update-baselines"
    return f"{_NOT_RECORDED} {what} while this check fails {' and '.join(blockers)}"


def _rerecord_hint(blockers: list[str] | tuple[str, ...], intended: str) -> str:
    """``re-record with --update-baselines if <intended>``, under :func:`record_hint`'s rule."""
    if not blockers:
        return f"re-record with --update-baselines {intended}"
    return f"{intended}, {record_hint(blockers, 'the new values')}"


_NOT_RECORDED = "--update-baselines will not record"
REFUSED = ("a failing check is never recorded: fix the case, or give the mode its own tolerance in the "
           "recipe's Tolerances if it is knowingly worse (--qatcheck-force-update records it anyway)")


def _verdict(check: str, m: Measurement, failures: list[str], updates: list[Update],
             notes: list[str] | tuple[str, ...] = (), improved: list[str] | None = None,
             strict: bool = False, causes: tuple[str | None, ...] = (), data_changed: bool = False,
             blockers: list[str] | None = None) -> Verdict:
    """pass / fail, or ``improved`` when values beat their baseline beyond the tolerance (a
    failure under ``strict``: the baseline is stale). ``causes`` (what changed since the baseline:
    the eval data, a recipe setting) lead the failures they explain; alone they fail nothing.
    ``blockers``: the check's failures that hold under --update-baselines too (see
    :func:`record_hint`)."""
    notes = list(notes)
    if improved:
        if strict:
            failures = failures + [f"{x} (--qatcheck-strict: {record_hint(blockers or [])})" for x in improved]
        elif blockers:
            notes += [f"improved: {x}" for x in improved]
        else:
            notes += [f"improved: {x}; --update-baselines keeps it" for x in improved]
    causes = tuple(c for c in causes if c) if failures else ()
    failures = [*causes, *(f for f in failures if f not in causes)]
    if any(_NOT_RECORDED in f for f in failures):
        failures.append(REFUSED)
    status = "fail" if failures else "improved" if improved else "pass"
    return Verdict(check, m.case, status, tuple(failures), notes=tuple(notes), updates=tuple(updates),
                   causes=causes, data_changed=data_changed and bool(failures))


def _nonfinite(m: Measurement) -> str | None:
    """Non-finite outputs make every number of the case meaningless; say where they come from."""
    if not m.nonfinite_outputs:
        return None
    # inputs are checked before the model runs (qatcheck.evaluate): finite inputs, so the model overflowed
    return (f"the outputs of {m.nonfinite_samples} of {m.eval_samples} eval samples hold NaN/inf "
            f"({m.nonfinite_outputs} values), from finite inputs: the model overflowed (fp16 range? a zero or "
            "NaN scale?)")


def _data_changed(m: Measurement, base: CaseBaseline,
                  blockers: tuple[str, ...] = ()) -> tuple[str | None, tuple[str, ...]]:
    """The eval set the baseline was recorded on differs from this run's: metric moves are then
    the data's as much as the model's, and the message must say so first, and which part changed
    (``inputs``, ``targets``; none named when the baseline predates keeping them apart)."""
    stored = base.eval_data
    if not stored or not m.eval_fingerprint:
        return None, ()
    was = f"{stored.get('samples', '?')} samples"
    now = f"{m.eval_samples} samples"
    if "inputs" not in stored:  # recorded by an older qatcheck: one fingerprint for both parts
        if stored.get("fingerprint") == m.eval_fingerprint:
            return None, ()
        return (f"the eval data changed since the baseline was recorded (fingerprint "
                f"{stored.get('fingerprint')}, {was} -> {m.eval_fingerprint}, {now}): metric moves may be "
                f"the data's, not the model's; {_rerecord_hint(blockers, 'if the new data is intended')}"), ()
    inputs = stored["inputs"] != m.eval_inputs or was != now
    digests = bool(stored.get("targets")) and bool(m.eval_targets) and stored["targets"] != m.eval_targets
    # the dataset's fingerprint covers inputs and targets (COCO: every annotation, crowd flags and
    # areas too): moved with the inputs unchanged, it is the targets that changed
    targets = digests or (not inputs and stored.get("fingerprint") != m.eval_fingerprint)
    if not (inputs or targets):
        return None, ()
    what = ("its inputs and targets changed" if inputs and targets else
            "its inputs changed, its targets did not" if inputs else
            "its targets changed, its inputs did not")
    details = [f"targets {stored['targets']} -> {m.eval_targets}" if digests else
               f"fingerprint {stored.get('fingerprint')} -> {m.eval_fingerprint}" if targets else ""]
    details.append(f"inputs {stored['inputs']}, {was} -> {m.eval_inputs}, {now}" if inputs else now)
    whose = "may be the data's" if inputs else "are the data's"
    parts = tuple(part for part, moved in (("inputs", inputs), ("targets", targets)) if moved)
    return (f"the eval data changed since the baseline was recorded: {what} "
            f"({'; '.join(d for d in details if d)}): metric moves {whose}, not the model's; "
            f"{_rerecord_hint(blockers, 'if the new data is intended')}"), parts


#: who a setting belongs to, when not to the recipe (ArtifactBuilder.settings names)
_SETTING_SUBJECTS = {"device": "the calibration / training device",
                     "onnx_quantizer": "the ONNX PTQ quantizer (--qatcheck-trt-ptq)",
                     "modelopt": "the installed nvidia-modelopt"}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def settings_changed(stored: Mapping[str, Any] | None, now: Mapping[str, Any] | None,
                     blockers: tuple[str, ...] = ()) -> str | None:
    """Which of the settings that shaped a case's artifact (ArtifactBuilder.settings) differ from
    those its baseline was recorded with, old -> new. A setting only one side has (a baseline
    from before it was kept) is not judged."""
    if not stored or not now:
        return None
    moved = []
    for name in (k for k in now if k in stored):
        old, new = stored[name], now[name]
        if isinstance(old, Mapping) and isinstance(new, Mapping):  # a settings object, field by field
            moved += [(f"{name}.{k}", old.get(k), new.get(k)) for k in {**old, **new} if old.get(k) != new.get(k)]
        elif old != new:
            moved.append((name, old, new))
    if not moved:
        return None
    hint = _rerecord_hint(blockers, "if intended")
    if len(moved) == 1:
        name, old, new = moved[0]
        subject = _SETTING_SUBJECTS.get(name, f"the recipe's {name}")
        return f"{subject} changed since this baseline was recorded ({_show(old)} → {_show(new)}): {hint}"
    listed = ", ".join(f"{name} ({_show(old)} → {_show(new)})" for name, old, new in moved)
    return f"the recipe's settings changed since this baseline was recorded: {listed}: {hint}"


def _settings_changed(m: Measurement, base: CaseBaseline | None, blockers: tuple[str, ...] = ()) -> str | None:
    return settings_changed(base.settings, m.settings, blockers) if base is not None else None


def outputs_changed(shapes: Mapping[str, Any] | None, stored: Mapping[str, Any] | None) -> list[str]:
    """Each output's per-sample shape vs the one recorded with the baseline: outputs that swapped
    places (the model's return order vs Recipe.output_names) are named, before any metric computed
    from the wrong tensor is blamed (the session checks the first batch; the judge again)."""
    stored = stored or {}
    out = []
    for name, shape in (shapes or {}).items():
        was = stored.get(name)
        if was is not None and list(was) != list(shape):
            out.append(f"output {name!r} has per-sample shape {tuple(shape)}; the baseline recorded "
                       f"{tuple(was)}: did the model's outputs change order or shape? (Recipe.output_names "
                       "must list them in the order the model returns them)")
    return out


def judge_accuracy(m: Measurement, base: CaseBaseline | None, *, metric_names: tuple[str, ...],
                   primary: str, tolerance_points: float, fp32: Measurement | None = None,
                   budget_points: float | None = None, strict: bool = False,
                   specs: Mapping[str, Any] | None = None, value_rel: float = 0.05) -> Verdict:
    """Each metric vs its baseline, in its direction (``specs``: name -> tasks.base.MetricSpec;
    fractions: tolerance in points, section ``metrics``; plain values: tolerance relative to the
    baseline, section ``values``); and, with ``budget_points``, the primary metric vs ``fp32`` (the
    fp32 case on the same backend the session chose: see QatcheckSession.budget_reference).
    Better than the baseline beyond the tolerance: improved."""
    from qatcheck.tasks.base import MetricSpec

    failures: list[str] = []
    improved: list[str] = []
    updates = []
    key = m.case.key
    nonfinite = _nonfinite(m)
    budget = (_budget_failure(m, fp32, primary, (specs or {}).get(primary) or MetricSpec(), budget_points)
              if budget_points is not None and fp32 is not None else None)
    # what fails while recording too: a hint to record the value would go in a circle
    blockers = tuple(b for b, failed in (
        ("on NaN/inf outputs", nonfinite),
        ("a non-finite metric", any(not math.isfinite(m.metrics[n]) for n in metric_names)),
        ("its fp32 budget", budget)) if failed)
    problems = [nonfinite]
    data = None
    if base is not None:
        data, _ = _data_changed(m, base, blockers)
        # alone it fails: the stored metrics were measured on other data
        problems += [data, *outputs_changed(m.output_shapes, base.outputs)]
    failures += [p for p in problems if p]
    for name in metric_names:
        spec = (specs or {}).get(name) or MetricSpec()
        value = m.metrics[name]
        section = "metrics" if spec.fraction else "values"
        tol = float(tolerance_points) if spec.fraction else float(value_rel)
        updates.append(Update(key, section, name, float(value), tol))
        if not math.isfinite(value):
            failures.append(f"{name} is {value}: the metric is not a finite number")
            continue
        if base is None:
            continue
        b = base.get(section, name)
        if b is None:
            failures.append(base.missing(key, f"{section}.{name}", record_hint(blockers)))
            continue
        sign = 1.0 if spec.higher_is_better else -1.0
        # how far the value moved in the bad direction, and the tolerance, in the same unit
        margin = b["tolerance"] / 100 if spec.fraction else b["tolerance"] * abs(b["value"])
        worse = sign * (b["value"] - value)
        bad, good = ("below", "above") if spec.higher_is_better else ("above", "below")
        lower = "" if spec.higher_is_better else "; lower is better"
        if worse > margin + EPS:
            failures.append(f"{name} {_fmt(spec, value)} is {bad} the baseline {_fmt(spec, b['value'])} by "
                            f"{_amount(spec, worse, b['value'])} (tolerance {_tol_text(spec, b['tolerance'])}"
                            f"{lower}) [{base.path}]")
        elif -worse > margin + EPS:
            improved.append(f"{name} {_fmt(spec, value)} is {good} the baseline {_fmt(spec, b['value'])} by "
                            f"{_amount(spec, -worse, b['value'])}")
    if budget:
        failures.append(budget)
    return _verdict("accuracy", m, failures, updates, improved=improved, strict=strict,
                    causes=(data, _settings_changed(m, base, blockers)), data_changed=bool(data),
                    blockers=list(blockers))


def _budget_failure(m: Measurement, fp32: Measurement, primary: str, spec, budget_points: float) -> str | None:
    """The primary metric further below fp32's than the budget allows (None: within it). A
    fraction's budget is in points; a plain value's in percent of fp32's value."""
    sign = 1.0 if spec.higher_is_better else -1.0
    worse = sign * (fp32.metrics[primary] - m.metrics[primary])
    drop = worse * 100 if spec.fraction else 100 * worse / max(abs(fp32.metrics[primary]), 1e-12)
    if drop <= budget_points + EPS:
        return None
    bad = "below" if spec.higher_is_better else "above"
    moved, unit = (f"{drop:.2f} points", "points") if spec.fraction else (f"{drop:.1f}%", "%")
    ref = "fp32" if not fp32.case.shape else f"fp32 ({fp32.case.mode} build at {fp32.case.shape})"
    return (f"{primary} {_fmt(spec, m.metrics[primary])} is {moved} {bad} {ref} "
            f"{_fmt(spec, fp32.metrics[primary])} on {m.case.backend} (budget {budget_points:g} {unit}; "
            f"Tolerances.fp32_budget_points sets a mode's own)")


def _mode(m: Measurement):
    from qatcheck.modes import spec

    return spec(m.case.mode)


def mode_latency_skip(m: Measurement) -> str | None:
    """The mode's own reason not to time on this device (ModeSpec.latency_skip; fp8 off an FP8 GPU)."""
    from qatcheck.modes import resolve

    gate = _mode(m).latency_skip
    return resolve(gate)(m.device) if gate is not None else None


def _fmt(spec, v: float) -> str:
    return f"{v:.2%}" if spec.fraction else f"{v:.6g}"


def _tol_text(spec, tolerance: float) -> str:
    return f"{tolerance:g} points" if spec.fraction else f"{tolerance:.0%} of the baseline"


def _amount(spec, moved: float, base: float) -> str:
    return f"{moved * 100:.2f} points" if spec.fraction else f"{moved / max(abs(base), 1e-12):.1%}"


def judge_parity(m: Measurement, base: CaseBaseline | None, *, thresholds, agreement_name: str,
                 cosine_tolerance: float, agreement_tolerance: float, strict: bool = False,
                 output_floors: Mapping[str, float] | None = None) -> Verdict:
    """Outputs vs the case's reference: absolute floors (``thresholds``, a ParityThresholds; with
    several outputs each output is held to the floor, or to its own in ``output_floors``, and named
    when below) and the stored values minus their tolerance."""
    if m.parity is None or thresholds is None:  # a case without a reference is the reference
        runtime = _RUNTIME.get(m.case.backend, m.case.backend)
        return Verdict("parity", m.case, "skip",
                       reason=f"{m.case.id} is the parity reference ({runtime} {m.case.mode}) itself")
    p, agree = m.parity, agreement_name
    vs = f"vs {m.parity_reference}"
    bad = [k for k in ("cosine", agree, "max_abs") if not math.isfinite(p.get(k, 0.0))]
    if bad:  # NaN compares False against every floor: it must fail explicitly
        cause = _nonfinite(m) or "the outputs contain NaN or inf (fp16 overflow, a zero scale?)"
        return _verdict("parity", m, [f"non-finite parity {', '.join(f'{k}={p[k]}' for k in bad)} {vs}: "
                                      f"{cause}"], [])
    failures: list[str] = []
    if m.output_parity and len(m.output_parity) > 1:
        # each output on its own: a head that drifts is named, not averaged into the others
        for name, d in m.output_parity.items():
            floor = (output_floors or {}).get(name, thresholds.min_cosine)
            if not d["cosine"] >= floor - EPS:
                failures.append(f"output {name!r}: cosine {d['cosine']:.6f} {vs} is below the floor {floor}")
            if thresholds.max_abs is not None and not d["max_abs"] <= thresholds.max_abs + EPS:
                failures.append(f"output {name!r}: max_abs {d['max_abs']:.3g} {vs} is above the ceiling "
                                f"{thresholds.max_abs:g}")
    else:
        floor = (output_floors or {}).get(next(iter(m.output_parity or {}), ""), thresholds.min_cosine)
        if p["cosine"] < floor - EPS:
            failures.append(f"cosine {p['cosine']:.6f} {vs} is below the floor {floor}")
        if thresholds.max_abs is not None and p["max_abs"] > thresholds.max_abs + EPS:
            failures.append(f"max_abs {p['max_abs']:.3g} {vs} is above the ceiling {thresholds.max_abs:g}")
    if p[agree] < thresholds.min_top1_agreement - EPS:
        failures.append(f"{agree} {p[agree]:.2%} {vs} is below the floor {thresholds.min_top1_agreement:.2%}")
    # floors hold while recording too: a hint to record a missing baseline would go in a circle
    blockers = ("its parity floor",) if failures else ()
    updates = []
    improved: list[str] = []
    key = m.case.key
    for name, t in (("cosine", cosine_tolerance), (agree, agreement_tolerance)):
        updates.append(Update(key, "parity", name, float(p[name]), float(t)))
        if base is None:
            continue
        b = base.get("parity", name)
        if b is None:
            failures.append(base.missing(key, f"parity.{name}", record_hint(blockers)))
        elif p[name] < b["value"] - b["tolerance"] - EPS:
            failures.append(f"{name} {p[name]:.6f} {vs} fell below the baseline "
                            f"{b['value']:.6f} - tolerance {b['tolerance']:g}")
        elif p[name] > b["value"] + b["tolerance"] + EPS:
            improved.append(f"{name} {p[name]:.6f} {vs} is above the baseline {b['value']:.6f} "
                            f"+ tolerance {b['tolerance']:g}")
    # new targets move no output: only new inputs explain a parity move
    data, parts = _data_changed(m, base, blockers) if base is not None else (None, ())
    data = data if "inputs" in parts else None
    return _verdict("parity", m, failures, updates, improved=improved, strict=strict,
                    causes=(data, _settings_changed(m, base, blockers)), data_changed=bool(data),
                    blockers=list(blockers))


def _spread(stats) -> tuple[tuple[str, float], ...]:
    out = [("ci_rel", stats.ci_rel), ("cv", stats.cv), ("samples", float(stats.iterations))]
    if stats.foreign_load is not None:
        out.append(("foreign_load", stats.foreign_load))
    if stats.probe_ms is not None:
        out += [("probe_ms", stats.probe_ms), ("probe_ci_rel", stats.probe_ci_rel)]
    return tuple((k, float(v)) for k, v in out if math.isfinite(v))


@dataclass(frozen=True)
class Slowdown:
    """The case's latency relative to its baseline, normalised by the machine-speed probe when
    both runs timed it, with a 95% interval on the log scale."""

    ratio: float  # >1: slower than the baseline
    raw: float  # the plain median ratio
    machine: float | None  # the probe's ratio (how much slower the machine itself is)
    half_width: float  # relative half-width (log scale) of the ratio's interval

    @property
    def low(self) -> float:
        return self.ratio * math.exp(-self.half_width)

    @property
    def high(self) -> float:
        return self.ratio * math.exp(self.half_width)

    def describe(self) -> str:
        machine = ("" if self.machine is None else
                   f"; machine-speed probe x{self.machine:.2f}, raw median x{self.raw:.2f}")
        return f"x{self.ratio:.3f} (95% interval x{self.low:.3f} .. x{self.high:.3f}{machine})"


#: a probe that is this much slower than in the baseline's run says the machine is busier or
#: slower now (another process took a core, clocks dropped): the model's ratio is then
#: normalised by the probe's
MACHINE_CHANGED = 1.25

#: how much slower a byte-identical artifact may time in one process than in another on the same
#: machine, runtime, threads and quiet CPUs - the runtime's own between-process variation, which
#: neither the within-run interval nor re-measuring in fresh sessions of one process sees (those
#: agree; the next process differs). Measured on the H200 machine's 16 vCPUs, ONNX Runtime CPU
#: provider: x1.68 worst ratio between two of 8 fresh processes timing one file (trt_ptq, 1-4
#: threads; x1.47 at 16), x1.52 between two clean gate reruns of one case, x1.36 the largest
#: clean rerun vs its recorded baseline (benchmarks/h200-2026-12-01/ort-stability.md,
#: latency-gate-*.json). A byte-identical case is red beyond (1 + tolerance) times this.
SAME_BYTES_DRIFT = 1.7


def slowdown(stats, median_ms: float, spread: Mapping[str, float] | None,
             attempts: tuple[float, ...] = ()) -> Slowdown:
    """How much slower ``stats`` is than a baseline median with its ``spread``.

    The interval combines, in quadrature on the log scale: the two medians' confidence
    half-widths (within each run), and the spread between this run's re-measurements
    (``attempts``: each a fresh timed loop in a fresh runtime session - what a second run would
    have seen, which a within-run interval cannot). The machine-speed probe, timed the same way in
    both runs, can only explain a slowdown away, never create one:

    - probe slower by more than ``MACHINE_CHANGED``: the machine is busier now; the model's ratio
      is divided by the probe's (and the probe's intervals join the model's);
    - probe slower by less: the interval widens by the probe's move;
    - probe as fast or faster: nothing - the plain ratio already errs on the side of "not slower".
    """
    spread = spread or {}
    raw = stats.median_ms / median_ms
    widths = [stats.ci_rel, spread.get("ci_rel", 0.0)]
    if len(attempts) > 1:
        logs = [math.log(a) for a in attempts if a > 0]
        mean = sum(logs) / len(logs)
        widths.append(math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)))
    machine = None
    ratio = raw
    if stats.probe_ms and spread.get("probe_ms"):
        machine = stats.probe_ms / spread["probe_ms"]
        if machine > MACHINE_CHANGED:
            ratio = raw / machine
            widths += [stats.probe_ci_rel, spread.get("probe_ci_rel", 0.0)]
        elif machine > 1:
            widths.append(math.log(machine))
    h = math.sqrt(sum(min(w, 10.0) ** 2 for w in widths))
    return Slowdown(ratio, raw, machine, h)


def judge_latency(m: Measurement, base: CaseBaseline | None, *, tolerance_rel: float,
                  device: str = "", retries_left: int = 0, strict: bool = False,
                  speedup: tuple[float, str, Measurement] | None = None) -> Verdict:
    """Median latency vs the baseline recorded on the same device fingerprint, decided with its
    noise (see docs/checks.md, *Latency verdicts*):

    - when the artifact changed since the baseline and the recorded one is kept, the judge reads
      the two timed beside each other in this run (``m.latency_paired``), not the stored number;
    - slower than the tolerance while ``retries_left``: **retry** - the session measures again
      and judges its best attempt (interference only ever adds time; a paired measurement gets
      more rounds);
    - slower beyond the tolerance with the whole 95% interval above it: **fail**;
    - slower than the tolerance but the interval reaches below it, or measured under contention
      from other processes, or timed as the host's launch rate (CUDA-graph capture failed:
      ``m.latency_host_bound``): **inconclusive** - reported with its figures, a failure under
      ``strict``;
    - a **byte-identical artifact** on the same fingerprint (runtime versions, threads, device):
      its bytes did not change, but the runtime, its session options or the runner's code can
      still make it slower. With quiet CPUs (no contention), a steady machine-speed probe (where
      there is one) and not host-bound, it is **fail** when the whole interval lies above
      ``(1 + tolerance) * SAME_BYTES_DRIFT`` (x1.7: the most one ONNX file's median moved between
      fresh processes on one machine, measured), *inconclusive* between ``1 + tolerance`` and that;
      with contention, a slower probe or host-bound timing, inconclusive (the machine is slower);
    - within the tolerance: **pass** (an interval entirely below ``1 - tolerance``: *improved*).

    ``speedup`` = (floor, reference mode, reference measurement) also requires the case to be at
    least ``floor`` times faster than the reference in this same session (a gate that holds on
    any machine): failing only when the speedup's interval lies below the floor.
    """
    gated = mode_latency_skip(m)
    if gated:
        return Verdict("latency", m.case, "skip", reason=gated)
    if m.latency is None:
        return Verdict("latency", m.case, "skip", reason=m.latency_skipped or
                       "latency not measured: pytest-benchmark is disabled (--benchmark-disable)")
    stats, fid = m.latency, m.fingerprint_id
    updates = [Update(m.case.key, "latency", "median_ms", float(stats.median_ms), float(tolerance_rel),
                      fid, device, spread=_spread(stats), artifact=m.latency_artifact)]
    failures: list[str] = []
    notes: list[str] = []
    improved: list[str] = []
    status = None
    if base is None:
        # a baseline timed under contention, or one too noisy for its tolerance, would make every
        # quiet rerun look "improved" and hide the next real slowdown: it is not recorded
        refused = _unrecordable(stats, tolerance_rel)
        if refused:
            notes.append(f"latency not recorded: {refused}")
            updates = []
    if speedup is not None:
        failures += _judge_speedup(m, *speedup)
    b = base.get("latency", "median_ms", fid) if base is not None else None
    if base is not None and b is None and not failures and speedup is None:
        # the hint holds only where recording would take this figure
        refused = _unrecordable(stats, tolerance_rel)
        return Verdict("latency", m.case, "skip", updates=tuple(updates),
                       reason=(f"no latency baseline for {m.case.key} on this device (fingerprint "
                               f"{fid}: {device}); record one with --update-baselines" +
                               (f" - not this figure, which would not be recorded: {refused}" if refused else "")))
    unchanged = False  # the timed artifact is byte-identical to the one the baseline was timed from
    if b is not None and m.latency_paired is not None:
        # the artifact changed since the baseline: its recorded artifact was timed beside it, in this
        # process - a far sharper comparison than with a number another process measured
        p = m.latency_paired
        sd = Slowdown(p.ratio, p.ratio, None, p.half_width)
        limit = 1 + b["tolerance"]
        figures = (f"timed beside the baseline's recorded artifact {p.reference} in this run ({p.rounds} "
                   f"interleaved rounds, {p.median_ms:.4f} vs {p.reference_median_ms:.4f} ms): {sd.describe()}; "
                   f"tolerance +{b['tolerance']:.0%} (stored median {b['value']:.4f} ms, this run's "
                   f"{stats.median_ms:.4f} ms)")
        not_the_model = m.latency_host_bound  # both met the same machine, round by round
        notes.append(f"the artifact changed since the latency baseline: judged against its recorded artifact "
                     f"{p.reference}, timed beside it (x{p.ratio:.3f})")
    elif b is not None:
        sd = slowdown(stats, b["value"], base.get("latency", "spread", fid), m.latency_attempt_medians)
        limit = 1 + b["tolerance"]
        figures = (f"median {stats.median_ms:.4f} ms vs the baseline {b['value']:.4f} ms on this device: "
                   f"{sd.describe()}; tolerance +{b['tolerance']:.0%}")
        not_the_model = _contention(stats, base.get("latency", "spread", fid)) or m.latency_host_bound
        recorded = base.get("latency", "artifact", fid)
        unchanged = bool(m.latency_artifact) and recorded == m.latency_artifact
        if unchanged and not not_the_model and sd.machine is not None and sd.machine > MACHINE_CHANGED:
            not_the_model = (f"the artifact is byte-identical to the one the baseline was timed from "
                             f"({recorded}) and the machine-speed probe is x{sd.machine:.2f} slower: the "
                             "machine, not the case, is slower now - rerun on a quiet machine")
    if b is not None:
        # an unchanged artifact on quiet CPUs and a steady machine: what is left is the runtime's
        # own between-process variation, so it is red only beyond that (SAME_BYTES_DRIFT)
        same_bytes = unchanged and not not_the_model
        red_at = limit * SAME_BYTES_DRIFT if same_bytes else limit
        # an absolute comparison is re-measured whenever it looks slower (the fastest attempt
        # counts); a paired one only while its interval still reaches below the tolerance
        undecided = m.latency_paired is None or sd.low <= limit + EPS
        if sd.ratio > limit + EPS and retries_left > 0 and undecided:
            status = "retry"  # looks slower: measure again before judging
        elif sd.ratio > limit + EPS and not_the_model:
            if strict:
                failures.append(f"inconclusive (--qatcheck-latency-strict): {figures}; {not_the_model}")
            else:
                status = "inconclusive"
                notes.append(f"inconclusive: looks slower ({figures}), but {not_the_model}")
        elif sd.low > red_at + EPS:
            failures.append(f"slower beyond the tolerance: {figures}" + (f"; {_same_bytes(recorded, red_at)}: "
                            "the runtime, its session options, threads or the runner's code got slower"
                            if same_bytes else ""))
        elif sd.ratio > limit + EPS:
            why = (f"{_same_bytes(recorded, red_at)}, and the same bytes move up to x{SAME_BYTES_DRIFT:g} between "
                   "processes" if same_bytes else
                   f"the noise (±{math.expm1(sd.half_width):.1%}) is larger than the margin")
            if strict:
                failures.append(f"inconclusive (--qatcheck-latency-strict): {figures}; {why}")
            else:
                status = "inconclusive"
                notes.append(f"inconclusive: looks slower, but {why} - {figures}")
        elif sd.high < 1 - b["tolerance"] - EPS and not unchanged:
            # the same bytes cannot have become faster: the recording process met a slower moment
            # (H200: ONNX Runtime moves x1.07-1.47 between processes; 10-19 of 40 cases a run read
            # "improved"). A plain pass: no gain to keep, and a later change of this artifact is
            # timed beside the recorded bytes, so the stale number never hides a regression
            improved.append(f"latency {figures}")
        if sd.machine is not None and not 0.5 <= sd.machine <= 2.0:
            notes.append(f"the machine-speed probe moved x{sd.machine:.2f} since the baseline was "
                         "recorded: the machine is busy or different")
    if status in ("retry", "inconclusive") and not failures:
        return Verdict("latency", m.case, status, notes=tuple(notes), updates=tuple(updates))
    return _verdict("latency", m, failures, updates, notes=notes, improved=improved)


#: other processes using this many more CPU cores than while the baseline was recorded make a
#: slowdown undecidable: contention slows a model by 1x..14x depending on its runtime's threads
CONTENTION_CORES = 0.25
#: ... or this share of the machine's CPUs, when that is more: on the GPU machine's 16 vCPUs a
#: recording run measured 0.4-0.6 of a core of other load (steal time, daemons: not visible from
#: inside the VM), which must not keep every baseline there from being recorded
CONTENTION_SHARE = 0.05


def contention_limit(cpus: int) -> float:
    return max(CONTENTION_CORES, CONTENTION_SHARE * cpus)


def _same_bytes(recorded: str, red_at: float) -> str:
    return (f"the artifact is byte-identical to the one the baseline was timed from ({recorded}) on the same "
            f"runtime, threads and device, timed on quiet CPUs: red beyond x{red_at:.2f} (the tolerance times "
            f"x{SAME_BYTES_DRIFT:g}, ONNX Runtime's measured between-process variation)")


def _unrecordable(stats, tolerance_rel: float) -> str:
    """Why a latency measured while recording must not become the baseline ("" when it may)."""
    if (stats.foreign_load or 0.0) >= contention_limit(stats.cpus):
        return (f"other processes kept {stats.foreign_load:.1f} CPU cores busy while it was timed; record "
                "on a quiet machine")
    if stats.ci_rel > tolerance_rel / 2 + EPS:
        # the baseline's own uncertainty may take half the tolerance, leaving the other half for the
        # run it is compared with: then a slowdown of twice the tolerance is still red
        return (f"the median {stats.median_ms:.4f} ms is known only to ±{stats.ci_rel:.1%} (95% interval; CV "
                f"{stats.cv:.0%}), wider than half its tolerance (±{tolerance_rel / 2:.1%} of {tolerance_rel:.0%}): "
                "a later slowdown could not be told from it, and a slow moment would read as a later "
                "'improvement' - record on a quiet machine, time longer (--qatcheck-duration, "
                "--qatcheck-iterations), or raise Tolerances.latency_rel")
    return ""


def _contention(stats, spread: Mapping[str, float] | None) -> str:
    """Why a slowdown cannot be told from contention, or "" when the CPUs were as quiet as at
    recording."""
    if stats.foreign_load is None:
        return ""
    before = (spread or {}).get("foreign_load", 0.0)
    if stats.foreign_load - before < contention_limit(stats.cpus):
        return ""
    return (f"other processes kept {stats.foreign_load:.1f} CPU cores busy while it was timed "
            f"({before:.1f} when the baseline was recorded): contention, not the model, may be the "
            "cause - rerun on a quiet machine")


def _judge_speedup(m: Measurement, floor: float, ref_mode: str, ref: Measurement) -> list[str]:
    if ref.latency is None or m.latency is None:
        return []
    speed = ref.latency.median_ms / m.latency.median_ms
    h = math.sqrt(ref.latency.ci_rel ** 2 + m.latency.ci_rel ** 2)
    if speed * math.exp(h) < floor - EPS:
        return [f"speedup vs {ref_mode} on {m.case.backend} is x{speed:.2f} (95% interval up to "
                f"x{speed * math.exp(h):.2f}), below the floor x{floor:g} (Tolerances.speedup_floor)"]
    return []


def judge_structure(m: Measurement, base: CaseBaseline | None, *, scale_rel: float) -> Verdict:
    """The int8 artifact's quantization structure (quantized tensors by module name, their scales,
    the Q/DQ pair count) vs its baseline: a dropped or added quantizer, a moved scale, or no Q/DQ
    at all ("quantization vanished") fails, naming the quantizer."""
    from qatcheck.quantize.structure import compare_structure, to_entries, vanished

    if m.structure is None:
        return Verdict("structure", m.case, "skip", reason=f"{m.case.mode} is not an int8 mode")
    entries = to_entries(m.structure)
    updates = [Update(m.case.key, "structure", name, float(value),
                      float(scale_rel) if ".scale" in name else 0.0) for name, value in entries.items()]
    failures: list[str] = []
    if base is None or not base.entries.get("structure"):
        if vanished(m.structure):
            failures.append("quantization vanished: the int8 artifact has no Q/DQ")
        elif base is not None:
            failures.append(base.missing(m.case.key, "structure"))
    else:
        stored = {k: v["value"] for k, v in base.entries["structure"].items()}
        tol = {k.rpartition(".")[0]: v["tolerance"] for k, v in base.entries["structure"].items()
               if ".scale" in k}
        failures += compare_structure(m.structure, stored, scale_rel=tol or scale_rel)
    # an artifact without Q/DQ fails while recording too: never "re-record it"
    blockers = ("quantization vanished",) if vanished(m.structure) else ()
    return _verdict("structure", m, failures, updates, causes=(_settings_changed(m, base, blockers),),
                    blockers=list(blockers))


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
