"""The comparison table: one per recipe, in the terminal and in ``reports/`` as Markdown, JSON and
a PNG chart, built only from the session's measurement records. Rendering only: the baselines are
written by ``QatcheckSession.finish``, which calls :func:`render` and appends what it wrote.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qatcheck.errors import BaselineError
from qatcheck import report_files
from qatcheck.run_record import RecipeTable
from qatcheck.measurement import Case, overall
from qatcheck.modes import PROFILE_POINTS, spec as mode_spec
from qatcheck.tasks.base import metric_spec

COLUMNS_HEAD = ("Mode", "Shape", "Backend", "Calibrator")
COLUMNS_TAIL = ("Δ fp32 (pt)", "Δ baseline (pt)", "p50 ms", "Speedup", "Parity (cos / agree)", "Measured",
                "Verdict")


@dataclass
class Summary:
    text: str = ""
    files: list[Path] = field(default_factory=list)
    baseline_changes: dict = field(default_factory=dict)
    #: why --update-baselines wrote nothing ("" when it wrote, or was not asked): the run must not
    #: pass then - a CI job that records baselines would be green with nothing recorded
    baselines_not_written: str = ""
    #: each recipe's table and records, for the run's publishers (qatcheck.run_record)
    tables: list[RecipeTable] = field(default_factory=list)


#: column titles as the sample repos' tables write them (values are in percent / points)
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "map50_95": "mAP@.5:.95", "map50": "mAP@.5",
                 "ap_small": "AP small", "ap_medium": "AP medium", "ap_large": "AP large"}


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def _fmt_metric(v: float | None, fraction: bool = True) -> str:
    """Fractions in percent (the sample repos' tables), other metrics (MetricSpec(fraction=False))
    as they are."""
    if v is None:
        return "-"
    return f"{v * 100:.2f}" if fraction and v <= 1.0 else f"{v:.4g}"


def tested_cases(session, recipe_name: str) -> list:
    """The recipe's measurements that are rows of its table, in table order: the cases a test or a
    check ran on (a reference measured only for another case's parity is not a row)."""
    recipe = session.recipes[recipe_name]
    tested = set(session.outcomes) | {c for c, _ in session.verdicts}
    ms = [m for c, m in session.measurements.items()
          if c.recipe == recipe_name and (c in tested or not tested) and c.mode in recipe.modes]
    return sorted(ms, key=lambda m: (recipe.modes.index(m.case.mode), m.case.backend,
                                     ("", *PROFILE_POINTS).index(m.case.shape)))


def case_verdict(session, case: Case) -> str:
    """One word per row: its tests' outcomes and its checks' verdicts."""
    statuses = list(session.outcomes.get(case, {}).values())
    statuses += [v.status for (c, _), v in session.verdicts.items() if c == case]
    return overall(statuses)


def shape_label(m) -> str:
    dims = "x".join(map(str, m.shape))
    return f"{m.case.shape} {dims}" if m.case.shape else dims


def fp32_twin(session, case: Case):
    """fp32 on the same backend at the same shape (for Δ fp32 and the speedup)."""
    ms = session.measurements
    twin = ms.get(Case(case.recipe, "fp32", case.backend, case.shape))
    if twin is None and case.shape:
        twin = next((m for c, m in ms.items() if c.recipe == case.recipe and c.backend == case.backend
                     and c.shape == case.shape and mode_spec(c.mode).variant_of == "fp32"), None)
    return twin


def cost_label(m) -> str:
    """What the row cost this session: ``reused`` (its measured parts came from the result cache,
    qatcheck.results), plus the seconds spent on it - building, evaluating, timing."""
    spent = sum(m.seconds.values())
    if m.reused:
        return "reused" + (f" +{spent:.1f}s" if spent >= 0.1 else "")
    return f"{spent:.1f}s"


def cost_text(session) -> str:
    """One line per recipe: artifacts built, cases measured and reused, seconds by kind."""
    lines = []
    for name in sorted({c.recipe for c in session.measurements}):
        ms = tested_cases(session, name)
        if not ms:
            continue
        total: dict[str, float] = {}
        for m in session.measurements.values():  # references measured for a row's parity count too
            if m.case.recipe == name:
                for k, v in m.seconds.items():
                    total[k] = total.get(k, 0.0) + v
        built = sum(1 for f in session.cache.built if f.startswith(f"{name}-"))
        reused = sum(1 for m in ms if m.reused)
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in sorted(total.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        lines.append(f"{name}: {built} artifact(s) built, {len(ms) - reused} case(s) measured, {reused} reused "
                     f"(--qatcheck-remeasure measures all); {sum(total.values()):.1f} s"
                     + (f" ({kinds})" if kinds else ""))
    return "".join(f"cost {line}\n" for line in lines)


def rows_for(session, recipe_name: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """Header, table rows and JSON records for one recipe, in case order."""
    task = session.task(recipe_name)
    header = [*COLUMNS_HEAD, *map(metric_label, task.metric_names), *COLUMNS_TAIL]
    rows, records = [], []
    p = task.primary_metric
    for m in tested_cases(session, recipe_name):
        c = m.case
        fp32 = fp32_twin(session, c)
        is_ref = fp32 is m
        d_fp32 = ((m.metrics[p] - fp32.metrics[p]) * 100
                  if fp32 and not is_ref and p in m.metrics and p in fp32.metrics else None)
        try:
            base = session.store.get(c.recipe, c.key, "metrics", p)
        except BaselineError:  # already reported by every check that read it
            base = None
        d_base = (m.metrics[p] - base["value"]) * 100 if base and p in m.metrics else None
        lat = m.latency.median_ms if m.latency else None
        # a speedup compares the same input shape on the same device fingerprint
        speed = (fp32.latency.median_ms / lat if fp32 and fp32.latency and lat and not is_ref
                 and fp32.fingerprint_id == m.fingerprint_id and tuple(fp32.shape) == tuple(m.shape)
                 else None)
        par = (f"{m.parity['cosine']:.5f} / {m.parity[task.agreement_name]:.1%}" if m.parity
               else "ref" if "eval" in m.parts else "-")
        verdict = case_verdict(session, c)
        rows.append([c.mode, shape_label(m), c.backend, m.calibrator,
                     *[_fmt_metric(m.metrics.get(n), metric_spec(task, n).fraction) for n in task.metric_names],
                     "-" if d_fp32 is None else f"{d_fp32:+.2f}", "-" if d_base is None else f"{d_base:+.2f}",
                     "-" if lat is None else f"{lat:.3f}", "-" if speed is None else f"{speed:.2f}x",
                     par, cost_label(m), verdict])
        checks = {chk: {"status": v.status, "failures": list(v.failures), "reason": v.reason,
                        "notes": list(v.notes), "details": session.failure_details.get((case, chk), [])}
                  for (case, chk), v in session.verdicts.items() if case == c}
        # what the history needs to judge a drift: the primary metric, its direction and its
        # tolerance (the baseline's, else the recipe's), and the latency tolerance
        spec, tol = metric_spec(task, p), session.recipes[recipe_name].tolerances
        records.append({**m.to_dict(), "verdict": verdict, "checks": checks,
                        "outcomes": session.outcomes.get(c, {}), "delta_fp32_points": d_fp32,
                        "delta_baseline_points": d_base, "speedup_vs_fp32": speed,
                        "primary_metric": {"name": p, "higher_is_better": spec.higher_is_better,
                                           "fraction": spec.fraction,
                                           "tolerance": ((base["tolerance"] if base else tol.metric_points)
                                                         if spec.fraction else tol.value_metric_rel)},
                        "latency_tolerance_rel": tol.latency_rel})
    return header, rows, records


NO_REASON = ("listed in QuantSettings.keep_precision without a recorded reason (`python -m qatcheck "
             "sensitivity --recipe <module:callable> --budget-points 0.5 --write-keep FILE` records one)")


def kept_layers(session, recipe_name: str) -> dict[str, str]:
    """The layers ``partial`` keeps in higher precision, each with why (empty if no partial ran)."""
    if not any(c.recipe == recipe_name and mode_spec(c.mode).keeps_layers for c in session.measurements):
        return {}
    q = session.recipes[recipe_name].quant
    return {layer: q.keep_precision_why.get(layer, NO_REASON) for layer in q.keep_precision}


def notes_text(session, recipe_name: str) -> str:
    """Per-case notes (timing fallbacks, fake-quant latency, noise), each distinct note once."""
    seen: dict[str, list[str]] = {}
    cases = tested_cases(session, recipe_name)
    for m in cases:
        for note in m.notes:
            seen.setdefault(note, []).append(m.case.key)
    out = "".join(f"note ({'all cases' if len(keys) == len(cases) > 1 else ', '.join(keys)}): {note}\n"
                  for note, keys in seen.items())
    # what a mode's figures are, once per mode (ModeSpec.note; fp8: a simulation off an FP8 GPU)
    timed = {c.mode for (c, check), v in session.verdicts.items()
             if c.recipe == recipe_name and check == "latency" and v.status != "skip"}
    for mode in dict.fromkeys(m.case.mode for m in cases):
        s = mode_spec(mode)
        if s.note:
            out += f"note (mode {mode}, every case): {s.note}\n"
        if s.latency_note and mode in timed:
            out += f"note (mode {mode}, latency): {s.latency_note}\n"
    out += output_parity_text(cases)
    # what the judges said beyond pass / fail: improvements, inconclusive latency, audits
    for (case, check), v in session.verdicts.items():
        if case.recipe == recipe_name:
            out += "".join(f"{v.status if v.status in ('improved', 'inconclusive') else 'note'} "
                           f"({case.key} {check}): {n}\n" for n in v.notes)
    return out


def output_parity_text(cases) -> str:
    """With several outputs, each one's cosine / max-abs per case (the Parity column shows the
    worst output's cosine): a drifting head is visible by name."""
    lines = [f"  {m.case.key}: " + ", ".join(f"{name} {d['cosine']:.5f} / {d['max_abs']:.3g}"
                                            for name, d in m.output_parity.items())
             for m in cases if m.output_parity and len(m.output_parity) > 1]
    return "parity per output (cosine / max-abs):\n" + "\n".join(lines) + "\n" if lines else ""


def kept_text(kept: dict[str, str]) -> str:
    if not kept:
        return ""
    lines = [f"partial keeps {len(kept)} layer(s) in higher precision:"]
    lines += [f"  - {layer}: {why}" for layer, why in kept.items()]
    return "\n".join(lines) + "\n"


def terminal_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < len(COLUMNS_HEAD) else "right", no_wrap=i < 3)
    for r in rows:
        style = "red" if r[-1] == "FAIL" else "yellow" if r[-1] == "inconclusive" else None
        table.add_row(*r, style=style)
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


@dataclass(frozen=True)
class ChartMetric:
    """One metric panel of the chart: the task's metric (a head's too, ``landmarks.l2``), how it
    reads (direction) and how it is shown (fraction: percent)."""

    name: str
    label: str
    higher_is_better: bool = True
    fraction: bool = True


def chart_metrics(task) -> list[ChartMetric]:
    """Every metric the task reports, primary first, heads' included (``Task.metric_names``)."""
    return [ChartMetric(n, metric_label(n), metric_spec(task, n).higher_is_better, metric_spec(task, n).fraction)
            for n in task.metric_names]


#: the chart is never wider (nor taller) than report_files' cap (about 2,000 px): many cases get
#: narrower bars and smaller labels, not a wider figure
CHART_MAX_INCHES = report_files.PNG_MAX_INCHES
#: up to this many cases a label takes two lines (mode and shape / backend); beyond, one line
TWO_LINE_LABELS = 24


def _case_label(rec: dict, two_lines: bool) -> str:
    case = rec.get("case", {})
    dims = "x".join(map(str, rec.get("shape") or ()))
    shape = f"{case.get('shape')} {dims}" if case.get("shape") else dims
    return f"{case.get('mode')} {shape}" + ("\n" if two_lines else " ") + str(case.get("backend"))


def _value(v) -> float | None:
    """A recorded figure, or None when it is missing (never measured, or not a finite number)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _metric_values(records: list[dict], m: ChartMetric) -> list[float | None]:
    """Each case's value of ``m`` as the table shows it (a fraction in percent), None where missing."""
    vals = [_value((r.get("metrics") or {}).get(m.name)) for r in records]
    return [v * 100 if v is not None and m.fraction else v for v in vals]


def _latencies(records: list[dict]) -> list[float | None]:
    """Each case's p50 latency (ms), None where it was not timed (a CPU run times few cases)."""
    return [_value((r.get("latency") or {}).get("median_ms")) for r in records]


def _bars(ax, values: list[float | None], colors: list[str], fontsize: float) -> None:
    """Bars where there is a value; a grey "n/a" at the foot of the panel where there is none (a
    missing figure is not a zero)."""
    from matplotlib.transforms import blended_transform_factory

    xs = [i for i, v in enumerate(values) if v is not None]
    bars = ax.bar(xs, [values[i] for i in xs], color=[colors[i] for i in xs])
    if len(values) <= TWO_LINE_LABELS:  # few cases: the figures on the bars (they differ in decimals)
        ax.bar_label(bars, fmt="%.4g", fontsize=fontsize, padding=1)
    foot = blended_transform_factory(ax.transData, ax.transAxes)
    for i, v in enumerate(values):
        if v is None:
            ax.text(i, 0.02, "n/a", transform=foot, ha="center", va="bottom", rotation=90,
                    fontsize=fontsize, color="0.45")


def _fraction_limits(ax, values: list[float]) -> None:
    """A percent panel zoomed to where the bars differ (5 points below the lowest), capped at 100."""
    lo, hi = min(values), max(values)
    ax.set_ylim(max(0.0, lo - 5.0), 100.0 if hi <= 100.0 else hi * 1.02)


@dataclass(frozen=True)
class _Panel:
    label: str
    values: list  # float | None per case
    percent: bool  # zoomed like a percent (:func:`_fraction_limits`)
    color: str  # a passing case's bar; a failing case's is red


def chart_panels(records: list[dict], metrics: list[ChartMetric]) -> list[_Panel]:
    """One panel per metric with a value in some case (a lower-is-better one labelled so), then
    p50 latency when some case was timed."""
    panels = []
    for m in metrics:
        values = _metric_values(records, m)
        if any(v is not None for v in values):
            label = (f"{m.label} (%)" if m.fraction else m.label) + ("" if m.higher_is_better else
                                                                     "\n(lower is better)")
            panels.append(_Panel(label, values, m.fraction, "tab:blue"))
    lats = _latencies(records)
    if any(v is not None for v in lats):
        panels.append(_Panel("p50 latency (ms)", lats, False, "tab:gray"))
    return panels


def chart_figure(plt, title: str, records: list[dict], metrics: list[ChartMetric]):
    """The recipe's chart from its report records (:func:`chart_panels`, one under the other);
    failing cases red; a missing value marked "n/a". None when there is nothing to draw."""
    panels = chart_panels(records, metrics)
    if not panels:
        return None
    n = len(records)
    two_lines = n <= TWO_LINE_LABELS
    # the width follows the case count up to the cap; past it the labels shrink instead
    width = min(CHART_MAX_INCHES, max(8.0, 0.55 * n + 2.0))
    per_case_pt = (width - 1.5) * 72 / max(n, 1)  # the x room of one case's label
    fontsize = max(3.0, min(7.0, 0.65 * per_case_pt / (2.4 if two_lines else 1.2)))
    height = min(CHART_MAX_INCHES, 1.8 + 1.9 * len(panels))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, height), sharex=True, squeeze=False)
    axes = list(axes[:, 0])
    failing = [r.get("verdict") == "FAIL" for r in records]
    for ax, panel in zip(axes, panels):
        _bars(ax, panel.values, ["tab:red" if f else panel.color for f in failing], fontsize)
        if panel.percent:
            _fraction_limits(ax, [v for v in panel.values if v is not None])
        ax.set_ylabel(panel.label, fontsize=8)
    missing = any(v is None for p in panels for v in p.values)
    legend = ", ".join((["red: failing case"] if any(failing) else []) + (["n/a: not measured"] if missing else []))
    axes[0].set_title(title + (f"  ({legend})" if legend else ""), fontsize=9)
    axes[-1].set_xticks(range(n), [_case_label(r, two_lines) for r in records],
                        rotation=60 if two_lines else 90, ha="right" if two_lines else "center",
                        fontsize=fontsize)
    fig.tight_layout()
    return fig


def chart(reports: Path, name: str, title: str, records: list[dict], metrics: list[ChartMetric]) -> Path | None:
    """``reports/<name>.png`` (:func:`chart_figure`), or None - with an older chart removed - when
    there is nothing to draw."""
    written = report_files.write_bundle(reports / name, plot=lambda plt: chart_figure(plt, title, records, metrics),
                                        order=("png",))
    if not written:
        (reports / f"{name}.png").unlink(missing_ok=True)  # an earlier run's chart would mislead
    return written[0] if written else None


def render(session) -> Summary:
    """The tables (terminal text) and report files of every recipe the session measured. Rendering
    only: the session writes the baselines (``QatcheckSession.finish``) and appends
    :func:`baselines_text` and :func:`footer_text`."""
    summary = Summary()
    out = io.StringIO()
    reports = session.options.reports_dir
    for name in sorted({c.recipe for c in session.measurements}):
        header, rows, records = rows_for(session, name)
        if not rows:
            continue
        kept = kept_layers(session, name)
        out.write(terminal_table(f"qatcheck: {name}", header, rows))
        notes = notes_text(session, name)
        out.write(kept_text(kept) + notes)
        try:
            md, js, all_rows = report_files.write(
                reports, name, header, rows, records,
                extra_md=("\n" + kept_text(kept) if kept else "") + ("\n" + notes.replace("\n", "\n\n") if notes else ""),
                extra_json={"keep_precision": kept}, run=session.run)
        except OSError as exc:  # the table above is already out: say why the files are not
            out.write(f"reports NOT written: cannot write {exc.filename or reports}: {exc.strerror or exc} "
                      "(make it writable, or point --qatcheck-reports elsewhere)\n")
            continue
        if len(all_rows) > len(rows):
            out.write(f"reports/{name}.md also keeps {len(all_rows) - len(rows)} row(s) of another run of "
                      f"{name} that overlapped this one\n")
        summary.files += [md, js]
        # plain JSON types: the tables travel from an xdist worker to the controller
        summary.tables.append(RecipeTable(name, header, rows, json.loads(json.dumps(
            [{**r, "row": row} for r, row in zip(records, rows)], default=str)), notes))
        try:  # drawn from the JSON just written: this run's records and an overlapping run's kept ones
            png = chart(reports, name, f"qatcheck: {name}", json.loads(js.read_text())["cases"],
                        chart_metrics(session.task(name)))
            summary.files += [png] if png else []
        except Exception as exc:  # a chart is a nicety; never fail a session over it
            out.write(f"(chart not written: {exc})\n")
    summary.text = out.getvalue()
    return summary


def baselines_text(summary: Summary, created: Path | None, refused) -> str:
    """What ``--update-baselines`` did: each file's changes, or why nothing was written; the
    failing checks it refused to record. ``created``: the baselines directory, when the write made it."""
    out = io.StringIO()
    if summary.baselines_not_written:
        out.write(f"baselines NOT updated: {summary.baselines_not_written} - nothing was recorded, so the run fails\n")
    elif created is not None and summary.baseline_changes:
        out.write(f"note: created the baselines directory {created} (it did not exist)\n")
    for path, changes in summary.baseline_changes.items():
        out.write(f"baselines updated: {path} ({len(changes)} changed)\n")
        out.write("".join(c.describe() + "\n" for c in changes))
    if refused:
        out.write(f"baselines NOT recorded for {len(refused)} failing check(s) "
                  "(--qatcheck-force-update records them anyway):\n")
        out.write("".join(f"  - {v.case.key} {v.check}: {v.failures[0]}\n" for v in refused))
    return out.getvalue()


def footer_text(files: list[Path], cache) -> str:
    """The report files written, and what the artifact cache built and reused."""
    out = "reports: " + ", ".join(str(f) for f in files) + "\n" if files else ""
    if cache.built or cache.reused:
        out += f"artifact cache {cache.root}: {len(cache.built)} built, {len(cache.reused)} reused\n"
    return out + "".join(f"note: {n}\n" for n in cache.notes)
