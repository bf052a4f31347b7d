"""Property tests of ftjax's Transformer, FlowTracer capture and checkpoint plumbing (no torch).

Parity with Hugging Face lives in test_models_parity.py; here the references are the model's own
slower paths (a full forward for the KV cache, every layer's per-head probabilities and one-layer
captures from tests/model_helpers.py for the captured maps, an unpadded forward for padding) and
plain NumPy.

Dims: B batch, T tokens, S key slots, L layers, H heads, V vocab.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_helpers import head_probs, layer_maps

from ftjax.capture import NONE, CaptureSpec, captured_layers
from ftjax.models.config import FULL, SLIDING, from_hf, tiny
from ftjax.models.hf import hf_name, load_checkpoint, model_from_tensors, to_hf_tensors
from ftjax.models.transformer import KVCache, Transformer

ATOL = 1e-5
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
B, T = 2, 12
# Most tests run this capture (every layer on the explicit path), a valid mask and B x T tokens,
# so that they share one compilation per family; `layer_maps` shares the one-layer ones.
ALL_LAYERS = CaptureSpec(mode="layers", layers=(0, 1, 2, 3))


# ----------------------------------------------------------------------------- helpers


def make_model(family: str = "llama", seed: int = 0, **overrides) -> Transformer:
    """A tiny model with every parameter moved off its init (norms off 1 / 0, biases off 0) and
    kernels large enough that logits and attention are O(1), so tolerances bite."""
    model = Transformer(tiny(family, **overrides), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    noise = lambda x: x + 0.15 * rng.standard_normal(x.shape, np.float32)  # noqa: E731
    nnx.update(model, jax.tree.map(noise, nnx.state(model, nnx.Param)))
    return model


@functools.cache
def family_model(family: str) -> Transformer:
    return make_model(family)


@functools.cache
def one_layer_model() -> Transformer:
    """Llama with one layer and a context of exactly T tokens."""
    return make_model("llama", num_layers=1, max_position_embeddings=T)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("capture",))
def _apply(graphdef, state, tokens, valid, cache, capture):
    model = nnx.merge(graphdef, state)
    return model(tokens, valid_BxT=valid, cache=cache, capture=capture)


def apply(model: Transformer, tokens, valid=None, cache=None, capture=NONE):
    """The model as a pure jitted function of its state."""
    graphdef, state = nnx.split(model)
    valid = None if valid is None else jnp.asarray(valid)
    return _apply(graphdef, state, jnp.asarray(tokens), valid, cache, capture=capture)


def every_layer_map(model: Transformer, tokens, valid) -> np.ndarray:
    """Each layer's own captured map of a jitted forward, L x B x T x T."""
    run = lambda spec: apply(model, tokens, valid, capture=spec).attn_BxTxS  # noqa: E731
    return layer_maps(run, range(model.cfg.num_layers))


def random_tokens(vocab: int = 128, shape=(B, T), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int32)


def mixed_padding() -> np.ndarray:
    valid = np.ones((B, T), bool)
    valid[0, :3] = False  # left padding
    valid[1, -4:] = False  # right padding
    return valid


