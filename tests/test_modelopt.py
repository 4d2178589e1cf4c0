"""NVIDIA ModelOpt as the torch-side quantizer (QuantSettings.torch_quantizer="modelopt") and the
opt-in fp8 mode, on the real digits recipe: the setting validates and keys the cache, torch_ptq and
qat stay within the issue's fp32 budgets, the exported graphs agree with PyTorch on ONNX Runtime,
the fp8 graph is standard float8 Q/DQ that ONNX Runtime runs, and, through the plugin, planted
regressions (an amax x64, a disabled quantizer) fail the checks naming the quantizer while a clean
rerun stays green. Skipped without nvidia-modelopt (pip install -e '.[modelopt]')."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qatcheck.quantize import modelopt_quant

pytestmark = pytest.mark.modelopt
_missing = modelopt_quant.missing_reason("tests/test_modelopt.py")
if _missing:
    pytest.skip(_missing, allow_module_level=True)

# imported here, before any pytester run: an in-process run drops the modules it imported itself
modelopt_quant._mtq()
import modelopt.torch.opt  # noqa: E402,F401
import modelopt.torch.quantization.calib  # noqa: E402,F401
import modelopt.torch.quantization.model_calib  # noqa: E402,F401
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from qatcheck import artifacts  # noqa: E402
from qatcheck.artifacts import ArtifactBuilder, RecipeState  # noqa: E402
from qatcheck.cache import ArtifactCache, cache_key  # noqa: E402
from qatcheck.errors import ConfigError  # noqa: E402
from qatcheck.modes import spec  # noqa: E402
from qatcheck.quantize.qdq_rules import QDQRules  # noqa: E402
from qatcheck.quantize.structure import compare_structure, onnx_structure, to_entries, torch_structure  # noqa: E402
from qatcheck.recipe import QATSettings, QuantSettings  # noqa: E402
from qatcheck.zoo.recipes import digits_modelopt_recipe, digits_recipe  # noqa: E402

#: the test recipe: digits_modelopt at the build shape, QAT over one short epoch (cheap, same code)
OVERRIDES = dict(modes=("fp32", "torch_ptq", "qat", "fp8"), dynamic_modes=(),
                 qat=QATSettings(epochs=1, lr=1e-4, batch_size=64, max_batches_per_epoch=12))
RECIPE_CALL = ('digits_modelopt_recipe(modes=("fp32", "torch_ptq", "fp8"), dynamic_modes=(), '
               'qat=QATSettings(epochs=1, lr=1e-4, batch_size=64, max_batches_per_epoch=12))')


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("modelopt-cache")


@pytest.fixture(scope="module")
def builder(cache_dir, single_thread_module) -> ArtifactBuilder:
    return ArtifactBuilder(RecipeState(digits_modelopt_recipe(**OVERRIDES)), ArtifactCache(cache_dir))


@pytest.fixture(scope="module")
def val(builder):
    xs, ys = zip(*builder.state.eval_data.batches(256))
    return np.concatenate(xs), np.concatenate(ys)


def _torch_logits(module, x):
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def _ort_logits(path, x):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


# ---- the setting ----------------------------------------------------------------------------------

def test_torch_quantizer_validates_and_keys_the_cache(tmp_path):
    with pytest.raises(ConfigError, match=r"QuantSettings.torch_quantizer 'tensorrt' is unknown; "
                                          r"choose one of pytorch-quantization, modelopt"):
        QuantSettings(torch_quantizer="tensorrt").validate()
    with pytest.raises(ConfigError, match=r"torch_calibrator 'mse' is not available with "
                                          r"torch_quantizer='modelopt'.*max, entropy, percentile"):
        QuantSettings(torch_quantizer="modelopt", torch_calibrator="mse").validate()
    with pytest.raises(ConfigError, match="qdq_rules are pytorch-quantization's placement rules"):
        QuantSettings(torch_quantizer="modelopt", torch_calibrator="max", qdq_rules=QDQRules()).validate()
    with pytest.raises(ConfigError, match="modelopt_config is set but torch_quantizer is 'pytorch-quantization'"):
        QuantSettings(modelopt_config={"quant_cfg": []}).validate()
    with pytest.raises(ConfigError, match="the config's 'algorithm' calibrates; set torch_calibrator='max'"):
        QuantSettings(torch_quantizer="modelopt", modelopt_config={"quant_cfg": []}).validate()
    with pytest.raises(ConfigError, match="fp8_calibrator 'entropy' is not available; choose one of max, percentile"):
        QuantSettings(fp8_calibrator="entropy").validate()
    for calibrator in ("max", "entropy", "percentile"):
        QuantSettings(torch_quantizer="modelopt", torch_calibrator=calibrator).validate()

    def keys(quant):
        b = ArtifactBuilder(RecipeState(digits_recipe(quant=quant)), ArtifactCache(tmp_path))
        return {m: cache_key(b.key_parts(spec(m))) for m in ("trt_ptq", "torch_ptq", "qat", "fp8")}
    pq = keys(QuantSettings(torch_calibrator="max"))
    mo = keys(QuantSettings(torch_calibrator="max", torch_quantizer="modelopt"))
    # switching the quantizer rebuilds torch_ptq and qat, nothing else
    assert {m for m in pq if pq[m] != mo[m]} == {"torch_ptq", "qat"}


def test_fp8_is_an_opt_in_row():
    from qatcheck.modes import MODES

    s = spec("fp8")
    assert "fp8" not in MODES and "fp8" not in digits_recipe().modes
    assert (s.precision, s.int8, s.has_torch, s.backends) == ("fp8", True, True, ("torch", "onnxruntime", "tensorrt"))


# ---- torch_ptq / qat through ModelOpt -------------------------------------------------------------

def test_torch_ptq_and_qat_stay_within_budget_and_export_faithfully(builder, val):
    x, y = val
    fp32 = (_torch_logits(builder.torch_artifact("fp32").module, x).argmax(1) == y).mean()
    budgets = {"torch_ptq": 0.010, "qat": 0.005}  # the targets, in top-1 fraction
    for mode, budget in budgets.items():
        module = builder.torch_artifact(mode).module
        assert modelopt_quant.is_modelopt_model(module), mode
        t = _torch_logits(module, x)
        o = _ort_logits(builder.onnx_artifact(mode, dynamic=True).path, x)
        top1 = (t.argmax(1) == y).mean()
        assert top1 >= fp32 - budget, (mode, top1, fp32)
        assert (t.argmax(1) == o.argmax(1)).mean() >= 0.99, mode  # ONNX Runtime vs PyTorch
        assert np.abs(t - o).max() < 0.1, mode


def test_saved_model_restores_bit_identical(builder, val, tmp_path):
    module = builder.torch_artifact("torch_ptq").module
    modelopt_quant.save(module, tmp_path / "q.pt", builder.recipe.quant)
    restored = modelopt_quant.load(builder.state.model, tmp_path / "q.pt", builder.recipe.quant)
    x = val[0][:64]
    assert np.array_equal(_torch_logits(module, x), _torch_logits(restored, x))
    with pytest.raises(Exception, match="other quantization settings"):
        modelopt_quant.load(builder.state.model, tmp_path / "q.pt", builder.recipe.quant, fp8=True)


@pytest.mark.parametrize("mode", ["torch_ptq", "fp8"])
def test_torch_structure_equals_its_exported_graph(builder, mode):
    t = torch_structure(builder.torch_artifact(mode).module)
    o = onnx_structure(builder.onnx_artifact(mode).path)
    assert list(t.quantizers)[:2] == ["stem.conv:input", "stem.conv:weight"]
    assert t.qdq_pairs == o.qdq_pairs == 15 and compare_structure(o, to_entries(t), scale_rel=1e-6) == []


# ---- fp8 -------------------------------------------------------------------------------------------

def test_fp8_exports_float8_qdq_that_onnxruntime_runs(builder, val):
    x, y = val
    path = builder.onnx_artifact("fp8", dynamic=True).path
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    assert not [n for n in model.graph.node if n.domain == "trt"]
    consts = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 30
    assert {consts[n.input[2]].data_type for n in qdq} == {onnx.TensorProto.FLOAT8E4M3FN}
    fp32 = (_torch_logits(builder.torch_artifact("fp32").module, x).argmax(1) == y).mean()
    t = _torch_logits(builder.torch_artifact("fp8").module, x)
    o = _ort_logits(path, x)  # default optimizations: the Relu in front of each Q survives
    assert (o.argmax(1) == y).mean() >= fp32 - 0.01 and (t.argmax(1) == o.argmax(1)).mean() >= 0.99


def test_the_zero_point_shield_is_what_keeps_onnxruntime_right(builder, val, tmp_path):
    """ONNX Runtime 1.32's ReluQuantRewrite drops a Relu in front of a float8 QuantizeLinear with a
    constant zero point (modelopt_quant's module doc). Without the shield the graph goes wrong;
    with the rewrite disabled it is right again. If this fails because the unshielded graph is right,
    ONNX Runtime has fixed the rewrite and modelopt_quant._shield_zero_points can go."""
    x, y = val
    model = onnx.load(str(builder.onnx_artifact("fp8", dynamic=True).path))
    inits = {i.name for i in model.graph.initializer}
    shielded = [i for i in model.graph.input if i.name in inits]
    assert len(shielded) == 8  # the activation quantizers' zero points; weights keep constant ones
    real = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(real)
    onnx.save(model, str(tmp_path / "unshielded.onnx"))
    good = (_ort_logits(builder.onnx_artifact("fp8", dynamic=True).path, x).argmax(1) == y).mean()
    bad = (_ort_logits(tmp_path / "unshielded.onnx", x).argmax(1) == y).mean()
    session = ort.InferenceSession(str(tmp_path / "unshielded.onnx"), providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["ReluQuantRewrite"])
    fixed = (session.run(None, {"input": x})[0].argmax(1) == y).mean()
    assert good > 0.98 and fixed == good and bad < 0.5, (good, bad, fixed)


def test_fp8_is_localized_in_pytorch_on_modelopts_modules(builder):
    """fp8 localization (issue 21, item 9): ModelOpt's E4M3 fake-quant module vs fp32, module by
    module (the PyTorch path). Clean: nothing below the floor. layer1.conv1's input amax / 64
    (most of its input clipped): that layer is named first."""
    from qatcheck.analysis import localize_torch as LT
    from qatcheck.data.batching import eval_batches

    def run(qm):
        batches = eval_batches(builder.state.eval_data, (32, 1, 16, 16), pad=False, max_samples=64)
        return LT.localize_modules(qm, builder.torch_artifact("fp32").module, batches, mode="fp8")

    clean = run(builder.torch_artifact("fp8").module)
    assert clean.named is None and "layer1.conv1" in [r.layer for r in clean.rows]
    qm = builder.torch_artifact("fp8").module
    qm.layer1.conv1.input_quantizer.amax = qm.layer1.conv1.input_quantizer.amax / 64
    loc = run(qm)
    assert loc.named == "layer1.conv1" and loc.row(loc.named_tensor).rank == 1


def test_fp8_latency_is_skipped_off_an_fp8_gpu(monkeypatch):
    for device in ("cpu", "CPUExecutionProvider"):
        assert "compute capability >= 8.9" in modelopt_quant.fp8_latency_skip(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 0))
    assert "A100 (compute capability 8.0 < 8.9" in modelopt_quant.fp8_latency_skip("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    assert modelopt_quant.fp8_latency_skip("cuda:0") is None
    assert modelopt_quant.fp8_latency_skip("CUDAExecutionProvider") is None


def test_the_latency_judge_skips_fp8_off_an_fp8_gpu():
    from qatcheck.judges import judge_latency
    from qatcheck.measurement import Case, Measurement

    for device in ("cpu", "CPUExecutionProvider"):
        verdict = judge_latency(Measurement(Case("digits_modelopt", "fp8", "onnxruntime"), device=device), None,
                                tolerance_rel=0.15)
        assert verdict.status == "skip" and verdict.reason.startswith(f"fp8 latency is not measured on {device}")
    torch_ptq = judge_latency(Measurement(Case("digits_modelopt", "torch_ptq", "torch"), device="cpu"), None,
                              tolerance_rel=0.15)
    assert "pytest-benchmark is disabled" in torch_ptq.reason  # other modes: the usual path


def test_without_modelopt_the_cases_skip_with_the_install_hint(builder, monkeypatch):
    monkeypatch.setattr(modelopt_quant, "missing_reason",
                        lambda what="": f"{what} needs NVIDIA ModelOpt: {modelopt_quant.INSTALL_HINT}")
    for mode in ("fp8", "torch_ptq"):
        with pytest.raises(pytest.skip.Exception, match=r"needs NVIDIA ModelOpt: pip install -e '\.\[modelopt\]'"):
            artifacts.ptq_module(builder, spec(mode))


# ---- planted regressions through the plugin ---------------------------------------------------------

SUITE = f'''
import pytest
from qatcheck.recipe import QATSettings
from qatcheck.standard import test_accuracy, test_parity, test_structure  # noqa: F401
from qatcheck.zoo.recipes import digits_modelopt_recipe

pytestmark = pytest.mark.qatcheck_recipe({RECIPE_CALL})
'''


def _planted(real):
    """ModelOpt's calibration, then a regression: torch_ptq's layer1.conv1 input amax x64, and
    fp8's fc weight quantizer disabled (that layer then runs in fp32: only the structure sees it)."""
    def quantize(model, quant, batches, *, fp8=False, **kwargs):
        qm = real(model, quant, batches, fp8=fp8, **kwargs)
        if fp8:
            qm.fc.weight_quantizer.disable()
        else:
            qm.layer1.conv1.input_quantizer.amax = qm.layer1.conv1.input_quantizer.amax * 64
        return qm
    return quantize


def test_planted_regressions_fail_naming_the_quantizer_and_a_clean_rerun_passes(pytester, cache_dir,
                                                                               single_thread_module):
    pytester.makepyfile(test_suite=SUITE)

    def run(cache, *args):
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}",
                                            "--qatcheck-cache", str(cache), "--qatcheck-no-progress", *args)
    run(cache_dir, "--update-baselines").assert_outcomes(passed=15, skipped=3)  # fp32: reference, no structure
    stored = json.loads((pytester.path / "baselines" / "digits_modelopt.json").read_text())["cases"]
    base = stored["torch_ptq-onnxruntime"]["structure"]["layer1.conv1:input.scale"]["value"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modelopt_quant, "quantize", _planted(modelopt_quant.quantize))
        result = run(pytester.path / "planted-cache")
    out = result.stdout.str()
    result.assert_outcomes(passed=8, failed=7, skipped=3)
    for case in ("torch_ptq-torch", "torch_ptq-onnxruntime"):
        assert f"{case} structure check failed:" in out and f"{case} accuracy check failed:" in out
    result.stdout.fnmatch_lines([f"*quantizer 'layer1.conv1:input' scale {base * 64:.4g} vs baseline {base:.4g} "
                                 "(x64.00, tolerance ±5%)*"])
    result.stdout.fnmatch_lines(["*top1 98.*% is below the baseline 99.26% by 0.9* points (tolerance 0.5 points)*",
                                 "*cosine 0.9* vs torch fp32 (quantization) is below the floor 0.98*"])
    for case in ("fp8-torch", "fp8-onnxruntime"):
        assert f"{case} structure check failed:" in out and f"{case} accuracy check failed:" not in out
    result.stdout.fnmatch_lines(["*quantizer 'fc:weight' was dropped (baseline scale *)*",
                                 "*Q/DQ pair count changed: 15 -> 14*"])

    result = run(cache_dir)  # the clean artifacts again: green, nothing rebuilt
    result.assert_outcomes(passed=15, skipped=3)
    result.stdout.fnmatch_lines(["*artifact cache*: 0 built*"])
    report = (pytester.path / "reports" / "digits_modelopt.md").read_text()
    assert "note (mode fp8, every case): fp8 is simulated here" in report


