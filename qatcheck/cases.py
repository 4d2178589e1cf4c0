"""Which cases exist and how they relate: why a case cannot run by the recipe's nature, and the case
its outputs are compared with (its parity reference)."""
from __future__ import annotations

from qatcheck.measurement import Case
from qatcheck.modes import parity_reference, spec
from qatcheck.recipe import NO_TORCH, Recipe, is_onnx_only
from qatcheck.registry import executes


def skip_reason(recipe: Recipe, case: Case) -> str | None:
    """Why ``case`` cannot run by the recipe's nature (None when it can): an ONNX-only recipe has no
    PyTorch side to run or quantize."""
    if not is_onnx_only(recipe):
        return None
    if executes(case.backend) == "torch":
        return f"{NO_TORCH}; the {case.backend} backend runs PyTorch modules"
    if spec(case.mode).family == "int8_torch":
        return f"{NO_TORCH}; mode {case.mode!r} quantizes the PyTorch model"
    return None


def reference_case(recipe: Recipe, case: Case) -> Case | None:
    """The case ``case``'s outputs are compared with, at the same shape (None for a reference
    itself): its PyTorch twin or PyTorch fp32 (qatcheck.modes.parity_reference); for an ONNX-only
    recipe, the fp32 graph on ONNX Runtime (the dynamic build at a profile point)."""
    if is_onnx_only(recipe):
        ref = Case(case.recipe, "dynamic" if case.shape else "fp32", "onnxruntime", case.shape)
        same = ref == case or (case.backend == "onnxruntime" and spec(case.mode).is_reference)
        return None if same else ref
    rel = parity_reference(case.mode, case.backend)
    return None if rel is None else case.with_mode(rel[0], "torch", keep_shape=True)
