"""Decoder-only transformer in Flax NNX with FlowTracer's attention capture fused in.

Dims: B batch, T query tokens, S key slots (T without a cache, the cache length with one),
E hidden, H query heads, K key/value heads, G = H / K, D head dim, F MLP width, V vocab, L layers.

Attention and its capture live in `ftjax/models/attention.py`; this module stacks the layers.
Parameter names follow Hugging Face's (`layers[i].self_attn.q_proj`, ...), so loaders map
checkpoints one to one.

Memory for training at long T (both exact: same values and gradients):
- `logits=False` returns the final-normed hidden states instead of the B x T x V float32 logits;
  `unembed` turns any slice of them into logits (`ftjax.rl.chunked_next_token_log_probs`).
- `remat` rematerialises each decoder layer in the backward pass (`REMAT_POLICIES`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import capture as capture_lib
from ftjax.models.attention import (  # noqa: F401 (the RoPE and mask helpers: re-exported)
    ATTENTION_IMPLEMENTATIONS,
    Attention,
    apply_rope,
    attention_mask,
    check_attention_implementation,
    rope_inverse_frequencies,
)
from ftjax.models.config import ModelConfig
from ftjax.models.layers import RMSNorm, linear

# What each decoder layer keeps for the backward pass:
# - "none": everything autodiff saves (no recomputation);
# - "full": only the layer's inputs (`jax.checkpoint_policies.nothing_saveable`); the backward
#   pass reruns the whole layer;
# - "dots": the outputs of matmuls without batch dimensions, i.e. the q/k/v/o and MLP projections
#   (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`); attention scores and
#   probabilities (batched over B and heads), norms and activations are recomputed.
# XLA:CPU's default scheduler may run a recomputation early, which hides the saving (see
# tests/test_chunked_logprobs.py); the GPU and TPU pipelines keep it where the backward needs it.
REMAT_POLICIES = ("none", "full", "dots")
_CHECKPOINT_POLICY = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str) -> str:
    """`name` if it is one of `REMAT_POLICIES`, else a ValueError naming it and the known ones."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; known: {REMAT_POLICIES}")
    return name


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for S slots; slots [0, index) are filled.

    valid_BxS marks slots that hold real tokens (left padding of short prompts is invalid).
    """

    k_LxBxSxKxD: jax.Array
    v_LxBxSxKxD: jax.Array
    valid_BxS: jax.Array
    index: jax.Array

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(
            jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype),
            jnp.zeros((batch, slots), bool),
            jnp.zeros((), jnp.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """logits_BxTxV (None with `logits=False`); attn_BxTxS: the captured head-and-layer-mean map
    (None without capture); cache: the updated KV cache (None without one); hidden_BxTxE: the
    final-normed hidden states (only with `logits=False`)."""

    logits_BxTxV: jax.Array | None
    attn_BxTxS: jax.Array | None = None
    cache: KVCache | None = None
    hidden_BxTxE: jax.Array | None = None


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        E, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(E, F, cfg.mlp_bias, rngs, dtype, param_dtype)
        self.up_proj = linear(E, F, cfg.mlp_bias, rngs, dtype, param_dtype)
        self.down_proj = linear(F, E, cfg.mlp_bias, rngs, dtype, param_dtype)
        self.activation = cfg.activation

    def __call__(self, x):
        gate = self.gate_proj(x)
        act = (
            jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        )
        return self.down_proj(act * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, dtype, param_dtype):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)

        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, rngs, dtype, param_dtype)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, rngs, dtype, param_dtype)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(
        self,
        x_BxTxE,
        positions_BxT,
        slots,
        past_kv=None,
        capture_into=None,
        remat_chunks=False,
        implementation="xla",
    ):
        """Returns (x_BxTxE, map_BxTxS or None, (k, v)); the arguments are `Attention`'s."""
        h, map_BxTxS, new_kv = self.self_attn(
            self.input_layernorm(x_BxTxE),
            positions_BxT,
            slots,
            past_kv,
            capture_into,
            remat_chunks,
            implementation,
        )
        if self.sandwich:
            x_BxTxE = x_BxTxE + self.post_attention_layernorm(h)
            x_BxTxE = x_BxTxE + self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x_BxTxE))
            )
        else:
            x_BxTxE = x_BxTxE + h
            x_BxTxE = x_BxTxE + self.mlp(self.post_attention_layernorm(x_BxTxE))
        return x_BxTxE, map_BxTxS, new_kv


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.cfg = cfg
        self.dtype = dtype  # None: compute in the parameters' dtype, whatever they are cast to
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )
        self.layers = nnx.List(
            [Block(cfg, i, rngs, dtype, param_dtype) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, False, rngs, dtype, param_dtype)

    def __call__(
        self,
        tokens_BxT,
        *,
        positions_BxT=None,
        valid_BxT=None,
        capture: capture_lib.CaptureSpec = capture_lib.NONE,
        cache: KVCache | None = None,
        logits: bool = True,
        remat: str = "none",
        scan_layers: bool = False,
        attention: str = "xla",
    ) -> ForwardOutput:
        """Forward pass. Without a cache, positions default to the count of earlier valid tokens
        (left padding gets real positions); with one, tokens fill slots [index, index + T).

        logits=False: return the final-normed hidden_BxTxE instead of logits_BxTxV (`unembed`
        maps them). remat: one of `REMAT_POLICIES`, applied to each decoder layer; training
        only: anything but "none" with a cache (generation, no backward pass) is a ValueError.
        scan_layers: run each stretch of alike layers (same structure, captured or not) as one
        `jax.lax.scan` over their stacked parameters, so the program holds one copy of the layer
        per stretch instead of one per layer: compile time stops growing with depth (a 36-layer
        model compiles about as fast as a 3-layer one). Same result; without a cache only.
        attention: the implementation of the layers that do not capture (`Attention`)."""
        check_remat(remat)
        check_attention_implementation(attention)
        if scan_layers and cache is not None:
            raise ValueError("scan_layers is for a forward pass without a cache")
        if remat != "none" and cache is not None:
            raise ValueError(f"remat={remat!r} is for training; with a cache it must be 'none'")
        tokens_BxT, valid_BxT = _checked_inputs(tokens_BxT, valid_BxT, self.cfg.vocab_size)
        positions_BxT, slots = self._positions_and_slots(valid_BxT, positions_BxT, cache)
        captured = capture_lib.captured_layers(capture, self.cfg.num_layers)
        x_BxTxE = self.embed_tokens(tokens_BxT)
        if self.dtype is None:
            # nnx.Embed fixed its output dtype to the parameters' dtype when it was built
            # (float32 master weights); parameters cast later (train.policy_model's bfloat16)
            # must set the residual stream's dtype, or every layer computes in float32.
            x_BxTxE = x_BxTxE.astype(self.embed_tokens.embedding.dtype)
        if self.cfg.scale_embeddings:
            x_BxTxE = x_BxTxE * jnp.asarray(math.sqrt(self.cfg.hidden_size), x_BxTxE.dtype)
        if scan_layers:
            x_BxTxE, attn_BxTxS = self._scanned_blocks(
                x_BxTxE, positions_BxT, slots, valid_BxT, captured, remat, attention
            )
            new_kv = None
        else:
            x_BxTxE, attn_BxTxS, new_kv = self._blocks(
                x_BxTxE, positions_BxT, slots, valid_BxT, captured, cache, remat, attention
            )
        new_cache = None if cache is None else _updated_cache(cache, new_kv, slots[1])
        hidden_BxTxE = self.norm(x_BxTxE)
        if not logits:
            return ForwardOutput(None, attn_BxTxS, new_cache, hidden_BxTxE=hidden_BxTxE)
        return ForwardOutput(self.unembed(hidden_BxTxE), attn_BxTxS, new_cache)

    def unembed(self, hidden_BxTxE) -> jax.Array:
        """float32 logits B x T x V of final-normed hidden states (any B, T): the lm_head or the
        tied embedding, then the final logit softcap if the model has one."""
        if self.cfg.tie_embeddings and self.dtype is None:  # the parameters' dtype, as above
            embedding_VxE = self.embed_tokens.embedding[...]
            logits_BxTxV = jnp.dot(hidden_BxTxE.astype(embedding_VxE.dtype), embedding_VxE.T)
        elif self.cfg.tie_embeddings:
            logits_BxTxV = self.embed_tokens.attend(hidden_BxTxE)
        else:
            logits_BxTxV = self.lm_head(hidden_BxTxE)
        logits_BxTxV = logits_BxTxV.astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        return jnp.tanh(logits_BxTxV / cap) * cap if cap else logits_BxTxV

    def _positions_and_slots(self, valid_BxT, positions_BxT, cache):
        """positions_BxT (default: see `__call__`) and slots = (query_slot_BxT, key_valid_BxS):
        the cache slots the queries fill, and which of all S slots hold real keys."""
        B, T = valid_BxT.shape
        if positions_BxT is None:
            offset_Bx1 = 0 if cache is None else jnp.sum(cache.valid_BxS, -1, keepdims=True)
            positions_BxT = offset_Bx1 + jnp.maximum(jnp.cumsum(valid_BxT, axis=-1) - 1, 0)
        slots = T if cache is None else cache.valid_BxS.shape[1]
        context = self.cfg.max_position_embeddings
        if slots > context:
            raise ValueError(f"sequence of {slots} tokens exceeds the model's context of {context}")
        index = 0 if cache is None else cache.index
        query_slot_BxT = jnp.broadcast_to(index + jnp.arange(T), (B, T))
        if cache is None:
            return positions_BxT, (query_slot_BxT, valid_BxT)
        key_valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_BxT, index, 1)
        return positions_BxT, (query_slot_BxT, key_valid_BxS)

    def _blocks(self, x_BxTxE, positions_BxT, slots, valid_BxT, captured, cache, remat, attention):
        """Every block in order: (x_BxTxE, attn_BxTxS or None, each layer's new (k, v)).

        One map serves all captured layers, each adding its valid rows' head mean / L in place,
        so capture costs one B x T x S map however many layers it reads."""
        attn_BxTxS, row_weight_BxT = _empty_map(slots, valid_BxT, captured)
        new_kv = []
        for i, layer in enumerate(self.layers):
            past_kv = None
            if cache is not None:  # this step's keys and values go to slots [index, index + T)
                past_kv = (cache.k_LxBxSxKxD[i], cache.v_LxBxSxKxD[i], cache.index)
            into = (attn_BxTxS, row_weight_BxT) if i in captured else None
            block = layer if remat == "none" else _rematerialised(layer, remat)
            x_BxTxE, map_BxTxS, kv = block(
                x_BxTxE, positions_BxT, slots, past_kv, into, implementation=attention
            )
            attn_BxTxS = attn_BxTxS if map_BxTxS is None else map_BxTxS
            new_kv.append(kv)
        return x_BxTxE, attn_BxTxS, new_kv

    def _scanned_blocks(self, x_BxTxE, positions_BxT, slots, valid_BxT, captured, remat, attention):
        """`_blocks` without a cache, each stretch of alike layers as one scan: (x_BxTxE,
        attn_BxTxS or None). The layers' parameters are stacked inside the traced call (a copy
        of the stretch's parameters, each layer's slice read back by the scan)."""
        attn_BxTxS, row_weight_BxT = _empty_map(slots, valid_BxT, captured)
        for start, stop in _alike_stretches(self.layers, captured):
            graphdef = nnx.split(self.layers[start])[0]
            states = [nnx.split(self.layers[i])[1] for i in range(start, stop)]
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
            is_captured = start in captured

            def body(carry, state, graphdef=graphdef, is_captured=is_captured):
                x_BxTxE, attn_BxTxS = carry
                into = (attn_BxTxS, row_weight_BxT) if is_captured else None
                x_BxTxE, map_BxTxS, _ = nnx.merge(graphdef, state)(
                    x_BxTxE,
                    positions_BxT,
                    slots,
                    None,
                    into,
                    remat_chunks=remat != "none",
                    implementation=attention,
                )
                return (x_BxTxE, attn_BxTxS if map_BxTxS is None else map_BxTxS), None

            if remat != "none":
                body = jax.checkpoint(body, policy=_CHECKPOINT_POLICY[remat], prevent_cse=False)
            (x_BxTxE, attn_BxTxS), _ = jax.lax.scan(body, (x_BxTxE, attn_BxTxS), stacked)
        return x_BxTxE, attn_BxTxS