def test_the_table_says_which_tool_quantized():
    """The calibrator column names ModelOpt where it, not qatcheck / pytorch-quantization, wrote the
    quantized model: torch_quantizer for the torch modes, --qatcheck-trt-ptq for the graph modes."""
    from qatcheck.modes import calibrator_of
    from qatcheck.options import Options
    from qatcheck.recipe import QuantSettings

    mo, pq = QuantSettings(torch_calibrator="max", torch_quantizer="modelopt"), QuantSettings(torch_calibrator="max")
    assert calibrator_of("torch_ptq", mo) == calibrator_of("qat", mo) == "max (modelopt)"
    assert calibrator_of("torch_ptq", pq) == "max" and calibrator_of("fp8", mo) == mo.fp8_calibrator
    assert calibrator_of("trt_ptq", pq, Options(trt_ptq="modelopt")) == f"{pq.calibrator} (modelopt)"
    assert calibrator_of("partial", pq, Options(trt_ptq="qdq")) == pq.calibrator
    assert calibrator_of("fp32", mo, Options(trt_ptq="modelopt")) == "-"


def test_a_failed_fp8_parity_case_is_localized(pytester, builder, cache_dir, single_thread_module):
    """fp8 is localized because the mode table says where (issue 22: no mode list to fall through):
    ModelOpt's fp8 module with layer1.conv1's input amax / 64 (planted on load, on a copy of the
    module's cache) fails its parity check vs fp32, and the failure names layer1.conv1 where the
    damage enters, with the per-layer table; the clean fp8 graph on ONNX Runtime, compared with
    that module (export parity), fails too and gets the line saying why it is not localized. The
    clean artifacts first: parity green (recorded), nothing localized."""
    import shutil

    for m in ("fp32", "fp8"):  # built once, into the module's cache (the plant happens on load)
        builder.torch_artifact(m), builder.onnx_artifact(m)
    cache = pytester.path / "cache"
    shutil.copytree(cache_dir, cache)
    pytester.makepyfile(test_suite=SUITE)
    args = ("-p", "no:cacheprovider", f"--rootdir={pytester.path}", "--qatcheck-cache", str(cache),
            "--qatcheck-no-progress", "-k", "parity and fp8")
    real = modelopt_quant.load

    def planted(model, path, quant, fp8=False):
        qm = real(model, path, quant, fp8=fp8)
        if fp8:
            qm.layer1.conv1.input_quantizer.amax = qm.layer1.conv1.input_quantizer.amax / 64
        return qm

    clean = pytester.runpytest_inprocess(*args, "--update-baselines")
    clean.assert_outcomes(passed=2)
    assert "per-layer table" not in clean.stdout.str()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modelopt_quant, "load", planted)
        # planted in memory: qatcheck's measuring code on disk is as it was, and the result cache
        # keys on it (an edit is measured again: tests/test_results.py), so measured on demand
        result = pytester.runpytest_inprocess(*args, "--qatcheck-remeasure")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*digits_modelopt-fp8-torch parity check failed:*",
                                 "*localize digits_modelopt fp8 (32 samples, floor cosine 0.98): damage "
                                 "enters at layer1.conv1: own SQNR *",
                                 "*per-layer table: *digits_modelopt-localize-fp8.md*"])
    result.stdout.fnmatch_lines(["*digits_modelopt-fp8-onnxruntime parity check failed:*",
                                 "*(no localization: onnxruntime runs the export of fp8 and is compared with fp8 "
                                 "in PyTorch; where quantization damage enters is localized on the "
                                 "digits_modelopt-fp8-torch case)*"])
    data = json.loads((pytester.path / "reports" / "digits_modelopt-localize-fp8.json").read_text())
    assert data["named"] == "layer1.conv1" and data["path"] == "torch"
