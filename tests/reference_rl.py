"""Slow, obviously correct float64 references for `ftjax.rl` (tests only).

Plain Python loops over sequences b and tokens t, straight from the definitions:
  group advantages (GRPO; TRL's unbiased std): A = r - mean(group), / (std_ddof1 + eps) if scaled;
  rho = exp(logp - old);  A~[b, t] = gamma[b, t] A[b];
  surrogate = -min(rho A~, clip(rho, 1 - clip_low, 1 + clip_high) A~);
  KL k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman);
  aggregation: token-mean (DAPO), seq-mean-token-mean (GRPO), constant (Dr.GRPO).

Dims: B sequences (groups of G consecutive responses), T tokens, V vocabulary.
"""

from __future__ import annotations

import math

import numpy as np


def group_advantages(rewards_B, group_size: int, scale: bool, eps: float) -> np.ndarray:
    r = [float(x) for x in np.asarray(rewards_B, dtype=np.float64)]
    out = np.zeros(len(r))
    for start in range(0, len(r), group_size):
        group = r[start:start + group_size]
        mean = sum(group) / len(group)
        if scale:
            var = sum((x - mean) ** 2 for x in group) / (len(group) - 1)
            denom = math.sqrt(var) + eps
        else:
            denom = 1.0
        for i, x in enumerate(group):
            out[start + i] = (x - mean) / denom
    return out


def kl_token(logp: float, ref: float, estimator: str) -> float:
    if estimator == "k1":
        return logp - ref
    if estimator == "k3":
        return math.exp(ref - logp) - (ref - logp) - 1.0
    raise ValueError(estimator)


def aggregate(values_BxT, mask_BxT, aggregation: str, max_tokens: int | None = None) -> float:
    """Reduce per-token values over the masked tokens."""
    v = np.asarray(values_BxT, dtype=np.float64)
    m = np.asarray(mask_BxT, dtype=bool)
    B, T = m.shape
    if aggregation == "token-mean":
        total, count = 0.0, 0
        for b in range(B):
            for t in range(T):
                if m[b, t]:
                    total += v[b, t]
                    count += 1
        return total / max(count, 1)
    if aggregation == "constant":
        total = 0.0
        for b in range(B):
            for t in range(T):
                if m[b, t]:
                    total += v[b, t]
        return total / (B * (max_tokens if max_tokens is not None else T))
    if aggregation == "seq-mean-token-mean":
        seq_means = []
        for b in range(B):
            vals = [v[b, t] for t in range(T) if m[b, t]]
            if vals:
                seq_means.append(sum(vals) / len(vals))
        return sum(seq_means) / max(len(seq_means), 1)
    raise ValueError(aggregation)


def surrogate_token(logp: float, old: float, adv: float, clip_low: float,
                    clip_high: float) -> tuple[float, bool]:
    """Per-token clipped surrogate and whether the clipped branch is the (strict) minimum."""
    rho = math.exp(logp - old)
    clipped = min(max(rho, 1.0 - clip_low), 1.0 + clip_high)
    return -min(rho * adv, clipped * adv), rho * adv > clipped * adv


def policy_loss(logp_BxT, old_BxT, adv_B, gamma_BxT, mask_BxT, *, clip_low, clip_high,
                aggregation, max_tokens=None, kl_coef=0.0, kl_estimator="k3",
                ref_BxT=None) -> dict[str, float]:
    """Loss and metrics; `gamma_BxT=None` is plain GRPO/DAPO (no token weights at all)."""
    logp = np.asarray(logp_BxT, dtype=np.float64)
    old = np.asarray(old_BxT, dtype=np.float64)
    adv = np.asarray(adv_B, dtype=np.float64)
    m = np.asarray(mask_BxT, dtype=bool)
    B, T = m.shape
    surr = np.zeros((B, T))
    n_clipped, n_tokens, ratio_sum = 0, 0, 0.0
    for b in range(B):
        for t in range(T):
            a = adv[b] if gamma_BxT is None else float(gamma_BxT[b, t]) * adv[b]
            surr[b, t], was_clipped = surrogate_token(logp[b, t], old[b, t], a, clip_low,
                                                      clip_high)
            if m[b, t]:
                n_tokens += 1
                n_clipped += int(was_clipped)
                ratio_sum += math.exp(logp[b, t] - old[b, t])
    pg = aggregate(surr, m, aggregation, max_tokens)
    out = {
        "pg_loss": pg,
        "clip_fraction": n_clipped / max(n_tokens, 1),
        "ratio_mean": ratio_sum / max(n_tokens, 1),
        "loss": pg,
    }
    if kl_coef > 0:
        ref = np.asarray(ref_BxT, dtype=np.float64)
        kl_BxT = np.zeros((B, T))
        for b in range(B):
            for t in range(T):
                kl_BxT[b, t] = kl_token(logp[b, t], ref[b, t], kl_estimator)
        out["kl"] = aggregate(kl_BxT, m, aggregation, max_tokens)
        out["loss"] = pg + kl_coef * out["kl"]
    return out


def token_log_probs(logits_BxTxV, targets_BxT) -> tuple[np.ndarray, np.ndarray]:
    """log softmax(logits)[target] and the entropy, per position, by loops over b and t."""
    logits = np.asarray(logits_BxTxV, dtype=np.float64)
    B, T, V = logits.shape
    logp = np.zeros((B, T))
    ent = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            row = logits[b, t]
            mx = max(row)
            lse = mx + math.log(sum(math.exp(x - mx) for x in row))
            logp[b, t] = row[int(targets_BxT[b, t])] - lse
            ent[b, t] = -sum(math.exp(x - lse) * (x - lse) for x in row)
    return logp, ent
