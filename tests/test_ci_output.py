"""What a pull request shows without downloading an artifact (issue 24, item 1): the job summary
(failures first, each with its cause and reproduction command, then every table), one GitHub
annotation per failure on the test's line, and each case's figures as JUnit properties.

The end-to-end tests run the real digits suite with a planted regression (a baseline claiming
top-1 100%, as in test_plugin's run-record test); the units check escaping and the size limit."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from qatcheck import ci_summary
from qatcheck.run_record import Failure, RecipeTable, RunRecord
from test_plugin import plant, restore, run, write_suite

PLAIN_FAILURE = "def test_plain():\n    assert 6 * 7 == 41\n"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qatcheck-cache")


def test_the_job_summary_names_each_failure_first_then_a_clean_rerun_appends_all_passed(pytester, shared_cache):
    clean = plant(pytester, shared_cache)
    pytester.makepyfile(test_other=PLAIN_FAILURE)  # a test that is no qatcheck case fails too
    summary = pytester.path / "step-summary.md"
    result = run(pytester, shared_cache, "-k", "accuracy or parity or plain", "--qatcheck-summary", str(summary))
    result.assert_outcomes(passed=2, failed=2, skipped=1)
    planted = summary.read_text()
    lines = planted.splitlines()
    # the first lines: the outcome naming the failing case and check, then the failure's cause and
    # its reproduction command
    assert lines[0] == "### ❌ qatcheck: 2 failed - digits-fp32-onnxruntime accuracy, test_other.py::test_plain"
    assert lines[1].startswith("**digits**: 2 case(s) (1 FAIL, 1 pass)")
    assert lines[3] == "#### Failures"
    assert lines[5].startswith("**1. `digits-fp32-onnxruntime` accuracy** - top1 99.")
    assert "is below the baseline 100.00% by 0.7" in lines[5] and "(tolerance 0.5 points)" in lines[5]
    assert lines[7] == "```sh" and lines[9] == "```"
    assert lines[8].startswith(("polygraphy run ", "python ")) and "digits-fp32-onnxruntime" in lines[8]
    # the other test: its node id and the exception's line, and how to rerun it
    assert lines[11] == "**2. `test_other.py::test_plain`** - assert (6 * 7) == 41"
    assert lines[14] == "pytest test_other.py::test_plain"
    # then the recipe's table, as the report files have it
    table = planted[planted.index("#### digits"):]
    assert "| Mode | Shape | Backend |" in table and "| fp32 | 32x1x16x16 | onnxruntime |" in table
    assert table.index("onnxruntime") < table.index("| fp32 | 32x1x16x16 | torch |")
    assert "::error" not in result.stdout.str()  # no GITHUB_ACTIONS here: no annotations

    restore(pytester, clean)
    result = run(pytester, shared_cache, "test_suite.py", "-k", "accuracy or parity", "--qatcheck-summary", str(summary))
    result.assert_outcomes(passed=3, skipped=1)
    both = summary.read_text()
    assert both.startswith(planted)  # appended: the first run's text is kept whole
    rerun = both[len(planted):]
    assert rerun.lstrip("\n").startswith("### ✅ qatcheck: all passed\n**digits**: 2 case(s) (2 pass)")
    assert "Failures" not in rerun and "```" not in rerun and "| fp32 | 32x1x16x16 | torch |" in rerun


def test_each_failure_is_a_github_annotation_on_its_test_line_only_under_github_actions(pytester, shared_cache,
                                                                                         monkeypatch):
    clean = plant(pytester, shared_cache)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(pytester.path))
    result = run(pytester, shared_cache, "-k", "accuracy or parity")
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    annotations = [line for line in result.outlines if line.startswith("::")]
    line, = annotations
    head, _, message = line.partition("::")[2].partition("::")
    assert head.startswith("error file=test_suite.py,line=") and head.endswith(",title=digits-fp32-onnxruntime accuracy")
    n = int(head.split("line=")[1].split(",")[0])
    assert (pytester.path / "test_suite.py").read_text().splitlines()[n - 1].startswith("def test_accuracy(")
    # escaped: the cause's "%" and the line break before the reproduction command
    assert message.startswith("top1 99.") and "%25 is below the baseline 100.00%25" in message
    assert "%0Areproduce: " in message and "%" not in message.replace("%25", "").replace("%0A", "")
    assert "\n" not in line

    restore(pytester, clean)  # a clean run: no annotation
    result = run(pytester, shared_cache, "-k", "accuracy or parity")
    result.assert_outcomes(passed=3, skipped=1)
    assert not [line for line in result.outlines if line.startswith("::")]


def test_each_case_s_figures_are_junit_properties_of_its_tests(pytester, shared_cache):
    plant(pytester, shared_cache)
    result = run(pytester, shared_cache, "-k", "accuracy or parity", "--junitxml", "junit.xml")
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    measured = json.loads((pytester.path / "reports" / "digits.json").read_text())["cases"]
    top1 = {c["case"]["id"]: c["metrics"]["top1"] for c in measured}
    cosine = next(c["parity"]["cosine"] for c in measured if c["case"]["id"] == "digits-fp32-onnxruntime")

    def properties(name: str) -> dict[str, str]:
        case, = [c for c in ET.parse(pytester.path / "junit.xml").iter("testcase") if c.get("name") == name]
        return {p.get("name"): p.get("value") for p in case.iter("property")}

    failed = properties("test_accuracy[digits-fp32-onnxruntime]")
    assert failed["qatcheck.case"] == "digits-fp32-onnxruntime" and failed["qatcheck.check"] == "accuracy"
    assert failed["qatcheck.verdict"] == "fail"
    assert float(failed["qatcheck.metric.top1"]) == top1["digits-fp32-onnxruntime"] < 1.0
    assert float(failed["qatcheck.metric.top5"]) == 1.0
    assert float(failed["qatcheck.parity.cosine"]) == cosine
    assert failed["qatcheck.reused"] == "eval"  # measured by the recording run, reused here
    assert "qatcheck.p50_ms" not in failed  # not timed
    passed = properties("test_accuracy[digits-fp32-torch]")
    assert passed["qatcheck.verdict"] == "pass" and float(passed["qatcheck.metric.top1"]) == top1["digits-fp32-torch"]
    assert properties("test_parity[digits-fp32-onnxruntime]")["qatcheck.verdict"] == "pass"


def test_under_xdist_the_controller_annotates_summarizes_and_junit_has_the_workers_properties(pytester, monkeypatch,
                                                                                              tmp_path):
    """``-n 1``: the tests run in a worker; the controller holds the run's record. Planted: no
    baseline at all (the accuracy check fails, asking for one)."""
    pytest.importorskip("xdist")
    write_suite(pytester, backends=("onnxruntime",))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    summary = tmp_path / "summary.md"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1", "--qatcheck-cache", str(tmp_path / "cache"),
                                           "--qatcheck-no-progress", "-k", "accuracy", "--junitxml", "junit.xml",
                                           "--qatcheck-summary", str(summary))
    result.assert_outcomes(failed=1)
    line, = [line for line in result.outlines if line.startswith("::")]
    assert line.startswith("::error file=test_suite.py,line=") and ",title=digits-fp32-onnxruntime accuracy::" in line
    assert "no baseline for fp32-onnxruntime metrics.top1" in line
    text = summary.read_text()
    assert text.startswith("### ❌ qatcheck: 1 failed - digits-fp32-onnxruntime accuracy\n")
    assert [line for line in text.splitlines() if line.startswith("### ")] == [text.splitlines()[0]]  # once, by the controller
    assert "no baseline for fp32-onnxruntime metrics.top1" in text.splitlines()[5]
    case, = ET.parse(pytester.path / "junit.xml").iter("testcase")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["qatcheck.verdict"] == "fail" and 0.9 < float(props["qatcheck.metric.top1"]) <= 1.0


# ---- units -------------------------------------------------------------------------------------
def test_workflow_command_escaping():
    message = "100% of 5:\r\nfailed, see a,b"
    assert ci_summary.escape_data(message) == "100%25 of 5:%0D%0Afailed, see a,b"
    assert ci_summary.escape_property(message) == "100%25 of 5%3A%0D%0Afailed%2C see a%2Cb"
    assert ci_summary.escape_data("%0A") == "%250A"  # a literal %0A stays literal
    record = RunRecord("r", 0.0, 1.0, "", False, 1, "reports", failures=(
        Failure("t.py::test_x[a,b]", "", "test_x", "E   ValueError: 5% off:\nE   more", ("sub dir/t,1.py", 7)),))
    line, = ci_summary.annotations(record)
    assert line == "::error file=sub dir/t%2C1.py,line=7,title=t.py%3A%3Atest_x[a%2Cb]::ValueError: 5%25 off:"


def test_an_annotation_s_path_is_relative_to_the_checkout():
    record = RunRecord("r", 0.0, 1.0, "", False, 1, "reports", failures=(
        Failure("suites/test_s.py::test_accuracy[c]", "c", "accuracy", "c accuracy check failed:\n  why",
                ("suites/test_s.py", 3)),))
    line, = ci_summary.annotations(record, root="/ws/project", workspace="/ws")
    assert line == "::error file=project/suites/test_s.py,line=3,title=c accuracy::why"
    line, = ci_summary.annotations(record, root="/elsewhere", workspace="/ws")
    assert line.startswith("::error file=/elsewhere/suites/test_s.py,line=3,")
    # a record written before failures kept their location: no file, still an annotation
    old = RunRecord.from_dict({**record.to_dict(), "failures": [{**record.to_dict()["failures"][0], "location": None}]})
    assert ci_summary.annotations(old) == ["::error title=c accuracy::why"]
    again = RunRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and again.failures[0].location == ("suites/test_s.py", 3)


def _big_record(rows: int, failures: int = 1) -> RunRecord:
    header = ["Mode", "Backend", "Verdict"]
    body = [[f"mode{i}", "x" * 200, "pass"] for i in range(rows)]
    table = RecipeTable("big", header, body, [{"case": {"id": f"big-{i}"}, "verdict": "pass"} for i in range(rows)],
                        notes="note: a figure to keep in mind\n")
    fails = tuple(Failure(f"s.py::test_accuracy[big-{i}]", f"big-{i}", "accuracy",
                          f"big-{i} accuracy check failed:\n  cause {i} " + "y" * 300 +
                          f"\n  reproduce outside pytest: python repro_{i}.py", ("s.py", 1)) for i in range(failures))
    return RunRecord("r", 0.0, 1.0, "", False, 1, "/runner/reports", recipes=(table,), failures=fails)


def test_a_summary_over_github_s_limit_cuts_the_tables_never_the_failures():
    record = _big_record(rows=3000)
    whole = ci_summary.markdown(record)
    assert whole.count("| mode") == 3000 and "- note: a figure to keep in mind" in whole
    cut = ci_summary.markdown(record, limit=50_000)
    assert len(cut.encode()) <= 50_000
    assert "cause 0 " + "y" * 300 in cut and "python repro_0.py" in cut
    kept = cut.count("| mode")
    assert 100 < kept < 3000 and cut.count("| Mode | Backend | Verdict |") == 1
    assert (f"_{3000 - kept} of 3000 rows of big and its notes left out: GitHub shows at most 1 MiB of a step's "
            "summary. The whole table: `/runner/reports/big.md`") in cut
    # failures beyond the limit are still written whole; the table gives way entirely
    many = ci_summary.markdown(_big_record(rows=10, failures=200), limit=20_000)
    assert all(f"python repro_{i}.py" in many for i in range(200)) and "| mode" not in many
    assert "_10 of 10 rows of big and its notes left out" in many


def test_append_keeps_what_the_file_holds_and_counts_it_against_the_limit(tmp_path):
    path = tmp_path / "step" / "summary.md"
    ci_summary.append(path, _big_record(rows=5))
    first = path.read_text()
    ci_summary.append(path, _big_record(rows=5))
    assert path.read_text() == first + "\n" + first
    other = tmp_path / "other.md"
    other.write_text("z" * (ci_summary.LIMIT_BYTES - 30_000))  # another command of the step wrote a lot
    ci_summary.append(other, _big_record(rows=3000))
    assert other.stat().st_size <= ci_summary.LIMIT_BYTES and other.read_text().startswith("z" * 1000)
    assert "python repro_0.py" in other.read_text() and "rows of big and its notes left out" in other.read_text()


def test_no_summary_path_no_publisher():
    from qatcheck.options import Options

    assert ci_summary.publishers(Options()) == []
    (what, _), = ci_summary.publishers(Options(summary_path=Path("s.md")))
    assert what == "job summary s.md"  # the terminal says where it wrote


def test_the_junit_properties_of_a_timed_case_hold_its_p50():
    from qatcheck.measurement import Case, Measurement, Verdict
    from qatcheck.plugin import _junit_properties
    from qatcheck.timing import LatencyStats

    case = Case("r", "fp16", "torch")
    latency = LatencyStats(median_ms=0.25, mean_ms=0.3, p90_ms=0.4, p99_ms=0.5, min_ms=0.2, cv=0.01, iterations=10,
                           batch_size=1, clock="wall")
    m = Measurement(case, metrics={"map50": 0.5}, latency=latency, reused=frozenset({"eval", "latency"}))
    session = SimpleNamespace(measurements={case: m}, verdicts={(case, "latency"): Verdict("latency", case, "inconclusive")})
    props = dict(_junit_properties(session, case, "latency", "passed"))
    assert props == {"qatcheck.case": case.id, "qatcheck.check": "latency", "qatcheck.verdict": "inconclusive",
                     "qatcheck.metric.map50": 0.5, "qatcheck.p50_ms": 0.25, "qatcheck.reused": "eval,latency"}
    # a test with no verdict of that name and no measurement: its outcome, and no figures
    assert dict(_junit_properties(SimpleNamespace(measurements={}, verdicts={}), case, "custom", "failed")) == {
        "qatcheck.case": case.id, "qatcheck.check": "custom", "qatcheck.verdict": "failed"}
