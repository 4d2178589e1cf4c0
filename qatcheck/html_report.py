"""The run's HTML report: one self-contained page per run (``--qatcheck-html``, default
``reports/qatcheck.html``) - the failures first, then per recipe its table, an accuracy-vs-latency
chart with each device's Pareto front, and the primary metric's trend over the last runs.

Every pytest run of a suite writes it, so it is rendered in plain Python - inline SVG built from
strings, no plotting library, no JavaScript: milliseconds for a suite's page. It is read from CI
artifacts and mail attachments, so it fetches nothing: no URL of any kind is referenced, and a
Content-Security-Policy meta tag tells the browser to load nothing should one ever slip in. Case
ids and failure messages come from users' code: every text is escaped.

:func:`render` is pure (record and history lines -> page); :func:`write` reads the history file's
tail and writes the page atomically.
"""
from __future__ import annotations

import html
import math
import os
import re
import textwrap
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from qatcheck import history as history_store
from qatcheck.fsutil import write_text_atomic
from qatcheck.run_record import Failure, RecipeTable, RunRecord

#: the page may load nothing: no script, no font, no remote image or stylesheet (inline styles and
#: data: images only)
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
#: how many runs the trend shows
TREND_RUNS = 20
#: pytest's exit codes (pytest.ExitCode), said in words
EXIT_WORDS = {0: "passed", 1: "tests failed", 2: "interrupted", 3: "internal error", 4: "usage error",
              5: "no tests collected"}
#: matplotlib's tab10: distinct on screen and in print
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
FAIL_COLOR = "#d62728"


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def slug(value: str) -> str:
    """An id attribute / anchor for a user's name (escaped as well where written)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value)


# --- what the charts plot -------------------------------------------------------------------


@dataclass(frozen=True)
class Primary:
    """A recipe's primary metric, as its table shows it."""
    #: its key in the records' ``metrics`` (``top1``, ``map50_95``)
    name: str
    #: its column title (``top-1``)
    label: str
    higher_is_better: bool = True
    #: 100 where the table shows a fraction in percent, else 1 (a plain value)
    scale: float = 1.0

    @property
    def axis(self) -> str:
        return f"{self.label} (%)" if self.scale == 100 else self.label


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def primary_metric(table: RecipeTable) -> Primary | None:
    """The task's primary metric: the records name it (``primary_metric``: its name and
    direction); a table from before they did leads its metric columns with it (the
    column after Calibrator), matched to a metric name. None when no record has a metric."""
    records = [r for r in table.records if isinstance(r, dict)]
    names = list(dict.fromkeys(n for r in records for n in (r.get("metrics") or {})))
    if not names:
        return None
    col = table.header.index("Calibrator") + 1 if "Calibrator" in table.header else 4
    label = table.header[col] if col < len(table.header) else ""
    primary = next((r["primary_metric"] for r in records if isinstance(r.get("primary_metric"), dict)), {})
    named = primary.get("name")
    name = (named if named in names
            else next((n for n in names if n == label or _norm(n) == _norm(label)), names[0]))
    if not label or (name != named and _norm(name) != _norm(label)):
        label = name  # not the column we took it for: the metric's own name
    # direction: as the records say; a table without it is from a task whose metrics all rose
    # with quality (top-k, mAP) - higher is better is assumed
    higher = primary.get("higher_is_better", True) is not False or name != named
    # scale: the table shows a fraction in percent (99.26 for 0.9926), a plain value as it is
    scale = 1.0
    for r, row in zip(records, table.rows):
        v = (r.get("metrics") or {}).get(name)
        try:
            cell = float(row[col])
        except (IndexError, TypeError, ValueError):
            continue
        if isinstance(v, (int, float)) and v != 0:
            scale = 100.0 if abs(cell - v * 100) <= 0.006 and abs(cell - v) > 0.006 else 1.0
            break
    return Primary(name, label, higher, scale)


