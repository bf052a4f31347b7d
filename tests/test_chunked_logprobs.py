"""Memory features of the training forward: chunked log-probs (`rl.chunked_next_token_log_probs`
with `Transformer.unembed`) and per-layer rematerialisation (`Transformer(..., remat=...)`).

Both must be exact: the references are the plain paths (full logits, no remat) and, for the
log-probs, the float64 loops of tests/reference_rl.py. The memory claims are checked on XLA's
compiled memory plan (`memory_analysis().temp_size_in_bytes`), a property of the program, not a
timing.

Dims: B batch, T tokens, E hidden, V vocab, C chunk.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_rl as ref
from flax import nnx

from ftjax import rl
from ftjax.capture import NONE, CaptureSpec
from ftjax.models.config import FULL, SLIDING, tiny
from ftjax.models.transformer import REMAT_POLICIES, KVCache, Transformer, check_remat

B, T = 2, 11
# Float32 values of the same math in another order (chunked matmuls, the embedding gradient
# summed chunk by chunk, recomputed layers fused differently) differ by a few float32 ulps.
TOL = 1e-6
MODELS = {
    "qwen3-untied": dict(family="qwen3"),
    "qwen3-tied": dict(family="qwen3", tie_embeddings=True),
    "gemma3-softcap": dict(family="gemma3", final_logit_softcap=3.0),  # gemma3 tiny is tied
}


@functools.cache
def model_parts(name: str, num_layers: int = 1):
    """(graphdef, params) of a tiny model with every parameter moved off its init, so that norms
    and biases matter and logits are O(1)."""
    kw = dict(MODELS[name], num_layers=num_layers)
    if kw["family"] == "gemma3":  # its sliding/full pattern, ending in a full layer
        kw["layer_types"] = (SLIDING,) * (num_layers - 1) + (FULL,)
    model = Transformer(tiny(kw.pop("family"), **kw), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    noise = lambda x: x + 0.15 * rng.standard_normal(x.shape, np.float32)  # noqa: E731
    nnx.update(model, jax.tree.map(noise, nnx.state(model, nnx.Param)))
    return nnx.split(model, nnx.Param)


def random_tokens(vocab: int = 128, shape=(B, T), seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def assert_trees_close(actual, expected, tol=TOL):
    """Leaf by leaf, within tol relative to the leaf's largest magnitude (gradients of different
    parameters live on different scales)."""
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=str(path))


def scalar_of(logp_BxT, entropy_BxT):
    """A loss that weighs every position differently, so a misplaced position shows."""
    w_BxT = jnp.linspace(0.5, 1.5, logp_BxT.size).reshape(logp_BxT.shape)
    return jnp.mean(w_BxT * logp_BxT) + 0.3 * jnp.mean(w_BxT[:, ::-1] * entropy_BxT)


# ------------------------------------------------------------------ chunked log-probs


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])  # 3, 4 do not divide T - 1 = 10; 10, 64 >= it
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_log_probs_match_float64_reference(chunk, softcap):
    rng = np.random.default_rng(5)
    E, V = 8, 13
    hidden = rng.standard_normal((B, T, E)).astype(np.float32)
    w_ExV = rng.standard_normal((E, V)).astype(np.float32)
    tokens = random_tokens(V)

    def unembed(h_BxCxE):
        logits_BxCxV = h_BxCxE @ w_ExV
        return jnp.tanh(logits_BxCxV / softcap) * softcap if softcap else logits_BxCxV

    logp, entropy = rl.chunked_next_token_log_probs(jnp.asarray(hidden), tokens, unembed, chunk)
    logits64 = hidden.astype(np.float64) @ w_ExV.astype(np.float64)
    if softcap:
        logits64 = np.tanh(logits64 / softcap) * softcap
    want_logp, want_entropy = ref.token_log_probs(logits64[:, :-1], np.asarray(tokens)[:, 1:])
    assert logp.shape == entropy.shape == (B, T)
    np.testing.assert_array_equal(np.asarray(logp[:, 0]), 0.0)  # nothing predicts token 0
    np.testing.assert_array_equal(np.asarray(entropy[:, 0]), 0.0)
    np.testing.assert_allclose(np.asarray(logp[:, 1:]), want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy[:, 1:]), want_entropy, rtol=1e-5, atol=1e-5)


def test_chunked_log_probs_of_one_token_are_zero():
    hidden = jnp.ones((B, 1, 4))
    tokens = jnp.zeros((B, 1), jnp.int32)
    got = rl.chunked_next_token_log_probs(hidden, tokens, lambda h: h @ jnp.ones((4, 5)), 2)
    want = rl.next_token_log_probs(jnp.zeros((B, 1, 5)), tokens)
    assert_trees_close(got, want, tol=0.0)


@pytest.mark.parametrize("chunk", [0, -3, 2.0, True, None])
def test_bad_chunk_is_named(chunk):
    hidden, tokens = jnp.ones((B, T, 4)), jnp.zeros((B, T), jnp.int32)
    with pytest.raises(ValueError, match=rf"chunk must be an integer >= 1, got {chunk!r}"):
        rl.chunked_next_token_log_probs(hidden, tokens, lambda h: h, chunk)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def loss_and_grad(graphdef, params, tokens, chunk, remat="none"):
    """value_and_grad over nnx params of scalar_of(log-probs, entropy), merged inside the loss
    as ftjax/train.py does; chunk None: full logits and `next_token_log_probs`."""

    def loss(params):
        model = nnx.merge(graphdef, params)
        if chunk is None:
            out = model(tokens, remat=remat)
            logp, entropy = rl.next_token_log_probs(out.logits_BxTxV, tokens)
        else:
            out = model(tokens, logits=False, remat=remat)
            logp, entropy = rl.chunked_next_token_log_probs(
                out.hidden_BxTxE, tokens, model.unembed, chunk
            )
        return scalar_of(logp, entropy), (logp, entropy)

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize(
    # qwen3-tied in the slow suite only (CI time): gemma3 ties its embeddings too.
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "qwen3-tied" else n for n in MODELS],
)
def test_chunked_values_and_gradients_equal_full_logits(name):
    graphdef, params = model_parts(name)
    tokens = random_tokens()
    want = loss_and_grad(graphdef, params, tokens, None)
    unembedding = "lm_head" if "lm_head" in want[1] else "embed_tokens"
    assert float(jnp.max(jnp.abs(jax.tree.leaves(want[1][unembedding])[0]))) > 0
    for chunk in (1, 4, 64):  # of T - 1 = 10 predicted positions: each alone, 4 + 4 + 2, all
        assert_trees_close(loss_and_grad(graphdef, params, tokens, chunk), want)


def test_logits_false_returns_the_hidden_states_unembed_maps():
    model = nnx.merge(*model_parts("gemma3-softcap"))
    tokens = random_tokens()
    full = model(tokens)
    hidden = model(tokens, logits=False)
    assert full.hidden_BxTxE is None and hidden.logits_BxTxV is None
    assert hidden.hidden_BxTxE.shape == (B, T, model.cfg.hidden_size)
    np.testing.assert_array_equal(
        np.asarray(model.unembed(hidden.hidden_BxTxE)), np.asarray(full.logits_BxTxV)
    )


def test_chunked_log_probs_plan_no_full_logits():
    """value_and_grad over (params, hidden) of the unembedding alone: with full logits XLA plans
    several B x T x V float32 arrays; chunked, a few B x C x V ones, the same at 2T."""
    E, V, chunk = 64, 32000, 16
    graphdef, params = nnx.split(
        Transformer(tiny("qwen3", vocab_size=V, hidden_size=E, num_layers=1), rngs=nnx.Rngs(0)),
        nnx.Param,
    )

    def temp_bytes(chunk, length):
        def loss(params, hidden_BxTxE, tokens_BxT):
            model = nnx.merge(graphdef, params)
            if chunk is None:
                return scalar_of(*rl.next_token_log_probs(model.unembed(hidden_BxTxE), tokens_BxT))
            return scalar_of(
                *rl.chunked_next_token_log_probs(hidden_BxTxE, tokens_BxT, model.unembed, chunk)
            )

        args = (
            jax.ShapeDtypeStruct((B, length, E), jnp.float32),
            jax.ShapeDtypeStruct((B, length), jnp.int32),
        )
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(params, *args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    length = 512
    logits_bytes = B * length * V * 4
    full, chunked = temp_bytes(None, length), temp_bytes(chunk, length)
    print(
        f"temp MiB: full {full / 2**20:.1f}, chunked {chunked / 2**20:.1f}, "
        f"B x T x V logits {logits_bytes / 2**20:.1f}"
    )
    assert full >= logits_bytes
    assert chunked < logits_bytes / 4
    assert abs(temp_bytes(chunk, 2 * length) - chunked) < logits_bytes / 32


# ------------------------------------------------------------------ rematerialisation


def test_remat_names_are_checked():
    assert all(check_remat(name) == name for name in REMAT_POLICIES)
    for bad in ("all", "None", ""):
        with pytest.raises(ValueError, match=rf"unknown remat policy {bad!r}.*'none', 'full'"):
            check_remat(bad)
    model = nnx.merge(*model_parts("qwen3-untied"))
    with pytest.raises(ValueError, match="'everything'"):
        model(random_tokens(), remat="everything")


def test_attention_implementations_are_checked_before_any_work():
    model = nnx.merge(*model_parts("qwen3-untied"))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        model(random_tokens(), attention="flash")
    with pytest.raises(ValueError, match="'cudnn' needs bfloat16 or float16 queries, got float32"):
        model(random_tokens(), attention="cudnn")  # a float32 model
    if jax.default_backend() != "gpu":
        graphdef, params = model_parts("qwen3-untied")
        bf16 = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), params))
        with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
            bf16(random_tokens(), attention="cudnn")
    # "xla" is the default: the same numbers, exactly
    tokens = random_tokens()
    np.testing.assert_array_equal(
        np.asarray(model(tokens, attention="xla").logits_BxTxV),
        np.asarray(model(tokens).logits_BxTxV),
    )


def test_remat_with_a_cache_is_refused():
    model = nnx.merge(*model_parts("qwen3-untied"))
    cache = KVCache.empty(model.cfg, B, T)
    with pytest.raises(ValueError, match="remat='full' is for training"):
        model(random_tokens(), cache=cache, remat="full")


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def remat_loss_and_grad(graphdef, params, tokens, remat, capture):
    """value_and_grad of a scalar of the logits and the captured map (the map carries no
    gradient, but a wrong one would show in the value)."""

    def loss(params):
        out = nnx.merge(graphdef, params)(tokens, capture=capture, remat=remat)
        logp, entropy = rl.next_token_log_probs(out.logits_BxTxV, tokens)
        attn = jnp.zeros(()) if out.attn_BxTxS is None else jnp.mean(out.attn_BxTxS**2)
        return scalar_of(logp, entropy) + attn, (out.logits_BxTxV, out.attn_BxTxS)

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize(
    "capture", [NONE, CaptureSpec(mode="layers", layers=(1,))], ids=["no-capture", "capture"]
)
@pytest.mark.parametrize(
    # gemma3 (soft-capped, sandwich norms) in the slow suite only, for CI time: the remat wrapper
    # is the same code for every family.
    "name",
    ["qwen3-untied", pytest.param("gemma3-softcap", marks=pytest.mark.slow)],
)
def test_remat_equals_no_remat(name, capture):
    graphdef, params = model_parts(name, num_layers=2)
    tokens = random_tokens()
    want = remat_loss_and_grad(graphdef, params, tokens, "none", capture)
    assert (want[0][1][1] is None) == (capture is NONE)
    for remat in ("full", "dots"):
        assert_trees_close(remat_loss_and_grad(graphdef, params, tokens, remat, capture), want)


def test_remat_and_chunked_log_probs_together_equal_the_plain_path():
    """What a long-context training step runs: both features at once."""
    graphdef, params = model_parts("qwen3-tied", num_layers=2)
    tokens = random_tokens()
    want = loss_and_grad(graphdef, params, tokens, None)
    assert_trees_close(loss_and_grad(graphdef, params, tokens, 4, "full"), want)


REMAT_MEMORY = """
import json, jax, jax.numpy as jnp
from flax import nnx
from ftjax import rl
from ftjax.capture import NONE, CaptureSpec
from ftjax.models.config import FULL, SLIDING, tiny
from ftjax.models.transformer import REMAT_POLICIES, Transformer

