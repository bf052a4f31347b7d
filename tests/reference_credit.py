"""Slow, obviously correct float64 references for every credit variant in ftjax.credit.

Plain Python loops over tokens; meant for tiny inputs (T <= ~64) in tests only.
Dims: B = batch, T = tokens (prompt + response + padding).

FlowTracer throughput is computed here independently of ftjax.flow and of any other test
reference, straight from the definitions in docs/method.md (sections 2, 4 and 5):
  W[i, k] = A[k, i] for i < k, both valid, i not an answer token (answers absorb);
  h(a) = 1 on answer tokens, h(i) = sum_{k > i} W[i, k] h(k), 0 on invalid tokens;
  s = 1 / #live over live sources (prompt & valid & h > 0);
  W'[i, k] = W[i, k] h(k) / h(i);  f(k) = s(k) + sum_{i < k} f(i) W'[i, k];  tau = 2 f.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

SOFT_EPS = 1e-8
FLOW_VARIANTS = ("flowtracer", "flowtracer_inverse", "flowtracer_soft")


def selection_count(n: int, fraction: float) -> int:
    """ceil(n * fraction), exact, with fraction read as a fraction of denominator <= 10000."""
    return math.ceil(int(n) * Fraction(fraction).limit_denominator(10000))


def flow_tau(attn_TxT, source_T, sink_T, valid_T) -> np.ndarray:
    """FlowTracer throughput tau = 2 f of one sequence, by dense float64 loops."""
    A = np.asarray(attn_TxT, dtype=np.float64)
    valid = np.asarray(valid_T, dtype=bool)
    sink = np.asarray(sink_T, dtype=bool) & valid
    source = np.asarray(source_T, dtype=bool) & valid
    T = valid.shape[0]

    W = np.zeros((T, T))
    for i in range(T):
        if not valid[i] or sink[i]:
            continue
        for k in range(i + 1, T):
            if valid[k]:
                W[i, k] = A[k, i]

    h = np.zeros(T)
    for i in reversed(range(T)):
        if not valid[i]:
            h[i] = 0.0
        elif sink[i]:
            h[i] = 1.0
        else:
            h[i] = sum(W[i, k] * h[k] for k in range(i + 1, T))

    live = source & (h > 0)
    s = np.zeros(T)
    if live.any():
        s[live] = 1.0 / live.sum()

    W_prime = np.zeros((T, T))
    for i in range(T):
        if h[i] > 0:
            for k in range(i + 1, T):
                W_prime[i, k] = W[i, k] * h[k] / h[i]

    f = np.zeros(T)
    for k in range(T):
        f[k] = s[k] + sum(f[i] * W_prime[i, k] for i in range(k))
    return 2.0 * f


def attention_received(attn_TxT, valid_T, window: int | None) -> np.ndarray:
    """score(i) = sum of A[k, i] over valid queries k with i < k (<= i + window if set)."""
    A = np.asarray(attn_TxT, dtype=np.float64)
    valid = np.asarray(valid_T, dtype=bool)
    T = valid.shape[0]
    score = np.zeros(T)
    for i in range(T):
        last = T - 1 if window is None else min(T - 1, i + window)
        for k in range(i + 1, last + 1):
            if valid[k]:
                score[i] += A[k, i]
    return score


def attention_received_mean(attn_TxT, valid_T, window: int | None) -> np.ndarray:
    """score(i) = mean of A[k, i] over valid queries k with i < k (<= i + window if set); 0 when
    there is no such query."""
    A = np.asarray(attn_TxT, dtype=np.float64)
    valid = np.asarray(valid_T, dtype=bool)
    T = valid.shape[0]
    score = np.zeros(T)
    for i in range(T):
        last = T - 1 if window is None else min(T - 1, i + window)
        seen = [A[k, i] for k in range(i + 1, last + 1) if valid[k]]
        if seen:
            score[i] = sum(seen) / len(seen)
    return score


def attention_max(attn_TxT, valid_T, window: int | None) -> np.ndarray:
    """score(i) = max of A[k, i] over valid queries k with i < k (<= i + window if set); 0 when
    there is no such query."""
    A = np.asarray(attn_TxT, dtype=np.float64)
    valid = np.asarray(valid_T, dtype=bool)
    T = valid.shape[0]
    score = np.zeros(T)
    for i in range(T):
        last = T - 1 if window is None else min(T - 1, i + window)
        seen = [A[k, i] for k in range(i + 1, last + 1) if valid[k]]
        if seen:
            score[i] = max(seen)
    return score


POINTWISE_ATTENTION = {
    "attention_received": attention_received,
    "attention_received_mean": attention_received_mean,
    "attention_max": attention_max,
}


def top_k(scores_T, response_T, k: int, positive_only: bool = False) -> np.ndarray:
    """Mask of the first k response tokens sorted by (-score, position)."""
    scores = np.asarray(scores_T, dtype=np.float64)
    order = sorted(np.flatnonzero(response_T), key=lambda t: (-scores[t], t))
    chosen = np.zeros(scores.shape[0], dtype=bool)
    for t in order[:k]:
        if not positive_only or scores[t] > 0:
            chosen[t] = True
    return chosen


def bottom_k(scores_T, response_T, k: int) -> np.ndarray:
    """Mask of the first k response tokens sorted by (score, position)."""
    scores = np.asarray(scores_T, dtype=np.float64)
    order = sorted(np.flatnonzero(response_T), key=lambda t: (scores[t], t))
    chosen = np.zeros(scores.shape[0], dtype=bool)
    chosen[order[:k]] = True
    return chosen


def _weights(selected_T, response_T, gamma: float) -> np.ndarray:
    return np.where(response_T, np.where(selected_T, gamma, 1.0), 0.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def endpoints(prompt_T, response_T, answer_T, sink: str, source: str):
    """(source_T, sink_T) of one row, by loops: predictors are response tokens t whose token
    t + 1 is a (non-padding) answer token; no_bos drops the row's first prompt token."""
    prompt = np.asarray(prompt_T, dtype=bool)
    response = np.asarray(response_T, dtype=bool)
    answer = np.asarray(answer_T, dtype=bool) & (prompt | response)
    T = prompt.shape[0]
    predictors = np.zeros(T, bool)
    for t in range(T - 1):
        predictors[t] = bool(response[t] and answer[t + 1])
    sink_T = {"answer": answer, "predictors": predictors, "both": answer | predictors}[sink]
    source_T = prompt.copy()
    if source == "no_bos":
        for t in range(T):
            if prompt[t]:
                source_T[t] = False
                break
    return source_T, sink_T


