"""Extending qatcheck: a mode is one row of the mode table plus its builder, a backend and a task
one registry entry each - nothing else in qatcheck changes.

The throwaway mode runs end to end through the real plugin (pytester): its cases are collected,
built by its own builder, measured on ONNX Runtime and PyTorch, judged, recorded, and reported.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qatcheck.backends import BACKEND_FACTORIES, register_backend, unregister_backend
from qatcheck.errors import ConfigError
from qatcheck.modes import MODE_SPECS, ModeSpec, parity_reference, register_mode, unregister_mode
from qatcheck.tasks import make_task, register_task, unregister_task

CONFTEST = '''
from qatcheck.modes import ModeSpec, register_mode
from qatcheck.quantize import export


def export_opset13(builder, spec, path, dynamic):
    """The throwaway mode's builder: the fp32 model exported at opset 13."""
    r = builder.recipe
    export.export_onnx(builder.state.model, r.input, path, r.output_names, dynamic=dynamic, opset=13)
    return {"opset": 13}


register_mode(ModeSpec("fp32_opset13", "float", "fp32", onnx_builder=export_opset13,
                       torch_builder="qatcheck.artifacts:plain_module"), replace=True)
'''

SUITE = '''
import pytest
from qatcheck.standard import test_accuracy, test_parity  # noqa: F401
from qatcheck.zoo.recipes import digits_recipe

pytestmark = pytest.mark.qatcheck_recipe(digits_recipe(
    modes=("fp32", "fp32_opset13"), backends=("torch", "onnxruntime"), dynamic_modes=("fp32_opset13",)))
