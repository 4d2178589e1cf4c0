"""Tasks: metrics and task-level parity (classification top-k, detection COCO mAP + box match),
found by name in a registry.

A task factory is ``factory(recipe, eval_data) -> Task`` (see :mod:`qatcheck.tasks.base`);
``eval_data`` returns the recipe's (already loaded) eval set - detection needs its ground truth and
categories, classification ignores it. It is a callable so a classification session never loads
data just to build its task. Built-in factories are ``"module:function"`` strings, so naming a task
(``Recipe.task``) imports nothing.
"""
from __future__ import annotations

from typing import Any, Callable

from qatcheck.errors import ConfigError

TASK_FACTORIES: dict[str, Any] = {
    "classification": "qatcheck.tasks.classification:for_recipe",
    "detection": "qatcheck.tasks.detection:for_recipe",
}


def register_task(name: str, factory: Callable[[Any, Callable[[], Any]], Any] | str, *,
                  replace: bool = False) -> None:
    """Add a task: ``factory(recipe, eval_data)`` returns an object with the Task protocol."""
    if name in TASK_FACTORIES and not replace:
        raise ConfigError(f"task {name!r} is already registered")
    TASK_FACTORIES[name] = factory


def unregister_task(name: str) -> None:
    TASK_FACTORIES.pop(name, None)


def task_names() -> tuple[str, ...]:
    return tuple(TASK_FACTORIES)


def make_task(recipe, eval_data: Callable[[], Any] | None = None):
    """The task object for a recipe (see the module docstring); with ``Recipe.task_output`` or
    ``Recipe.heads``, the task on that output plus each head's (:mod:`qatcheck.tasks.heads`)."""
    from qatcheck.modes import resolve
    from qatcheck.tasks.heads import wrap

    def make(name: str):
        factory = TASK_FACTORIES.get(name)
        if factory is None:
            raise ConfigError(f"Recipe({recipe.name}) names task {name!r}, which is unknown; registered "
                              f"tasks: {', '.join(TASK_FACTORIES)}")
        return resolve(factory)(recipe, eval_data)

    return wrap(recipe, make(recipe.task), make)
