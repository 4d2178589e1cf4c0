"""Sensitivity profiling and accuracy-budgeted partial quantization (qatcheck.analysis, CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qatcheck.__main__ import load_recipe, main
from qatcheck.analysis import sensitivity as S
from qatcheck.analysis.sensitivity import PATH_MODE
from qatcheck.analysis.sensitivity_report import table_rows, write_reports
from qatcheck.backends.onnxruntime_backend import OrtRunner
from qatcheck.backends.torch_backend import TorchRunner
from qatcheck.data.base import ArrayDataset
from qatcheck.data.batching import eval_batches
from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.evaluate import combined_parity, evaluate
from qatcheck.quantize.onnx_ptq import OnnxPTQConfig, quantize_onnx
from qatcheck.quantize.qdq_edit import quantized_layers, strip_qdq
from qatcheck.recipe import QuantSettings, Recipe

PLANTED = "layer1.conv2"
OUTLIER = 1000.0


def _planted_net() -> nn.Module:
    """The zoo's DigitsNet with one destructive layer planted: channel 0 of ``layer1.bn1`` (weight
    and bias) is scaled by OUTLIER, so relu1's channel 0 is OUTLIER times larger (ReLU is
    positive-homogeneous), and ``layer1.conv2``'s weights reading that channel are divided by
    OUTLIER. The fp32 function is unchanged, relu1's output feeds only ``layer1.conv2``, and that
    layer's int8 quantization is destroyed: the outlier channel takes the whole per-tensor input
    range (every other channel rounds to zero) and its shrunk weights round to zero in their
    per-output-channel scale. No other layer sees anything unusual."""
    from qatcheck.zoo.digits_net import DIGITS_CHECKPOINT, load_digits_net

    net = load_digits_net(DIGITS_CHECKPOINT).eval()
    with torch.no_grad():
        net.layer1.bn1.weight[0] *= OUTLIER
        net.layer1.bn1.bias[0] = abs(float(net.layer1.bn1.bias[0])) * OUTLIER
        net.layer1.conv2.weight[:, 0] /= OUTLIER
    return net


@pytest.fixture(scope="module")
def planted_recipe() -> Recipe:
    from qatcheck.data.digits import digits_split
    from qatcheck.zoo.recipes import digits_recipe

    net = _planted_net()
    val = digits_split("val")
    small = ArrayDataset("digits_val192", val.images[:192], np.asarray(val.targets)[:192])
    return digits_recipe(name="planted", model=lambda: net, eval_data=lambda: small,
                         weights_id="planted", modes=("fp32", "trt_ptq", "torch_ptq"),
                         top_k=(1,),
                         quant=QuantSettings(calibrator="minmax", torch_calibrator="max",
                                             calib_batches=2))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sens_cache")


@pytest.mark.parametrize("path", ["onnx", "torch"])
def test_planted_layer_ranked_first_and_chosen(planted_recipe, cache_dir, path):
    runner = S.SensitivityRunner(planted_recipe, path, cache_dir, progress=False)
    prof = S.profile(runner, path, max_samples=96, only_quantized=True)
    assert prof.fp32 > 0.98
    assert prof.ptq < prof.fp32 - 0.2, f"the planted outlier should break {prof.mode}: {prof.ptq:.2%}"
    assert prof.ranked[0] == PLANTED, table_rows(prof)
    sqnr = [r.excluded_sqnr_db for r in prof.layers]  # the ranking key: continuous, no ties
    assert sqnr == sorted(sqnr, reverse=True) and len(set(sqnr)) == len(sqnr)
    assert all(r.only_sqnr_db is not None for r in prof.layers)
    top = prof.row(PLANTED)
    assert top.excluded_metric >= prof.fp32 - 0.01 and top.gain_points > 20
    assert top.only_drop_points > 20  # quantized alone it still breaks the model
    assert all(r.only_drop_points < 5 for r in prof.layers if r.layer != PLANTED)
    # layer names are PyTorch module names on both paths
    assert {"stem.conv", "layer1.conv1", "layer2.downsample.conv", "fc"} <= set(prof.ranked)

    res = S.choose_layers(runner, S.Budget(points=0.5), path, prof=prof)
    assert res.met and res.layers == [PLANTED], res.message
    assert res.ptq < res.fp32 - 0.2 and res.partial >= res.fp32 - 0.005
    assert res.samples == 192  # the budget is verified on the whole eval set
    assert "keep_precision=('layer1.conv2',)" in res.message
    # kept under test: the chosen list passes, a list without it fails with a readable line
    assert S.check_keep_precision(runner, S.Budget(points=0.5), layers=res.layers) == []
    assert S.check_keep_precision(runner, S.Budget(points=0.5), layers=["layer1"]) == []  # prefix
    (line,) = S.check_keep_precision(runner, S.Budget(points=0.5), layers=["stem.conv"])
    assert f"{PATH_MODE[path]} with keep_precision=('stem.conv',)" in line and "misses" in line


def test_strip_qdq_equals_exclude(tmp_path):
    """Removing one layer's Q/DQ from the calibrated graph = quantize_onnx with that layer excluded
    (a branch shares its input Q/DQ pair with a sibling conv, which must keep it)."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a = nn.Conv2d(8, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = torch.relu(self.a(x)) + self.b(x)
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(1)
    fp32 = tmp_path / "fp32.onnx"
    torch.onnx.export(Branchy().eval(), (torch.randn(4, 3, 8, 8),), str(fp32), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    cfg = OnnxPTQConfig(calibrator="entropy", num_bins=256)
    quantize_onnx(fp32, tmp_path / "all.onnx", batches, cfg)
    full = onnx.load(str(tmp_path / "all.onnx"))
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)

    def run(model) -> np.ndarray:
        src = str(model) if isinstance(model, Path) else model.SerializeToString()
        return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    assert set(quantized_layers(full)) == {"stem", "a", "b", "fc"}
    for layers in (["a"], ["stem"], ["fc", "b"]):
        ref = tmp_path / f"ex_{'_'.join(layers)}.onnx"
        quantize_onnx(fp32, ref, batches, OnnxPTQConfig(calibrator="entropy", num_bins=256,
                                                        exclude=tuple(layers)))
        stripped = strip_qdq(full, layers)
        onnx.checker.check_model(stripped)
        np.testing.assert_array_equal(run(stripped), run(ref), err_msg=f"strip {layers}")
        assert set(quantized_layers(stripped)) == {"stem", "a", "b", "fc"} - set(layers)
        n_qdq = lambda m: sum(n.op_type == "QuantizeLinear" for n in m.graph.node)  # noqa: E731
        assert n_qdq(stripped) == n_qdq(onnx.load(str(ref)))
    assert not np.array_equal(run(strip_qdq(full, ["a"])), run(full))
    with pytest.raises(ConfigError, match="'nope'.*available"):
        strip_qdq(full, ["nope"])


