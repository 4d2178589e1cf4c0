"""pytest-xdist (issue 11): ``-n 2`` runs suites in parallel, each recipe wholly on one worker, and
prints one table per recipe with every row, the same figures as ``-n 0``; latency on a CPU-only
machine is skipped with the true reason (workers share the CPUs), not blamed on --benchmark-disable."""
from __future__ import annotations

import json

import pytest

from qatcheck import history

pytest.importorskip("xdist")

SUITE = '''
import pytest

from qatcheck import history
from qatcheck.standard import test_accuracy, test_latency, test_parity  # noqa: F401
from qatcheck.recipe import Tolerances
from qatcheck.zoo import recipes
# a wide latency tolerance: 20 timed iterations on a shared 2-core CPU are recorded as a baseline
# (judges._unrecordable refuses a median known less well than half its tolerance)
pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    name={name!r}, modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"), dynamic_modes=(),
    tolerances=Tolerances(latency_rel=1.0)))
'''


def run(pytester, cache, reports, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--qatcheck-cache", str(cache),
                                         "--qatcheck-baselines", str(cache.parent / "baselines"),
                                         "--qatcheck-reports", str(reports), "--qatcheck-no-progress",
                                         "--qatcheck-iterations", "20", "-rs", *args)


def test_two_workers_one_table_per_recipe_every_row_same_figures(pytester, tmp_path):
    pytester.makepyfile(test_one=SUITE.format(name="one"), test_two=SUITE.format(name="two"))
    cache = tmp_path / "cache"
    serial = run(pytester, cache, tmp_path / "r0", "--update-baselines")  # recorded as it is measured
    assert serial.ret == 0, serial.stdout.str()
    # measured afresh by the workers (at one thread each), not taken from the serial run's results
    parallel = run(pytester, cache, tmp_path / "r2", "-n", "2", "--qatcheck-remeasure")
    assert parallel.ret == 0, parallel.stdout.str()
    # and then reused by the workers from the results they stored, figures unchanged
    reused = run(pytester, cache, tmp_path / "r3", "-n", "2")
    assert reused.ret == 0, reused.stdout.str()
    out = parallel.stdout.str()

    def figures(reports, name):
        return {c["case"]["id"]: (c["metrics"], c["parity"], c["reused"])
                for c in json.loads((reports / f"{name}.json").read_text())["cases"]}
    for name in ("one", "two"):  # each recipe's table once, from the one worker that ran it
        assert out.count(f"qatcheck: {name}") == 1, out
        rows0, rows2, rows3 = (figures(tmp_path / r, name) for r in ("r0", "r2", "r3"))
        assert len(rows2) == 3  # fp32 on both backends, trt_ptq on onnxruntime
        assert {k: v[:2] for k, v in rows2.items()} == {k: v[:2] for k, v in rows0.items()}
        assert {tuple(v[2]) for v in rows2.values()} == {()} and {tuple(v[2]) for v in rows3.values()} == {("eval",)}
        assert {k: v[:2] for k, v in rows3.items()} == {k: v[:2] for k, v in rows0.items()}
    parallel.stdout.fnmatch_lines(["*latency not measured under pytest-xdist: 2 workers and no GPU*"])
    assert "--benchmark-disable" not in out
    # the same verdicts, less the latency checks the workers do not time: all 6 on a quiet machine;
    # a latency timed under measured contention (or too noisy for its tolerance) was not recorded,
    # and the serial run skips it too
    timed = sum(c["checks"]["latency"]["status"] != "skip" for name in ("one", "two")
                for c in json.loads((tmp_path / "r0" / f"{name}.json").read_text())["cases"])
    assert serial.parseoutcomes()["passed"] == parallel.parseoutcomes()["passed"] + timed
    assert "failed" not in serial.parseoutcomes() and "failed" not in parallel.parseoutcomes()
    # the run record is made once, by the controller: the -n 2 run's history is one run of both recipes
    lines = history.read(tmp_path / "r2" / "history.jsonl")
    assert len({line["run"] for line in lines}) == 1 and sorted(line["recipe"] for line in lines) == ["one"] * 3 + ["two"] * 3


