"""A third PyTorch quantizer, registered from this file alone (qatcheck.registry.register_torch_quantizer),
runs torch_ptq end to end through the real plugin: accuracy, parity, the structure check (a baseline
recorded, then a planted change to one quantized layer fails naming it, then a clean rerun passes),
automatic localization of the planted failure on the torch path, and the sensitivity profile; an ONNX
quantizer registered here writes trt_ptq when ``--qatcheck-trt-ptq`` names it. Also: ModelOpt's
torch_ptq profile lists its quantizers, an unknown torch_quantizer is one ConfigError, and an edit of a
registered quantizer's file rebuilds what it writes.

The toy is plain PyTorch: per-tensor, max-calibrated, symmetric int8 fake quant of every Conv2d /
Linear input and weight through ``torch.fake_quantize_per_tensor_affine`` (which the TorchScript
exporter writes as QuantizeLinear / DequantizeLinear)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qatcheck.errors import ArtifactError, ConfigError
from qatcheck.fsutil import atomic_path
from qatcheck.quantize.torch_common import TorchQuantizer, feed_calibration, quantizer_of
from qatcheck.quantize.onnx_ptq import QatcheckPTQ
from qatcheck.recipe import QuantSettings
from qatcheck.registry import (ONNX_QUANTIZERS, register_onnx_quantizer, register_torch_quantizer,
                               unregister_torch_quantizer)

pytestmark = pytest.mark.usefixtures("single_thread_module")

#: the layer the plant scales (its input quantizer's amax x64: most of its inputs round to 0)
PLANT = "layer1.conv2"
_FLOOR = 2.0 ** -23


# ---- the toy quantizer ------------------------------------------------------------------------

class ToyFakeQuant(nn.Module):
    """One tensor's fake quant: amax is the running abs max while calibrating."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("amax", torch.zeros(()))
        self.enabled, self.calibrating = True, False

    def scale(self) -> float:
        return max(float(self.amax), _FLOOR) / 127.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self.amax = torch.maximum(self.amax, x.detach().abs().max())
            return x
        if not self.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale(), 0, -128, 127)


class QuantToyConv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantToyLinear(nn.Linear):
    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


_SWAP = {nn.Conv2d: QuantToyConv2d, nn.Linear: QuantToyLinear}


class ToyQuantizer(TorchQuantizer):
    def version(self) -> str:  # this file is keyed too (qatcheck.artifacts.implementation_id)
        return "1"

    def _wrap(self, model: nn.Module) -> nn.Module:
        qmodel = copy.deepcopy(model)
        for m in qmodel.modules():
            if type(m) in _SWAP:
                m.__class__ = _SWAP[type(m)]
                m.input_quantizer, m.weight_quantizer = ToyFakeQuant(), ToyFakeQuant()
        return qmodel

    def quantize(self, model, quant, batches, *, fp8=False, device="cpu", progress=False):
        if fp8:
            raise ConfigError("the toy quantizer has no fp8")
        qmodel = self._wrap(model).eval().to(device)
        qs = [q for _, q in self.quantizers(qmodel)]
        for q in qs:
            q.calibrating = True
        feed_calibration(qmodel, batches, device, progress=progress)
        for q in qs:
            q.calibrating = False
        return qmodel

    def save(self, qmodel, path, quant, fp8=False):
        payload = {"state_dict": {k: v.detach().cpu() for k, v in qmodel.state_dict().items()},
                   "disabled": [n for n, q in self.quantizers(qmodel) if not q.enabled]}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)

    def load(self, model, path, quant, fp8=False):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        qmodel = self._wrap(model)
        try:
            qmodel.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: does not match the model: {exc}") from exc
        for name in payload["disabled"]:
            qmodel.get_submodule(name).enabled = False
        return qmodel.eval()

    def export_onnx(self, qmodel, example, path, input_name, output_names, dynamic_axes=None):
        with atomic_path(path) as tmp, torch.no_grad():
            torch.onnx.export(qmodel.eval(), (example,), str(tmp), input_names=[input_name],
                              output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=17,
                              do_constant_folding=True, dynamo=False)

    def is_quantizer(self, module):
        return isinstance(module, ToyFakeQuant)

    def is_enabled(self, quantizer):
        return quantizer.enabled

    def set_enabled(self, quantizer, on):
        quantizer.enabled = on

    def scales(self, qmodel):
        out = []
        for name, q in self.quantizers(qmodel):
            if q.enabled:
                owner, _, attr = name.rpartition(".")
                kind = "weight" if attr == "weight_quantizer" else "activation"
                out.append((f"{owner}:{'weight' if kind == 'weight' else 'input'}", kind, np.float32(q.scale())))
        return out


