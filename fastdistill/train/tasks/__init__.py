"""The task registry: a task name (``--task``) → its :class:`~fastdistill.train.tasks.base.Task`.

The built-in tasks (``mlm``, ``clm``, ``hidden``, ``squad``, ``llm``) register themselves when this package
is imported; :func:`register_task` adds another (a test registers a toy regression task and trains
it through the unchanged trainer). The trainer and the config look a task up here by name once;
nothing else tests the name.
"""

from __future__ import annotations

from fastdistill.train.tasks.base import LOSS_TERMS, Task, TaskOptions

_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator). Its option keys must not
    collide with the general config keys or another task's (unless inherited from a shared base)."""
    from fastdistill.train.config import check_task_options

    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} has no name: set the class attribute `name`")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(
            f"a task named {name!r} is already registered ({_REGISTRY[name].__name__})"
        )
    check_task_options(cls, _REGISTRY.values())
    _REGISTRY[name] = cls
    return cls


def unregister_task(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_task(name: str) -> type[Task]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"task must be one of {', '.join(_REGISTRY)}, got {name!r}") from None


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_tasks() -> tuple[type[Task], ...]:
    return tuple(_REGISTRY.values())


def _register_builtins() -> None:
    from fastdistill.train.tasks.clm import CLMTask
    from fastdistill.train.tasks.hidden import HiddenTask
    from fastdistill.train.tasks.llm import LLMTask
    from fastdistill.train.tasks.mlm import MLMTask
    from fastdistill.train.tasks.squad import SquadTask

    for cls in (MLMTask, CLMTask, HiddenTask, SquadTask, LLMTask):
        register_task(cls)


_register_builtins()

__all__ = [
    "LOSS_TERMS",
    "Task",
    "TaskOptions",
    "all_tasks",
    "get_task",
    "register_task",
    "task_names",
    "unregister_task",
]
