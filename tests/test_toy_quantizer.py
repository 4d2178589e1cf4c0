"""A third PyTorch quantizer, registered from this file alone (qatcheck.registry.register_torch_quantizer),
runs torch_ptq end to end through the real plugin: accuracy, parity, the structure check (a baseline
recorded, then a planted change to one quantized layer fails naming it, then a clean rerun passes),
automatic localization of the planted failure on the torch path, and the sensitivity profile. Also:
ModelOpt's torch_ptq profile lists its quantizers, and an unknown torch_quantizer is one ConfigError.

The toy is plain PyTorch: per-tensor, max-calibrated, symmetric int8 fake quant of every Conv2d /
Linear input and weight through ``torch.fake_quantize_per_tensor_affine`` (which the TorchScript
exporter writes as QuantizeLinear / DequantizeLinear)."""
from __future__ import annotations

import copy
import hashlib
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
from qatcheck.recipe import QuantSettings
from qatcheck.registry import register_torch_quantizer, unregister_torch_quantizer

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
    def version(self) -> str:  # its code is what shapes an artifact
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]

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


@pytest.fixture
def toy():
    register_torch_quantizer("toy", ToyQuantizer)
    try:
        yield
    finally:
        unregister_torch_quantizer("toy")


def _val_head(n: int = 128):
    from qatcheck.data.base import ArrayDataset
    from qatcheck.data.digits import digits_split

    val = digits_split("val")
    return ArrayDataset("digits16.val-head", val.images[:n], val.targets[:n])


def _toy_recipe():
    """digits, torch_ptq by the toy, on 128 eval samples (fast)."""
    from qatcheck.zoo.recipes import digits_recipe

    return digits_recipe(name="toydigits", modes=("fp32", "torch_ptq"), backends=("torch", "onnxruntime"),
                         dynamic_modes=(), eval_data=_val_head,
                         quant=QuantSettings(torch_quantizer="toy", torch_calibrator="max", calib_batches=2))


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
            "--qatcheck-reports", str(pytester.path / "reports"), "--qatcheck-no-progress")
    result = pytester.runpytest_inprocess(*args, "--update-baselines")
    assert result.ret == 0, result.stdout.str()
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
        result = pytester.runpytest_inprocess(*args)
    assert result.ret == 1
    out = result.stdout.str()
    assert f"{PLANT}:input" in out  # the structure check names the quantized layer
    result.stdout.fnmatch_lines(["*toydigits-torch_ptq-torch parity check failed:*",
                                 f"*localize toydigits torch_ptq (* samples, floor cosine *): damage enters at {PLANT}*"])
    assert "test_structure[toydigits-torch_ptq-torch]" in out.split("short test summary")[-1]

    result = pytester.runpytest_inprocess(*args)  # clean again: green
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
