"""digits quantized by NVIDIA ModelOpt (QuantSettings.torch_quantizer="modelopt"): fp32, torch_ptq,
qat and the opt-in fp8 mode (E4M3, simulated off an FP8 GPU), static and at the dynamic batch, on
PyTorch and ONNX Runtime. Needs the extra: ``pip install -e '.[modelopt]'``; skipped with that hint
otherwise. Baselines: baselines/digits_modelopt.json.
"""
import pytest

from qatcheck.quantize.modelopt_quant import missing_reason
from qatcheck.standard import *  # noqa: F401,F403

_missing = missing_reason("the ModelOpt suite")
if _missing:
    pytest.skip(_missing, allow_module_level=True)

from qatcheck.zoo.recipes import digits_modelopt_recipe  # noqa: E402

pytestmark = pytest.mark.qatcheck_recipe(digits_modelopt_recipe())
