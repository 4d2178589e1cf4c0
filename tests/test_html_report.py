"""The run's HTML report (qatcheck/html_report.py): written on every run, nothing fetched, every
text escaped, the failures and every recipe on it; its Pareto front, its "not timed" chart and a
detector's metric; and, where Debian's ``chromium`` is installed, the page as a real headless
browser renders it, with the network watched.

How "nothing is fetched" is shown: Chromium runs with every host name mapped to NOTFOUND (a
request cannot leave the machine) and writes its NetLog; a request the page made carries the page
as its initiator there (Chromium's own background requests - its clock, the component updater -
say "not an origin"). A planted page with a remote image and stylesheet shows up in that log;
the same plants inside the real page are blocked by its Content-Security-Policy, which Chromium
says on its console; the real page alone requests nothing.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from qatcheck import html_report
from qatcheck.run_record import Failure, RecipeTable, RunRecord
from test_plugin import write_suite, run as run_suite

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium or chromium-browser on PATH (Debian: apt-get install -y chromium); "
                             "CI does not install it - the static checks of the page still run")

ROOT = Path(__file__).resolve().parents[1]
PLANTS = ('<link rel="stylesheet" href="https://example.com/remote.css">'
          '<img src="https://example.com/x.png" alt="planted">')


# --- synthetic records -----------------------------------------------------------------------

HEADER = ["Mode", "Shape", "Backend", "Calibrator", "{label}", "Δ fp32 (pt)", "Δ baseline (pt)", "p50 ms",
          "Speedup", "Parity (cos / agree)", "Measured", "Verdict"]


def case_record(mode, backend, metrics, latency_ms=None, device="dev-a", verdict="pass", shape="",
                recipe="toy", **extra) -> dict:
    cid = f"{recipe}-{mode}{'_' + shape if shape else ''}-{backend}"
    return {"case": {"recipe": recipe, "mode": mode, "backend": backend, "shape": shape, "id": cid,
                     "key": cid.split("-", 1)[1]},
            "metrics": metrics, "latency": {"median_ms": latency_ms} if latency_ms is not None else None,
            "fingerprint_id": device, "device": "CPUExecutionProvider", "fingerprint": {"cpu": "test"},
            "verdict": verdict, **extra}


def table_of(name, label, records, primary_cell) -> RecipeTable:
    rows = [[r["case"]["mode"], r["case"]["shape"] or "1x3x8x8", r["case"]["backend"], "-", primary_cell(r),
             "-", "-", "-" if not r["latency"] else f'{r["latency"]["median_ms"]:.3f}', "-", "-", "0.1s",
             r["verdict"]] for r in records]
    return RecipeTable(name, [h.format(label=label) for h in HEADER], rows, records, "")


def record_of(*tables, failures=(), run_id="host:1:120000", finished=1_800_000_000.0) -> RunRecord:
    return RunRecord(run_id=run_id, started=finished - 10, finished=finished, commit="abc1234def", dirty=False,
                     exitstatus=1 if failures else 0, reports_dir="reports", recipes=tuple(tables),
                     failures=tuple(failures))


def pct(name):
    return lambda r: f'{r["metrics"][name] * 100:.2f}' if name in r["metrics"] else "-"


# --- static checks of a page (need no browser) -----------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "poster", "data", "xlink:href", "background"}


class PageCheck(HTMLParser):
    """Parses a page (html.parser), checks its tags close in order, and lists whatever could make
    a browser fetch: a URL attribute that is not an in-page anchor or data:, a CSS ``url(`` or
    ``@import``, a script, a frame."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.fetches: list[str] = []
        self.csp: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.feed(page)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_starttag(self, tag, attrs, closed=False):
        a = dict(attrs)
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp.append(a.get("content") or "")
        if a.get("id"):
            self.ids.add(a["id"])
        if tag in ("script", "iframe", "object", "embed", "frame", "base"):
            self.fetches.append(f"<{tag}>")
        for k, v in attrs:
            if k in URL_ATTRS and v is not None and not (v.startswith("#") or v.startswith("data:")):
                self.fetches.append(f"{tag} {k}={v}")
            if k == "style" and v and re.search(r"url\(|@import", v):
                self.fetches.append(f"{tag} style={v}")
        if not closed and tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs, closed=True)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "style" and re.search(r"url\(|@import", data):
            self.fetches.append("css url()/@import in <style>")
        self.text.append(data)


def check_page(page: str) -> PageCheck:
    return PageCheck(page)


