"""Sensitivity reports: ``<recipe>-sensitivity[-torch].json`` and ``.png``, and the ranked table
the CLI prints."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qatcheck.fsutil import write_text_atomic

if TYPE_CHECKING:
    from qatcheck.analysis.sensitivity import BudgetResult, Profile

__all__ = ["report_stem", "write_reports", "table_rows"]


def report_stem(recipe_name: str, path: str) -> str:
    """``digits-sensitivity`` for the ONNX path (the default), ``digits-sensitivity-torch`` else."""
    return f"{recipe_name}-sensitivity" + ("" if path == "onnx" else f"-{path}")


def write_reports(prof: Profile, reports_dir: str | Path,
                  budget: BudgetResult | None = None) -> list[Path]:
    """``<recipe>-sensitivity[-torch].json`` and ``.png`` in ``reports_dir``."""
    reports_dir = Path(reports_dir)
    stem = report_stem(prof.recipe, prof.path)
    payload = {"profile": prof.to_json(), "budget": budget.to_json() if budget else None,
               "keep_precision": list(budget.layers) if budget and budget.met else None}
    jpath = reports_dir / f"{stem}.json"
    write_text_atomic(jpath, json.dumps(payload, indent=1))
    ppath = reports_dir / f"{stem}.png"
    _plot(prof, ppath, budget)
    return [jpath, ppath]


def _plot(prof: Profile, out: Path, budget: BudgetResult | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from qatcheck.fsutil import atomic_path

    rows = prof.layers
    labels = [r.layer for r in rows][::-1]
    panels = 3 if any(r.only_metric is not None for r in rows) else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 0.9 + 0.38 * max(len(rows), 2)),
                             sharey=True, squeeze=False)
    axes = axes[0]
    chosen = set(budget.layers) if budget and budget.met else set()
    colors = ["tab:red" if r.layer in chosen else "tab:blue" for r in rows][::-1]
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
    if panels == 3:
        ax = axes[2]
        ax.barh(labels, [(r.only_drop_points or 0.0) for r in rows][::-1], color=colors)
        ax.set_xlabel(f"{prof.metric} drop (points), only this layer quantized")
    fig.suptitle(f"{prof.recipe}: {prof.mode} sensitivity ({prof.calibrator}, {prof.samples} samples)"
                 + ("; red = kept for budget" if chosen else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table_rows(prof: Profile, top: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the ranked table (used by the CLI)."""
    header = ["#", "layer", f"{prof.metric} excl. (%)", "gain (pt)", "cosine excl."]
    only = any(r.only_metric is not None for r in prof.layers)
    if only:
        header += [f"{prof.metric} only (%)", "drop only (pt)"]
    header.append("ONNX nodes" if prof.path == "onnx" else "quantizers")
    rows = []
    for r in prof.layers[:top]:
        row = [str(r.rank), r.layer, f"{r.excluded_metric * 100:.2f}", f"{r.gain_points:+.2f}",
               f"{r.excluded_cosine:.5f}"]
        if only:
            row += [f"{(r.only_metric or 0) * 100:.2f}", f"{(r.only_drop_points or 0):+.2f}"]
        row.append(", ".join(r.targets))
        rows.append(row)
    return header, rows