def assert_close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               atol=atol, rtol=0)


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "padded",
    # Unpadded rows are a special case of the left-padded batch (its row 0 has no padding), so the
    # default suite runs the padded case only (CI time).
    [pytest.param(False, marks=pytest.mark.slow), True],
    ids=["full", "left_padded"],
)
def test_prefill_then_decode_equals_full_forward(family, padded):
    model = family_model(family)
    tokens = random_tokens()
    valid = np.ones((B, T), bool)
    if padded:
        valid[1, :3] = False
    full = apply(model, tokens, valid, capture=ALL_LAYERS)

    prefill, slots = 5, T + 3  # the spare slots must stay empty

    def decode(capture):
        out = apply(model, tokens[:, :prefill], valid[:, :prefill],
                    KVCache.empty(model.cfg, B, slots), capture=capture)
        steps = [out]
        for t in range(prefill, T):
            steps.append(apply(model, tokens[:, t:t + 1], valid[:, t:t + 1], steps[-1].cache,
                               capture=capture))
        return steps

    steps = decode(ALL_LAYERS)
    logits_BxTxV = np.concatenate([o.logits_BxTxV for o in steps], axis=1)
    attn_BxTxS = np.concatenate([o.attn_BxTxS for o in steps], axis=1)
    layer_attn_LxBxTxS = layer_maps(
        lambda spec: np.concatenate([o.attn_BxTxS for o in decode(spec)], axis=1),
        range(model.cfg.num_layers))
    cache = steps[-1].cache

    assert int(cache.index) == T
    np.testing.assert_array_equal(np.asarray(cache.valid_BxS[:, :T]), valid)
    assert not np.asarray(cache.valid_BxS[:, T:]).any()
    assert not np.asarray(cache.k_LxBxSxKxD[:, :, T:]).any()
    # Padded query rows are undefined (they attend to nothing); compare the real ones.
    assert_close(logits_BxTxV[valid], np.asarray(full.logits_BxTxV)[valid])
    # The captured maps agree too (zero on padded rows and on the spare slots).
    assert not attn_BxTxS[..., T:].any()
    assert_close(attn_BxTxS[..., :T], full.attn_BxTxS)
    # So does each layer's own map (one decode per layer), against the per-head reference.
    probs_LxBxHxTxT = np.asarray(head_probs(model, tokens, valid), np.float64)
    assert_close(layer_attn_LxBxTxS[..., :T], probs_LxBxHxTxT.mean(axis=2) * valid[:, :, None])


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding windows
def test_padding_does_not_change_real_tokens(family):
    """Right and left padding leave real tokens' logits and captured maps as without padding."""
    model = family_model(family)
    n, pad = T - 4, 4
    short = random_tokens(shape=(1, n), seed=3)
    alone = apply(model, short, np.ones((1, n), bool), capture=ALL_LAYERS)
    alone_layers = every_layer_map(model, short, np.ones((1, n), bool))
    filler = random_tokens(shape=(1, pad), seed=4)
    tokens = np.concatenate([np.concatenate([short, filler], axis=1),  # right padded
                             np.concatenate([filler, short], axis=1)])  # left padded
    valid = np.zeros((B, T), bool)
    valid[0, :n] = valid[1, pad:] = True
    out = apply(model, tokens, valid, capture=ALL_LAYERS)
    out_layers = every_layer_map(model, tokens, valid)
    for b, real in ((0, slice(0, n)), (1, slice(pad, T))):
        assert_close(out.logits_BxTxV[b, real], alone.logits_BxTxV[0])
        assert_close(out.attn_BxTxS[b, real, real], alone.attn_BxTxS[0])
        assert_close(out_layers[:, b, real, real], alone_layers[:, 0])
        assert not np.asarray(out.attn_BxTxS[b, ~valid[b]]).any()


# ----------------------------------------------------------------------------- capture


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_captured_maps_are_causal_row_stochastic(family):
    model = family_model(family)
    L = model.cfg.num_layers
    valid = mixed_padding()
    out = apply(model, random_tokens(), valid, capture=ALL_LAYERS)
    layers_LxBxTxT = every_layer_map(model, random_tokens(), valid)
    maps = np.concatenate([np.asarray(out.attn_BxTxS)[None], layers_LxBxTxT])
    assert maps.shape == (L + 1, B, T, T)
    # Rows sum to 1 on real queries and to 0 on padded ones.
    np.testing.assert_allclose(maps.sum(-1), np.broadcast_to(valid, (L + 1, B, T)) * 1.0,
                               atol=ATOL)
    assert (maps >= 0).all()
    above = np.triu(np.ones((T, T), bool), 1)
    assert not maps[..., above].any()  # causal
    assert not (maps * ~valid[None, :, None, :]).any()  # no mass on padded keys


def test_sliding_layers_capture_only_their_window():
    model = family_model("gemma3")
    window = model.cfg.sliding_window
    assert window < T
    lag = np.arange(T)[:, None] - np.arange(T)[None, :]
    per_layer = every_layer_map(model, random_tokens(), mixed_padding())
    for layer, kind in enumerate(model.cfg.layer_types):
        beyond = per_layer[layer][:, lag >= window]
        assert (beyond.max() == 0) == (kind == SLIDING), (layer, kind)


