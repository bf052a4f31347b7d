"""Decoder-only transformer configs: Llama-3, Qwen2, Qwen3, Gemma3 families, tiny CPU configs.

One frozen dataclass covers the families; each family is a set of switches (QK-norm, sandwich
norms, (1 + w) RMSNorm, GeGLU, sliding windows with their own RoPE base, embedding scaling).
`from_hf` reads a Hugging Face `config.json` dict (transformers 4.x and 5.x layouts); `named`
gives the published Qwen3 dense shapes by name, through `from_hf`, for planning without a download.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling ("rope_type": "llama3"), or plain linear."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise ValueError(f"RopeScaling.kind must be 'llama3' or 'linear', got {self.kind!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"RopeScaling.factor must be >= 1, got {self.factor!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Sliding-window layers (Gemma3) use their own RoPE base and no scaling.
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    attention_bias: bool = False  # biases on q, k, v
    output_bias: bool = False  # bias on o_proj (Llama / Qwen3 attention_bias; not Qwen2)
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False  # Gemma: x * (1 + w)
    sandwich_norm: bool = False  # Gemma3: norms after attention and around the MLP too
    activation: str = "silu"
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    tie_embeddings: bool = False
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 if set
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; known: {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {ACTIVATIONS}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
                )
            unknown = set(self.layer_types) - {FULL, SLIDING}
            if unknown:
                raise ValueError(f"unknown layer types {sorted(unknown)}")
            if SLIDING in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need a sliding_window")

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else FULL

    @property
    def attention_scale(self) -> float:
        base = self.query_pre_attn_scalar or self.head_dim
        return 1.0 / math.sqrt(base)


# ----------------------------------------------------------------------------- HF config.json


def _rope_params(hf: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """transformers 5 nests RoPE in `rope_parameters` (per layer type for Gemma3); 4 is flat."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type in params and isinstance(params[layer_type], dict):
        return params[layer_type]
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        return params
    flat = dict(hf.get("rope_scaling") or {})
    if layer_type == SLIDING and "rope_local_base_freq" in hf:
        return {"rope_type": "default", "rope_theta": hf["rope_local_base_freq"]}
    flat.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return flat


def _rope_scaling(params: dict[str, Any]) -> RopeScaling | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            int(params["original_max_position_embeddings"]),
        )
    if kind == "linear":
        return RopeScaling("linear", float(params["factor"]))
    raise ValueError(f"unsupported rope scaling type {kind!r}")


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json dict (llama, qwen2, qwen3, gemma3_text)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # multimodal wrapper: the text model's config is nested
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    family = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}.get(
        model_type
    )
    if family is None:
        raise ValueError(
            f"unknown architecture model_type={model_type!r}; supported: llama, "
            f"qwen2, qwen3, gemma3_text"
        )
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    num_layers = int(hf["num_hidden_layers"])
    common = dict(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma3")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
    if family == "gemma3":
        global_rope, local_rope = _rope_params(hf, FULL), _rope_params(hf, SLIDING)
        layer_types = hf.get("layer_types")
        if not layer_types:
            pattern = int(hf.get("sliding_window_pattern", 6))
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported Gemma3 activation {act!r}")
        return ModelConfig(
            **common,
            rope_theta=float(global_rope.get("rope_theta", 1e6)),
            rope_scaling=_rope_scaling(global_rope),
            rope_local_theta=float(local_rope.get("rope_theta", 1e4)),
            sliding_window=int(hf["sliding_window"]),
            layer_types=tuple(layer_types),
            qk_norm=True,
            norm_plus_one=True,
            sandwich_norm=True,
            activation="gelu_tanh",
            scale_embeddings=True,
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", head_dim)),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            # transformers' Gemma3 stores attn_logit_softcapping but never applies it; nor do we.
        )
    rope = _rope_params(hf)
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise ValueError("Qwen sliding-window attention is not supported (use_sliding_window)")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported activation {act!r} for {family}")
    return ModelConfig(
        **common,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=_rope_scaling(rope),
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama and Qwen3's attention_bias
        # switch puts a bias on all four projections.
        attention_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        output_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=family == "qwen3",
    )


# ------------------------------------------------------------------------- named model shapes

# The Qwen3 dense checkpoints' config.json shapes (Hugging Face Qwen/Qwen3-<size>): layers, hidden,
# MLP width, query heads, key/value heads, tied embeddings. The post-trained checkpoints publish a
# context of 40960 and eos <|im_end|>; the -Base ones (the paper's) 32768 and eos <|endoftext|>.
_QWEN3_SHAPES = {
    "0.6b": (28, 1024, 3072, 16, 8, True),
    "1.7b": (28, 2048, 6144, 16, 8, True),
    "4b": (36, 2560, 9728, 32, 8, True),
    "8b": (36, 4096, 12288, 32, 8, False),
}


def _qwen3_config_json(size: str, base: bool) -> dict[str, Any]:
    layers, hidden, mlp, heads, kv_heads, tied = _QWEN3_SHAPES[size]
    return {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": hidden,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 128,
        "max_position_embeddings": 32768 if base else 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": 151643,
        "eos_token_id": 151643 if base else 151645,
    }


NAMED_CONFIG_JSON = {
    f"qwen3-{size}{suffix}": _qwen3_config_json(size, base=bool(suffix))
    for size in _QWEN3_SHAPES
    for suffix in ("", "-base")
}


def named(name: str) -> ModelConfig:
    """The ModelConfig of a published checkpoint by name (`NAMED_CONFIG_JSON`, e.g. "qwen3-4b",
    "qwen3-8b-base"), read by `from_hf` like a downloaded config.json. Shapes only: no weights."""
    if name not in NAMED_CONFIG_JSON:
        raise ValueError(f"unknown model name {name!r}; known: {sorted(NAMED_CONFIG_JSON)}")
    return from_hf(NAMED_CONFIG_JSON[name])


def tiny(family: str = "llama", **overrides) -> ModelConfig:
    """A from-scratch config small enough for CPU experiments and tests."""
    base = dict(
        family=family,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    if family == "qwen2":
        base.update(attention_bias=True)
    if family == "qwen3":
        base.update(qk_norm=True)
    if family == "gemma3":
        base.update(
            qk_norm=True,
            norm_plus_one=True,
            sandwich_norm=True,
            activation="gelu_tanh",
            scale_embeddings=True,
            tie_embeddings=True,
            query_pre_attn_scalar=16.0,
            rope_theta=1e6,
            rope_local_theta=1e4,
            sliding_window=8,
            layer_types=(SLIDING, SLIDING, SLIDING, FULL),
        )
    base.update(overrides)
    return ModelConfig(**base)