@pytest.mark.parametrize("path", ["onnx", "torch"])
def test_sensitivity_numbers_are_the_shared_loops(planted_recipe, cache_dir, path):
    """The profile and the budget search evaluate through qatcheck.evaluate on eval_batches with the
    backends' runners: the same numbers as evaluating those runners directly."""
    runner = S.SensitivityRunner(planted_recipe, path, cache_dir, progress=False)
    task, data = runner.task, runner.state.eval_data
    shape, primary, pad = planted_recipe.input.profile()["opt"], task.primary_metric, path == "onnx"
    if path == "onnx":
        ort_runner = lambda p: OrtRunner(p, provider="CPUExecutionProvider",  # noqa: E731
                                         input_name=planted_recipe.input.name)
        fp32 = ort_runner(runner.builder.onnx_artifact("fp32").path)
        ptq = ort_runner(runner.builder.onnx_artifact(PATH_MODE[path]).path)
    else:
        fp32 = TorchRunner(runner.state.model, precision="fp32", device="cpu")
        ptq = TorchRunner(runner.builder.torch_artifact(PATH_MODE[path]).module, precision="int8",
                          device="cpu")

    full = evaluate(fp32.infer, eval_batches(data, shape, pad=pad), task)
    assert full.samples == 192 and runner.full_metric(None) == full.metrics[primary]
    assert runner.full_metric([]) == evaluate(ptq.infer, eval_batches(data, shape, pad=pad),
                                              task).metrics[primary]
    prof = S.profile(runner, path, max_samples=64)
    sub = evaluate(ptq.infer, eval_batches(data, shape, pad=pad, max_samples=64), task,
                   reference=fp32.infer)
    assert prof.samples == sub.samples == 64 and prof.ptq == sub.metrics[primary]
    assert prof.ptq_cosine == pytest.approx(combined_parity(sub)["cosine"], rel=1e-9)


