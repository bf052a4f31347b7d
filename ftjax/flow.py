"""FlowTracer graph math: reachability, conservation, node and edge flow, throughput, backbone.

Dims: B batch, T tokens, N blocks of S tokens (T padded to N*S), W strip width, K top-k.
Index letters: k is a query (later token), i a key (earlier token); `attn_BxTxT[b, k, i]`.

Paper: Dong, Li et al., "How Does Reasoning Flow?", ICML 2026 (section 3); our reconstruction is
in docs/method.md. Both passes are blocked triangular solves with the same matrix.

Numerics. h spans thousands of nats on long sequences (a sink token next to prompt tokens that are
e^-5000 from the answer), so one float32 scale loses tokens that still carry flow. h is kept per
token as a float32 mantissa in [1/2, 1) times an exact power of two (`reach_mantissa_BxT`,
`reach_exponent_BxT`): products and ratios of h round like float32 at any magnitude, with no
rounded log or exp. Backward pass (h): a diagonal block is one float32 triangular solve when one
scale holds it, else it runs row by row (`exact_blocks`; Gemma-3's real maps never need that);
the block then pushes to all earlier keys with one product over its row strip. Forward pass (f in
[0, 1]): a block pulls its inflow with one product over its row strip, then solves its diagonal
block in float32. One product holds a WINDOW of 60 bits of h exactly; wider blocks take several.

Drift. Float32 rounding moves each token's conservation by ~1e-8 of its flow; along chains of
similar steps those roundings are correlated, so the flow lost grew linearly with T (3.6e-5 of the
unit at T = 4096 under steep local attention). Normalising each token's out-weights by their
computed sum would not stop it: that sum rounds just as coherently. What is exact is the flow in
flight across a block boundary, injected - absorbed. At each boundary the forward pass evaluates
what the finished keys will still deliver (g = f / h times the backward pass's sum over later
queries) and rescales the outflow of the block just finished to match. The rounding since the
previous boundary happened in that block, so each correction is one block's rounding and the
corrections do not stack: the error of f is that of one block at any T (steep pattern: 1.5e-6,
1.8e-6, 2.2e-6 relative at T = 1K, 4K, 16K; before: 8.9e-6 and 3.6e-5 at 1K and 4K). Older keys
are not rescaled again, since a long-lived sender (an attention sink) would compound corrections.
No float64 anywhere (TPUs have none).

Length: ~550 lines, over the house ~400: both passes share the number format and the block
bookkeeping, and the drift check couples them (the forward pass reads the backward's sums).
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


def _mantissa_exponent(x):
    """x = m 2^e with m in [1/2, 1), read from the float32 bits of x >= 0 (e = -inf at 0; XLA
    flushes denormals)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    mantissa = jax.lax.bitcast_convert_type((bits & 0x007FFFFF) | (126 << 23), jnp.float32)
    exponent = ((bits >> 23) & 0xFF).astype(jnp.float32) - 126.0
    return jnp.where(x > 0, mantissa, 0.0), jnp.where(x > 0, exponent, NEG_INF)


def _split(shift, total):
    """2^shift * total as (exponent, mantissa), exactly; (-inf, 0) where either factor is 0."""
    mantissa, exponent = _mantissa_exponent(total)
    ok = jnp.isfinite(shift) & (total > 0)
    return jnp.where(ok, shift + exponent, NEG_INF), jnp.where(ok, mantissa, 0.0)