# (middle_five reads the same layer as middle_third at L = 4; captured_layers is tested below.)
@pytest.mark.parametrize("spec", [CaptureSpec(), ALL_LAYERS,
                                  CaptureSpec(mode="layers", layers=(3, 0, 1))],
                         ids=["middle_third", "all_layers", "layers"])
def test_captured_map_is_mean_of_head_probs(spec):
    """The fused capture equals the slow reduction of every layer's per-head probabilities,
    and so does each layer's own map. (Against Hugging Face's maps for every family in
    test_models_parity.py.)"""
    model = family_model("gemma3")
    tokens, valid = random_tokens(), mixed_padding()
    out = apply(model, tokens, valid, capture=spec)
    probs_LxBxHxTxS = np.asarray(head_probs(model, tokens, valid), np.float64)
    layers = list(captured_layers(spec, model.cfg.num_layers))
    per_layer_LxBxTxS = probs_LxBxHxTxS[layers].mean(axis=2) * valid[None, :, :, None]
    assert_close(out.attn_BxTxS, per_layer_LxBxTxS.mean(0))
    assert_close(every_layer_map(model, tokens, valid)[layers], per_layer_LxBxTxS)


def test_capture_does_not_change_logits():
    """Captured layers take the explicit-softmax path, the others the fused one: same logits."""
    model = family_model("llama")
    tokens, valid = random_tokens(), mixed_padding()
    plain = apply(model, tokens, valid)  # every layer on jax.nn.dot_product_attention
    assert plain.attn_BxTxS is None and plain.cache is None
    captured = apply(model, tokens, valid, capture=ALL_LAYERS)
    assert_close(captured.logits_BxTxV[valid], plain.logits_BxTxV[valid])


def test_softcapped_layers_run_without_capture():
    """With attn_logit_softcap every layer takes the explicit path, captured or not
    (jax.nn.dot_product_attention cannot cap): all-captured, partly captured, uncaptured and
    cached runs give the same logits, and the cap really acts."""
    model = make_model("gemma3", attn_logit_softcap=1.0)
    tokens, valid = random_tokens(), mixed_padding()
    plain = apply(model, tokens, valid)
    assert plain.attn_BxTxS is None
    every, middle = (apply(model, tokens, valid, capture=c) for c in (ALL_LAYERS, CaptureSpec()))
    for out in (every, middle):
        assert_close(out.logits_BxTxV[valid], plain.logits_BxTxV[valid])
    uncapped = apply(family_model("gemma3"), tokens, valid)  # the same weights, no cap
    assert np.abs(np.asarray(plain.logits_BxTxV - uncapped.logits_BxTxV)[valid]).max() > 1e-2
    # The per-head reference caps too, and the captured map is its mean.
    probs_LxBxHxTxS = np.asarray(head_probs(model, tokens, valid), np.float64)
    assert_close(every.attn_BxTxS, probs_LxBxHxTxS.mean(axis=(0, 2)) * valid[:, :, None])
    # Decoding with a cache, uncaptured: prefill all but the last token, then one step.
    first = apply(model, tokens[:, :-1], valid[:, :-1], KVCache.empty(model.cfg, B, T))
    last = apply(model, tokens[:, -1:], valid[:, -1:], first.cache)
    cached = np.concatenate([first.logits_BxTxV, last.logits_BxTxV], axis=1)
    assert_close(cached[valid], plain.logits_BxTxV[valid])


