"""The run history (issue 24 item 3): every run appends its cases to ``reports/history.jsonl``;
``python -m qatcheck history`` flags a drift that no single run catches, ``compare`` shows what
changed between two runs. Real runs of the digits suite (in-process), a planted drift of 0.1 point
per run; the store's safety (concurrent appends, torn lines) and the drift rule on synthetic lines."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qatcheck import history
from qatcheck.__main__ import main
from qatcheck.errors import ConfigError
from test_plugin import run, write_suite

#: each step of the planted drift (0.1 point) is inside this tolerance, the six runs' total is not
TIGHT = '{"tolerances": Tolerances(metric_points=0.3)}'


@pytest.fixture(scope="module")
def history_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("history-cache")


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([*argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_drift_of_a_tenth_of_a_point_per_merge_is_flagged_though_every_run_passed(
        pytester, history_cache, monkeypatch, capsys):
    """Six runs, each recording its figures as a merge would (--update-baselines), top-1 0.1 point
    lower each time: every run passes (0.1 < the 0.3 tolerance), the history names the drift
    (0.5 points > 0.3), compare shows the planted deltas."""
    from qatcheck.tasks.classification import TopKAccuracy

    real = TopKAccuracy.result
    write_suite(pytester, backends=("onnxruntime",), overrides=TIGHT)
    for k in range(6):
        monkeypatch.setattr(TopKAccuracy, "result", lambda self, k=k: {
            n: v - 0.001 * k if n == "top1" else v for n, v in real(self).items()})
        result = run(pytester, history_cache, "-k", "accuracy", "--qatcheck-remeasure", "--update-baselines")
        result.assert_outcomes(passed=1)
        if k == 0:  # the reports of the first run, as another checkout's reports/ would hold them
            shutil.copytree(pytester.path / "reports", pytester.path / "first-reports")
    path = pytester.path / "reports" / "history.jsonl"
    lines = history.read(path)
    assert len(lines) == 6 and not lines.notes
    assert len({line["run"] for line in lines}) == 6
    top1 = [line["metrics"]["top1"] for line in lines]
    assert [round((a - b) * 100, 6) for a, b in zip(top1, top1[1:])] == [0.1] * 5
    line = lines[-1]
    assert (line["recipe"], line["case"], line["mode"], line["backend"], line["shape"]) == \
        ("digits", "digits-fp32-onnxruntime", "fp32", "onnxruntime", "")
    assert (line["primary"], line["tolerance_points"], line["verdict"], line["checks"]) == \
        ("top1", 0.3, "pass", {"accuracy": "pass"})
    # not timed (accuracy only): no latency, no device fingerprint
    assert line["device"] == "" and line["latency_ms"] is None and line["higher_is_better"] is True

    rc, out, _ = cli(capsys, "history", "--history", str(path))
    print(out)
    assert rc == 0
    assert ("drift: digits digits-fp32-onnxruntime: top1 fell 0.50 points over 6 runs" in out
            and "beyond its tolerance of 0.30 points, though each run passed; runs " in out), out
    assert cli(capsys, "history", "--history", str(path), "--fail-on-drift")[0] == 1
    # over the last 3 runs it moved 0.2 points: inside the tolerance, not a drift
    rc, out, _ = cli(capsys, "history", "--history", str(path), "--runs", "3", "--fail-on-drift")
    assert rc == 0 and "no drift over the last 3 runs" in out
    rc, out, _ = cli(capsys, "history", "--history", str(path), "--markdown", "--case", "*fp32*",
                     "--png", str(pytester.path / "h.png"))
    assert out.startswith("### history ") and "| digits | digits-fp32-onnxruntime | top1 (%) |" in out
    assert "- drift: digits digits-fp32-onnxruntime: top1 fell 0.50 points" in out
    assert (pytester.path / "h.png").stat().st_size > 0

    rc, out, _ = cli(capsys, "compare", "-2", "-1", "--history", str(path))
    print(out)
    assert rc == 0 and "-0.10 pt" in out and "digits-fp32-onnxruntime" in out, out
    first = lines[0]["run"]
    rc, out, _ = cli(capsys, "compare", first[:-2], "-1", "--history", str(path))  # a unique prefix
    assert rc == 0 and "-0.50 pt" in out, out
    # two report directories (two checkouts, two GPUs): the first run's against the last's
    rc, out, _ = cli(capsys, "compare", str(pytester.path / "first-reports"), str(pytester.path / "reports"),
                     "--markdown")
    assert rc == 0 and "| digits | digits-fp32-onnxruntime | top1 (%) |" in out and "| -0.50 pt |" in out, out


def test_clean_runs_flag_nothing_and_compare_shows_zero_deltas(pytester, history_cache, capsys):
    """Six runs measuring the same model: no drift; two of them compare at zero; an unknown run id
    is one line naming it and the runs there are."""
    write_suite(pytester, backends=("torch", "onnxruntime"))
    for k in range(6):
        result = run(pytester, history_cache, "-k", "accuracy or parity", "--qatcheck-remeasure",
                     *(["--update-baselines"] if k == 0 else []))
        assert result.ret == 0, result.stdout.str()
    path = pytester.path / "reports" / "history.jsonl"
    lines = history.read(path)
    assert len(lines) == 12 and len(history.runs(lines)) == 6 and history.drifts(lines) == []
    rc, out, _ = cli(capsys, "history", "--history", str(path), "--fail-on-drift")
    assert rc == 0 and "no drift over the last 6 runs" in out and "digits-fp32-torch" in out

    rc, out, _ = cli(capsys, "compare", "-2", "-1", "--history", str(path))
    print(out)
    assert rc == 0
    _, rows = history.comparison_table(history.compare(*(list(r.lines) for r in history.runs(lines)[-2:])))
    assert [r[1] for r in rows] == ["digits-fp32-onnxruntime", "digits-fp32-torch"]
    assert {r[4] for r in rows} == {"+0.00 pt"} and rows[0][7] == "+0.00000" and rows[0][8] == "pass"
    assert "+0.00 pt" in out and "+0.00000" in out

    rc, out, err = cli(capsys, "compare", "nosuchrun", "-1", "--history", str(path))
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "no run 'nosuchrun' in " in err and "its last 5 run(s), newest last: " in err
    assert lines[-1]["run"] in err and lines[0]["run"] not in err
    rc, _, err = cli(capsys, "history", "--history", str(path), "--recipe", "resnet")
    assert rc == 2 and err.strip() == f"qatcheck history: error: no runs of recipe 'resnet' in {path}; recipes there: digits"
    rc, _, err = cli(capsys, "history", "--history", str(pytester.path / "none.jsonl"))
    assert rc == 2 and "no history at " in err and err.count("\n") == 1


def line(run: str, value: float, *, case="digits-trt_ptq-onnxruntime", status="pass", tol=0.3, hib=True,
         latency=None, device="gpu-a", lat_status="pass", commit="") -> dict:
    """A synthetic history line."""
    return {"run": run, "time": 0.0, "commit": commit, "dirty": False, "recipe": "digits", "case": case,
            "mode": "trt_ptq", "backend": "onnxruntime", "shape": "", "device": device, "metrics": {"top1": value},
            "primary": "top1", "tolerance_points": tol, "latency_ms": latency, "parity_cosine": None,
            "verdict": "FAIL" if "fail" in (status, lat_status) else "pass",
            "checks": {"accuracy": status, "latency": lat_status}, "higher_is_better": hib, "fraction": True,
            "tolerance_rel": None, "latency_tolerance_rel": 0.15}


def series(values, **kw) -> list[dict]:
    return [line(f"r{i}", v, commit=f"{i:07d}abc", **kw) for i, v in enumerate(values)]


def test_the_drift_rule_on_synthetic_series():
    down = [0.99, 0.989, 0.988, 0.987, 0.986, 0.985]  # 0.5 points, each step 0.1
    drift, = history.drifts(series(down))
    assert (drift.case, drift.metric, drift.unit, round(drift.change, 6), drift.tolerance) == \
        ("digits-trt_ptq-onnxruntime", "top1", "points", -0.5, 0.3)
    assert drift.labels == tuple(f"{i:07d}" for i in range(6)) and drift.runs == tuple(f"r{i}" for i in range(6))
    assert "top1 fell 0.50 points over 6 runs (99.00% -> 98.50%), beyond its tolerance of 0.30 points" in drift.message
    # a plateau between the steps is still one way
    assert len(history.drifts(series([0.99, 0.99, 0.988, 0.988, 0.986, 0.986]))) == 1
    # non-monotone: one step back up
    assert history.drifts(series([0.99, 0.989, 0.990, 0.987, 0.986, 0.985])) == []
    # monotone, but 0.2 points in total: inside the tolerance
    assert history.drifts(series([0.99, 0.9896, 0.9892, 0.9888, 0.9884, 0.988])) == []
    # one step failed its check: the run said so, it is not a silent drift
    failed = series(down)
    failed[3] = {**failed[3], "checks": {"accuracy": "fail"}, "verdict": "FAIL"}
    assert history.drifts(failed) == []
    # better, not worse, for a metric where higher is better; either way when the direction is unknown
    assert history.drifts(series(down[::-1])) == []
    assert len(history.drifts(series(down[::-1], hib=None))) == 1
    # only the last `window` runs count: an old slide followed by a flat stretch is over
    assert history.drifts(series(down + [0.985] * 5), window=6) == []
    assert len(history.drifts(series(down + [0.985] * 5), window=11)) == 1
    # fewer than 3 runs: no judgement
    assert history.drifts(series(down[:2])) == []
    # latency: p50 rising 4% a run on one device (0.15 tolerance), each run passing
    lat = [line(f"r{i}", 0.99, latency=1.0 + 0.04 * i) for i in range(6)]
    drift, = history.drifts(lat)
    assert (drift.metric, drift.device, drift.unit, round(drift.change, 6)) == ("p50 latency", "gpu-a", "%", 20.0)
    # ... but not the same figures from two devices: the last device (gpu-a) timed two of them
    mixed = [{**l, "device": "gpu-a" if i >= 4 else "gpu-b"} for i, l in enumerate(lat)]
    assert history.drifts(mixed) == []
    with pytest.raises(ConfigError, match="at least 3 runs"):
        history.drifts(lat, window=2)


def test_compare_times_only_the_same_device_and_lists_the_cases_one_run_lacks():
    old = [line("a", 0.99, latency=2.0, device="gpu-a"), line("a", 0.98, case="digits-fp32-torch", latency=1.0),
           line("a", 0.97, case="digits-qat-torch")]
    new = [line("b", 0.985, latency=2.2, device="gpu-a", status="fail"),
           line("b", 0.98, case="digits-fp32-torch", latency=0.5, device="gpu-b"),
           line("b", 0.96, case="digits-fp16-torch")]
    cmp = history.compare(old, new, "a", "b")
    _, rows = history.comparison_table(cmp)
    assert rows[0][3:] == ["99.00 -> 98.50", "-0.50 pt", "2.000 -> 2.200", "1.10x", "-", "pass -> FAIL"]
    assert rows[1][3:7] == ["98.00 -> 98.00", "+0.00 pt", "different device", "-"]
    assert history.comparison_notes(cmp) == ["only in A (a): digits digits-qat-torch",
                                             "only in B (b): digits digits-fp16-torch"]
    # the history table: a column per run, latency timed on another device than the latest marked
    header, rows = history.history_table([*old[:1], {**new[0], "checks": {}, "verdict": "pass"},
                                          line("c", 0.98, latency=2.1, device="gpu-b")], window=6)
    assert header == ["Recipe", "Case", "Figure", "a", "b", "c"]
    assert rows == [["digits", "digits-trt_ptq-onnxruntime", "top1 (%)", "99.00", "98.50", "98.00"],
                    ["digits", "digits-trt_ptq-onnxruntime", "p50 ms", "2.000*", "2.200*", "2.100"]]


RECORD = textwrap.dedent('''
    from qatcheck.run_record import RecipeTable, RunRecord

    def record(run_id, cases, recipe="digits", value=0.99):
        """A run of ``cases`` cases, each line ~1 kB (a run's write is well over PIPE_BUF)."""
        records = [{"case": {"id": f"{recipe}-case{i}-" + "x" * 400, "recipe": recipe, "mode": "fp32",
                             "backend": "onnxruntime", "shape": ""},
                    "metrics": {"top1": value, **{f"metric_{j}": 0.5 for j in range(20)}}, "verdict": "pass",
                    "checks": {"accuracy": {"status": "pass"}}, "fingerprint_id": "dev",
                    "primary_metric": {"name": "top1", "fraction": True, "higher_is_better": True, "tolerance": 0.5}}
                   for i in range(cases)]
        return RunRecord(run_id=run_id, started=0.0, finished=1.0, commit="", dirty=False, exitstatus=0,
                         reports_dir="reports", recipes=(RecipeTable(recipe, [], [], records),))
''')
exec(RECORD, globals())  # the test and the appending processes build the same records


def test_torn_and_malformed_lines_are_skipped_and_named(tmp_path, capsys):
    path = tmp_path / "new" / "dir" / "history.jsonl"
    history.append(record("run-1", 2), path)  # the directory is made
    good = path.read_text()
    # a crash tore the next run's write mid-line; a hand edit left junk and a line without a case
    with open(path, "a") as f:
        f.write('["not", "an", "object"]\n' + json.dumps({"run": "x", "time": 1}) + "\n" + good[:50])
    history.append(record("run-2", 2), path)  # starts on a line of its own: the torn tail stays torn
    lines = history.read(path)
    assert [l["run"] for l in lines] == ["run-1", "run-1", "run-2", "run-2"]
    assert lines.notes == [f"{path}:3: skipped: not a JSON object (list)",
                           f"{path}:4: skipped: field 'recipe' missing or not a str",
                           f"{path}:5: skipped: not JSON (a write torn by a crash?)"]
    assert path.read_text().startswith(good)  # append-only: earlier lines untouched
    rc, out, err = cli(capsys, "history", "--history", str(path))
    assert rc == 0 and "digits-case0-" in out and err.count("skipped") == 3 and f"{path}:5: skipped" in err


CASES, RUNS = 40, 100
APPENDER = RECORD + textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from qatcheck import history
    who, path, runs, cases = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    (path.parent / f"{who}.ready").touch()
    while len(list(path.parent.glob("*.ready"))) < 2:  # both start appending together
        time.sleep(0.001)
    for i in range(runs):
        history.append(record(f"{who}-{i}", cases, recipe=who), path)
''')


def test_two_processes_appending_at_once_lose_and_tear_nothing(tmp_path):
    """Each run's 40 lines are one write of ~40 kB under the lock: two processes appending 100 runs
    each at once leave 8000 intact lines, each run's together. (Written a line at a time without
    the lock, the runs' lines interleave: this test fails.)"""
    path = tmp_path / "history.jsonl"
    assert len(json.dumps(history.lines(record("r", CASES)))) > 8 * 4096  # many times PIPE_BUF
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(history.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, who, str(path), str(RUNS), str(CASES)], env=env)
             for who in ("one", "two")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    lines = history.read(path)
    assert not lines.notes and len(lines) == 2 * RUNS * CASES
    order = [l["run"] for l in lines]
    assert all(len(set(order[i:i + CASES])) == 1 for i in range(0, len(order), CASES))  # each run's lines adjacent
    assert sorted(set(order)) == sorted(f"{who}-{i}" for who in ("one", "two") for i in range(RUNS))
    # and the two processes did append at the same time (their runs alternate somewhere)
    owners = [r.split("-")[0] for r in order[::CASES]]
    assert sum(a != b for a, b in zip(owners, owners[1:])) > 1
