"""The comparison table: one per recipe, in the terminal and in ``reports/`` as Markdown, JSON and
a PNG chart, built only from the session's measurement records. Rendering only: the baselines are
written by ``QatcheckSession.finish``, which calls :func:`render` and appends what it wrote.
"""
from __future__ import annotations

import io
import json
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
                        "notes": list(v.notes)}
                  for (case, chk), v in session.verdicts.items() if case == c}
        records.append({**m.to_dict(), "verdict": verdict, "checks": checks,
                        "outcomes": session.outcomes.get(c, {}), "delta_fp32_points": d_fp32,
                        "delta_baseline_points": d_base, "speedup_vs_fp32": speed,
                        # what a reader of the records alone (the HTML report, the history) cannot
                        # infer from a column title: which metric leads, and which way is better
                        "primary_metric": p, "higher_is_better": {
                            n: metric_spec(task, n).higher_is_better for n in task.metric_names}})
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


def chart(path: Path, title: str, header: list[str], rows: list[list[str]], metric: str) -> Path:
    """Metric and p50 latency per case as two bar panels (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mi, li = header.index(metric), header.index("p50 ms")
    labels = [f"{r[0]} {r[1]}\n{r[2]}" for r in rows]
    vals = [float(r[mi]) if r[mi] != "-" else 0.0 for r in rows]
    lats = [float(r[li]) if r[li] != "-" else 0.0 for r in rows]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, 0.7 * len(rows)), 7), sharex=True)
    colors = ["tab:red" if r[-1] == "FAIL" else "tab:blue" for r in rows]
    a1.bar(range(len(rows)), vals, color=colors)
    lo = min([v for v in vals if v > 0], default=0)
    a1.set_ylim(max(0, lo - 5), 100 if max(vals, default=0) <= 100 else None)
    a1.set_ylabel(metric + " (%)")
    a1.set_title(title)
    a2.bar(range(len(rows)), lats, color="tab:gray")
    a2.set_ylabel("p50 latency (ms)")
    a2.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    with_tmp = path.with_suffix(".tmp.png")
    fig.savefig(with_tmp, dpi=110)
    plt.close(fig)
    with_tmp.replace(path)
    return path


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
        try:
            summary.files.append(chart(reports / f"{name}.png", f"qatcheck: {name}", header, all_rows,
                                       metric_label(session.task(name).primary_metric)))
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
