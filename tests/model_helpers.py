"""Test-only views into the Transformer that the library does not return: every layer's per-head
attention probabilities, and each layer's own captured head-mean map.

Dims: B batch, T tokens, S key slots, L layers, H heads.

The library returns only what FlowTracer reads, the head-and-layer mean of the captured layers.
- `head_probs`: per-head probabilities come from `Attention.head_probs`, a small public pure
  method of the layer (its own projections, qk-norm, RoPE, mask and logit softcap, unchunked, all
  T rows at once). We chose that over re-deriving queries and keys here: nothing about the
  architecture is re-implemented in the tests. This helper only feeds it, running the model's own
  submodules layer by layer (embedding, each block's input norm, each block on the fused path).
  It computes every row at once, so it is an independent reference for the chunked capture.
- `layer_maps`: a layer's own head-mean map is what the library captures when asked for that
  layer alone (`CaptureSpec(mode="layers", layers=(i,))`), one forward pass per layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.capture import CaptureSpec
from ftjax.models.transformer import Transformer


def head_probs(model: Transformer, tokens_BxT, valid_BxT=None) -> jax.Array:
    """Every layer's per-head probabilities, L x B x H x T x T, of a forward without a cache at
    the model's default positions (the count of earlier valid tokens). Padded query rows are
    undefined (they attend to nothing) and padded keys get no mass."""
    tokens_BxT = jnp.asarray(tokens_BxT)
    B, T = tokens_BxT.shape
    valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
    positions_BxT = jnp.maximum(jnp.cumsum(valid_BxT, axis=-1) - 1, 0)
    slots = (jnp.broadcast_to(jnp.arange(T), (B, T)), valid_BxT)
    x_BxTxE = model.embed_tokens(tokens_BxT)
    if model.cfg.scale_embeddings:
        x_BxTxE = x_BxTxE * jnp.asarray(math.sqrt(model.cfg.hidden_size), x_BxTxE.dtype)
    probs = []
    for block in model.layers:
        normed_BxTxE = block.input_layernorm(x_BxTxE)
        probs.append(block.self_attn.head_probs(normed_BxTxE, positions_BxT, slots))
        x_BxTxE, _, _ = block(x_BxTxE, positions_BxT, slots)
    return jnp.stack(probs)


def layer_maps(run: Callable[[CaptureSpec], jax.Array], layers: Iterable[int]) -> np.ndarray:
    """Each of `layers`' own head-mean map, stacked in the given order (L x B x T x S).

    run(spec) runs the forward pass(es) under test capturing only `spec`'s one layer and returns
    the captured map (e.g. `out.attn_BxTxS`, or a decode's steps joined along T)."""
    return np.stack([np.asarray(run(CaptureSpec(mode="layers", layers=(i,)))) for i in layers])
