"""The baseline store: human-readable JSON under ``baselines/``, one file per recipe.

Layout (stable key order, so a baseline update is a small, reviewable diff)::

    {"qatcheck_baseline": 1, "recipe": "digits",
     "eval_data": {"fingerprint": "3f2a...", "samples": 540,               # what the metrics were measured on:
                   "inputs": "9c1d...", "targets": "07be..."},             #   its inputs, its targets apart
     "outputs": {"logits": [10]},                                          # each output's per-sample shape
     "cases": {"torch_ptq-onnxruntime": {
        "settings": {"torch_calibrator": "mse", "calib_batches": 8,         # what shaped the artifact
                     "qat": {"epochs": 2, ...}, "calib_data": "5e5a...", ...},
        "metrics": {"top1": {"value": 0.9815, "tolerance": 0.5}},          # tolerance in points
        "values": {"landmarks.l2": {"value": 0.031, "tolerance": 0.05}},   # not a fraction: relative
        "parity":  {"cosine": {"value": 0.99993, "tolerance": 0.0005}, ...},
        "structure": {"qdq_pairs": {"value": 14, "tolerance": 0}, "layer1.conv1:input.scale": {...}},
        "latency": {"<fingerprint id>": {"device": "...", "median_ms": {"value": 0.41, "tolerance": 0.15},
                                         "spread": {"ci_rel": 0.01, "cv": 0.03, "samples": 200,
                                                    "probe_ms": 0.52, "probe_ci_rel": 0.004},
                                         "artifact": "9c41..."}}}}}     # what was timed (qatcheck.reference_store)

Updates are staged during the session and written at its end, atomically per file, merged into
what is there: entries the run did not measure are kept, a hand-set tolerance is kept. A file that
does not parse or validate is reported by name and field and never rewritten. ``inputs``,
``targets`` and ``settings`` are optional: a file recorded before them is judged without them.
"""
from __future__ import annotations

import copy
import fcntl
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatcheck.errors import BaselineError
from qatcheck.fsutil import write_text_atomic

SCHEMA = 1
#: metrics: fractions in [0, 1] (tolerance in points); values: any other metric (a regression
#: error; tolerance relative to the value)
SECTIONS = ("metrics", "values", "parity", "structure", "latency")


@dataclass(frozen=True)
class Update:
    """One measured value to store. ``fingerprint`` is set for latency (its device key)."""

    case: str
    section: str
    name: str
    value: float
    tolerance: float
    fingerprint: str | None = None
    device: str | None = None
    #: latency: the measurement's dispersion, stored beside the median as ``spread``
    spread: tuple[tuple[str, float], ...] = ()
    #: latency: the digest of the artifact that was timed, kept in qatcheck.reference_store
    artifact: str = ""


@dataclass(frozen=True)
class Change:
    case: str
    section: str
    name: str
    old: Any
    new: Any  # a number; a setting's JSON value for ``settings``

    def describe(self) -> str:
        where = f"{self.case} {self.section}.{self.name}"
        if self.old is None and self.section != "settings":  # a setting may have been null
            return f"  + {where} = {_shown(self.new)}"
        return f"  ~ {where}: {_shown(self.old)} -> {_shown(self.new)}"


def _shown(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.6g}"
    return v if isinstance(v, str) else json.dumps(v)


def empty(recipe: str) -> dict[str, Any]:
    return {"qatcheck_baseline": SCHEMA, "recipe": recipe, "cases": {}}


def _fail(path: Path, where: str, what: str) -> BaselineError:
    return BaselineError(f"baseline file {path}: {where} {what}; fix it by hand or delete the "
                         "entry and re-record it with --update-baselines")


def _bounds(section: str, name: str) -> tuple[float, float] | None:
    """The range a stored value must lie in: metrics are fractions (their tolerance is in points
    of them), a cosine similarity is a cosine, an agreement is a fraction."""
    if section == "metrics" or (section == "parity" and name.endswith("agreement")):
        return (0.0, 1.0)
    if section == "parity" and name == "cosine":
        return (-1.0, 1.0)
    return None


