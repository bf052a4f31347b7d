"""Evaluation: accuracy on held-out prompts (greedy pass@1, avg@k, pass@k), and how precisely a
credit variant finds the tokens that matter (against a task's ground-truth labels, never against
anything the credit produced).

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
from ftjax import rollout, sampling, train


@dataclasses.dataclass(frozen=True)
class Sampled:
    """Responses to prompts start, ..., start + count - 1, laid out as the RL loop lays them."""

    prompts: list[list[int]]
    batch: train.Batch
    responses: list[list[int]]
    prompt_slots: int  # response token j sits at column prompt_slots + j


def sample(
    model: nnx.Module,
    task: rollout.Task,
    start: int,
    count: int,
    prompt_len: int,
    cfg: sampling.SamplingConfig,
    rng,
) -> Sampled:
    prompts = task.prompts(start, count)
    prompt_BxL, valid_BxL = rollout.left_pad(prompts, prompt_len, cfg.pad_id)
    generated = sampling.generate(model, prompt_BxL, valid_BxL, rng, cfg)
    batch = rollout.rollout_batch(task, prompts, generated, prompt_BxL, valid_BxL, group_size=1)
    tokens_BxN, lengths_B = np.asarray(generated.tokens_BxN), np.asarray(generated.lengths_B)
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
        prompt_PxL, valid_PxL = rollout.left_pad(prompts, prompt_len, cfg.pad_id)
        prompt_BxL, valid_BxL = np.repeat(prompt_PxL, k, 0), np.repeat(valid_PxL, k, 0)
        generated = sampling.generate(
            model, prompt_BxL, valid_BxL, jax.random.fold_in(rng, offset), cfg
        )
        batch = rollout.rollout_batch(task, prompts, generated, prompt_BxL, valid_BxL, group_size=k)
        rewards.append(np.asarray(batch.rewards_B).reshape(len(prompts), k))
    return np.concatenate(rewards)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out metrics over the first `problems` prompts of a task: pass@1 by greedy decoding,
    avg@k (mean reward of k samples at `temperature`) and pass@k."""

    problems: int = 64  # the first this many prompts of the task
    k: int = 4  # samples per problem for avg@k and pass@k
    temperature: float = 1.0  # of the k samples (pass@1 is greedy)
    top_p: float = 1.0  # nucleus sampling mass; 1 means no truncation
    max_new_tokens: int = 256  # response slots
    prompt_len: int = 256  # prompt slots; longer prompts are reported and left out
    chunk: int = 16  # problems per generate call
    seed: int = 0  # sampling

    def __post_init__(self):
        for name in ("problems", "k", "max_new_tokens", "prompt_len", "chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")


