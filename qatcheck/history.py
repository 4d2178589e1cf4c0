"""The run history: every run appends one JSON line per case to ``<reports>/history.jsonl``, and
``python -m qatcheck history`` / ``compare`` read it back.

Why: each run is judged against its baseline alone, so a metric that slips 0.1 point per merge,
each step inside its tolerance (and each merge recording its figures), is never red. The history
keeps every run's figures so a *drift* - the same case moving the same bad way run after run,
further in total than its tolerance - is visible, and two runs (before / after a change, two GPUs)
can be compared case by case.

A line (the shared format; the HTML report reads it too; fields may be added, never removed)::

    {"run", "time" (epoch, run end), "commit", "dirty", "recipe", "case", "mode", "backend",
     "shape", "device" (fingerprint id), "metrics" {name: float, null when not finite},
     "primary", "tolerance_points" (null for a metric that is not a fraction), "latency_ms" (p50),
     "parity_cosine", "verdict", "checks" {check: status},
     "higher_is_better", "fraction", "tolerance_rel" (a plain-value primary metric's relative
     tolerance), "latency_tolerance_rel"}

The file is append-only: a run adds its lines in one write, under a lock, and never rewrites a
line; a reader skips (and names) a line that a crash tore, rather than failing.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from time import localtime, strftime
from typing import Iterable, Sequence

from qatcheck.errors import ConfigError
from qatcheck.fsutil import locked
from qatcheck.run_record import RunRecord

#: the fields a line must have to be read (the rest default)
REQUIRED = {"run": str, "time": (int, float), "recipe": str, "case": str, "metrics": dict, "checks": dict}
#: a check status that did not pass
FAILED = ("fail", "failed")
#: the fewest runs a drift is judged over: two steps the same way
MIN_RUNS = 3
EPS = 1e-9


# -- the store ---------------------------------------------------------------------------------

def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def case_line(rec: dict, *, run: str, time: float, commit: str, dirty: bool, recipe: str) -> dict:
    """One case record (a report JSON's, a RecipeTable's) as a history line."""
    case = rec.get("case") or {}
    primary = rec.get("primary_metric") or {}
    metrics = {str(k): _finite(v) for k, v in (rec.get("metrics") or {}).items()}
    # a report written before the record carried its primary metric: the task's first metric
    name = primary.get("name") or next(iter(metrics), "")
    fraction = bool(primary.get("fraction", True))
    tol = _finite(primary.get("tolerance"))
    latency = rec.get("latency") or {}
    parity = rec.get("parity") or {}
    return {"run": run, "time": float(time), "commit": commit, "dirty": bool(dirty),
            "recipe": case.get("recipe") or recipe, "case": case.get("id", ""), "mode": case.get("mode", ""),
            "backend": case.get("backend", ""), "shape": case.get("shape", ""),
            "device": rec.get("fingerprint_id") or "", "metrics": metrics, "primary": name,
            "tolerance_points": tol if fraction else None,
            "latency_ms": _finite(latency.get("median_ms")), "parity_cosine": _finite(parity.get("cosine")),
            "verdict": rec.get("verdict") or "-",
            "checks": {k: (v.get("status") if isinstance(v, dict) else v) for k, v in (rec.get("checks") or {}).items()},
            "higher_is_better": primary.get("higher_is_better"), "fraction": fraction,
            "tolerance_rel": None if fraction else tol,
            "latency_tolerance_rel": _finite(rec.get("latency_tolerance_rel"))}


def lines(record: RunRecord) -> list[dict]:
    """The run's history lines: one per case of each recipe's table, in table order."""
    return [case_line(rec, run=record.run_id, time=record.finished, commit=record.commit, dirty=record.dirty,
                      recipe=table.name)
            for table in record.recipes for rec in table.records]


def append(record: RunRecord, path: str | Path) -> Path:
    """Append the run's lines to ``path`` (made, with its directory, when missing).

    One ``os.write`` of all the run's lines on an ``O_APPEND`` descriptor, under a lock on a
    sibling file: two runs ending at once (CI shards, xdist controllers of two jobs) never
    interleave their lines, and a reader never sees half a run unless a crash tore it. A file
    whose last line was torn gets a newline first, so the torn fragment cannot swallow a good line."""
    path = Path(path)
    data = "".join(json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n"
                   for line in lines(record)).encode("utf-8")
    if not data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent / f".{path.name}.lock"):
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            written = os.write(fd, data)
        finally:
            os.close(fd)
    if written != len(data):  # the disk filled: the torn tail is skipped by read(), named there
        raise OSError(f"wrote {written} of {len(data)} bytes to {path} (disk full?)")
    return path


class Lines(list):
    """A history's lines, in file order, and a note for each line that was skipped."""

    def __init__(self, items: Iterable[dict] = (), notes: Sequence[str] = ()) -> None:
        super().__init__(items)
        self.notes = list(notes)


