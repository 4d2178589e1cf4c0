"""The built-in digits suite: every mode on every backend, checked against baselines/digits.json.

Run:  pytest suites/            (add --update-baselines to record new baselines)
"""
import pytest

from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import digits_recipe

pytestmark = pytest.mark.qatcheck_recipe(digits_recipe())
