"""Tasks: prompt streams with verifiers (reward + answer span), solver traces for warm-up, and
ground-truth token labels where the task has them. Every task satisfies `ftjax.loop.Task`.

| task | module | ground-truth labels |
|---|---|---|
| variable-chain arithmetic | `chain.py` | yes: tokens on the answer's dependency chain |
| Countdown (reach a target with + - * /) | `countdown.py` | no |
"""

from ftjax.tasks.chain import ChainConfig, ChainTask
from ftjax.tasks.countdown import CountdownConfig, CountdownTask

TASKS = {"chain": (ChainTask, ChainConfig), "countdown": (CountdownTask, CountdownConfig)}


def make(name: str, cfg=None):
    """The task called `name` with config `cfg` (default config if None)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    task_cls, cfg_cls = TASKS[name]
    return task_cls(cfg if cfg is not None else cfg_cls())


__all__ = ["TASKS", "ChainConfig", "ChainTask", "CountdownConfig", "CountdownTask", "make"]
