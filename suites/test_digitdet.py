"""The built-in detection suite: the CenterNet-style digit detector on digits pasted onto real
scikit-image photos, every mode on every backend, judged by COCO mAP@.5:.95 / mAP@.5 (pycocotools)
and box-level parity. Baselines: baselines/digitdet.json.

The data (COCO JSON + PNGs) are generated once, deterministically, under
~/.cache/qatcheck/digit_detection (or $QATCHECK_DATA_CACHE).
"""
import pytest

from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import detection_recipe

pytestmark = pytest.mark.qatcheck_recipe(detection_recipe())
