"""FlowTracer graph math: reachability, conservation, node and edge flow, throughput, backbone.

Dims: B batch, T tokens, N blocks of S tokens (T padded to N*S), K top-k.
Index letters: k is a query (later token), i a key (earlier token); `attn_BxTxT[b, k, i]`.

Paper: Dong, Li et al., "How Does Reasoning Flow?", ICML 2026 (section 3); our reconstruction is
in shared/design/flowtracer.md. Both passes are blocked triangular solves with the same matrix.

Numerics. h spans thousands of nats on long sequences (a sink token next to prompt tokens that are
e^-5000 from the answer), so one float32 scale, per sequence or per block, loses tokens that still
carry flow: the source mass is spread over every question token with h > 0, however small. ftjax
keeps h per token as a float32 mantissa in [1/2, 1) times an exact power of two whose exponent is
stored separately (`reach_mantissa_BxT`, `reach_exponent_BxT`): extended-exponent floating point.
Products and ratios of h then round like plain float32 at any magnitude; nothing goes through a
rounded log or exp (a rounded log weight that recurs along a chain would bias long paths).

The backward pass (h) is a triangular solve in that number format: a diagonal block is one float32
triangular solve when a single scale holds it, else it runs row by row; each finished block is
pushed to all earlier keys at once. The forward pass works on f in [0, 1] with
W' <= 1 formed on the fly, so it is one float32 triangular solve per block plus one product over
the block's row strip for its inflow.

Length: ~430 lines, over the house ~400, because the two passes share the number format and the
block bookkeeping; split apart, each half would need the other's private helpers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlowTrace:
    """Result of `trace`; every field but the scalar `exact_blocks` is B x T.

    log_reach_BxT: log h (natural log), h the total path weight from the token to the answer;
        -inf where h = 0. One float32: for exact differences use the split fields.
    reach_mantissa_BxT, reach_exponent_BxT: h = mantissa * 2^exponent exactly, mantissa in
        [1/2, 1), exponent an integer-valued float (-inf, with mantissa 0, where h = 0).
    flow_BxT: node flow f, the probability that the answer-conditioned walk from the question
        passes through the token. Sums to 1 over the sink when any source reaches it.
    throughput_BxT: tau = inflow + outflow = 2 f (conservation makes outflow equal inflow).
    injection_BxT: super-source mass s, 1/n on each of the n sources that reach the answer.
    sink_BxT, valid_BxT: the effective answer and non-padding masks the trace used.
    exact_blocks: (scalar) how many diagonal blocks of the backward pass needed the row-by-row
        extended-exponent solve because one float32 scale could not hold them (diagnostic only).
    """

    log_reach_BxT: jax.Array
    reach_exponent_BxT: jax.Array
    reach_mantissa_BxT: jax.Array
    flow_BxT: jax.Array
    throughput_BxT: jax.Array
    injection_BxT: jax.Array
    sink_BxT: jax.Array
    valid_BxT: jax.Array
    exact_blocks: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Backbone:
    """The k highest-flow edges (i -> k) and the k highest-throughput tokens of each sequence."""

    edge_src_BxK: jax.Array
    edge_dst_BxK: jax.Array
    edge_flow_BxK: jax.Array
    hub_BxK: jax.Array
    hub_throughput_BxK: jax.Array


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _validated(attn_BxTxT, source_BxT, sink_BxT, valid_BxT):
    """Shape checks always; value checks (sign, finiteness) when the arrays are concrete."""
    attn_BxTxT = jnp.asarray(attn_BxTxT)
    if attn_BxTxT.ndim != 3:
        raise ValueError(f"attn must have rank 3 (B, T, T), got shape {attn_BxTxT.shape}")
    B, T, T2 = attn_BxTxT.shape
    if T != T2:
        raise ValueError(
            f"attn must be square in its last two dims (query, key), got {attn_BxTxT.shape}"
        )
    if not jnp.issubdtype(attn_BxTxT.dtype, jnp.floating):
        raise ValueError(f"attn must be a float array, got dtype {attn_BxTxT.dtype}")
    masks = {"source": source_BxT, "sink": sink_BxT, "valid": valid_BxT}
    for name, mask in masks.items():
        if mask is None:
            continue
        shape = jnp.shape(mask)
        if len(shape) != 2:
            raise ValueError(f"{name} mask must have shape (B, T) = {(B, T)}, got {shape}")
        if shape[0] != B:
            raise ValueError(f"batch size mismatch: attn has B={B}, {name} mask has {shape[0]}")
        if shape[1] != T:
            raise ValueError(f"{name} mask shape {shape} does not match attn (B, T) = {(B, T)}")
    if _is_concrete(attn_BxTxT):
        if bool(jnp.any(~jnp.isfinite(attn_BxTxT))):
            raise ValueError("attn contains NaN or Inf values; attention must be finite")
        if bool(jnp.any(attn_BxTxT < 0)):
            raise ValueError(f"attn has negative entries (min {float(jnp.min(attn_BxTxT)):.3g})")
    valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
    source_BxT = jnp.asarray(source_BxT, bool) & valid_BxT
    sink_BxT = jnp.asarray(sink_BxT, bool) & valid_BxT
    return attn_BxTxT.astype(jnp.float32), source_BxT, sink_BxT, valid_BxT


def _log(x):
    return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), NEG_INF)


def _pow2(n):
    """Exactly 2^n for integer-valued float n (exp2 is not exact there): built from the float32
    bit pattern. 0 below 2^-126 (and for -inf); capped at 2^120, which only guards inf * 0: every
    product it enters is bounded by 1 or by the largest term."""
    n_int = jnp.clip(jnp.where(jnp.isfinite(n), n, -200.0), -127.0, 120.0).astype(jnp.int32)
    power = jax.lax.bitcast_convert_type((n_int + 127) << 23, jnp.float32)
    return jnp.where(n_int >= -126, power, 0.0)


def _split(shift, total):
    """2^shift * total as (exponent, mantissa): frexp gives total = m 2^e with m in [1/2, 1),
    exactly. Exponent -inf (mantissa 0) where total or 2^shift is 0."""
    ok = jnp.isfinite(shift) & (total > 0)
    mantissa, exponent = jnp.frexp(jnp.where(ok, total, 1.0))
    return (
        jnp.where(ok, shift + exponent.astype(jnp.float32), NEG_INF),
        jnp.where(ok, mantissa, 0.0),
    )


def _exponent(w):
    """The binary exponent e of w > 0 (w in [2^(e-1), 2^e)), read from the float32 bits; used
    only to pick shifts (denormals, which XLA flushes anyway, count as 2^-126)."""
    bits = jax.lax.bitcast_convert_type(w.astype(jnp.float32), jnp.int32)
    return ((bits >> 23) & 0xFF).astype(jnp.float32) - 126.0


def _weighted_sum(w, exp_, man, axis: int):
    """sum_j w_j man_j 2^exp_j over `axis` (w >= 0), returned split as (exponent, mantissa).

    The shift is the largest exp_j plus the binary exponent of w_j, so every term is below 1 and
    scaled by an exact power of two: the only rounding is float32's in w * man and in the sum.
    """
    finite = jnp.isfinite(exp_)
    safe_exp, safe_man = jnp.where(finite, exp_, 0.0), jnp.where(finite, man, 0.0)
    candidates = jnp.where((w > 0) & finite, safe_exp + _exponent(w), NEG_INF)
    top = jnp.max(candidates, axis=axis, keepdims=True)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    terms = w * safe_man * _pow2(safe_exp - shift)  # 0 where w = 0 or h = 0
    return _split(jnp.squeeze(top, axis), jnp.sum(terms, axis=axis))


def _add(a, b):
    """a + b for split values a = (exponent, mantissa), b = (exponent, mantissa)."""
    exp_ = jnp.stack([a[0], b[0]])
    return _weighted_sum(jnp.ones_like(exp_), exp_, jnp.stack([a[1], b[1]]), axis=0)


def _conserved(w, exp_i, man_i, exp_k, man_k):
    """W'[i,k] = W[i,k] h(k)/h(i) from W and split h; 0 where W or either h is 0."""
    live = (w > 0) & jnp.isfinite(exp_i) & jnp.isfinite(exp_k)
    safe = lambda x, fill: jnp.where(live, x, fill)  # noqa: E731
    ratio = safe(man_k, 0.0) / safe(man_i, 1.0) * _pow2(safe(exp_k, 0.0) - safe(exp_i, 0.0))
    return jnp.where(live, w * ratio, 0.0)


