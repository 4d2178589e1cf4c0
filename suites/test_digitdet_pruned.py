"""The pruned variants of the built-in detector (issue 12, item 6: the first sample repo quantizes a
pruned YOLOv5s): the shipped detector with 30 % of its prunable conv channels removed by L1 norm
and fine-tuned (qatcheck/zoo/digit_detector_pruned.pt, ``python -m qatcheck.zoo.train_pruned``),

* ``digitdet_pruned_structural``: channels removed, odd channel counts (7, 13, 27, 45, 51, 19);
* ``digitdet_pruned_mask``: the same network at the original widths with the pruned channels zeroed
  (weights, BN weight and bias): per-channel weight amax 0, which must never become a zero or
  non-finite Q/DQ scale,

every mode the digitdet suite runs, on every backend, judged by COCO mAP and box-level parity.
Baselines: baselines/digitdet_pruned_structural.json, baselines/digitdet_pruned_mask.json.
"""
import pytest

from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import detection_pruned_recipe

pytestmark = pytest.mark.qatcheck_recipe(detection_pruned_recipe("structural"),
                                         detection_pruned_recipe("mask"))
