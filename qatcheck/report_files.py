"""A recipe's report files (``reports/<recipe>.md`` and ``.json``), written atomically under a lock
and merged with the rows of any run that overlapped this one.

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
from qatcheck.fsutil import locked, write_text_atomic


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