def _weighted_sum(w, exp_, man, axis: int):
    """sum_j w_j man_j 2^exp_j over `axis` (w >= 0), returned split as (exponent, mantissa).

    The shift is the largest exp_j plus the binary exponent of w_j, so every term is below 1 and
    scaled by an exact power of two: the only rounding is float32's in w * man and in the sum.
    """
    finite = jnp.isfinite(exp_)
    safe_exp, safe_man = jnp.where(finite, exp_, 0.0), jnp.where(finite, man, 0.0)
    candidates = jnp.where((w > 0) & finite, safe_exp + _mantissa_exponent(w)[1], NEG_INF)
    top = jnp.max(candidates, axis=axis, keepdims=True)
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    terms = w * safe_man * _pow2(safe_exp - shift)  # 0 where w = 0 or h = 0
    return _split(jnp.squeeze(top, axis), jnp.sum(terms, axis=axis))


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
    ok_BxS = (~has_rhs | (gap_BxS >= -100.0)) & jnp.isfinite(u_BxS)
    trusted = jnp.all(ok_BxS & jnp.where(u_BxS == 0, ~fed_BxS, u_BxS >= 1e-30))
    return _split(jnp.where(jnp.isfinite(top_Bx1), shift_Bx1, NEG_INF), u_BxS), trusted


WINDOW = 60.0  # bits of h that one float32 product over a strip holds exactly (_push, _pull)
RESCALE_LIMIT = 16.0  # a block's outflow is rescaled only while older keys carry <= 16x as much
GROUPS = 4  # block groups with strips of their own width (`_grouped_scan`)


def _add_scaled(acc, x, shift):
    """acc + x 2^shift in split form, for float32 x >= 0 and integer shift; one float32 rounding."""
    acc_exp, acc_man = acc
    x_man, x_exp = _mantissa_exponent(x)
    top = jnp.maximum(acc_exp, x_exp + shift)
    total = acc_man * _pow2(acc_exp - top) + x_man * _pow2(x_exp + shift - top)  # [1/2, 2) or 0
    carry = total >= 1.0
    return jnp.where(total > 0, top + carry, NEG_INF), jnp.where(carry, 0.5 * total, total)


def _by_windows(exp_BxS, state, one_window):
    """Fold `one_window(state, in_window_BxS, top_Bx1)` over windows of the block's live tokens,
    each the pending ones within WINDOW bits of the largest pending exponent `top`. Real attention
    needs one window; a block holding an attention sink and tokens far from the answer, a few."""

    def step(pending_BxS, state):
        top_Bx1 = jnp.max(jnp.where(pending_BxS, exp_BxS, NEG_INF), axis=-1, keepdims=True)
        top_Bx1 = jnp.where(jnp.isfinite(top_Bx1), top_Bx1, 0.0)
        in_window_BxS = pending_BxS & (exp_BxS > top_Bx1 - WINDOW)
        return pending_BxS & ~in_window_BxS, one_window(state, in_window_BxS, top_Bx1)

    carry = step(jnp.isfinite(exp_BxS), state)
    return jax.lax.while_loop(lambda c: jnp.any(c[0]), lambda c: step(*c), carry)[1]


def _push(acc, strip_BxSxW, h_exp_BxS, h_man_BxS):
    """acc(i) + sum_k strip[k, i] h(k) over the block's queries k, in split form. In a window,
    h(k) 2^(WINDOW - top) lies in [1, 2^60): its product with any normal float32 attention weight
    is a normal float32, so the strip product is exact to float32 rounding."""

    def one_window(acc, in_window_BxS, top_Bx1):
        shift_Bx1 = top_Bx1 - WINDOW
        u_BxS = jnp.where(in_window_BxS, h_man_BxS * _pow2(h_exp_BxS - shift_Bx1), 0.0)
        return _add_scaled(acc, jnp.einsum("bs,bsw->bw", u_BxS, strip_BxSxW), shift_Bx1)

    return _by_windows(h_exp_BxS, acc, one_window)


