"""The keep list: the layers a budget search chose to keep in higher precision, with a reason
each, as the JSON file ``python -m qatcheck sensitivity --write-keep FILE`` writes and a recipe
reads with :func:`load_keep_list` into ``QuantSettings(keep_precision=..., keep_precision_why=...)``.

Only the file format lives here (no model, no evaluation), so reading a keep list while building a
recipe imports nothing heavy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qatcheck.errors import ConfigError
from qatcheck.report_files import write_json

if TYPE_CHECKING:
    from qatcheck.analysis.sensitivity import BudgetResult, Profile

__all__ = ["KeepList", "keep_list", "write_keep_list", "load_keep_list"]

_KEEP_FORMAT = "qatcheck.keep_precision/1"


@dataclass(frozen=True)
class KeepList:
    """Layers to keep in higher precision and why, as ``python -m qatcheck sensitivity
    --write-keep`` records them. A recipe passes ``layers`` and ``reasons`` to
    ``QuantSettings(keep_precision=..., keep_precision_why=...)``; the report prints the reasons."""

    recipe: str
    layers: tuple[str, ...]
    reasons: dict[str, str]
    summary: str
    source: str = ""

    def to_json(self) -> dict:
        return {"format": _KEEP_FORMAT, "recipe": self.recipe, "layers": list(self.layers),
                "reasons": dict(self.reasons), "summary": self.summary}


def keep_list(prof: Profile, result: BudgetResult) -> KeepList:
    """The chosen layers with a one-line reason each: rank and gain in the profile, and the full
    evaluations that justified the choice."""
    if not result.met:
        raise ConfigError(f"{result.recipe}: the budget was not met, so there is no layer list to keep")
    if (prof.recipe, prof.path) != (result.recipe, result.path):
        raise ConfigError(f"profile is for {prof.recipe}/{prof.path}, the budget result for "
                          f"{result.recipe}/{result.path}")

    def pct(v: float) -> str:
        return f"{v * 100:.2f}%"
    reasons = {}
    for layer in result.layers:
        row = prof.row(layer)
        sqnr = (f"output SQNR vs fp32 {prof.ptq_sqnr_db:.2f} -> {row.excluded_sqnr_db:.2f} dB (the "
                "ranking key), " if row.excluded_sqnr_db is not None and prof.ptq_sqnr_db is not None
                else "")
        reasons[layer] = (f"rank {row.rank} of {len(prof.layers)} in the {prof.path} sensitivity profile "
                          f"({prof.calibrator}, {prof.samples} samples): keeping it alone in higher "
                          f"precision gives {sqnr}cosine {prof.ptq_cosine:.4f} -> "
                          f"{row.excluded_cosine:.4f}, {result.metric} {row.gain_points:+.2f} pt")
    subset = (f"; on the profile's {result.subset_samples}-sample subset {pct(result.subset_ptq)} -> "
              f"{pct(result.subset_partial)} (fp32 {pct(result.subset_fp32)})"
              if result.subset_partial is not None and result.subset_ptq is not None
              and result.subset_fp32 is not None else "")
    summary = (f"{prof.mode} {result.metric} {pct(result.ptq)} -> partial {pct(result.partial)} "
               f"(fp32 {pct(result.fp32)}, full eval set of {result.samples}){subset}; budget "
               f"{result.budget.describe()}; {len(result.steps)} full evaluation(s) chose "
               f"{len(result.layers)} of {len(prof.layers)} quantized layers")
    return KeepList(result.recipe, tuple(result.layers), reasons, summary)


def write_keep_list(keep: KeepList, path: str | Path) -> Path:
    return write_json(path, keep.to_json(), end="\n")


def load_keep_list(path: str | Path) -> KeepList:
    """Read a keep file written by ``--write-keep``; ConfigError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"keep-precision file {path} does not exist; write it with `python -m qatcheck "
                          "sensitivity --recipe <module:callable> --budget-points 0.5 --write-keep "
                          f"{path}`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"keep-precision file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != _KEEP_FORMAT:
        raise ConfigError(f"keep-precision file {path}: 'format' must be {_KEEP_FORMAT!r}")
    layers, reasons = data.get("layers"), data.get("reasons", {})
    if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
        raise ConfigError(f"keep-precision file {path}: 'layers' must be a list of module names")
    if not isinstance(reasons, dict):
        raise ConfigError(f"keep-precision file {path}: 'reasons' must be an object")
    return KeepList(str(data.get("recipe", "")), tuple(layers), {k: str(v) for k, v in reasons.items()},
                    str(data.get("summary", "")), str(path))


