"""Partial quantization under test: digits with the entropy calibrator, whose trt_ptq loses ~14
points of top-1. ``partial`` keeps the layers the sensitivity command chose
(qatcheck/zoo/digits_entropy.keep.json) and must stay within 0.5 points of fp32
(Tolerances.fp32_budget_points); the report lists the kept layers and why.
"""
import pytest

from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import digits_entropy_recipe

pytestmark = pytest.mark.qatcheck_recipe(digits_entropy_recipe())
