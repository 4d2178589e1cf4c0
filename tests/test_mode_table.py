"""Modes and families are read from the mode table only (issue 22): a mode registered with a row
is seen by every place that used to keep its own list of mode names."""
from __future__ import annotations

import pytest

from qatcheck.errors import ConfigError
from qatcheck.modes import ModeSpec, register_mode, sensitivity_modes, unregister_mode


@pytest.fixture
def rows():
    """A second ONNX-level PTQ mode that keeps layers, and a trained PyTorch mode (rows only: no
    artifact is built)."""
    graph = register_mode(ModeSpec("int8_graph_x", "int8_graph", "int8", onnx_builder="x:y", keeps_layers=True))
    trained = register_mode(ModeSpec("qat_x", "int8_torch", "int8", onnx_builder="x:y", torch_builder="x:z",
                                     trained=True))
    try:
        yield graph, trained
    finally:
        unregister_mode("int8_graph_x")
        unregister_mode("qat_x")


def test_the_crosscheck_modes_are_the_graph_ptq_family(rows):
    from qatcheck.__main__ import build_parser
    from qatcheck.analysis import ptq_crosscheck as X
    from qatcheck.zoo.recipes import digits_recipe

    with pytest.raises(ConfigError, match=r"crosscheck: mode 'torch_ptq': choose one of trt_ptq, partial, int8_graph_x$"):
        X.build_graphs(digits_recipe(), "minmax", mode="torch_ptq")
    args = build_parser().parse_args(["crosscheck", "--recipe", "m:f", "--mode", "int8_graph_x"])
    assert args.mode == "int8_graph_x"


def test_a_trained_mode_on_a_detector_needs_its_loss(rows):
    from qatcheck.zoo.recipes import detection_recipe

    with pytest.raises(ConfigError, match=r"lists mode 'qat_x' for a detection task but sets no Recipe.loss"):
        detection_recipe(modes=("fp32", "qat_x"), dynamic_modes=(), loss=None)


def test_the_sensitivity_paths_profile_the_rows_that_say_so():
    from qatcheck.analysis.sensitivity import PATH_MODE

    assert PATH_MODE == sensitivity_modes() == {"onnx": "trt_ptq", "torch": "torch_ptq"}