def _empty_map(slots, valid_BxT, captured):
    """(the zero B x T x S map the captured layers add into, each valid row's weight 1 / L), or
    (None, None) when no layer is captured."""
    if not captured:
        return None, None
    query_slot_BxT, key_valid_BxS = slots
    attn_BxTxS = jnp.zeros(query_slot_BxT.shape + key_valid_BxS.shape[1:], jnp.float32)
    return attn_BxTxS, valid_BxT.astype(jnp.float32) * (1.0 / len(captured))


def _alike_stretches(layers, captured) -> list[tuple[int, int]]:
    """[(start, stop)]: maximal runs of consecutive layers with the same structure (graphdef:
    sliding vs full attention, ...) and the same capture, in order."""
    kinds = [(nnx.split(layer)[0], i in captured) for i, layer in enumerate(layers)]
    stretches = []
    for i, kind in enumerate(kinds):
        if stretches and kinds[stretches[-1][0]] == kind:
            stretches[-1] = (stretches[-1][0], i + 1)
        else:
            stretches.append((i, i + 1))
    return stretches


def _rematerialised(block: Block, remat: str):
    """`block`'s call as a pure function of its parameters under `jax.checkpoint` with the named
    policy (an explicit split/merge rather than `nnx.remat`: the block has no state to update).
    The captured map it returns is already under stop_gradient, so it adds no residual; the
    captured attention also recomputes its query chunks one at a time in the backward pass, so
    no B x H x T x S probabilities are kept even while the layer itself is recomputed."""
    graphdef, state = nnx.split(block)

    def call(state, implementation, *args):
        return nnx.merge(graphdef, state)(*args, remat_chunks=True, implementation=implementation)

    checkpointed = jax.checkpoint(call, policy=_CHECKPOINT_POLICY[remat], static_argnums=(1,))
    return lambda *args, implementation="xla": checkpointed(state, implementation, *args)


