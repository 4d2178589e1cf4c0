"""The TensorRT adapter speaks Polygraphy (issue 13): a build plan becomes Polygraphy loader
arguments (what the backend calls) and ``polygraphy run`` flags (what a reproduction bundle
prints). Without TensorRT, ``polygraphy run --gen-script`` shows the loaders Polygraphy would call
for those flags: both mappings must describe the same engine."""
from __future__ import annotations

import re
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from qatcheck.backends import trt_plan as tp
from qatcheck.errors import ConfigError
from qatcheck.modes import MODES
from qatcheck.recipe import InputSpec, QuantSettings

SPEC = InputSpec(name="input", shape=(32, 3, 32, 32), dynamic={0: (1, 32, 64)})
DIGESTS = {m: f"sha-{m}" for m in MODES}
V10, V11 = "10.3.0.26", "11.0.0"


def plan(mode, version=V10, quant=QuantSettings(calibrator="entropy", keep_precision=("stem.conv",)), **kw):
    return tp.plan_build(mode, version, quant, SPEC, DIGESTS, (9, 0), **kw)


def test_loader_args_follow_the_plan():
    args = tp.polygraphy_loader_args(plan("partial"))
    assert args["network"] == {"strongly_typed": False}
    assert args["config"] == {"int8": True, "precision_constraints": "obey"}
    assert args["calibrator"]["BaseClass"] == "IInt8EntropyCalibrator2"
    assert args["calibrator"]["cache"].startswith("calib-IInt8EntropyCalibrator2-")
    legacy = tp.polygraphy_loader_args(plan("trt_ptq", quant=QuantSettings(calibrator="percentile")))
    assert legacy["calibrator"]["quantile"] == pytest.approx(0.9999)
    assert legacy["calibrator"]["regression_cutoff"] == 1.0
    # TensorRT 11: strongly typed, no flags, no calibrator - nothing it removed reaches Polygraphy
    for mode in MODES:
        args = tp.polygraphy_loader_args(plan(mode, V11))
        assert args == {"network": {"strongly_typed": True}, "config": {}, "calibrator": None}
    assert tp.polygraphy_loader_args(plan("fp16"))["config"] == {"fp16": True}
    assert tp.polygraphy_loader_args(plan("fp32", builder_optimization_level=5))["config"] == \
        {"builder_optimization_level": 5}


def test_an_unknown_builder_flag_is_an_error_naming_it():
    import dataclasses

    odd = dataclasses.replace(plan("fp16"), builder_flags=("SPARSE_WEIGHTS",))
    with pytest.raises(ConfigError, match="'SPARSE_WEIGHTS' has no Polygraphy CreateConfig argument"):
        tp.polygraphy_loader_args(odd)


def _gen_script(tmp_path, cli_args):
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 32, 32]) for n in ("input", "out")]
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["input"], ["out"], name="/stem/conv/Conv")], "g", io[:1], io[1:]),
        ir_version=8, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    script = tmp_path / "gen.py"
    polygraphy = [sys.executable, "-c", "from polygraphy.tools._main import main; main()"]
    proc = subprocess.run([*polygraphy, "run", str(tmp_path / "m.onnx"), *cli_args, "--gen-script", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return script.read_text()


@pytest.mark.parametrize("case", ["fp16-10", "native-percentile-partial-10", "qdq-11", "dynamic-11"])
def test_the_printed_polygraphy_flags_build_what_the_backend_builds(tmp_path, case):
    if case == "fp16-10":
        p, pinned, cache = plan("fp16"), {}, None
    elif case == "native-percentile-partial-10":
        p = plan("partial", quant=QuantSettings(calibrator="percentile", keep_precision=("stem.conv",)))
        pinned, cache = {"/stem/conv/Conv": "fp32"}, tmp_path / "calib.cache"
    elif case == "qdq-11":
        p, pinned, cache = plan("trt_ptq", V11), {}, None
    else:
        p, pinned, cache = plan("dynamic", V11), {}, None
    script = _gen_script(tmp_path, tp.polygraphy_cli_args(p, cache, pinned))
    config = re.search(r"CreateTrtConfig\((.*)\)\n", script)
    config = config.group(1) if config else ""
    args = tp.polygraphy_loader_args(p)
    for key, value in args["config"].items():
        assert f"{key}={value!r}" in config, (key, config)
    for flag in ("fp16", "int8", "fp8"):
        if flag not in args["config"]:
            assert f"{flag}=True" not in config
    if args["network"]["strongly_typed"]:
        assert "strongly_typed=True" in script
    else:
        assert "strongly_typed=True" not in script
    if args["calibrator"]:
        assert f"BaseClass=trt.{args['calibrator']['BaseClass']}" in config
        assert f"cache={str(cache)!r}" in config and "quantile=0.9999" in config
    else:
        assert "Calibrator(" not in config
    if pinned:
        assert "SetLayerPrecisions" in script and "'/stem/conv/Conv': trt.float32" in script
    if p.profiles:
        prof = p.profiles[0]
        assert f"Profile().add('input', min={list(prof.min)}, opt={list(prof.opt)}, max={list(prof.max)})" in script
