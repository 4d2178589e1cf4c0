"""The fp16 artifact as TensorRT deploys it, and where fp16 departs from fp32 (issue 21, item 9).

PP-OCRv4's text detector keeps an unfused BatchNorm whose variance reaches 9.79e7: the plain fp16
conversion clamped it to 65504 and the map fell to cosine 0.33 vs fp32 (benchmarks/ppocr_fp16.py),
although TensorRT folds BatchNorm in fp32 at build time. The tiny graphs here plant the same
(a BatchNorm variance ~1e8) and the two other ways a constant leaves fp16's range (weights beyond
65504; weights all below its smallest subnormal): each fails with the plain conversion and passes
with qatcheck's, which names what it folded or kept in fp32.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qatcheck.analysis import localize as L
from qatcheck.analysis import localize_torch as LT  # imported before pytester runs (conftest.py)
from qatcheck.backends.onnxruntime_backend import OrtRunner
from qatcheck.parity import ParityAccumulator
from qatcheck.quantize import export, fp16

SHAPE = (16, 3, 8, 8)
X = np.random.default_rng(1).standard_normal((64, *SHAPE[1:])).astype(np.float32)


# ---- tiny graphs ---------------------------------------------------------------------------------

def _save(path, nodes, inits, channels: int = 8):
    """``nodes`` end in ``x``; a Relu -> Flatten -> Gemm head makes the logits (no pooling: it would
    average a weight distortion away)."""
    rng = np.random.default_rng(2)
    nodes = nodes + [helper.make_node("Relu", ["x"], ["relu"], name="relu"),
                     helper.make_node("Flatten", ["relu"], ["flat"], name="flat"),
                     helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    inits = {**inits, "fc_w": rng.standard_normal((10, channels * 64)) / 8, "fc_b": np.zeros(10)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(SHAPE))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [SHAPE[0], 10])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def conv_bn(path):
    """Conv -> BatchNormalization with variances 1e6..1e8, the conv's weights scaled to match (the
    BN output is O(1) in fp32). The plain conversion clamps every variance to 65504: each channel
    is scaled by another factor (4 to 39)."""
    rng = np.random.default_rng(0)
    var = np.geomspace(1e6, 1e8, 8)
    std = np.sqrt(var)
    inits = {"conv_w": rng.standard_normal((8, 3, 3, 3)) * (std / np.sqrt(27))[:, None, None, None],
             "bn_scale": rng.uniform(0.5, 1.5, 8), "bn_bias": rng.uniform(-0.5, 0.5, 8),
             "bn_mean": rng.standard_normal(8) * std * 0.1, "bn_var": var}
    nodes = [helper.make_node("Conv", ["input", "conv_w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["conv_out", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                              ["x"], name="bn")]
    return _save(path, nodes, inits)


def scaled_conv(path, kind: str):
    """Mul(input, a) -> Conv(W) whose weights fp16 cannot hold: ``overflow`` |W| up to 7.2e5 (a = 1e-4
    keeps the output O(100)), ``underflow`` every |W| below 5e-8 (a = 1e4)."""
    rng = np.random.default_rng(0)
    a, w = ((1e-4, rng.standard_normal((8, 3, 3, 3)) * 3e5) if kind == "overflow"
            else (1e4, rng.uniform(-5e-8, 5e-8, (8, 3, 3, 3))))
    nodes = [helper.make_node("Mul", ["input", "a"], ["scaled"], name="scale"),
             helper.make_node("Conv", ["scaled", "conv_w", "conv_b"], ["x"], name="conv", pads=[1, 1, 1, 1])]
    return _save(path, nodes, {"a": np.float32(a), "conv_w": w, "conv_b": np.zeros(8)})


def plain_fp16(src, dst):
    """The conversion qatcheck made before: every constant rounded to fp16 as it stands."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def cosine(half, full) -> float:
    acc = ParityAccumulator()
    runs = [OrtRunner(p, "CPUExecutionProvider", input_name="input") for p in (full, half)]
    for i in range(0, len(X), SHAPE[0]):
        r, o = (run.infer(X[i:i + SHAPE[0]])[0] for run in runs)
        acc.update(r, o)
    return acc.result()["cosine"]