@dataclass(frozen=True)
class Point:
    """One case on the accuracy-vs-latency chart."""
    case: str
    #: mode / backend / shape, as the table says them
    label: str
    #: the latency fingerprint: latency compares only within one
    device: str
    latency_ms: float
    metric: float
    verdict: str = ""


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def case_label(case: dict) -> str:
    return " ".join(str(case.get(k, "")) for k in ("mode", "backend", "shape") if case.get(k))


def points(table: RecipeTable, primary: Primary) -> list[Point]:
    """The cases with both a p50 latency and the primary metric (a dynamic build's min / max
    shapes are timed without a metric, and most cases of a CPU run are not timed at all)."""
    out = []
    for r in table.records:
        if not isinstance(r, dict):
            continue
        lat = _number((r.get("latency") or {}).get("median_ms"))
        val = _number((r.get("metrics") or {}).get(primary.name))
        if lat is None or val is None or lat <= 0:
            continue
        case = r.get("case") or {}
        out.append(Point(str(case.get("id", "?")), case_label(case),
                         str(r.get("fingerprint_id") or r.get("device") or "unknown device"),
                         lat, val * primary.scale, str(r.get("verdict", ""))))
    return out


def pareto_front(pts: list[Point], higher_is_better: bool = True) -> set[int]:
    """Indexes of the points no other point of the same device dominates: one dominates another
    when it is at least as fast and at least as accurate, and better in one of them. Devices are
    never compared with each other (another device's latency is another machine's)."""
    def at_least(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    front = set()
    for i, p in enumerate(pts):
        if not any(q.device == p.device and q.latency_ms <= p.latency_ms and at_least(q.metric, p.metric)
                   and (q.latency_ms < p.latency_ms or q.metric != p.metric)
                   for j, q in enumerate(pts) if j != i):
            front.add(i)
    return front


# --- SVG ---------------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        out += [m * 10 ** e for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


class _Axis:
    """Maps values to pixels, linear or log (latencies spread over decades: fp16 on PyTorch's CPU
    path is 20x slower than ONNX Runtime's int8)."""

    def __init__(self, values: list[float], lo_px: float, hi_px: float, log: bool = False,
                 pad: float = 0.06):
        lo, hi = min(values), max(values)
        self.log = log and lo > 0 and hi / lo >= 10
        if self.log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-12:  # one value (every case 99.26%): a band around it
            half = abs(lo) * 0.01 or 0.5
            lo, hi = lo - half, hi + half
        span = hi - lo
        self.lo, self.hi = lo - span * pad, hi + span * pad
        self.lo_px, self.hi_px = lo_px, hi_px

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return self.lo_px + (t - self.lo) / (self.hi - self.lo) * (self.hi_px - self.lo_px)

    def ticks(self) -> list[float]:
        if self.log:
            ticks = _log_ticks(10 ** self.lo, 10 ** self.hi)
            return ticks if len(ticks) >= 2 else [10 ** self.lo, 10 ** self.hi]
        return _nice_ticks(self.lo, self.hi)


W, H = 620, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 16, 50


def _frame(x: _Axis, y: _Axis, x_title: str, y_title: str, x_labels: dict[float, str] | None = None) -> list[str]:
    out = [f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" '
           'fill="#fff" stroke="#999"/>']
    for t in x.ticks() if x_labels is None else list(x_labels):
        px = x(t)
        out.append(f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{H - BOTTOM}" stroke="#eee"/>')
        text = _fmt(t) if x_labels is None else x_labels[t]
        out.append(f'<text x="{px:.1f}" y="{H - BOTTOM + 15}" text-anchor="middle" font-size="11">{esc(text)}</text>')
    for t in y.ticks():
        py = y(t)
        out.append(f'<line x1="{LEFT}" y1="{py:.1f}" x2="{W - RIGHT}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end" font-size="11">{esc(_fmt(t))}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 10}" text-anchor="middle" font-size="12">{esc(x_title)}</text>')
    out.append(f'<text transform="translate(16 {(TOP + H - BOTTOM) / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">{esc(y_title)}</text>')
    return out


def _svg(body: list[str], title: str) -> str:
    return (f'<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" '
            f'height="{H}" role="img" aria-label="{esc(title)}">' + "".join(body) + "</svg>")


def devices(pts: list[Point]) -> list[str]:
    return list(dict.fromkeys(p.device for p in pts))


def scatter_svg(pts: list[Point], front: set[int], primary: Primary) -> str:
    """Accuracy vs p50 latency, one point per case numbered as in the key below the chart; each
    device's Pareto front joined by a dashed staircase, its points ringed and named."""
    x = _Axis([p.latency_ms for p in pts], LEFT, W - RIGHT, log=True)
    y = _Axis([p.metric for p in pts], H - BOTTOM, TOP)
    body = _frame(x, y, "p50 latency (ms" + (", log scale)" if x.log else ")"), primary.axis)
    color = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(devices(pts))}
    for dev in color:
        on = sorted((pts[i] for i in front if pts[i].device == dev), key=lambda p: p.latency_ms)
        if len(on) > 1:  # the staircase: what this device can have at each latency
            xy = [(x(on[0].latency_ms), y(on[0].metric))]
            for p in on[1:]:
                xy += [(x(p.latency_ms), xy[-1][1]), (x(p.latency_ms), y(p.metric))]
            body.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in xy)}" fill="none" '
                        f'stroke="{color[dev]}" stroke-width="1.5" stroke-dasharray="5,3"/>')
    for i, p in enumerate(pts):
        px, py = x(p.latency_ms), y(p.metric)
        failed = p.verdict == "FAIL"
        tip = (f"#{i + 1} {p.case} ({p.device}): {p.latency_ms:.4g} ms, {primary.label} {p.metric:.4g}"
               + (", on the Pareto front" if i in front else "") + (f", {p.verdict}" if p.verdict else ""))
        if i in front:
            body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="8" fill="none" stroke="{color[p.device]}" '
                        'stroke-width="1.5"/>')
        body.append(f'<circle class="point" cx="{px:.1f}" cy="{py:.1f}" r="4.5" fill="{color[p.device]}" '
                    f'stroke="{FAIL_COLOR if failed else "#333"}" stroke-width="{2.5 if failed else 0.8}">'
                    f'<title>{esc(tip)}</title></circle>')
    body += _labels(pts, front, x, y)
    return _svg(body, f"{primary.label} vs p50 latency")


