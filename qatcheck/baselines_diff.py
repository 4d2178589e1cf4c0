"""What moved between two versions of the baselines, in the units each entry is judged in.

A baseline update is reviewed as a raw JSON diff, which says that a number changed but not whether
the change matters: ``0.0212 -> 0.0228`` is a scale 7.5% up, 1.5 times its ±5% tolerance.
:func:`diff_recipe` compares two loaded, validated documents of one recipe (``qatcheck.baselines``
parses them: this module never reads a file) and returns frozen records; :func:`table_rows`,
:func:`summary_lines` and :func:`markdown` render them. ``python -m qatcheck baselines diff`` is
the front (it reads files, directories and git revisions).

Every move is given twice: in the unit its tolerance is stated in (points of a fraction for
``metrics``; relative to the stored value for ``values``, structure scales and latency; absolute
for parity and the structure's counts - :func:`qatcheck.baselines.tolerance_unit`) and in
*tolerance units*, the move divided by the old entry's tolerance: beyond 1, a run measuring the new
value would have failed (or been *improved*) against the old baseline. A count whose tolerance is
0 (Q/DQ pairs, channels) that changed, and a quantizer added or removed, are infinitely many
tolerance units: the structure check fails on them whatever the tolerance. Within a recipe the
largest moves come first.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

from qatcheck.baselines import SECTIONS, tolerance_unit
from qatcheck.report_files import markdown_table

#: recipe-level fields that say what the values were measured on
META = ("eval_data", "outputs")

Doc = Mapping[str, Any]


@dataclass(frozen=True)
class EntryChange:
    """One entry that differs. ``kind``: ``moved`` (its value changed), ``tolerance`` (only its
    tolerance did), ``added`` / ``removed`` (in one version only; in ``structure`` a whole
    quantizer, ``name`` being the quantizer). ``section`` is a case section, ``settings``, or a
    recipe-level field (``eval_data``, ``outputs``: ``case`` is then empty)."""

    case: str
    section: str
    name: str                      # metric / parity name, quantizer, latency statistic, setting
    kind: str
    old: Any = None                # a number; a setting's JSON value; a quantizer's description
    new: Any = None
    field: str = ""                # structure: the quantizer's field (scale, scale_min, channels...)
    tolerance: float | None = None  # the old entry's (an added one's own)
    new_tolerance: float | None = None
    unit: str = ""                 # what the tolerance is measured in: points / relative / absolute
    change: float | None = None    # the move in that unit
    units: float | None = None     # change / tolerance, signed; inf: a move no tolerance allows
    fingerprint: str = ""          # latency: the device fingerprint the entry is stored under
    device: str = ""

    @property
    def numeric(self) -> bool:
        """A value entry (rendered in the table), not a setting or recipe-level field."""
        return self.section in SECTIONS


@dataclass(frozen=True)
class RecipeDiff:
    """One recipe's two versions. ``status``: ``added`` / ``removed`` (in one version only),
    ``changed``, ``unchanged``. ``unchanged`` counts the value entries equal in both."""

    recipe: str
    status: str
    changes: tuple[EntryChange, ...] = ()
    cases_added: tuple[str, ...] = ()
    cases_removed: tuple[str, ...] = ()
    unchanged: int = 0
    cases: int = 0                 # cases of the new version (of the old one when removed)

    @property
    def changed(self) -> bool:
        return self.status != "unchanged"

    @property
    def beyond(self) -> int:
        """Moves larger than their tolerance."""
        return sum(c.units is not None and abs(c.units) > 1 for c in self.changes)


# ---- comparing ---------------------------------------------------------------------------------

def diff_stores(old: Mapping[str, Doc], new: Mapping[str, Doc]) -> list[RecipeDiff]:
    """Every recipe of either store (recipe name -> document), by name."""
    return [diff_recipe(name, old.get(name), new.get(name)) for name in sorted({*old, *new})]


def diff_recipe(recipe: str, old: Doc | None, new: Doc | None) -> RecipeDiff:
    """Two versions of one recipe's baseline document (None: absent in that version)."""
    if old is None or new is None:
        doc = new if old is None else old
        return RecipeDiff(recipe, "added" if old is None else "removed", cases=len(doc["cases"]))
    changes: list[EntryChange] = []
    for key in META:
        changes += _meta(key, old.get(key), new.get(key))
    unchanged = 0
    common = [c for c in new["cases"] if c in old["cases"]]
    for case in common:
        moved, same = _case(case, old["cases"][case], new["cases"][case])
        changes += moved
        unchanged += same
    added = tuple(sorted(c for c in new["cases"] if c not in old["cases"]))
    removed = tuple(sorted(c for c in old["cases"] if c not in new["cases"]))
    status = "changed" if changes or added or removed else "unchanged"
    return RecipeDiff(recipe, status, tuple(sorted(changes, key=_rank)), added, removed, unchanged,
                      cases=len(new["cases"]))