def test_the_static_check_catches_what_would_fetch_and_passes_a_clean_page():
    planted = ('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://example.com/remote.css">'
               '<style>body{background:url(http://example.com/bg.png)}</style></head><body>'
               '<img src="https://example.com/x.png"><script src="//cdn.example.com/lib.js"></script>'
               '<div style="background:url(x.png)"></div></body></html>')
    found = check_page(planted).fetches
    assert any("https://example.com/remote.css" in f for f in found)
    assert any("https://example.com/x.png" in f for f in found)
    assert "<script>" in found and any("style=" in f for f in found) and any("<style>" in f for f in found)
    clean = check_page(html_report.render(record_of(table_of("toy", "top-1", [
        case_record("fp32", "onnxruntime", {"top1": 0.9}, 1.0)], pct("top1")))))
    assert clean.fetches == [] and clean.errors == [] and clean.csp == [html_report.CSP]
    assert check_page("<div><span></div>").errors  # the tag check itself fails on a broken page


# --- unit tests of the rendering ------------------------------------------------------------


def P(device, lat, val, case=""):
    return html_report.Point(case or f"{device}-{lat}", "m b", device, lat, val)


def test_the_pareto_front_is_per_device_and_leaves_dominated_points_off():
    pts = [P("a", 1.0, 90.0), P("a", 2.0, 95.0), P("a", 3.0, 94.0),  # 3 ms / 94: slower and worse than 2 / 95
           P("a", 2.0, 89.0),                                        # dominated by 1 ms / 90
           P("a", 4.0, 99.0),
           P("b", 0.5, 99.5),  # faster and better than all of a's: a's front must not see it
           P("b", 0.7, 80.0),  # slower and worse than b's 0.5 / 99.5
           P("b", 9.0, 99.5)]  # as good as 0.5 / 99.5, and slower
    assert html_report.pareto_front(pts) == {0, 1, 4, 5}
    # an error metric (lower is better): the front flips
    err = [P("a", 1.0, 5.0), P("a", 2.0, 3.0), P("a", 3.0, 4.0), P("a", 0.5, 9.0)]
    assert html_report.pareto_front(err, higher_is_better=False) == {0, 1, 3}
    assert html_report.pareto_front(err, higher_is_better=True) == {3}  # read as a score, 0.5 ms / 9 beats all


def test_the_chart_marks_each_devices_front_and_numbers_every_point():
    records = [case_record("fp32", "onnxruntime", {"top1": 0.99}, 1.0, "ort-cpu"),
               case_record("trt_ptq", "onnxruntime", {"top1": 0.98}, 0.4, "ort-cpu"),
               case_record("torch_ptq", "onnxruntime", {"top1": 0.97}, 0.6, "ort-cpu"),  # dominated
               case_record("fp32", "torch", {"top1": 0.99}, 3.0, "torch-cpu", verdict="FAIL"),
               case_record("fp32", "torch", {}, 5.0, "torch-cpu", shape="max")]  # timed, no metric: no point
    page = html_report.render(record_of(table_of("toy", "top-1", records, pct("top1"))))
    assert page.count('class="point"') == 4 and page.count("<polyline") == 1  # ort-cpu's two-point front
    assert "top-1 (%)" in page and "p50 latency (ms)" in page
    key = re.search(r'<table class="key">(.*?)</table>', page, re.S).group(1)
    fronts = {cells[1]: cells[6] for cells in (re.findall(r"<td[^>]*>(.*?)</td>", row)
                                               for row in re.findall(r"<tr.*?</tr>", key)) if cells}
    assert fronts == {"toy-fp32-onnxruntime": "yes", "toy-trt_ptq-onnxruntime": "yes",
                      "toy-torch_ptq-onnxruntime": "", "toy-fp32-torch": "yes"}
    assert 'stroke="#d62728" stroke-width="2.5"' in page  # the failed case's outline


def test_a_run_that_timed_nothing_says_so_instead_of_an_empty_chart():
    records = [case_record("fp32", "onnxruntime", {"top1": 0.99}), case_record("trt_ptq", "onnxruntime", {"top1": 0.98})]
    page = html_report.render(record_of(table_of("toy", "top-1", records, pct("top1"))))
    assert 'class="empty no-latency"' in page and "no case was timed in this run" in page
    assert "--qatcheck-latency always" in page and 'class="point"' not in page
    # timed, but only shapes without a metric (a dynamic build's min / max)
    records.append(case_record("fp32", "onnxruntime", {}, 0.2, shape="min"))
    page = html_report.render(record_of(table_of("toy", "top-1", records, pct("top1"))))
    assert "the timed cases (a dynamic build&#x27;s min / max shapes) have no top-1" in page


