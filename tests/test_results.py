"""The result cache (qatcheck.results): a case's measured parts are reused only while every input
of their key is unchanged. Each input is changed in turn - through the recipe where it is one of
its fields (the quantizer's settings, the eval data, the task), through the library or code it
stands for otherwise - and the case is measured again; unchanged, it is reused with the same
figures. Planted regressions on a warm cache: tests/test_verdicts.py runs all of its plants on a
module-wide cache that clean runs filled."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qatcheck import results
from qatcheck.artifacts import ArtifactBuilder
from qatcheck.backends.onnxruntime_backend import OrtBackend
from qatcheck.data import ArrayDataset
from qatcheck.data.digits import digits_split
from qatcheck.measurement import Case
from qatcheck.options import Options
from qatcheck.session import QatcheckSession
from qatcheck.zoo.recipes import digits_recipe

CASE = Case("digits", "trt_ptq", "onnxruntime")


def shorter_val():
    ds = digits_split("val")
    return ArrayDataset(ds.name, ds.images[10:], ds.targets[10:], source=ds.source)


def relabeled_val():
    ds = digits_split("val")
    targets = ds.targets.copy()
    targets[::10] = (targets[::10] + 1) % 10
    return ArrayDataset(ds.name, ds.images, targets, source=ds.source)


def recipe(**changes):
    return digits_recipe(modes=("fp32", "trt_ptq"), backends=("torch", "onnxruntime"), dynamic_modes=(), **changes)


def other_percentile():
    r = recipe()
    return recipe(quant=dataclasses.replace(r.quant, percentile=99.0))


#: each input of the key -> how a test changes it (a recipe to use, or a plant to install)
RECIPE_INPUTS = {
    "the artifact (its calibration percentile)": other_percentile,
    "the eval inputs": lambda: recipe(eval_data=shorter_val),
    "the eval targets": lambda: recipe(eval_data=relabeled_val),
    "the task's settings (top-k)": lambda: recipe(top_k=(1, 3)),
}
PLANTED_INPUTS = {
    "the runtime's version": lambda mp: mp.setattr(onnxruntime, "__version__", "0.0.1"),
    "the parity reference's module": lambda mp: mp.setattr(
        ArtifactBuilder, "torch_identity", _wrapped(ArtifactBuilder.torch_identity)),
    "qatcheck's measuring code": lambda mp: mp.setattr(results, "measuring_code", lambda: "edited"),
    "the metric libraries": lambda mp: mp.setattr(results, "metric_libraries", lambda: {"numpy": "0"}),
}


def _wrapped(fn):
    def other(self, mode):
        return fn(self, mode) + "-retrained"
    return other


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("results-cache")


def session(cache, r=None, **options) -> QatcheckSession:
    s = QatcheckSession(Options(cache_dir=cache, baselines_dir=cache / "baselines", progress=False, **options))
    s.register(r or recipe())
    return s


def measured(cache, r=None, case=CASE, parts=("eval",), **options):
    return session(cache, r, **options).measure(case, parts)


def figures(m) -> dict:
    return {k: v for k, v in m.to_dict().items() if k not in ("seconds", "reused", "eval_seconds")}


def test_an_unchanged_case_is_reused_with_identical_figures(cache):
    first = measured(cache)
    again = measured(cache)
    assert first.reused == frozenset() and again.reused == {"eval"}
    assert figures(again) == figures(first)
    assert measured(cache, remeasure=True).reused == frozenset()  # --qatcheck-remeasure
    assert measured(cache, use_cache=False).reused == frozenset()  # --qatcheck-no-cache
    entry, = [json.loads(p.read_text()) for p in (cache / "results").glob("*.json")
              if json.loads(p.read_text())["inputs"]["case"] == ["digits", "trt_ptq", "onnxruntime", ""]]
    assert entry["inputs"]["reference"]["case"] == ["fp32", "torch", ""], entry["inputs"]


@pytest.mark.parametrize("name", RECIPE_INPUTS)
def test_a_changed_recipe_input_is_measured_again(cache, name):
    measured(cache)  # stored
    changed = RECIPE_INPUTS[name]()
    first = measured(cache, changed)
    assert first.reused == frozenset(), f"{name} changed, yet the result was reused"
    assert measured(cache, changed).reused == {"eval"}  # and then stored under its own key
    assert measured(cache).reused == {"eval"}  # the original's entry is still there


@pytest.mark.parametrize("name", PLANTED_INPUTS)
def test_a_changed_library_or_code_input_is_measured_again(cache, name):
    assert measured(cache).reused == {"eval"} or measured(cache).reused == {"eval"}
    with pytest.MonkeyPatch.context() as mp:
        PLANTED_INPUTS[name](mp)
        assert measured(cache).reused == frozenset(), f"{name} changed, yet the result was reused"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changed=st.sets(st.sampled_from(sorted(PLANTED_INPUTS))))
def test_the_key_changes_exactly_when_an_input_does(cache, changed):
    base, _ = session(cache)._result_key(CASE, "eval")
    with pytest.MonkeyPatch.context() as mp:
        for name in changed:
            PLANTED_INPUTS[name](mp)
        key, inputs = session(cache)._result_key(CASE, "eval")
    assert base is not None and (key == base) == (not changed), (changed, inputs)


def test_the_thread_count_is_an_input(cache):
    """The intra-op thread count orders the sums: the detector's batch-1 parity at its min profile
    point differed in the 8th digit at 1 and 2 threads (a pytest-xdist worker's share of the cores
    and a plain run's), so a result is reused only at the count it was measured at - for ONNX
    Runtime (the case) and PyTorch (its parity reference) alike."""
    import torch

    threads = torch.get_num_threads()
    try:
        one = session(cache, threads=1)
        key = one._result_key(CASE, "eval")[0]
        assert key != session(cache, threads=2)._result_key(CASE, "eval")[0]
        assert key == session(cache, threads=1)._result_key(CASE, "eval")[0]
        torch.set_num_threads(2)  # PyTorch's count alone (process-wide), ONNX Runtime's still 1
        assert one._result_key(CASE, "eval")[0] != key
    finally:
        torch.set_num_threads(threads)


def test_structure_is_reused_and_latency_never(cache):
    first = measured(cache, parts=("structure", "latency"), latency="always", latency_duration_s=0.2)
    again = measured(cache, parts=("structure", "latency"), latency="always", latency_duration_s=0.2)
    assert "structure" in first.parts and again.reused == {"structure"}
    assert again.structure == first.structure and again.structure.quantizers
    assert again.latency is not None and again.seconds["latency"] > 0  # timed again, every time


def test_a_backend_that_cannot_name_what_it_runs_is_always_measured(cache, monkeypatch):
    """Backend.identity None (TensorRT: the engine is the build; a backend of your own that does
    not say): nothing is stored, every run measures."""
    monkeypatch.setattr(OrtBackend, "identity", lambda self, context: None)
    before = set((cache / "results").glob("*.json")) if (cache / "results").is_dir() else set()
    other = recipe(top_k=(1, 2))  # a key nothing else in this module stores
    assert measured(cache, other).reused == frozenset() and measured(cache, other).reused == frozenset()
    assert set((cache / "results").glob("*.json")) == before


def test_an_unreadable_entry_is_measured_again_and_replaced(cache):
    m = measured(cache)
    key, _ = session(cache)._result_key(CASE, "eval")
    path = cache / "results" / f"{key}.json"
    path.write_text("{ truncated")
    again = measured(cache)
    assert again.reused == frozenset() and figures(again) == figures(m)
    assert json.loads(path.read_text())["values"]["metrics"] == {k: float(v) for k, v in m.metrics.items()}


def test_reused_output_shapes_are_still_checked_against_the_baseline(cache):
    """The session checks each output's shape against the baseline's before a metric reads it; a
    reused result is checked the same way (the baseline may have changed since it was stored)."""
    from qatcheck.errors import DataError

    measured(cache)
    (cache / "baselines").mkdir(exist_ok=True)
    (cache / "baselines" / "digits.json").write_text(json.dumps(
        {"qatcheck_baseline": 1, "recipe": "digits", "cases": {}, "outputs": {"logits": [12]}}))
    try:
        with pytest.raises(DataError, match=r"output 'logits' has per-sample shape \(10,\); the baseline recorded \(12,\)"):
            measured(cache)
    finally:
        (cache / "baselines" / "digits.json").unlink()
    assert np.isfinite(measured(cache).metrics["top1"])


def test_a_parity_reference_read_by_two_cases_runs_once_with_the_same_figures(cache, monkeypatch):
    """Within a run, torch fp32 - the reference of both fp32 and trt_ptq on ONNX Runtime - runs
    over the eval set once when both are selected, and each case's figures are those of a run
    that ran it for each (a session used without the plugin's selection keeps nothing)."""
    from qatcheck.backends.torch_backend import TorchRunner

    calls = []
    infer = TorchRunner.infer
    monkeypatch.setattr(TorchRunner, "infer", lambda self, x: (calls.append(len(x)), infer(self, x))[1])
    pair = [Case("digits", "fp32", "onnxruntime"), Case("digits", "trt_ptq", "onnxruntime")]

    def run(selected):
        calls.clear()
        s = session(cache, remeasure=True)
        s.selected = selected
        return [figures(s.measure(c)) for c in pair], len(calls)

    alone, ran_alone = run(None)
    shared, ran_shared = run(set(pair))
    assert shared == alone and ran_shared * 2 == ran_alone > 0


def test_the_cache_command_counts_and_prunes_stored_results(cache, tmp_path, capsys):
    import shutil

    from qatcheck.__main__ import main as cli

    measured(cache)
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    stored = len(list((copy / "results").glob("*.json")))
    assert stored and cli(["cache", "--cache", str(copy)]) == 0
    assert f"{stored} stored results" in capsys.readouterr().out
    assert cli(["cache", "prune", "--older-than", "1", "--cache", str(copy)]) == 0  # all fresh: kept
    assert len(list((copy / "results").glob("*.json"))) == stored
    assert cli(["cache", "prune", "--all", "--cache", str(copy)]) == 0
    assert f"{stored} stored result(s) removed" in capsys.readouterr().out
    assert not list((copy / "results").glob("*.json"))