@pytest.mark.parametrize("device, gpus, count, expected", [
    ("auto", 2, 2, "cuda:1"),      # a GPU per worker: worker 1 takes the second
    ("cuda", 4, 2, "cuda:1"),
    ("auto", 1, 2, "1 GPU"),       # two workers, one GPU: they would time each other
    ("auto", 0, 2, "no GPU"),
    ("cuda:0", 2, 2, "one device (cuda:0)"),  # a named device is shared by every worker
    ("cpu", 0, 2, "one device (cpu)"),
])
def test_latency_placement(monkeypatch, device, gpus, count, expected):
    import torch

    from qatcheck.parallel import Worker, latency_placement

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    placed, reason = latency_placement(Worker(1, count), device)
    if expected.startswith("cuda:"):
        assert placed == expected and reason == ""
    else:
        assert placed is None and f"{count} workers and {expected}" in reason
    assert latency_placement(Worker(0, 1), device) == (None, "")  # one worker: timed where asked


def test_a_worker_that_could_not_write_its_baselines_fails_the_run(pytester, tmp_path):
    """--update-baselines into a path that cannot be a directory, under xdist: the worker's tests
    pass, but it recorded nothing - the controller's exit status says so (issue 21, item 8c)."""
    pytester.makepyfile(test_one=SUITE.format(name="one"))
    (tmp_path / "blocker").write_text("a file where the baselines directory was asked for")
    result = run(pytester, tmp_path / "cache", tmp_path / "r", "-n", "1", "-k", "accuracy and fp32-onnxruntime",
                 "--update-baselines", "--qatcheck-baselines", str(tmp_path / "blocker" / "b"))
    assert result.parseoutcomes()["passed"] == 1 and result.ret == 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*baselines NOT updated: cannot write *blocker*nothing was recorded, so the run fails*"])


def test_an_artifact_built_on_a_workers_share_of_the_cores_is_the_same(tmp_path):
    """Issue 21 #10: a mean_abs differed in the 4th digit between ``-n 2`` and ``-n 0``. Inference
    gave bit-identical figures at 1 and 2 threads (every case of digits and digitdet), but an xdist
    worker built at its share of the cores, and PyTorch's conv backward sums in a thread-count-
    dependent order: QAT fine-tuning came out with other weights, and the figures measured on them
    could move. Builds run at a fixed thread count whatever the process has: the same artifact."""
    import dataclasses

    import torch

    from qatcheck.artifacts import ArtifactBuilder, RecipeState
    from qatcheck.cache import ArtifactCache
    from qatcheck.zoo.recipes import digits_recipe

    # a short fine-tune from a quick calibration: enough steps for the thread count to show
    quick = digits_recipe()
    recipe = digits_recipe(quant=dataclasses.replace(quick.quant, torch_calibrator="max", calib_batches=2),
                           qat=dataclasses.replace(quick.qat, epochs=1, max_batches_per_epoch=4))
    saved, states = torch.get_num_threads(), []
    try:
        for threads in (1, 2):  # what --qatcheck-threads auto gives a worker of -n 2, and -n 0, on 2 cores
            torch.set_num_threads(threads)
            builder = ArtifactBuilder(RecipeState(recipe), ArtifactCache(tmp_path / f"t{threads}"))
            states.append(torch.load(builder.torch_artifact("qat").path, weights_only=True)["state_dict"])
            assert torch.get_num_threads() == threads  # the process's own setting is left as it was
    finally:
        torch.set_num_threads(saved)
    assert states[0].keys() == states[1].keys()
    assert [k for k in states[0] if not torch.equal(states[0][k], states[1][k])] == []