def _pull(strip_BxSxW, q_BxW, exp_BxW, h_exp_BxS, h_man_BxS):
    """inflow(k) = sum_i f(i) W'[i,k] = h(k) sum_i strip[k, i] g(i) with g = f / h = q 2^-e.

    In a window, R = top - WINDOW - 8 puts h(k) 2^-R in [2^8, 2^68]. A key with an edge into the
    window has h(i) >= attn h(k) >= 2^-127 h(k), so g(i) 2^R <= 2^119; keys past 2^120 have no
    such edge and are zeroed. Inflows below 2^-58 may round to 0 (an absolute error only).
    """

    def one_window(inflow_BxS, in_window_BxS, top_Bx1):
        shift_Bx1 = top_Bx1 - WINDOW - 8.0
        gap_BxW = shift_Bx1 - exp_BxW
        v_BxW = jnp.where(gap_BxW <= 120.0, q_BxW * _pow2(gap_BxW), 0.0)
        sum_BxS = jnp.einsum("bsw,bw->bs", strip_BxSxW, v_BxW)
        h_BxS = h_man_BxS * _pow2(h_exp_BxS - shift_Bx1)
        return jnp.where(in_window_BxS, sum_BxS * h_BxS, inflow_BxS)

    return _by_windows(h_exp_BxS, jnp.zeros_like(h_man_BxS), one_window)


