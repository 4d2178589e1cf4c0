"""Damage localization on ONNX Runtime (qatcheck.analysis.localize, `python -m qatcheck localize`)."""
from __future__ import annotations

import json

import onnx
import pytest

from qatcheck.__main__ import main
from qatcheck.analysis import localize as L
from qatcheck.analysis.sensitivity import SensitivityRunner, with_calibrator
from qatcheck.quantize.onnx_ptq import scale_qdq

DIGITS = "qatcheck.zoo.recipes:digits_recipe"
#: the activation Q/DQ pair planted on: relu1's output, which only layer1.conv2 reads, so the
#: pair is layer1.conv2's input quantizer and that layer is where the damage enters
PLANT_TENSOR = "/layer1/relu1/Relu_output_0"
PLANT_LAYER = "layer1.conv2"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from qatcheck.zoo.recipes import digits_recipe

    cache = tmp_path_factory.mktemp("cache")
    recipe = with_calibrator(digits_recipe(), "percentile")
    runner = SensitivityRunner(recipe, "onnx", cache, progress=False)
    qpath = runner.builder.onnx_artifact("trt_ptq").path
    return recipe, cache, qpath


def _planted(qpath, tmp_path, factor: float):
    out = tmp_path / f"planted-x{factor:g}.onnx"
    assert scale_qdq(qpath, out, PLANT_TENSOR, factor) == [f"{PLANT_TENSOR}_scale"]
    return out


def test_qdq_keeps_compute_tensor_names(digits):
    """onnx_ptq rewires consumers to *_dequantized tensors and keeps every compute node's output
    name, so each Conv/Gemm/Relu/Add output of the Q/DQ graph has its fp32 twin."""
    recipe, cache, qpath = digits
    runner = SensitivityRunner(recipe, "onnx", cache, progress=False)
    fmodel = onnx.load(str(runner.builder.onnx_artifact("fp32").path))
    qmodel = onnx.load(str(qpath))
    fp32_outs = [o for n in fmodel.graph.node for o in n.output]
    q_outs = [o for n in qmodel.graph.node if n.op_type not in L._QDQ for o in n.output]
    assert q_outs == fp32_outs
    tensors, skipped = L._candidates(qmodel, fmodel)
    assert tensors == fp32_outs and not skipped


def test_clean_graph_names_nothing(digits):
    recipe, cache, _ = digits
    loc = L.localize(recipe, "trt_ptq", cache_dir=cache, max_samples=64)
    assert loc.samples == 64
    assert loc.named is None and loc.first_below_floor is None
    assert all(r.cosine >= 0.99 for r in loc.rows)
    assert [r.index for r in loc.rows] == list(range(len(loc.rows)))  # topological order
    assert "no layer below the floor" in L.verdict(loc)


def test_planted_scale_ranks_first_and_dominates_clean(digits, tmp_path):
    """x8 on one activation scale (the graph stays above the floor): the layer reading it is the
    worst contributor, far below the next one and below the clean graph's worst; every other
    layer's own SQNR is what it was in the clean graph (the damage it inherits is not its own).
    Measured: 24.8 dB vs 34.1 (next, and the clean graph's worst)."""
    recipe, cache, qpath = digits
    clean = L.localize(recipe, "trt_ptq", cache_dir=cache)
    loc = L.localize(recipe, "trt_ptq", quantized_onnx=_planted(qpath, tmp_path, 8), cache_dir=cache)
    top, second = loc.row(loc.worst[0]), loc.row(loc.worst[1])
    assert top.layer == PLANT_LAYER and top.rank == 1
    assert loc.named is None  # nothing below the 0.99 floor at x8
    assert second.own_sqnr_db - top.own_sqnr_db > 6.0
    assert clean.row(clean.worst[0]).own_sqnr_db - top.own_sqnr_db > 6.0
    for r in loc.rows:
        if r.tensor != top.tensor:
            assert r.own_sqnr_db == pytest.approx(clean.row(r.tensor).own_sqnr_db, abs=1e-6)
        if r.index < top.index:  # upstream of the plant nothing changed
            assert r.sqnr_db == pytest.approx(clean.row(r.tensor).sqnr_db, abs=1e-9)