@pytest.mark.parametrize("num_layers", range(1, 13))
def test_captured_layers_ranges(num_layers):
    L = num_layers
    third = tuple(range(L // 3, 2 * L // 3)) or (L // 2,)
    assert captured_layers(CaptureSpec(), L) == third
    five = captured_layers(CaptureSpec(mode="middle_five"), L)
    assert len(five) == min(5, len(third))
    assert set(five) <= set(third) and list(five) == sorted(set(five))
    assert (five[0], five[-1]) == (third[0], third[-1])  # spread over the whole range
    assert captured_layers(CaptureSpec(mode="none"), L) == ()
    assert captured_layers(CaptureSpec(mode="layers", layers=(L - 1, 0, L - 1)), L) == (
        tuple(sorted({0, L - 1})))


def test_captured_layers_known_values():
    # Worked by hand: L = 12 -> [4, 8); L = 24 -> [8, 16), 5 picks 8 + round(j * 7 / 4).
    assert captured_layers(CaptureSpec(), 12) == (4, 5, 6, 7)
    assert captured_layers(CaptureSpec(mode="middle_five"), 24) == (8, 10, 12, 13, 15)
    assert captured_layers(CaptureSpec(), 2) == (0,)  # [0, 1)
    assert captured_layers(CaptureSpec(), 1) == (0,)  # [0, 0) is empty: the middle layer


def test_captured_map_carries_no_gradient():
    model = one_layer_model()
    tokens, valid = jnp.asarray(random_tokens()), jnp.asarray(mixed_padding())
    spec = CaptureSpec(mode="layers", layers=(0,))  # the map is this one layer's own
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(p, tokens, capture):
        return nnx.merge(graphdef, p, rest)(tokens, valid_BxT=valid, capture=capture)

    def maps_norm(p, tokens):
        out = run(p, tokens, spec)
        return jnp.sum(out.attn_BxTxS ** 2)

    def loss(p, tokens, capture):
        logp = jax.nn.log_softmax(run(p, tokens, capture).logits_BxTxV[:, :-1])
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * valid[:, 1:])

    for leaf in jax.tree.leaves(jax.jit(jax.grad(maps_norm))(params, tokens)):
        assert not np.asarray(leaf).any()
    grad = jax.jit(jax.grad(loss), static_argnums=2)
    grads = grad(params, tokens, spec)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert np.asarray(leaf).any(), jax.tree_util.keystr(path)
    # Capturing changes no gradient.
    jax.tree.map(lambda a, b: assert_close(a, b, atol=1e-4), grads, grad(params, tokens, NONE))


def test_jit_equals_eager():
    model = family_model("gemma3")  # the most switches
    tokens, valid = random_tokens(), mixed_padding()
    eager = model(jnp.asarray(tokens), valid_BxT=jnp.asarray(valid), capture=ALL_LAYERS)
    jitted = apply(model, tokens, valid, capture=ALL_LAYERS)
    for name in ("logits_BxTxV", "attn_BxTxS"):
        assert_close(getattr(eager, name), getattr(jitted, name))
    eager_maps = layer_maps(
        lambda spec: model(jnp.asarray(tokens), valid_BxT=jnp.asarray(valid), capture=spec)
        .attn_BxTxS, range(model.cfg.num_layers))
    assert_close(eager_maps, every_layer_map(model, tokens, valid))
    graphdef, state = nnx.split(model)
    jitted_probs = jax.jit(lambda s: head_probs(nnx.merge(graphdef, s), tokens, valid))(state)
    assert_close(head_probs(model, tokens, valid), jitted_probs)


@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
def test_tokens_closed_over_by_a_jitted_function(as_array):
    """A fixed batch captured by a jitted loss (rather than passed in) is a concrete array inside
    the trace; the vocabulary check must not concretize a traced min / max of it."""
    model = one_layer_model()
    graphdef, state = nnx.split(model)
    tokens = as_array(random_tokens())
    logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens).logits_BxTxV)(state)
    assert_close(logits, apply(model, np.asarray(tokens)).logits_BxTxV)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_tensors_round_trip(family):
    model = family_model(family)
    tensors = to_hf_tensors(model)
    assert ("lm_head.weight" in tensors) == (not model.cfg.tie_embeddings)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (
        model.cfg.num_heads * model.cfg.head_dim, model.cfg.hidden_size)  # HF [out, in]
    rebuilt = model_from_tensors(model.cfg, tensors)
    again = to_hf_tensors(rebuilt)
    assert again.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(again[name], tensors[name], err_msg=name)
    tokens, valid = random_tokens(), mixed_padding()
    logits = [apply(m, tokens, valid, capture=ALL_LAYERS).logits_BxTxV for m in (model, rebuilt)]
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[1]))


