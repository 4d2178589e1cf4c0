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


INT8 = ("trt_ptq", "partial", "torch_ptq", "qat")


def test_precision(qcase):
    """On TensorRT: every conv of an int8 engine runs in int8 (layers the recipe keeps in higher
    precision excepted). Skips on backends without an engine to inspect."""
    if qcase.case.mode not in INT8:
        pytest.skip(f"{qcase.case.mode} is not an int8 mode")
    qcase.check_precision(conv="int8")
