"""Self-attention of one decoder layer, with FlowTracer's attention capture fused in.

Dims: B batch, T query tokens, C a chunk of queries, S key slots (T without a cache, the cache
length with one), E hidden, H query heads, K key/value heads, G = H / K, D head dim.

Captured layers compute explicit softmax probabilities one query chunk at a time and add each
chunk's head mean, under stop_gradient, to the one B x T x S map carried across the layers (the
running layer mean); the other layers use `jax.nn.dot_product_attention`, which may dispatch to a
fused kernel, or on TPU the Pallas splash kernel (`splash.py`); layers with soft-capped logits take
the chunked path too, since neither caps.
Queries and keys are rotated by RoPE (Hugging Face's half-split layout, Llama-3 scaling).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models.config import SLIDING, ModelConfig, RopeScaling
from ftjax.models.layers import RMSNorm, linear
from ftjax.models.splash import splash_attention

_MASKED = -1e30  # finite, so fully masked (padding) query rows give no NaN
_QUERY_CHUNK = 128  # captured layers materialise B x H x 128 x S probabilities at a time


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


# "splash": JAX's Pallas splash-attention kernel (TPU); "splash_interpret": the same kernel run
# by Pallas's interpreter on any backend, slowly (how the tests check it on CPU). `splash.py`.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash", "splash_interpret")
SPLASH = ("splash", "splash_interpret")


def check_attention_implementation(name: str, dtype=None) -> str:
    """`name` if it is a known implementation (and, given a dtype, one cuDNN accepts and one
    this backend runs), else a ValueError naming the problem."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; known: {ATTENTION_IMPLEMENTATIONS}"
        )
    if name == "splash" and dtype is not None and jax.default_backend() != "tpu":
        raise ValueError(
            f"attention implementation 'splash' is a TPU kernel; JAX's backend here is "
            f"{jax.default_backend()!r} (use 'xla', or 'splash_interpret' to check it slowly)"
        )
    if (
        name == "cudnn"
        and dtype is not None
        and jnp.dtype(dtype)
        not in (
            jnp.bfloat16,
            jnp.float16,
        )
    ):
        raise ValueError(
            f"attention implementation 'cudnn' needs bfloat16 or float16 queries, got "
            f"{jnp.dtype(dtype)} (train with --step.compute_dtype bfloat16)"
        )
    if name == "cudnn" and dtype is not None and jax.default_backend() != "gpu":
        raise ValueError(
            f"attention implementation 'cudnn' needs an NVIDIA GPU; JAX's backend here is "
            f"{jax.default_backend()!r} (use 'xla')"
        )
    return name


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, dtype, param_dtype):
        E, H, K, D = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = lambda i, o, b: linear(i, o, b, rngs, dtype, param_dtype)  # noqa: E731
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

    def __call__(
        self,
        x_BxTxE,
        positions_BxT,
        slots,
        past_kv=None,
        capture_into=None,
        remat_chunks=False,
        implementation: str = "xla",
    ):
        """Returns (out_BxTxE, map_BxTxS or None, this step's (k_BxTxKxD, v_BxTxKxD)).

        slots: (query_slot_BxT, key_valid_BxS): queries sit in slots query_slot_BxT and attend
        over the real keys of slots [0, S) (`attention_mask`). past_kv: (k_BxSxKxD, v_BxSxKxD,
        index), this layer's cache, which gets this step's keys at [index, index + T); None: S = T.
        capture_into: (map_BxTxS, row_weight_BxT): explicit softmax in query chunks, returning
        map_BxTxS plus each row's head-mean probabilities times its weight. None: no map, and
        `jax.nn.dot_product_attention` unless logits are soft-capped, which it cannot do.
        remat_chunks: the explicit path recomputes each query chunk's probabilities in the
        backward pass instead of keeping B x H x T x S of them (set under layer remat).
        implementation: that of the layers that do not capture: `jax.nn.dot_product_attention`'s
        "xla" (every backend) or "cudnn" (cuDNN flash attention; NVIDIA GPUs, bfloat16 or
        float16 only, checked here with an error naming the dtype), or "splash" (TPU) /
        "splash_interpret" (`splash.splash_attention`; without a cache only)."""
        B, T, _ = x_BxTxE.shape
        H, K, D = self.heads, self.kv_heads, self.head_dim
        q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = self._project(x_BxTxE, positions_BxT)
        k_BxSxKxD, v_BxSxKxD = k_BxTxKxD, v_BxTxKxD
        if past_kv is not None:
            past_k_BxSxKxD, past_v_BxSxKxD, index = past_kv
            # The cache may be stored narrower (bf16 parameters) than the rotated keys (float32):
            # written in its dtype, read back in the keys'.
            k_BxSxKxD = jax.lax.dynamic_update_slice_in_dim(
                past_k_BxSxKxD, k_BxTxKxD.astype(past_k_BxSxKxD.dtype), index, 1
            ).astype(k_BxTxKxD.dtype)
            v_BxSxKxD = jax.lax.dynamic_update_slice_in_dim(
                past_v_BxSxKxD, v_BxTxKxD.astype(past_v_BxSxKxD.dtype), index, 1
            ).astype(v_BxTxKxD.dtype)
        if capture_into is None and not self.softcap and implementation in SPLASH:
            check_attention_implementation(implementation, q_BxTxHxD.dtype)
            if past_kv is not None:
                raise ValueError(
                    f"attention implementation {implementation!r} is for a forward pass without "
                    "a cache (training); generate with 'xla'"
                )
            interpret = implementation == "splash_interpret"
            out = splash_attention(
                q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, slots[1], self.scale, self.window, interpret
            )
            map_BxTxS = None
        elif capture_into is None and not self.softcap:
            mask_Bx1xTxS = self._mask(*slots)[:, None]
            check_attention_implementation(implementation, q_BxTxHxD.dtype)
            out = jax.nn.dot_product_attention(
                q_BxTxHxD,
                k_BxSxKxD,
                v_BxSxKxD,
                mask=mask_Bx1xTxS,
                scale=self.scale,
                implementation=implementation,
            )
            map_BxTxS = None
        else:
            q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
            out, map_BxTxS = self._chunked(
                q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, slots, capture_into, remat_chunks
            )
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

    def _chunked(self, q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD, slots, capture_into, remat_chunks):
        """Explicit attention one query chunk at a time, adding each chunk's weighted head mean to
        map_BxTxS in place: the working set is B x H x C x S, not B x H x T x S.

        A loop, not unrolled chunks: XLA:CPU's default (concurrency-optimised) scheduler runs
        independent chunks side by side and so keeps all their probabilities alive at once. The
        loop's buffer starts as the queries and takes each chunk's output in place of its rows: a
        zero-filled output buffer would be hoisted to the start of the program and held through
        every earlier layer. Each chunk builds its own mask rows, so no T x S mask is kept alive.
        Without capture_into (a soft-capped layer that is not captured) the map stays None.
        With remat_chunks each chunk's attention is under `jax.checkpoint`: the backward pass
        keeps only the chunk's queries and mask rows (the slices and in-place updates of the loop
        carry need no residuals) and recomputes its probabilities."""
        query_slot_BxT, key_valid_BxS = slots
        map_BxTxS, row_weight_BxT = (None, None) if capture_into is None else capture_into

        def attend(q_BxCxKxGxD, k_BxSxKxD, v_BxSxKxD, query_slot_BxC):
            mask_BxCxS = self._mask(query_slot_BxC, key_valid_BxS)
            out, probs_BxKxGxCxS = self._explicit(q_BxCxKxGxD, k_BxSxKxD, v_BxSxKxD, mask_BxCxS)
            return out, jax.lax.stop_gradient(jnp.mean(probs_BxKxGxCxS, axis=(1, 2)))

        attend = jax.checkpoint(attend) if remat_chunks else attend

        def rows(start, size, carry):
            qo_BxTxKxGxD, map_BxTxS = carry
            q_BxCxKxGxD = jax.lax.dynamic_slice_in_dim(qo_BxTxKxGxD, start, size, axis=1)
            query_slot_BxC = jax.lax.dynamic_slice_in_dim(query_slot_BxT, start, size, axis=1)
            out, head_mean_BxCxS = attend(q_BxCxKxGxD, k_BxSxKxD, v_BxSxKxD, query_slot_BxC)
            if map_BxTxS is None:  # not captured (soft-capped logits): the output only
                return jax.lax.dynamic_update_slice_in_dim(qo_BxTxKxGxD, out, start, axis=1), None
            weight_BxC = jax.lax.dynamic_slice_in_dim(row_weight_BxT, start, size, axis=1)
            old_BxCxS = jax.lax.dynamic_slice_in_dim(map_BxTxS, start, size, axis=1)
            new_BxCxS = old_BxCxS + head_mean_BxCxS * weight_BxC[:, :, None]
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


def attention_mask(query_slot_BxT, key_slot_S, key_valid_BxS, window: int | None):
    """Causal over slots, real keys only, and within `window` slots for sliding layers."""
    lag_BxTxS = query_slot_BxT[:, :, None] - key_slot_S[None, None, :]
    mask_BxTxS = (lag_BxTxS >= 0) & key_valid_BxS[:, None, :]
    if window is not None:
        mask_BxTxS &= lag_BxTxS < window
    return mask_BxTxS
