"""``--qatcheck-trt-ptq modelopt`` (NVIDIA ModelOpt's ONNX PTQ writes the trt_ptq / partial graph)
and the cross-check of our ONNX PTQ against it (``python -m qatcheck crosscheck``), on the real
digits recipe. Every artifact lands in one module-wide cache, so each graph is built once.

The cross-check's disagreement threshold is ``ptq_crosscheck.DISAGREE_RATIO`` (x1.10 either way):
the clean minmax pair agrees to float rounding (< 1e-6), a planted x8 scale is far beyond it.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

from qatcheck.quantize import modelopt_onnx

_REASON = modelopt_onnx.unavailable_reason()  # imports ModelOpt now: before any pytester snapshot
if _REASON:
    pytest.skip(f"ModelOpt's ONNX PTQ is not usable here: {_REASON}", allow_module_level=True)

from qatcheck.analysis import ptq_crosscheck as X  # noqa: E402
from qatcheck.artifacts import ArtifactBuilder, RecipeState, onnx_quantizer_for  # noqa: E402
from qatcheck.cache import ArtifactCache, cache_key  # noqa: E402
from qatcheck.errors import ConfigError  # noqa: E402
from qatcheck.modes import spec as mode_spec  # noqa: E402
from qatcheck.options import Options  # noqa: E402
from qatcheck.quantize.onnx_ptq import OnnxPTQConfig, scale_qdq  # noqa: E402
from qatcheck.zoo.recipes import digits_recipe  # noqa: E402

pytestmark = pytest.mark.modelopt

#: the activation and the weight the planted regressions scale
ACT = "/layer1/relu1/Relu_output_0"
WEIGHT = "weight of /layer1/conv2/Conv"


def with_form(b: ArtifactBuilder, form: str) -> ArtifactBuilder:
    """The builder a session with --qatcheck-trt-ptq ``form`` makes (the same recipe and cache)."""
    return ArtifactBuilder(b.state, b.cache, onnx_quantizer=onnx_quantizer_for(Options(trt_ptq=form)))


def minmax_digits(**quant):
    r = digits_recipe()
    return dataclasses.replace(r, quant=dataclasses.replace(r.quant, calibrator="minmax", **quant))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("modelopt-cache")


@pytest.fixture(scope="module")
def builder(cache):
    return ArtifactBuilder(RecipeState(minmax_digits()), ArtifactCache(cache))


@pytest.fixture(scope="module")
def graphs(cache):
    """fp32 / ours / modelopt trt_ptq graphs of digits, minmax, from the cross-check's builder."""
    return X.build_graphs(digits_recipe(), "minmax", cache_dir=cache)[1]


def top1(builder, path, samples=None) -> float:
    from qatcheck import evaluate as evaluation
    from qatcheck.backends.onnxruntime_backend import OrtRunner
    from qatcheck.data.batching import eval_batches
    from qatcheck.tasks import make_task

    r = builder.recipe
    task = make_task(r, lambda: builder.state.eval_data)
    batches = eval_batches(builder.state.eval_data, r.input.profile()["opt"], max_samples=samples)
    infer = OrtRunner(path, provider="CPUExecutionProvider", input_name=r.input.name).infer
    return evaluation.evaluate(infer, batches, task).metrics["top1"]


def dq_fed(model: onnx.ModelProto) -> dict[str, set[int]]:
    """node name -> the input indices that read a DequantizeLinear output"""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: {i for i, t in enumerate(n.input) if t in dq} for n in model.graph.node}