# ---- the conversion ------------------------------------------------------------------------------

@pytest.mark.parametrize("plant", ["batchnorm", "overflow", "underflow"])
def test_constants_outside_fp16_are_folded_or_kept_and_named(tmp_path, plant):
    """Plain conversion: cosine 0.81 (batchnorm), 0.86 (overflow), 0.90 (underflow) vs fp32.
    qatcheck's: > 0.99999, the BatchNorm folded into its conv, the conv kept in fp32."""
    src = conv_bn(tmp_path / "m.onnx") if plant == "batchnorm" else scaled_conv(tmp_path / "m.onnx", plant)
    assert cosine(plain_fp16(src, tmp_path / "plain.onnx"), src) < 0.95
    info = export.convert_fp16(src, tmp_path / "fp16.onnx")
    assert cosine(tmp_path / "fp16.onnx", src) > 0.99999
    half = onnx.load(str(tmp_path / "fp16.onnx"))
    inits = {t.name: t for t in half.graph.initializer}
    if plant == "batchnorm":
        assert info["fp16_folded"] == ["BatchNormalization bn into Conv conv"] and info["fp16_kept"] == {}
        assert "BatchNormalization" not in {n.op_type for n in half.graph.node}
        assert "BatchNormalization bn into Conv conv" in info["notes"][0]
    else:
        why = ("up to 7.19e+05, beyond fp16's largest value 65504" if plant == "overflow"
               else "every value below fp16's smallest subnormal")
        assert info["fp16_folded"] == [] and list(info["fp16_kept"]) == ["conv"]
        line = info["fp16_kept"]["conv"]
        assert why in line and line.startswith("Conv conv (constant 'conv_w'")
        assert info["notes"] == [f"fp16 kept in fp32 (constants outside fp16's range): {line}"]
        conv = next(n for n in half.graph.node if n.name == "conv")
        assert inits[conv.input[1]].data_type == TensorProto.FLOAT  # its weights stay fp32
        assert inits["fc_w"].data_type == TensorProto.FLOAT16  # the rest is fp16


def test_a_graph_with_nothing_to_fold_converts_byte_for_byte_as_before(tmp_path):
    """The built-in recipes' exports (BatchNorm folded by the PyTorch exporter): the fp16 file is the
    plain conversion's, byte for byte, and the info says nothing."""
    from qatcheck.recipe import InputSpec
    from qatcheck.zoo.digits_net import load_digits_net

    src = export.export_onnx(load_digits_net(), InputSpec(name="input", shape=(32, 1, 16, 16)),
                             tmp_path / "digits.onnx", ("logits",))
    info = export.convert_fp16(src, tmp_path / "fp16.onnx")
    assert (tmp_path / "fp16.onnx").read_bytes() == plain_fp16(src, tmp_path / "plain.onnx").read_bytes()
    assert info == {"fp16_folded": [], "fp16_kept": {}, "notes": []}


