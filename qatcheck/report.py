"""The comparison table: one per recipe, in the terminal and in ``reports/`` as Markdown, JSON and
a PNG chart, built only from the session's measurement records.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from qatcheck.errors import BaselineError
from qatcheck.fsutil import write_text_atomic
from qatcheck.measurement import Case

COLUMNS_HEAD = ("Mode", "Backend", "Calibrator")
COLUMNS_TAIL = ("Δ fp32 (pt)", "Δ baseline (pt)", "p50 ms", "Speedup", "Parity (cos / agree)", "Verdict")


@dataclass
class Summary:
    text: str = ""
    files: list[Path] = field(default_factory=list)
    baseline_changes: dict = field(default_factory=dict)


#: column titles as the sample repos' tables write them (values are in percent / points)
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "map50_95": "mAP@.5:.95", "map50": "mAP@.5",
                 "ap_small": "AP small", "ap_medium": "AP medium", "ap_large": "AP large"}


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def _fmt_metric(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}" if v <= 1.0 else f"{v:.3f}"


def rows_for(session, recipe_name: str) -> tuple[list[str], list[list[str]], list[dict]]:
    """Header, table rows and JSON records for one recipe, in case order."""
    recipe = session.recipes[recipe_name]
    task = session.task(recipe_name)
    ms = sorted((m for c, m in session.measurements.items() if c.recipe == recipe_name),
                key=lambda m: (recipe.modes.index(m.case.mode), m.case.backend,
                               ("min", "opt", "max").index(m.case.shape)))
    header = [*COLUMNS_HEAD, *map(metric_label, task.metric_names), *COLUMNS_TAIL]
    rows, records = [], []
    p = task.primary_metric
    for m in ms:
        c = m.case
        fp32 = session.measurements.get(Case(c.recipe, "fp32", c.backend))
        d_fp32 = (m.metrics[p] - fp32.metrics[p]) * 100 if fp32 and c.mode != "fp32" else None
        try:
            base = session.store.get(c.recipe, c.key, "metrics", p)
        except BaselineError:  # already reported by every check that read it
            base = None
        d_base = (m.metrics[p] - base["value"]) * 100 if base else None
        lat = m.latency.median_ms if m.latency else None
        # a speedup compares the same input shape on the same device fingerprint
        speed = (fp32.latency.median_ms / lat if fp32 and fp32.latency and lat and c.mode != "fp32"
                 and fp32.fingerprint_id == m.fingerprint_id and tuple(fp32.shape) == tuple(m.shape)
                 else None)
        par = (f"{m.parity['cosine']:.5f} / {m.parity[task.agreement_name]:.1%}" if m.parity else "ref")
        mode = c.mode if c.shape == "opt" and c.mode != "dynamic" else f"{c.mode} {c.shape} {'x'.join(map(str, m.shape))}"
        rows.append([mode, c.backend, m.calibrator, *[_fmt_metric(m.metrics.get(n)) for n in task.metric_names],
                     "-" if d_fp32 is None else f"{d_fp32:+.2f}", "-" if d_base is None else f"{d_base:+.2f}",
                     "-" if lat is None else f"{lat:.3f}", "-" if speed is None else f"{speed:.2f}x",
                     par, m.verdict])
        records.append({**m.to_dict(), "delta_fp32_points": d_fp32, "delta_baseline_points": d_base,
                        "speedup_vs_fp32": speed})
    return header, rows, records


NO_REASON = ("listed in QuantSettings.keep_precision without a recorded reason (`python -m qatcheck "
             "sensitivity --recipe <module:callable> --budget-points 0.5 --write-keep FILE` records one)")


def kept_layers(session, recipe_name: str) -> dict[str, str]:
    """The layers ``partial`` keeps in higher precision, each with why (empty if no partial ran)."""
    if not any(c.recipe == recipe_name and c.mode == "partial" for c in session.measurements):
        return {}
    q = session.recipes[recipe_name].quant
    return {layer: q.keep_precision_why.get(layer, NO_REASON) for layer in q.keep_precision}


def notes_text(session, recipe_name: str) -> str:
    """Per-case notes (timing fallbacks, fake-quant latency, noise), each distinct note once."""
    seen: dict[str, list[str]] = {}
    for c, m in session.measurements.items():
        if c.recipe == recipe_name:
            for note in m.notes:
                seen.setdefault(note, []).append(c.key)
    return "".join(f"note ({', '.join(keys)}): {note}\n" for note, keys in seen.items())


def kept_text(kept: dict[str, str]) -> str:
    if not kept:
        return ""
    lines = [f"partial keeps {len(kept)} layer(s) in higher precision:"]
    lines += [f"  - {layer}: {why}" for layer, why in kept.items()]
    return "\n".join(lines) + "\n"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def terminal_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 3 else "right", no_wrap=i < 2)
    for r in rows:
        style = "red" if r[-1] == "FAIL" else None
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
    labels = [f"{r[0]}\n{r[1]}" for r in rows]
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


def finish(session) -> Summary:
    """End of session: tables and report files from the measurements, then (under
    ``--update-baselines``) the baseline write, reported change by change."""
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
        reports.mkdir(parents=True, exist_ok=True)
        md = reports / f"{name}.md"
        write_text_atomic(md, f"# qatcheck report: {name}\n\n" + markdown_table(header, rows)
                          + ("\n" + kept_text(kept) if kept else "")
                          + ("\n" + notes.replace("\n", "\n\n") if notes else ""))
        js = reports / f"{name}.json"
        write_text_atomic(js, json.dumps({"recipe": name, "cases": records, "keep_precision": kept},
                                         indent=2, default=str) + "\n")
        summary.files += [md, js]
        try:
            summary.files.append(chart(reports / f"{name}.png", f"qatcheck: {name}", header, rows,
                                       metric_label(session.task(name).primary_metric)))
        except Exception as exc:  # a chart is a nicety; never fail a session over it
            out.write(f"(chart not written: {exc})\n")
    if session.options.update_baselines:
        try:
            written = session.store.commit()
        except BaselineError as exc:
            written = {}
            out.write(f"baselines NOT updated: {exc}\n")
        summary.baseline_changes = written
        for path, changes in written.items():
            out.write(f"baselines updated: {path} ({len(changes)} changed)\n")
            out.write("".join(c.describe() + "\n" for c in changes))
    if summary.files:
        out.write("reports: " + ", ".join(str(f) for f in summary.files) + "\n")
    c = session.cache
    if c.built or c.reused:
        out.write(f"artifact cache {c.root}: {len(c.built)} built, {len(c.reused)} reused\n")
    summary.text = out.getvalue()
    return summary
