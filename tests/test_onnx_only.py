"""ONNX-only recipes (issue 12): the model is an ONNX file. fp32, fp16, trt_ptq, partial and dynamic
run from it on ONNX Runtime, judged against its fp32 graph; the PyTorch side skips, saying why."""
from __future__ import annotations

import json

import pytest

from qatcheck.errors import ConfigError
from qatcheck.recipe import onnx_file
from qatcheck.quantize.export import pin_shapes

SUITE = '''
import pytest
from qatcheck.data.digits import digits_split
from qatcheck.recipe import onnx_file
from qatcheck.recipe import InputSpec, QuantSettings, Recipe
from qatcheck.standard import test_accuracy, test_parity, test_structure  # noqa: F401

pytestmark = pytest.mark.qatcheck_recipe(Recipe(
    name="digits_onnx", task="classification", model=onnx_file({path!r}),
    eval_data=lambda: digits_split("val"), calib_data=lambda: digits_split("calib"),
    input=InputSpec(name="input", shape=(32, 1, 16, 16), dynamic={{0: (1, 32, 64)}}),
    quant=QuantSettings(calibrator="percentile", calib_batches=4, keep_precision=("stem.conv",)),
    backends=("torch", "onnxruntime"), dynamic_modes=("trt_ptq",)))
'''


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    """The built-in digits net exported with a dynamic batch: an ONNX file from elsewhere."""
    from qatcheck.quantize import export
    from qatcheck.recipe import InputSpec
    from qatcheck.zoo.digits_net import load_digits_net

    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    export.export_onnx(load_digits_net(), InputSpec(name="input", shape=(32, 1, 16, 16), dynamic={0: (1, 32, 64)}),
                       path, ("logits",), dynamic=True)
    return path


def test_an_onnx_only_recipe_runs_its_graph_modes_and_skips_the_torch_side(pytester, tmp_path, digits_onnx):
    pytester.makepyfile(test_onnx_recipe=SUITE.format(path=str(digits_onnx)))
    args = ("-p", "no:cacheprovider", "-rs", "--qatcheck-cache", str(tmp_path / "cache"),
            "--qatcheck-baselines", str(tmp_path / "b"), "--qatcheck-reports", str(tmp_path / "r"),
            "--qatcheck-no-progress")
    rec = pytester.runpytest_inprocess(*args, "--update-baselines")
    assert rec.ret == 0, rec.stdout.str()
    rec.stdout.fnmatch_lines(["*ONNX-only recipe (Recipe.model is an onnx_file)*torch backend runs PyTorch*",
                              "*ONNX-only recipe*mode 'torch_ptq' quantizes the PyTorch model*"])
    # the reference is named as what it is (issue 21 item 11c: it said "PyTorch fp32")
    rec.stdout.fnmatch_lines(["*digits_onnx-fp32-onnxruntime is the parity reference (ONNX Runtime fp32) itself*"])
    assert "PyTorch fp32" not in rec.stdout.str()
    cases = {c["case"]["id"]: c for c in json.loads((tmp_path / "r" / "digits_onnx.json").read_text())["cases"]}
    assert {"digits_onnx-fp32-onnxruntime", "digits_onnx-fp16-onnxruntime", "digits_onnx-trt_ptq-onnxruntime",
            "digits_onnx-partial-onnxruntime", "digits_onnx-dynamic_min-onnxruntime",
            "digits_onnx-trt_ptq_max-onnxruntime"} <= set(cases)
    assert not any(c["case"]["backend"] == "torch" for c in cases.values())
    fp32 = cases["digits_onnx-fp32-onnxruntime"]["metrics"]["top1"]
    assert fp32 > 0.98  # the digits net's 99.26%, now read from the file
    int8 = cases["digits_onnx-trt_ptq-onnxruntime"]
    assert int8["parity_reference"] == "onnxruntime fp32 (quantization)" and int8["parity"]["cosine"] > 0.99
    assert cases["digits_onnx-trt_ptq_max-onnxruntime"]["parity_reference"] == "onnxruntime dynamic (quantization)"
    assert cases["digits_onnx-fp32-onnxruntime"]["checks"]["parity"]["status"] == "skip"  # the reference itself
    assert cases["digits_onnx-partial-onnxruntime"]["metrics"]["top1"] >= int8["metrics"]["top1"] - 0.01
    clean = pytester.runpytest_inprocess(*args)
    assert clean.ret == 0, clean.stdout.str()