def test_constant_arithmetic_and_a_lone_batchnorm_are_folded_in_fp32(tmp_path):
    """Div(conv, Sqrt(Add(var, eps))) with constant variances up to 1e8: Add and Sqrt are computed
    in fp32 (an initializer of standard deviations fp16 holds); a BatchNorm after an Add (no conv to
    fold into; variances 1e6..1e8, its scale their square root) becomes a Mul and an Add with
    fp32-computed scale and shift, its output keeping its name. The plain conversion clamps both."""
    rng = np.random.default_rng(0)
    var = np.geomspace(1e6, 1e8, 8)
    inits = {"w": rng.standard_normal((8, 3, 1, 1)) * np.sqrt(var / 3)[:, None, None, None],
             "var": var.reshape(1, 8, 1, 1), "eps": np.float32(1e-5), "offset": np.float32(0.1),
             "bn_scale": np.sqrt(var), "bn_bias": np.zeros(8), "bn_mean": np.zeros(8), "bn_var": var}
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["var", "eps"], ["v"], name="add_eps"),
             helper.make_node("Sqrt", ["v"], ["sd"], name="sqrt"),
             helper.make_node("Div", ["c", "sd"], ["n"], name="normalize"),
             helper.make_node("Add", ["n", "offset"], ["s"], name="shift"),
             helper.make_node("BatchNormalization", ["s", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["x"],
                              name="bn")]
    src = _save(tmp_path / "m.onnx", nodes, inits)
    info = export.convert_fp16(src, tmp_path / "fp16.onnx")
    assert info["fp16_folded"] == ["Add add_eps (constant inputs)", "Sqrt sqrt (constant inputs)",
                                   "BatchNormalization bn into Mul/Add"]
    assert info["fp16_kept"] == {}
    half = onnx.load(str(tmp_path / "fp16.onnx"))
    assert [(n.name, n.output[0]) for n in half.graph.node if n.name.startswith("bn/")] == \
        [("bn/scale", "x_scaled"), ("bn/shift", "x")]
    assert cosine(tmp_path / "fp16.onnx", src) > 0.99999
    assert cosine(plain_fp16(src, tmp_path / "plain.onnx"), src) < 0.95


# ---- fp16 localization ----------------------------------------------------------------------------

def _batches():
    return [(X[i:i + SHAPE[0]], None, SHAPE[0]) for i in range(0, 32, SHAPE[0])]


def test_onnx_localization_names_the_clamped_batchnorm_first(tmp_path):
    """The plain conversion of the BatchNorm plant: the first tensor below the floor is the BN's
    output and the BN is named (its own SQNR: the fp16 node, clamped variance, on fp32 inputs); the
    conv before it is fine. qatcheck's conversion: nothing below the floor."""
    src = conv_bn(tmp_path / "m.onnx")
    loc = L.localize_graphs(plain_fp16(src, tmp_path / "plain.onnx"), src, _batches(), input_name="input",
                            recipe="bn", mode="fp16")
    assert loc.first_below_floor == loc.named_tensor == "x" and loc.named == "bn"
    bn, conv = loc.row("x"), loc.row("conv_out")
    assert bn.op == "BatchNormalization" and bn.own_sqnr_db < 10 and bn.rank == 1
    assert conv.cosine > 0.9999 and conv.own_sqnr_db > 50
    assert L.verdict(loc).startswith("localize bn fp16 (32 samples, floor cosine 0.99): damage enters at bn (x)")
    export.convert_fp16(src, tmp_path / "fp16.onnx")
    clean = L.localize_graphs(tmp_path / "fp16.onnx", src, _batches(), input_name="input", mode="fp16")
    assert clean.named is None and clean.first_below_floor is None and "x" in [r.tensor for r in clean.rows]


def _planted_digits():
    """The digits net with layer1.bn2's running variance x1e9 and its weight x sqrt(1e9): the same
    function in fp32, a variance fp16 cannot hold (inf: the BN outputs its bias)."""
    import torch

    from qatcheck.zoo.digits_net import load_digits_net

    model = load_digits_net()
    bn = model.layer1.bn2
    with torch.no_grad():
        bn.running_var.mul_(1e9)
        bn.weight.mul_(1e9 ** 0.5)
    return model


