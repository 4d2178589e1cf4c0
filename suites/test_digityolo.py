"""The built-in YOLO suite: ultralytics YOLOv8n-P2 (built from its yaml, trained by
``python -m qatcheck.zoo.train_yolo``) on the digit-detection data, every mode on every backend,
with TensorRT's Q/DQ placement rules in torch_ptq / qat. Needs the extra: ``pip install -e '.[yolo]'``;
skipped with that hint otherwise. Baselines: baselines/digityolo.json.
"""
import importlib.util

import pytest

from qatcheck.standard import *  # noqa: F401,F403

if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("the YOLO suite needs ultralytics: pip install -e '.[yolo]'", allow_module_level=True)

from qatcheck.zoo.recipes import yolo_recipe  # noqa: E402

pytestmark = pytest.mark.qatcheck_recipe(yolo_recipe())
