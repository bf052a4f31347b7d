"""Decoder-only transformer in Flax NNX with FlowTracer's attention capture fused in.

Dims: B batch, T query tokens, S key slots (T without a cache, the cache length with one),
E hidden, H query heads, K key/value heads, G = H / K, D head dim, F MLP width, V vocab, L layers.

Captured layers compute explicit softmax probabilities one query chunk at a time and add each
chunk's head mean, under stop_gradient, to the one B x T x S map carried across the layers (the
running layer mean); the other layers use `jax.nn.dot_product_attention`, which may dispatch to a
fused kernel. Parameter names follow Hugging Face's (`layers[i].self_attn.q_proj`, ...), so
loaders map checkpoints one to one.
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
    """logits_BxTxV; attn_BxTxS: captured head-and-layer-mean map (None without capture);
    layer_attn_LxBxTxS: per captured layer head means (capture.per_layer); head_probs_LxBxHxTxS:
    every layer's per-head probabilities (debug_probs only); cache: the updated KV cache."""

    logits_BxTxV: jax.Array
    attn_BxTxS: jax.Array | None = None
    layer_attn_LxBxTxS: jax.Array | None = None
    head_probs_LxBxHxTxS: jax.Array | None = None
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
        self.weight = nnx.Param(
            jnp.zeros(dim, param_dtype) if plus_one else jnp.ones(dim, param_dtype)
        )
        self.eps, self.plus_one = eps, plus_one

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight.get_value().astype(jnp.float32)
        return (normed * (1.0 + w if self.plus_one else w)).astype(x.dtype)


