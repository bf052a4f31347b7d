"""From a task's prompts to a train batch: the `Task` protocol, prompt padding, and rollout ->
`train.Batch` assembly. The RL loop, the supervised warm-up and evaluation all build on it.

Dims: P prompts, G responses per prompt, B = P * G rows, L prompt slots, N response slots,
T = L + N, R rows of the batch this process holds (R = B with one process).

Layout of a row: the prompt left-padded into L slots, then the response right-padded into N, so
response token j sits at column L + j in every row.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import multihost, sampling, train


class Task(Protocol):
    """A prompt source and a verifier, both deterministic, and the ids its responses use."""

    stop_ids: tuple[int, ...]  # token ids that end a response
    pad_id: int  # the id that fills empty prompt and response slots

    def prompts(self, start: int, count: int) -> list[list[int]]:
        """Token ids of prompts start, ..., start + count - 1 of the task's stream."""

    def score(self, prompt: list[int], response: list[int]) -> tuple[float, list[bool]]:
        """Reward of `response` and its answer span (a mask over the response tokens)."""

    # Optional: `labels(prompt, response) -> list[bool] | None`, the response tokens that are
    # essential (ground truth; None: not known). Evaluation and the `oracle` credit read it.
    # Optional: `score_batch(prompts, responses) -> [(reward, span)]`, `score` of many rows in
    # one call (a reward function that batches sees the whole rollout); `token_strings(ids) ->
    # list[str]`, each token's text, for logged completions (`ftjax.completions`).


def check_labels(task: Task, reader: str) -> None:
    """Refuse, before any work, labels asked for (by `reader`) of a task without `labels`."""
    if not callable(getattr(task, "labels", None)):
        raise ValueError(
            f"{reader} reads ground-truth labels, but task {type(task).__name__} has no "
            "`labels(prompt, response)` method"
        )


def score_rows(task: Task, prompts, responses) -> list[tuple[float, list[bool]]]:
    """`task.score` of each (prompt, response), in one `task.score_batch` call when it has one."""
    batched = getattr(task, "score_batch", None)
    if not callable(batched):
        return [task.score(p, r) for p, r in zip(prompts, responses, strict=True)]
    scored = list(batched(prompts, responses))
    if len(scored) != len(responses):
        raise ValueError(
            f"task {type(task).__name__} score_batch gave {len(scored)} results for "
            f"{len(responses)} responses"
        )
    return scored


def _labels(task: Task, prompt, response) -> list[bool]:
    labels = task.labels(prompt, response)
    if labels is None:
        raise ValueError(
            f"task {type(task).__name__} has no ground-truth labels (its `labels` returned None)"
        )
    if len(labels) != len(response):
        raise ValueError(
            f"task {type(task).__name__} labels have {len(labels)} entries for a response of "
            f"{len(response)} tokens"
        )
    return labels


def sampling_config(
    task: Task, max_new_tokens: int, temperature: float, top_p: float = 1.0
) -> sampling.SamplingConfig:
    """Sampling settings for responses to `task`: its stop and pad ids."""
    return sampling.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_ids=tuple(task.stop_ids),
        pad_id=task.pad_id,
    )


