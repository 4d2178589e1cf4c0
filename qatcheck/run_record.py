"""What one pytest run measured and concluded, as plain data: the record the run's publishers (the
CI job summary, the history store, the HTML report) read.

Built once, by the process that ends the run - pytest-xdist's controller from its workers' parts,
or the only process - so each publisher writes once per run however many workers measured it, and
a publisher never reaches into a live session: it reads tables and records that the reports
already hold (one source per number).
"""
from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: the line pytest-xdist puts before a worker's failure text
_XDIST_WORKER = re.compile(r"\[gw\d+\] \S+ -- Python ")

@dataclass(frozen=True)
class Failure:
    """A failed test of the run, as pytest reported it."""
    nodeid: str
    #: the case's id (``digits-trt_ptq-onnxruntime``); "" for a test without a qatcheck case
    case: str
    #: the check (accuracy, parity, ...) or, for another test, its function's name
    check: str
    #: the failure text as pytest printed it: cause lines, localization, reproduction command
    message: str
    #: where the test is: (path relative to pytest's rootdir, 1-based line of its function), as
    #: pytest's report says; None where unknown (a record written before it was kept)
    location: tuple[str, int] | None = None

    @property
    def cause(self) -> str:
        """The first line that says why: a check's failure reads "<case> <check> check failed:"
        and then its causes, one a line; another test's traceback, its first ``E`` line (the
        exception), not the source line it starts with. pytest-xdist puts a line naming the worker
        first ("[gw0] linux -- Python 3.11.7 ..."): never the cause."""
        lines = [line.strip() for line in self.message.splitlines()
                 if line.strip() and not _XDIST_WORKER.match(line)]
        if lines and lines[0].endswith("check failed:") and len(lines) > 1:
            return lines[1]
        raised = [line[1:].strip() for line in self.message.splitlines() if line.startswith("E ")]
        return raised[0] if raised else lines[0] if lines else "(no message)"

    @property
    def reproduce(self) -> str:
        """The command that reproduces the failure outside pytest, where its message gives one."""
        for line in self.message.splitlines():
            _, sep, command = line.partition("reproduce outside pytest: ")
            if sep:
                return command.strip()
        return ""


@dataclass(frozen=True)
class RecipeTable:
    """A recipe's comparison table as the report files hold it."""
    name: str
    header: list[str]
    rows: list[list[str]]
    #: the report JSON's case records (each with its table ``row``), in table order
    records: list[dict]
    #: the notes printed under the table
    notes: str = ""


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    started: float
    finished: float
    #: the git commit of the suite's root ("" outside git), and whether its tree had changes
    commit: str
    dirty: bool
    exitstatus: int
    reports_dir: str
    recipes: tuple[RecipeTable, ...] = ()
    failures: tuple[Failure, ...] = field(default=())

    @property
    def failed_cases(self) -> tuple[Failure, ...]:
        """Failures first, the qatcheck cases' in table order, then any other test's."""
        order = {r["case"]["id"]: i for t in self.recipes for i, r in enumerate(t.records)}
        return tuple(sorted(self.failures, key=lambda f: (f.case not in order, order.get(f.case, 0), f.nodeid)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "RunRecord":
        return cls(**{**doc, "recipes": tuple(RecipeTable(**t) for t in doc.get("recipes", ())),
                      "failures": tuple(Failure(**{**f, "location": tuple(f["location"]) if f.get("location") else None})
                                        for f in doc.get("failures", ()))})


def run_id() -> str:
    """This run's id: host, process and start (as ``report_files.Run`` names a run), and four
    random hex digits: the history groups a run's lines by its id, and two runs in one process
    (pytester's in-process runs) may start within the same second."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the git work tree holding ``root``; ("", False) outside one or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "", False


def record(run_id: str, started: float, exitstatus: int, reports_dir: Path, root: Path,
           tables: list[RecipeTable], failures: list[Failure]) -> RunRecord:
    commit, dirty = git_state(root)
    return RunRecord(run_id=run_id, started=started, finished=time.time(), commit=commit, dirty=dirty,
                     exitstatus=int(exitstatus), reports_dir=str(reports_dir),
                     recipes=tuple(sorted(tables, key=lambda t: t.name)), failures=tuple(failures))
