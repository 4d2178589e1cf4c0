"""One recipe's world made one way (qatcheck.workspace): analyses run from a RecipeWorkspace or a
CaseView built without a session, under the artifact keys a session uses; nothing outside the
session reads its internals (issue 22, item 3)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qatcheck.analysis import localize as L
from qatcheck.analysis.sensitivity import SensitivityRunner, with_calibrator
from qatcheck.backends.onnxruntime_backend import OrtRunner
from qatcheck.measurement import Case
from qatcheck.quantize.onnx_ptq import scale_qdq
from qatcheck.session import Options, QatcheckSession
from qatcheck.workspace import CaseView, RecipeWorkspace

#: as in tests/test_localize.py: an activation Q/DQ pair only layer1.conv2 reads
PLANT_TENSOR = "/layer1/relu1/Relu_output_0"
PLANT_LAYER = "layer1.conv2"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from qatcheck.zoo.recipes import digits_recipe

    cache = tmp_path_factory.mktemp("cache")
    ws = RecipeWorkspace(with_calibrator(digits_recipe(), "percentile"), cache)
    ws.builder.onnx_artifact("trt_ptq")
    return ws


def test_a_workspace_has_the_keys_of_a_session_and_its_analyses_share_its_world(digits, tmp_path):
    """A workspace made without a session finds the artifacts a session's workspace would build
    (same cache keys, reused, not rebuilt); the sensitivity runner built from it is that world."""
    ws = digits
    again = RecipeWorkspace(ws.recipe, ws.cache.root)
    assert again.builder.onnx_artifact("trt_ptq").digest == ws.builder.onnx_artifact("trt_ptq").digest
    assert again.cache.reused and not again.cache.built
    session = QatcheckSession(Options(cache_dir=ws.cache.root, reports_dir=tmp_path, progress=False))
    session.register(ws.recipe)
    assert session.builder(ws.recipe.name).onnx_artifact("trt_ptq").digest == again.builder.onnx_artifact("trt_ptq").digest
    runner = SensitivityRunner(ws, "onnx", progress=False)
    assert runner.builder is ws.builder and runner.task is ws.task and runner.recipe is ws.recipe


def test_localization_runs_from_a_workspace_and_from_a_case_view_without_a_session(digits, tmp_path):
    """The planted scale (x64 on layer1.conv2's input) is named from a workspace and from a CaseView
    of a failed case whose runner runs the planted graph - no session anywhere; the clean graph,
    through the same view, names nothing."""
    ws = digits
    planted = tmp_path / "planted.onnx"
    scale_qdq(ws.builder.onnx_artifact("trt_ptq").path, planted, PLANT_TENSOR, 64)
    loc = L.localize(ws, "trt_ptq", quantized_onnx=planted, max_samples=32)
    assert loc.named == PLANT_LAYER

    case = Case(ws.recipe.name, "trt_ptq", "onnxruntime")

    def lines(path):
        view = CaseView.of(case, ws, tmp_path / "reports",
                           runner=OrtRunner(path, provider="CPUExecutionProvider", input_name=ws.recipe.input.name))
        assert view.thresholds is not None and view.reference == Case(ws.recipe.name, "fp32", "torch")
        return L.for_failed_case(view, max_samples=32)

    assert f"damage enters at {PLANT_LAYER}" in lines(planted)[0]
    assert (tmp_path / "reports" / f"{ws.recipe.name}-localize-trt_ptq.md").is_file()
    assert "no layer below the floor" in lines(ws.builder.onnx_artifact("trt_ptq").path)[0]


def session_internals_read(source: str, filename: str = "<string>") -> list[str]:
    """``x.session._y`` / ``session._y``: where code reads a session's private attributes."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name in ("session", "qs"):
                found.append(f"{filename}:{node.lineno}: {name}.{node.attr}")
    return found


def test_only_the_session_reads_its_internals():
    """report, repro, the analyses, the plugin and the benchmarks go through the session's public
    methods or a CaseView; the check itself finds a planted read."""
    assert session_internals_read("def f(session, case):\n    return session._states[case.recipe]\n")
    root = Path(__file__).resolve().parent.parent
    files = [p for p in (*(root / "qatcheck").rglob("*.py"), *(root / "benchmarks").rglob("*.py"))
             if p.name != "session.py"]
    assert [hit for p in files for hit in session_internals_read(p.read_text(), str(p.relative_to(root)))] == []
