"""Evaluation: accuracy on held-out prompts, and how precisely a credit variant finds the tokens
that matter (against a task's ground-truth labels, never against anything the credit produced).

Dims: B responses, T tokens (prompt slots + response slots).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import capture as capture_lib
from ftjax import credit as credit_lib
from ftjax import loop, sampling, train


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Responses to prompts start, ..., start + count - 1, laid out as the RL loop lays them."""

    prompts: list[list[int]]
    batch: train.Batch
    responses: list[list[int]]
    prompt_slots: int  # response token j sits at column prompt_slots + j


def sample(
    model: nnx.Module,
    task: loop.Task,
    start: int,
    count: int,
    prompt_len: int,
    cfg: sampling.SamplingConfig,
    rng,
) -> Sampled:
    prompts = task.prompts(start, count)
    prompt_BxL, valid_BxL = loop.left_pad(prompts, prompt_len, cfg.pad_id)
    rollout = sampling.generate(model, prompt_BxL, valid_BxL, rng, cfg)
    batch = loop.rollout_batch(task, prompts, rollout, prompt_BxL, valid_BxL, group_size=1)
    tokens_BxN, lengths_B = np.asarray(rollout.tokens_BxN), np.asarray(rollout.lengths_B)
    responses = [tokens_BxN[b, : lengths_B[b]].tolist() for b in range(len(prompts))]
    return Sampled(prompts, batch, responses, prompt_len)


def accuracy(model, task, start, count, prompt_len, cfg: sampling.SamplingConfig, rng, chunk=256):
    """Mean reward over `count` held-out prompts (greedy when cfg.temperature == 0)."""
    return float(rewards_k(model, task, start, count, 1, prompt_len, cfg, rng, chunk).mean())


def rewards_k(
    model, task, start, count, k, prompt_len, cfg: sampling.SamplingConfig, rng, chunk=64
) -> np.ndarray:
    """Rewards [count, k] of k responses to each of prompts start, ..., start + count - 1 (the
    k copies of a prompt share one generate call, `chunk` prompts per call)."""
    if k < 1 or count < 1:
        raise ValueError(f"need k >= 1 and count >= 1, got k={k}, count={count}")
    rewards = []
    for offset in range(0, count, chunk):
        prompts = task.prompts(start + offset, min(chunk, count - offset))
        prompt_PxL, valid_PxL = loop.left_pad(prompts, prompt_len, cfg.pad_id)
        prompt_BxL, valid_BxL = np.repeat(prompt_PxL, k, 0), np.repeat(valid_PxL, k, 0)
        rollout = sampling.generate(
            model, prompt_BxL, valid_BxL, jax.random.fold_in(rng, offset), cfg
        )
        batch = loop.rollout_batch(task, prompts, rollout, prompt_BxL, valid_BxL, group_size=k)
        rewards.append(np.asarray(batch.rewards_B).reshape(len(prompts), k))
    return np.concatenate(rewards)


def selection_probability(score_T, eligible_T, fraction: float) -> np.ndarray:
    """P(token is among the top ceil(fraction * n) eligible tokens by score) when ties are broken
    uniformly at random: 1 above the cut, a shared fraction for the tied group at the cut."""
    score_T, eligible_T = np.asarray(score_T, np.float64), np.asarray(eligible_T, bool)
    n = int(eligible_T.sum())
    k = credit_lib.selection_count(n, fraction) if n else 0
    probability_T = np.zeros(score_T.shape)
    if k == 0:
        return probability_T
    ranked = np.sort(score_T[eligible_T])[::-1]
    cut = ranked[k - 1]
    above_T = eligible_T & (score_T > cut)
    tied_T = eligible_T & (score_T == cut)
    probability_T[above_T] = 1.0
    probability_T[tied_T] = (k - above_T.sum()) / tied_T.sum()
    return probability_T


def precision(score_BxT, essential_BxT, answer_BxT, response_BxT, fraction: float) -> float:
    """Credit precision@fraction: of the tokens a variant ranks in each response's top fraction,
    the share that are essential, answer-span tokens left out (they are the sink, not a choice).
    Pooled over responses; NaN when nothing was selected."""
    selected = essential = 0.0
    for score_T, essential_T, answer_T, response_T in zip(
        np.asarray(score_BxT), essential_BxT, answer_BxT, np.asarray(response_BxT), strict=True
    ):
        probability_T = selection_probability(score_T, response_T, fraction)
        counted_T = ~np.asarray(answer_T, bool)
        selected += float(np.sum(probability_T * counted_T))
        essential += float(np.sum(probability_T * counted_T * np.asarray(essential_T, bool)))
    return essential / selected if selected else math.nan


def task_labels(task, sampled: Sampled) -> np.ndarray:
    """Ground-truth essential labels laid out like the batch (B x T), from `task.labels`."""
    B, T = sampled.batch.tokens_BxT.shape
    labels_BxT = np.zeros((B, T), bool)
    offset = sampled.prompt_slots
    for b, (prompt, response) in enumerate(zip(sampled.prompts, sampled.responses, strict=True)):
        labels = task.labels(prompt, response)
        if labels is None:
            raise ValueError(f"task {type(task).__name__} has no ground-truth labels")
        labels_BxT[b, offset : offset + len(labels)] = labels
    return labels_BxT


def credit_gammas(
    model: nnx.Module,
    batch: train.Batch,
    variants: list[str],
    cfg: credit_lib.CreditConfig,
    spec: capture_lib.CaptureSpec,
    rng,
) -> dict[str, np.ndarray]:
    """gamma_BxT of each variant on one batch, from one forward pass with capture."""
    logp_BxT, entropy_BxT, attn_BxTxT = jax.jit(lambda m, b: train.sequence_log_probs(m, b, spec))(
        model, batch
    )
    out = {}
    for name in variants:
        step_cfg = train.StepConfig(credit=dataclasses.replace(cfg, name=name))
        out[name] = np.asarray(
            train.credit_weights(batch, step_cfg, logp_BxT, entropy_BxT, attn_BxTxT, rng)
        )
    return out


def throughput(model, batch: train.Batch, spec: capture_lib.CaptureSpec, cfg=None):
    """FlowTracer's tau_BxT and the captured map attn_BxTxT for a batch (for pictures)."""
    cfg = cfg or credit_lib.CreditConfig()
    valid_BxT = batch.prompt_mask_BxT | batch.response_mask_BxT
    # Only the captured map is needed: no log-softmax over the vocabulary, unlike the loss path.
    attn_BxTxT = model(batch.tokens_BxT, valid_BxT=valid_BxT, capture=spec).attn_BxTxS
    inputs = credit_lib.CreditInputs(
        prompt_mask_BxT=batch.prompt_mask_BxT,
        response_mask_BxT=batch.response_mask_BxT,
        answer_mask_BxT=batch.answer_mask_BxT,
        attn_BxTxT=attn_BxTxT,
    )
    tau_BxT, _ = credit_lib.throughput(inputs, cfg)
    return jnp.asarray(tau_BxT), attn_BxTxT