def _rank(c: EntryChange) -> tuple:
    """Largest move in tolerance units first; entries in one version only after the moves."""
    size = -abs(c.units) if c.units is not None else math.inf
    return (size, c.case, c.section, c.name, c.field)


def _case(case: str, old: Doc, new: Doc) -> tuple[list[EntryChange], int]:
    """A case present in both versions: its changes, and how many value entries are equal."""
    changes = _settings(case, old.get("settings") or {}, new.get("settings") or {})
    same = 0
    for section in SECTIONS:
        a, b = old.get(section) or {}, new.get(section) or {}
        if section == "latency":
            moved, n = _latency(case, a, b)
        elif section == "structure":
            moved, n = _structure(case, a, b)
        else:
            moved, n = _entries(case, section, a, b)
        changes += moved
        same += n
    return changes, same


def _entries(case: str, section: str, old: Doc, new: Doc, **where: str) -> tuple[list[EntryChange], int]:
    """Entries of one section (``name -> {"value", "tolerance"}``) keyed alike in both versions.
    ``where``: what names an entry besides its key (latency: its fingerprint and device)."""
    out, same = [], 0
    for key in sorted(k for k in {*old, *new} if _is_value(old.get(k)) or _is_value(new.get(k))):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            entry = a if b is None else b
            out.append(_named(case, section, key, "removed" if b is None else "added",
                              old=a["value"] if a else None, new=b["value"] if b else None,
                              tolerance=entry["tolerance"], unit=tolerance_unit(section, key), **where))
        elif a == b:
            same += 1
        else:
            out.append(_move(case, section, key, a, b, **where))
    return out, same


def _is_value(entry: Any) -> bool:
    """A ``{"value", "tolerance"}`` entry (not latency's ``device``, ``spread`` or ``artifact``)."""
    return isinstance(entry, dict) and "value" in entry


def _named(case: str, section: str, key: str, kind: str, **fields: Any) -> EntryChange:
    """A structure key ``<quantizer>.<field>`` is named by its quantizer, the field apart."""
    if section == "structure" and key != "qdq_pairs":
        quantizer, _, field = key.rpartition(".")
        return EntryChange(case, section, quantizer, kind, field=field, **fields)
    return EntryChange(case, section, key, kind, **fields)


def _move(case: str, section: str, key: str, a: Doc, b: Doc, **where: str) -> EntryChange:
    unit = tolerance_unit(section, key)
    tol = a["tolerance"]
    if a["value"] == b["value"]:
        return _named(case, section, key, "tolerance", old=a["value"], new=b["value"], tolerance=tol,
                      new_tolerance=b["tolerance"], unit=unit, **where)
    change = _change(unit, a["value"], b["value"])
    units = change / tol if tol else math.copysign(math.inf, change)
    return _named(case, section, key, "moved", old=a["value"], new=b["value"], tolerance=tol,
                  new_tolerance=b["tolerance"], unit=unit, change=change, units=units, **where)


def _change(unit: str, old: float, new: float) -> float:
    """``new - old`` in the unit the tolerance is stated in (a move off 0 is infinitely relative)."""
    if unit == "points":
        return (new - old) * 100
    if unit == "relative":
        return (new - old) / abs(old) if old else math.copysign(math.inf, new - old)
    return new - old