def test_planted_below_floor_is_named(digits, tmp_path):
    """x64 pushes the graph below the 0.99 cosine floor: the layer where the damage enters is
    named, not the first downstream layer below the floor that inherits it."""
    recipe, cache, qpath = digits
    loc = L.localize(recipe, "trt_ptq", quantized_onnx=_planted(qpath, tmp_path, 64),
                     cache_dir=cache)
    assert loc.first_below_floor is not None
    assert loc.named == PLANT_LAYER
    named = loc.row(loc.named_tensor)
    assert named.rank == 1
    # every downstream row is below the floor too, and inherits the damage; none is named.
    # Measured: own SQNR 5.6 dB vs 34.1 for the runner-up
    assert all(r.cosine < 0.99 for r in loc.rows if r.index >= named.index)
    assert loc.row(loc.worst[1]).own_sqnr_db - named.own_sqnr_db > 20.0
    assert f"damage enters at {PLANT_LAYER}" in L.verdict(loc)


def test_cli_writes_reports(digits, tmp_path, capsys):
    _, cache, qpath = digits
    planted = _planted(qpath, tmp_path, 64)
    reports = tmp_path / "reports"
    rc = main(["localize", "--recipe", DIGITS, "--mode", "trt_ptq", "--calibrator", "percentile",
               "--max-samples", "32", "--onnx", str(planted), "--reports", str(reports),
               "--cache", str(cache)])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"damage enters at {PLANT_LAYER}" in out and "worst five" in out
    stem = reports / "digits-localize-trt_ptq"
    for ext in ("json", "md", "png"):
        assert (stem.parent / f"{stem.name}.{ext}").stat().st_size > 0
    data = json.loads((reports / "digits-localize-trt_ptq.json").read_text())
    assert data["named"] == PLANT_LAYER and data["samples"] == 32 and len(data["worst"]) == 5
    assert "| layer1.conv2 |" in (reports / "digits-localize-trt_ptq.md").read_text()


def test_bad_mode_and_floor(digits):
    from qatcheck.errors import ConfigError

    recipe, cache, qpath = digits
    with pytest.raises(ConfigError, match="not a low-precision mode"):
        L.localize(recipe, "fp32", cache_dir=cache)
    # torch_ptq / qat are localized in PyTorch (tests/test_localize_torch.py), not on a graph
    with pytest.raises(ConfigError, match="--onnx"):
        L.localize(recipe, "torch_ptq", quantized_onnx=qpath, cache_dir=cache)
    with pytest.raises(ConfigError, match="cannot be localized on the onnx path; it can on torch"):
        L.localize(recipe, "torch_ptq", cache_dir=cache, path="onnx")
    with pytest.raises(ConfigError, match="floor"):
        L.localize(recipe, "trt_ptq", cache_dir=cache, floor=1.5)


def test_digitdet_planted_is_named(tmp_path_factory):
    """The same plant on the detector (three heads, a Resize/Concat path): x64 on the input
    scale of ``down2.b.conv`` (the pair on ``/down2/a/relu/Relu_output_0``) names down2.b.conv.
    Builds digitdet's fp32 and trt_ptq ONNX (about 15 s on a 2-core CPU)."""
    from qatcheck.zoo.recipes import detection_recipe

    cache = tmp_path_factory.mktemp("detcache")
    recipe = detection_recipe()
    runner = SensitivityRunner(recipe, "onnx", cache, progress=False)
    qpath = runner.builder.onnx_artifact("trt_ptq").path
    out = tmp_path_factory.mktemp("det") / "planted.onnx"
    scale_qdq(qpath, out, "/down2/a/relu/Relu_output_0", 64.0)
    clean = L.localize(recipe, "trt_ptq", cache_dir=cache, max_samples=32)
    loc = L.localize(recipe, "trt_ptq", quantized_onnx=out, cache_dir=cache, max_samples=32)
    assert clean.named is None
    assert loc.named == "down2.b.conv" and loc.row(loc.named_tensor).rank == 1
    assert loc.row(loc.worst[1]).own_sqnr_db - loc.row(loc.named_tensor).own_sqnr_db > 20.0


