"""The run's verdicts where a pull request's reviewer reads them (issue 24): the GitHub job summary
(Markdown: the outcome, then each failure with its cause and reproduction command, then each
recipe's table) and one GitHub annotation per failure, pinned to the failing test's line.

Reads only the run's :class:`~qatcheck.run_record.RunRecord`. :func:`markdown` and
:func:`annotations` are pure (record -> text); :func:`append` is the one function that writes.
Every run that measured a qatcheck case calls the publisher (our own test suite, ~150 times):
string work only, nothing heavy is imported.
"""
from __future__ import annotations

import collections
import functools
import html
import os
import re
import shlex
from pathlib import Path

from qatcheck.fsutil import locked
from qatcheck.options import Options
from qatcheck.report_files import markdown_table
from qatcheck.run_record import Failure, RunRecord

#: GitHub shows no summary at all for a step whose summary file grew past 1 MiB: what a run
#: appends keeps the whole file under it (the tables are cut, never the failures)
LIMIT_BYTES = 1 << 20
#: room kept for each recipe's "rows left out" line when its table does not fit
_CUT_NOTE_BYTES = 400
#: the table's verdict words, in the order a tally names them
_VERDICT_ORDER = ("FAIL", "inconclusive", "improved", "pass", "skip", "-")


def publishers(options: Options) -> list:
    """The plugin's publisher entries (what, write(record)) for these options."""
    if options.summary_path is None:
        return []
    return [(f"job summary {options.summary_path}", functools.partial(append, options.summary_path))]


# ---- the job summary -----------------------------------------------------------------------------
def markdown(record: RunRecord, limit: int = LIMIT_BYTES) -> str:
    """The run as Markdown, failures first. At most ``limit`` bytes (UTF-8) unless the failures
    alone are longer: they are always written whole, and the tables that do not fit are cut,
    with a line saying how many rows were left out and where the whole table is."""
    failures = record.failed_cases
    lines = [_headline(record, failures), _tally(record), ""]
    if failures:
        lines += ["#### Failures", ""]
        for n, failure in enumerate(failures, 1):
            lines += _failure(n, failure)
    head = "\n".join(lines) + "\n"
    return head + _tables(record, limit - _size(head))


def _headline(record: RunRecord, failures: tuple[Failure, ...]) -> str:
    if failures:
        cases = list(dict.fromkeys(f"{f.case} {f.check}" if f.case else f.nodeid for f in failures))
        shown = ", ".join(cases[:3]) + (f" and {len(cases) - 3} more" if len(cases) > 3 else "")
        return f"### ❌ qatcheck: {len(failures)} failed - {_text(shown)}"
    if record.exitstatus != 0:  # no test failed, yet the run did: a required backend missing,
        # baselines not written, an interrupted run - the job log says which
        return (f"### ❌ qatcheck: the run failed (exit status {record.exitstatus}) with no failed test - "
                "see the job log (a required backend missing, baselines not written?)")
    return "### ✅ qatcheck: all passed"


def _tally(record: RunRecord) -> str:
    """One line: each recipe's case count by verdict, and which run and commit this is."""
    parts = []
    for table in record.recipes:
        counts = collections.Counter(str(r.get("verdict", "-")) for r in table.records)
        words = sorted(counts, key=lambda w: (_VERDICT_ORDER.index(w) if w in _VERDICT_ORDER else 99, w))
        parts.append(f"**{_text(table.name)}**: {len(table.records)} case(s)"
                     + (" (" + ", ".join(f"{counts[w]} {w}" for w in words) + ")" if words else ""))
    where = f"run `{record.run_id}`"
    if record.commit:
        where += f" at `{record.commit[:12]}`" + (" (uncommitted changes)" if record.dirty else "")
    return " · ".join([*parts, where])


def _failure(n: int, failure: Failure) -> list[str]:
    """A failure: which case and check (or which test), its one-line cause, then the command that
    reproduces it (qatcheck's own outside pytest where the message has one, else the test's)."""
    who = f"`{failure.case}` {failure.check}" if failure.case else f"`{failure.nodeid}`"
    command = failure.reproduce or f"pytest {shlex.quote(failure.nodeid)}"
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", command)), default=0))
    return [f"**{n}. {who}** - {_text(failure.cause)}", "", f"{fence}sh", command, fence, ""]