def _structure(case: str, old: Doc, new: Doc) -> tuple[list[EntryChange], int]:
    """By quantizer: one record for a quantizer added or removed (with its scale), field-level
    moves for those in both, the Q/DQ pair count apart."""
    from qatcheck.quantize.structure import from_entries  # the one reader of the flat entries

    if old == new:
        return [], len(old)
    qa, qb = from_entries(_values(old)).quantizers, from_entries(_values(new)).quantizers
    out = [EntryChange(case, "structure", q, "removed", old=qa[q].describe(), units=math.inf)
           for q in qa if q not in qb]
    out += [EntryChange(case, "structure", q, "added", new=qb[q].describe(), units=math.inf)
            for q in qb if q not in qa]
    # field by field only where the quantizer is in both: the others are in the records above
    both = qa.keys() & qb.keys()
    old, new = ({k: v for k, v in doc.items() if k == "qdq_pairs" or k.rpartition(".")[0] in both}
                for doc in (old, new))
    moved, same = _entries(case, "structure", old, new)
    return out + moved, same


def _values(entries: Doc) -> dict[str, float]:
    return {k: v["value"] for k, v in entries.items()}


def _latency(case: str, old: Doc, new: Doc) -> tuple[list[EntryChange], int]:
    """Per device fingerprint: a device only one version has lists its statistics as added or
    removed (a baseline from another machine is never compared: neither is it here)."""
    out, same = [], 0
    for fp in sorted({*old, *new}):
        a, b = old.get(fp) or {}, new.get(fp) or {}
        moved, n = _entries(case, "latency", a, b, fingerprint=fp, device=str(b.get("device") or a.get("device") or ""))
        out += moved
        same += n
    return out, same


def _settings(case: str, old: Doc, new: Doc) -> list[EntryChange]:
    """The settings that shaped the artifact (a settings object is compared field by field), so a
    reviewer sees *why* the values moved - the calibrator, the keep list - beside the moves."""
    out = []
    for name in sorted({*old, *new}):
        a, b = old.get(name), new.get(name)
        if name in old and name in new and isinstance(a, dict) and isinstance(b, dict):
            out += [EntryChange(case, "settings", f"{name}.{k}", _kind(k in a, k in b), old=a.get(k), new=b.get(k))
                    for k in sorted({*a, *b}) if a.get(k) != b.get(k) or (k in a) != (k in b)]
        elif a != b or (name in old) != (name in new):
            out.append(EntryChange(case, "settings", name, _kind(name in old, name in new), old=a, new=b))
    return out


def _meta(key: str, old: Any, new: Any) -> list[EntryChange]:
    """``eval_data`` (what the metrics were measured on) and ``outputs`` (their shapes), field by field."""
    a, b = old or {}, new or {}
    return [EntryChange("", key, k, _kind(k in a, k in b), old=a.get(k), new=b.get(k))
            for k in sorted({*a, *b}) if a.get(k) != b.get(k) or (k in a) != (k in b)]


def _kind(in_old: bool, in_new: bool) -> str:
    return "moved" if in_old and in_new else "added" if in_new else "removed"


# ---- rendering ---------------------------------------------------------------------------------

HEADER = ("case", "entry", "old", "new", "change", "× tolerance")


def _num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.6g}"
    return v if isinstance(v, str) else json.dumps(v)


def _entry_name(c: EntryChange) -> str:
    if c.section == "structure":
        if c.name == "qdq_pairs":
            return "Q/DQ pairs"
        return f"quantizer {c.name}" + (f" {c.field}" if c.field else "")
    if c.section == "latency":
        return f"latency.{c.name} on {c.device or c.fingerprint}"
    return f"{c.section}.{c.name}"


def _change_text(c: EntryChange) -> str:
    if c.kind in ("added", "removed"):
        return c.kind
    if c.kind == "tolerance":
        return f"tolerance {c.tolerance:g} → {c.new_tolerance:g}"
    if c.unit == "points":
        text = f"{c.change:+.3g} pt"
    elif c.unit == "relative":
        text = f"{c.change * 100:+.3g}%" if math.isfinite(c.change) else "from 0"
    else:
        text = f"{c.change:+.3g}"
    if c.new_tolerance is not None and c.new_tolerance != c.tolerance:
        text += f" (tolerance {c.tolerance:g} → {c.new_tolerance:g})"
    return text