def _check_value(path: Path, where: str, entry: Any, bounds: tuple[float, float] | None = None) -> None:
    if not isinstance(entry, dict):
        raise _fail(path, where, f"must be an object with 'value' and 'tolerance', got {entry!r}")
    for key in ("value", "tolerance"):
        v = entry.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(path, f"{where}.{key}", f"must be a finite number, got {v!r}")
    if entry["tolerance"] < 0:
        raise _fail(path, f"{where}.tolerance", f"must be >= 0, got {entry['tolerance']!r}")
    if bounds is not None and not bounds[0] <= entry["value"] <= bounds[1]:
        raise _fail(path, f"{where}.value", f"must lie in [{bounds[0]:g}, {bounds[1]:g}], got {entry['value']!r}")


def _check_spread(path: Path, where: str, spread: Any) -> None:
    if not isinstance(spread, dict):
        raise _fail(path, where, f"must be an object of numbers, got {spread!r}")
    for key, v in spread.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise _fail(path, f"{where}.{key}", f"must be a finite number >= 0, got {v!r}")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


def _check_settings(path: Path, where: str, settings: Any) -> None:
    """A case's ``settings``: name -> a string, number, true / false, null, a list of those, or an
    object of those (a settings dataclass, field by field)."""
    if not isinstance(settings, dict):
        raise _fail(path, where, f"must be an object of setting names to values, got {settings!r}")
    for name, value in settings.items():
        items = value.values() if isinstance(value, dict) else [value]
        if not all(_scalar(v) or (isinstance(v, list) and all(map(_scalar, v))) for v in items):
            raise _fail(path, f"{where}.{name}", "must be a string, a finite number, true / false, null, a list "
                        f"of those or an object of those, got {value!r}")


def validate(data: Any, path: Path, recipe: str) -> dict[str, Any]:
    """Check a parsed baseline document; raise one BaselineError naming the first bad field."""
    if not isinstance(data, dict):
        raise _fail(path, "top level", "must be a JSON object")
    if data.get("qatcheck_baseline") != SCHEMA:
        raise _fail(path, "'qatcheck_baseline'", f"must be {SCHEMA}, got {data.get('qatcheck_baseline')!r}")
    if data.get("recipe") != recipe:
        raise _fail(path, "'recipe'", f"must be {recipe!r}, got {data.get('recipe')!r}")
    if "eval_data" in data:
        ev = data["eval_data"]
        if not isinstance(ev, dict) or not isinstance(ev.get("fingerprint"), str):
            raise _fail(path, "'eval_data'", f"must be an object with a 'fingerprint' string, got {ev!r}")
        for key in ("inputs", "targets"):
            if key in ev and not isinstance(ev[key], str):
                raise _fail(path, f"'eval_data'.{key}", f"must be a string (a digest), got {ev[key]!r}")
    if "outputs" in data:
        outs = data["outputs"]
        if not isinstance(outs, dict) or not all(
                isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v)
                for v in outs.values()):
            raise _fail(path, "'outputs'", f"must map output names to per-sample shapes (lists of ints), got {outs!r}")
    cases = data.get("cases")
    if not isinstance(cases, dict):
        raise _fail(path, "'cases'", "must be an object")
    for case, sections in cases.items():
        if not isinstance(sections, dict):
            raise _fail(path, f"cases[{case!r}]", "must be an object")
        for section, entries in sections.items():
            where = f"cases[{case!r}].{section}"
            if section == "settings":
                _check_settings(path, where, entries)
                continue
            if section not in SECTIONS:
                raise _fail(path, where, f"is not one of {', '.join(SECTIONS)}")
            if not isinstance(entries, dict):
                raise _fail(path, where, "must be an object")
            for name, entry in entries.items():
                if section != "latency":
                    _check_value(path, f"{where}.{name}", entry, _bounds(section, name))
                    continue
                if not isinstance(entry, dict):
                    raise _fail(path, f"{where}.{name}", "must be an object")
                for stat, value in entry.items():
                    if stat == "spread":
                        _check_spread(path, f"{where}.{name}.spread", value)
                    elif stat in ("device", "artifact"):
                        if not isinstance(value, str):
                            raise _fail(path, f"{where}.{name}.{stat}", f"must be a string, got {value!r}")
                    else:
                        _check_value(path, f"{where}.{name}.{stat}", value)
    return data


