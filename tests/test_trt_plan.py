"""The TensorRT build plan and the precision audit, on the CPU (no TensorRT needed)."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from qatcheck.backends import trt_plan as tp
from qatcheck.backends.trt_audit import PrecisionAuditError, layer_kind, layer_precision, parse_engine_info
from qatcheck.errors import ConfigError
from qatcheck.modes import MODES
from qatcheck.recipe import InputSpec, QuantSettings
from qatcheck.registry import ONNX_QUANTIZERS, register_onnx_quantizer

SPEC = InputSpec(name="input", shape=(32, 3, 32, 32), dynamic={0: (1, 32, 64)})
QUANT = QuantSettings(calibrator="entropy", keep_precision=("stem.conv", "fc"))
DIGESTS = {m: f"sha-{m}" for m in (*MODES, "fp8")}
CAP = (9, 0)
V10, V11 = "10.3.0.26", "11.0.0"


def plan(mode, version=V10, **kw):
    args = dict(quant=QUANT, input_spec=SPEC, onnx_digests=DIGESTS, gpu_capability=CAP)
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    return tp.plan_build(mode, version, args["quant"], args["input_spec"], args["onnx_digests"],
                         args["gpu_capability"], **kw)


# ---- every mode x TensorRT 10 / 11 ---------------------------------------------------------------
EXPECTED = {
    # mode: (onnx_mode, precision, quantization, strongly_typed, flags) on 10, then on 11
    V10: {"fp32": ("fp32", "fp32", "none", False, ()),
          "fp16": ("fp32", "fp16", "none", False, ("FP16",)),
          "trt_ptq": ("fp32", "int8", "implicit", False, ("INT8",)),
          "partial": ("fp32", "int8", "implicit", False, ("INT8", "OBEY_PRECISION_CONSTRAINTS")),
          "torch_ptq": ("torch_ptq", "int8", "explicit", False, ("INT8",)),
          "qat": ("qat", "int8", "explicit", False, ("INT8",)),
          "dynamic": ("dynamic", "fp32", "none", False, ())},
    V11: {"fp32": ("fp32", "fp32", "none", True, ()),
          "fp16": ("fp16", "fp16", "none", True, ()),
          "trt_ptq": ("trt_ptq", "int8", "explicit", True, ()),
          "partial": ("partial", "int8", "explicit", True, ()),
          "torch_ptq": ("torch_ptq", "int8", "explicit", True, ()),
          "qat": ("qat", "int8", "explicit", True, ()),
          "dynamic": ("dynamic", "fp32", "none", True, ())},
}


@pytest.mark.parametrize("version", [V10, V11])
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_10_and_11(mode, version):
    p = plan(mode, version)
    onnx_mode, precision, quantization, strongly, flags = EXPECTED[version][mode]
    assert (p.onnx_mode, p.precision, p.quantization, p.strongly_typed, p.builder_flags) == \
        (onnx_mode, precision, quantization, strongly, flags)
    assert p.onnx_digest == f"sha-{onnx_mode}"
    assert p.onnx_mode == tp.onnx_source(mode, version)
    # nothing TensorRT 11 removed ever reaches an 11 plan
    if version == V11:
        assert not p.builder_flags and p.calibration is None and not p.pins
    assert (p.calibration is not None) == (quantization == "implicit")
    assert bool(p.pins) == (mode == "partial" and version == V10)
    assert bool(p.profiles) == (mode == "dynamic")


@pytest.mark.parametrize("version", [V10, V11])
@pytest.mark.parametrize("mode", ["trt_ptq", "partial"])
def test_qdq_form_uses_the_explicit_onnx_on_both(mode, version):
    p = plan(mode, version, ptq_form="qdq")
    assert p.onnx_mode == mode and p.quantization == "explicit" and p.calibration is None and not p.pins


@pytest.fixture
def mine():
    """A user's ONNX quantizer, registered by name (qatcheck's own PTQ under another name)."""
    register_onnx_quantizer("mine", "qatcheck.quantize.onnx_ptq:QatcheckPTQ")
    yield "mine"
    ONNX_QUANTIZERS.unregister("mine")


@pytest.mark.parametrize("version", [V10, V11])
@pytest.mark.parametrize("mode", ["trt_ptq", "partial"])
@pytest.mark.parametrize("writer", ["modelopt", "mine"])
def test_a_registered_onnx_quantizer_builds_the_explicit_onnx_like_qdq(mode, version, writer, mine):
    """--qatcheck-trt-ptq modelopt (or a user's registered ONNX quantizer): it wrote the mode's Q/DQ
    ONNX; TensorRT builds it as an explicit graph exactly as qdq does (the graph's digest, not the
    form, tells the engines apart)."""
    p, q = plan(mode, version, ptq_form=writer), plan(mode, version, ptq_form="qdq")
    assert tp.onnx_source(mode, version, writer) == mode
    assert p.onnx_mode == mode and p.quantization == "explicit" and p.calibration is None and not p.pins
    assert p.settings() == q.settings() and p.builder_flags == q.builder_flags
    assert any(f"ONNX quantizer {writer!r}" in n for n in p.notes) and not any("ONNX quantizer" in n for n in q.notes)
    other = plan(mode, version, ptq_form=writer, onnx_digests={**DIGESTS, mode: "sha-other"})
    assert other.cache_key != p.cache_key
    # fp32 / torch_ptq plans do not depend on the form
    assert plan("torch_ptq", version, ptq_form=writer).settings() == plan("torch_ptq", version).settings()


@pytest.mark.parametrize("calibrator,cls", [("entropy", "IInt8EntropyCalibrator2"),
                                            ("minmax", "IInt8MinMaxCalibrator"),
                                            ("percentile", "IInt8LegacyCalibrator")])
def test_native_calibrator_classes(calibrator, cls):
    q = dataclasses.replace(QUANT, calibrator=calibrator, percentile=99.9)
    cal = plan("trt_ptq", V10, quant=q).calibration
    assert cal.calibrator_class == cls
    assert cal.batches == q.calib_batches and cal.batch_shape == SPEC.shape and cal.input == "input"
    if calibrator == "percentile":
        assert cal.quantile == pytest.approx(0.999) and cal.regression_cutoff == 1.0
    else:
        assert cal.quantile is None
    assert cal.cache_file.startswith(f"calib-{cls}-") and cal.cache_file.endswith(".cache")


def test_calibration_cache_key_ignores_gpu_but_not_data_or_version():
    base = plan("trt_ptq", V10, calib_id="data-a").calibration.cache_file
    assert plan("trt_ptq", V10, calib_id="data-a", gpu_capability=(8, 6)).calibration.cache_file == base
    assert plan("trt_ptq", V10, calib_id="data-b").calibration.cache_file != base
    assert plan("trt_ptq", "10.4.0", calib_id="data-a").calibration.cache_file != base
    assert plan("trt_ptq", V10, calib_id="data-a",
                onnx_digests={**DIGESTS, "fp32": "other"}).calibration.cache_file != base


@pytest.mark.parametrize("mode", ["trt_ptq", "partial"])
def test_legacy_on_11_fails_saying_why(mode):
    with pytest.raises(ConfigError) as err:
        plan(mode, V11, ptq_form="native")
    msg = str(err.value)
    assert "TensorRT 11.0.0 no longer has" in msg
    assert "removed the INT8 calibrators" in msg and "OBEY_PRECISION_CONSTRAINTS" in msg
    assert "explicit Q/DQ" in msg and "--qatcheck-trt-ptq qdq" in msg
    if mode == "partial":
        assert "per-layer precision constraints" in msg
    # auto picks the Q/DQ path on 11 instead of failing
    assert plan(mode, V11, ptq_form="auto").quantization == "explicit"


def test_native_on_10_and_unknown_forms():
    assert plan("trt_ptq", V10, ptq_form="native").quantization == "implicit"
    with pytest.raises(ConfigError, match=r"--qatcheck-trt-ptq 'fast' is unknown; choose one of auto, native, "
                                          r"qdq or a registered ONNX quantizer \(qatcheck, modelopt; "):
        plan("trt_ptq", V10, ptq_form="fast")


def test_old_tensorrt_and_missing_digest_are_errors():
    with pytest.raises(ConfigError, match="older than 8.5"):
        plan("fp32", "8.2.1")
    with pytest.raises(ConfigError, match="builds from the 'fp32' ONNX but got no digest"):
        plan("trt_ptq", V10, onnx_digests={"trt_ptq": "x"})
    with pytest.raises(ConfigError, match="keep_precision"):
        plan("partial", V10, quant=dataclasses.replace(QUANT, keep_precision=()))


def test_version_parsing():
    assert tp.parse_version("10.3.0.26") == (10, 3, 0)
    assert tp.parse_version("11") == (11, 0, 0)
    assert tp.parse_version((10, 1)) == (10, 1, 0)
    with pytest.raises(ConfigError):
        tp.parse_version("trt")


# ---- profiles -------------------------------------------------------------------------------------
def test_profile_shapes_from_input_spec():
    spec = InputSpec(name="images", shape=(8, 3, 64, 64), dynamic={0: (1, 8, 32), 2: (32, 64, 128)})
    (p,) = plan("dynamic", V10, input_spec=spec).profiles
    assert p == tp.Profile("images", (1, 3, 32, 64), (8, 3, 64, 64), (32, 3, 128, 64))
    assert plan("dynamic", V11, input_spec=spec).profiles == (p,)
    assert plan("fp32", V10, input_spec=spec).profiles == ()  # static export: no profile


# ---- the engine cache key ------------------------------------------------------------------------
def test_cache_key_is_stable_and_sensitive_to_every_field():
    a, b = plan("trt_ptq", V10, calib_id="c"), plan("trt_ptq", V10, calib_id="c")
    assert a.cache_key == b.cache_key and len(a.cache_key) == 20
    variants = {
        "onnx digest": plan("trt_ptq", V10, calib_id="c", onnx_digests={**DIGESTS, "fp32": "new"}),
        "tensorrt version": plan("trt_ptq", "10.4.0", calib_id="c"),
        "gpu capability": plan("trt_ptq", V10, calib_id="c", gpu_capability=(8, 9)),
        "calibrator": plan("trt_ptq", V10, calib_id="c", quant=dataclasses.replace(QUANT, calibrator="minmax")),
        "calib batches": plan("trt_ptq", V10, calib_id="c", quant=dataclasses.replace(QUANT, calib_batches=4)),
        "calib data": plan("trt_ptq", V10, calib_id="d"),
        "form": plan("trt_ptq", V10, calib_id="c", ptq_form="qdq"),
        "opt level": plan("trt_ptq", V10, calib_id="c", builder_optimization_level=5),
        "loader library": plan("trt_ptq", V10, calib_id="c", builder="polygraphy 0.54.0"),
        "input shape": plan("trt_ptq", V10, calib_id="c",
                            input_spec=dataclasses.replace(SPEC, shape=(16, 3, 32, 32), dynamic={0: (1, 16, 64)})),
    }
    keys = {name: p.cache_key for name, p in variants.items()}
    for name, key in keys.items():
        assert key != a.cache_key, f"cache key ignores {name}"
    assert len(set(keys.values())) == len(keys)
    # pins and profiles are build settings too
    assert plan("partial", V10).cache_key != plan("partial", V10, quant=dataclasses.replace(
        QUANT, keep_precision=("stem.conv",))).cache_key
    spec2 = dataclasses.replace(SPEC, dynamic={0: (1, 32, 128)})
    assert plan("dynamic", V10).cache_key != plan("dynamic", V10, input_spec=spec2).cache_key
    # the file name carries what a human needs to tell engines apart
    name = a.engine_filename("digits")
    assert name.startswith("digits-trt_ptq-trt10.3.0-sm90-") and name.endswith(f"{a.cache_key}.engine")
    json.dumps(a.to_dict())  # the sidecar is JSON


# ---- layer pins -----------------------------------------------------------------------------------
def test_pins_match_layers_by_module_or_node_name():
    p = plan("partial", V10)
    assert [x.match for x in p.pins] == ["stem.conv", "fc"] and {x.precision for x in p.pins} == {"fp32"}
    assert p.pin_for("/stem/conv/Conv").match == "stem.conv"
    assert p.pin_for("/fc/Gemm").match == "fc"
    assert p.pin_for("/stem/conv2/Conv") is None  # prefix of a name is not the module
    assert p.pin_for("/layer1/layer1.0/conv1/Conv") is None
    assert tp.layer_matches("layer1.0", "/layer1/layer1.0/conv1/Conv")
    assert tp.layer_matches("/layer1/layer1.0/conv1/Conv", "/layer1/layer1.0/conv1/Conv")
    assert tp.unmatched_pins(p, ["/stem/conv/Conv", "/stem/relu/Relu"]) == ["fc"]
    assert tp.unmatched_pins(p, ["/stem/conv/Conv", "/fc/Gemm"]) == []


def test_plan_matrix_and_describe():
    m = tp.plan_matrix([V10, V11], QUANT, SPEC)
    assert len(m) == 2 * (len(MODES) + 1) and all(isinstance(v, tp.BuildPlan) for v in m.values())  # + fp8
    text = tp.describe(m[(V10, "partial")])
    assert "IInt8EntropyCalibrator2" in text and "fp32 pins stem.conv, fc" in text
    native11 = tp.plan_matrix([V11], QUANT, SPEC, ptq_form="native")
    assert isinstance(native11[(V11, "trt_ptq")], str) and isinstance(native11[(V11, "qat")], tp.BuildPlan)


# ---- precision audit ------------------------------------------------------------------------------
def _t(name, fmt, dims=(32, 64, 16, 16)):
    return {"Name": name, "Location": "Device", "Dimensions": list(dims), "Format/Datatype": fmt}


I8 = "Thirty-two wide channel vectorized row major Int8 format"
F16 = "Channel major FP16 format where channel % 8 == 0"
F32 = "Row major linear FP32"


def conv(name, onnx, in_fmt, w_type, out_fmt=None, tactic="sm90_xmma_fprop_implicit_gemm_i8i8_i8i32_f32"):
    return {"Name": name, "LayerType": "CaskConvolution", "ParameterType": "Convolution",
            "Inputs": [_t(f"{name}_in", in_fmt)], "Outputs": [_t(f"{name}_out", out_fmt or in_fmt)],
            "Weights": {"Type": w_type, "Count": 36864}, "Bias": {"Type": "Float", "Count": 64},
            "Metadata": onnx, "TacticName": tactic, "TacticValue": "0x1"}


def engine_json(planted_fp32_conv=False, dynamic=False):
    """An inspector JSON in the documented DETAILED format: input Q (QDQ origin), an inserted
    reformat, three int8 convs (one fused with its ReLU), an fp32 gemm head, a no-op shuffle."""
    layers = [
        {"Name": "/quantizer/QuantizeLinear", "LayerType": "Reformat", "ParameterType": "Reformat",
         "Origin": "QDQ", "Inputs": [_t("input", F32, (32, 3, 32, 32))],
         "Outputs": [_t("q_out", "Four wide channel vectorized row major Int8 format", (32, 3, 32, 32))],
         "Metadata": "[ONNX Layer: /quantizer/QuantizeLinear]"},
        conv("/stem/conv/Conv + /stem/relu/Relu", "[ONNX Layer: /stem/conv/Conv]\x1f[ONNX Layer: /stem/relu/Relu]",
             "Four wide channel vectorized row major Int8 format", "Int8", I8),
        conv("/layer1/layer1.0/conv1/Conv", "[ONNX Layer: /layer1/layer1.0/conv1/Conv]", I8, "Int8"),
        conv("/layer1/layer1.0/conv2/Conv", "[ONNX Layer: /layer1/layer1.0/conv2/Conv]", I8, "Int8"),
        {"Name": "Reformatting CopyNode for Input Tensor 0 to /fc/Gemm", "LayerType": "Reformat",
         "ParameterType": "Reformat", "Origin": "REFORMAT", "Inputs": [_t("c_out", I8)],
         "Outputs": [_t("r_out", F32)], "TacticValue": "0x00000000000003e8"},
        {"Name": "(Unnamed Layer* 40) [Shuffle]", "LayerType": "NoOp", "Inputs": [_t("r_out", F32)],
         "Outputs": [_t("flat", F32, (32, 64))]},
        {"Name": "/fc/Gemm", "LayerType": "CaskGemmMatrixMultiply", "ParameterType": "MatrixMultiply",
         "Inputs": [_t("flat", F32, (32, 64))], "Outputs": [_t("logits", F32, (32, 10))],
         "Weights": {"Type": "Float", "Count": 640}, "Metadata": "[ONNX Layer: /fc/Gemm]",
         "TacticName": "sm80_xmma_gemm_f32f32_tf32f32_f32"},
    ]
    if planted_fp32_conv:
        layers[3] = conv("/layer1/layer1.0/conv2/Conv", "[ONNX Layer: /layer1/layer1.0/conv2/Conv]",
                         F32, "Float", tactic="sm80_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32")
    if dynamic:  # dynamic shapes: the inspector writes no formats
        for l in layers:
            for t in l.get("Inputs", []) + l.get("Outputs", []):
                t["Format/Datatype"] = "N/A due to dynamic shapes"
    return json.dumps({"Layers": layers, "Bindings": ["input", "logits"]})


def test_audit_counts_precisions_reformats_and_qdq():
    audit = parse_engine_info(engine_json())
    s = audit.summary()
    assert s["layers"] == 4  # 3 convs + gemm; reformat, Q and no-op are not compute layers
    assert s["precision"] == {"int8": 3, "fp32": 1}
    assert s["conv"] == {"int8": 3} and s["gemm"] == {"fp32": 1}
    assert s["reformat_layers"] == 1 and s["qdq_layers"] == 1
    stem = audit.of_kind("conv")[0]
    assert stem.onnx_nodes == ("/stem/conv/Conv", "/stem/relu/Relu") and stem.precision_from == "weights"
    assert "3 int8, 1 fp32" in audit.describe()
    audit.assert_all("conv", "int8")  # passes
    audit.assert_reformats(at_most=1)
    with pytest.raises(PrecisionAuditError, match="2 reformat|1 reformat"):
        audit.assert_reformats(at_most=0)


def test_all_convs_int8_fails_on_a_planted_fp32_conv():
    audit = parse_engine_info(engine_json(planted_fp32_conv=True))
    assert audit.precision_counts("conv") == {"int8": 2, "fp32": 1}
    with pytest.raises(PrecisionAuditError) as err:
        audit.assert_all("conv", "int8")
    msg = str(err.value)
    assert "1 of 3 conv layers do not run in int8" in msg
    assert "'/layer1/layer1.0/conv2/Conv' runs fp32 (CaskConvolution, read from weights)" in msg
    # a layer the recipe keeps in higher precision is excused, by module or node name
    audit.assert_all("conv", "int8", except_layers=("layer1.0.conv2",))
    audit.assert_all("conv", "int8", except_layers=("/layer1/layer1.0/conv2/Conv",))
    audit.assert_all("conv", ("int8", "fp32"))


def test_audit_under_dynamic_shapes_reads_weights_and_tactics():
    audit = parse_engine_info(engine_json(dynamic=True))
    assert audit.precision_counts("conv") == {"int8": 3}
    assert audit.precision_counts("gemm") == {"fp32": 1}
    # no weights and no format: the tactic name is the last resort
    assert layer_precision({"LayerType": "CaskConvolution", "TacticName": "sm90_xmma_fprop_f16f16_f16f16_f16",
                            "Inputs": [{"Format/Datatype": "N/A due to dynamic shapes"}]}) == ("fp16", "tactic")
    assert layer_precision({"LayerType": "CaskPooling", "Inputs": [{"Format/Datatype": "Half(64,1:8,8,1)"}]}) \
        == ("fp16", "input")
    assert layer_precision({"LayerType": "X"}) == ("unknown", "none")


def test_unknown_precision_fails_with_a_hint():
    data = json.loads(engine_json(dynamic=True))
    for l in data["Layers"]:
        l.pop("Weights", None)
        l.pop("TacticName", None)
    with pytest.raises(PrecisionAuditError, match="precision unknown"):
        parse_engine_info(data).assert_all("conv", "int8")


def test_audit_edge_cases():
    assert layer_kind({"LayerType": "CaskDeconvolution"}) == "conv"
    assert layer_kind({"LayerType": "Scale", "ParameterType": "Scale", "Origin": "QDQ"}) == "qdq"
    assert layer_kind({"LayerType": "gemm"}) == "gemm"
    assert layer_kind({"LayerType": "PointWiseV2"}) == "other"
    names_only = parse_engine_info({"Layers": ["conv1", "relu1"], "Bindings": []})
    assert names_only.verbosity == "names-only"
    with pytest.raises(PrecisionAuditError, match="ProfilingVerbosity.DETAILED"):
        names_only.assert_all("conv", "int8")
    with pytest.raises(PrecisionAuditError, match="no conv layers"):
        parse_engine_info({"Layers": [json.loads(engine_json())["Layers"][-1]]}).assert_all("conv", "int8")
    with pytest.raises(ValueError, match="no 'Layers'"):
        parse_engine_info({"Bindings": []})
    with pytest.raises(ValueError, match="unknown layer kind"):
        parse_engine_info(engine_json()).of_kind("lstm")


def test_frozen_plans_are_hashable_and_copyable():
    p = plan("partial", V10)
    assert copy.deepcopy(p) == p and hash(p.pins)


def test_session_precision_check_fails_on_a_dropped_int8_layer(tmp_path):
    """The suite-level check (``qcase.check_precision(conv="int8")``) on a TensorRT case reads the
    runner's audit: a conv that fell back to fp32 fails with its name; a kept layer is excused on
    ``partial``; other backends skip without building anything."""
    from qatcheck.measurement import Case
    from qatcheck.recipe import InputSpec, QuantSettings, Recipe
    from qatcheck.session import Options, QatcheckSession

    class AuditedRunner:  # what TrtRunner offers the check: an ``audit``
        def __init__(self, planted: bool) -> None:
            self.audit = parse_engine_info(engine_json(planted_fp32_conv=planted))

    recipe = Recipe(name="r", task="classification", model=lambda: None, eval_data=lambda: None,
                    calib_data=lambda: None, input=InputSpec(shape=(2, 1, 4, 4)),
                    modes=("trt_ptq", "partial"), backends=("tensorrt", "onnxruntime"),
                    quant=QuantSettings(keep_precision=("layer1.0.conv2",)))
    session = QatcheckSession(Options(baselines_dir=tmp_path, cache_dir=tmp_path), {})
    session.register(recipe)
    session._runners[("r", "trt_ptq", "tensorrt", False)] = AuditedRunner(planted=True)
    session._runners[("r", "partial", "tensorrt", False)] = AuditedRunner(planted=True)
    res = session.check_precision(Case("r", "trt_ptq", "tensorrt"), {"conv": "int8"})
    assert not res.ok and "'/layer1/layer1.0/conv2/Conv' runs fp32" in res.failures[0]
    assert session.check_precision(Case("r", "partial", "tensorrt"), {"conv": "int8"}).ok
    skipped = session.check_precision(Case("r", "trt_ptq", "onnxruntime"), {"conv": "int8"})
    assert skipped.ok and "TensorRT only" in skipped.skipped


def test_fp8_builds_strongly_typed_on_an_fp8_gpu_only():
    for version in (V10, V11):
        p = plan("fp8", version)
        assert (p.onnx_mode, p.precision, p.quantization, p.strongly_typed, p.builder_flags) == \
            ("fp8", "fp8", "explicit", True, ())
        assert tp.polygraphy_loader_args(p) == {"network": {"strongly_typed": True}, "config": {},
                                                "calibrator": None}
    with pytest.raises(ConfigError, match=r"FP8 needs a GPU of compute capability >= 8.9 .* this one is 8.6"):
        plan("fp8", V10, gpu_capability=(8, 6))
    with pytest.raises(ConfigError, match="strongly typed network .*TensorRT 8.6.1"):
        plan("fp8", "8.6.1")