def test_a_detector_and_an_error_metric_are_charted_by_their_own_metric():
    """Nothing assumes top-1: mAP@.5:.95 named by the records, and an error in pixels where lower
    is better (its front is the low side)."""
    det = [case_record("fp32", "onnxruntime", {"map50_95": 0.61, "map50": 0.9}, 2.0, recipe="det",
                       primary_metric={"name": "map50_95", "higher_is_better": True}),
           case_record("trt_ptq", "onnxruntime", {"map50_95": 0.58, "map50": 0.88}, 0.9, recipe="det",
                       primary_metric={"name": "map50_95", "higher_is_better": True})]
    t = table_of("det", "mAP@.5:.95", det, pct("map50_95"))
    assert html_report.primary_metric(t) == html_report.Primary("map50_95", "mAP@.5:.95", True, 100.0)
    page = html_report.render(record_of(t))
    assert "mAP@.5:.95 (%)" in page and "top-1" not in page and "top1" not in page
    assert page.count('class="point"') == 2 and "<td>61</td>" in page  # 0.61 shown as 61 %

    lm = [case_record("fp32", "onnxruntime", {"l2_px": 1.5}, 2.0, recipe="lm", primary_metric={"name": "l2_px", "higher_is_better": False}),
          case_record("trt_ptq", "onnxruntime", {"l2_px": 1.7}, 1.0, recipe="lm", primary_metric={"name": "l2_px", "higher_is_better": False}),
          case_record("qat", "onnxruntime", {"l2_px": 1.9}, 1.5, recipe="lm", primary_metric={"name": "l2_px", "higher_is_better": False})]  # slower than trt_ptq and a larger error
    t = table_of("lm", "l2_px", lm, lambda r: f'{r["metrics"]["l2_px"]:.4g}')
    p = html_report.primary_metric(t)
    assert p == html_report.Primary("l2_px", "l2_px", False, 1.0)
    assert html_report.pareto_front(html_report.points(t, p), p.higher_is_better) == {0, 1}
    assert "lower is better" in html_report.render(record_of(t))


def test_a_table_without_the_primary_field_leads_with_its_primary_column():
    """Records written before they named their primary metric: the first metric column is it."""
    recs = [case_record("fp32", "torch", {"top5": 1.0, "top1": 0.95}, 1.0)]
    t = table_of("toy", "top-1", recs, pct("top1"))
    assert html_report.primary_metric(t) == html_report.Primary("top1", "top-1", True, 100.0)


def test_text_from_users_code_is_escaped():
    bad = '<img src=x onerror="alert(1)">'
    rec = case_record("fp32", "onnxruntime", {"top1": 0.9}, 1.0, verdict="FAIL")
    rec["case"]["id"] = f"toy-{bad}"
    failure = Failure(f"test_x.py::test_accuracy[{bad}]", f"toy-{bad}", "accuracy",
                      f"toy accuracy check failed:\n  top1 fell {bad}\n  <script>alert(2)</script>\n"
                      f"  reproduce outside pytest: python -c 'print(\"<b>\")'")
    page = html_report.render(record_of(table_of("toy", "top-1", [rec], pct("top1")), failures=[failure]))
    assert "<img src=x" not in page and "<script>" not in page and "<b>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    checked = check_page(page)
    assert checked.fetches == [] and checked.errors == []


def history_line(run, t, case, mode, top1, recipe="toy", **extra) -> str:
    return json.dumps({"run": run, "time": t, "commit": f"c{run}", "dirty": False, "recipe": recipe, "case": case,
                       "mode": mode, "backend": "onnxruntime", "shape": "", "device": "dev-a",
                       "metrics": {"top1": top1}, "primary": "top1", "tolerance_points": 0.5, "latency_ms": None,
                       "parity_cosine": None, "verdict": "pass", "checks": {}, **extra})


