"""The case planner: which cases a recipe has (modes x backends x profile points), why a case
cannot run by the recipe's nature, and the cases it is compared with (its parity reference, its
accuracy budget's fp32 case) - pure functions of the recipe and the mode table, used by the
plugin's parametrization, the session and the analyses alike."""
from __future__ import annotations

from typing import Iterable

from qatcheck.measurement import Case
from qatcheck.modes import MODE_SPECS, PROFILE_POINTS, parity_reference, spec, unsupported_reason
from qatcheck.recipe import NO_TORCH, ParityThresholds, Recipe, is_onnx_only
from qatcheck.registry import executes


def plan(recipe: Recipe, modes: Iterable[str] | None = None, backends: Iterable[str] | None = None) -> list[Case]:
    """Every (mode, backend, shape) of the recipe that makes sense, in table order: each mode's
    static build, and its dynamic build at min / opt / max where the recipe asks for it (a
    ``profile_only`` mode: at the profile points only). ``modes`` / ``backends``: only these."""
    modes = [m for m in recipe.modes if modes is None or m in modes]
    backends = [b for b in recipe.backends if backends is None or b in backends]
    out = []
    for mode in modes:
        s = spec(mode)
        shapes = (PROFILE_POINTS if s.profile_only
                  else ("", *PROFILE_POINTS) if mode in recipe.dynamic_modes else ("",))
        for backend in backends:
            if unsupported_reason(mode, backend):
                continue
            out.extend(Case(recipe.name, mode, backend, sh) for sh in shapes)
    return out


def input_shape(recipe: Recipe, case: Case) -> tuple[int, ...]:
    """The input shape ``case`` runs at: its profile point's (static builds: opt)."""
    return recipe.input.profile()[case.point]


def subset(recipe: Recipe, case: Case, eval_size: int) -> int | None:
    """How many of the eval set's ``eval_size`` samples ``case`` is evaluated on, when not all: a
    dynamic build at its min or max profile point checks runs, output shapes and parity on the
    first ``Recipe.profile_samples`` (its accuracy is judged at opt). None: the whole set."""
    n = recipe.profile_samples
    if case.shape not in ("min", "max") or n is None or n >= eval_size:
        return None
    return n


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


def parity_thresholds(recipe: Recipe, case: Case) -> ParityThresholds | None:
    """The floors ``case``'s parity is judged with (None where it has no reference): the recipe's
    quantization floors, or its export floors for the mode (an export compared with its own
    PyTorch model)."""
    ref = parity_reference(case.mode, case.backend)
    if ref is None or reference_case(recipe, case) is None:
        return None
    tol = recipe.tolerances
    if ref[1] == "quantization":
        return tol.quant_parity
    return tol.export_parity.get(case.mode, tol.quant_parity)


def budget_reference(recipe: Recipe, case: Case) -> Case:
    """The fp32 case a case's accuracy budget is judged against, on the same backend: fp32 for a
    static build. A dynamic build at a profile point: the fp32 dynamic build (the mode table's
    variant of fp32, ``dynamic``) at the same point when the recipe measures it; else static
    fp32 when the point's input differs only in the batch (the same samples, computed the same
    way); else the fp32 dynamic build at that point, measured for the purpose (another H / W
    changes what the model computes)."""
    if not case.dynamic:
        return case.with_mode("fp32")
    variant = next((m for m, s in MODE_SPECS.items() if s.variant_of == "fp32"), None)
    same_input = tuple(input_shape(recipe, case)[1:]) == tuple(recipe.input.shape[1:])
    if variant is None or (same_input and variant not in recipe.modes):
        return case.with_mode("fp32")
    return case.with_mode(variant, keep_shape=True)