def _tables(record: RunRecord, budget: int) -> str:
    """Each recipe's table and notes while they fit in ``budget`` bytes; then as many rows as fit,
    and a line naming what was left out."""
    out = []
    left = budget - _CUT_NOTE_BYTES * len(record.recipes)  # a cut note always fits
    for table in record.recipes:
        title = f"#### {_text(table.name)}\n\n"
        header, *rows = _split(markdown_table(table.header, table.rows))
        notes = _notes(table.notes)
        whole = title + header + "".join(rows) + notes
        if _size(whole) <= left:
            out.append(whole + "\n")
            left -= _size(whole) + 1
            continue
        kept = []
        room = left - _size(title + header)
        for row in rows:
            if _size(row) > room:
                break
            kept.append(row)
            room -= _size(row)
        where = Path(record.reports_dir) / f"{table.name}.md"
        cut = (f"\n_{len(rows) - len(kept)} of {len(rows)} rows of {_text(table.name)}"
               f"{' and its notes' if notes else ''} left out: "
               f"GitHub shows at most 1 MiB of a step's summary. The whole table: `{where}` "
               "(in the job's reports artifact)._\n\n")
        out.append(title + (header + "".join(kept) if kept else "") + cut)
        left = room if kept else left
    return "".join(out)


def _split(table: str) -> list[str]:
    """A rendered Markdown table as [its two header lines, then one line per row]."""
    lines = table.splitlines(keepends=True)
    return ["".join(lines[:2]), *lines[2:]]


def _notes(notes: str) -> str:
    items = [line.strip() for line in notes.splitlines() if line.strip()]
    return ("\n" + "".join(f"- {_text(item)}\n" for item in items)) if items else ""


def _text(s: str) -> str:
    """Plain text inside Markdown: a ``<`` in a message is not taken for an HTML tag."""
    return html.escape(s, quote=False)


def _size(s: str) -> int:
    return len(s.encode("utf-8"))


def append(path: str | Path, record: RunRecord, limit: int = LIMIT_BYTES) -> None:
    """Append the run's summary to ``path`` (GitHub's ``$GITHUB_STEP_SUMMARY``): appended, never
    replaced, since other commands of the step write there too; under a lock on the file itself,
    so two runs appending at once each land whole. The limit counts what the file already holds."""
    path = Path(path)
    with locked(path):  # opens (creates) the file for appending: never truncates it
        held = path.stat().st_size
        text = markdown(record, limit - held)
        with open(path, "a", encoding="utf-8") as f:
            f.write(("\n" if held else "") + text)


# ---- annotations -----------------------------------------------------------------------------------
def escape_data(s: str) -> str:
    """A workflow command's message, escaped as GitHub's runner unescapes it."""
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(s: str) -> str:
    """A workflow command's property value (file, title): a ``:`` or ``,`` would end it."""
    return escape_data(s).replace(":", "%3A").replace(",", "%2C")


def annotations(record: RunRecord, root: str | Path | None = None, workspace: str | Path | None = None) -> list[str]:
    """One ``::error`` workflow command per failure, in table order: GitHub shows it on the test's
    line in the pull request's diff and in the checks list. A failure's location is relative to
    pytest's rootdir (``root``); GitHub wants it relative to the checkout (``workspace``,
    $GITHUB_WORKSPACE), so it is rebased there when both are given."""
    lines = []
    for failure in record.failed_cases:
        props = []
        if failure.location:
            path, line = failure.location
            props += [f"file={escape_property(_rebased(path, root, workspace))}", f"line={int(line)}"]
        title = f"{failure.case} {failure.check}" if failure.case else failure.nodeid
        props.append(f"title={escape_property(title)}")
        message = failure.cause + (f"\nreproduce: {failure.reproduce}" if failure.reproduce else "")
        lines.append(f"::error {','.join(props)}::{escape_data(message)}")
    return lines


def _rebased(path: str, root, workspace) -> str:
    if root is None or not workspace:
        return path
    where = Path(os.path.normpath(Path(root) / path))
    try:
        return where.relative_to(Path(os.path.normpath(workspace))).as_posix()
    except ValueError:  # outside the checkout: GitHub cannot place it on a diff either way
        return str(where)