def row_tau(attn_TxT, prompt_T, response_T, answer_T, sink="answer", source="prompt"):
    valid = np.asarray(prompt_T, dtype=bool) | np.asarray(response_T, dtype=bool)
    source_T, sink_T = endpoints(prompt_T, response_T, answer_T, sink, source)
    return flow_tau(attn_TxT, source_T, sink_T, valid)


def credit(
    name: str,
    *,
    prompt_BxT,
    response_BxT,
    answer_BxT,
    attn_BxTxT=None,
    entropy_BxT=None,
    random_BxT=None,
    labels_BxT=None,
    top_fraction: float = 0.4,
    gamma: float = 1.5,
    select_fraction: float = 0.2,
    attention_window: int | None = None,
    sink: str = "answer",
    source: str = "prompt",
) -> np.ndarray:
    """Reference gamma_BxT (float64) of the built-in credit variant `name`.

    `random_BxT` are the uniform draws the `random` variant ranks by; `labels_BxT` are the
    ground-truth essential tokens the `oracle` up-weights.
    """
    prompt = np.asarray(prompt_BxT, dtype=bool)
    response = np.asarray(response_BxT, dtype=bool)
    answer = np.asarray(answer_BxT, dtype=bool)
    valid = prompt | response
    B, T = response.shape
    out = np.zeros((B, T))

    if name == "entropy_select":
        ent = np.asarray(entropy_BxT, dtype=np.float64)
        tokens = [(b, t) for b in range(B) for t in range(T) if response[b, t]]
        K = selection_count(len(tokens), select_fraction)
        for b, t in sorted(tokens, key=lambda bt: (-ent[bt], bt[0], bt[1]))[:K]:
            out[b, t] = 1.0
        return out

    for b in range(B):
        resp = response[b]
        n = int(resp.sum())
        k = selection_count(n, top_fraction)
        ends = endpoints(prompt[b], resp, answer[b], sink, source)
        empty_sink = not ends[1].any()
        if name == "uniform" or (name in FLOW_VARIANTS and empty_sink):
            out[b] = np.where(resp, 1.0, 0.0)
        elif name == "flowtracer":
            tau = row_tau(attn_BxTxT[b], prompt[b], resp, answer[b], sink, source)
            out[b] = _weights(top_k(tau, resp, k, positive_only=True), resp, gamma)
        elif name == "flowtracer_inverse":
            tau = row_tau(attn_BxTxT[b], prompt[b], resp, answer[b], sink, source)
            out[b] = _weights(bottom_k(tau, resp, k), resp, gamma)
        elif name == "flowtracer_soft":
            if n == 0:
                continue
            tau = row_tau(attn_BxTxT[b], prompt[b], resp, answer[b], sink, source)
            mean = tau[resp].mean()
            std = tau[resp].std()  # population std
            z = (tau[resp] - mean) / (std + SOFT_EPS)
            out[b, resp] = 1.0 + (gamma - 1.0) * _sigmoid(z)
        elif name == "random":
            scores = np.asarray(random_BxT, dtype=np.float64)[b]
            out[b] = _weights(top_k(scores, resp, k), resp, gamma)
        elif name == "entropy":
            scores = np.asarray(entropy_BxT, dtype=np.float64)[b]
            out[b] = _weights(top_k(scores, resp, k), resp, gamma)
        elif name in POINTWISE_ATTENTION:
            scores = POINTWISE_ATTENTION[name](attn_BxTxT[b], valid[b], attention_window)
            out[b] = _weights(top_k(scores, resp, k), resp, gamma)
        elif name in ("oracle", "oracle_answer"):
            labels = np.asarray(labels_BxT, dtype=bool)[b]
            for t in range(T):
                if resp[t]:
                    essential = labels[t] or (name == "oracle_answer" and answer[b, t])
                    out[b, t] = gamma if essential else 1.0
        else:
            raise ValueError(f"no reference for credit variant {name!r}")
    return out


