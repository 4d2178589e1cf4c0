"""Two runs of one recipe at once (issue 11): each artifact is built once (per-key lock) and the
report keeps every row of both runs; a run after them replaces the report whole."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from qatcheck import report_files
from qatcheck.cache import ArtifactCache

SUITE = '''
import pytest
from qatcheck.standard import test_accuracy, test_parity  # noqa: F401
from qatcheck.zoo import recipes
pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    name="shared", modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"), dynamic_modes=()))
'''

# both sessions wait at their start until the other has started: the runs overlap for certain
BARRIER = '''
import os, pathlib, time
SYNC = pathlib.Path(os.environ["SYNC"])

def pytest_sessionstart(session):
    (SYNC / os.environ["ME"]).touch()
    t = time.time()
    while not (SYNC / os.environ["OTHER"]).exists():
        assert time.time() - t < 300, "the other run never started"
        time.sleep(0.05)
'''


def _pytest(where, tmp_path, me, other, *args):
    env = {**os.environ, "SYNC": str(tmp_path), "ME": me, "OTHER": other}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(where), "--rootdir", str(where.parent),
         "--qatcheck-cache", str(tmp_path / "cache"), "--qatcheck-baselines", str(tmp_path / "baselines"),
         "--qatcheck-reports", str(tmp_path / "reports"), "--qatcheck-no-progress", *args],
        cwd=where.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_overlapping_runs_build_once_and_keep_every_row(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_shared.py").write_text(SUITE)
    (suite / "conftest.py").write_text(BARRIER)
    # both record (the baseline commit holds a directory lock: both land)
    a = _pytest(suite, tmp_path, "a", "b", "-k", "fp32", "--update-baselines")
    b = _pytest(suite, tmp_path, "b", "a", "-k", "trt_ptq", "--update-baselines")
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    assert [a.returncode, b.returncode] == [0, 0], outs
    built = sum(int(re.search(r"(\d+) built", o).group(1)) for o in outs)
    # each artifact (the fp32 model and its ONNX export, which both runs need, and trt_ptq) once
    assert built == len(ArtifactCache(tmp_path / "cache").entries()), outs
    doc = json.loads((tmp_path / "reports" / "shared.json").read_text())
    ids = sorted(c["case"]["id"] for c in doc["cases"])
    assert ids == ["shared-fp32-onnxruntime", "shared-fp32-torch", "shared-trt_ptq-onnxruntime"]
    assert len({c["run"] for c in doc["cases"]}) == 2
    recorded = json.loads((tmp_path / "baselines" / "shared.json").read_text())["cases"]
    assert sorted(recorded) == ["fp32-onnxruntime", "fp32-torch", "trt_ptq-onnxruntime"]
    md = (tmp_path / "reports" / "shared.md").read_text()
    assert md.count("| fp32 |") == 2 and md.count("| trt_ptq |") == 1
    assert "from another run that overlapped this one" in md
    # a later run is not concurrent with either: its report is its rows alone
    (suite / "conftest.py").unlink()
    c = _pytest(suite, tmp_path, "c", "c", "-k", "fp32-torch")
    assert c.wait(timeout=600) == 0
    doc = json.loads((tmp_path / "reports" / "shared.json").read_text())
    assert [x["case"]["id"] for x in doc["cases"]] == ["shared-fp32-torch"]


def _write(reports, run, case_id):
    rec = {"case": {"id": case_id}}
    return report_files.write(reports, "r", ["Mode"], [[case_id]], [rec], "", {}, run)


def test_an_overlapping_runs_rows_are_kept_an_earlier_runs_are_not(tmp_path):
    earlier = report_files.Run(started=time.time() - 100, id="earlier")
    _write(tmp_path, earlier, "r-fp16")
    a = report_files.Run(id="a")  # started after the earlier report was written
    b = report_files.Run(id="b")
    assert _write(tmp_path, b, "r-fp32")[2] == [["r-fp32"]]   # the earlier run's row is gone
    md, js, rows = _write(tmp_path, a, "r-int8")               # b finished while a was running
    assert rows == [["r-int8"], ["r-fp32"]]
    assert [c["run"] for c in json.loads(js.read_text())["cases"]] == ["a", "b"]
    # a damaged report is nothing to keep, and never an error
    js.write_text("{not json")
    assert _write(tmp_path, report_files.Run(id="c"), "r-x")[2] == [["r-x"]]
