"""The built-in digits suite: every mode on every backend, checked against baselines/digits.json.

Run:  pytest suites/            (add --update-baselines to record new baselines)
"""
import pytest

from qatcheck.zoo.recipes import digits_recipe

pytestmark = pytest.mark.qatcheck_recipe(digits_recipe())


def test_accuracy(qcase):
    qcase.check_accuracy()


def test_parity(qcase):
    qcase.check_parity()


def test_latency(qcase, benchmark):
    qcase.check_latency(benchmark)
