"""The standard checks, for suites to import instead of writing them again - all of them, so a
check added here reaches every suite::

    import pytest
    from qatcheck.standard import *  # noqa: F401,F403 - test_accuracy, _parity, _latency, _structure, _precision

    pytestmark = pytest.mark.qatcheck_recipe(my_recipe())

pytest collects imported test functions as the importing module's own, so the module's
``qatcheck_recipe`` marker parametrizes them and their ids read ``test_accuracy[digits-fp32-torch]``.
Checks that do not apply skip, saying why (structure and precision for float modes, precision off
TensorRT). A suite that wants fewer imports them by name; one that needs something else writes its
own functions with the ``qcase`` fixture.
"""
from __future__ import annotations

import pytest

from qatcheck.modes import spec

#: every standard check: what ``from qatcheck.standard import *`` brings into a suite
__all__ = ["test_accuracy", "test_parity", "test_latency", "test_structure", "test_precision"]


def test_accuracy(qcase):
    """The task metric over the full eval set vs its baseline (and the fp32 budget, if any)."""
    qcase.check_accuracy()


def test_parity(qcase):
    """Outputs vs the case's PyTorch reference: cosine, max-abs, task-level agreement."""
    qcase.check_parity()


def test_latency(qcase, benchmark):
    """Median latency vs the baseline recorded on this device fingerprint."""
    qcase.check_latency(benchmark)


def test_structure(qcase):
    """Int8 modes: the artifact's quantized tensors (by module name), their scales and the Q/DQ
    pair count vs the baseline - a dropped quantizer, a moved scale or a graph without Q/DQ fails
    naming the quantizer. Skips for float modes."""
    if not spec(qcase.case.mode).int8:
        pytest.skip(f"{qcase.case.mode} is not an int8 mode")
    qcase.check_structure()


def test_precision(qcase):
    """On TensorRT: every conv of an int8 (fp8) engine runs in int8 (fp8) - layers the recipe keeps
    in higher precision excepted. Skips on backends without an engine to inspect."""
    if not spec(qcase.case.mode).int8:
        pytest.skip(f"{qcase.case.mode} is not an int8 mode")
    qcase.check_precision(conv=spec(qcase.case.mode).precision)
