"""One recipe's world, and one case as the analyses see it.

:class:`RecipeWorkspace` is what a pytest session, every analysis (localize, sensitivity,
crosscheck), the CLI and the benchmark scripts need of a recipe: its lazily loaded pieces
(:class:`~qatcheck.artifacts.RecipeState`: model, datasets), the artifact builder over a cache, the
task, and the eval batches - made one way, so an analysis run after a session reads the artifacts
the session built, under the same keys.

:class:`CaseView` is one (failed) case handed to what explains it (the reproduction bundle,
localization): the case, its workspace, what ran it and its reference, its floors, its measurement
and where its reports go - never the session itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from qatcheck import cases
from qatcheck.artifacts import ArtifactBuilder, RecipeState
from qatcheck.backends.base import Runner
from qatcheck.cache import ArtifactCache
from qatcheck.data.base import Dataset
from qatcheck.data.batching import eval_batches
from qatcheck.measurement import Case, Measurement
from qatcheck.recipe import ParityThresholds, Recipe

__all__ = ["RecipeWorkspace", "CaseView", "workspace_of"]


class RecipeWorkspace:
    """``recipe``'s builder, cache, task and data. ``cache``: an :class:`ArtifactCache` or its
    directory (``use_cache=False``: rebuild, still writing the cache). ``device``: where calibration
    and QAT run; ``onnx_quantizer``: who writes the trt_ptq / partial graphs (both enter those
    artifacts' keys, see :class:`ArtifactBuilder`); ``progress``: build progress bars."""

    def __init__(self, recipe: Recipe, cache: ArtifactCache | str | Path = ".qatcheck_cache", *,
                 use_cache: bool = True, device: str = "cpu", onnx_quantizer: str = "qatcheck",
                 progress: bool = False, state: RecipeState | None = None) -> None:
        self.recipe = recipe
        self.cache = cache if isinstance(cache, ArtifactCache) else ArtifactCache(cache, enabled=use_cache)
        #: shared by the workspaces derived for the same recipe object (the model and data load once)
        self.state = state if state is not None and state.recipe is recipe else RecipeState(recipe)
        self.builder = ArtifactBuilder(self.state, self.cache, progress, device=device,
                                       onnx_quantizer=onnx_quantizer)

    def derive(self, recipe: Recipe | None = None, **options: Any) -> RecipeWorkspace:
        """The same cache (and, for the same recipe, the same loaded model and data) with another
        recipe (a calibrator override) or other builder options (``onnx_quantizer="modelopt"``);
        itself when nothing changes."""
        b = self.builder
        kw = dict(device=b.device, onnx_quantizer=b.onnx_quantizer, progress=b.progress)
        changed = {k: v for k, v in options.items() if v is not None and v != kw[k]}
        if (recipe is None or recipe is self.recipe) and not changed:
            return self
        return RecipeWorkspace(recipe or self.recipe, self.cache, state=self.state, **{**kw, **changed})

    @property
    def device(self) -> str:
        return self.builder.device

    @cached_property
    def task(self):
        """The recipe's task, built once (detection reads the eval set's ground truth)."""
        from qatcheck.tasks import make_task

        return make_task(self.recipe, lambda: self.state.eval_data)

    @property
    def eval_data(self) -> Dataset:
        return self.state.eval_data

    @property
    def calib_data(self) -> Dataset:
        return self.state.calib_data

    def shape(self, case: Case | None = None) -> tuple[int, ...]:
        """The input shape ``case`` runs at (None: the recipe's opt shape)."""
        return self.recipe.input.profile()["opt"] if case is None else cases.input_shape(self.recipe, case)

    def eval_batches(self, case: Case | None = None, **kw: Any) -> Iterator[tuple[np.ndarray, Any, int]]:
        """``(inputs, targets, real count)`` over the eval set at ``case``'s shape (None: opt);
        ``kw``: :func:`qatcheck.data.batching.eval_batches`'s ``pad``, ``max_samples``,
        ``resize_targets``."""
        return eval_batches(self.eval_data, self.shape(case), **kw)


def workspace_of(source: Recipe | RecipeWorkspace, cache: ArtifactCache | str | Path = ".qatcheck_cache",
                 **options: Any) -> RecipeWorkspace:
    """What an analysis runs in: ``source`` itself when it is a workspace (a session's, or one the
    caller made; ``options`` it differs in derive a sibling), else a new one for the Recipe
    ``source`` over ``cache``."""
    if isinstance(source, RecipeWorkspace):
        return source.derive(**{k: v for k, v in options.items() if k != "use_cache"})
    return RecipeWorkspace(source, cache, **{k: v for k, v in options.items() if v is not None})


@dataclass(frozen=True)
class CaseView:
    """One case of a run, as its reproduction bundle and its localization read it."""

    case: Case
    workspace: RecipeWorkspace
    #: where the case's reports (localization tables, repro bundles) go
    reports_dir: Path
    #: what ran the case (an ONNX-file runner has ``artifact_path``); None: not run here
    runner: Runner | None = None
    #: the case its outputs are compared with, and what ran that one
    reference: Case | None = None
    reference_runner: Runner | None = None
    #: the floors its parity is judged with (None: it has no reference)
    thresholds: ParityThresholds | None = None
    measurement: Measurement | None = None
    #: the engine's own intermediate values (TensorRT debug tensors), where the backend has them
    debug_tensors: Callable[[], Any] | None = None

    @classmethod
    def of(cls, case: Case, workspace: RecipeWorkspace, reports_dir: str | Path, **parts: Any) -> CaseView:
        """A view whose reference and floors come from the case planner (:mod:`qatcheck.cases`)."""
        parts.setdefault("reference", cases.reference_case(workspace.recipe, case))
        parts.setdefault("thresholds", cases.parity_thresholds(workspace.recipe, case))
        return cls(case, workspace, Path(reports_dir), **parts)

    @property
    def recipe(self) -> Recipe:
        return self.workspace.recipe

    @property
    def builder(self) -> ArtifactBuilder:
        return self.workspace.builder

    @property
    def shape(self) -> tuple[int, ...]:
        return self.workspace.shape(self.case)

    @property
    def cache_dir(self) -> Path:
        return self.workspace.cache.root
