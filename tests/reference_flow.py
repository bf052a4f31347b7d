"""Slow, obviously correct float64 references for `ftjax.flow` (tests only).

Three independent implementations of FlowTracer's graph, reachability and flow (docs/method.md,
sections 2-5; Dong, Li et al., ICML 2026, arXiv 2606.10646):

- `reference_trace`: dense attention, linear domain, one explicit loop per equation. Tiny inputs.
- `reference_trace_log`: one sequence given as a list of attention edges, log domain, so that the
  reachability h may span far more than float64's range (local-window attention at T = 32768).
- `reference_trace_dense`: one dense sequence, two float64 triangular solves (scipy); for long
  real attention maps, whose h spans a few dozen bits, far inside float64's range.

Dims: B batch, T tokens. `attn[k, i]` is the attention query k pays key i; graph edges run i -> k.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg


def _effective_masks(source_T, sink_T, valid_T):
    valid = np.asarray(valid_T, dtype=bool)
    src = np.asarray(source_T, dtype=bool) & valid
    snk = np.asarray(sink_T, dtype=bool) & valid
    return src, snk, valid


def reference_graph(attn_TxT, sink_T, valid_T) -> np.ndarray:
    """W[i, k] = attn[k, i] for i < k, both valid, i not an (absorbing) answer token; else 0."""
    T = attn_TxT.shape[0]
    _, snk, valid = _effective_masks(np.zeros(T, bool), sink_T, valid_T)
    W = np.zeros((T, T), dtype=np.float64)
    for k in range(T):
        for i in range(k):
            if valid[i] and valid[k] and not snk[i]:
                W[i, k] = float(attn_TxT[k, i])
    return W


def reference_trace_single(attn_TxT, source_T, sink_T, valid_T) -> dict[str, np.ndarray]:
    """All FlowTracer quantities for one sequence, float64, linear domain."""
    attn = np.asarray(attn_TxT, dtype=np.float64)
    T = attn.shape[0]
    src, snk, valid = _effective_masks(source_T, sink_T, valid_T)
    W = reference_graph(attn, snk, valid)

    # Reachability h (method.md, section 4), backward from the last token.
    h = np.zeros(T)
    for i in reversed(range(T)):
        if not valid[i]:
            continue
        if snk[i]:
            h[i] = 1.0
        else:
            h[i] = math.fsum(W[i, k] * h[k] for k in range(i + 1, T))

    # Injection (method.md, section 5; an ftjax decision): one unit over the live sources.
    live_src = src & (h > 0)
    n = int(live_src.sum())
    s = np.zeros(T)
    if n > 0:
        s[live_src] = 1.0 / n

    # Conserved weights W' (method.md, section 4): the Doob h-transform.
    Wc = np.zeros((T, T))
    for i in range(T):
        if h[i] > 0:
            for k in range(i + 1, T):
                Wc[i, k] = W[i, k] * h[k] / h[i]

    # Node and edge flow (method.md, section 5; phi[k, i] is edge i -> k, like attention).
    f = np.zeros(T)
    for k in range(T):
        f[k] = s[k] + math.fsum(f[i] * Wc[i, k] for i in range(k))
    phi = np.zeros((T, T))
    for k in range(T):
        for i in range(k):
            phi[k, i] = f[i] * Wc[i, k]

    # Throughput = inflow + outflow; an answer token's outflow goes to the super-sink.
    tau = np.zeros(T)
    for k in range(T):
        outflow = f[k] if snk[k] else math.fsum(phi[j, k] for j in range(k + 1, T))
        tau[k] = f[k] + outflow

    errors = [
        abs(math.fsum(Wc[i, k] for k in range(T)) - 1.0)
        for i in range(T)
        if valid[i] and not snk[i] and h[i] > 0
    ]
    with np.errstate(divide="ignore"):
        log_h = np.log(h)
    return {
        "reach": h,
        "log_reach": log_h,
        "injection": s,
        "flow": f,
        "throughput": tau,
        "edge_flow": phi,
        "conserved_weights": Wc,
        "conservation_error": np.float64(max(errors, default=0.0)),
        "sink": snk,
        "valid": valid,
        "source": src,
    }


def reference_trace(attn_BxTxT, source_BxT, sink_BxT, valid_BxT=None) -> dict[str, np.ndarray]:
    """`reference_trace_single` over a batch; each value gets a leading B dim."""
    attn = np.asarray(attn_BxTxT, dtype=np.float64)
    B, T, _ = attn.shape
    if valid_BxT is None:
        valid_BxT = np.ones((B, T), dtype=bool)
    rows = [
        reference_trace_single(attn[b], source_BxT[b], sink_BxT[b], valid_BxT[b]) for b in range(B)
    ]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def _logsumexp(terms: list[float]) -> float:
    m = max(terms, default=-math.inf)
    if m == -math.inf:
        return -math.inf
    return m + math.log(math.fsum(math.exp(t - m) for t in terms))


def reference_trace_log(
    T: int, dst_E, src_E, weight_E, source_T, sink_T, valid_T=None
) -> dict[str, np.ndarray]:
    """One sequence whose attention is the edge list attn[dst_E[e], src_E[e]] = weight_E[e].

    Entries not listed are 0; repeated (dst, src) pairs add up. Works with log h and
    log g, g = f / h (design doc, "Computing it fast"), so nothing under/overflows:
      log h(i) = logsumexp_k log W[i, k] + log h(k),
      g(k) = s(k) / h(k) + sum_i g(i) W[i, k],   f = g h,   phi(i -> k) = g(i) W[i, k] h(k).
    Returns per-token arrays plus the edge flows of the kept edges (`edge_dst`, `edge_src`,
    `edge_flow`).
    """
    if valid_T is None:
        valid_T = np.ones(T, dtype=bool)
    src, snk, valid = _effective_masks(source_T, sink_T, valid_T)

    merged: dict[tuple[int, int], float] = {}
    for k, i, w in zip(
        np.asarray(dst_E).tolist(),
        np.asarray(src_E).tolist(),
        np.asarray(weight_E, dtype=np.float64).tolist(),
        strict=True,
    ):
        if i < k and valid[i] and valid[k] and not snk[i] and w > 0:
            merged[(k, i)] = merged.get((k, i), 0.0) + w
    out_edges: list[list[tuple[int, float]]] = [[] for _ in range(T)]
    in_edges: list[list[tuple[int, float]]] = [[] for _ in range(T)]
    for (k, i), w in merged.items():
        out_edges[i].append((k, math.log(w)))
        in_edges[k].append((i, math.log(w)))

    log_h = np.full(T, -np.inf)
    for i in reversed(range(T)):
        if not valid[i]:
            continue
        if snk[i]:
            log_h[i] = 0.0
        else:
            log_h[i] = _logsumexp([lw + log_h[k] for k, lw in out_edges[i]])

    live_src = src & (log_h > -np.inf)
    n = int(live_src.sum())
    s = np.where(live_src, 1.0 / max(n, 1), 0.0)

    log_g = np.full(T, -np.inf)
    for k in range(T):
        if log_h[k] == -np.inf:
            continue  # f(k) = 0: nothing flows into a token that cannot reach the answer
        terms = [log_g[i] + lw for i, lw in in_edges[k]]
        if live_src[k]:
            terms.append(math.log(s[k]) - log_h[k])
        log_g[k] = _logsumexp(terms)
    flow = np.exp(log_g + log_h)

    edge_dst = np.array([k for k, _ in merged], dtype=np.int64)
    edge_src = np.array([i for _, i in merged], dtype=np.int64)
    edge_log_w = np.log(np.array(list(merged.values()), dtype=np.float64))
    edge_flow = np.exp(log_g[edge_src] + edge_log_w + log_h[edge_dst])

    outflow = np.zeros(T)
    np.add.at(outflow, edge_src, edge_flow)
    throughput = flow + np.where(snk, flow, outflow)

    errors = []
    for i in range(T):
        if valid[i] and not snk[i] and log_h[i] > -np.inf:
            errors.append(
                abs(math.fsum(math.exp(lw + log_h[k] - log_h[i]) for k, lw in out_edges[i]) - 1)
            )
    return {
        "log_reach": log_h,
        "injection": s,
        "flow": flow,
        "throughput": throughput,
        "edge_dst": edge_dst,
        "edge_src": edge_src,
        "edge_flow": edge_flow,
        "conservation_error": np.float64(max(errors, default=0.0)),
        "sink": snk,
        "valid": valid,
        "source": src,
    }


def reference_trace_dense(attn_TxT, source_T, sink_T, valid_T=None) -> dict[str, np.ndarray]:
    """h, s and f of one sequence by two dense float64 triangular solves (valid while h fits
    float64): (I - W) h = 1_S with answer rows of W zeroed, then (I - W^T) g = s / h, f = g h
    (docs/method.md, "The blocked passes")."""
    attn = np.asarray(attn_TxT, dtype=np.float64)
    T = attn.shape[0]
    src, snk, valid = _effective_masks(
        source_T, sink_T, np.ones(T, bool) if valid_T is None else valid_T
    )
    edge = np.triu(np.ones((T, T), bool), 1) & valid[:, None] & valid[None, :] & ~snk[:, None]
    system = np.eye(T) - np.where(edge, attn.T, 0.0)  # W[i, k] = attn[k, i]
    h = scipy.linalg.solve_triangular(system, snk.astype(np.float64), lower=False)
    live_src = src & (h > 0)
    s = np.where(live_src, 1.0 / max(int(live_src.sum()), 1), 0.0)
    g = scipy.linalg.solve_triangular(system, s / np.where(h > 0, h, 1.0), trans="T", lower=False)
    with np.errstate(divide="ignore"):
        log_h = np.log(h)
    return {"log_reach": log_h, "injection": s, "flow": g * h, "sink": snk, "valid": valid}


def dense_to_edges(attn_TxT):
    """The strictly-causal non-zero entries of a dense attention map as (dst, src, weight)."""
    attn = np.asarray(attn_TxT, dtype=np.float64)
    dst, src = np.nonzero(np.tril(attn, k=-1))
    return dst, src, attn[dst, src]


def band_attention_edges(T: int, window: int, decay: float, sink_weight: float):
    """Local-window attention plus an attention-sink column at token 0, as float32 edges.

    Query k >= 1 pays `sink_weight` to token 0 and spreads the rest over its last `window` keys
    with geometrically decaying weights (key k - j gets a share proportional to decay**(j - 1)).
    Weights are rounded to float32 so that a float32 implementation sees exactly these numbers.
    Returns (dst, src, weight) with unique (dst, src) pairs.
    """
    shares = decay ** np.arange(window, dtype=np.float64)
    shares *= (1.0 - sink_weight) / shares.sum()
    k = np.repeat(np.arange(1, T), window)
    j = np.tile(np.arange(1, window + 1), T - 1)
    i = k - j
    w = shares[j - 1]
    keep = i > 0  # key 0 is handled with the sink column below
    k, i, w = k[keep], i[keep], w[keep]
    # Token 0 gets the sink weight plus whatever window share falls on it.
    sink_k = np.arange(1, T)
    j0 = sink_k  # key 0 is at distance k from query k
    sink_w = sink_weight + np.where(j0 <= window, shares[np.minimum(j0, window) - 1], 0.0)
    dst = np.concatenate([k, sink_k])
    src = np.concatenate([i, np.zeros_like(sink_k)])
    weight = np.concatenate([w, sink_w]).astype(np.float32).astype(np.float64)
    return dst, src, weight
