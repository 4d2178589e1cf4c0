"""Tasks: metrics and task-level parity (classification top-k, detection COCO mAP + box match)."""
from __future__ import annotations

from typing import Any, Callable

from qatcheck.errors import ConfigError


def make_task(recipe, eval_data: Callable[[], Any] | None = None):
    """The task object for a recipe.

    ``eval_data`` returns the recipe's (already loaded) eval set; detection needs its ground truth
    and categories, classification ignores it. It is a callable so a classification session never
    loads data just to build its task.
    """
    if recipe.task == "classification":
        from qatcheck.tasks.classification import ClassificationTask

        return ClassificationTask(recipe.top_k)
    if recipe.task == "detection":
        from qatcheck.tasks.detection import DetectionTask

        if eval_data is None:
            raise ConfigError(f"Recipe({recipe.name}): a detection task needs the eval data")
        return DetectionTask.for_dataset(eval_data(), decoder=recipe.decoder)
    raise ConfigError(f"Recipe({recipe.name}).task {recipe.task!r} is not supported by this "
                      "version of qatcheck")
