"""pytest-xdist (issue 11): ``-n 2`` runs suites in parallel, each recipe wholly on one worker, and
prints one table per recipe with every row, the same figures as ``-n 0``; latency on a CPU-only
machine is skipped with the true reason (workers share the CPUs), not blamed on --benchmark-disable."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("xdist")

SUITE = '''
import pytest
from qatcheck.standard import test_accuracy, test_latency, test_parity  # noqa: F401
from qatcheck.zoo import recipes
pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    name={name!r}, modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"), dynamic_modes=()))
'''


def run(pytester, cache, reports, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--qatcheck-cache", str(cache),
                                         "--qatcheck-baselines", str(cache.parent / "baselines"),
                                         "--qatcheck-reports", str(reports), "--qatcheck-no-progress",
                                         "--qatcheck-iterations", "20", "-rs", *args)


def test_two_workers_one_table_per_recipe_every_row_same_figures(pytester, tmp_path):
    pytester.makepyfile(test_one=SUITE.format(name="one"), test_two=SUITE.format(name="two"))
    cache = tmp_path / "cache"
    assert run(pytester, cache, tmp_path / "r0", "--update-baselines").ret == 0
    serial = run(pytester, cache, tmp_path / "r0")
    parallel = run(pytester, cache, tmp_path / "r2", "-n", "2")
    assert parallel.ret == 0, parallel.stdout.str()
    out = parallel.stdout.str()
    for name in ("one", "two"):  # each recipe's table once, from the one worker that ran it
        assert out.count(f"qatcheck: {name}") == 1, out
        rows0 = {c["case"]["id"]: c["metrics"] for c in json.loads((tmp_path / "r0" / f"{name}.json").read_text())["cases"]}
        rows2 = {c["case"]["id"]: c["metrics"] for c in json.loads((tmp_path / "r2" / f"{name}.json").read_text())["cases"]}
        assert rows2 == rows0 and len(rows2) == 3  # fp32 on both backends, trt_ptq on onnxruntime
    parallel.stdout.fnmatch_lines(["*latency not measured under pytest-xdist: 2 workers and no GPU*"])
    assert "--benchmark-disable" not in out
    # the same verdicts, less the 6 latency checks the workers do not time
    assert serial.parseoutcomes()["passed"] == parallel.parseoutcomes()["passed"] + 6
    assert "failed" not in serial.parseoutcomes() and "failed" not in parallel.parseoutcomes()