def _to_blocks(x_BxT, S: int):
    B, T = x_BxT.shape
    return x_BxT.reshape(B, T // S, S).transpose(1, 0, 2)


def _from_blocks(x_NxBxS):
    N, B, S = x_NxBxS.shape
    return x_NxBxS.transpose(1, 0, 2).reshape(B, N * S)


def _diagonal_blocks(x_BxTxT, S: int):
    """Each diagonal block with keys as rows: out_NxBxSxS[n, b, i, k] = x[b, n*S + k, n*S + i]."""
    B, T, _ = x_BxTxT.shape
    N = T // S
    blocks = jnp.arange(N)
    return jnp.swapaxes(x_BxTxT.reshape(B, N, S, N, S)[:, blocks, :, blocks, :], -1, -2)


def _block_reach_exact(base_exp_BxS, base_man_BxS, w_BxSxS):
    """Solve one diagonal block row by row with a per-token exponent: exact at any dynamic range."""
    B, S = base_exp_BxS.shape

    def row(j, h):
        t = S - 1 - j
        exp_Bx1S = jnp.concatenate([base_exp_BxS[:, t, None], h[0]], axis=-1)
        man_Bx1S = jnp.concatenate([base_man_BxS[:, t, None], h[1]], axis=-1)
        w_Bx1S = jnp.concatenate([jnp.ones((B, 1)), w_BxSxS[:, t, :]], axis=-1)
        h_t = _weighted_sum(w_Bx1S, exp_Bx1S, man_Bx1S, axis=-1)
        put = lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, t, 1)  # noqa: E731
        return tuple(put(x, v) for x, v in zip(h, h_t, strict=True))

    h0 = (jnp.full((B, S), NEG_INF), jnp.zeros((B, S)))
    return jax.lax.fori_loop(0, S, row, h0)


