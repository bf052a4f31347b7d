"""Policy-gradient losses: group advantages, clipped surrogate, loss aggregation, KL estimators.

Dims: B sequences (groups of G consecutive responses to one prompt), T tokens, V vocabulary,
E hidden width, C tokens of a chunk, N chunks.

Token credit enters as `gamma_BxT`, which multiplies each response's advantage token by token for
both signs (docs/method.md, section 6); `gamma = response mask` is plain GRPO/DAPO.
Aggregation changes the effective learning rate (docs/method.md, "Loss aggregation"), so it is an
explicit choice:
- "token-mean" (DAPO): sum over all response tokens of the batch / their count;
- "seq-mean-token-mean" (GRPO): mean over sequences of each sequence's token mean;
- "constant" (Dr.GRPO): sum over tokens / (B * max_tokens), a length-independent constant.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ftjax import masked

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "constant")
KL_ESTIMATORS = ("k1", "k3")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """clip_low/clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher:
    0.2 / 0.28). scale_advantages: divide by the group's std (GRPO); False for Dr.GRPO.
    kl_coef: weight of the KL to a reference policy (0: off, as in the paper)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    aggregation: str = "token-mean"  # token-mean, seq-mean-token-mean or constant
    max_tokens: int | None = None  # the "constant" normaliser; None: the batch's T
    scale_advantages: bool = True
    kl_coef: float = 0.0
    kl_estimator: str = "k3"  # k1 or k3 (Schulman's estimators)
    std_eps: float = 1e-6  # added to the group std before dividing

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"unknown loss aggregation {self.aggregation!r}; known: {AGGREGATIONS}"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; known: {KL_ESTIMATORS}")
        if not (0.0 <= self.clip_low < 1.0 and self.clip_high >= 0.0):
            raise ValueError(
                f"clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, "
                f"{self.clip_high}"
            )
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not self.std_eps > 0:
            raise ValueError(
                f"std_eps must be > 0 (a zero-variance group divides by it), got {self.std_eps}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be None or >= 1, got {self.max_tokens}")


def group_advantages(rewards_B, group_size: int, scale: bool = True, eps: float = 1e-6):
    """A_i = r_i - mean(group), divided by the group's std (unbiased, as TRL) when `scale`."""
    B = rewards_B.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} responses is not a whole number of groups of {group_size}")
    if scale and group_size < 2:
        raise ValueError("std-scaled advantages need group_size >= 2")
    if scale and not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    rewards_NxG = rewards_B.reshape(B // group_size, group_size).astype(jnp.float32)
    centred_NxG = rewards_NxG - jnp.mean(rewards_NxG, axis=-1, keepdims=True)
    if scale:
        centred_NxG = centred_NxG / (jnp.std(rewards_NxG, axis=-1, ddof=1, keepdims=True) + eps)
    return centred_NxG.reshape(B)


def kl_estimate(log_probs_BxT, ref_log_probs_BxT, estimator: str):
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1 and k3)."""
    log_ratio_BxT = ref_log_probs_BxT - log_probs_BxT
    if estimator == "k1":
        return -log_ratio_BxT
    return jnp.exp(log_ratio_BxT) - log_ratio_BxT - 1.0


def aggregate(loss_BxT, mask_BxT, cfg: LossConfig):
    """Reduce per-token losses to one scalar as `cfg.aggregation` says (see module docstring)."""
    # where, not a product: a non-finite value at a masked position must not leak into the sum
    mask_BxT = mask_BxT.astype(bool)
    if cfg.aggregation == "token-mean":
        return masked.mean(loss_BxT, mask_BxT)
    if cfg.aggregation == "constant":
        B, T = mask_BxT.shape
        return jnp.sum(jnp.where(mask_BxT, loss_BxT, 0.0)) / (B * (cfg.max_tokens or T))
    seq_B = masked.mean(loss_BxT, mask_BxT, axis=-1)
    return masked.mean(seq_B, jnp.any(mask_BxT, axis=-1))


def token_weights(mask_BxT, cfg: LossConfig):
    """w_BxT with sum(w * loss) == aggregate(loss, mask, cfg) for every loss: each token's share
    of the whole batch's normaliser. Computed once on the whole rollout batch, it lets a
    micro-batch's loss be its own tokens' weighted sum, so the micro-batches' gradients add up to
    the whole batch's exactly as `cfg.aggregation` defines it."""
    mask_BxT = mask_BxT.astype(bool)
    ones_BxT = mask_BxT.astype(jnp.float32)
    if cfg.aggregation == "token-mean":
        return ones_BxT / jnp.maximum(jnp.sum(mask_BxT), 1)
    if cfg.aggregation == "constant":
        B, T = mask_BxT.shape
        return ones_BxT / (B * (cfg.max_tokens or T))
    per_seq_Bx1 = jnp.maximum(jnp.sum(mask_BxT, axis=-1, keepdims=True), 1)
    sequences = jnp.maximum(jnp.sum(jnp.any(mask_BxT, axis=-1)), 1)
    return ones_BxT / per_seq_Bx1 / sequences


