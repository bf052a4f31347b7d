"""The task registry."""

import pytest

from ftjax import tasks


def test_make_builds_each_task_with_its_default_config():
    for name, (task_cls, cfg_cls) in tasks.TASKS.items():
        task = tasks.make(name)
        assert isinstance(task, task_cls) and task.cfg == cfg_cls()
        ((prompt, response),) = task.demonstrations(0, 1)
        assert task.score(prompt, response)[0] == 1.0  # the solver's trace is right


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.make("nope")