def _block_reach_fast(base_exp_BxS, base_man_BxS, w_BxSxS):
    """Solve one diagonal block with one float32 triangular solve under a single shift.

    Returns the solution and whether it is trustworthy: no right-hand side below 2^-100 of the
    largest, every solution entry 0 or >= 1e-30 of the scale, and no zero entry fed by a nonzero
    one (which would mean an underflowed product). Then every dropped term is < 1e-8 relative.
    """
    top_Bx1 = jnp.max(base_exp_BxS, axis=-1, keepdims=True)
    shift_Bx1 = jnp.where(jnp.isfinite(top_Bx1), top_Bx1, 0.0)
    has_rhs = jnp.isfinite(base_exp_BxS)
    gap_BxS = jnp.where(has_rhs, base_exp_BxS - shift_Bx1, NEG_INF)
    rhs_BxS = base_man_BxS * _pow2(gap_BxS)
    u_BxS = jax.lax.linalg.triangular_solve(
        -w_BxSxS, rhs_BxS[..., None], left_side=True, lower=False, unit_diagonal=True
    )[..., 0]
    fed_BxS = jnp.any((w_BxSxS > 0) & (u_BxS[:, None, :] > 0), axis=-1)
    trusted = (
        jnp.all(jnp.where(has_rhs, gap_BxS >= -100.0, True))
        & jnp.all(jnp.isfinite(u_BxS))
        & jnp.all((u_BxS == 0) | (u_BxS >= 1e-30))
        & ~jnp.any((u_BxS == 0) & fed_BxS)
    )
    return _split(jnp.where(jnp.isfinite(top_Bx1), shift_Bx1, NEG_INF), u_BxS), trusted