def test_the_parity_skip_names_the_reference_the_case_is():
    from qatcheck.judges import judge_parity
    from qatcheck.measurement import Case, Measurement

    def reason(mode, backend):
        m = Measurement(case=Case("r", mode, backend, "min" if mode == "dynamic" else ""), parts=frozenset({"eval"}))
        return judge_parity(m, None, thresholds=None, agreement_name="top1_agreement", cosine_tolerance=0.0005,
                            agreement_tolerance=0.01).reason
    assert reason("fp32", "onnxruntime") == "r-fp32-onnxruntime is the parity reference (ONNX Runtime fp32) itself"
    assert reason("dynamic", "onnxruntime").endswith("is the parity reference (ONNX Runtime dynamic) itself")
    assert reason("fp32", "torch") == "r-fp32-torch is the parity reference (PyTorch fp32) itself"


def test_an_onnx_file_whose_names_or_shape_differ_from_the_recipe_is_one_clear_error(tmp_path, digits_onnx):
    out = tmp_path / "x.onnx"
    with pytest.raises(ConfigError, match=r"its outputs are \['logits'\]; Recipe.output_names is \['prob'\]"):
        pin_shapes(digits_onnx, out, "input", (32, 1, 16, 16), ("prob",))
    with pytest.raises(ConfigError, match=r"its inputs are \['input'\]; the recipe's InputSpec.name is 'images'"):
        pin_shapes(digits_onnx, out, "images", (32, 1, 16, 16), ("logits",))
    pin_shapes(digits_onnx, out, "input", (8, 1, 16, 16), ("logits",))  # a symbolic batch takes any size
    with pytest.raises(ConfigError, match="axis 2 is fixed at 16; InputSpec.shape asks 24"):
        pin_shapes(out, tmp_path / "y.onnx", "input", (8, 1, 24, 16), ("logits",))
    with pytest.raises(Exception, match="does not exist"):
        onnx_file(tmp_path / "missing.onnx")()


def test_an_onnx_only_recipe_whose_file_is_not_onnx_is_one_error_naming_it(pytester, tmp_path):
    """Issue 21 item 8a: before, protobuf's DecodeError traceback on every case."""
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"PK\x03\x04 a zip, not a model" * 20)
    pytester.makepyfile(test_bad_onnx=SUITE.format(path=str(bad)).replace(
        'backends=("torch", "onnxruntime")', 'backends=("onnxruntime",), modes=("fp32", "fp16", "trt_ptq")'))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--rootdir={pytester.path}", "-k", "accuracy",
                                          "--qatcheck-cache", str(tmp_path / "cache"), "--qatcheck-no-progress",
                                          "--qatcheck-baselines", str(tmp_path / "b"),
                                          "--qatcheck-reports", str(tmp_path / "r"))
    # fp32, fp16, trt_ptq, and trt_ptq at opt; at min / max accuracy is judged at opt (skipped)
    result.assert_outcomes(failed=4, skipped=2)
    out = result.stdout.str()
    full = [line for line in out.splitlines() if line.startswith("ArtifactError: ")]
    assert len(full) == 1 and f"ONNX model {bad} cannot be read as ONNX" in full[0], out
    assert "Recipe.model=onnx_file(...) must name an ONNX model file" in full[0], out
    assert sum(line.startswith("same error as") for line in out.splitlines()) == 3, out
    assert "google.protobuf" not in out and "serialization.py" not in out, out  # no traceback through onnx