# ---- the option ---------------------------------------------------------------------------------
def test_option_builds_a_modelopt_qdq_graph_that_scores_like_fp32(builder, cache):
    art = with_form(builder, "modelopt").onnx_artifact("trt_ptq")
    model = onnx.load(str(art.path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and ops.count("QuantizeLinear") == ops.count("DequantizeLinear")
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= modelopt_onnx.MODELOPT_MIN_OPSET
    # ModelOpt's placement, not ours: a residual Add reads a quantized input (ours never does)
    fed = dq_fed(model)
    assert any(fed[n.name] for n in model.graph.node if n.op_type == "Add")
    manifest = json.loads(art.path.with_suffix(".json").read_text())
    assert manifest["parts"]["quantizer"] == modelopt_onnx.quantizer_id()
    fp32, q = top1(builder, builder.onnx_artifact("fp32").path), top1(builder, art.path)
    assert abs(q - fp32) <= 0.005, (fp32, q)


def test_the_choice_enters_the_cache_key_of_trt_ptq_and_partial_only(builder):
    keys = {}
    for form in ("auto", "native", "qdq", "modelopt"):
        b = with_form(builder, form)
        keys[form] = {m: b.key_parts(mode_spec(m)) for m in ("fp32", "trt_ptq", "partial", "torch_ptq")}
    for mode in ("trt_ptq", "partial"):
        # qdq / native / auto: our quantizer, the keys existing caches were written under
        assert keys["auto"][mode] == keys["qdq"][mode] == keys["native"][mode]
        assert "quantizer" not in keys["qdq"][mode]
        assert cache_key(keys["modelopt"][mode]) != cache_key(keys["qdq"][mode])
        assert {k: v for k, v in keys["modelopt"][mode].items() if k != "quantizer"} == keys["qdq"][mode]
    for mode in ("fp32", "torch_ptq"):
        assert keys["modelopt"][mode] == keys["qdq"][mode]


def test_dynamic_and_partial_builds(builder):
    import onnxruntime as ort

    b = with_form(builder, "modelopt")
    dyn = b.onnx_artifact("trt_ptq", dynamic=True)
    partial = b.onnx_artifact("partial")
    model = onnx.load(str(dyn.path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch stays symbolic
    sess = ort.InferenceSession(str(dyn.path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        (logits,) = sess.run(None, {"input": np.zeros((batch, 1, 16, 16), np.float32)})
        assert logits.shape == (batch, 10)
    fed = dq_fed(onnx.load(str(partial.path)))
    assert fed["/stem/conv/Conv"] == set()  # QuantSettings.keep_precision = ("stem.conv",)
    assert fed["/layer1/conv1/Conv"] == {0, 1}


def test_refusals_are_config_errors(builder, cache):
    with pytest.raises(ConfigError, match="percentile.*'max' and 'entropy'"):
        modelopt_onnx.check_config(OnnxPTQConfig(calibrator="percentile"))
    with pytest.raises(ConfigError, match="per output channel"):
        modelopt_onnx.check_config(OnnxPTQConfig(calibrator="minmax", per_channel=False))
    b = ArtifactBuilder(RecipeState(digits_recipe()), ArtifactCache(cache),  # calibrator percentile
                        onnx_quantizer="modelopt")
    with pytest.raises(ConfigError, match="no ModelOpt counterpart"):
        b.onnx_artifact("trt_ptq")
    with pytest.raises(ConfigError, match="onnx_quantizer 'tensorrt': choose one of qatcheck, modelopt"):
        ArtifactBuilder(b.state, b.cache, onnx_quantizer="tensorrt")
    with pytest.raises(ConfigError, match="minmax or entropy"):
        X.build_graphs(digits_recipe(), "percentile", cache_dir=cache)


# ---- the cross-check ----------------------------------------------------------------------------
def test_crosscheck_digits_minmax_matches_every_site_with_sane_ratios(cache, tmp_path):
    check = X.crosscheck(digits_recipe(), "minmax", cache_dir=cache, max_samples=256)
    rows = {r.key: r for r in check.scales.rows}
    assert {"input", ACT, WEIGHT} <= set(rows)
    assert sum(r.kind == "activation" for r in rows.values()) >= 5
    assert sum(r.kind == "weight" for r in rows.values()) >= 6
    # the same calibration of the same data: identical to float rounding, channel by channel
    assert all(abs(r.ratio - 1) < 1e-4 and r.channels_off == 0 for r in rows.values())
    assert rows[WEIGHT].channels > 1
    assert check.scales.disagreements() == []
    assert check.scales.summary().over_10pct == 0
    # Flatten is looked through: ours quantizes the Flatten output, ModelOpt the pool output
    assert any(r.ours_tensor != r.modelopt_tensor for r in rows.values())
    # placement: ModelOpt quantizes a residual-Add input, which ours leaves in float
    assert any("(Add)" in reader for p in check.scales.only_modelopt for reader in p.readers)
    assert abs(check.metric_delta) <= 0.5 and check.agreement["top1_agreement"] >= 0.99
    paths = X.write_reports(check, tmp_path)
    assert {p.suffix for p in paths} >= {".json", ".md"}
    data = json.loads(paths[0].read_text())
    assert data["summary"]["all"]["over_10pct"] == 0 and data["disagreements"] == []
    assert "| input | activation |" in paths[1].read_text()


def test_planted_scale_is_named_the_worst_both_ways(graphs, tmp_path):
    assert X.compare_scales(graphs["ours"], graphs["modelopt"]).disagreements() == []
    # ModelOpt's activation scale x8
    planted = tmp_path / "modelopt-x8.onnx"
    scale_qdq(graphs["modelopt"], planted, ACT, 8.0)
    comp = X.compare_scales(graphs["ours"], planted)
    assert comp.worst.key == ACT and comp.worst.ratio == pytest.approx(8.0, rel=1e-4)
    assert [r.key for r in comp.disagreements()] == [ACT]
    # ours x8 instead: the ratio is 1/8, the same site is named
    planted = tmp_path / "ours-x8.onnx"
    scale_qdq(graphs["ours"], planted, ACT, 8.0)
    comp = X.compare_scales(planted, graphs["modelopt"])
    assert comp.worst.key == ACT and comp.worst.ratio == pytest.approx(1 / 8, rel=1e-4)
    assert [r.key for r in comp.disagreements()] == [ACT]
    # a per-channel weight scale (every channel x8) is named by the conv that reads it
    tensor = X.qdq_sites(graphs["modelopt"])[WEIGHT].tensor
    planted = tmp_path / "modelopt-w8.onnx"
    scale_qdq(graphs["modelopt"], planted, tensor, 8.0)
    comp = X.compare_scales(graphs["ours"], planted)
    assert [r.key for r in comp.disagreements()] == [WEIGHT]
    assert comp.worst.channels_off == comp.worst.channels > 1


def test_crosscheck_command_writes_its_reports(cache, tmp_path, capsys):
    from qatcheck.__main__ import main

    assert main(["crosscheck", "--recipe", "qatcheck.zoo.recipes:digits_recipe", "--calibrator", "minmax",
                 "--no-eval", "--cache", str(cache), "--reports", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 beyond 10 %" in out and "only ModelOpt" in out
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md", ".png"]


SUITE = '''
import pytest
from qatcheck.recipe import QuantSettings
from qatcheck.zoo.recipes import digits_recipe

pytestmark = pytest.mark.qatcheck_recipe(digits_recipe(
    modes=("trt_ptq",), backends=("onnxruntime",), dynamic_modes=(),
    quant=QuantSettings(calibrator="{calibrator}")))

def test_accuracy(qcase):
    qcase.check_accuracy()
'''


def test_plugin_option_end_to_end(pytester, cache):
    """--qatcheck-trt-ptq modelopt through the plugin: the trt_ptq case ONNX Runtime runs is
    ModelOpt's graph (its own cache entry), and percentile is refused with the reason."""
    def run(calibrator, *args):
        pytester.makepyfile(test_suite=SUITE.format(calibrator=calibrator))
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}",
                                            "--qatcheck-cache", str(cache), "--qatcheck-trt-ptq", "modelopt",
                                            "--update-baselines", *args)

    run("minmax").assert_outcomes(passed=1)
    manifests = [json.loads(p.read_text()) for p in cache.glob("digits-trt_ptq-*.json")]
    assert any(m["parts"].get("quantizer") == modelopt_onnx.quantizer_id() for m in manifests)
    result = run("percentile")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*no ModelOpt counterpart*"])