def test_the_trend_shows_the_last_runs_per_mode_and_skips_malformed_lines():
    records = [case_record("fp32", "onnxruntime", {"top1": 0.99}), case_record("trt_ptq", "onnxruntime", {"top1": 0.85})]
    record = record_of(table_of("toy", "top-1", records, pct("top1")), run_id="now", finished=2_000.0)
    lines = []
    for i in range(30):  # 30 earlier runs: the trend keeps the last 19 of them and this one
        lines += [history_line(f"r{i:02}", 1_000.0 + i, "toy-fp32-onnxruntime", "fp32", 0.99),
                  history_line(f"r{i:02}", 1_000.0 + i, "toy-trt_ptq-onnxruntime", "trt_ptq", 0.98),
                  history_line(f"r{i:02}", 1_000.0 + i, "other-fp32-x", "fp32", 0.10, recipe="other")]
    lines += ["{torn line", "[1, 2]", json.dumps({"run": "r99"}), ""]
    runs, series = html_report.trend(record, record.recipes[0], html_report.primary_metric(record.recipes[0]),
                                     html_report.parse_history(lines)[0])
    assert [r["run"] for r in runs] == [f"r{i:02}" for i in range(11, 30)] + ["now"]
    assert series["trt_ptq"][-2:] == pytest.approx([98.0, 85.0]) and series["fp32"] == pytest.approx([99.0] * 20)
    page = html_report.render(record, lines)
    assert "over the last 20 run(s)" in page and "3 malformed line(s) of the history skipped" in page
    assert page.count("<polyline") == 2  # one line per mode (another recipe's lines are not drawn)
    # the history store may have written this run already: it is not counted twice
    again = lines + [history_line("now", 2_000.0, "toy-trt_ptq-onnxruntime", "trt_ptq", 0.85)]
    assert [r["run"] for r in html_report.trend(record, record.recipes[0], html_report.primary_metric(
        record.recipes[0]), html_report.parse_history(again)[0])[0]][-2:] == ["r29", "now"]
    # no history: one run, said in words
    assert "One run so far" in html_report.render(record)


def test_the_history_is_read_from_its_end(tmp_path):
    """A long history costs the page what its last runs cost: read backwards to the 21st run."""
    path = tmp_path / "history.jsonl"
    with open(path, "w") as f:
        for i in range(500):
            f.write(history_line(f"r{i:03}", float(i), "toy-fp32-onnxruntime", "fp32", 0.99) + "\n")
            f.write("not json\n" if i == 490 else "")
    tail = html_report.history_tail(path, ["toy"], block=1024)
    runs = {json.loads(line)["run"] for line in tail if line.startswith("{")}
    assert {f"r{i:03}" for i in range(479, 500)} <= runs and len(runs) < 60
    assert "not json" in tail
    # a recipe the history never saw: the whole file is read, nothing breaks
    assert len(html_report.history_tail(path, ["toy", "never"], block=1024)) == 501


# --- a real run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qatcheck-cache")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    return {"dir": tmp_path_factory.mktemp("html-page")}


def plant_baseline(pytester) -> None:
    """The shipped digits baselines, with one planted regression: fp32 on ONNX Runtime claims 100%."""
    data = json.loads((ROOT / "baselines" / "digits.json").read_text())
    data["cases"]["fp32-onnxruntime"]["metrics"]["top1"]["value"] = 1.0
    (pytester.path / "baselines").mkdir(exist_ok=True)
    (pytester.path / "baselines" / "digits.json").write_text(json.dumps(data))


@pytest.fixture
def real_page(pytester, shared_cache, made) -> tuple[Path, RunRecord]:
    """The page of a real digits run (fp32 and trt_ptq, every case timed, one planted failure),
    made once for the module."""
    if "page" not in made:
        from qatcheck.plugin import RUN_KEY

        write_suite(pytester, modes=("fp32", "trt_ptq"))
        plant_baseline(pytester)
        result = run_suite(pytester, shared_cache, "-k", "accuracy or latency", "--qatcheck-latency", "always")
        assert result.parseoutcomes().get("failed") == 1, result.stdout.str()
        record = result.reprec.getcall("pytest_sessionfinish").session.config.stash[RUN_KEY]
        page = pytester.path / "reports" / "qatcheck.html"
        assert page.is_file(), result.stdout.str()
        made["page"] = Path(shutil.copy(page, made["dir"] / "qatcheck.html"))
        made["record"] = record
    return made["page"], made["record"]


def test_every_run_writes_the_page_with_each_recipe_and_failure_and_nothing_to_fetch(real_page):
    path, record = real_page
    page = path.read_text()
    checked = check_page(page)
    assert checked.errors == [] and checked.fetches == [] and checked.csp == [html_report.CSP]
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page) and "url(" not in page
    text = "".join(checked.text)
    (table,) = record.recipes
    assert table.name == "digits" and "recipe-digits" in checked.ids
    for row in table.rows:
        assert all(cell in text for cell in row)
    (failure,) = record.failed_cases
    assert (failure.case, failure.check) == ("digits-fp32-onnxruntime", "accuracy")
    for what in (failure.case, failure.cause, failure.reproduce, "Polygraphy"):
        assert what in text, what
    assert text.index(failure.cause) < text.index("Mode")  # failures first, then the table
    assert 'tr class="FAIL" id=case-digits-fp32-onnxruntime' in page
    # every case was timed and has top-1: one point each, on two devices (ONNX Runtime and
    # PyTorch fingerprints)
    assert page.count('class="point"') == len(table.records) == 3
    assert len({r["fingerprint_id"] for r in table.records}) == 2