def _grouped_scan(make_block, carry, xs, S: int, reverse: bool = False):
    """lax.scan over the blocks, in GROUPS consecutive groups when T >= 4096: `make_block(width)`
    reads strips of the first `width` keys, those before its group's end (the rest of a strip lies
    above the diagonal), so the passes stream ~5/8 of the map instead of all of it (~15% faster
    on CPU, for ~3x the compile time, hence only for long sequences)."""
    N = xs[0].shape[0]
    groups = GROUPS if N >= GROUPS and N * S >= 4096 else 1
    bounds = [g * N // groups for g in range(groups + 1)]
    parts = [None] * groups
    for g in reversed(range(groups)) if reverse else range(groups):
        part = jax.tree.map(lambda x: x[bounds[g] : bounds[g + 1]], xs)  # noqa: B023
        carry, parts[g] = jax.lax.scan(make_block(bounds[g + 1] * S), carry, part, reverse=reverse)
    return carry, jax.tree.map(lambda *ys: jnp.concatenate(ys), *parts)


def _reach(attn_BxTxT, w_NxBxSxS, sink_BxT, emits_BxT, S: int):
    """Backward pass: h = 1 on the sink, h(i) = sum_{k>i} W[i,k] h(k) elsewhere.

    The carry holds, for every key, the part of its sum that comes from finished (later) blocks;
    a block solves its diagonal block (`_block_reach_fast`, else `_block_reach_exact`), then
    pushes its h to all earlier keys through its row strip (`_push`). Returns h split, the number
    of row-by-row blocks, and the carry after each block (N x B x T, split) for the forward pass.
    """
    B, T = sink_BxT.shape

    def make_block(width: int):
        def block(acc, xs):
            n, w_BxSxS, sink_BxS, emits_BxS = xs
            acc_exp_BxS, acc_man_BxS = (jax.lax.dynamic_slice_in_dim(a, n * S, S, 1) for a in acc)
            # h = 1 = (1/2) 2^1 on answer tokens; other emitting keys start from the carried sum.
            base_exp_BxS = jnp.where(sink_BxS, 1.0, jnp.where(emits_BxS, acc_exp_BxS, NEG_INF))
            base_man_BxS = jnp.where(sink_BxS, 0.5, jnp.where(emits_BxS, acc_man_BxS, 0.0))
            fast_h, trusted = _block_reach_fast(base_exp_BxS, base_man_BxS, w_BxSxS)
            h_exp_BxS, h_man_BxS = jax.lax.cond(
                trusted,
                lambda: fast_h,
                lambda: _block_reach_exact(base_exp_BxS, base_man_BxS, w_BxSxS),
            )
            strip_BxSxW = jax.lax.dynamic_slice(attn_BxTxT, (0, n * S, 0), (B, S, width))
            pushed = _push(tuple(a[:, :width] for a in acc), strip_BxSxW, h_exp_BxS, h_man_BxS)
            earlier_W = jnp.arange(width) < n * S
            acc = tuple(
                a.at[:, :width].set(jnp.where(earlier_W, new, a[:, :width]))
                for a, new in zip(acc, pushed, strict=True)
            )
            return acc, (h_exp_BxS, h_man_BxS, ~trusted, acc)

        return block

    acc0 = (jnp.full((B, T), NEG_INF), jnp.zeros((B, T)))
    xs = (jnp.arange(T // S), w_NxBxSxS, _to_blocks(sink_BxT, S), _to_blocks(emits_BxT, S))
    _, (h_exp, h_man, exact_N, beyond) = _grouped_scan(make_block, acc0, xs, S, reverse=True)
    return _from_blocks(h_exp), _from_blocks(h_man), jnp.sum(exact_N), beyond


def _injection(source_BxT, h_exp_BxT):
    """One unit of flow spread uniformly over the sources that reach the answer (ftjax decision)."""
    live_BxT = source_BxT & jnp.isfinite(h_exp_BxT)
    count_Bx1 = jnp.sum(live_BxT, axis=-1, keepdims=True)
    return jnp.where(live_BxT, 1.0 / jnp.maximum(count_Bx1, 1), 0.0).astype(jnp.float32)


def _mass_scale(last_B, older_B, mass, unit_B):
    """The factor for the last finished block's outflow that makes the flow in flight exact.

    Exact: reference + injected - absorbed since the reference boundary (`mass`: reference,
    injected count, absorbed flow and its Neumaier compensation; unit = 1 / live sources). The
    finished keys will deliver last_B (last block) + older_B. Where the difference would cancel,
    nothing is rescaled: the block carrying under 1/RESCALE_LIMIT of the older keys' flow (then
    the rescale would cost up to ~2 RESCALE_LIMIT roundings), or most flow absorbed (then this
    boundary becomes the reference, its flow in flight taken as computed). A factor off 1 by more
    than 2^-10 cannot come from rounding (it is ~1e-6) and is not applied either.
    """
    reference_B, count_B, absorbed_B, error_B = mass
    want_B = reference_B + count_B * unit_B - (absorbed_B + error_B)
    exact_B = (want_B > 0) & (absorbed_B + error_B <= want_B)
    ok_B = exact_B & (last_B > 0) & (older_B <= RESCALE_LIMIT * last_B)
    scale_B = (want_B - older_B) / jnp.where(ok_B, last_B, 1.0)
    scale_B = jnp.where(ok_B & (jnp.abs(scale_B - 1.0) <= 2.0**-10), scale_B, 1.0)
    reset = (last_B + older_B, 0.0, 0.0, 0.0)
    return scale_B, tuple(jnp.where(exact_B, x, r) for x, r in zip(mass, reset, strict=True))


def _absorb(mass, injected_B, absorbed_B):
    """Add a block's injected count and absorbed flow (Neumaier's compensated sum, both >= 0)."""
    reference_B, count_B, total_B, error_B = mass
    new_B = total_B + absorbed_B
    big_B, small_B = jnp.maximum(total_B, absorbed_B), jnp.minimum(total_B, absorbed_B)
    return reference_B, count_B + injected_B, new_B, error_B + ((big_B - new_B) + small_B)


def _flow(attn_BxTxT, wc_NxBxSxS, blocks, sink_NxBxS, beyond, S: int):
    """Forward pass: f(k) = s(k) + sum_{i<k} f(i) W'[i,k], W' <= 1 (`wc`, diagonal blocks).

    At block n's left boundary, the finished keys will still deliver g(i) beyond_n(i), g = f / h;
    `_mass_scale` rescales the last block's share so that the total is the exact flow in flight
    (module docstring, Drift). Then the block pulls its inflow (`_pull`) and solves its diagonal
    block. blocks: h exponent, h mantissa, injection, pushes (non-answer live tokens), N x B x S.
    """
    N, B, _ = sink_NxBxS.shape
    T = N * S
    unit_B = jnp.max(blocks[2], axis=(0, 2))  # the injection, 1 / (number of live sources)

    def make_block(width: int):
        key_pos_W = jnp.arange(width)

        def block(carry, xs):
            q_BxT, e_BxT, mass = carry  # f / mantissa of h and exponent of h; 0 if pushing nothing
            n, wc_BxSxS, h_exp_BxS, h_man_BxS, inj_BxS, pushes_BxS, sink_BxS, b_exp, b_man = xs
            q_BxW, e_BxW = q_BxT[:, :width], e_BxT[:, :width]
            in_flight_BxW = q_BxW * b_man[:, :width] * _pow2(b_exp[:, :width] - e_BxW)
            last_W = (key_pos_W >= (n - 1) * S) & (key_pos_W < n * S)
            last_B = jnp.sum(jnp.where(last_W, in_flight_BxW, 0.0), axis=-1)
            older_B = jnp.sum(jnp.where(last_W, 0.0, in_flight_BxW), axis=-1)
            scale_B, mass = _mass_scale(last_B, older_B, mass, unit_B)
            q_BxW = jnp.where(last_W, q_BxW * scale_B[:, None], q_BxW)
            strip_BxSxW = jax.lax.dynamic_slice(attn_BxTxT, (0, n * S, 0), (B, S, width))
            inflow_BxS = _pull(strip_BxSxW, q_BxW, e_BxW, h_exp_BxS, h_man_BxS)
            f_BxS = jax.lax.linalg.triangular_solve(
                -wc_BxSxS,
                (inj_BxS + inflow_BxS)[..., None],
                left_side=True,
                lower=False,
                transpose_a=True,
                unit_diagonal=True,
            )[..., 0]
            absorbed_B = jnp.sum(jnp.where(sink_BxS, f_BxS, 0.0), axis=-1)
            mass = _absorb(mass, jnp.sum(inj_BxS > 0, axis=-1), absorbed_B)
            # Answer tokens absorb: they push nothing.
            q_BxS = jnp.where(pushes_BxS, f_BxS / jnp.where(pushes_BxS, h_man_BxS, 1.0), 0.0)
            put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v, n * S, 1)  # noqa: E731
            q_BxT = put(q_BxT.at[:, :width].set(q_BxW), q_BxS)
            e_BxT = put(e_BxT, jnp.where(pushes_BxS, h_exp_BxS, 0.0))
            return (q_BxT, e_BxT, mass), f_BxS

        return block

    carry = (jnp.zeros((B, T)), jnp.zeros((B, T)), (jnp.zeros((B,)),) * 4)
    xs = (jnp.arange(N), wc_NxBxSxS, *blocks, sink_NxBxS, *beyond)
    _, f_NxBxS = _grouped_scan(make_block, carry, xs, S)
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

    h_exp_BxT, h_man_BxT, exact_blocks, beyond = _reach(
        attn_BxTxT, w_NxBxSxS, sink_BxT, emits_BxT, S
    )
    injection_BxT = _injection(source_BxT, h_exp_BxT)
    pushes_BxT = emits_BxT & jnp.isfinite(h_exp_BxT)
    h_exp_NxBxS, h_man_NxBxS = _to_blocks(h_exp_BxT, S), _to_blocks(h_man_BxT, S)
    wc_NxBxSxS = _conserved(
        w_NxBxSxS,
        h_exp_NxBxS[..., :, None],
        h_man_NxBxS[..., :, None],
        h_exp_NxBxS[..., None, :],
        h_man_NxBxS[..., None, :],
    )
    blocks = (h_exp_NxBxS, h_man_NxBxS, *(_to_blocks(x, S) for x in (injection_BxT, pushes_BxT)))
    f_BxT = _flow(attn_BxTxT, wc_NxBxSxS, blocks, _to_blocks(sink_BxT, S), beyond, S)
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