class ToyOnnxPTQ(QatcheckPTQ):
    """An ONNX quantizer registered from here (qatcheck's PTQ under another name, counting its calls):
    ``--qatcheck-trt-ptq toyonnx`` has it write the trt_ptq graph."""

    calls = 0

    def quantize(self, *args, **kwargs):
        type(self).calls += 1
        return super().quantize(*args, **kwargs)


@pytest.fixture
def toy():
    register_torch_quantizer("toy", ToyQuantizer)
    register_onnx_quantizer("toyonnx", ToyOnnxPTQ)
    try:
        yield
    finally:
        unregister_torch_quantizer("toy")
        ONNX_QUANTIZERS.unregister("toyonnx")


def _val_head(n: int = 128):
    from qatcheck.data.base import ArrayDataset
    from qatcheck.data.digits import digits_split

    val = digits_split("val")
    return ArrayDataset("digits16.val-head", val.images[:n], val.targets[:n])


def _toy_recipe():
    """digits, torch_ptq by the toy, on 128 eval samples (fast)."""
    from qatcheck.zoo.recipes import digits_recipe

    return digits_recipe(name="toydigits", modes=("fp32", "trt_ptq", "torch_ptq"), backends=("torch", "onnxruntime"),
                         dynamic_modes=(), eval_data=_val_head,
                         quant=QuantSettings(torch_quantizer="toy", torch_calibrator="max", calibrator="minmax",
                                                       calib_batches=2))


SUITE = '''
import pytest
from qatcheck.standard import test_accuracy, test_parity, test_structure  # noqa: F401
from test_toy_quantizer import _toy_recipe

pytestmark = pytest.mark.qatcheck_recipe(_toy_recipe())
'''


def test_toy_quantizer_runs_torch_ptq_through_the_plugin(toy, pytester, monkeypatch):
    pytester.makepyfile(test_toy=SUITE)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = ("-p", "no:cacheprovider", "--qatcheck-cache", str(pytester.path / "cache"),
            "--qatcheck-baselines", str(pytester.path / "baselines"),
            "--qatcheck-reports", str(pytester.path / "reports"), "--qatcheck-no-progress",
            "--qatcheck-trt-ptq", "toyonnx")
    result = pytester.runpytest_inprocess(*args, "--update-baselines")
    assert result.ret == 0, result.stdout.str()
    assert ToyOnnxPTQ.calls == 1  # the trt_ptq graph, once
    result.stdout.fnmatch_lines(["*trt_ptq*onnxruntime*minmax (toyonnx)*"])
    report = json.loads((pytester.path / "reports" / "toydigits.json").read_text())
    rows = {c["case"]["key"]: c for c in report["cases"]}
    ptq = rows["torch_ptq-onnxruntime"]
    assert ptq["metrics"]["top1"] > 0.95 and ptq["parity"]["cosine"] > 0.999
    result.stdout.fnmatch_lines(["*max (toy)*"])  # the calibrator column names the quantizer
    stored = json.loads((pytester.path / "baselines" / "toydigits.json").read_text())["cases"]
    assert any("layer1.conv2:input" in json.dumps(c) for c in stored.values())

    # planted: the toy's loaded torch_ptq module has one input range x64 (the cached file stays clean)
    load = ToyQuantizer.load

    def planted(self, model, path, quant, fp8=False):
        qm = load(self, model, path, quant, fp8)
        qm.get_submodule(PLANT).input_quantizer.amax.mul_(64.0)
        return qm
    with monkeypatch.context() as mp:
        mp.setattr(ToyQuantizer, "load", planted)
        # a plant in memory leaves this file as it was, and the result cache keys on the file (an
        # edit of it is measured again: tests/test_results.py); so it is measured on demand
        result = pytester.runpytest_inprocess(*args, "--qatcheck-remeasure")
    assert result.ret == 1
    out = result.stdout.str()
    assert f"{PLANT}:input" in out  # the structure check names the quantized layer
    result.stdout.fnmatch_lines(["*toydigits-torch_ptq-torch parity check failed:*",
                                 f"*localize toydigits torch_ptq (* samples, floor cosine *): damage enters at {PLANT}*"])
    assert "test_structure[toydigits-torch_ptq-torch]" in out.split("short test summary")[-1]

    # clean again: green (measured again too: the planted run stored its figures under the clean key)
    result = pytester.runpytest_inprocess(*args, "--qatcheck-remeasure")
    assert result.ret == 0, result.stdout.str()