graphdef, params = nnx.split(Transformer(tiny("qwen3", num_layers=4), rngs=nnx.Rngs(0)), nnx.Param)
tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
result = {}
for capture in (NONE, CaptureSpec(mode="layers", layers=(1, 3))):
    for remat in REMAT_POLICIES:
        def loss(params, tokens):
            out = nnx.merge(graphdef, params)(tokens, capture=capture, remat=remat)
            logp, _ = rl.next_token_log_probs(out.logits_BxTxV, tokens)
            return jnp.mean(logp)
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
        result[f"{capture.mode}/{remat}"] = compiled.memory_analysis().temp_size_in_bytes
print("RESULT " + json.dumps(result))
"""


def test_remat_lowers_planned_memory():
    """Temporaries of value_and_grad of a 4-layer model at T = 256: rematerialising every layer
    keeps only its inputs for the backward pass, so the plan shrinks.

    Planned in a subprocess with XLA:CPU's memory-minimising scheduler: the default one is
    concurrency-optimised and runs a layer's recomputation as early as it can (XLA:CPU deletes
    the optimisation barriers `jax.checkpoint` adds), which keeps every layer's residuals alive
    again. The recomputation is in the program either way; GPU and TPU keep the barriers."""
    root = pathlib.Path(__file__).resolve().parents[1]
    flags = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    )
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", REMAT_MEMORY],
        cwd=root,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    temp = json.loads(line[len("RESULT ") :])
    print({key: f"{value / 2**20:.1f} MiB" for key, value in temp.items()})
    for mode in ("none", "layers"):
        none, full, dots = (temp[f"{mode}/{remat}"] for remat in REMAT_POLICIES)
        assert full < 0.65 * none, (mode, temp)
        assert full <= dots < 0.8 * none, (mode, temp)


def test_captured_chunks_are_recomputed_under_remat():
    """A captured layer's explicit attention keeps B x H x T x S probabilities for the backward
    pass, one chunk per loop step; under layer remat (`remat_chunks`) each chunk is recomputed
    instead. Same output and gradient; the plan drops by at least those probabilities' size."""
    cfg = tiny(
        "qwen3", num_layers=1, num_heads=8, num_kv_heads=2, head_dim=16, max_position_embeddings=512
    )
    attention = Transformer(cfg, rngs=nnx.Rngs(0)).layers[0].self_attn
    graphdef, params = nnx.split(attention)
    Bm, Tm = 2, 512
    x = jax.random.normal(jax.random.PRNGKey(0), (Bm, Tm, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(Tm), (Bm, Tm))
    slots = (positions, jnp.ones((Bm, Tm), bool))
    into = (jnp.zeros((Bm, Tm, Tm)), jnp.full((Bm, Tm), 0.5))

    def loss(params, x, remat_chunks):
        out, map_BxTxS, _ = nnx.merge(graphdef, params)(
            x, positions, slots, capture_into=into, remat_chunks=remat_chunks
        )
        return jnp.sum(out**2) + jnp.sum(map_BxTxS**2)

    results, temp = {}, {}
    for remat_chunks in (False, True):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
        results[remat_chunks] = fn(params, x, remat_chunks)
        temp[remat_chunks] = fn.lower(params, x, remat_chunks).compile().memory_analysis()
    assert_trees_close(results[True], results[False])
    probs_bytes = Bm * cfg.num_heads * Tm * Tm * 4
    saved = temp[False].temp_size_in_bytes - temp[True].temp_size_in_bytes
    assert saved >= probs_bytes, (saved, probs_bytes)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def scan_loss_and_grad(graphdef, params, tokens, remat, capture, scan_layers):
    def loss(params):
        out = nnx.merge(graphdef, params)(
            tokens, capture=capture, remat=remat, scan_layers=scan_layers
        )
        logp, entropy = rl.next_token_log_probs(out.logits_BxTxV, tokens)
        attn = jnp.zeros(()) if out.attn_BxTxS is None else jnp.mean(out.attn_BxTxS**2)
        return scalar_of(logp, entropy) + attn, (out.logits_BxTxV, out.attn_BxTxS)

    return jax.value_and_grad(loss, has_aux=True)(params)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize(
    "name,capture",
    [
        ("qwen3-untied", CaptureSpec(mode="layers", layers=(1, 2))),  # stretches [0] [1,2] [3]
        ("gemma3-softcap", CaptureSpec()),
    ],  # sliding x3 + full: stretches by structure too
    ids=["qwen3", "gemma3"],
)
def test_scanned_layers_equal_unrolled(name, capture, remat):
    """scan_layers runs each stretch of alike layers as one scan: same logits, map, loss and
    gradient as the layer-by-layer loop."""
    graphdef, params = model_parts(name, num_layers=4)
    tokens = random_tokens()
    want = scan_loss_and_grad(graphdef, params, tokens, remat, capture, False)
    got = scan_loss_and_grad(graphdef, params, tokens, remat, capture, True)
    assert got[0][1][1] is not None
    assert_trees_close(got, want)


def test_alike_stretches():
    from ftjax.models.transformer import _alike_stretches

    layer_types = (SLIDING,) * 5 + (FULL,)
    model = Transformer(tiny("gemma3", num_layers=6, layer_types=layer_types), rngs=nnx.Rngs(0))
    assert _alike_stretches(model.layers, ()) == [(0, 5), (5, 6)]
    assert _alike_stretches(model.layers, (2, 3)) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    model = Transformer(tiny("qwen3", num_layers=3), rngs=nnx.Rngs(0))
    assert _alike_stretches(model.layers, (0, 1, 2)) == [(0, 3)]
    with pytest.raises(ValueError, match="scan_layers is for a forward pass without a cache"):
        model(random_tokens(), cache=KVCache.empty(model.cfg, B, T), scan_layers=True)
