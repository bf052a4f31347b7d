"""Causal self-attention through JAX's Pallas splash-attention kernel, for TPU training steps.

Dims: B batch, T tokens (queries and keys: no cache), H query heads, K key/value heads, D head
dim. The kernel is flash attention with block-sparse masks: it never builds a T x T block in
memory, forward or backward, where `jax.nn.dot_product_attention`'s XLA path builds B x H x T x T
scores in float32.

Masking is `attention.attention_mask`'s without a cache: query t sees key s when s <= t, key s is
a real token, and (sliding layers) t - s < window. Real-token masking is done with segment ids
(1 real, 0 padding): a real query then sees exactly the real keys at or before it. Padding queries
see padding keys instead of nothing; their outputs differ from the XLA path's, and no real token
ever reads them (real queries never attend to padding keys), so nothing downstream changes.

The kernel needs a sequence length that is a multiple of its 128-token blocks: shorter or ragged
lengths are padded with padding slots here and cut off after. It runs one sequence at a time
(vmapped over the batch); inside a jitted step sharded over a mesh it must see its own rows only,
so under a context mesh (`jax.sharding.use_abstract_mesh`, which `train` sets) it runs under
`jax.shard_map` with the batch split over every mesh axis (the project's layout: `sharding`).

`interpret=True` runs the same kernel through Pallas's interpreter on any backend, slowly: how the
tests check it on CPU. Its speed on a TPU has not been measured by us (no TPU so far).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

BLOCK = 128  # the kernel's smallest block; the length is padded to a multiple of it
_BLOCKS = (512, 256, BLOCK)  # the largest that divides the padded length is used


def padded_length(T: int) -> int:
    return -(-T // BLOCK) * BLOCK


@functools.lru_cache(maxsize=32)
def _kernel(T: int, heads: int, window: int | None, interpret: bool):
    """The splash kernel for one padded length, head count and window (its mask information is
    worked out on the host, once per shape)."""
    if window is None:
        one = splash.CausalMask((T, T))
    else:  # keys s with t - window < s <= t
        one = splash.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    block = next(b for b in _BLOCKS if T % b == 0)
    # one block size for every tile of the forward and both backward kernels
    tiles = ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")
    sizes = splash.BlockSizes(**{f"block_{tile}": block for tile in tiles})
    mask = splash.MultiHeadMask([one] * heads)
    # Its mask information becomes device arrays: concrete ones, even when first asked for inside
    # a trace, so that the cached kernel is no tracer of the trace that made it.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            mask=mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
        )


def splash_attention(
    q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, valid_BxT, scale: float, window, interpret: bool = False
):
    """Causal attention of B sequences, out_BxTxHxD in the queries' dtype (see the module)."""
    B, T, H, D = q_BxTxHxD.shape
    if k_BxTxKxD.shape[1] != T:
        raise ValueError(
            f"splash attention is for a forward pass without a cache: {T} queries, "
            f"{k_BxTxKxD.shape[1]} keys"
        )
    pad = padded_length(T) - T
    kernel = _kernel(T + pad, H, window, interpret)

    def one_sequence(q_TxHxD, k_TxKxD, v_TxKxD, segment_T):
        heads_first = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731 - T x N x D -> N x T x D
        ids = splash.SegmentIds(q=segment_T, kv=segment_T)
        out_HxTxD = kernel(heads_first(q_TxHxD), heads_first(k_TxKxD), heads_first(v_TxKxD), ids)
        return heads_first(out_HxTxD)

    def attend(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, valid_BxT):
        widen = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
        segment_BxT = jnp.pad(valid_BxT.astype(jnp.int32), ((0, 0), (0, pad)))
        q = widen(q_BxTxHxD * jnp.asarray(scale, q_BxTxHxD.dtype))
        out = jax.vmap(one_sequence)(q, widen(k_BxTxKxD), widen(v_BxTxKxD), segment_BxT)
        return out[:, :T]

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        rows = P(mesh.axis_names)
        attend = jax.shard_map(
            attend, mesh=mesh, in_specs=(rows, rows, rows, rows), out_specs=rows, check_vma=False
        )
    return attend(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, valid_BxT).astype(q_BxTxHxD.dtype)