def test_the_page_follows_html_off_and_says_when_nothing_was_timed(pytester, shared_cache):
    write_suite(pytester)
    plant_baseline(pytester)
    page = pytester.path / "reports" / "qatcheck.html"
    run_suite(pytester, shared_cache, "-k", "accuracy").assert_outcomes(passed=1, failed=1)
    # on this machine no latency baseline matches: nothing was timed, and the page says so
    assert "no case was timed in this run" in page.read_text()
    page.unlink()
    run_suite(pytester, shared_cache, "-k", "accuracy", "--qatcheck-html", "off").assert_outcomes(passed=1, failed=1)
    assert not page.exists() and not list(pytester.path.rglob("*.html"))
    run_suite(pytester, shared_cache, "-k", "accuracy", "--qatcheck-html", "out/run.html")
    assert "digits-fp32-onnxruntime" in (pytester.path / "out" / "run.html").read_text()


# --- in a real browser --------------------------------------------------------------------------


def chromium(tmp: Path, page: Path, *mode: str) -> tuple[str, str, list[str]]:
    """Headless Chromium on ``page``: (stdout, stderr, the URLs the page itself requested)."""
    n = len(list(tmp.glob("netlog-*.json")))
    netlog = tmp / f"netlog-{n}.json"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp / f'profile-{n}'}", "--disable-background-networking", "--disable-component-update",
         # nothing resolves: whatever is requested fails here instead of leaving the machine
         "--host-resolver-rules=MAP * ~NOTFOUND",
         f"--log-net-log={netlog}", "--enable-logging=stderr", "--v=0", *mode, page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requested = [e["params"]["url"] for e in log["events"]
                 if e["type"] == start and "url" in e.get("params", {})
                 and e["params"].get("initiator") != "not an origin"]  # Chromium's own say "not an origin"
    return proc.stdout, proc.stderr, requested


def csp_blocked(stderr: str) -> list[str]:
    return re.findall(r"Loading the \w+ '([^']+)' violates the following Content Security Policy", stderr)


@needs_chromium
def test_chromium_renders_the_page_tables_and_charts_and_a_screenshot(real_page, tmp_path):
    from PIL import Image

    path, record = real_page
    dom, _, requested = chromium(tmp_path, path, "--dump-dom")
    assert requested == []
    assert dom.count("<table") >= 2 and "digits-fp32-onnxruntime" in dom  # the recipe's table, the points' key
    assert '<svg class="chart"' in dom and dom.count('class="point"') == 3
    shot = tmp_path / "page.png"
    chromium(tmp_path, path, f"--screenshot={shot}", "--window-size=1400,2200")
    img = Image.open(shot)
    assert img.size == (1400, 2200)
    colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, tables and charts, not a blank page


@needs_chromium
def test_chromium_fetches_nothing_for_the_page_and_the_watch_catches_a_planted_fetch(real_page, tmp_path):
    path, _ = real_page
    # the watch sees a fetch: a page without the report's policy, with a remote image and stylesheet
    bare = tmp_path / "planted-bare.html"
    bare.write_text(f"<!DOCTYPE html><html><head><meta charset=utf-8></head><body>{PLANTS}</body></html>")
    _, _, requested = chromium(tmp_path, bare, "--dump-dom")
    assert {"https://example.com/x.png", "https://example.com/remote.css"} <= set(requested), requested
    # the same plants inside the real page: its Content-Security-Policy blocks both, Chromium says so
    planted = tmp_path / "planted-report.html"
    planted.write_text(path.read_text().replace("<body>", "<body>" + PLANTS, 1))
    _, stderr, requested = chromium(tmp_path, planted, "--dump-dom")
    assert requested == [] and set(csp_blocked(stderr)) == {"https://example.com/x.png",
                                                             "https://example.com/remote.css"}, stderr[-3000:]
    # the real page: nothing requested, nothing blocked
    _, stderr, requested = chromium(tmp_path, path, "--dump-dom")
    assert requested == [] and csp_blocked(stderr) == []