def pairwise_auc(score_BxT, essential_BxT, eligible_BxT, role_BxT) -> dict[str, float]:
    """Position-controlled AUC by a double loop over the token pairs of every response: for each
    (essential i, non-essential j), both eligible and of the same role, 1 if score_i > score_j,
    1/2 on a tie, 0 otherwise; averaged overall and over the pairs where i < j ("essential_first")
    and i > j ("essential_later"); NaN without pairs."""
    score = np.asarray(score_BxT, dtype=np.float64)
    B, T = score.shape
    totals = {"auc": [0.0, 0], "essential_first": [0.0, 0], "essential_later": [0.0, 0]}
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if not (eligible_BxT[b][i] and eligible_BxT[b][j]):
                    continue
                if not essential_BxT[b][i] or essential_BxT[b][j]:
                    continue
                if role_BxT[b][i] != role_BxT[b][j]:
                    continue
                if score[b, i] > score[b, j]:
                    won = 1.0
                elif score[b, i] == score[b, j]:
                    won = 0.5
                else:
                    won = 0.0
                for key in ("auc", "essential_first" if i < j else "essential_later"):
                    totals[key][0] += won
                    totals[key][1] += 1
    out = {}
    for key, (won, count) in totals.items():
        out[key] = won / count if count else math.nan
        out["pairs" if key == "auc" else f"{key}_pairs"] = count
    return out