def _problem(line) -> str:
    if not isinstance(line, dict):
        return f"not a JSON object ({type(line).__name__})"
    for name, kind in REQUIRED.items():
        if not isinstance(line.get(name), kind):
            return f"field {name!r} missing or not a {getattr(kind, '__name__', 'number')}"
    return ""


def parse(raw_lines: Iterable[bytes | str], source: str) -> Lines:
    """The well-formed lines of a history's text (a file's, or the HTML report's tail of one); a
    torn or malformed line is skipped and named (``source`` and its line number) in ``.notes``."""
    out = Lines()
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            problem = "not JSON (a write torn by a crash?)"
        else:
            problem = _problem(line)
        if problem:
            out.notes.append(f"{source}:{n}: skipped: {problem}")
        else:
            out.append(line)
    return out


def read(path: str | Path) -> Lines:
    """The history at ``path`` (:func:`parse`); a missing file is an error a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no history at {path}: every qatcheck run appends its cases to "
                          "<reports>/history.jsonl (--qatcheck-history sets where; --history here)")
    with open(path, "rb") as f:
        return parse(f, str(path))


# -- runs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    id: str
    time: float
    commit: str
    dirty: bool
    lines: tuple[dict, ...]

    @property
    def label(self) -> str:
        """Short: the commit's first 7 digits (``+`` when its tree had changes), else the run id's
        last part."""
        if self.commit:
            return self.commit[:7] + ("+" if self.dirty else "")
        return self.id.rsplit(":", 1)[-1]

    def describe(self) -> str:
        when = strftime("%Y-%m-%d %H:%M", localtime(self.time))
        return f"{self.id} ({self.commit[:7] or 'no commit'}, {when}, {len(self.lines)} case(s))"


def runs(history: Iterable[dict]) -> list[Run]:
    """The runs of a history, in the order they were appended (grouped by run id)."""
    groups: dict[str, list[dict]] = {}
    for line in history:
        groups.setdefault(line["run"], []).append(line)
    return [Run(rid, max(float(l["time"]) for l in ls), ls[-1].get("commit") or "", bool(ls[-1].get("dirty")),
                tuple(ls)) for rid, ls in groups.items()]


def find_run(all_runs: Sequence[Run], spec: str, source: str) -> Run:
    """A run by ``-1`` (the last), ``-2`` (the one before)..., its id, or a unique prefix or part
    of its id."""
    def known() -> str:
        last = all_runs[-5:]
        return (f"; its last {len(last)} run(s), newest last: " + ", ".join(r.describe() for r in last)
                if last else "; it holds no run")
    if spec.startswith("-") and spec[1:].isdigit():
        n = int(spec[1:])
        if 1 <= n <= len(all_runs):
            return all_runs[-n]
        raise ConfigError(f"run {spec}: {source} holds {len(all_runs)} run(s){known()}")
    for match in (lambda r: r.id == spec, lambda r: r.id.startswith(spec), lambda r: spec in r.id):
        found = [r for r in all_runs if match(r)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ConfigError(f"run {spec!r} is ambiguous in {source}: it matches "
                              + ", ".join(r.id for r in found[:5]) + (" ..." if len(found) > 5 else ""))
    raise ConfigError(f"no run {spec!r} in {source}{known()}")


def select(history: Sequence[dict], recipe: str | None = None, case: str | None = None,
           source: str = "the history") -> list[dict]:
    """The lines of one recipe and of the cases matching a glob (``*fp32*``); an unknown recipe, or
    a glob matching nothing, is an error naming what there is."""
    out = list(history)
    if recipe:
        names = sorted({l["recipe"] for l in out})
        out = [l for l in out if l["recipe"] == recipe]
        if not out:
            raise ConfigError(f"no runs of recipe {recipe!r} in {source}; recipes there: {', '.join(names) or 'none'}")
    if case:
        ids = sorted({l["case"] for l in out})
        out = [l for l in out if fnmatch.fnmatchcase(l["case"], case)]
        if not out:
            raise ConfigError(f"no case matches {case!r} in {source}; cases there: {', '.join(ids[:12])}"
                              + (" ..." if len(ids) > 12 else ""))
    return out


def by_case(history: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    """(recipe, case) -> its lines, oldest first."""
    out: dict[tuple[str, str], list[dict]] = {}
    for line in history:
        out.setdefault((line["recipe"], line["case"]), []).append(line)
    return out


# -- drift -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Drift:
    """A case whose figure moved the same way over its last runs, further in total than its
    tolerance, while every one of those runs passed the check that judges it."""
    recipe: str
    case: str
    #: the primary metric's name, or "p50 latency"
    metric: str
    #: the figures, oldest first (a fraction metric in [0, 1]; latency in ms)
    values: tuple[float, ...]
    #: the total change, signed, in ``unit``; and the tolerance it exceeds, in the same unit
    change: float
    tolerance: float
    unit: str
    runs: tuple[str, ...]
    #: the runs' short labels (commit, else run id's tail)
    labels: tuple[str, ...]
    #: latency: the device fingerprint it was timed on
    device: str = ""
    fraction: bool = True

    def _fmt(self, v: float) -> str:
        if self.metric == "p50 latency":
            return f"{v:.3f} ms"
        return f"{v * 100:.2f}%" if self.fraction else f"{v:.4g}"

    @property
    def message(self) -> str:
        moved = "rose" if self.change > 0 else "fell"
        on = f" on device {self.device}" if self.device else ""
        return (f"drift: {self.recipe} {self.case}: {self.metric} {moved} {abs(self.change):.2f} {self.unit} over "
                f"{len(self.values)} runs{on} ({self._fmt(self.values[0])} -> {self._fmt(self.values[-1])}), "
                f"beyond its tolerance of {self.tolerance:.2f} {self.unit}, though each run passed; runs "
                + " -> ".join(self.labels) + f" ({self.runs[0]} .. {self.runs[-1]})")


def _passed(line: dict, check: str) -> bool:
    status = line.get("checks", {}).get(check)
    return status not in FAILED if status is not None else line.get("verdict") != "FAIL"


def _monotone(values: Sequence[float]) -> int:
    """+1 (never down, at least once up), -1 (never up, at least once down), 0 otherwise."""
    steps = [b - a for a, b in zip(values, values[1:])]
    if all(s >= -EPS for s in steps) and any(s > EPS for s in steps):
        return 1
    if all(s <= EPS for s in steps) and any(s < -EPS for s in steps):
        return -1
    return 0


def _metric_drift(ls: list[dict], window: int) -> Drift | None:
    last = ls[-1]
    name = last.get("primary") or ""
    tail: list[dict] = []
    for line in reversed(ls):  # the latest runs that measured the metric, without a gap
        if len(tail) == window or line.get("metrics", {}).get(name) is None or line.get("primary") != name:
            break
        tail.insert(0, line)
    values = [float(l["metrics"][name]) for l in tail]
    if len(values) < MIN_RUNS or not all(_passed(l, "accuracy") for l in tail):
        return None
    direction = _monotone(values)
    worse = {True: -1, False: 1}.get(last.get("higher_is_better"))  # None: either way
    if direction == 0 or (worse is not None and direction != worse):
        return None
    if _finite(last.get("tolerance_points")) is not None:
        change, tol, unit, fraction = (values[-1] - values[0]) * 100, float(last["tolerance_points"]), "points", True
    elif _finite(last.get("tolerance_rel")) is not None and values[0]:
        change = (values[-1] - values[0]) / abs(values[0]) * 100
        tol, unit, fraction = float(last["tolerance_rel"]) * 100, "%", False
    else:
        return None  # no tolerance to weigh the change against
    if abs(change) <= tol + EPS:
        return None
    return Drift(last["recipe"], last["case"], name, tuple(values), change, tol, unit,
                 tuple(l["run"] for l in tail), _labels(tail), fraction=fraction)


def _latency_drift(ls: list[dict], window: int) -> Drift | None:
    timed = [l for l in ls if _finite(l.get("latency_ms")) is not None]
    if not timed:
        return None
    device = timed[-1].get("device", "")
    tail = [l for l in timed if l.get("device", "") == device][-window:]  # one device's runs only
    values = [float(l["latency_ms"]) for l in tail]
    tol = _finite(tail[-1].get("latency_tolerance_rel"))
    if (len(values) < MIN_RUNS or tol is None or _monotone(values) != 1
            or not all(_passed(l, "latency") for l in tail)):
        return None
    change = (values[-1] / values[0] - 1) * 100
    if change <= tol * 100 + EPS:
        return None
    return Drift(tail[-1]["recipe"], tail[-1]["case"], "p50 latency", tuple(values), change, tol * 100, "%",
                 tuple(l["run"] for l in tail), _labels(tail), device=device)


def drifts(history: Iterable[dict], window: int = 6) -> list[Drift]:
    """Each case's drift over its last ``window`` runs (at least 3): its primary metric moved
    monotonically - in its worse direction where the line says which is worse, else either way -
    by more than its tolerance in total, each of those runs passing its accuracy check; and its
    p50 latency on the device it was last timed on rose monotonically by more than the latency
    tolerance, each run passing its latency check. Pure: the CLI and the HTML report call it."""
    if window < MIN_RUNS:
        raise ConfigError(f"a drift is judged over at least {MIN_RUNS} runs (two steps the same way); got {window}")
    out = []
    for ls in by_case(history).values():
        out += [d for d in (_metric_drift(ls, window), _latency_drift(ls, window)) if d is not None]
    return out


def _labels(ls: Sequence[dict]) -> tuple[str, ...]:
    return tuple(Run(l["run"], l["time"], l.get("commit") or "", bool(l.get("dirty")), ()).label for l in ls)


# -- the history table and chart ---------------------------------------------------------------

def _value_text(line: dict, name: str) -> str:
    v = line.get("metrics", {}).get(name)
    if v is None:
        return "-"
    return f"{v * 100:.2f}" if line.get("fraction", True) else f"{v:.4g}"


def history_table(history: Sequence[dict], window: int) -> tuple[list[str], list[list[str]]]:
    """One row per case (its primary metric; and p50 ms where it was timed), a column per run of
    the last ``window`` runs holding any of the cases. A latency timed on another device than the
    case's latest is marked ``*``."""
    shown = runs(history)[-window:]
    labels = [r.label for r in shown]
    labels = [f"{lab} ({i + 1})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    header = ["Recipe", "Case", "Figure", *labels]
    rows = []
    for (recipe, case), ls in by_case(l for r in shown for l in r.lines).items():
        at = {l["run"]: l for l in ls}
        name = ls[-1].get("primary", "")
        unit = " (%)" if ls[-1].get("fraction", True) else ""
        rows.append([recipe, case, name + unit, *(_value_text(at[r.id], name) if r.id in at else "" for r in shown)])
        timed = [l for l in ls if l.get("latency_ms") is not None]
        if timed:
            device = timed[-1].get("device")
            rows.append([recipe, case, "p50 ms", *(
                "" if r.id not in at or at[r.id].get("latency_ms") is None else
                f"{at[r.id]['latency_ms']:.3f}" + ("*" if at[r.id].get("device") != device else "")
                for r in shown)])
    return header, rows


def plot(history: Sequence[dict], window: int, path: str | Path) -> Path | None:
    """The primary metric and p50 latency of each case over the last ``window`` runs, x labelled
    by short commit (PNG; None when there is nothing to draw)."""
    from qatcheck.report_files import write_bundle

    shown = runs(history)[-window:]
    index = {r.id: i for i, r in enumerate(shown)}
    cases = by_case(l for r in shown for l in r.lines)

    def draw(plt):
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(7, 1.1 * len(shown)), 7), sharex=True)
        for (recipe, case), ls in cases.items():
            name = ls[-1].get("primary", "")
            pts = [(index[l["run"]], l["metrics"][name] * (100 if l.get("fraction", True) else 1))
                   for l in ls if l.get("metrics", {}).get(name) is not None]
            if pts:
                a1.plot(*zip(*pts), marker="o", label=f"{case} ({name})")
            devices = dict.fromkeys(l.get("device", "") for l in ls if l.get("latency_ms") is not None)
            for device in devices:
                pts = [(index[l["run"]], l["latency_ms"]) for l in ls
                       if l.get("latency_ms") is not None and l.get("device", "") == device]
                a2.plot(*zip(*pts), marker="o", label=case + (f" [{device[:8]}]" if len(devices) > 1 else ""))
        a1.set_ylabel("primary metric (% for fractions)")
        a1.set_title("qatcheck history")
        a1.legend(fontsize=7)
        a2.set_ylabel("p50 latency (ms)")
        if a2.lines:
            a2.legend(fontsize=7)
        a2.set_xticks(range(len(shown)), [r.label for r in shown], rotation=45, ha="right", fontsize=8)
        fig.tight_layout()
        return fig

    if not cases:
        return None
    stem = Path(path)
    written = write_bundle(stem.parent / stem.stem if stem.suffix == ".png" else stem, plot=draw, order=("png",))
    return written[0] if written else None