'''


def test_a_new_mode_needs_only_its_row_and_builder(pytester, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_suite=SUITE)
    args = ("-p", "no:cacheprovider", f"--rootdir={pytester.path}", "--qatcheck-cache", str(cache))
    try:
        result = pytester.runpytest_inprocess(*args, "--co", "-q", "-m", "fp32_opset13 and onnxruntime")
        result.stdout.fnmatch_lines(["*test_accuracy?digits-fp32_opset13-onnxruntime?",
                                     "*test_parity?digits-fp32_opset13_max-onnxruntime?"])
        result = pytester.runpytest_inprocess(*args, "--update-baselines")
        # torch fp32 cases are parity references; accuracy at min / max is judged at opt
        result.assert_outcomes(passed=11, skipped=9)
        report = json.loads((pytester.path / "reports" / "digits.json").read_text())
        rows = {c["case"]["key"]: c for c in report["cases"]}
        new = rows["fp32_opset13-onnxruntime"]
        assert new["metrics"]["top1"] == rows["fp32-onnxruntime"]["metrics"]["top1"]
        assert new["parity_reference"] == "torch fp32_opset13 (export)" and new["parity"]["cosine"] > 0.99999
        assert rows["fp32_opset13_min-onnxruntime"]["shape"] == [1, 1, 16, 16]
        stored = json.loads((pytester.path / "baselines" / "digits.json").read_text())["cases"]
        assert "fp32_opset13_max-onnxruntime" in stored
        result = pytester.runpytest_inprocess(*args)
        result.assert_outcomes(passed=11, skipped=9)
        result.stdout.fnmatch_lines(["*artifact cache*: 0 built*"])
    finally:
        unregister_mode("fp32_opset13")


def test_mode_table_answers_for_a_registered_mode():
    row = register_mode(ModeSpec("int8_graph_x", "int8_graph", "int8", onnx_builder="x:y",
                                 backends=("onnxruntime",)))
    try:
        assert parity_reference("int8_graph_x", "onnxruntime") == ("fp32", "quantization")
        assert row.int8 and not row.has_torch
        with pytest.raises(ConfigError, match="already registered"):
            register_mode(row)
        from qatcheck.session import QatcheckSession
        from qatcheck.options import Options
        from qatcheck.zoo.recipes import digits_recipe

        recipe = digits_recipe(modes=("fp32", "int8_graph_x"), dynamic_modes=())
        cases = QatcheckSession(Options()).cases(recipe)
        assert [c.key for c in cases if c.mode == "int8_graph_x"] == ["int8_graph_x-onnxruntime"]
    finally:
        unregister_mode("int8_graph_x")
    assert "int8_graph_x" not in MODE_SPECS
    with pytest.raises(ConfigError, match="family"):
        ModeSpec("bad", "int4", "int8", onnx_builder="x:y")


def test_a_new_backend_is_one_registry_entry(tmp_path):
    """A backend that runs ONNX files through ONNX Runtime with one thread: registered by name,
    it gets the same build context as every backend and runs the recipe's cases."""
    from qatcheck.backends.base import Backend
    from qatcheck.backends.onnxruntime_backend import OrtRunner
    from qatcheck.measurement import Case
    from qatcheck.options import Options
    from qatcheck.session import QatcheckSession
    from qatcheck.zoo.recipes import digits_recipe

    seen = []

    class OneThreadOrt(Backend):
        name = "ort1"

        def __init__(self, options) -> None:
            self.options = options

        def unavailable_reason(self):
            return None

        def runner(self, context):
            seen.append((context.mode, context.dynamic))
            return OrtRunner(context.onnx_artifact(context.mode).path, "CPUExecutionProvider")

    register_backend("ort1", OneThreadOrt)
    try:
        recipe = digits_recipe(modes=("fp32",), backends=("torch", "ort1"), dynamic_modes=())
        session = QatcheckSession(Options(cache_dir=tmp_path, baselines_dir=tmp_path, progress=False))
        assert [c.key for c in session.cases(recipe)] == ["fp32-torch", "fp32-ort1"]
        m = session.measure(Case("digits", "fp32", "ort1"))
        assert m.metrics["top1"] > 0.98 and m.parity["cosine"] > 0.99999 and seen == [("fp32", False)]
        with pytest.raises(ConfigError, match="already registered"):
            register_backend("ort1", OneThreadOrt)
    finally:
        unregister_backend("ort1")
    assert "ort1" not in BACKEND_FACTORIES
    with pytest.raises(ConfigError, match="unknown backend 'ort1'"):
        digits_recipe(backends=("ort1",))


def test_a_new_task_is_one_registry_entry():
    from qatcheck.tasks.classification import ClassificationTask
    from qatcheck.zoo.recipes import digits_recipe

    register_task("top3", lambda recipe, eval_data: ClassificationTask((3,)))
    try:
        task = make_task(digits_recipe(task="top3"))
        assert task.metric_names == ("top3",)
    finally:
        unregister_task("top3")
    with pytest.raises(ConfigError, match="task 'top3' is unknown"):
        digits_recipe(task="top3")


def test_the_plugin_imports_nothing_heavy():
    """The plugin loads in every pytest run of the environment: importing it must not pull in
    torch, onnx, onnxruntime, pytorch-quantization or numpy."""
    code = textwrap.dedent("""
        import sys
        import qatcheck.plugin
        heavy = ("torch", "onnx", "onnxruntime", "pytorch_quantization", "numpy", "tqdm", "rich")
        print(",".join(m for m in heavy if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_dynamic_int8_builds_run_at_every_profile_point(tmp_path):
    """trt_ptq and torch_ptq built with the recipe's dynamic batch: a Q/DQ graph with a symbolic
    batch that runs at min, opt and max and agrees with the static build at opt."""
    import onnx

    from qatcheck.artifacts import ArtifactBuilder, RecipeState
    from qatcheck.backends.onnxruntime_backend import OrtRunner
    from qatcheck.cache import ArtifactCache
    from qatcheck.zoo.recipes import digits_recipe

    recipe = digits_recipe()
    b = ArtifactBuilder(RecipeState(recipe), ArtifactCache(tmp_path))
    x, _ = next(iter(b.state.eval_data.batches(128)))
    for mode in ("trt_ptq", "torch_ptq"):
        art = b.onnx_artifact(mode, dynamic=True)
        graph = onnx.load(str(art.path)).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        assert any(n.op_type == "QuantizeLinear" for n in graph.node)
        dyn = OrtRunner(art.path, "CPUExecutionProvider")
        for n in (1, 32, 128):
            assert dyn.infer(x[:n])[0].shape == (n, 10)
        static = OrtRunner(b.onnx_artifact(mode).path, "CPUExecutionProvider").infer(x[:32])[0]
        np.testing.assert_allclose(dyn.infer(x[:32])[0], static, atol=1e-4)
