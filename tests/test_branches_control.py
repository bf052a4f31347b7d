"""The no-response control (issue 13): a policy trained to answer the branches task without
writing any statements stays near chance, so the answer has to go through the response.

The same procedure is first shown able to find a shortcut: on a leaky copy of the task, whose
prompt starts with the answer digit, it learns to answer. Slow: two small warm-ups (~2 min).
"""

import dataclasses

import jax
import pytest

from experiments import common
from ftjax import evaluation, rollout, sft
from ftjax.tasks.branches import BranchesConfig, BranchesTask
from ftjax.tasks.chain import values
from ftjax.tasks.vocab import BOS, PAD, VOCAB

pytestmark = pytest.mark.slow

TASK = BranchesConfig(chain_length=2, modulus=5, substitute=True, answer_only=True)
POLICY = common.PolicyConfig(layers=2, hidden=64, heads=4)
WARMUP = sft.SFTConfig(steps=400, batch_size=32, lr=3e-3, warmup_steps=40)
HELD_OUT = 256
PROMPT_SLOTS = 48  # the longest branches prompt at TASK (45 tokens) plus the leaked digit


class LeakyBranches(BranchesTask):
    """The task with its answer digit right after <bos>: a shortcut any policy can copy."""

    def _leak(self, index: int, prompt: list[int]) -> list[int]:
        problem = self.problem(index)
        answer = values(problem, self.cfg.modulus)[problem.query]
        return [BOS, *VOCAB.encode(str(answer)), *prompt[1:]]

    def prompts(self, start: int, count: int) -> list[list[int]]:
        plain = super().prompts(start, count)
        return [self._leak(start + i, p) for i, p in enumerate(plain)]

    def demonstrations(self, start: int, count: int):
        plain = super().demonstrations(start, count)
        return [(self._leak(start + i, p), r) for i, (p, r) in enumerate(plain)]

    def parse_prompt(self, prompt: list[int]):
        return super().parse_prompt([prompt[0], *prompt[2:]])


def answer_only_accuracy(task: BranchesTask) -> float:
    """Held-out greedy accuracy after a seeded answer-only warm-up on `task`."""
    model = common.build_policy(POLICY, 0)
    sft.warm_up(
        model,
        lambda start, count: task.demonstrations(common.WARMUP_START + start, count),
        WARMUP,
        PROMPT_SLOTS,
        4,  # `>d<eos>` and a spare slot
        PAD,
    )
    greedy = rollout.sampling_config(task, 4, 0.0)
    return evaluation.accuracy(
        model, task, common.EVAL_START, HELD_OUT, PROMPT_SLOTS, greedy, jax.random.PRNGKey(0)
    )


def test_answer_only_policy_stays_near_chance_where_a_leaky_prompt_is_learned():
    leaky = answer_only_accuracy(LeakyBranches(TASK))
    assert leaky >= 0.9  # the procedure finds a shortcut when the prompt holds one
    plain = answer_only_accuracy(BranchesTask(dataclasses.replace(TASK, seed=0)))
    # Chance is 1/5; 256 prompts give a standard error of 0.025, so 0.3 is 4 SE above chance.
    assert plain <= 0.3, plain