def _linear(cfg_in: int, cfg_out: int, bias: bool, rngs: nnx.Rngs, dtype, param_dtype):
    return nnx.Linear(
        cfg_in,
        cfg_out,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(0.02),
        rngs=rngs,
    )


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
        self.qk_norm, self.scale, self.softcap = (
            cfg.qk_norm,
            cfg.attention_scale,
            cfg.attn_logit_softcap,
        )

    def __call__(
        self,
        x_BxTxE,
        positions_BxT,
        query_slot_BxT,
        key_valid_BxS,
        kv=None,
        mode: str = "fused",
        capture=None,
    ):
        """Returns (out_BxTxE, extra, (k, v) for the cache slots of this step). Queries sit in
        slots query_slot_BxT and attend over the real keys of slots [0, S) (`attention_mask`).

        mode "fused": `jax.nn.dot_product_attention` (may be a fused kernel), extra None;
        "capture": explicit softmax in query chunks; capture = (map_BxTxS, row_weight_BxT) and
        extra = map_BxTxS plus each query row's head-mean probabilities times its weight;
        "debug": explicit, extra = per-head probabilities B x H x T x S.
        """
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
        k_BxSxKxD, v_BxSxKxD = (k_BxTxKxD, v_BxTxKxD) if kv is None else kv(k_BxTxKxD, v_BxTxKxD)
        new_kv = (k_BxTxKxD, v_BxTxKxD)
        if mode == "fused" and not self.softcap:
            out = jax.nn.dot_product_attention(
                q_BxTxHxD,
                k_BxSxKxD,
                v_BxSxKxD,
                mask=self._mask(query_slot_BxT, key_valid_BxS)[:, None],
                scale=self.scale,
            )
            return self.o_proj(out.reshape(B, T, H * D)), None, new_kv
        q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
        if mode == "debug":
            mask_BxTxS = self._mask(query_slot_BxT, key_valid_BxS)
            out, probs_BxKxGxTxS = self._explicit(q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxTxS)
            extra = probs_BxKxGxTxS.reshape(B, H, T, -1)
        else:
            out, extra = self._chunked(
                q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, query_slot_BxT, key_valid_BxS, *capture
            )
        return self.o_proj(out.reshape(B, T, H * D)), extra, new_kv

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

    def _chunked(
        self,
        q_BxTxKxGxD,
        k_BxSxKxD,
        v_BxSxKxD,
        query_slot_BxT,
        key_valid_BxS,
        map_BxTxS,
        row_weight_BxT,
    ):
        """Explicit attention one query chunk at a time, adding each chunk's weighted head mean to
        map_BxTxS in place: the working set is B x H x C x S, not B x H x T x S.

        A loop, not unrolled chunks: XLA:CPU's default (concurrency-optimised) scheduler runs
        independent chunks side by side and so keeps all their probabilities alive at once. The
        loop's buffer starts as the queries and takes each chunk's output in place of its rows: a
        zero-filled output buffer would be hoisted to the start of the program and held through
        every earlier layer. Each chunk builds its own mask rows, so no T x S mask is kept alive."""

        def rows(start, size, carry):
            qo_BxTxKxGxD, map_BxTxS = carry
            q_BxCxKxGxD = jax.lax.dynamic_slice_in_dim(qo_BxTxKxGxD, start, size, axis=1)
            query_slot_BxC = jax.lax.dynamic_slice_in_dim(query_slot_BxT, start, size, axis=1)
            mask_BxCxS = self._mask(query_slot_BxC, key_valid_BxS)
            out, probs_BxKxGxCxS = self._explicit(q_BxCxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxCxS)
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
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_plus_one, param_dtype)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, rngs, dtype, param_dtype)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(cfg, rngs, dtype, param_dtype)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def __call__(self, x_BxTxE, positions_BxT, slots, kv=None, mode="fused", capture=None):
        """slots = (query_slot_BxT, key_valid_BxS), see `Attention`."""
        h, extra, new_kv = self.self_attn(
            self.input_layernorm(x_BxTxE), positions_BxT, *slots, kv, mode, capture
        )
        if self.sandwich:
            x_BxTxE = x_BxTxE + self.post_attention_layernorm(h)
            x_BxTxE = x_BxTxE + self.post_feedforward_layernorm(
                self.mlp(self.pre_feedforward_layernorm(x_BxTxE))
            )
        else:
            x_BxTxE = x_BxTxE + h
            x_BxTxE = x_BxTxE + self.mlp(self.post_attention_layernorm(x_BxTxE))
        return x_BxTxE, extra, new_kv


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
        debug_probs: bool = False,
    ) -> ForwardOutput:
        """Forward pass. Without a cache, positions default to the count of earlier valid tokens
        (left padding gets real positions); with one, tokens fill slots [index, index + T)."""
        cfg = self.cfg
        _check_tokens(tokens_BxT, cfg.vocab_size)
        tokens_BxT = jnp.asarray(tokens_BxT)
        if tokens_BxT.ndim != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tokens_BxT.shape}")
        B, T = tokens_BxT.shape
        valid_BxT = jnp.ones((B, T), bool) if valid_BxT is None else jnp.asarray(valid_BxT, bool)
        if valid_BxT.shape != (B, T):
            raise ValueError(f"valid mask shape {valid_BxT.shape} != tokens shape {(B, T)}")
        if positions_BxT is None:
            offset_Bx1 = 0 if cache is None else jnp.sum(cache.valid_BxS, -1, keepdims=True)
            positions_BxT = offset_Bx1 + jnp.maximum(jnp.cumsum(valid_BxT, axis=-1) - 1, 0)
        slots = T if cache is None else cache.valid_BxS.shape[1]
        if slots > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {slots} tokens exceeds the model's context of "
                f"{cfg.max_position_embeddings}"
            )
        index = 0 if cache is None else cache.index
        query_slot_BxT = jnp.broadcast_to(index + jnp.arange(T), (B, T))
        key_valid_BxS = (
            valid_BxT
            if cache is None
            else jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, valid_BxT, index, 1)
        )
        captured = capture_lib.captured_layers(capture, cfg.num_layers)
        x_BxTxE = self.embed_tokens(tokens_BxT)
        if cfg.scale_embeddings:
            x_BxTxE = x_BxTxE * jnp.asarray(math.sqrt(cfg.hidden_size), x_BxTxE.dtype)
        # One map for all captured layers, each layer adding its valid rows' head mean / L in place.
        valid_rows_BxT = valid_BxT.astype(jnp.float32)
        layer_weight = 1.0 / max(len(captured), 1)
        attn_BxTxS = jnp.zeros((B, T, slots), jnp.float32) if captured else None
        layer_maps, head_probs, new_k, new_v = [], [], [], []
        for i, layer in enumerate(self.layers):
            kv = None
            if cache is not None:

                def kv(k, v, i=i):  # write this step's keys/values, attend over all slots
                    return (
                        jax.lax.dynamic_update_slice_in_dim(cache.k_LxBxSxKxD[i], k, index, 1),
                        jax.lax.dynamic_update_slice_in_dim(cache.v_LxBxSxKxD[i], v, index, 1),
                    )

            mode = "debug" if debug_probs else "capture" if i in captured else "fused"
            into = None
            if mode == "capture":  # per_layer: the layer's own map, folded into the mean below
                into = (
                    (jnp.zeros_like(attn_BxTxS), valid_rows_BxT)
                    if capture.per_layer
                    else (attn_BxTxS, valid_rows_BxT * layer_weight)
                )
            x_BxTxE, extra, (k, v) = layer(
                x_BxTxE, positions_BxT, (query_slot_BxT, key_valid_BxS), kv, mode, into
            )
            new_k.append(k)
            new_v.append(v)
            if debug_probs:
                head_probs.append(extra)
            if i not in captured:
                continue
            if mode == "capture" and not capture.per_layer:
                attn_BxTxS = extra  # the layer added its rows in place
                continue
            layer_map_BxTxS = extra
            if debug_probs:
                head_mean_BxTxS = jnp.mean(extra, axis=1) * valid_rows_BxT[:, :, None]
                layer_map_BxTxS = jax.lax.stop_gradient(head_mean_BxTxS)
            if capture.per_layer:
                layer_maps.append(layer_map_BxTxS)
            attn_BxTxS = attn_BxTxS + layer_map_BxTxS * layer_weight
        x_BxTxE = self.norm(x_BxTxE)
        if cfg.tie_embeddings:
            logits_BxTxV = self.embed_tokens.attend(x_BxTxE)
        else:
            logits_BxTxV = self.lm_head(x_BxTxE)
        logits_BxTxV = logits_BxTxV.astype(jnp.float32)
        if cfg.final_logit_softcap:
            logits_BxTxV = (
                jnp.tanh(logits_BxTxV / cfg.final_logit_softcap) * cfg.final_logit_softcap
            )
        new_cache = None
        if cache is not None:
            put = lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new, index, 2)  # noqa: E731
            new_cache = KVCache(
                put(cache.k_LxBxSxKxD, jnp.stack(new_k).astype(cache.k_LxBxSxKxD.dtype)),
                put(cache.v_LxBxSxKxD, jnp.stack(new_v).astype(cache.v_LxBxSxKxD.dtype)),
                key_valid_BxS,
                cache.index + T,
            )
        return ForwardOutput(
            logits_BxTxV=logits_BxTxV,
            attn_BxTxS=attn_BxTxS,
            layer_attn_LxBxTxS=jnp.stack(layer_maps) if layer_maps else None,
            head_probs_LxBxHxTxS=jnp.stack(head_probs) if head_probs else None,
            cache=new_cache,
        )


def _check_tokens(tokens_BxT, vocab_size: int) -> None:
    """Dtype always; the id range when the tokens are concrete (checked on the host, so a
    concrete array closed over by a jitted function is checked too)."""
    if not jnp.issubdtype(jnp.result_type(tokens_BxT), jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {jnp.result_type(tokens_BxT)}")
    if isinstance(tokens_BxT, jax.core.Tracer) or np.size(tokens_BxT) == 0:
        return
    host = np.asarray(tokens_BxT)
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{low}, {high}]")