def test_torch_localization_names_the_batchnorm_fp16_cannot_hold(single_thread_module):
    """The PyTorch path: the fp32 model in half vs in fp32, module by module. Clean digits: nothing
    named (every module's own SQNR is fp16 rounding); the planted BatchNorm: named first."""
    import copy

    from qatcheck.data.batching import eval_batches
    from qatcheck.data.digits import digits_split
    from qatcheck.zoo.digits_net import load_digits_net

    def run(model):
        batches = eval_batches(digits_split("val"), (32, 1, 16, 16), pad=False, max_samples=64)
        return LT.localize_modules(copy.deepcopy(model).half(), model, batches, mode="fp16")

    clean = run(load_digits_net())
    assert clean.named is None and min(r.own_sqnr_db for r in clean.rows) > 30
    loc = run(_planted_digits())
    assert loc.named == "layer1.bn2" and loc.row(loc.named_tensor).rank == 1
    assert loc.first_below_floor == "layer1.bn2"
    assert "fine-tun" not in loc.method  # fp16 weights are fp32's, rounded: no drift to report


ONNX_SUITE = '''
import numpy as np
import pytest
from qatcheck.data.base import ArrayDataset
from qatcheck.recipe import onnx_file
from qatcheck.recipe import InputSpec, Recipe
from qatcheck.standard import test_parity  # noqa: F401

X = np.random.default_rng(1).standard_normal((64, 3, 8, 8)).astype(np.float32)
data = ArrayDataset("noise", X, np.zeros(64, np.int64))
pytestmark = pytest.mark.qatcheck_recipe(Recipe(
    name="bn", task="classification", model=onnx_file({path!r}), eval_data=lambda: data,
    calib_data=lambda: data, input=InputSpec(name="input", shape=(16, 3, 8, 8)), output_names=("logits",),
    modes=("fp32", "fp16"), backends=("onnxruntime",), top_k=(1,)))
'''


def test_a_failed_fp16_case_names_where_fp16_departs_and_the_report_lists_the_fold(pytester, tmp_path):
    """An ONNX-only recipe over the BatchNorm plant. With the plain conversion (planted: nothing
    folded) its fp16 parity fails and the message names the BN and its tensor (automatic
    localization, the case's floor). qatcheck's conversion: green, and the table's notes say what
    was folded - also when the artifact is reused from the cache (the manifest keeps it)."""
    src = conv_bn(tmp_path / "bn.onnx")
    pytester.makepyfile(test_bn=ONNX_SUITE.format(path=str(src)))

    def run(cache, *extra):
        return pytester.runpytest("-p", "no:cacheprovider", "--qatcheck-cache", str(cache), *extra,
                                  "--qatcheck-baselines", str(pytester.path / "baselines"),
                                  "--qatcheck-reports", str(pytester.path / "reports"),
                                  "--qatcheck-no-progress", "--benchmark-disable")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fp16, "prepare", lambda model: (fp16.Fp16Plan(), []))
        planted = run(tmp_path / "planted-cache")
    assert planted.ret == 1
    planted.stdout.fnmatch_lines(["*bn-fp16-onnxruntime parity check failed:*",
                                  "*localize bn fp16 (32 samples, floor cosine 0.9995): damage enters at bn (x): *"
                                  "first below the floor: bn (x)*",
                                  "*per-layer table: *bn-localize-fp16.md*"])
    data = json.loads((pytester.path / "reports" / "bn-localize-fp16.json").read_text())
    assert data["named"] == "bn" and data["path"] == "onnxruntime"
    for extra in (("--update-baselines",), ()):  # built (and recorded), then reused
        clean = run(tmp_path / "cache", *extra)
        assert clean.ret == 0, clean.stdout.str()
        clean.stdout.fnmatch_lines(["*note (fp16-onnxruntime): fp16 ONNX: 1 node(s) folded in fp32 before the "
                                    "conversion, as TensorRT folds them at build time: BatchNormalization bn "
                                    "into Conv conv*"])
    clean.stdout.fnmatch_lines(["*artifact cache*: 0 built*"])


