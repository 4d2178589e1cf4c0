"""Sensitivity reports: ``<recipe>-sensitivity[-torch].json``, ``.md`` and ``.png``, and the ranked
table the CLI prints.

Rows are ordered by the output SQNR vs fp32 with the layer excluded (the ranking key, see
:mod:`qatcheck.analysis.sensitivity`); the metric columns are what the subset measured. With a
budget, the reports state the chosen layers' figures on the profile's subset AND on the full eval
set (which decides), side by side."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qatcheck.report_files import markdown_table, shown_of, top_rows, write_bundle

if TYPE_CHECKING:
    from qatcheck.analysis.sensitivity import BudgetResult, Profile

__all__ = ["report_stem", "write_reports", "table_rows", "budget_rows", "markdown_report"]


def report_stem(recipe_name: str, path: str) -> str:
    """``digits-sensitivity`` for the ONNX path (the default), ``digits-sensitivity-torch`` else."""
    return f"{recipe_name}-sensitivity" + ("" if path == "onnx" else f"-{path}")


def write_reports(prof: Profile, reports_dir: str | Path,
                  budget: BudgetResult | None = None) -> list[Path]:
    """``<recipe>-sensitivity[-torch].json``, ``.png`` and ``.md`` in ``reports_dir``."""
    payload = {"profile": prof.to_json(), "budget": budget.to_json() if budget else None,
               "budget_check": _budget_check(budget),
               "keep_precision": list(budget.layers) if budget and budget.met else None}
    return write_bundle(Path(reports_dir) / report_stem(prof.recipe, prof.path), json_doc=payload,
                        markdown=markdown_report(prof, budget), plot=lambda plt: _plot(prof, plt, budget),
                        order=("json", "png", "md"))


def _budget_check(budget: BudgetResult | None) -> dict | None:
    """The chosen layers' figures on the profile's subset and on the full eval set, side by side
    (the JSON report's ``budget_check``; percent, like the tables)."""
    if budget is None:
        return None

    def pct(v: float | None) -> float | None:
        return None if v is None else round(v * 100, 4)
    return {"layers": list(budget.layers), "metric": budget.metric, "budget": budget.budget.describe(),
            "subset": {"samples": budget.subset_samples, "fp32": pct(budget.subset_fp32),
                       "ptq": pct(budget.subset_ptq), "partial": pct(budget.subset_partial),
                       "met": budget.subset_met, "ptq_met": budget.subset_ptq_met},
            "full": {"samples": budget.samples, "fp32": pct(budget.fp32), "ptq": pct(budget.ptq),
                     "partial": pct(budget.partial), "floor": pct(budget.floor), "met": budget.met},
            "decided_by": "full"}


def budget_rows(budget: BudgetResult, mode: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows comparing the profile's subset with the full eval set for the chosen
    layers (the markdown report's budget table)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.2f}"

    def met(v: bool | None) -> str:
        return "-" if v is None else ("met" if v else "MISSED")
    chosen = ", ".join(budget.layers) if budget.layers else "(none)"
    header = ["eval data", "samples", f"fp32 {budget.metric} (%)", f"{mode} (%)",
              f"partial: {chosen} (%)", "budget"]
    rows = [["profile subset", str(budget.subset_samples or "-"), pct(budget.subset_fp32),
             pct(budget.subset_ptq), pct(budget.subset_partial), met(budget.subset_met)],
            ["full eval set (decides)", str(budget.samples), pct(budget.fp32), pct(budget.ptq),
             pct(budget.partial), met(budget.met)]]
    return header, rows


def markdown_report(prof: Profile, budget: BudgetResult | None = None) -> str:
    """The human-readable report: the ranked profile and, with a budget, the chosen layers on the
    profile's subset and on the full eval set."""
    sq = "-" if prof.ptq_sqnr_db is None else f"{prof.ptq_sqnr_db:.2f} dB"
    out = [f"# {prof.recipe}: {prof.mode} sensitivity\n",
           f"{prof.path} path, calibrator {prof.calibrator}, first {prof.samples} eval samples: fp32 "
           f"{prof.metric} {prof.fp32 * 100:.2f}%, {prof.mode} {prof.ptq * 100:.2f}% (output SQNR "
           f"vs fp32 {sq}, cosine {prof.ptq_cosine:.5f}).\n",
           "Layers are ranked by the output SQNR vs fp32 with only that layer in higher precision "
           "(a continuous measure: on a subset a metric such as top-1 moves in whole samples, so it "
           "does not decide the order; its columns are shown as measured).\n"]
    header, rows = table_rows(prof)
    out.append(markdown_table(header, rows))
    if budget is not None:
        out.append(f"\n## Budget: {budget.budget.describe()}\n")
        out.append(markdown_table(*budget_rows(budget, prof.mode)))
        out.append(f"\n{budget.message}\n")
    return "\n".join(out)


#: layers the PNG shows at most (the height grows 0.38 in a layer: 40 keep it under report_files'
#: cap, ~2,000 px); a larger model shows its most sensitive - the table has them all
PLOT_LAYERS = 40


def _plot(prof: Profile, plt, budget: BudgetResult | None):
    chosen = set(budget.layers) if budget and budget.met else set()
    # the profile is ranked (most sensitive first): its head, and the layers the budget keeps
    rank = {id(r): i for i, r in enumerate(prof.layers)}
    rows = top_rows(prof.layers, PLOT_LAYERS, lambda r: rank[id(r)], keep=lambda r: r.layer in chosen)
    labels = [r.layer for r in rows][::-1]
    panels = 4 if any(r.only_metric is not None for r in rows) else 3
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 0.9 + 0.38 * max(len(rows), 2)),
                             sharey=True, squeeze=False)
    axes = list(axes[0])
    colors = ["tab:red" if r.layer in chosen else "tab:blue" for r in rows][::-1]
    ax = axes.pop(0)  # the ranking key first
    ax.barh(labels, [r.excluded_sqnr_db if r.excluded_sqnr_db is not None else 0.0
                     for r in rows][::-1], color=colors)
    if prof.ptq_sqnr_db is not None:
        ax.axvline(prof.ptq_sqnr_db, color="gray", ls="--", label=f"{prof.mode} {prof.ptq_sqnr_db:.1f}")
        ax.legend(fontsize=7)
    ax.set_xlabel("output SQNR vs fp32 (dB), layer excluded: rank")
    ax = axes[0]
    ax.barh(labels, [r.excluded_metric * 100 for r in rows][::-1], color=colors)
    ax.axvline(prof.ptq * 100, color="gray", ls="--", label=f"{prof.mode} {prof.ptq * 100:.2f}")
    ax.axvline(prof.fp32 * 100, color="green", ls=":", label=f"fp32 {prof.fp32 * 100:.2f}")
    lo = min([prof.ptq] + [r.excluded_metric for r in rows]) * 100
    ax.set_xlim(max(0.0, lo - 2), min(100.0, prof.fp32 * 100 + 2) if prof.fp32 <= 1 else None)
    ax.set_xlabel(f"{prof.metric} (%) with the layer excluded")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    ax.barh(labels, [1.0 - r.excluded_cosine for r in rows][::-1], color=colors)
    ax.axvline(1.0 - prof.ptq_cosine, color="gray", ls="--", label=f"{prof.mode}")
    ax.set_xlabel("1 - output cosine vs fp32 (layer excluded)")
    ax.legend(fontsize=7)
    if len(axes) == 3:
        ax = axes[2]
        ax.barh(labels, [(r.only_drop_points or 0.0) for r in rows][::-1], color=colors)
        ax.set_xlabel(f"{prof.metric} drop (points), only this layer quantized")
    shown = shown_of(len(rows), len(prof.layers), "layers by rank; the table has all")
    fig.suptitle(f"{prof.recipe}: {prof.mode} sensitivity ({prof.calibrator}, {prof.samples} samples)"
                 + ("; red = kept for budget" if chosen else "") + (f"\n{shown}" if shown else ""), fontsize=10)
    fig.tight_layout()
    return fig


def table_rows(prof: Profile, top: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ranked table (used by the CLI). The rank follows the SQNR column;
    the metric columns are the subset's measurements."""
    header = ["#", "layer", "SQNR excl. (dB)", "SQNR gain (dB)", f"{prof.metric} excl. (%)",
              "gain (pt)", "cosine excl."]
    only = any(r.only_metric is not None for r in prof.layers)
    if only:
        header += [f"{prof.metric} only (%)", "drop only (pt)"]
    header.append("ONNX nodes" if prof.path == "onnx" else "quantizers")

    def db(v: float | None, sign: str = "") -> str:
        return "-" if v is None else f"{v:{sign}.2f}"
    rows = []
    for r in prof.layers[:top]:
        row = [str(r.rank), r.layer, db(r.excluded_sqnr_db), db(r.sqnr_gain_db, "+"),
               f"{r.excluded_metric * 100:.2f}", f"{r.gain_points:+.2f}", f"{r.excluded_cosine:.5f}"]
        if only:
            row += [f"{(r.only_metric or 0) * 100:.2f}", f"{(r.only_drop_points or 0):+.2f}"]
        row.append(", ".join(r.targets))
        rows.append(row)
    return header, rows
