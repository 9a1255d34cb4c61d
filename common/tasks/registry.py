"""The task registry: data.task names a registered task, or an import path `package.module:Class` (or
`package.module.Class`) that Ray workers and merchant processes import the same way.

Built-in tasks register themselves when their module is imported; a name this module does not know yet is
looked up among them (common.tasks.<name>) before it is refused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from common.run.config import FedshopConfig
from common.run.errors import FedshopError

if TYPE_CHECKING:
    from common.tasks.base import Task

BUILTIN = ("retrieval", "relevance", "sentiment")
_TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a Task subclass selectable as data.task=<name>."""
    def add(cls: type[Task]) -> type[Task]:
        if name in _TASKS and _TASKS[name] is not cls:
            raise FedshopError(f"data.task: two tasks are registered as '{name}' ({_TASKS[name]} and {cls})")
        cls.name = name
        _TASKS[name] = cls
        return cls
    return add


def _import_path(spec: str) -> type[Task]:
    from common.tasks.base import Task

    module, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise FedshopError(f"data.task={spec}: cannot import it ({exc})") from exc
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise FedshopError(f"data.task={spec}: {obj!r} is not a subclass of common.tasks.base.Task")
    return obj


def task_class(name: str) -> type[Task]:
    """The Task class data.task names (a registered name or an import path)."""
    if name in _TASKS:
        return _TASKS[name]
    if name in BUILTIN:
        importlib.import_module(f"common.tasks.{name}")
        return _TASKS[name]
    if "." in name or ":" in name:
        return _import_path(name)
    raise FedshopError(f"data.task={name}: unknown task; expected one of {sorted({*BUILTIN, *_TASKS})} or an "
                       f"import path package.module:Class")


def get_task(cfg: FedshopConfig) -> Task:
    """The configured task, its config checked."""
    task = task_class(cfg.data.task)(cfg)
    task.check()
    return task