def test_the_quantized_side_can_come_from_another_runtime(digits, tmp_path):
    """The hook the TensorRT backend's debug tensors plug into (TensorRTBackend.debug_tensors):
    the compared tensors' quantized values come from the source given, by name. Fed the planted
    graph's values (ONNX Runtime standing in for an engine), the cumulative rows are the planted
    run's and the planted layer is named, with the source in the report."""
    from qatcheck.backends.onnxruntime_backend import OrtRunner

    recipe, cache, qpath = digits
    planted = onnx.load(str(_planted(qpath, tmp_path, 64)))
    asked = []

    def debug_tensors(names):
        asked.extend(names)
        return OrtRunner(L.expose_tensors(planted, names), "CPUExecutionProvider").named_outputs

    runner = SensitivityRunner(recipe, "onnx", cache, progress=False)
    from qatcheck.data.batching import eval_batches

    batches = list(eval_batches(runner.state.eval_data, recipe.input.profile()["opt"], pad=True, max_samples=64))
    fp32 = runner.builder.onnx_artifact("fp32").path
    direct = L.localize_graphs(planted, fp32, batches, input_name=recipe.input.name)
    hooked = L.localize_graphs(planted, fp32, batches, input_name=recipe.input.name,
                               quantized_tensors=debug_tensors, path="tensorrt debug tensors")
    assert asked == [r.tensor for r in direct.rows]
    assert [round(r.cosine, 6) for r in hooked.rows] == [round(r.cosine, 6) for r in direct.rows]
    assert hooked.named == direct.named == PLANT_LAYER
    assert hooked.path == "tensorrt debug tensors" and "debug tensors" in hooked.method


# ---- automatic localization: off switch, time budget, once per artifact (issue 21, item 11a) ------

AUTO_SUITE = '''
import pytest
from qatcheck.standard import test_parity  # noqa: F401
from qatcheck.zoo import recipes
pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    modes=("fp32", "trt_ptq", "partial"), backends=("torch", "onnxruntime"), dynamic_modes=()))
'''