def load(path: Path, recipe: str) -> dict[str, Any]:
    """Read a baseline file (an absent file is an empty store)."""
    if not path.exists():
        return empty(recipe)
    return parse(path.read_bytes(), path, recipe)


def parse(raw: bytes, path: Path | str, recipe: str | None = None) -> dict[str, Any]:
    """A baseline document from its bytes - a file's, or a git blob's (``path`` then names the
    revision and file: ``HEAD~1:baselines/digits.json``), parsed and validated. ``recipe`` None:
    the recipe the document names itself (a file read on its own, whatever its file name)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BaselineError(f"baseline file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "save it as UTF-8 or restore it from version control") from exc
    except json.JSONDecodeError as exc:
        raise BaselineError(f"baseline file {path} is not valid JSON (line {exc.lineno}, column "
                            f"{exc.colno}: {exc.msg}); fix it or restore it from version control") from exc
    if recipe is None:
        named = data.get("recipe") if isinstance(data, dict) else None
        if not isinstance(named, str):
            raise _fail(Path(path), "'recipe'", f"must be the recipe's name, got {named!r}")
        recipe = named
    return validate(data, Path(path), recipe)


def tolerance_unit(section: str, name: str) -> str:
    """What a stored entry's tolerance is measured in, as the judges read it: ``points`` of a
    fraction (``metrics``: 0.5 is half a percentage point), ``relative`` to the stored value
    (``values``, structure scales, latency statistics), or ``absolute`` (parity; the structure's
    counts - channels, zero points, Q/DQ pairs - whose tolerance is 0: any change fails)."""
    if section == "metrics":
        return "points"
    if section in ("values", "latency") or (section == "structure" and ".scale" in name):
        return "relative"
    return "absolute"


def lookup(data: dict[str, Any], case: str, section: str, name: str,
           fingerprint: str | None = None) -> dict[str, Any] | None:
    entries = data["cases"].get(case, {}).get(section, {})
    if fingerprint is None:
        return entries.get(name)
    return entries.get(fingerprint, {}).get(name)


def merge(data: dict[str, Any], updates: list[Update],
          settings: dict[str, dict[str, Any]] | None = None) -> tuple[dict[str, Any], list[Change]]:
    """Apply ``updates`` to a copy of ``data``, and replace the ``settings`` of each case given
    (``case -> settings``). Untouched entries stay; an existing tolerance wins over the recipe
    default (it may have been tuned by hand). Returns the new document and what changed (values
    equal to the stored ones, and settings a case did not have before, are not reported)."""
    out = copy.deepcopy(data)
    changes: list[Change] = []
    for case, new in sorted((settings or {}).items()):
        entry = out["cases"].setdefault(case, {})
        old = entry.get("settings") or {}
        entry["settings"] = copy.deepcopy(new)
        changes += [Change(case, "settings", k, old[k], v) for k, v in new.items() if k in old and old[k] != v]
    # a structure is recorded whole: a quantizer that is gone must not linger in the baseline
    for case in {u.case for u in updates if u.section == "structure"}:
        out["cases"].setdefault(case, {})["structure"] = {}
    for u in updates:
        section = out["cases"].setdefault(u.case, {}).setdefault(u.section, {})
        if u.fingerprint is not None:
            section = section.setdefault(u.fingerprint, {})
            if u.device:
                section["device"] = u.device
        old = section.get(u.name)
        if u.section == "structure":  # the cleared section: compare with what was there before
            old = data["cases"].get(u.case, {}).get("structure", {}).get(u.name)
        tolerance = old["tolerance"] if isinstance(old, dict) and "tolerance" in old else u.tolerance
        old_value = old.get("value") if isinstance(old, dict) else None
        # equal to the precision a change is shown with: kept as it was (no listed "1 -> 1", no diff)
        value = old_value if _same(old_value, u.value) else u.value
        section[u.name] = {"tolerance": tolerance, "value": value}
        if u.spread:
            section["spread"] = dict(u.spread)
        if u.section == "latency":  # an artifact no longer kept must not be named as the reference
            section.pop("artifact", None)
            if u.artifact:
                section["artifact"] = u.artifact
        if value != old_value:
            changes.append(Change(u.case, u.section, u.name, old_value, u.value))
    return out, changes


def _same(old: Any, new: float) -> bool:
    if not isinstance(old, (int, float)) or isinstance(old, bool):
        return False
    return old == new or f"{old:.6g}" == f"{new:.6g}"


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


class BaselineStore:
    """All recipes' baselines under one directory; loads lazily, writes at session end."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._data: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, list[Update]] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._settings: dict[str, dict[str, dict[str, Any]]] = {}

    def path(self, recipe: str) -> Path:
        return self.root / f"{recipe}.json"

    def data(self, recipe: str) -> dict[str, Any]:
        if recipe not in self._data:
            self._data[recipe] = load(self.path(recipe), recipe)
        return self._data[recipe]

    def get(self, recipe: str, case: str, section: str, name: str,
            fingerprint: str | None = None) -> dict[str, Any] | None:
        return lookup(self.data(recipe), case, section, name, fingerprint)

    def stage(self, recipe: str, update: Update) -> None:
        self.data(recipe)  # a malformed file fails now, before anything is measured into it
        self._pending.setdefault(recipe, []).append(update)

    def stage_meta(self, recipe: str, key: str, value: Any) -> None:
        """A top-level field written with the recipe's staged values (``eval_data``)."""
        self.data(recipe)
        self._meta.setdefault(recipe, {})[key] = value

    def stage_settings(self, recipe: str, case: str, settings: dict[str, Any] | None) -> None:
        """The settings a case's staged values were measured with (None: keep the stored ones)."""
        staged = self._settings.setdefault(recipe, {})
        if settings is None:
            staged.pop(case, None)
        else:
            staged[case] = settings

    def commit(self) -> dict[Path, list[Change]]:
        """Write every recipe with staged updates; returns the changes per file. Read, merge and
        replace happen under a lock on the directory, so two runs recording at once both land."""
        if not self._pending:
            return {}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY)  # the directory itself is the lock: no lock file in it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                return self._commit()
            finally:
                os.close(fd)
        except OSError as exc:
            where = exc.filename or self.root
            raise BaselineError(f"cannot write {where}: {exc.strerror or exc}; it was left as it was "
                                "(make the directory writable, or point --qatcheck-baselines elsewhere)") from exc

    def _commit(self) -> dict[Path, list[Change]]:
        written: dict[Path, list[Change]] = {}
        for recipe, updates in sorted(self._pending.items()):
            path = self.path(recipe)
            current = load(path, recipe)  # re-read: another process may have updated it meanwhile
            new, changes = merge(current, updates, self._settings.get(recipe))
            new.update(self._meta.get(recipe, {}))
            # what we write must load again: a NaN measurement is refused here, not stored
            try:
                validate(new, path, recipe)
            except BaselineError as exc:
                raise BaselineError(f"refusing to update {path}: a measured value is invalid ({exc}); "
                                    "the file is left as it was") from exc
            if new != current:
                write_text_atomic(path, dumps(new))
            self._data[recipe] = new
            written[path] = changes
        self._pending.clear()
        self._meta.clear()
        self._settings.clear()
        return written