def test_multimodal_prefixes_load_identically():
    model = family_model("gemma3")
    tensors = to_hf_tensors(model)
    wrapped = {"model.language_model." + name.removeprefix("model."): array
               for name, array in tensors.items()}
    wrapped["model.vision_tower.patch.weight"] = np.zeros(3, np.float32)  # ignored
    again = to_hf_tensors(model_from_tensors(model.cfg, wrapped))
    for name in tensors:
        np.testing.assert_array_equal(again[name], tensors[name], err_msg=name)


def test_hf_name():
    assert hf_name(("layers", 3, "self_attn", "q_proj", "kernel")) == (
        "model.layers.3.self_attn.q_proj.weight", True)
    assert hf_name(("layers", 0, "self_attn", "q_proj", "bias")) == (
        "model.layers.0.self_attn.q_proj.bias", False)
    assert hf_name(("embed_tokens", "embedding")) == ("model.embed_tokens.weight", False)
    assert hf_name(("norm", "weight")) == ("model.norm.weight", False)
    assert hf_name(("lm_head", "kernel")) == ("lm_head.weight", True)


# ----------------------------------------------------------------------------- bad input


def hf_config_dict(**overrides) -> dict:
    return {"model_type": "llama", "vocab_size": 128, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, **overrides}


def test_from_hf_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="gpt2"):
        from_hf(hf_config_dict(model_type="gpt2"))
    with pytest.raises(ValueError, match="None"):
        from_hf({k: v for k, v in hf_config_dict().items() if k != "model_type"})


def test_from_hf_rejects_unsupported_settings():
    with pytest.raises(ValueError, match="yarn"):
        from_hf(hf_config_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="gelu"):
        from_hf(hf_config_dict(hidden_act="gelu"))
    with pytest.raises(ValueError, match="use_sliding_window"):
        from_hf(hf_config_dict(model_type="qwen2", use_sliding_window=True, sliding_window=4))
    with pytest.raises(ValueError, match="num_heads=4"):
        from_hf(hf_config_dict(num_key_value_heads=3))


def test_missing_weight_is_named():
    model = family_model("qwen2")
    tensors = to_hf_tensors(model)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"missing weight 'model\.layers\.1\.self_attn\.k_proj"):
        model_from_tensors(model.cfg, tensors)


def test_shape_mismatch_is_named():
    model = family_model("llama")
    tensors = to_hf_tensors(model)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][1:]
    with pytest.raises(ValueError, match=r"mlp\.up_proj\.weight.*shape \(64, 127\)"):
        model_from_tensors(model.cfg, tensors)
    with pytest.raises(ValueError, match="shape"):  # a checkpoint of a different size
        model_from_tensors(tiny("llama", hidden_size=32, head_dim=8), to_hf_tensors(model))


@pytest.mark.parametrize("bad", [-1, 128, 1000])
def test_token_ids_out_of_vocab(bad):
    model = family_model("llama")
    tokens = random_tokens()
    tokens[1, 5] = bad
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        model(jnp.asarray(tokens))


def test_malformed_tokens_and_masks():
    model = family_model("llama")
    with pytest.raises(ValueError, match="integers"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="valid mask shape"):
        model(jnp.zeros((2, 4), jnp.int32), valid_BxT=jnp.ones((2, 5), bool))


def test_sequence_longer_than_context():
    model = one_layer_model()
    apply(model, random_tokens())  # exactly the context is fine
    with pytest.raises(ValueError, match=f"{T + 1} tokens exceeds the model's context of {T}"):
        model(jnp.zeros((1, T + 1), jnp.int32))
    with pytest.raises(ValueError, match="exceeds"):
        model(jnp.zeros((1, 1), jnp.int32), cache=KVCache.empty(model.cfg, 1, T + 1))


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        tiny("llama", num_kv_heads=3)
    with pytest.raises(ValueError, match="bert"):
        tiny("bert")
    with pytest.raises(ValueError, match="layer_types has 3 entries for 4 layers"):
        tiny("gemma3", layer_types=(SLIDING, SLIDING, FULL))
    with pytest.raises(ValueError, match="sliding_window"):
        tiny("gemma3", sliding_window=None)
    with pytest.raises(ValueError, match="hidden_size"):
        tiny("llama", hidden_size=0)


