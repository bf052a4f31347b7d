"""Decoder-only transformer in Flax NNX with FlowTracer's attention capture fused in.

Dims: B batch, T query tokens, S key slots (T without a cache, the cache length with one),
E hidden, H query heads, K key/value heads, G = H / K, D head dim, F MLP width, V vocab, L layers.

Captured layers compute explicit softmax probabilities one query chunk at a time and add each
chunk's head mean, under stop_gradient, to the one B x T x S map carried across the layers (the
running layer mean); the other layers use `jax.nn.dot_product_attention`, which may dispatch to a
fused kernel (layers with soft-capped logits take the chunked path too, since it cannot cap).
Parameter names follow Hugging Face's (`layers[i].self_attn.q_proj`, ...), so loaders map
checkpoints one to one.

Length: ~425 lines, over the house ~400, because the chunked capture loop and its memory notes
sit next to the layer they belong to; the next cut would be attention into its own module.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import capture as capture_lib
from ftjax.models.config import SLIDING, ModelConfig, RopeScaling

_MASKED = -1e30  # finite, so fully masked (padding) query rows give no NaN
_QUERY_CHUNK = 128  # captured layers materialise B x H x 128 x S probabilities at a time


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
    """logits_BxTxV; attn_BxTxS: the captured head-and-layer-mean map (None without capture);
    cache: the updated KV cache (None without one)."""

    logits_BxTxV: jax.Array
    attn_BxTxS: jax.Array | None = None
    cache: KVCache | None = None


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None):
    """RoPE inverse frequencies (D/2,), with Llama-3's frequency-dependent scaling if given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    old = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = old / scaling.low_freq_factor, old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxTxNxD, positions_BxT, inv_freq):
    """Rotate pairs (d, d + D/2) by position * frequency (the Hugging Face layout)."""
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTx1xD = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTx1xD), jnp.sin(angles_BxTx1xD)
    half = x_BxTxNxD.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxD[..., half:], x_BxTxNxD[..., :half]], axis=-1)
    return x_BxTxNxD * cos.astype(x_BxTxNxD.dtype) + rotated * sin.astype(x_BxTxNxD.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * w, or * (1 + w) for Gemma; computed in float32."""

    def __init__(self, dim: int, eps: float, plus_one: bool, param_dtype=jnp.float32):
        init = jnp.zeros if plus_one else jnp.ones  # Gemma's 1 + w starts at 1 too
        self.weight = nnx.Param(init(dim, param_dtype))
        self.eps, self.plus_one = eps, plus_one

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight.get_value().astype(jnp.float32)
        return (normed * (1.0 + w if self.plus_one else w)).astype(x.dtype)


def _linear(cfg_in: int, cfg_out: int, bias: bool, rngs: nnx.Rngs, dtype, param_dtype):
    init = nnx.initializers.normal(0.02)
    kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    return nnx.Linear(cfg_in, cfg_out, **kw)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, dtype, param_dtype):
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = lambda i, o, b: _linear(i, o, b, rngs, dtype, param_dtype)  # noqa: E731
        self.q_proj = lin(E, H * D, cfg.attention_bias)
        self.k_proj = lin(E, K * D, cfg.attention_bias)
        self.v_proj = lin(E, K * D, cfg.attention_bias)
        self.o_proj = lin(H * D, E, cfg.output_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)
        sliding = cfg.layer_type(layer) == SLIDING
        self.window = cfg.sliding_window if sliding else None
        self.rope_theta = (
            cfg.rope_local_theta if sliding and cfg.rope_local_theta else cfg.rope_theta
        )
        self.rope_scaling = None if sliding else cfg.rope_scaling
        self.heads, self.kv_heads, self.head_dim = H, K, D
        self.qk_norm, self.scale = cfg.qk_norm, cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap

    def __call__(self, x_BxTxE, positions_BxT, slots, past_kv=None, capture_into=None):
        """Returns (out_BxTxE, map_BxTxS or None, this step's (k_BxTxKxD, v_BxTxKxD)).

        slots: (query_slot_BxT, key_valid_BxS): queries sit in slots query_slot_BxT and attend
        over the real keys of slots [0, S) (`attention_mask`). past_kv: (k_BxSxKxD, v_BxSxKxD,
        index), this layer's cache, which gets this step's keys at [index, index + T); None: S = T.
        capture_into: (map_BxTxS, row_weight_BxT): explicit softmax in query chunks, returning
        map_BxTxS plus each row's head-mean probabilities times its weight. None: no map, and
        `jax.nn.dot_product_attention` unless logits are soft-capped, which it cannot do."""
        B, T, _ = x_BxTxE.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = self._project(x_BxTxE, positions_BxT)
        k_BxSxKxD, v_BxSxKxD = k_BxTxKxD, v_BxTxKxD
        if past_kv is not None:
            past_k_BxSxKxD, past_v_BxSxKxD, index = past_kv
            k_BxSxKxD = jax.lax.dynamic_update_slice_in_dim(past_k_BxSxKxD, k_BxTxKxD, index, 1)
            v_BxSxKxD = jax.lax.dynamic_update_slice_in_dim(past_v_BxSxKxD, v_BxTxKxD, index, 1)
        if capture_into is None and not self.softcap:
            mask_Bx1xTxS = self._mask(*slots)[:, None]
            out = jax.nn.dot_product_attention(
                q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask_Bx1xTxS, scale=self.scale
            )
            map_BxTxS = None
        else:
            q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
            out, map_BxTxS = self._chunked(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, slots, capture_into)
        return self.o_proj(out.reshape(B, T, H * D)), map_BxTxS, (k_BxTxKxD, v_BxTxKxD)

    def head_probs(self, x_BxTxE, positions_BxT, slots):
        """Per-head probabilities B x H x T x S, all at once, without a cache: a reference for
        tests and analysis (the forward pass never materialises them)."""
        B, T, _ = x_BxTxE.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = self._project(x_BxTxE, positions_BxT)
        q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
        _, probs_BxKxGxTxS = self._explicit(q_BxTxKxGxD, k_BxTxKxD, v_BxTxKxD, self._mask(*slots))
        return probs_BxKxGxTxS.reshape(B, H, T, -1)

    def _project(self, x_BxTxE, positions_BxT):
        """Queries, keys and values of this step: normed (qk_norm) and rotated."""
        B, T, _ = x_BxTxE.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q_BxTxHxD = self.q_proj(x_BxTxE).reshape(B, T, H, D)
        k_BxTxKxD = self.k_proj(x_BxTxE).reshape(B, T, K, D)
        v_BxTxKxD = self.v_proj(x_BxTxE).reshape(B, T, K, D)
        if self.qk_norm:
            q_BxTxHxD, k_BxTxKxD = self.q_norm(q_BxTxHxD), self.k_norm(k_BxTxKxD)
        inv_freq = rope_inverse_frequencies(D, self.rope_theta, self.rope_scaling)
        q_BxTxHxD = apply_rope(q_BxTxHxD, positions_BxT, inv_freq)
        k_BxTxKxD = apply_rope(k_BxTxKxD, positions_BxT, inv_freq)
        return q_BxTxHxD, k_BxTxKxD, v_BxTxKxD

    def _mask(self, query_slot_BxT, key_valid_BxS):
        key_slot_S = jnp.arange(key_valid_BxS.shape[1])
        return attention_mask(query_slot_BxT, key_slot_S, key_valid_BxS, self.window)

    def _explicit(self, q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS):
        logits = self.scale * jnp.einsum(
            "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
        )
        if self.softcap:
            logits = jnp.tanh(logits / self.softcap) * self.softcap
        logits = jnp.where(mask_BxTxS[:, None, None], logits, _MASKED)
        probs_BxKxGxTxS = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS.astype(v_BxSxKxD.dtype), v_BxSxKxD)
        return out, probs_BxKxGxTxS

    def _chunked(self, q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, slots, capture_into):
        """Explicit attention one query chunk at a time, adding each chunk's weighted head mean to
        map_BxTxS in place: the working set is B x H x C x S, not B x H x T x S.

        A loop, not unrolled chunks: XLA:CPU's default (concurrency-optimised) scheduler runs
        independent chunks side by side and so keeps all their probabilities alive at once. The
        loop's buffer starts as the queries and takes each chunk's output in place of its rows: a
        zero-filled output buffer would be hoisted to the start of the program and held through
        every earlier layer. Each chunk builds its own mask rows, so no T x S mask is kept alive.
        Without capture_into (a soft-capped layer that is not captured) the map stays None."""
        query_slot_BxT, key_valid_BxS = slots
        map_BxTxS, row_weight_BxT = (None, None) if capture_into is None else capture_into

        def rows(start, size, carry):
            qo_BxTxKxGxD, map_BxTxS = carry
            q_BxCxKxGxD = jax.lax.dynamic_slice_in_dim(qo_BxTxKxGxD, start, size, axis=1)
            query_slot_BxC = jax.lax.dynamic_slice_in_dim(query_slot_BxT, start, size, axis=1)
            mask_BxCxS = self._mask(query_slot_BxC, key_valid_BxS)
            out, probs_BxKxGxCxS = self._explicit(q_BxCxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxCxS)
            if map_BxTxS is None:  # not captured (soft-capped logits): the output only
                return jax.lax.dynamic_update_slice_in_dim(qo_BxTxKxGxD, out, start, axis=1), None
            weight_BxC = jax.lax.dynamic_slice_in_dim(row_weight_BxT, start, size, axis=1)
            head_mean_BxCxS = jnp.mean(probs_BxKxGxCxS, axis=(1, 2)) * weight_BxC[:, :, None]
            old_BxCxS = jax.lax.dynamic_slice_in_dim(map_BxTxS, start, size, axis=1)
            new_BxCxS = old_BxCxS + jax.lax.stop_gradient(head_mean_BxCxS)
            return (
                jax.lax.dynamic_update_slice_in_dim(qo_BxTxKxGxD, out, start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(map_BxTxS, new_BxCxS, start, axis=1),
            )

        T = q_BxTxKxGxD.shape[1]
        C = min(_QUERY_CHUNK, T)
        full = T // C
        carry = jax.lax.fori_loop(
            0, full, lambda j, carry: rows(j * C, C, carry), (q_BxTxKxGxD, map_BxTxS)
        )
        if T % C:
            carry = rows(full * C, T % C, carry)
        return carry


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dtype, param_dtype):
        E, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(E, F, cfg.mlp_bias, rngs, dtype, param_dtype)
        self.up_proj = _linear(E, F, cfg.mlp_bias, rngs, dtype, param_dtype)
        self.down_proj = _linear(F, E, cfg.mlp_bias, rngs, dtype, param_dtype)
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

    def __call__(self, x_BxTxE, positions_BxT, slots, past_kv=None, capture_into=None):
        """Returns (x_BxTxE, map_BxTxS or None, (k, v)); the arguments are `Attention`'s."""
        h, map_BxTxS, new_kv = self.self_attn(
            self.input_layernorm(x_BxTxE), positions_BxT, slots, past_kv, capture_into
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


def attention_mask(query_slot_BxT, key_slot_S, key_valid_BxS, window: int | None):
    """Causal over slots, real keys only, and within `window` slots for sliding layers."""
    lag_BxTxS = query_slot_BxT[:, :, None] - key_slot_S[None, None, :]
    mask_BxTxS = (lag_BxTxS >= 0) & key_valid_BxS[:, None, :]
    if window is not None:
        mask_BxTxS &= lag_BxTxS < window
    return mask_BxTxS


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.cfg = cfg
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
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, rngs, dtype, param_dtype)

    def __call__(
        self,
        tokens_BxT,
        *,
        positions_BxT=None,
        valid_BxT=None,
        capture: capture_lib.CaptureSpec = capture_lib.NONE,
        cache: KVCache | None = None,
    ) -> ForwardOutput:
        """Forward pass. Without a cache, positions default to the count of earlier valid tokens
        (left padding gets real positions); with one, tokens fill slots [index, index + T)."""
        tokens_BxT, valid_BxT = _checked_inputs(tokens_BxT, valid_BxT, self.cfg.vocab_size)
        positions_BxT, slots = self._positions_and_slots(valid_BxT, positions_BxT, cache)
        captured = capture_lib.captured_layers(capture, self.cfg.num_layers)
        x_BxTxE = self.embed_tokens(tokens_BxT)
        if self.cfg.scale_embeddings:
            x_BxTxE = x_BxTxE * jnp.asarray(math.sqrt(self.cfg.hidden_size), x_BxTxE.dtype)
        x_BxTxE, attn_BxTxS, new_kv = self._blocks(
            x_BxTxE, positions_BxT, slots, valid_BxT, captured, cache
        )
        new_cache = None if cache is None else _updated_cache(cache, new_kv, slots[1])
        return ForwardOutput(
            logits_BxTxV=self._logits(x_BxTxE), attn_BxTxS=attn_BxTxS, cache=new_cache
        )

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

    def _blocks(self, x_BxTxE, positions_BxT, slots, valid_BxT, captured, cache):
        """Every block in order: (x_BxTxE, attn_BxTxS or None, each layer's new (k, v)).

        One map serves all captured layers, each adding its valid rows' head mean / L in place,
        so capture costs one B x T x S map however many layers it reads."""
        query_slot_BxT, key_valid_BxS = slots
        attn_BxTxS = row_weight_BxT = None
        if captured:
            attn_BxTxS = jnp.zeros(query_slot_BxT.shape + key_valid_BxS.shape[1:], jnp.float32)
            row_weight_BxT = valid_BxT.astype(jnp.float32) * (1.0 / len(captured))
        new_kv = []
        for i, layer in enumerate(self.layers):
            past_kv = None
            if cache is not None:  # this step's keys and values go to slots [index, index + T)
                past_kv = (cache.k_LxBxSxKxD[i], cache.v_LxBxSxKxD[i], cache.index)
            into = (attn_BxTxS, row_weight_BxT) if i in captured else None
            x_BxTxE, map_BxTxS, kv = layer(x_BxTxE, positions_BxT, slots, past_kv, into)
            attn_BxTxS = attn_BxTxS if map_BxTxS is None else map_BxTxS
            new_kv.append(kv)
        return x_BxTxE, attn_BxTxS, new_kv

    def _logits(self, x_BxTxE):
        x_BxTxE = self.norm(x_BxTxE)
        if self.cfg.tie_embeddings:
            logits_BxTxV = self.embed_tokens.attend(x_BxTxE)
        else:
            logits_BxTxV = self.lm_head(x_BxTxE)
        logits_BxTxV = logits_BxTxV.astype(jnp.float32)
        cap = self.cfg.final_logit_softcap
        return jnp.tanh(logits_BxTxV / cap) * cap if cap else logits_BxTxV


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