def weighted_sum(loss_BxT, mask_BxT, weights_BxT):
    """sum(w * loss) over the mask (`where`, so a masked-out non-finite value cannot leak)."""
    return jnp.sum(jnp.where(mask_BxT.astype(bool), loss_BxT * weights_BxT, 0.0))


def policy_loss(
    log_probs_BxT,
    old_log_probs_BxT,
    advantages_B,
    gamma_BxT,
    mask_BxT,
    cfg: LossConfig,
    ref_log_probs_BxT=None,
    weights_BxT=None,
):
    """Clipped surrogate with token-weighted advantages, plus optional KL. Returns (loss, metrics).

    With `weights_BxT` (from `token_weights` on the whole batch) the loss is the weighted sum
    instead of `cfg.aggregation` over this batch: a micro-batch's share of the whole loss. The
    metrics are then this micro-batch's own means.

    L = agg_t[-min(rho A~, clip(rho, 1 - eps_low, 1 + eps_high) A~)] + beta agg_t[KL],
    rho = exp(log pi - log pi_old), A~[b, t] = gamma[b, t] A[b].
    """
    mask_BxT = mask_BxT.astype(bool)
    adv_BxT = gamma_BxT * advantages_B[:, None]
    ratio_BxT = jnp.exp(jnp.where(mask_BxT, log_probs_BxT - old_log_probs_BxT, 0.0))
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    surrogate_BxT = -jnp.minimum(ratio_BxT * adv_BxT, clipped_BxT * adv_BxT)
    reduce = lambda x_BxT: (  # noqa: E731
        aggregate(x_BxT, mask_BxT, cfg)
        if weights_BxT is None
        else weighted_sum(x_BxT, mask_BxT, weights_BxT)
    )
    loss = reduce(surrogate_BxT)
    was_clipped_BxT = ratio_BxT * adv_BxT > clipped_BxT * adv_BxT
    metrics = {
        "pg_loss": loss,
        "clip_fraction": masked.mean(was_clipped_BxT, mask_BxT),
        "ratio_mean": masked.mean(ratio_BxT, mask_BxT),
    }
    if cfg.kl_coef > 0:
        if ref_log_probs_BxT is None:
            raise ValueError("kl_coef > 0 needs reference log-probs")
        kl = reduce(kl_estimate(log_probs_BxT, ref_log_probs_BxT, cfg.kl_estimator))
        loss = loss + cfg.kl_coef * kl
        metrics["kl"] = kl
    metrics["loss"] = loss
    return loss, metrics


def next_token_log_probs(logits_BxTxV, tokens_BxT):
    """log p(token_t | tokens_<t) and the entropy of the distribution that predicted token t, for
    every position of the sequence; 0 at t = 0, which nothing predicts."""
    logp_BxT, entropy_BxT = token_log_probs(logits_BxTxV[:, :-1], tokens_BxT[:, 1:])
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    return pad(logp_BxT), pad(entropy_BxT)


def chunked_next_token_log_probs(
    hidden_BxTxE, tokens_BxT, unembed: Callable[[jax.Array], jax.Array], chunk: int
):
    """`next_token_log_probs(unembed(hidden_BxTxE), tokens_BxT)` without ever holding the
    B x T x V logits: `chunk` positions at a time (T - 1 padded up to a multiple of it), each
    chunk under `jax.checkpoint`, so the backward pass recomputes a chunk's logits instead of
    storing them. unembed: final-normed hidden B x C x E -> float32 logits B x C x V, e.g. the
    `Transformer.unembed` of a model merged inside the differentiated function."""
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    B, T, E = hidden_BxTxE.shape
    n = T - 1  # positions 1..T-1 are predicted by the hidden states at 0..T-2
    if n == 0:
        return jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T), jnp.float32)
    C = min(chunk, n)
    N = -(-n // C)
    pad = N * C - n
    h_NxBxCxE = jnp.pad(hidden_BxTxE[:, :-1], ((0, 0), (0, pad), (0, 0)))
    h_NxBxCxE = h_NxBxCxE.reshape(B, N, C, E).transpose(1, 0, 2, 3)
    targets_NxBxC = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, pad)))
    targets_NxBxC = targets_NxBxC.reshape(B, N, C).transpose(1, 0, 2)

    @jax.checkpoint
    def one_chunk(h_and_targets):
        h_BxCxE, targets_BxC = h_and_targets
        return token_log_probs(unembed(h_BxCxE), targets_BxC)

    logp_NxBxC, entropy_NxBxC = jax.lax.map(one_chunk, (h_NxBxCxE, targets_NxBxC))

    def unchunk(x_NxBxC):
        return jnp.pad(x_NxBxC.transpose(1, 0, 2).reshape(B, N * C)[:, :n], ((0, 0), (1, 0)))

    return unchunk(logp_NxBxC), unchunk(entropy_NxBxC)


def token_log_probs(logits_BxTxV, targets_BxT):
    """log softmax(logits)[target] and the entropy of each position's distribution."""
    log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    picked_BxT = jnp.take_along_axis(log_probs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    entropy_BxT = -jnp.sum(jnp.exp(log_probs_BxTxV) * log_probs_BxTxV, axis=-1)
    return picked_BxT, entropy_BxT
