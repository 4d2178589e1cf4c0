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


def _md_text(text: str) -> str:
    """A message as Markdown text on one line: what GitHub would read as emphasis, HTML or code
    escaped (a layer name like ``model.*.conv`` shows as written; an underscore inside a word is
    no emphasis there)."""
    for ch in "\\*<`":
        text = text.replace(ch, "\\" + ch)
    return " ".join(text.split())


def _md_detail(line: str) -> str:
    """A failure's extra line (localization, reproduction): a command after its lead-in as code,
    everything else as text."""
    lead, sep, command = line.partition(": ")
    if sep and command.startswith(("polygraphy ", "python ", "sh ")):
        return f"{_md_text(lead)}: `{command}`"
    return _md_text(line)


def failures_markdown(records: list[dict]) -> str:
    """The report's "Failures" section: per failing case and check, its cause (the verdict's first
    failure line; the others follow it, indented) and what the failure message added (where the
    damage enters, the reproduction command); a test that failed without a failing check (an
    error) says so. Empty when nothing failed - a clean report has no such section."""
    items = []
    for r in records:
        case = r.get("case", {}).get("id", "?")
        checks = r.get("checks") or {}
        failing = {name: c for name, c in checks.items() if c.get("status") == "fail" and c.get("failures")}
        for name, c in failing.items():
            first, *rest = c["failures"]
            items.append(f"- **{case}** {name}: {_md_text(first)}")
            items += [f"  - {_md_detail(line)}" for line in [*rest, *c.get("details", [])]]
        # a case whose tests failed with no failing check (an error before the judge): name the
        # tests (a test's name need not say which check it ran, so only where no check failed)
        tests = [] if failing else sorted(t for t, outcome in (r.get("outcomes") or {}).items()
                                          if outcome == "failed")
        items += [f"- **{case}** {t}: failed without a check verdict (an error: see pytest's output)"
                  for t in tests]
    return "\n## Failures\n\n" + "\n".join(items) + "\n" if items else ""


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


#: every report PNG: its resolution, and the most inches it may take either way (about 2,000 px).
#: A figure that grows with the layers or cases must stop there and show the worst ones
#: (:func:`top_rows`): a 16,500 px wide chart is read by nobody.
PNG_DPI = 110
PNG_MAX_INCHES = 18.0


def top_rows(rows: Sequence[Any], limit: int, worst_first: Callable[[Any], Any],
             keep: Callable[[Any], bool] = lambda r: False) -> list[Any]:
    """The rows a capped plot shows: all of them when they are at most ``limit``, else the
    ``limit`` worst by ``worst_first`` (a sort key, worst lowest) plus those ``keep`` names (the
    layer a verdict names), in their original order."""
    if len(rows) <= limit:
        return list(rows)
    chosen = {id(r) for r in sorted(rows, key=worst_first)[:limit]} | {id(r) for r in rows if keep(r)}
    return [r for r in rows if id(r) in chosen]


def shown_of(shown: int, total: int, what: str) -> str:
    """A title's note when a plot shows only some rows: ``top 30 of 300 layers``; "" when all."""
    return f"top {shown} of {total} {what}" if shown < total else ""


def _write_png(path: Path, plot: Callable[[Any], Any]) -> bool:
    """``plot(plt)``'s figure as a PNG at :data:`PNG_DPI` (headless: matplotlib's Agg backend);
    False when it drew nothing. A figure larger than :data:`PNG_MAX_INCHES` either way is shrunk
    to it - a safety net: the plots size themselves within it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(plt)
    if fig is None:
        return False
    try:
        w, h = fig.get_size_inches()
        if max(w, h) > PNG_MAX_INCHES:
            fig.set_size_inches(min(w, PNG_MAX_INCHES), min(h, PNG_MAX_INCHES))
            fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=PNG_DPI, format="png")
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
        # the causes right under the table, before the notes: what a reader opens the report for
        write_text_atomic(md, f"# qatcheck report: {name}\n\n" + markdown_table(header, all_rows) + note
                          + failures_markdown(records + kept) + extra_md)
        write_text_atomic(js, json.dumps({"recipe": name, "run": run.id, "written": time.time(),
                                          "cases": records + kept, **extra_json}, indent=2, default=str) + "\n")
    return md, js, all_rows