def test_failed_cases_are_localized_once_per_artifact_within_a_budget_or_not_at_all(pytester, digits, tmp_path):
    """Plant: trt_ptq and partial run the same planted graph, byte for byte (partial keeping nothing
    is trt_ptq). Their parity fails; trt_ptq is localized and partial reuses its lines, saying so
    (before: localized twice, ~12 s each on digitdet). --qatcheck-localize off: no localization.
    --qatcheck-localize-budget 0: none either, and each failure prints the command that localizes
    it - which, run, names the planted layer."""
    import dataclasses
    import shlex

    from qatcheck.artifacts import ArtifactBuilder
    from qatcheck.fsutil import file_digest

    recipe, cache, qpath = digits
    planted = _planted(qpath, tmp_path, 64)
    onnx_artifact = ArtifactBuilder.onnx_artifact

    def same_graph(self, mode, dynamic=False):
        art = onnx_artifact(self, mode, dynamic)
        return (dataclasses.replace(art, path=planted, digest=file_digest(planted))
                if mode in ("trt_ptq", "partial") else art)

    pytester.makepyfile(test_digits=AUTO_SUITE)
    reports = pytester.path / "reports"

    def run(*args):
        return pytester.runpytest("-p", "no:cacheprovider", "--qatcheck-cache", str(cache),
                                  "--qatcheck-baselines", str(pytester.path / "baselines"),
                                  "--qatcheck-reports", str(reports), "--qatcheck-no-progress",
                                  "--benchmark-disable", "-k", "trt_ptq or partial", *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ArtifactBuilder, "onnx_artifact", same_graph)
        auto, off, spent = run(), run("--qatcheck-localize", "off"), run("--qatcheck-localize-budget", "0")
    auto.assert_outcomes(failed=2)
    auto.stdout.fnmatch_lines([
        "*digits-trt_ptq-onnxruntime parity check failed:*",
        f"*localize digits trt_ptq (32 samples, floor cosine 0.98): damage enters at {PLANT_LAYER}*",
        "*digits-partial-onnxruntime parity check failed:*",
        "*(the localization of digits-trt_ptq-onnxruntime: this case's artifact is byte-identical, so it was "
        "not localized again)*",
        f"*localize digits trt_ptq (32 samples, floor cosine 0.98): damage enters at {PLANT_LAYER}*"])
    assert auto.stdout.str().count("localize digits trt_ptq (32") == 2
    assert not (reports / "digits-localize-partial.md").exists()

    off.assert_outcomes(failed=2)
    assert not [ln for ln in off.stdout.lines
                if ln.strip().startswith(("localize digits", "(not localized", "(the localization of"))]

    spent.assert_outcomes(failed=2)
    out = spent.stdout.str()
    assert "damage enters" not in out and out.count("(not localized: this run's --qatcheck-localize-budget of 0 s "
                                                    "is spent; localize it with: python -m qatcheck localize") == 2, out
    line = next(ln for ln in out.splitlines() if "--mode trt_ptq" in ln and "localize it with: " in ln)
    argv = shlex.split(line.split("localize it with: ", 1)[1].rstrip(")"))[3:]
    argv[argv.index("--recipe") + 1] = DIGITS
    assert argv[argv.index("--onnx") + 1] == str(planted)
    assert main([*argv, "--calibrator", "percentile"]) == 0  # the recipe's own, as the suite ran it


def test_a_localization_stops_when_the_budget_runs_out(digits, tmp_path):
    """A budget far below one batch's time: the localization reads its first batch, stops, and
    says so with the command that localizes on every sample; the next failure is not localized,
    and a byte-identical artifact reuses the first lines without spending anything."""
    from qatcheck.data.batching import eval_batches

    recipe, cache, qpath = digits
    runner = SensitivityRunner(recipe, "onnx", cache, progress=False)
    fp32 = runner.builder.onnx_artifact("fp32").path
    batches = eval_batches(runner.state.eval_data, recipe.input.profile()["opt"], max_samples=96)
    auto = L.AutoLocalization(budget_s=1e-9)

    def localize(until):
        return L.localize_graphs(_planted(qpath, tmp_path, 64), fp32, until(batches), input_name="input",
                                 recipe="digits", mode="trt_ptq")

    lines = auto.lines("digits-trt_ptq-onnxruntime", ("planted",), localize, tmp_path, "CMD")
    assert lines[0].startswith("localize digits trt_ptq (32 samples,") and f"damage enters at {PLANT_LAYER}" in lines[0]
    assert lines[-1] == ("(localized on its first 32 samples only: the --qatcheck-localize-budget of 1e-09 s "
                         "ran out; all of them: CMD)")
    assert auto.lines("digits-partial-onnxruntime", ("other",), localize, tmp_path, "CMD2") == [
        "(not localized: this run's --qatcheck-localize-budget of 1e-09 s is spent; localize it with: CMD2)"]
    spent = auto.spent
    assert auto.lines("digits-partial-onnxruntime", ("planted",), localize, tmp_path, "CMD2") == [
        "(the localization of digits-trt_ptq-onnxruntime: this case's artifact is byte-identical, so it was "
        "not localized again)", *lines]
    assert auto.spent == spent
