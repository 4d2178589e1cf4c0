"""The digit detector quantized by NVIDIA ModelOpt (QuantSettings.torch_quantizer="modelopt"): fp32,
torch_ptq, qat and the opt-in fp8 mode (E4M3, simulated off an FP8 GPU), on PyTorch and ONNX
Runtime, judged by COCO mAP and box-level parity. Needs the extra: ``pip install -e '.[modelopt]'``;
skipped with that hint otherwise. Baselines: baselines/digitdet_modelopt.json.
"""
import pytest

from qatcheck.quantize.modelopt_quant import missing_reason
from qatcheck.standard import *  # noqa: F401,F403

_missing = missing_reason("the ModelOpt suite")
if _missing:
    pytest.skip(_missing, allow_module_level=True)

from qatcheck.zoo.recipes import digitdet_modelopt_recipe  # noqa: E402

pytestmark = pytest.mark.qatcheck_recipe(digitdet_modelopt_recipe())
