"""The built-in detection suite: the CenterNet-style digit detector on digits pasted onto real
scikit-image photos, every mode on every backend, judged by COCO mAP@.5:.95 / mAP@.5 (pycocotools)
and box-level parity. Baselines: baselines/digitdet.json.

The data (COCO JSON + PNGs) are generated once, deterministically, under
~/.cache/qatcheck/digit_detection (or $QATCHECK_DATA_CACHE).
"""
import pytest

from qatcheck.zoo.recipes import detection_recipe

pytestmark = pytest.mark.qatcheck_recipe(detection_recipe())


def test_accuracy(qcase):
    qcase.check_accuracy()


def test_parity(qcase):
    qcase.check_parity()


def test_latency(qcase, benchmark):
    qcase.check_latency(benchmark)