def _units_text(c: EntryChange) -> str:
    if c.units is None:
        return ""
    if math.isinf(c.units):
        return "∞ (exact)" if c.kind == "moved" else "∞"
    return f"{c.units:+.2f}"


def table_rows(diff: RecipeDiff) -> tuple[tuple[str, ...], list[list[str]]]:
    """The moved value entries of one recipe, largest move in tolerance units first."""
    rows = [[c.case, _entry_name(c), _num(c.old), _num(c.new), _change_text(c), _units_text(c)]
            for c in diff.changes if c.numeric]
    return HEADER, rows


def summary_lines(diff: RecipeDiff) -> list[str]:
    """What a table does not show: the recipe's counts, cases added or removed, and the settings
    and eval data that changed (each distinct change once, with the cases it applies to)."""
    if diff.status in ("added", "removed"):
        return [f"{diff.recipe}: recipe {diff.status} ({diff.cases} case{'s' * (diff.cases != 1)})"]
    moved = [c for c in diff.changes if c.numeric]
    head = (f"{diff.recipe}: {len(moved)} entr{'y' if len(moved) == 1 else 'ies'} changed "
            f"({diff.beyond} beyond their tolerance), {diff.unchanged} unchanged")
    if diff.cases_added or diff.cases_removed:
        head += f"; {len(diff.cases_added)} case(s) added, {len(diff.cases_removed)} removed"
    lines = [head]
    for what, cases in (("cases added", diff.cases_added), ("cases removed", diff.cases_removed)):
        if cases:
            lines.append(f"  {what}: {', '.join(cases)}")
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for c in diff.changes:
        if not c.numeric:
            grouped.setdefault((c.section, c.name, _setting_change(c)), []).append(c.case)
    for (section, name, what), cases in grouped.items():
        where = f" ({_listed(cases)})" if any(cases) else ""
        lines.append(f"  {section.replace('_', ' ')}: {name} {what}{where}")
    return lines


def _setting_change(c: EntryChange) -> str:
    def shown(v: Any) -> str:  # a setting may be null: shown as such, not as absent
        return v if isinstance(v, str) else json.dumps(v)
    if c.kind == "added":
        return f"added = {shown(c.new)}"
    if c.kind == "removed":
        return f"removed (was {shown(c.old)})"
    return f"{shown(c.old)} → {shown(c.new)}"


def _listed(cases: list[str], most: int = 4) -> str:
    """A setting changed in every case of a recipe names a few of them, not forty."""
    if len(cases) <= most:
        return ", ".join(cases)
    return f"{', '.join(cases[:most - 1])} and {len(cases) - most + 1} more cases"


def markdown(diffs: list[RecipeDiff], old: str, new: str) -> str:
    """For a pull request's description: a heading per changed recipe, its summary, its table."""
    changed = [d for d in diffs if d.changed]
    out = [f"### Baselines: {old} → {new}", ""]
    if not changed:
        out.append(f"No baseline changed ({len(diffs)} recipe(s) compared).")
    for d in changed:
        head, *rest = summary_lines(d)
        out += [f"#### {d.recipe}", "", _capital(head.removeprefix(f"{d.recipe}: ")), ""]
        out += [f"- {line.strip()}" for line in rest] + ([""] if rest else [])
        header, rows = table_rows(d)
        if rows:
            out += [markdown_table(list(header), rows)]
    same = [d.recipe for d in diffs if not d.changed]
    if same and changed:
        out.append(f"Unchanged: {', '.join(same)}.")
    return "\n".join(out).rstrip() + "\n"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def to_json(diffs: list[RecipeDiff], old: str, new: str) -> str:
    """The records as JSON (an infinite move, one no tolerance allows, is the string "inf")."""
    from dataclasses import asdict

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps({"old": old, "new": new, "recipes": [clean(asdict(d)) for d in diffs]}, indent=1) + "\n"