def _updated_cache(cache: KVCache, new_kv, key_valid_BxS) -> KVCache:
    """The cache with every layer's new keys/values in slots [index, index + T)."""
    k_LxBxTxKxD = jnp.stack([k for k, _ in new_kv]).astype(cache.k_LxBxSxKxD.dtype)
    v_LxBxTxKxD = jnp.stack([v for _, v in new_kv]).astype(cache.v_LxBxSxKxD.dtype)
    return KVCache(
        jax.lax.dynamic_update_slice_in_dim(cache.k_LxBxSxKxD, k_LxBxTxKxD, cache.index, 2),
        jax.lax.dynamic_update_slice_in_dim(cache.v_LxBxSxKxD, v_LxBxTxKxD, cache.index, 2),
        key_valid_BxS,
        cache.index + k_LxBxTxKxD.shape[2],
    )


def _checked_inputs(tokens_BxT, valid_BxT, vocab_size: int):
    """(tokens_BxT, valid_BxT) as arrays, valid defaulting to all True. Token ids must be in the
    vocabulary: checked on the host when concrete (so a concrete array closed over by a jitted
    function is checked too)."""
    if not jnp.issubdtype(jnp.result_type(tokens_BxT), jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {jnp.result_type(tokens_BxT)}")
    if not isinstance(tokens_BxT, jax.core.Tracer) and np.size(tokens_BxT):
        host = np.asarray(tokens_BxT)  # NumPy: a jnp.min would be traced inside a jit
        low, high = int(host.min()), int(host.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{low}, {high}]")
    tokens_BxT = jnp.asarray(tokens_BxT)
    if tokens_BxT.ndim != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tokens_BxT.shape}")
    B, T = tokens_BxT.shape
    valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
    if valid_BxT.shape != (B, T):
        raise ValueError(f"valid mask shape {valid_BxT.shape} != tokens shape {(B, T)}")
    return tokens_BxT, valid_BxT
