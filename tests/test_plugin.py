"""The plugin end to end (pytester): each check fails on a planted regression with a readable
message, and ``--update-baselines`` then makes the same run pass.

The suites here run the real digits recipe (real calibration, real ONNX Runtime sessions) on a
few modes; the artifact cache is shared between tests so each artifact is built once.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qatcheck.session import QatcheckSession

SUITE = '''
import os
import pytest
from qatcheck.recipe import QuantSettings, Tolerances
from qatcheck.zoo.recipes import digits_recipe

overrides = {{"dynamic_modes": (), **{overrides}}}  # static cases only, unless a test asks
pytestmark = pytest.mark.qatcheck_recipe(digits_recipe(modes={modes!r}, backends={backends!r}, **overrides))

def test_accuracy(qcase):
    qcase.check_accuracy()

def test_parity(qcase):
    qcase.check_parity()

def test_latency(qcase, benchmark):
    qcase.check_latency(benchmark)
'''


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qatcheck-cache")


#: recipe overrides for tests that record a latency on a shared machine (see record_latency)
WIDE_LATENCY = '{"tolerances": Tolerances(latency_rel=0.5)}'


def write_suite(pytester, modes=("fp32",), backends=("torch", "onnxruntime"), overrides="{}"):
    pytester.makepyfile(test_suite=SUITE.format(modes=tuple(modes), backends=tuple(backends),
                                                overrides=overrides))


def run(pytester, cache: Path, *args: str):
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}", "--qatcheck-cache", str(cache),
                                        "--qatcheck-iterations", "30", "--qatcheck-warmup", "0.05",
                                        "--benchmark-disable-gc", *args)


def baseline(pytester) -> dict:
    return json.loads((pytester.path / "baselines" / "digits.json").read_text())


def record_latency(pytester, cache: Path, key: str, *args: str, tries: int = 3) -> None:
    """Record the suite's latency baseline: a recording too noisy for its tolerance is rightly
    refused (a shared machine has slow moments), so up to ``tries`` runs of 200 iterations."""
    why = []
    for _ in range(tries):
        result = run(pytester, cache, "-k", "latency", "--update-baselines", "--qatcheck-iterations", "200", *args)
        stored = pytester.path / "baselines" / "digits.json"
        if stored.is_file() and baseline(pytester)["cases"].get(key, {}).get("latency"):
            return
        why += [line for line in result.outlines if "not recorded" in line]
    pytest.fail(f"{key}'s latency was refused {tries} times: " + " | ".join(why))


def test_ids_and_markers_select_cases(pytester, shared_cache):
    write_suite(pytester, modes=("fp32", "torch_ptq", "qat"))
    result = run(pytester, shared_cache, "--co", "-q")
    out = result.stdout.str()
    assert "test_accuracy[digits-torch_ptq-onnxruntime]" in out
    assert "test_latency[digits-qat-torch]" in out and "tensorrt" not in out
    result = run(pytester, shared_cache, "--co", "-q", "-m", "qat and onnxruntime")
    result.stdout.fnmatch_lines(["*test_accuracy?digits-qat-onnxruntime?", "*3/18 tests collected*"])


def test_missing_baseline_fails_then_update_makes_it_pass(pytester, shared_cache):
    write_suite(pytester)
    result = run(pytester, shared_cache, "-k", "accuracy")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*no baseline for fp32-torch metrics.top1*record it with --update-baselines*"])
    result = run(pytester, shared_cache, "-k", "accuracy", "--update-baselines")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*baselines updated:*digits.json*", "*+ fp32-torch metrics.top1 = 0.99*"])
    stored = baseline(pytester)["cases"]["fp32-onnxruntime"]["metrics"]["top1"]
    assert stored["tolerance"] == 0.5 and 0.98 < stored["value"] <= 1.0
    result = run(pytester, shared_cache, "-k", "accuracy")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*artifact cache*: 0 built*"])


def test_tampered_baseline_fails_and_update_restores(pytester, shared_cache):
    write_suite(pytester)
    run(pytester, shared_cache, "-k", "accuracy", "--update-baselines").assert_outcomes(passed=2)
    data = baseline(pytester)
    data["cases"]["fp32-onnxruntime"]["metrics"]["top1"]["value"] = 1.0  # claims 100%
    data["cases"]["fp32-torch"]["metrics"]["top5"]["tolerance"] = 0.0     # hand-tuned: kept
    (pytester.path / "baselines" / "digits.json").write_text(json.dumps(data))
    result = run(pytester, shared_cache, "-k", "accuracy")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*digits-fp32-onnxruntime accuracy check failed:*",
                                 "*top1 99.*% is below the baseline 100.00% by 0.7* points (tolerance 0.5 points)*"])
    report = (pytester.path / "reports" / "digits.md").read_text()  # the report says why the row is red
    assert "\n## Failures\n\n- **digits-fp32-onnxruntime** accuracy: top1 99." in report
    assert "fp32-torch**" not in report.split("## Failures")[1]
    result = run(pytester, shared_cache, "-k", "accuracy", "--update-baselines")
    result.stdout.fnmatch_lines(["*~ fp32-onnxruntime metrics.top1: 1 -> 0.99*"])
    assert baseline(pytester)["cases"]["fp32-torch"]["metrics"]["top5"]["tolerance"] == 0.0
    run(pytester, shared_cache, "-k", "accuracy").assert_outcomes(passed=2)
    assert "## Failures" not in (pytester.path / "reports" / "digits.md").read_text()  # a clean run's has none


def plant(pytester, cache) -> dict:
    """Record the suite's baselines, then plant a regression: fp32-onnxruntime's top-1 baseline
    claims 100%. Returns the clean baselines (to restore)."""
    write_suite(pytester)
    run(pytester, cache, "-k", "accuracy or parity", "--update-baselines").assert_outcomes(passed=3, skipped=1)
    clean = baseline(pytester)
    planted = json.loads(json.dumps(clean))
    planted["cases"]["fp32-onnxruntime"]["metrics"]["top1"]["value"] = 1.0
    (pytester.path / "baselines" / "digits.json").write_text(json.dumps(planted))
    return clean


def restore(pytester, clean: dict) -> None:
    (pytester.path / "baselines" / "digits.json").write_text(json.dumps(clean))


def test_the_run_record_holds_each_table_and_each_failure_with_its_case_check_and_cause(pytester, shared_cache):
    """What the run's publishers (job summary, history, HTML report) read: the recipe's table and
    records, and each failed test with its case, check, one-line cause and reproduction command.
    Planted: a baseline claiming 100%; a clean rerun records no failure."""
    from qatcheck.plugin import RUN_KEY
    from qatcheck.run_record import RunRecord

    def record(result) -> RunRecord:
        return result.reprec.getcall("pytest_sessionfinish").session.config.stash[RUN_KEY]

    clean = plant(pytester, shared_cache)
    planted = record(run(pytester, shared_cache, "-k", "accuracy or parity"))
    table, = planted.recipes
    assert table.name == "digits" and len(table.rows) == len(table.records) == 2
    assert [r["case"]["id"] for r in table.records] == ["digits-fp32-onnxruntime", "digits-fp32-torch"]
    failure, = planted.failed_cases
    assert (failure.case, failure.check) == ("digits-fp32-onnxruntime", "accuracy")
    assert failure.cause.startswith("top1 99.") and "below the baseline 100.00%" in failure.cause
    assert failure.reproduce.startswith("polygraphy run ") or failure.reproduce.startswith("python ")
    assert planted.exitstatus == 1 and planted.commit == ""  # pytester's directory is no git tree
    assert RunRecord.from_dict(json.loads(json.dumps(planted.to_dict()))) == planted  # plain data
    restore(pytester, clean)
    assert record(run(pytester, shared_cache, "-k", "accuracy or parity")).failures == ()


def test_a_publisher_that_cannot_write_is_a_note_and_the_others_still_write(pytester, shared_cache):
    """The HTML page asked for under a file: one note naming it, the run green, the history written
    (the summary says what was written, and where); a clean rerun writes both."""
    write_suite(pytester, backends=("onnxruntime",))
    (pytester.path / "blocker").write_text("a file where a directory was asked for")
    result = run(pytester, shared_cache, "-k", "accuracy", "--update-baselines",
                 "--qatcheck-html", str(pytester.path / "blocker" / "run.html"))
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["qatcheck: wrote history *history.jsonl",
                                 "*qatcheck: HTML report *blocker*run.html not written: *"])
    assert len((pytester.path / "reports" / "history.jsonl").read_text().splitlines()) == 1
    clean = run(pytester, shared_cache, "-k", "accuracy")
    clean.stdout.fnmatch_lines(["qatcheck: wrote history *history.jsonl, HTML report *qatcheck.html"])
    assert "not written" not in clean.stdout.str()


def test_bad_calibration_range_fails_accuracy(pytester, shared_cache):
    """percentile 55 clips almost every activation: the fp32 budget catches it."""
    write_suite(pytester, modes=("fp32", "torch_ptq"), backends=("onnxruntime",),
                overrides='{"quant": QuantSettings(torch_calibrator="percentile", percentile=55.0)}')
    result = run(pytester, shared_cache, "-k", "accuracy and torch_ptq", "--update-baselines")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*digits-torch_ptq-onnxruntime accuracy check failed:*",
                                 "*top1 *% is *points below fp32 99.26% on onnxruntime (budget 1 points; *"])


def test_perturbed_qdq_scale_fails_parity(pytester, shared_cache):
    """A broken scale in the exported Q/DQ graph: ONNX Runtime no longer matches PyTorch fake-quant."""
    from qatcheck.cache import adopt
    from qatcheck.quantize.onnx_ptq import scale_qdq

    write_suite(pytester, modes=("torch_ptq",), backends=("torch", "onnxruntime"))
    cache = pytester.path / "own-cache"
    result = run(pytester, cache, "-k", "parity", "--update-baselines")
    result.assert_outcomes(passed=2)
    [onnx_file] = cache.glob("digits-torch_ptq-*.onnx")
    assert scale_qdq(onnx_file, onnx_file, "layer2", 8.0)
    adopt(onnx_file)  # as if the export had produced it (a file merely edited is rebuilt: test_cache)
    result = run(pytester, cache, "-k", "parity")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*digits-torch_ptq-onnxruntime parity check failed:*",
                                 "*cosine 0.* vs torch torch_ptq (export) is below the floor 0.999*"])


@pytest.mark.quiet  # times latency and reads the verdict
def test_planted_slowdown_fails_latency_on_same_fingerprint(pytester, shared_cache, monkeypatch):
    """A 20 ms sleep in forward() on a sub-millisecond model: the latency check must fail."""
    # a wide tolerance: the recording is kept on a shared machine (its interval within ±25%), and
    # the plant (x5 and more) is far beyond it
    write_suite(pytester, backends=("torch",), overrides=WIDE_LATENCY)
    pytester.makeconftest('''
import os, time, torch
import qatcheck.timing
import qatcheck.backends.torch_backend as tb
_infer, _busy = tb.TorchRunner.timed_call, qatcheck.timing._busy_seconds
if os.environ.get("NO_LOAD"):  # other processes' load not measured (as without /proc/stat)
    qatcheck.timing._busy_seconds = lambda: None
if os.environ.get("PLANT_SLOWDOWN"):
    def slow(self, x):
        call = _infer(self, x)
        inner = call.run
        def run():
            time.sleep(0.02)
            inner()
        call.run = run
        return call
    tb.TorchRunner.timed_call = slow

def pytest_unconfigure(config):  # in-process runs share the modules: leave them as found
    tb.TorchRunner.timed_call, qatcheck.timing._busy_seconds = _infer, _busy
''')
    result = run(pytester, shared_cache, "-k", "latency")
    result.assert_outcomes(skipped=1)
    result.stdout.no_fnmatch_line("*failed*")
    result = run(pytester, shared_cache, "-k", "latency", "-rs")
    result.stdout.fnmatch_lines(["*no latency baseline for fp32-torch on this device*--update-baselines*"])
    # recorded and planted with other processes' load not measured, on one thread: CI machines are
    # shared, and a baseline timed under measured contention (or too noisy) is rightly not recorded
    monkeypatch.setenv("NO_LOAD", "1")
    record_latency(pytester, shared_cache, "fp32-torch", "--qatcheck-threads", "1")
    monkeypatch.setenv("PLANT_SLOWDOWN", "1")
    result = run(pytester, shared_cache, "-k", "latency", "-p", "conftest", "--qatcheck-threads", "1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*digits-fp32-torch latency check failed:*",
                                 "*slower beyond the tolerance: median * ms vs the baseline * ms on this device: "
                                 "x* (95% interval x* .. x*); tolerance +50%*"])


def _latency_rows(pytester) -> dict:
    report = json.loads((pytester.path / "reports" / "digits.json").read_text())
    return {c["case"]["key"]: c for c in report["cases"]}


@pytest.mark.quiet  # times latency and reads the verdict
def test_latency_is_timed_only_where_it_is_judged_or_recorded(pytester, shared_cache):
    """--qatcheck-latency judged (the default): without a latency baseline for this device nothing
    is timed (the skip and a note under the table say why); --update-baselines times and records, a
    recorded baseline is timed and judged; always times anyway; never times nothing; a speedup floor
    has its mode and its reference mode timed without any baseline."""
    write_suite(pytester, modes=("fp32",), backends=("onnxruntime",), overrides=WIDE_LATENCY)
    result = run(pytester, shared_cache, "-k", "latency", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*note*latency: a case is timed only where its latency is judged or recorded*",
                                 "*no latency baseline for fp32-onnxruntime on this device*not timed*--update-baselines*"])
    assert _latency_rows(pytester)["fp32-onnxruntime"]["latency"] is None
    result = run(pytester, shared_cache, "-k", "latency", "--qatcheck-latency", "always")
    result.assert_outcomes(skipped=1)  # timed, with no baseline to judge it by
    assert _latency_rows(pytester)["fp32-onnxruntime"]["latency"]["median_ms"] > 0

    record_latency(pytester, shared_cache, "fp32-onnxruntime", "--qatcheck-threads", "1")  # --update-baselines times
    result = run(pytester, shared_cache, "-k", "latency", "--qatcheck-latency", "never", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*latency not timed (--qatcheck-latency never)*"])
    assert _latency_rows(pytester)["fp32-onnxruntime"]["latency"] is None
    run(pytester, shared_cache, "-k", "latency", "--qatcheck-threads", "1")  # a baseline for this fingerprint: timed
    assert _latency_rows(pytester)["fp32-onnxruntime"]["latency"]["median_ms"] > 0

    shutil.rmtree(pytester.path / "baselines")
    write_suite(pytester, modes=("fp32", "fp16"), backends=("onnxruntime",),
                overrides='{"tolerances": Tolerances(speedup_floor={"fp16": 0.01})}')
    run(pytester, shared_cache, "-k", "latency").assert_outcomes(passed=1, skipped=1)
    rows = _latency_rows(pytester)
    assert rows["fp16-onnxruntime"]["latency"] and rows["fp32-onnxruntime"]["latency"]


def test_required_backend_missing_fails_session(pytester, shared_cache):
    write_suite(pytester, modes=("fp32",), backends=("tensorrt",))
    result = run(pytester, shared_cache, "-k", "accuracy")
    result.assert_outcomes(skipped=1)
    assert result.ret == 0
    result = run(pytester, shared_cache, "-k", "accuracy", "--qatcheck-require", "tensorrt")
    result.assert_outcomes(errors=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*backend tensorrt is required (--qatcheck-require) but not available*",
                                 "*qatcheck: required backend missing - tensorrt*"])


def test_malformed_baseline_is_named_and_never_rewritten(pytester, shared_cache):
    write_suite(pytester)
    path = pytester.path / "baselines" / "digits.json"
    path.parent.mkdir()
    path.write_text('{"qatcheck_baseline": 1, "recipe": "digits", "cases": {"fp32-torch": '
                    '{"metrics": {"top1": {"value": "high", "tolerance": 0.5}}}}}')
    before = path.read_bytes()
    for extra in ((), ("--update-baselines",)):
        result = run(pytester, shared_cache, "-k", "accuracy", *extra)
        result.stdout.fnmatch_lines(["*BaselineError: baseline file *digits.json: "
                                     "cases?'fp32-torch'?.metrics.top1.value must be a finite number, got 'high'*"])
        result.assert_outcomes(failed=2)
        result.stdout.no_fnmatch_line("*During handling of the above exception*")
        result.stdout.no_fnmatch_line("*INTERNALERROR*")
        assert path.read_bytes() == before


def test_partial_budget_fails_when_the_kept_layer_is_dropped(pytester, shared_cache):
    """The budget case of issue 5: digits + entropy loses ~14 points in trt_ptq; keeping stem.conv
    (the sensitivity command's choice) recovers it. Drop the kept layer (a planted regression: a
    keep list edited by mistake) and the partial case fails its fp32 budget, naming the numbers;
    the report lists the kept layers and why."""
    entropy = ('{"quant": QuantSettings(calibrator="entropy", keep_precision=KEEP, '
               'keep_precision_why={"stem.conv": "planted reason"}), '
               '"tolerances": __import__("qatcheck.recipe", fromlist=["Tolerances"]).Tolerances('
               'fp32_budget_points={"partial": 0.5})}')
    for keep, outcome in ((("stem.conv",), "passed"), ((), "failed")):
        pytester.makepyfile(test_suite=SUITE.replace("\noverrides = ", f"\nKEEP = {keep!r}\noverrides = ", 1)
                            .format(modes=("fp32", "partial"), backends=("onnxruntime",), overrides=entropy))
        result = run(pytester, shared_cache, "-k", "accuracy", "--update-baselines")
        outcomes = {k: v for k, v in result.parseoutcomes().items() if k in ("passed", "failed")}
        if outcome == "passed":
            assert outcomes == {"passed": 2}, result.stdout.str()
            result.stdout.fnmatch_lines(["*partial keeps 1 layer(s) in higher precision:*",
                                         "*- stem.conv: planted reason*"])
        else:
            assert outcomes == {"passed": 1, "failed": 1}, result.stdout.str()
            result.stdout.fnmatch_lines(["*digits-partial-onnxruntime accuracy check failed:*",
                                         "*top1 8?.??% is 1?.?? points below fp32 99.26% on onnxruntime "
                                         "(budget 0.5 points; Tolerances.fp32_budget_points sets a mode's own)*"])


def test_standard_checks_imported_into_a_suite_are_parametrized(pytester, shared_cache):
    """``from qatcheck.standard import *`` gives a suite every standard check, parametrized by
    the importing module's recipe marker, with the usual ids (issue 21 item 11d: the README's
    examples imported three by name, so suites copied from them never ran the structure check)."""
    pytester.makepyfile(test_std='''
import pytest
from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import digits_recipe
pytestmark = pytest.mark.qatcheck_recipe(digits_recipe(modes=("fp32", "trt_ptq"), backends=("onnxruntime",),
                                                       dynamic_modes=()))
''')
    result = run(pytester, shared_cache, "--co", "-q")
    ids = sorted(line.split("::")[1] for line in result.stdout.lines if "::test_" in line)
    assert ids == sorted(f"{check}[digits-{mode}-onnxruntime]" for mode in ("fp32", "trt_ptq")
                         for check in ("test_accuracy", "test_parity", "test_latency", "test_structure",
                                       "test_precision")), result.stdout.str()


def test_one_import_brings_every_standard_check_and_the_readme_and_suites_use_it():
    import qatcheck.standard as standard

    assert sorted(standard.__all__) == sorted(n for n in vars(standard) if n.startswith("test_"))
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]  # the examples moved to docs/
    for path in [*pages, *sorted((root / "suites").glob("test_*.py"))]:
        for line in path.read_text().splitlines():
            if "from qatcheck.standard import" in line:
                assert "import *" in line, f"{path.name}: {line.strip()}"


def test_a_rerun_reuses_results_and_says_so(pytester, tmp_path):
    """The result cache through the plugin: the first run measures (the Measured column gives its
    seconds), a rerun with nothing changed reuses every case's figures (the column and the JSON
    say ``reused``; the cost line counts them), a recipe edit that changes what a case measures
    (its calibrator) measures that mode's cases again and reuses the rest, and --qatcheck-remeasure
    measures everything again."""
    cache = tmp_path / "cache"

    def rows(result) -> dict[str, list[str]]:
        report = json.loads((pytester.path / "reports" / "digits.json").read_text())
        return {c["case"]["key"]: c["reused"] for c in report["cases"]}

    write_suite(pytester, modes=("fp32", "trt_ptq"), backends=("onnxruntime",))
    first = run(pytester, cache, "-k", "accuracy or parity", "--update-baselines")
    assert first.ret == 0 and rows(first) == {"fp32-onnxruntime": [], "trt_ptq-onnxruntime": []}
    first.stdout.fnmatch_lines(["*cost digits: * artifact(s) built, 2 case(s) measured, 0 reused*"])
    again = run(pytester, cache, "-k", "accuracy or parity")
    assert again.ret == 0 and rows(again) == {"fp32-onnxruntime": ["eval"], "trt_ptq-onnxruntime": ["eval"]}
    again.stdout.fnmatch_lines(["*│ fp32 *│ *reused* │ *pass │", "*│ trt_ptq *│ *reused* │ *pass │",
                                "*cost digits: 0 artifact(s) built, 0 case(s) measured, 2 reused*"])
    write_suite(pytester, modes=("fp32", "trt_ptq"), backends=("onnxruntime",),
                overrides='{"quant": QuantSettings(calibrator="minmax")}')
    edited = run(pytester, cache, "-k", "accuracy or parity", "--update-baselines")
    assert edited.ret == 0 and rows(edited) == {"fp32-onnxruntime": ["eval"], "trt_ptq-onnxruntime": []}
    fresh = run(pytester, cache, "-k", "accuracy or parity", "--qatcheck-remeasure")
    assert fresh.ret == 0 and rows(fresh) == {"fp32-onnxruntime": [], "trt_ptq-onnxruntime": []}


def test_min_and_max_are_checked_on_a_subset_and_a_break_there_is_caught(pytester, shared_cache):
    """A dynamic build at its min / max profile points is checked on the eval set's first
    Recipe.profile_samples samples - it runs, its output shapes, its parity against PyTorch at that
    shape - and its accuracy is judged at opt (whole set). Plant: the graph's outputs negated at
    batch 128 only (a break at the max shape): parity fails there and nowhere else; clean: green."""
    from qatcheck.backends import onnxruntime_backend

    write_suite(pytester, modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"),
                overrides='{"dynamic_modes": ("trt_ptq",)}')
    select = ("-k", "trt_ptq and onnxruntime and (accuracy or parity)", "-rs")
    first = run(pytester, shared_cache, *select, "--update-baselines")
    assert first.ret == 0, first.stdout.str()
    first.stdout.fnmatch_lines(["*accuracy is judged at opt and in the static case: at the max profile point the "
                                "build is checked on 128 samples (runs, output shapes, parity*"])
    rows = {c["case"]["key"]: c for c in json.loads((pytester.path / "reports" / "digits.json").read_text())["cases"]}
    assert rows["trt_ptq_max-onnxruntime"]["eval_samples"] == 128 and rows["trt_ptq_max-onnxruntime"]["metrics"] == {}
    assert rows["trt_ptq_opt-onnxruntime"]["eval_samples"] == rows["trt_ptq-onnxruntime"]["eval_samples"] > 128
    assert rows["trt_ptq_max-onnxruntime"]["parity"]["cosine"] > 0.999
    assert set(baseline(pytester)["cases"]["trt_ptq_max-onnxruntime"]) >= {"parity"}
    assert "metrics" not in baseline(pytester)["cases"]["trt_ptq_max-onnxruntime"]

    infer = onnxruntime_backend.OrtRunner.infer

    def broken_at_max(self, x):
        outs = infer(self, x)
        return [-o for o in outs] if len(x) == 128 else outs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnxruntime_backend.OrtRunner, "infer", broken_at_max)
        # planted in memory: no input of the result cache's key moved, so measured on demand
        planted = run(pytester, shared_cache, *select, "--qatcheck-remeasure")
    failed = [r.nodeid for r in planted.reprec.getreports("pytest_runtest_logreport") if r.failed]
    assert failed == ["test_suite.py::test_parity[digits-trt_ptq_max-onnxruntime]"], planted.stdout.str()
    planted.stdout.fnmatch_lines(["*digits-trt_ptq_max-onnxruntime parity check failed:*", "*cosine -0.99*"])
    clean = run(pytester, shared_cache, *select, "--qatcheck-remeasure")
    assert clean.ret == 0, clean.stdout.str()



TWO_RECIPES = '''
import pytest
from qatcheck.standard import test_accuracy, test_parity  # noqa: F401
from qatcheck.zoo.recipes import digits_recipe

pytestmark = pytest.mark.qatcheck_recipe(*(digits_recipe(name=name, modes=("fp32",), backends=("onnxruntime",),
                                                         dynamic_modes=()) for name in ("first", "second")))
'''


@pytest.mark.parametrize("layout", ["a module each", "one module"])
def test_a_recipe_is_let_go_after_its_last_test_and_its_table_stays(pytester, shared_cache, layout):
    """Memory is the recipes being measured, not every recipe so far: after a recipe's last
    collected test the session drops its model, data and runners (``QatcheckSession.release``),
    and both tables are still printed at the end. A module marked with two recipes runs one
    recipe's tests, then the other's. Planted: a session that never lets go keeps every recipe to
    the end; pytest's own order (test function by test function) keeps both recipes of one module."""
    if layout == "one module":
        pytester.makepyfile(test_both=TWO_RECIPES)
    for name in ("first", "second") if layout == "a module each" else ():
        pytester.makepyfile(**{f"test_{name}": SUITE.format(modes=("fp32",), backends=("onnxruntime",),
                                                            overrides=f'{{"name": "{name}"}}')})
    pytester.makeconftest('''
import json, os, pytest
from qatcheck.plugin import SESSION_KEY
from qatcheck.session import QatcheckSession

HELD, COLLECTED = [], []
if os.environ.get("NEVER_RELEASE"):
    QatcheckSession.release = lambda self, recipe: None

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    COLLECTED[:] = items

@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session):  # planted: pytest's own order, the recipes alternating
    if os.environ.get("COLLECTED_ORDER"):
        kept = set(session.items)
        session.items[:] = [item for item in COLLECTED if item in kept]

@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item):  # after every other teardown: the recipes the session holds
    yield
    HELD.append(sorted(item.config.stash[SESSION_KEY]._workspaces))

def pytest_unconfigure(config):
    with open("held.json", "w") as f:
        json.dump(HELD, f)
''')

    def held(**planted) -> list:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in planted.items():
                mp.setenv(name, value)
            result = run(pytester, shared_cache, "-k", "accuracy or parity", "--update-baselines")
        result.assert_outcomes(passed=4)
        result.stdout.fnmatch_lines(["*qatcheck: first*", "*qatcheck: second*"])
        return json.loads((pytester.path / "held.json").read_text())

    release = QatcheckSession.release
    assert held() == [["first"], [], ["second"], []]
    if layout == "one module":
        assert held(COLLECTED_ORDER="1") == [["first"], ["first", "second"], ["second"], []]
    assert held(NEVER_RELEASE="1") == [["first"], ["first"], ["first", "second"], ["first", "second"]]
    QatcheckSession.release = release  # the planted conftest replaced it in this process


def test_a_negative_latency_precision_is_one_usage_error(pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--qatcheck-latency-precision=-0.5")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--qatcheck-latency-precision: expected a fraction of the tolerance >= 0 "
                                 "(0: no early stop), got -0.5*"])