def test_capture_spec_validation():
    with pytest.raises(ValueError, match="'first_half'"):
        CaptureSpec(mode="first_half")
    with pytest.raises(ValueError, match="non-empty"):
        CaptureSpec(mode="layers")
    with pytest.raises(ValueError, match="only used with mode='layers'"):
        CaptureSpec(layers=(1,))
    for layers in ((4,), (-1,), (0, 7)):
        spec = CaptureSpec(mode="layers", layers=layers)
        with pytest.raises(ValueError, match="out of range for 4 layers"):
            captured_layers(spec, 4)
        with pytest.raises(ValueError, match="out of range"):
            family_model("llama")(jnp.zeros((1, 4), jnp.int32), capture=spec)


def test_checkpoint_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict()))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint(tmp_path)


def test_checkpoint_loads_directly_onto_a_mesh_sharding():
    from ftjax import sharding

    cfg = tiny("qwen3")
    source = Transformer(cfg, rngs=nnx.Rngs(5))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))

    def place(name, shape):
        return jax.sharding.NamedSharding(mesh, sharding.param_spec(shape, 4))

    loaded = model_from_tensors(cfg, to_hf_tensors(source), sharding_fn=place)
    for leaf in jax.tree.leaves(nnx.state(loaded, nnx.Param)):
        assert leaf.sharding.mesh.shape == mesh.shape
        assert leaf.sharding.spec == sharding.param_spec(leaf.shape, 4)
    assert any(leaf.sharding.spec != jax.sharding.PartitionSpec()
               for leaf in jax.tree.leaves(nnx.state(loaded, nnx.Param)))
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_allclose(np.asarray(loaded(tokens).logits_BxTxV),
                               np.asarray(source(tokens).logits_BxTxV), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_chunked_capture_equals_full_probabilities(family):
    """Sequences longer than the query chunk (here 300 = 2 x 128 + 44) take the chunked path."""
    cfg = tiny(family, max_position_embeddings=512)
    model = Transformer(cfg, rngs=nnx.Rngs(2))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 300)).astype(np.int32)
    valid = np.ones((2, 300), bool)
    valid[1, :37] = False  # left padding
    spec = CaptureSpec(mode="layers", layers=tuple(range(cfg.num_layers)))
    chunked = model(tokens, valid_BxT=valid, capture=spec)
    full = model(tokens, valid_BxT=valid)  # no capture: jax.nn.dot_product_attention, unchunked
    want = np.asarray(head_probs(model, tokens, valid)).mean(axis=2) * valid[None, :, :, None]
    run = lambda s: model(tokens, valid_BxT=valid, capture=s).attn_BxTxS  # noqa: E731
    np.testing.assert_allclose(layer_maps(run, range(cfg.num_layers)), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked.attn_BxTxS), want.mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(chunked.logits_BxTxV), np.asarray(full.logits_BxTxV),
                               atol=1e-5)


def test_capture_adds_only_its_map_to_planned_memory():
    """XLA's planned memory (temporaries + outputs) grows by the returned B x T x T map and no
    more: every captured layer adds its chunks to the one carried map, one chunk at a time."""
    cfg = tiny("gemma3", max_position_embeddings=512)  # sliding and full layers
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.ShapeDtypeStruct((2, 300), jnp.int32)  # 300 = 2 x 128 + 44: loop and tail

    def planned_bytes(capture):
        def forward(state, tokens):
            out = nnx.merge(graphdef, state)(tokens, capture=capture)
            return out.logits_BxTxV, out.attn_BxTxS

        stats = jax.jit(forward).lower(state, tokens).compile().memory_analysis()
        return stats.temp_size_in_bytes + stats.output_size_in_bytes

    map_bytes = 2 * 300 * 300 * 4
    every_layer = CaptureSpec(mode="layers", layers=tuple(range(cfg.num_layers)))
    assert planned_bytes(every_layer) - planned_bytes(NONE) <= 1.25 * map_bytes
