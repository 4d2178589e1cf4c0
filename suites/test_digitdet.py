"""The built-in detection suite: the CenterNet-style digit detector on digits pasted onto real
scikit-image photos, every mode on every backend, judged by COCO mAP@.5:.95 / mAP@.5 (pycocotools)
and box-level parity. Baselines: baselines/digitdet.json.

The data (COCO JSON + PNGs) are generated once, deterministically, under
~/.cache/qatcheck/digit_detection (or $QATCHECK_DATA_CACHE).
"""
import pytest

from qatcheck.standard import test_accuracy, test_latency, test_parity, test_structure  # noqa: F401
from qatcheck.zoo.recipes import detection_recipe

pytestmark = pytest.mark.qatcheck_recipe(detection_recipe())