TORCH_SUITE = '''
import pytest
import torch
from qatcheck.standard import test_parity  # noqa: F401
from qatcheck.zoo import recipes
from qatcheck.zoo.digits_net import load_digits_net


def planted_digits():  # layer1.bn2: running variance x1e9, weight x sqrt(1e9) (as _planted_digits)
    model = load_digits_net()
    with torch.no_grad():
        model.layer1.bn2.running_var.mul_(1e9)
        model.layer1.bn2.weight.mul_(1e9 ** 0.5)
    return model


pytestmark = pytest.mark.qatcheck_recipe(recipes.digits_recipe(
    model=planted_digits, modes=("fp32", "fp16"), backends=("torch",), dynamic_modes=()))
'''


def test_a_failed_fp16_torch_case_is_localized_in_pytorch(pytester, single_thread_module):
    """The fp16 case on the torch backend (the model in half vs fp32) fails its parity on the
    planted digits net; the message names layer1.bn2, from the PyTorch path (reports apart from
    the graph path's: -torch)."""
    pytester.makepyfile(test_digits=TORCH_SUITE)
    result = pytester.runpytest("-p", "no:cacheprovider", "--qatcheck-cache", str(pytester.path / "cache"),
                                "--qatcheck-baselines", str(pytester.path / "baselines"),
                                "--qatcheck-reports", str(pytester.path / "reports"),
                                "--qatcheck-no-progress", "--benchmark-disable")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*digits-fp16-torch parity check failed:*",
                                 "*localize digits fp16 (32 samples, floor cosine 0.98): damage enters at "
                                 "layer1.bn2: own SQNR *",
                                 "*per-layer table: *digits-localize-fp16-torch.md*"])
    report = json.loads((pytester.path / "reports" / "digits-localize-fp16-torch.json").read_text())
    assert report["path"] == "torch" and report["named"] == "layer1.bn2"


def test_cli_localizes_fp16_on_either_path(tmp_path, capsys, single_thread_module):
    """``python -m qatcheck localize --mode fp16``: the graph by default, ``--path torch`` the model
    in half; digits is clean on both. A mode with no path is one clear error."""
    from qatcheck.__main__ import main

    args = ["localize", "--recipe", "qatcheck.zoo.recipes:digits_recipe", "--mode", "fp16", "--max-samples", "32",
            "--reports", str(tmp_path / "r"), "--cache", str(tmp_path / "c")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "localize digits fp16 (32 samples, floor cosine 0.99): no layer below the floor" in out
    assert "onnxruntime)" in out and (tmp_path / "r" / "digits-localize-fp16.md").is_file()
    assert main(args + ["--path", "torch"]) == 0
    out = capsys.readouterr().out
    assert "no layer below the floor" in out and "execution order, torch)" in out
    assert (tmp_path / "r" / "digits-localize-fp16-torch.md").is_file()
    assert main(args[:4] + ["fp32"]) == 2
    assert "mode 'fp32' is not a low-precision mode; choose one of fp16, trt_ptq, partial, torch_ptq, qat" \
        in capsys.readouterr().err
    assert main(args[:4] + ["trt_ptq", "--path", "torch"]) == 2
    assert "cannot be localized on the torch path; it can on onnx" in capsys.readouterr().err


def test_which_modes_are_localized_where_comes_from_the_mode_table():
    from qatcheck.modes import ModeSpec, localization_paths, register_mode, unregister_mode

    assert L.onnx_modes() == ("fp16", "trt_ptq", "partial")
    assert L.torch_modes() == ("fp16", "torch_ptq", "qat", "fp8")
    assert localization_paths("fp32") == localization_paths("dynamic") == ()
    register_mode(ModeSpec("bf16x", "float", "fp16", "qatcheck.artifacts:convert_fp16", key_fields=("fp32_onnx",)))
    try:  # a new graph-only row is localized on its graph, with no change to the localization code
        assert "bf16x" in L.onnx_modes() and "bf16x" not in L.torch_modes()
    finally:
        unregister_mode("bf16x")