def _labels(pts: list[Point], front: set[int], x: _Axis, y: _Axis) -> list[str]:
    """Each point's number (the key's), the front's with their mode / backend / shape. Cases of a
    small model sit on top of each other (same accuracy, close latencies): points within a few
    pixels share one label, and a label moves up or down until it overlaps no other."""
    clusters: list[tuple[float, float, list[int]]] = []
    for i in sorted(range(len(pts)), key=lambda i: (x(pts[i].latency_ms), y(pts[i].metric))):
        px, py = x(pts[i].latency_ms), y(pts[i].metric)
        near = next((c for c in clusters if abs(c[0] - px) < 5 and abs(c[1] - py) < 5), None)
        if near is None:
            clusters.append((px, py, [i]))
        else:
            near[2].append(i)
    placed: list[tuple[float, float, float, float]] = []
    out = []
    for px, py, members in clusters:
        text = ",".join(str(i + 1) for i in members)
        names = [pts[i].label for i in members if i in front]
        if names:
            text += " " + "; ".join(dict.fromkeys(names))
        w, h = 5.6 * len(text), 11.0
        lx = min(px + 8, W - RIGHT - w)
        for dy in (-6, 14, -18, 26, -30, 38, -42, 50, -54):
            ly = py + dy
            box = (lx, ly - h, lx + w, ly)
            if TOP + h <= ly <= H - BOTTOM and not any(
                    box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-size="10" fill="#333">{esc(text)}</text>')
    return out


def trend_svg(runs: list[dict], series: dict[str, list[float | None]], primary: Primary) -> str:
    """The primary metric per series (mode) over the runs, oldest left."""
    values = [v for vs in series.values() for v in vs if v is not None]
    x = _Axis([0.0, float(max(len(runs) - 1, 1))], LEFT, W - RIGHT, pad=0.04)
    y = _Axis(values, H - BOTTOM, TOP)
    step = max(1, math.ceil(len(runs) / 10))  # at most ~10 run labels under the axis
    labels = {float(i): r["label"] for i, r in enumerate(runs) if i % step == 0 or i == len(runs) - 1}
    body = _frame(x, y, "run (oldest left; commit or time)", primary.axis, labels)
    for k, (name, vs) in enumerate(series.items()):
        c = PALETTE[k % len(PALETTE)]
        segment: list[str] = []
        for i, v in enumerate(vs + [None]):
            if v is None:  # a run that did not measure this mode breaks the line
                if len(segment) > 1:
                    body.append(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{c}" stroke-width="1.8"/>')
                segment = []
                continue
            segment.append(f"{x(i):.1f},{y(v):.1f}")
            tip = f"{name}: {primary.label} {v:.4g} in run {runs[i]['run']} ({runs[i]['label']})"
            body.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{c}"><title>{esc(tip)}</title></circle>')
    return _svg(body, f"{primary.label} over the last runs")


# --- the history ---------------------------------------------------------------------------------


def parse_history(lines: Iterable[str]) -> tuple[list[dict], int]:
    """The well-formed lines of the history's tail (the history store's own parser) and how many
    were not: a torn or hand-edited line is skipped, never fatal."""
    parsed = history_store.parse(lines, "history")
    return list(parsed), len(parsed.notes)


def trend(record: RunRecord, table: RecipeTable, primary: Primary, history: list[dict],
          runs: int = TREND_RUNS) -> tuple[list[dict], dict[str, list[float | None]]]:
    """The recipe's last ``runs`` runs (oldest first) and, per mode, its worst case's primary
    metric in each (the lowest where higher is better): a regression of any of the mode's cases
    shows, and a mode is one line however many backends and shapes it runs on."""
    lines = [d for d in history if d["recipe"] == table.name]
    if not any(d["run"] == record.run_id for d in lines):
        # this run's cases, whether the history store wrote before this page, after it, or not at all
        lines += [d for d in history_store.lines(record) if d["recipe"] == table.name]
    when: dict[str, float] = {}
    for d in lines:
        when[d["run"]] = max(when.get(d["run"], 0.0), float(d["time"]))
    order = sorted(when, key=when.get)[-runs:]
    index = {run: i for i, run in enumerate(order)}
    worst = min if primary.higher_is_better else max
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    info: dict[str, dict] = {}
    for d in lines:
        i = index.get(d["run"])
        v = _number(d["metrics"].get(primary.name))
        info.setdefault(d["run"], d)
        if i is not None and v is not None:
            cells[str(d.get("mode") or d.get("case") or "?")][i].append(v * primary.scale)
    table_modes = [str((r.get("case") or {}).get("mode", "")) for r in table.records if isinstance(r, dict)]
    modes = sorted(cells, key=lambda m: (table_modes.index(m) if m in table_modes else len(table_modes), m))
    series = {m: [worst(cells[m][i]) if cells[m].get(i) else None for i in range(len(order))] for m in modes}
    out_runs = []
    for run in order:
        d = info[run]
        commit = str(d.get("commit") or "")
        label = commit[:7] if commit else time.strftime("%m-%d %H:%M", time.gmtime(when[run]))
        out_runs.append({"run": run, "label": label + ("*" if d.get("dirty") else "")})
    return out_runs, series


_RUN = re.compile(rb'"run"\s*:\s*"((?:[^"\\]|\\.)*)"')
_RECIPE = re.compile(rb'"recipe"\s*:\s*"((?:[^"\\]|\\.)*)"')


def history_tail(path: str | Path, recipes: Iterable[str], runs: int = TREND_RUNS,
                 block: int = 1 << 16) -> list[str]:
    """The history file's last lines: read backwards until each recipe's last ``runs`` runs are in
    (or the file's start), so the page costs the same with a year of history behind it."""
    wanted = set(recipes)
    seen: dict[str, set] = {r: set() for r in wanted}
    out: list[str] = []
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        carry = b""
        while pos > 0 and not all(len(s) > runs for s in seen.values()):
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            parts = (f.read(step) + carry).split(b"\n")
            carry = parts.pop(0) if pos > 0 else b""  # maybe the tail of a line that starts earlier
            for raw in reversed(parts):
                if not raw.strip():
                    continue
                out.append(raw.decode("utf-8", errors="replace"))
                # only to know when to stop: the two fields by pattern (a JSON parse of each line
                # is render's, once); a malformed line has neither, parse_history counts it
                run, recipe = _RUN.search(raw), _RECIPE.search(raw)
                if run and recipe and recipe.group(1).decode(errors="replace") in seen:
                    seen[recipe.group(1).decode(errors="replace")].add(run.group(1))
    out.reverse()
    return out


# --- the page ----------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1320px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:14px 0 4px}
dl.run{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:8px 0}
dl.run dt{color:#666} dl.run dd{margin:0}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;margin-right:6px;background:#e8e8e8}
.badge.FAIL,.status-bad{background:#fbd5d5;color:#8a1010}.badge.pass,.status-ok{background:#d8f0d8;color:#145214}
.badge.inconclusive{background:#fff1c2}.badge.improved{background:#d6e9fb}
.failure{border-left:4px solid #d62728;background:#fff6f6;padding:6px 12px;margin:10px 0}
.failure .cause{font-weight:600}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;margin:4px 0}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0} td.l,th.l{text-align:left}
tr.FAIL td{background:#fbd5d5} tr.inconclusive td{background:#fff1c2} tr.improved td{background:#e3f0fc}
.chart{border:1px solid #ddd;background:#fafafa;max-width:100%;height:auto}
.empty{border:1px dashed #bbb;background:#fafafa;padding:24px;color:#555;max-width:700px}
.legend span{margin-right:14px;white-space:nowrap} .legend.devices>span{display:block} .legend.devices span{white-space:normal} .swatch{display:inline-block;width:12px;height:12px;
border-radius:6px;vertical-align:-1px;margin-right:4px}
.muted{color:#666} .figs{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start} .fig{max-width:660px}
"""


def _table_html(table: RecipeTable) -> str:
    left = {h for h in ("Mode", "Shape", "Backend", "Calibrator")}
    head = "".join(f'<th class="{"l" if h in left else ""}">{esc(h)}</th>' for h in table.header)
    body = []
    for i, row in enumerate(table.rows):
        rec = table.records[i] if i < len(table.records) and isinstance(table.records[i], dict) else {}
        verdict = str(rec.get("verdict") or (row[-1] if row else ""))
        case = str((rec.get("case") or {}).get("id", ""))
        cells = "".join(f'<td class="{"l" if j < len(table.header) and table.header[j] in left else ""}">'
                        f'{esc(c)}</td>' for j, c in enumerate(row))
        body.append(f'<tr class="{esc(verdict)}"{f" id=case-{esc(slug(case))}" if case else ""}>{cells}</tr>')
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _failure_html(f: Failure) -> str:
    cause, command = f.cause, f.reproduce
    lines = f.message.splitlines()
    # the rest of the message: what the cause line and the command do not say (the localization
    # table, Polygraphy's verdict, further causes), its line structure kept
    rest = [line for line in lines
            if line.strip() not in ("", cause) and not line.strip().endswith("check failed:")
            and "reproduce outside pytest: " not in line]
    where = f'<a href="#case-{esc(slug(f.case))}">{esc(f.case)}</a>' if f.case else esc(f.nodeid)
    return ('<div class="failure">'
            f'<h3>{where} &middot; {esc(f.check)}</h3>'
            f'<div class="cause">{esc(cause)}</div>'
            + (f'<pre>{esc(textwrap.dedent(chr(10).join(rest)))}</pre>' if rest else "")
            + (f'<div>reproduce outside pytest:</div><pre class="repro"><code>{esc(command)}</code></pre>' if command else "")
            + f'<div class="muted">{esc(f.nodeid)}</div></div>')


def _chart_html(table: RecipeTable, primary: Primary | None) -> str:
    if primary is None:
        return '<div class="empty">No case of this recipe has a metric: there is nothing to chart.</div>'
    pts = points(table, primary)
    if not pts:
        timed = any(isinstance(r, dict) and r.get("latency") for r in table.records)
        why = (f"the timed cases (a dynamic build's min / max shapes) have no {primary.label}" if timed else
               "no case was timed in this run. Latency is measured only where it is judged (a latency "
               "baseline for this device's fingerprint, --update-baselines, a speedup floor); "
               "run with --qatcheck-latency always to time every case")
        return f'<div class="empty no-latency">No accuracy-vs-latency chart: {esc(why)}.</div>'
    front = pareto_front(pts, primary.higher_is_better)
    color = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(devices(pts))}
    names = {}
    for r in table.records:
        if isinstance(r, dict) and r.get("fingerprint_id"):
            fp = r.get("fingerprint") or {}
            names.setdefault(str(r["fingerprint_id"]),
                             f'{r.get("device", "")} - ' + ", ".join(f"{k} {v}" for k, v in fp.items()))
    legend = "".join(f'<span><i class="swatch" style="background:{c}"></i>{esc(d)}'
                     f'{f" <span class=muted>({esc(names[d])})</span>" if d in names else ""}</span>'
                     for d, c in color.items())
    better = "higher" if primary.higher_is_better else "lower"
    key_rows = "".join(
        f'<tr class="{esc(p.verdict)}"><td>{i + 1}</td><td class="l">{esc(p.case)}</td><td class="l">{esc(p.label)}</td>'
        f'<td class="l">{esc(p.device)}</td><td>{p.latency_ms:.4g}</td><td>{p.metric:.4g}</td>'
        f'<td>{"yes" if i in front else ""}</td><td class="l">{esc(p.verdict)}</td></tr>'
        for i, p in enumerate(pts))
    return (f'<h3>{esc(primary.label)} vs p50 latency</h3>' + scatter_svg(pts, front, primary)
            + f'<div class="legend devices">{legend}</div>'
            + f'<p class="muted">Dashed, ringed: each device\'s Pareto front - no case of the same device is '
              f'both faster and {better} in {esc(primary.label)} ({better} is better). Red outline: a failed case. '
              f'Latency compares only within a device fingerprint.</p>'
            + '<details><summary>Points</summary><table class="key"><thead><tr><th>#</th><th class="l">case</th>'
              f'<th class="l">mode backend shape</th><th class="l">device</th><th>p50 ms</th>'
              f'<th>{esc(primary.label)}</th><th>front</th><th class="l">verdict</th></tr></thead>'
              f'<tbody>{key_rows}</tbody></table></details>')


def _trend_html(record: RunRecord, table: RecipeTable, primary: Primary | None, history: list[dict]) -> str:
    if primary is None:
        return ""
    runs, series = trend(record, table, primary, history)
    head = f'<h3>{esc(primary.label)} over the last {len(runs)} run(s)</h3>'
    if len(runs) < 2 or not any(v is not None for vs in series.values() for v in vs):
        return head + ('<div class="empty no-trend">One run so far: the trend needs earlier runs in the '
                       'history (--qatcheck-history).</div>')
    legend = "".join(f'<span><i class="swatch" style="background:{PALETTE[k % len(PALETTE)]}"></i>{esc(m)}</span>'
                     for k, m in enumerate(series))
    return (head + trend_svg(runs, series, primary) + f'<div class="legend">{legend}</div>'
            + '<p class="muted">Per mode, its worst case in each run. * : the tree had uncommitted changes.</p>')


def render(record: RunRecord, history_lines: Iterable[str] = ()) -> str:
    """The page, from the run's record and the history's lines (JSON Lines; malformed ones are
    skipped and counted on the page)."""
    history, malformed = parse_history(history_lines)
    verdicts = Counter(str(r.get("verdict", "-")) for t in record.recipes for r in t.records if isinstance(r, dict))
    order = ("FAIL", "inconclusive", "improved", "pass", "skip")
    badges = "".join(f'<span class="badge {esc(v)}">{esc(v)} {n}</span>'
                     for v, n in sorted(verdicts.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 9, kv[0])))
    status = EXIT_WORDS.get(record.exitstatus, "exit status")
    finished = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.finished))
    commit = (record.commit[:12] + (" (uncommitted changes)" if record.dirty else "")) if record.commit else "(not a git tree)"
    failures = record.failed_cases
    nav = " &middot; ".join(f'<a href="#recipe-{esc(slug(t.name))}">{esc(t.name)}</a>' for t in record.recipes)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>qatcheck: {esc(', '.join(t.name for t in record.recipes) or 'run')} - "
        f"{'FAILED' if record.exitstatus else 'passed'}</title>",
        f"<style>{STYLE}</style></head><body>",
        f'<h1>qatcheck run <span class="badge {"status-bad" if record.exitstatus else "status-ok"}">'
        f"{esc(status)}</span></h1>",
        '<dl class="run">',
        f"<dt>run</dt><dd>{esc(record.run_id)}</dd>",
        f"<dt>commit</dt><dd>{esc(commit)}</dd>",
        f"<dt>finished</dt><dd>{esc(finished)} ({record.finished - record.started:.1f} s)</dd>",
        f"<dt>exit status</dt><dd>{record.exitstatus} ({esc(status)})</dd>",
        f"<dt>cases</dt><dd>{sum(verdicts.values())} {badges}</dd>",
        f"<dt>failed tests</dt><dd>{len(failures)}</dd>",
        f"<dt>recipes</dt><dd>{nav}</dd>",
        "</dl>",
        f'<h2 id="failures">Failures ({len(failures)})</h2>',
        "".join(map(_failure_html, failures)) or "<p>No test failed.</p>",
    ]
    for t in record.recipes:
        primary = primary_metric(t)
        out += [f'<h2 id="recipe-{esc(slug(t.name))}">{esc(t.name)}</h2>', _table_html(t),
                f"<pre class=notes>{esc(t.notes)}</pre>" if t.notes.strip() else "",
                # side by side where the window is wide enough (the points' key folds away)
                f'<div class="figs"><div class="fig">{_chart_html(t, primary)}</div>'
                f'<div class="fig">{_trend_html(record, t, primary, history)}</div></div>']
    if malformed:
        out.append(f'<p class="muted">{malformed} malformed line(s) of the history skipped.</p>')
    out.append(f'<p class="muted">Written by qatcheck from the run record; reports in {esc(record.reports_dir)}.</p>')
    out.append("</body></html>\n")
    return "\n".join(out)


def write(record: RunRecord, path: str | Path, history_path: str | Path | None = None) -> Path:
    """Render the run's page into ``path`` (atomically), with the trend from ``history_path``
    where that file exists."""
    lines: list[str] = []
    if history_path is not None and Path(history_path).is_file():
        lines = history_tail(history_path, [t.name for t in record.recipes])
    write_text_atomic(path, render(record, lines))
    return Path(path)