def _reach(attn_BxTxT, w_NxBxSxS, sink_BxT, emits_BxT, S: int):
    """Backward pass: h = 1 on the sink, h(i) = sum_{k>i} W[i,k] h(k) elsewhere.

    The carry holds, for every key, the part of its sum that comes from finished blocks;
    a finished block pushes to all earlier keys through its row strip of attn. A diagonal block
    is solved by one float32 triangular solve when that is exact to float32 (typical attention),
    else row by row with a per-token exponent (extreme decay, attention sinks).
    Returns h as (exponent, mantissa) and the number of blocks that needed the row-by-row path.
    """
    B, T = sink_BxT.shape
    key_pos_T = jnp.arange(T)

    def block(acc, xs):
        n, w_BxSxS, sink_BxS, emits_BxS = xs
        acc_exp_BxS, acc_man_BxS = (jax.lax.dynamic_slice_in_dim(a, n * S, S, 1) for a in acc)
        # h = 1 = (1/2) 2^1 on answer tokens; other emitting keys start from the carried sum.
        base_exp_BxS = jnp.where(sink_BxS, 1.0, jnp.where(emits_BxS, acc_exp_BxS, NEG_INF))
        base_man_BxS = jnp.where(sink_BxS, 0.5, jnp.where(emits_BxS, acc_man_BxS, 0.0))
        fast_h, trusted = _block_reach_fast(base_exp_BxS, base_man_BxS, w_BxSxS)
        h_exp_BxS, h_man_BxS = jax.lax.cond(
            trusted, lambda: fast_h, lambda: _block_reach_exact(base_exp_BxS, base_man_BxS, w_BxSxS)
        )
        strip_BxSxT = jax.lax.dynamic_slice_in_dim(attn_BxTxT, n * S, S, axis=1)
        push = _weighted_sum(strip_BxSxT, h_exp_BxS[:, :, None], h_man_BxS[:, :, None], 1)
        summed = _add(acc, push)
        earlier_T = key_pos_T < n * S
        acc = tuple(jnp.where(earlier_T, new, old) for new, old in zip(summed, acc, strict=True))
        return acc, (h_exp_BxS, h_man_BxS, ~trusted)

    acc0 = (jnp.full((B, T), NEG_INF), jnp.zeros((B, T)))
    xs = (jnp.arange(T // S), w_NxBxSxS, _to_blocks(sink_BxT, S), _to_blocks(emits_BxT, S))
    _, (h_exp, h_man, exact_N) = jax.lax.scan(block, acc0, xs, reverse=True)
    return _from_blocks(h_exp), _from_blocks(h_man), jnp.sum(exact_N)


def _injection(source_BxT, h_exp_BxT):
    """One unit of flow spread uniformly over the sources that reach the answer (ftjax decision)."""
    live_BxT = source_BxT & jnp.isfinite(h_exp_BxT)
    count_Bx1 = jnp.sum(live_BxT, axis=-1, keepdims=True)
    return jnp.where(live_BxT, 1.0 / jnp.maximum(count_Bx1, 1), 0.0).astype(jnp.float32)


def _flow(attn_BxTxT, w_NxBxSxS, h_exp_BxT, h_man_BxT, injection_BxT, pushes_BxT, S: int):
    """Forward pass: f(k) = s(k) + sum_{i<k} f(i) W'[i,k], with W' <= 1 formed on the fly.

    Block n pulls its inflow from every finished key through its row strip of attn,
    f(i) W'[i,k] = attn[k,i] m(k) (f(i) / m(i)) 2^(e(k) - e(i)) with h = m 2^e, the power of two
    exact; then one float32 triangular solve inside the block (f lies in [0, 1]).
    """
    B, T = h_exp_BxT.shape
    to_blocks = lambda x: _to_blocks(x, S)  # noqa: E731

    def block(carry, xs):
        q_i_BxT, exp_i_BxT = carry  # q = f / mantissa of h, 0 for tokens that push nothing
        n, w_BxSxS, exp_BxS, man_BxS, inj_BxS, pushes_BxS = xs
        strip_BxSxT = jax.lax.dynamic_slice_in_dim(attn_BxTxT, n * S, S, axis=1)
        scale_BxSxT = (
            man_BxS[:, :, None]
            * q_i_BxT[:, None, :]
            * _pow2(exp_BxS[:, :, None] - exp_i_BxT[:, None, :])
        )
        inflow_BxS = jnp.sum(strip_BxSxT * scale_BxSxT, axis=-1)
        wc_BxSxS = _conserved(
            w_BxSxS,
            exp_BxS[:, :, None],
            man_BxS[:, :, None],
            exp_BxS[:, None, :],
            man_BxS[:, None, :],
        )
        f_BxS = jax.lax.linalg.triangular_solve(
            -wc_BxSxS,
            (inj_BxS + inflow_BxS)[..., None],
            left_side=True,
            lower=False,
            transpose_a=True,
            unit_diagonal=True,
        )[..., 0]
        # Answer tokens absorb: they push nothing.
        q_BxS = jnp.where(pushes_BxS, f_BxS / jnp.where(pushes_BxS, man_BxS, 1.0), 0.0)
        update = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, n * S, 1)  # noqa: E731
        carry = (update(q_i_BxT, q_BxS), update(exp_i_BxT, jnp.where(pushes_BxS, exp_BxS, 0.0)))
        return carry, f_BxS

    xs = (
        jnp.arange(T // S),
        w_NxBxSxS,
        to_blocks(h_exp_BxT),
        to_blocks(h_man_BxT),
        to_blocks(injection_BxT),
        to_blocks(pushes_BxT),
    )
    carry0 = (jnp.zeros((B, T)), jnp.zeros((B, T)))
    _, f_NxBxS = jax.lax.scan(block, carry0, xs)
    return _from_blocks(f_NxBxS)


def trace(attn_BxTxT, source_BxT, sink_BxT, valid_BxT=None, *, block_size: int = 64) -> FlowTrace:
    """FlowTracer's answer-conditioned flow from the question (source) to the answer (sink).

    Graph: edge i -> k with capacity W[i,k] = attn[b,k,i] for i < k, both valid; answer tokens are
    absorbing (their out-edges go to a super-sink). Reachability h(a) = 1 on the answer,
    h(i) = sum_k W[i,k] h(k); conserved weights W' = W h(k)/h(i) (paper Thm 3.1: out-weights sum
    to 1); one unit of flow enters uniformly over the sources with h > 0 and f(k) = s(k) +
    sum_i f(i) W'[i,k]. The diagonal and anything above it in attn are ignored.
    Value checks (negative or non-finite attention) run only on concrete (non-traced) inputs.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    attn_BxTxT, source_BxT, sink_BxT, valid_BxT = _validated(
        attn_BxTxT, source_BxT, sink_BxT, valid_BxT
    )
    return _trace(attn_BxTxT, source_BxT, sink_BxT, valid_BxT, block_size=block_size)


@functools.partial(jax.jit, static_argnames=("block_size",))
def _trace(attn_BxTxT, source_BxT, sink_BxT, valid_BxT, *, block_size: int) -> FlowTrace:
    B, T, _ = attn_BxTxT.shape
    S = min(block_size, T)
    Tp = math.ceil(T / S) * S
    if Tp != T:
        attn_BxTxT = jnp.pad(attn_BxTxT, ((0, 0), (0, Tp - T), (0, Tp - T)))
        pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)))  # noqa: E731
        source_BxT, sink_BxT, valid_BxT = pad(source_BxT), pad(sink_BxT), pad(valid_BxT)
    attn_BxTxT = jax.lax.stop_gradient(attn_BxTxT)

    emits_BxT = valid_BxT & ~sink_BxT  # keys whose out-edges exist (answer tokens absorb)
    edge_NxBxSxS = (
        jnp.triu(jnp.ones((S, S), bool), 1)
        & _to_blocks(emits_BxT, S)[..., :, None]
        & _to_blocks(valid_BxT, S)[..., None, :]
    )
    w_NxBxSxS = jnp.where(edge_NxBxSxS, _diagonal_blocks(attn_BxTxT, S), 0.0)

    h_exp_BxT, h_man_BxT, exact_blocks = _reach(attn_BxTxT, w_NxBxSxS, sink_BxT, emits_BxT, S)
    injection_BxT = _injection(source_BxT, h_exp_BxT)
    pushes_BxT = emits_BxT & jnp.isfinite(h_exp_BxT)
    f_BxT = _flow(attn_BxTxT, w_NxBxSxS, h_exp_BxT, h_man_BxT, injection_BxT, pushes_BxT, S)
    crop = lambda x: x[:, :T]  # noqa: E731
    log_reach_BxT = h_exp_BxT * math.log(2.0) + _log(h_man_BxT)
    return FlowTrace(
        log_reach_BxT=crop(log_reach_BxT),
        reach_exponent_BxT=crop(h_exp_BxT),
        reach_mantissa_BxT=crop(h_man_BxT),
        flow_BxT=crop(f_BxT),
        throughput_BxT=crop(2.0 * f_BxT),
        injection_BxT=crop(injection_BxT),
        sink_BxT=crop(sink_BxT),
        valid_BxT=crop(valid_BxT),
        exact_blocks=exact_blocks,
    )


def _conserved_weights(attn_BxTxT, tr: FlowTrace):
    """W'[i, k] in attn's layout: out[b, k, i] = attn[b, k, i] h(k) / h(i) on live edges, else 0."""
    T = attn_BxTxT.shape[-1]
    emits_BxT = tr.valid_BxT & ~tr.sink_BxT
    edge_BxTxT = (
        jnp.tril(jnp.ones((T, T), bool), -1) & tr.valid_BxT[:, :, None] & emits_BxT[:, None, :]
    )
    w_BxTxT = jnp.where(edge_BxTxT, attn_BxTxT, 0.0)
    return _conserved(
        w_BxTxT,
        tr.reach_exponent_BxT[:, None, :],
        tr.reach_mantissa_BxT[:, None, :],
        tr.reach_exponent_BxT[:, :, None],
        tr.reach_mantissa_BxT[:, :, None],
    )


def edge_flow(attn_BxTxT, tr: FlowTrace) -> jax.Array:
    """phi[b, k, i] = f(i) W'[i, k]: the flow on edge i -> k, in attn's (query, key) layout.

    Row sums give each token's inflow from earlier tokens, column sums its outflow.
    """
    attn_BxTxT, *_ = _validated(attn_BxTxT, tr.valid_BxT, tr.sink_BxT, tr.valid_BxT)
    return _conserved_weights(attn_BxTxT, tr) * tr.flow_BxT[:, None, :]


def conservation_error(attn_BxTxT, tr: FlowTrace) -> jax.Array:
    """err_B = max over live (h > 0) non-answer tokens i of |sum_k W'[i, k] - 1| (Thm 3.1)."""
    attn_BxTxT, *_ = _validated(attn_BxTxT, tr.valid_BxT, tr.sink_BxT, tr.valid_BxT)
    out_weight_BxT = jnp.sum(_conserved_weights(attn_BxTxT, tr), axis=1)
    live_BxT = tr.valid_BxT & ~tr.sink_BxT & jnp.isfinite(tr.reach_exponent_BxT)
    return jnp.max(jnp.where(live_BxT, jnp.abs(out_weight_BxT - 1.0), 0.0), axis=-1)


def backbone(attn_BxTxT, tr: FlowTrace, k: int) -> Backbone:
    """The k largest-flow edges and the k largest-throughput tokens (hubs) of each sequence."""
    B, T = tr.flow_BxT.shape
    if not isinstance(k, int) or not 1 <= k <= T:
        raise ValueError(f"backbone k must be an int in [1, T={T}], got {k!r}")
    phi_BxTT = edge_flow(attn_BxTxT, tr).reshape(B, T * T)
    edge_flow_BxK, flat_BxK = jax.lax.top_k(phi_BxTT, k)
    hub_throughput_BxK, hub_BxK = jax.lax.top_k(tr.throughput_BxT, k)
    return Backbone(
        edge_src_BxK=(flat_BxK % T).astype(jnp.int32),
        edge_dst_BxK=(flat_BxK // T).astype(jnp.int32),
        edge_flow_BxK=edge_flow_BxK,
        hub_BxK=hub_BxK.astype(jnp.int32),
        hub_throughput_BxK=hub_throughput_BxK,
    )
