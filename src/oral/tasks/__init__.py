"""Tasks: task files (YAML) over offline package data (the built-in ones) or user data, and lm-eval export."""

from pathlib import Path

from oral.tasks.base import SPLITS, Example, SplitSizes, Task, TaskError
from oral.tasks.builtin import BUILTIN
from oral.tasks.user import load_task_file, task_from_dict

_REGISTERED: dict[str, Task] = {}  # user tasks registered in this process
_CACHE: dict[str, Task] = {}  # built-in tasks, read once (their splits are cached on the Task)


def register_task(task: Task) -> None:
    """Make a user task available to get_task(name) for the rest of the process."""
    if task.name in BUILTIN:
        raise TaskError(f"{task.name!r} is a built-in task name; choose another name")
    _REGISTERED[task.name] = task


def list_tasks() -> list[str]:
    """Names of the built-in and registered tasks."""
    return list(BUILTIN) + [n for n in _REGISTERED if n not in BUILTIN]


def get_task(name: str) -> Task:
    """A task by name (built-in or registered) or by the path of a task YAML file."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN:
        if name not in _CACHE:
            _CACHE[name] = load_task_file(BUILTIN[name])
        return _CACHE[name]
    if name.endswith((".yaml", ".yml")) or Path(name).is_file():
        return load_task_file(name)
    raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())} (or the path of a task .yaml)")


__all__ = [
    "SPLITS", "Example", "SplitSizes", "Task", "TaskError",
    "get_task", "list_tasks", "load_task_file", "register_task", "task_from_dict",
]
