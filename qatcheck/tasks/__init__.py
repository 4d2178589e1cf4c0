"""Tasks: metrics and task-level parity (classification top-k; detection mAP later)."""
from __future__ import annotations

from qatcheck.errors import ConfigError


def make_task(recipe):
    """The task object for a recipe."""
    if recipe.task == "classification":
        from qatcheck.tasks.classification import ClassificationTask

        return ClassificationTask(recipe.top_k)
    raise ConfigError(f"Recipe({recipe.name}).task {recipe.task!r} is not supported by this "
                      "version of qatcheck")
