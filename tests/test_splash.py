"""Splash attention (`ftjax/models/splash.py`), run by Pallas's interpreter on CPU: the TPU kernel's
math against a float64 loop, its gradient against the XLA path's, and the training step with it
against the step with the XLA path, on one device and sharded over a mesh.

Dims: B batch, T tokens, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_chunked_logprobs import model_parts, random_tokens
from test_microbatch import MODEL, cfg_for, grads_on_mesh, make_batch

from ftjax import mesh_step, rl, sharding, state_init, train
from ftjax.models import transformer
from ftjax.models.attention import attention_mask, check_attention_implementation
from ftjax.models.splash import padded_length, splash_attention
from ftjax.models.transformer import KVCache

B, T, H, K, D = 2, 40, 4, 2, 8  # T not a multiple of the kernel's 128-token block


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, n, D)).astype(np.float32) for n in (H, K, K))
    valid = np.ones((B, T), bool)
    valid[0, :5] = False  # left padding
    valid[1, 30:] = False  # right padding
    valid[1, 12] = False  # a hole in the middle
    return q, k, v, valid


def loop_attention(q, k, v, valid, scale, window):
    """Float64, one query at a time: softmax over the real keys at or before it (and within the
    window); rows of padding queries are left at 0 (no real token reads them)."""
    out = np.zeros(q.shape, np.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // K)  # the key/value head this query head shares
            for t in range(T):
                if not valid[b, t]:
                    continue
                keys = [
                    s for s in range(t + 1) if valid[b, s] and (window is None or t - s < window)
                ]
                logits = np.array([scale * q[b, t, h] @ k[b, s, g] for s in keys], np.float64)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, t, h] = sum(
                    pi * v[b, s, g].astype(np.float64) for pi, s in zip(p, keys, strict=True)
                )
    return out


@pytest.mark.parametrize("window", [None, 7])
def test_splash_matches_a_float64_loop_on_real_rows(window):
    q, k, v, valid = inputs()
    got = splash_attention(*map(jnp.asarray, (q, k, v, valid)), 0.3, window, interpret=True)
    want = loop_attention(q, k, v, valid, 0.3, window)
    assert got.shape == (B, T, H, D) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=2e-6)


def xla_attention(q, k, v, valid, scale, window):
    slots = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(slots, jnp.arange(T), valid, window)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")


@pytest.mark.parametrize("window", [None, 7])
def test_splash_gradient_matches_the_xla_path(window):
    """The kernel's own backward pass (flash-style, recomputing probabilities block by block)
    against autodiff of XLA's attention, for a loss that reads the real rows only."""
    q, k, v, valid = map(jnp.asarray, inputs(1))
    w = jnp.asarray(np.random.default_rng(2).standard_normal((B, T, H, D)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, valid, 0.3, window) * w * valid[:, :, None, None])

    splash = lambda *a: splash_attention(*a, interpret=True)  # noqa: E731
    got = jax.grad(functools.partial(loss, splash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, xla_attention), argnums=(0, 1, 2))(q, k, v)
    for g, x in zip(got, want, strict=True):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(x), atol=1e-5 * float(jnp.abs(x).max())
        )


def test_padded_length_is_the_next_block():
    assert [padded_length(t) for t in (1, 127, 128, 129, 1280)] == [128, 128, 128, 256, 1280]


# The step with splash attention in every layer that does not capture, against the XLA path on
# one device: sharded over (2, 4) with micro-batches, remat and scanned layers (shard_map inside
# the scan, under remat), and on one device without them.
@pytest.mark.parametrize(
    ("knobs", "shape"),
    [
        ({"micro_batch": 1, "remat": "full", "scan_layers": True}, (2, 4)),
        ({}, (1, 1)),
    ],
)
def test_step_gradient_with_splash_equals_the_xla_path(knobs, shape):
    batch, base = make_batch(), cfg_for("seq-mean-token-mean")
    want_grads, want_aux = grads_on_mesh(base, batch, (1, 1))
    cfg = dataclasses.replace(base, attention="splash_interpret", **knobs)
    got_grads, got_aux = grads_on_mesh(cfg, batch, shape)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        scale = float(np.max(np.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale)
    # Each response token's log-prob, entropy and gamma. Not the other columns: a prompt's first
    # token is scored from the padding column before it, whose output differs by design (module
    # docstring of splash.py) and is read by no loss.
    response = np.asarray(batch.response_mask_BxT)
    for got, want in zip(got_aux, want_aux, strict=True):
        np.testing.assert_allclose(np.asarray(got)[response], np.asarray(want)[response], atol=1e-5)


def test_splash_off_tpu_and_with_a_cache_are_refused():
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="'splash' is a TPU kernel; JAX's backend here is"):
            check_attention_implementation("splash", jnp.float32)
    assert train.StepConfig(attention="splash").attention == "splash"  # no dtype: any backend
    q, k, v, valid = map(jnp.asarray, inputs())
    longer = jnp.zeros((B, T + 1, K, D))
    with pytest.raises(ValueError, match="without a cache: 40 queries, 41 keys"):
        splash_attention(q, longer, longer, valid, 1.0, None, interpret=True)
    model = nnx.merge(*model_parts("qwen3-untied"))
    cache = KVCache.empty(model.cfg, 2, 11)
    with pytest.raises(
        ValueError, match="'splash_interpret' is for a forward pass without a cache"
    ):
        model(random_tokens(), cache=cache, attention="splash_interpret")


def test_on_a_mesh_the_kernel_runs_under_shard_map_on_its_own_rows():
    """On a TPU the kernel is a custom call XLA cannot partition, so the sharded step must hand
    it each device's rows itself (the interpreter above would be partitioned by XLA either way;
    this reads the program instead)."""
    batch = make_batch()
    cfg = dataclasses.replace(cfg_for("seq-mean-token-mean"), attention="splash_interpret")
    model = transformer.Transformer(MODEL, rngs=nnx.Rngs(0))
    graphdef, state = state_init.init_state(model, cfg, jax.random.PRNGKey(0))
    adv = rl.group_advantages(batch.rewards_B, cfg.group_size)

    key = jax.random.PRNGKey(1)
    passes = {  # every forward the loop runs with the step's attention
        "grads": lambda p, mesh: train.batch_grads(graphdef, p, batch, adv, cfg, key, mesh),
        "prepare": lambda p, mesh: train.forward_credit(graphdef, p, batch, cfg, key, mesh),
        "reference": lambda p, mesh: mesh_step.response_log_probs(graphdef, p, batch, cfg, mesh),
    }
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 4))
    rows = "P(('data', 'fsdp'),)"
    for name, fn in passes.items():
        sharded = str(jax.make_jaxpr(lambda p, fn=fn: fn(p, mesh))(state.params))
        single = str(jax.make_jaxpr(lambda p, fn=fn: fn(p, None))(state.params))
        assert "shard_map" in sharded and "shard_map" not in single, name
        # the queries, keys, values and segment ids split over every mesh axis (before them,
        # the kernel's mask tables, replicated)
        assert f"{rows}, {rows}, {rows}, {rows})" in sharded, name
