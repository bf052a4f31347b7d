"""Parity of ftjax's Transformer with Hugging Face transformers, the slow and obviously correct
reference.

Each family gets a tiny random HF model (float32, eager attention) with its norm weights and biases
moved off their init, saved with `save_pretrained` and read back with `load_checkpoint`. We compare
logits, every layer's per-head attention probabilities (ours from tests/model_helpers.py), the
captured FlowTracer maps (recomputed here from HF's per-head maps), padded batches, sharded
checkpoints, the inverse weight map and the config switches `from_hf` derives.

Dims: B batch, T tokens, L layers, H heads, V vocab.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from model_helpers import head_probs, layer_maps  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ftjax.capture import CaptureSpec, captured_layers  # noqa: E402
from ftjax.models.config import FULL, SLIDING, RopeScaling, from_hf  # noqa: E402
from ftjax.models.hf import load_checkpoint, read_safetensors, to_hf_tensors  # noqa: E402
from ftjax.models.transformer import rope_inverse_frequencies  # noqa: E402

LOGITS_ATOL = 1e-4
PROBS_ATOL = 1e-5
B, T, VOCAB, LAYERS = 2, 16, 128, 4
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
GEMMA_LAYER_TYPES = (SLIDING, SLIDING, FULL, SLIDING)  # layer 1 (the default capture) slides
EVERY_LAYER = CaptureSpec(mode="layers", layers=tuple(range(LAYERS)))  # all on the explicit path


def llama3_scaling(original_max: int = 16) -> dict:
    """A fresh dict each time: transformers writes rope_theta into the dict it is given."""
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original_max}


# ----------------------------------------------------------------------------- HF models


def hf_config(family: str, **softcaps):
    # initializer_range 0.1 (not 0.02) makes logits and attention O(1), so tolerances bite.
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-6)
    if family == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, rope_scaling=llama3_scaling())
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=10000.0)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16, rope_theta=10000.0)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=4, layer_types=list(GEMMA_LAYER_TYPES),
            rope_theta=10000.0, rope_local_base_freq=100.0, query_pre_attn_scalar=24,
            # Gemma3 4B+ scale the global layers' RoPE linearly; sliding layers stay unscaled.
            rope_scaling={"rope_type": "linear", "factor": 8.0}, **softcaps)
    raise AssertionError(family)


def make_hf_model(family: str, seed: int = 0, config=None):
    torch.manual_seed(seed)
    config = hf_config(family) if config is None else config
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():
        # Norm weights init to 1 (or 0 for Gemma's 1 + w) and biases to 0: perturb them, or a
        # swapped (1 + w) / w or a dropped bias would go unnoticed.
        for _, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model


class Checkpoint:
    def __init__(self, family: str, directory: pathlib.Path):
        self.family, self.directory = family, directory
        self.hf = make_hf_model(family)
        self.hf.save_pretrained(directory, safe_serialization=True)
        self.cfg, self.model = load_checkpoint(directory)
        self.config_json = json.loads((directory / "config.json").read_text())


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory) -> Checkpoint:
    return Checkpoint(request.param, tmp_path_factory.mktemp(request.param))


def random_tokens(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T), dtype=np.int32)


def hf_forward(model, tokens, mask=None, positions=None):
    """(logits_BxTxV, probs_LxBxHxTxT) from HF, as float64 NumPy."""
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(mask, np.int64))
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(positions, np.int64))
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens, np.int64)), output_attentions=True,
                    use_cache=False, **kwargs)
    probs = np.stack([a.double().numpy() for a in out.attentions])
    return out.logits.double().numpy(), probs


def np_of(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- forward parity


def test_logits_match_hf(ckpt):
    tokens = random_tokens()
    hf_logits, _ = hf_forward(ckpt.hf, tokens)
    assert np.abs(hf_logits).max() > 0.5  # the tolerance below is not vacuous
    fused = ckpt.model(jnp.asarray(tokens))  # no capture: jax.nn.dot_product_attention path
    explicit = ckpt.model(jnp.asarray(tokens), capture=EVERY_LAYER)  # explicit softmax path
    np.testing.assert_allclose(np_of(fused.logits_BxTxV), hf_logits, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(np_of(explicit.logits_BxTxV), hf_logits, atol=LOGITS_ATOL, rtol=0)


def test_head_probs_match_hf(ckpt):
    tokens = random_tokens()
    _, hf_probs = hf_forward(ckpt.hf, tokens)
    probs_LxBxHxTxT = head_probs(ckpt.model, tokens)
    assert probs_LxBxHxTxT.shape == (LAYERS, B, 4, T, T)
    np.testing.assert_allclose(np_of(probs_LxBxHxTxT), hf_probs, atol=PROBS_ATOL, rtol=0)
    if ckpt.family == "gemma3":  # the sliding window really masks something at T=16
        lag = np.arange(T)[:, None] - np.arange(T)[None, :]
        for layer, kind in enumerate(GEMMA_LAYER_TYPES):
            beyond = hf_probs[layer][..., lag >= 4]
            assert (np.abs(beyond).max() == 0) == (kind == SLIDING)


@pytest.mark.parametrize("spec", [CaptureSpec(), CaptureSpec(mode="middle_five"),
                                  CaptureSpec(mode="layers", layers=(0, 2, 3))],
                         ids=["middle_third", "middle_five", "layers"])
def test_captured_map_is_head_and_layer_mean_of_hf(ckpt, spec):
    tokens = random_tokens()
    _, hf_probs = hf_forward(ckpt.hf, tokens)
    layers = list(captured_layers(spec, LAYERS))
    expected_BxTxT = hf_probs[layers].mean(axis=(0, 2))
    out = ckpt.model(jnp.asarray(tokens), capture=spec)
    np.testing.assert_allclose(np_of(out.attn_BxTxS), expected_BxTxT, atol=PROBS_ATOL, rtol=0)


def test_per_layer_capture_matches_hf(ckpt):
    tokens = random_tokens()
    _, hf_probs = hf_forward(ckpt.hf, tokens)
    out = ckpt.model(jnp.asarray(tokens), capture=CaptureSpec(mode="layers", layers=(3, 0, 2)))
    expected_LxBxTxT = hf_probs[[0, 2, 3]].mean(axis=2)
    maps_LxBxTxT = layer_maps(lambda spec: ckpt.model(jnp.asarray(tokens), capture=spec).attn_BxTxS,
                              [0, 2, 3])
    np.testing.assert_allclose(np_of(maps_LxBxTxT), expected_LxBxTxT, atol=PROBS_ATOL, rtol=0)
    np.testing.assert_allclose(np_of(out.attn_BxTxS), expected_LxBxTxT.mean(0),
                               atol=PROBS_ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_hf(ckpt, side):
    tokens = random_tokens(seed=2)
    lengths = (T, T - 5)
    mask = np.zeros((B, T), bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    if side == "left":
        mask = mask[:, ::-1].copy()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    hf_logits, hf_probs = hf_forward(ckpt.hf, tokens, mask, positions)
    out = ckpt.model(jnp.asarray(tokens), valid_BxT=jnp.asarray(mask), capture=EVERY_LAYER)
    fused = ckpt.model(jnp.asarray(tokens), valid_BxT=jnp.asarray(mask))
    np.testing.assert_allclose(np_of(out.logits_BxTxV)[mask], hf_logits[mask],
                               atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(np_of(fused.logits_BxTxV)[mask], hf_logits[mask],
                               atol=LOGITS_ATOL, rtol=0)
    # Per-head probabilities on real query rows (padded rows are undefined on both sides).
    ours = np.moveaxis(np_of(head_probs(ckpt.model, tokens, mask)), 3, 2)  # L x B x T x H x S
    theirs = np.moveaxis(hf_probs, 3, 2)
    np.testing.assert_allclose(ours[:, mask], theirs[:, mask], atol=PROBS_ATOL, rtol=0)


# ----------------------------------------------------------------------------- checkpoints


def test_sharded_checkpoint_loads_identically(ckpt, tmp_path):
    ckpt.hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    cfg, model = load_checkpoint(tmp_path)
    assert cfg == ckpt.cfg
    sharded, single = to_hf_tensors(model), to_hf_tensors(ckpt.model)
    assert sharded.keys() == single.keys()
    for name, array in single.items():
        np.testing.assert_array_equal(sharded[name], array, err_msg=name)
    tokens = jnp.asarray(random_tokens())
    np.testing.assert_array_equal(np.asarray(model(tokens).logits_BxTxV),
                                  np.asarray(ckpt.model(tokens).logits_BxTxV))


def test_to_hf_tensors_round_trips_saved_state_dict(ckpt):
    saved = load_file(str(ckpt.directory / "model.safetensors"))
    ours = to_hf_tensors(ckpt.model)
    assert sorted(ours) == sorted(saved)
    for name, array in saved.items():
        assert ours[name].dtype == array.dtype, name
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
    # ... and the loader reads what the file holds.
    assert sorted(read_safetensors(ckpt.directory)) == sorted(saved)


# ----------------------------------------------------------------------------- configs


def expected_switches(family: str) -> dict:
    gemma = family == "gemma3"
    return dict(
        family=family, qk_norm=family in ("qwen3", "gemma3"), sandwich_norm=gemma,
        norm_plus_one=gemma, scale_embeddings=gemma, tie_embeddings=gemma,
        attention_bias=family == "qwen2", activation="gelu_tanh" if gemma else "silu",
        layer_types=GEMMA_LAYER_TYPES if gemma else (),
        rope_theta=10000.0, rope_local_theta=100.0 if gemma else None,
        sliding_window=4 if gemma else None, query_pre_attn_scalar=24.0 if gemma else None,
        rope_scaling={"llama": RopeScaling("llama3", 8.0, 1.0, 4.0, 16),
                      "gemma3": RopeScaling("linear", 8.0)}.get(family),
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=LAYERS, num_heads=4,
        num_kv_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)


def test_from_hf_switches(ckpt):
    cfg = from_hf(ckpt.config_json)
    assert cfg == ckpt.cfg
    for name, value in expected_switches(ckpt.family).items():
        assert getattr(cfg, name) == value, name
    if ckpt.family == "gemma3":
        assert cfg.attention_scale == pytest.approx(24.0 ** -0.5)
        # The multimodal Gemma3 config nests the text model's config.
        assert from_hf({"model_type": "gemma3", "text_config": {**ckpt.config_json}}) == cfg


def transformers4_layout(hf: dict) -> dict:
    """The same config as transformers 4.x wrote it: flat rope_theta / rope_scaling keys."""
    old = {k: v for k, v in hf.items() if k != "rope_parameters"}
    params = hf["rope_parameters"]
    if hf["model_type"] == "gemma3_text":
        old["rope_theta"] = params[FULL]["rope_theta"]
        old["rope_local_base_freq"] = params[SLIDING]["rope_theta"]
        scaling = {k: v for k, v in params[FULL].items() if k != "rope_theta"}
        old["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
        return old
    old["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    old["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
    return old


def test_from_hf_reads_transformers4_layout(ckpt):
    assert "rope_parameters" in ckpt.config_json  # transformers 5 wrote the checkpoint
    assert from_hf(transformers4_layout(ckpt.config_json)) == ckpt.cfg


@pytest.mark.parametrize("original_max", [16, 64, 8192])
def test_llama3_rope_frequencies_match_hf(original_max):
    """All three Llama-3 bands (unchanged, smoothed, divided by factor) appear across these."""
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                      rope_theta=500000.0,
                                      rope_scaling=llama3_scaling(original_max),
                                      max_position_embeddings=16384)
    hf_inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, original_max)
    ours = rope_inverse_frequencies(16, 500000.0, scaling)
    np.testing.assert_allclose(np_of(ours), hf_inv_freq.double().numpy(), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- variants


def save_and_load(model, directory: pathlib.Path):
    model.save_pretrained(directory, safe_serialization=True)
    return load_checkpoint(directory)


def test_gemma3_final_softcap_matches_hf(tmp_path):
    """Gemma-2-style final logit soft-capping, which a Gemma3 config may set.

    (HF's Gemma3 attention ignores `attn_logit_softcapping`, so it has no reference here.)
    """
    hf = make_hf_model("gemma3", config=hf_config("gemma3", final_logit_softcapping=1.5))
    cfg, model = save_and_load(hf, tmp_path)
    assert cfg.final_logit_softcap == 1.5
    tokens = random_tokens()
    hf_logits, _ = hf_forward(hf, tokens)
    assert np.abs(hf_logits).max() > 1.0  # the cap is active
    out = model(jnp.asarray(tokens))
    np.testing.assert_allclose(np_of(out.logits_BxTxV), hf_logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize(("family", "switch"), [("llama", "attention_bias"), ("llama", "mlp_bias"),
                                                ("qwen3", "attention_bias")])
def test_bias_switches_match_hf_or_are_refused(tmp_path, family, switch):
    """HF Llama/Qwen3 `attention_bias` also biases o_proj; Llama `mlp_bias` biases the MLP.

    Loading such a checkpoint must either reproduce HF or fail loudly, never drop the biases.
    """
    config = hf_config(family)
    setattr(config, switch, True)
    hf = make_hf_model(family, config=config)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    try:
        _, model = load_checkpoint(tmp_path)
    except ValueError as err:
        assert "bias" in str(err)
        return
    tokens = random_tokens()
    hf_logits, _ = hf_forward(hf, tokens)
    np.testing.assert_allclose(np_of(model(jnp.asarray(tokens)).logits_BxTxV), hf_logits,
                               atol=LOGITS_ATOL, rtol=0)