# -- comparing two runs ------------------------------------------------------------------------

def report_lines(path: Path) -> list[dict]:
    """A report JSON (``reports/<recipe>.json``) as history lines; [] for a JSON that is not one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read report {path}: {exc}") from exc
    if not (isinstance(doc, dict) and isinstance(doc.get("recipe"), str) and isinstance(doc.get("cases"), list)):
        return []
    return [case_line(rec, run=rec.get("run") or doc.get("run") or str(path), time=doc.get("written") or 0.0,
                      commit="", dirty=False, recipe=doc["recipe"])
            for rec in doc["cases"] if isinstance(rec, dict)]


def load_side(spec: str, history_path: str | Path) -> tuple[str, list[dict]]:
    """(label, lines) of one side of a comparison: a report directory or report JSON file, else a
    run of the history (see :func:`find_run`; then the lines carry the history's ``notes``)."""
    p = Path(spec)
    if p.is_dir():
        found = [l for f in sorted(p.glob("*.json")) for l in report_lines(f)]
        if not found:
            raise ConfigError(f"no qatcheck report in {p} (reports/<recipe>.json files)")
        return str(p), found
    if p.is_file() and p.suffix == ".json":
        found = report_lines(p)
        if not found:
            raise ConfigError(f"{p} is not a qatcheck report (no 'recipe' and 'cases')")
        return str(p), found
    if spec.endswith(".json") or os.sep in spec:
        raise ConfigError(f"no report directory or file {spec!r}")
    history = read(history_path)
    run = find_run(runs(history), spec, str(history_path))
    return run.id + (f" ({run.commit[:7]})" if run.commit else ""), Lines(run.lines, history.notes)


@dataclass(frozen=True)
class CaseDelta:
    recipe: str
    case: str
    old: dict
    new: dict

    @property
    def metric(self) -> str:
        return self.new.get("primary") or self.old.get("primary") or ""

    @property
    def fraction(self) -> bool:
        return bool(self.new.get("fraction", True))

    @property
    def delta(self) -> float | None:
        """new - old of the primary metric: points for a fraction, else the value's unit."""
        a, b = self.old.get("metrics", {}).get(self.metric), self.new.get("metrics", {}).get(self.metric)
        if a is None or b is None:
            return None
        return (b - a) * (100 if self.fraction else 1)

    @property
    def same_device(self) -> bool:
        return self.old.get("device", "") == self.new.get("device", "")

    @property
    def latency_ratio(self) -> float | None:
        a, b = self.old.get("latency_ms"), self.new.get("latency_ms")
        return b / a if a and b and self.same_device else None

    @property
    def cosine_delta(self) -> float | None:
        a, b = self.old.get("parity_cosine"), self.new.get("parity_cosine")
        return None if a is None or b is None else b - a


@dataclass(frozen=True)
class Comparison:
    a: str
    b: str
    cases: tuple[CaseDelta, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]


def compare(a: Sequence[dict], b: Sequence[dict], a_label: str = "A", b_label: str = "B") -> Comparison:
    """Case by case, ``b`` against ``a`` (matched on recipe and case id), and the cases in one only."""
    old = {(l["recipe"], l["case"]): l for l in a}
    new = {(l["recipe"], l["case"]): l for l in b}
    both = [k for k in old if k in new]
    return Comparison(a_label, b_label, tuple(CaseDelta(*k, old[k], new[k]) for k in both),
                      tuple(f"{r} {c}" for r, c in old if (r, c) not in new),
                      tuple(f"{r} {c}" for r, c in new if (r, c) not in old))


COMPARE_HEADER = ["Recipe", "Case", "Metric", "A -> B", "Δ", "p50 ms A -> B", "Ratio", "Cosine Δ", "Verdict"]


def comparison_table(cmp: Comparison) -> tuple[list[str], list[list[str]]]:
    rows = []
    for d in cmp.cases:
        name = d.metric
        va, vb = _value_text(d.old, name), _value_text(d.new, name)
        delta = "-" if d.delta is None else f"{d.delta:+.2f} pt" if d.fraction else f"{d.delta:+.4g}"
        la, lb = d.old.get("latency_ms"), d.new.get("latency_ms")
        if la is None or lb is None:
            lat, ratio = "-", "-"
        elif not d.same_device:
            lat, ratio = "different device", "-"
        else:
            lat, ratio = f"{la:.3f} -> {lb:.3f}", f"{d.latency_ratio:.2f}x"
        cos = "-" if d.cosine_delta is None else f"{d.cosine_delta:+.5f}"
        verdict = d.old.get("verdict", "-"), d.new.get("verdict", "-")
        rows.append([d.recipe, d.case, name + (" (%)" if d.fraction else ""), f"{va} -> {vb}", delta, lat, ratio,
                     cos, verdict[1] if verdict[0] == verdict[1] else f"{verdict[0]} -> {verdict[1]}"])
    return list(COMPARE_HEADER), rows


def comparison_notes(cmp: Comparison) -> list[str]:
    """The cases only one side holds."""
    return ([f"only in A ({cmp.a}): {', '.join(cmp.only_a)}"] if cmp.only_a else []) + \
           ([f"only in B ({cmp.b}): {', '.join(cmp.only_b)}"] if cmp.only_b else [])
