"""Every task: prompt streams with verifiers (reward + answer span), and what feeds them.

Each task satisfies `ftjax.rollout.Task`.

| module | what |
|---|---|
| `chain.py` | variable-chain arithmetic; solver traces; ground-truth essential tokens |
| `branches.py` | K independent chains, one queried (dead-end branches); labels, chain ids, roles |
| `countdown.py` | Countdown (reach a target with + - * /); its checker; solver traces |
| `vocab.py` | the character vocabulary of the synthetic tasks |
| `data.py` | rows -> math examples (field maps, presets, bad-row reports), fallback templates |
| `sources.py` | rows of JSONL / JSON / Parquet / Arrow files, save_to_disk dirs, data_files |
| `verifiers.py` | rewards and answer spans from response text (math-verify, GSM8K) |
| `rewards.py` | your own reward functions (TRL's signature), weighted, with answer spans |
| `text.py` | text problems as a task: template -> prompt ids, response -> text -> verifier |
| `prompts.py` | a data file + a pretrained policy -> a text task (template, few-shot, stop ids) |

`prompts.py` needs the model loaders; import it as `ftjax.tasks.prompts`.
"""

from ftjax.tasks.branches import BranchesConfig, BranchesTask
from ftjax.tasks.chain import ChainConfig, ChainTask
from ftjax.tasks.countdown import CountdownConfig, CountdownTask

TASKS = {
    "chain": (ChainTask, ChainConfig),
    "branches": (BranchesTask, BranchesConfig),
    "countdown": (CountdownTask, CountdownConfig),
}


def make(name: str, cfg=None):
    """The synthetic task called `name` with config `cfg` (default config if None)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    task_cls, cfg_cls = TASKS[name]
    return task_cls(cfg if cfg is not None else cfg_cls())


__all__ = [
    "TASKS",
    "BranchesConfig",
    "BranchesTask",
    "ChainConfig",
    "ChainTask",
    "CountdownConfig",
    "CountdownTask",
    "make",
]