def held_out(model, task, cfg: EvalConfig) -> dict[str, float]:
    """pass@1 (greedy), avg@k and pass@k over the task's first `cfg.problems` prompts (all of
    them when the task is shorter), and how many were used."""
    count = min(cfg.problems, len(task)) if hasattr(task, "__len__") else cfg.problems
    rng = jax.random.PRNGKey(cfg.seed)
    greedy = rollout.sampling_config(task, cfg.max_new_tokens, 0.0, cfg.top_p)
    sampled = rollout.sampling_config(task, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    greedy_Cx1 = rewards_k(model, task, 0, count, 1, cfg.prompt_len, greedy, rng, cfg.chunk)
    sampled_CxK = rewards_k(model, task, 0, count, cfg.k, cfg.prompt_len, sampled, rng, cfg.chunk)
    return {
        "pass@1": float(greedy_Cx1.mean()),
        f"avg@{cfg.k}": float(sampled_CxK.mean()),
        f"pass@{cfg.k}": float((sampled_CxK > 0).any(-1).mean()),
        "problems": float(count),
    }


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


AUC_SPLITS = ("essential_first", "essential_later")


def pairwise_auc(score_BxT, essential_BxT, eligible_BxT, role_BxT=None) -> dict[str, float]:
    """Position-controlled precision: over pairs (essential token i, non-essential token j) of
    the same response and the same role (`role_BxT`, ints from the task; None: one role), both
    eligible, the probability that score_i > score_j (a tie counts 1/2), pooled over all pairs.

    Reported overall ("auc") and split by which token of the pair comes first ("essential_first",
    "essential_later"), each with its pair count ("pairs", "<split>_pairs"); NaN without pairs. A
    score that merely prefers early tokens gets 1 on essential_first pairs and 0 on
    essential_later ones (`position_score_BxT`), so a credit's AUC means something only beside
    that baseline's and within each split. The caller leaves the answer span out of `eligible`.
    Cost: (essential x non-essential) comparisons per response and role."""
    score_BxT = np.asarray(score_BxT, np.float64)
    if score_BxT.ndim != 2:
        raise ValueError(f"score_BxT must be B x T, got shape {score_BxT.shape}")
    role_BxT = np.zeros(score_BxT.shape, np.int64) if role_BxT is None else np.asarray(role_BxT)
    named = {"essential_BxT": essential_BxT, "eligible_BxT": eligible_BxT, "role_BxT": role_BxT}
    for name, value in named.items():
        if np.shape(value) != score_BxT.shape:
            raise ValueError(f"{name} has shape {np.shape(value)}, score_BxT has {score_BxT.shape}")
    essential_BxT = np.asarray(essential_BxT, bool)
    eligible_BxT = np.asarray(eligible_BxT, bool)
    if np.isnan(score_BxT[eligible_BxT]).any():
        raise ValueError("score_BxT is NaN on an eligible token")
    wins = dict.fromkeys(AUC_SPLITS, 0.0)
    pairs = dict.fromkeys(AUC_SPLITS, 0)
    for score_T, essential_T, eligible_T, role_T in zip(
        score_BxT, essential_BxT, eligible_BxT, role_BxT, strict=True
    ):
        for role in np.unique(role_T[eligible_T]):
            group_T = eligible_T & (role_T == role)
            at_e = np.flatnonzero(group_T & essential_T)
            at_n = np.flatnonzero(group_T & ~essential_T)
            essential_Ex1, other_1xN = score_T[at_e][:, None], score_T[at_n][None, :]
            won_ExN = (essential_Ex1 > other_1xN) + 0.5 * (essential_Ex1 == other_1xN)
            first_ExN = at_e[:, None] < at_n[None, :]
            for split, in_split_ExN in zip(AUC_SPLITS, (first_ExN, ~first_ExN), strict=True):
                wins[split] += float(won_ExN[in_split_ExN].sum())
                pairs[split] += int(in_split_ExN.sum())
    ratio = lambda won, count: won / count if count else math.nan  # noqa: E731
    out = {"auc": ratio(sum(wins.values()), sum(pairs.values())), "pairs": sum(pairs.values())}
    for split in AUC_SPLITS:
        out[split] = ratio(wins[split], pairs[split])
        out[f"{split}_pairs"] = pairs[split]
    return out


def position_score_BxT(response_BxT) -> np.ndarray:
    """The position-only baseline for `pairwise_auc`: minus each token's column, so every earlier
    token outranks every later one (float64 B x T; only the order within a row matters)."""
    shape = np.shape(response_BxT)
    if len(shape) != 2:
        raise ValueError(f"response_BxT must be B x T, got shape {shape}")
    return np.broadcast_to(-np.arange(shape[1], dtype=np.float64), shape).copy()


ATTENTION_SCORES = ("attention_received", "attention_received_mean", "attention_max")


def attention_scores(
    attn_BxTxT, prompt_BxT, response_BxT, window: int | None = None
) -> dict[str, np.ndarray]:
    """The raw per-token scores the point-wise attention credits of credit.py rank by (before
    their top fraction), float64 B x T: over the valid queries k that come 1..window tokens
    after key i (any later one when window is None), the sum ("attention_received"), the mean
    ("attention_received_mean") and the max ("attention_max") of attn[b, k, i]; mean and max
    are 0 for a key no such query sees."""
    attn_BxTxT = np.asarray(attn_BxTxT, np.float64)
    valid_BxT = np.asarray(prompt_BxT, bool) | np.asarray(response_BxT, bool)
    if attn_BxTxT.ndim != 3 or attn_BxTxT.shape != (*valid_BxT.shape, valid_BxT.shape[-1]):
        raise ValueError(
            f"attn_BxTxT has shape {attn_BxTxT.shape}, the masks have {valid_BxT.shape}"
        )
    T = valid_BxT.shape[-1]
    lag_TxT = np.arange(T)[:, None] - np.arange(T)[None, :]  # query k minus key i
    later_TxT = (lag_TxT >= 1) & (lag_TxT <= (T if window is None else window))
    later_BxTxT = later_TxT[None] & valid_BxT[:, :, None]
    count_BxT = later_BxTxT.sum(axis=1)
    received_BxT = np.where(later_BxTxT, attn_BxTxT, 0.0).sum(axis=1)
    largest_BxT = np.where(later_BxTxT, attn_BxTxT, -np.inf).max(axis=1)
    return {
        "attention_received": received_BxT,
        "attention_received_mean": received_BxT / np.maximum(count_BxT, 1),
        "attention_max": np.where(count_BxT > 0, largest_BxT, 0.0),
    }


def layout(sampled: Sampled, per_response, dtype=bool, fill=0) -> np.ndarray:
    """`per_response(prompt, response)` (one entry per response token) laid out like the batch
    (B x T, `fill` elsewhere): for a task's labels, chain ids, roles, ..."""
    B, T = sampled.batch.tokens_BxT.shape
    out_BxT = np.full((B, T), fill, dtype)
    offset = sampled.prompt_slots
    for b, (prompt, response) in enumerate(zip(sampled.prompts, sampled.responses, strict=True)):
        values = per_response(prompt, response)
        if values is None or len(values) != len(response):
            raise ValueError(
                f"{getattr(per_response, '__name__', per_response)} gave "
                f"{None if values is None else len(values)} entries for a response of "
                f"{len(response)} tokens"
            )
        out_BxT[b, offset : offset + len(values)] = values
    return out_BxT


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
    inputs = train.credit_inputs(batch, attn_BxTxT, logp_BxT, entropy_BxT, rng)
    return {
        name: np.asarray(credit_lib.compute(inputs, dataclasses.replace(cfg, name=name)))
        for name in variants
    }


def throughput(model, batch: train.Batch, spec: capture_lib.CaptureSpec, cfg=None):
    """FlowTracer's tau_BxT and the captured map attn_BxTxT for a batch (for pictures)."""
    cfg = cfg or credit_lib.CreditConfig()
    valid_BxT = batch.prompt_mask_BxT | batch.response_mask_BxT
    # Only the captured map is needed: no log-softmax over the vocabulary, unlike the loss path.
    attn_BxTxT = model(batch.tokens_BxT, valid_BxT=valid_BxT, capture=spec).attn_BxTxS
    tau_BxT, _ = credit_lib.throughput(train.credit_inputs(batch, attn_BxTxT), cfg)
    return jnp.asarray(tau_BxT), attn_BxTxT