def test_ort_runner_takes_in_memory_models(tmp_path):
    """The ONNX path's variants are never written to disk: OrtRunner runs a ModelProto or its bytes
    like the file."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["out"], name="relu")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "relu.onnx"))
    x = np.array([[-1, 0, 2], [3, -4, 5]], dtype=np.float32)
    for src in (tmp_path / "relu.onnx", model, model.SerializeToString()):
        (out,) = OrtRunner(src, provider="CPUExecutionProvider").infer(x)
        np.testing.assert_array_equal(out, np.maximum(x, 0))
    with pytest.raises(ArtifactError, match="cannot load an in-memory ONNX model"):
        OrtRunner(b"not onnx", provider="CPUExecutionProvider")


def test_profile_cache_hit_and_reports(planted_recipe, tmp_path):
    cache = tmp_path / "cache"
    first = S.SensitivityRunner(planted_recipe, "onnx", cache, progress=False)
    p1 = S.profile(first, "onnx", max_samples=64)
    assert not p1.cached and first.evaluations == p1.evaluations == 2 + len(p1.layers)
    second = S.SensitivityRunner(planted_recipe, "onnx", cache, progress=False)
    p2 = S.profile(second, "onnx", max_samples=64)
    assert p2.cached and second.evaluations == 0
    assert p2.ranked == p1.ranked and p2.key == p1.key
    # another subset is another key
    third = S.SensitivityRunner(planted_recipe, "onnx", cache, progress=False)
    assert not S.profile(third, "onnx", max_samples=32).cached and third.evaluations > 0

    files = write_reports(p2, tmp_path / "reports")
    assert [f.name for f in files] == ["planted-sensitivity.json", "planted-sensitivity.png",
                                       "planted-sensitivity.md"]
    data = json.loads(files[0].read_text())
    assert data["profile"]["layers"][0]["layer"] == PLANTED and data["budget"] is None
    assert data["budget_check"] is None and data["profile"]["ranked_by"] == "excluded_sqnr_db"
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files[2].read_text()
    assert md.startswith("# planted: trt_ptq sensitivity") and f"| 1 | {PLANTED} |" in md
    assert "## Budget" not in md


def test_budget_already_met_and_unreachable(planted_recipe, cache_dir, monkeypatch):
    runner = S.SensitivityRunner(planted_recipe, "onnx", cache_dir, progress=False)
    prof = S.profile(runner, "onnx", max_samples=96)
    loose = S.choose_layers(runner, S.Budget(relative=0.1), "onnx", prof=prof)  # ptq ~11%
    assert loose.met and loose.layers == [] and "already meets" in loose.message

    real = runner.full_metric
    # a model whose quantized layers are not the whole story: even all excluded stays at 60%
    monkeypatch.setattr(runner, "full_metric", lambda ex: real(ex) if not ex else 0.6)
    res = S.choose_layers(runner, S.Budget(points=0.5), "onnx", prof=prof)
    assert not res.met and res.layers == [] and len(res.steps) == 1
    assert "cannot be met" in res.message and "all 7 quantized layers" in res.message


def test_budget_and_names_validation(planted_recipe, cache_dir):
    with pytest.raises(ConfigError, match="exactly one"):
        S.Budget()
    with pytest.raises(ConfigError, match="exactly one"):
        S.Budget(points=0.5, relative=0.99)
    with pytest.raises(ConfigError, match="relative"):
        S.Budget(relative=1.5)
    assert S.Budget(points=0.5).floor(0.9926) == pytest.approx(0.9876)
    assert S.Budget(relative=0.99).floor(0.9) == pytest.approx(0.891)
    with pytest.raises(ConfigError, match="unknown sensitivity path 'tensorrt'"):
        S.SensitivityRunner(planted_recipe, "tensorrt", cache_dir)
    with pytest.raises(ConfigError, match="torch_calibrator 'minmax'"):
        S.with_calibrator(planted_recipe, "minmax", "torch")
    runner = S.SensitivityRunner(planted_recipe, "torch", cache_dir, progress=False)
    with pytest.raises(ConfigError, match=r"'conv9'.*quantized layers: stem.conv, layer1.conv1"):
        runner.full_metric(["conv9"])
    prof = S.profile(runner, "torch", max_samples=64)
    with pytest.raises(ConfigError, match="'conv9' is not in the torch profile"):
        prof.row("conv9")


def test_keep_list_round_trip_and_mismatch(tmp_path):
    from qatcheck.analysis.keeplist import keep_list, load_keep_list, write_keep_list

    row = S.LayerSensitivity("fc", ["/fc/Gemm"], 0.9, 0.99, 40.0, rank=1)
    prof = S.Profile("r", "onnx", PATH_MODE["onnx"], "minmax", "top1", 64, 0.95, 0.5, 0.9, [row])
    res = S.BudgetResult("r", "onnx", S.Budget(points=0.5), "top1", 192, 0.95, 0.5, 0.949, 0.945,
                         ["fc"], True)
    keep = load_keep_list(write_keep_list(keep_list(prof, res), tmp_path / "keep.json"))
    assert keep.layers == ("fc",) and "rank 1 of 1" in keep.reasons["fc"]
    assert keep.summary.startswith("trt_ptq top1 50.00% -> partial 94.90%")
    with pytest.raises(ConfigError, match="profile is for r/torch"):
        keep_list(S.Profile(**{**prof.__dict__, "path": "torch"}), res)


def test_recipe_spec_errors(capsys):
    with pytest.raises(ConfigError, match="must be 'module:callable'"):
        load_recipe("qatcheck.zoo.recipes")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'"):
        load_recipe("no_such_module:recipe")
    with pytest.raises(ConfigError, match="has no attribute 'nope'.*digits_recipe"):
        load_recipe("qatcheck.zoo.recipes:nope")
    with pytest.raises(ConfigError, match="returned PosixPath, not a qatcheck.recipe.Recipe"):
        load_recipe("qatcheck.zoo.recipes:Path")
    with pytest.raises(ConfigError, match=r"calling read_checkpoint\(\) failed: TypeError"):
        load_recipe("qatcheck.zoo.digits_net:read_checkpoint")  # needs an argument
    assert main(["sensitivity", "--recipe", "qatcheck.zoo.recipes:nope"]) == 2
    assert "error: recipe spec" in capsys.readouterr().err
    assert main(["sensitivity", "--recipe", "qatcheck.zoo.recipes:digits_recipe",
                 "--calibrator", "kl"]) == 2
    assert "calibrator 'kl' is unknown" in capsys.readouterr().err


def test_cli_end_to_end_on_digits(tmp_path, capsys):
    argv = ["sensitivity", "--recipe", "qatcheck.zoo.recipes:digits_recipe", "--calibrator",
            "minmax", "--max-samples", "64", "--budget-points", "0.5", "--no-progress",
            "--reports", str(tmp_path / "reports"), "--cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trt_ptq sensitivity" in out and "stem.conv" in out and "evaluations" in out
    assert "SQNR excl. (dB)" in out  # the ranking key is a column
    assert "already meets the budget" in out and "on the full eval set of 540" in out
    assert "on the profile's 64-sample subset trt_ptq top1 is" in out  # both figures stated
    data = json.loads((tmp_path / "reports" / "digits-sensitivity.json").read_text())
    assert data["profile"]["calibrator"] == "minmax" and data["profile"]["samples"] == 64
    assert data["budget"]["met"] and data["keep_precision"] == []
    assert data["budget_check"]["subset"]["samples"] == 64
    assert data["budget_check"]["full"]["samples"] == 540
    assert "| full eval set (decides) | 540 |" in (tmp_path / "reports" / "digits-sensitivity.md").read_text()
    assert (tmp_path / "reports" / "digits-sensitivity.png").stat().st_size > 1000
    assert main(argv) == 0
    assert "(cache)" in capsys.readouterr().out
