"""A recipe's report files (``reports/<recipe>.md`` and ``.json``), written atomically under a lock
and merged with the rows of any run that overlapped this one; and the one writer of the analyses'
report bundles (:func:`write_bundle`: JSON, Markdown, PNG).

Two runs of one recipe at once (two CI shards on one machine, ``-k fp32`` beside ``-k trt_ptq``)
each used to replace the other's report: the last one to finish won and the other's rows were
gone. Now the report is the union of the runs that overlapped in time: a report file written
after this run started comes from a run that was going on meanwhile, and its rows for cases this
run did not measure are kept (marked, with that run's id). A report written before this run
started is an earlier run's, and is replaced whole - a report never mixes in stale rows.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from qatcheck.fsutil import atomic_path, locked, write_text_atomic


@dataclass(frozen=True)
class Run:
    """This pytest run: who wrote a report row, and when."""
    started: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{time.strftime('%H%M%S')}")


def _concurrent_rows(path: Path, run: Run, measured: set[str]) -> list[dict]:
    """The rows of ``path`` that a run overlapping this one wrote for cases this run did not measure."""
    try:
        doc = json.loads(path.read_text())
        written = float(doc.get("written", 0.0))
        cases = list(doc["cases"])
    except (OSError, ValueError, KeyError, TypeError):  # absent, or not a report: nothing to keep
        return []
    if written < run.started:
        return []  # an earlier run's report: replaced whole
    return [c for c in cases if isinstance(c, dict) and c.get("case", {}).get("id") not in measured
            and c.get("row")]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (a '|' inside a cell is escaped); every report's tables use it."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + "|".join("---" for _ in header) + "|", *map(line, rows)]) + "\n"


def write_json(path: str | Path, doc: Any, *, indent: int = 1, default: Callable | None = None,
               end: str = "") -> Path:
    """``doc`` as JSON in ``path``, written atomically (whole or not at all)."""
    write_text_atomic(path, json.dumps(doc, indent=indent, default=default) + end)
    return Path(path)


def write_bundle(stem: str | Path, *, json_doc: Any = None, markdown: str | None = None,
                 plot: Callable[[Any], Any] | None = None, order: Sequence[str] = ("json", "md", "png"),
                 indent: int = 1, default: Callable | None = None, json_end: str = "") -> list[Path]:
    """An analysis report (localization, sensitivity, PTQ cross-check): ``<stem>.json``
    (``json_doc``, see :func:`write_json`), ``<stem>.md`` (``markdown``) and ``<stem>.png``
    (``plot(plt)`` draws with matplotlib's pyplot and returns the figure, or None for no picture),
    each written atomically, the directory made when missing. Returns the files written, in
    ``order``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for kind in order:
        path = stem.parent / f"{stem.name}.{kind}"
        if kind == "json" and json_doc is not None:
            written[kind] = write_json(path, json_doc, indent=indent, default=default, end=json_end)
        elif kind == "md" and markdown is not None:
            write_text_atomic(path, markdown)
            written[kind] = path
        elif kind == "png" and plot is not None and _write_png(path, plot):
            written[kind] = path
    return list(written.values())


def _write_png(path: Path, plot: Callable[[Any], Any]) -> bool:
    """``plot(plt)``'s figure as a PNG at 110 dpi (headless: matplotlib's Agg backend); False
    when it drew nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(plt)
    if fig is None:
        return False
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return True


def write(reports: Path, name: str, header: list[str], rows: list[list[str]], records: list[dict],
          extra_md: str, extra_json: dict, run: Run) -> tuple[Path, Path, list[list[str]]]:
    """Write the recipe's Markdown and JSON report; returns their paths and every row they hold
    (this run's, then those kept from an overlapping run). Raises OSError when it cannot write."""
    md, js = reports / f"{name}.md", reports / f"{name}.json"
    records = [{**r, "row": row, "run": run.id} for r, row in zip(records, rows)]
    with locked(reports / f".{name}.lock"):
        kept = _concurrent_rows(js, run, {r["case"]["id"] for r in records})
        all_rows = rows + [r["row"] for r in kept]
        note = ""
        if kept:
            runs = sorted({r.get("run", "?") for r in kept})
            note = (f"\n{len(kept)} row(s) from another run that overlapped this one ({', '.join(runs)}), "
                    f"kept: {', '.join(r['case']['id'] for r in kept)}\n")
        write_text_atomic(md, f"# qatcheck report: {name}\n\n" + markdown_table(header, all_rows) + note + extra_md)
        write_text_atomic(js, json.dumps({"recipe": name, "run": run.id, "written": time.time(),
                                          "cases": records + kept, **extra_json}, indent=2, default=str) + "\n")
    return md, js, all_rows
