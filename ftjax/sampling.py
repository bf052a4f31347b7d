"""Rollouts: jitted prefill + KV-cache decode with temperature / top-k / top-p and per-sequence EOS.

Dims: B batch, P prompt slots (left-padded), N new tokens, V vocab.

The returned log-probs are the policy's own (temperature 1, no truncation) log-softmax of each
sampled token, i.e. what a full re-forward of prompt + response gives; they are the "old" log-probs
of the RL ratio. A sequence's length counts its tokens up to and including its EOS; later tokens
are `pad_id` with log-prob 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax.models.transformer import KVCache, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64  # response slots
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k truncation
    top_p: float = 1.0  # nucleus sampling mass; 1 means no truncation
    eos_ids: tuple[int, ...] = ()  # tokens that end a response (experiments set them)
    pad_id: int = 0  # token after a response's end (experiments set it)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    tokens_BxN: jax.Array
    log_probs_BxN: jax.Array
    lengths_B: jax.Array
    done_B: jax.Array  # the sequence emitted an EOS


def _truncated_logits(logits_BxV, cfg: SamplingConfig):
    logits_BxV = logits_BxV / cfg.temperature
    if cfg.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, cfg.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if cfg.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        keep_BxV = mass_before_BxV < cfg.top_p  # the smallest prefix whose mass reaches top_p
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def choose(logits_BxV, rng, cfg: SamplingConfig):
    """The next token: argmax at temperature 0, else a draw from the truncated distribution."""
    if cfg.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, _truncated_logits(logits_BxV, cfg)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _generate(graphdef, state, prompt_BxP, prompt_valid_BxP, rng, cfg: SamplingConfig):
    model = nnx.merge(graphdef, state)
    B, P = prompt_BxP.shape
    N = cfg.max_new_tokens
    cache = KVCache.empty(model.cfg, B, P + N, dtype=model.embed_tokens.embedding.get_value().dtype)
    out = model(prompt_BxP, valid_BxT=prompt_valid_BxP, cache=cache)
    eos_E = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)

    def step(carry):
        i, logits_BxV, cache, rng, done_B, lengths_B, tokens_BxN, logp_BxN = carry
        rng, key = jax.random.split(rng)
        token_B = choose(logits_BxV, key, cfg)
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, -1), token_B[:, None], -1)[:, 0]
        live_B = ~done_B
        tokens_BxN = tokens_BxN.at[:, i].set(jnp.where(live_B, token_B, cfg.pad_id))
        logp_BxN = logp_BxN.at[:, i].set(jnp.where(live_B, logp_B, 0.0))
        done_B = done_B | (live_B & jnp.isin(token_B, eos_E))
        lengths_B = lengths_B + live_B
        nxt = model(token_B[:, None], valid_BxT=live_B[:, None], cache=cache)
        return (
            i + 1,
            nxt.logits_BxTxV[:, -1],
            nxt.cache,
            rng,
            done_B,
            lengths_B,
            tokens_BxN,
            logp_BxN,
        )

    def running(carry):
        return (carry[0] < N) & ~jnp.all(carry[4])

    carry = (
        jnp.zeros((), jnp.int32),
        out.logits_BxTxV[:, -1],
        out.cache,
        rng,
        jnp.zeros((B,), bool),
        jnp.zeros((B,), jnp.int32),
        jnp.full((B, N), cfg.pad_id, jnp.int32),
        jnp.zeros((B, N), jnp.float32),
    )
    *_, done_B, lengths_B, tokens_BxN, logp_BxN = jax.lax.while_loop(running, step, carry)
    return Rollout(tokens_BxN, logp_BxN, lengths_B, done_B)


def generate(model: Transformer, prompt_BxP, prompt_valid_BxP, rng, cfg: SamplingConfig) -> Rollout:
    """Sample `cfg.max_new_tokens` continuations of left-padded prompts (one jit per shape)."""
    prompt_BxP = jnp.asarray(prompt_BxP, jnp.int32)
    prompt_valid_BxP = jnp.asarray(prompt_valid_BxP, bool)
    if prompt_BxP.ndim != 2 or prompt_valid_BxP.shape != prompt_BxP.shape:
        raise ValueError(
            f"prompt tokens {prompt_BxP.shape} and valid mask "
            f"{prompt_valid_BxP.shape} must both be (B, P)"
        )
    total = prompt_BxP.shape[1] + cfg.max_new_tokens
    if total > model.cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({prompt_BxP.shape[1]}) + max_new_tokens "
            f"({cfg.max_new_tokens}) = {total} exceeds the model's context of "
            f"{model.cfg.max_position_embeddings}"
        )
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt_BxP, prompt_valid_BxP, rng, cfg)
