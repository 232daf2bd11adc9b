"""Tasks: data source + R1 prompt template + verifiable reward, built by name.

    from r1jax import tasks
    task = tasks.get_task("countdown", num_numbers=(3, 4))
    ex = task.examples("train", 1)[0]
    task.reward(task.prompt(ex), ex.trace, **ex.reward_kwargs())  # 1.0
"""
from __future__ import annotations

from r1jax.tasks.base import Example, Task, format_response, get_task, parse_response, task_names

__all__ = ["Example", "Task", "format_response", "get_task", "parse_response", "task_names"]