def left_pad(prompts: list[list[int]], slots: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """prompt_BxL ids and valid_BxL: each prompt right-aligned in `slots` columns."""
    long = [i for i, p in enumerate(prompts) if len(p) > slots]
    if long:
        raise ValueError(
            f"prompt {long[0]} has {len(prompts[long[0]])} tokens, over the {slots} prompt slots"
        )
    tokens = np.full((len(prompts), slots), pad_id, np.int32)
    valid = np.zeros((len(prompts), slots), bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, slots - len(prompt) :] = prompt
            valid[row, slots - len(prompt) :] = True
    return tokens, valid


def rollout_batch(
    task: Task,
    prompts,
    rollout: sampling.Rollout,
    prompt_BxL,
    prompt_valid_BxL,
    group_size: int,
    labels: bool = False,
) -> train.Batch:
    """Rewards, answer spans and masks for one rollout, laid out as prompt slots + response.
    Row b answers prompts[b // group_size]. With `labels`, also the task's ground-truth
    essential tokens (`task.labels`) in `labels_BxT`."""
    if labels:
        check_labels(task, "rollout_batch(labels=True)")
    tokens_BxN = np.asarray(rollout.tokens_BxN)
    lengths_B = np.asarray(rollout.lengths_B)
    B, N = tokens_BxN.shape
    response_BxN = np.arange(N)[None, :] < lengths_B[:, None]
    answer_BxN = np.zeros((B, N), bool)
    labels_BxN = np.zeros((B, N), bool)
    rewards_B = np.zeros(B, np.float32)
    responses = [tokens_BxN[b, : lengths_B[b]].tolist() for b in range(B)]
    row_prompts = [prompts[b // group_size] for b in range(B)]
    for b, (reward, span) in enumerate(score_rows(task, row_prompts, responses)):
        response = responses[b]
        if len(span) != len(response):
            raise ValueError(
                f"task answer span has {len(span)} entries for a response of {len(response)} tokens"
            )
        rewards_B[b] = reward
        answer_BxN[b, : len(span)] = span
        if labels:
            labels_BxN[b, : len(response)] = _labels(task, prompts[b // group_size], response)
    pad = np.zeros_like(prompt_valid_BxL)
    return train.Batch(
        tokens_BxT=jnp.asarray(np.concatenate([prompt_BxL, tokens_BxN], axis=1)),
        prompt_mask_BxT=jnp.asarray(
            np.concatenate([prompt_valid_BxL, np.zeros_like(response_BxN)], axis=1)
        ),
        response_mask_BxT=jnp.asarray(np.concatenate([pad, response_BxN], axis=1)),
        answer_mask_BxT=jnp.asarray(np.concatenate([pad, answer_BxN], axis=1)),
        rewards_B=jnp.asarray(rewards_B),
        old_log_probs_BxT=jnp.asarray(
            np.concatenate(
                [np.zeros(prompt_BxL.shape, np.float32), np.asarray(rollout.log_probs_BxN)], 1
            )
        ),
        labels_BxT=jnp.asarray(np.concatenate([pad, labels_BxN], axis=1)) if labels else None,
        response_start=prompt_BxL.shape[1],
    )


def batch_like(
    batch_size: int,
    tokens: int,
    reference: bool = False,
    gamma: bool = False,
    labels: bool = False,
    response_start: int = 0,
) -> train.Batch:
    """Shapes and dtypes of a rollout batch (with reference log-probs, precomputed gamma and
    ground-truth labels when asked; `response_start`: the prompt slots, as `rollout_batch` sets
    it): the train step is placed on the mesh (and the state with it) before the first rollout,
    which samples from the placed parameters."""
    mask = jax.ShapeDtypeStruct((batch_size, tokens), jnp.bool_)
    per_token = jax.ShapeDtypeStruct((batch_size, tokens), jnp.float32)
    return train.Batch(
        tokens_BxT=jax.ShapeDtypeStruct((batch_size, tokens), jnp.int32),
        prompt_mask_BxT=mask,
        response_mask_BxT=mask,
        answer_mask_BxT=mask,
        rewards_B=jax.ShapeDtypeStruct((batch_size,), jnp.float32),
        old_log_probs_BxT=per_token,
        ref_log_probs_BxT=per_token if reference else None,
        gamma_BxT=per_token if gamma else None,
        labels_BxT=mask if labels else None,
        response_start=response_start,
    )


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """Which prompts of a step this process loads: the rows it holds of a batch of P prompts x G
    responses (row b answers prompt b // G), as one contiguous range of prompts [first, first +
    count) and each row's index among them. Exactly its own prompts when its rows are one block
    (always on one host)."""

    first: int
    count: int
    prompt_R: np.ndarray

    @staticmethod
    def of(prompts_per_step: int, group_size: int, mesh: jax.sharding.Mesh) -> ProcessRows:
        prompt_R = multihost.batch_rows(prompts_per_step * group_size, mesh) // group_size
        first = int(prompt_R[0])
        return ProcessRows(first, int(prompt_R[-1]) - first + 1, prompt_R - first)

    def prompts(self, task: Task, step_start: int) -> list[list[int]]:
        """This process's rows' prompts for the step whose first prompt is `step_start`."""
        loaded = task.prompts(step_start + self.first, self.count)
        return [loaded[i] for i in self.prompt_R]