def test_toy_quantizer_sensitivity_profile_lists_its_quantizers(toy, tmp_path):
    from qatcheck.analysis import sensitivity as S

    runner = S.SensitivityRunner(_toy_recipe(), "torch", tmp_path, progress=False)
    assert isinstance(quantizer_of(runner.path.qmodel), ToyQuantizer)
    prof = S.profile(runner, "torch", max_samples=32, progress=False)
    assert prof.calibrator == "max" and PLANT in prof.ranked and "fc" in prof.ranked
    assert prof.row(PLANT).targets == [f"{PLANT}.input_quantizer", f"{PLANT}.weight_quantizer"]


@pytest.mark.modelopt
def test_modelopt_sensitivity_profile_lists_its_quantizers(tmp_path):
    from qatcheck.quantize import modelopt_quant

    reason = modelopt_quant.missing_reason("this test")
    if reason:
        pytest.skip(reason)
    from qatcheck.analysis import sensitivity as S
    from qatcheck.zoo.recipes import digits_modelopt_recipe

    recipe = digits_modelopt_recipe(modes=("fp32", "torch_ptq"), dynamic_modes=(),
                                    quant=QuantSettings(torch_quantizer="modelopt", torch_calibrator="max",
                                                        calib_batches=2))
    prof = S.profile(S.SensitivityRunner(recipe, "torch", tmp_path, progress=False), "torch",
                     max_samples=32, progress=False)
    assert PLANT in prof.ranked and "fc" in prof.ranked
    assert f"{PLANT}.input_quantizer" in prof.row(PLANT).targets


def test_unknown_torch_quantizer_is_one_config_error_listing_the_registered_names(toy):
    from qatcheck.zoo.recipes import digits_recipe

    with pytest.raises(ConfigError, match=r"QuantSettings.torch_quantizer 'tensorrt' is unknown; choose one "
                                          r"of pytorch-quantization, modelopt, toy \(or register one"):
        digits_recipe(quant=QuantSettings(torch_quantizer="tensorrt"))


FILES = {"my_torch_q": "from test_toy_quantizer import ToyQuantizer\n\n\nclass Mine(ToyQuantizer):\n    pass\n",
         "my_onnx_q": "from qatcheck.quantize.onnx_ptq import QatcheckPTQ\n\n\nclass Mine(QatcheckPTQ):\n    pass\n"}


def test_an_edit_of_a_registered_quantizers_file_rebuilds_what_it_writes(tmp_path, monkeypatch):
    """A quantizer defined outside qatcheck keys its artifacts on the file that defines it: an edit
    of the torch quantizer's file changes torch_ptq's key (its artifacts rebuild), of the ONNX
    quantizer's trt_ptq's, neither fp16's; qatcheck's own quantizers key on name and version only
    (their code is qatcheck's build code, in every key already)."""
    from qatcheck.artifacts import implementation_id
    from qatcheck.modes import spec
    from qatcheck.registry import onnx_quantizer, torch_quantizer
    from qatcheck.workspace import RecipeWorkspace
    from qatcheck.zoo.recipes import digits_recipe

    for name, text in FILES.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    register_torch_quantizer("mytorch", "my_torch_q:Mine")
    register_onnx_quantizer("myonnx", "my_onnx_q:Mine")
    try:
        recipe = digits_recipe(modes=("fp32", "fp16", "trt_ptq", "torch_ptq"), dynamic_modes=(),
                               quant=QuantSettings(torch_quantizer="mytorch", torch_calibrator="max"))
        b = RecipeWorkspace(recipe, tmp_path / "cache", onnx_quantizer="myonnx").builder

        def keys():
            return {m: b.key_parts(spec(m)) for m in ("fp16", "trt_ptq", "torch_ptq")}

        def edit(name):
            (tmp_path / f"{name}.py").write_text(FILES[name] + "# an edit\n")
        before = keys()
        assert keys() == before  # nothing edited: the same keys
        edit("my_torch_q")
        torch_edited = keys()
        assert torch_edited["torch_ptq"] != before["torch_ptq"]
        assert torch_edited["trt_ptq"] == before["trt_ptq"] and torch_edited["fp16"] == before["fp16"]
        edit("my_onnx_q")
        onnx_edited = keys()
        assert onnx_edited["trt_ptq"] != before["trt_ptq"]
        assert onnx_edited["torch_ptq"] == torch_edited["torch_ptq"] and onnx_edited["fp16"] == before["fp16"]
    finally:
        unregister_torch_quantizer("mytorch")
        ONNX_QUANTIZERS.unregister("myonnx")
    for builtin in (torch_quantizer("pytorch-quantization"), onnx_quantizer("qatcheck")):
        assert implementation_id(builtin) == builtin.cache_id()
