"""Hugging Face-format checkpoints (config.json + safetensors) into the NNX Transformer, and back.

Our parameter paths mirror HF names: `layers.3.self_attn.q_proj.kernel` is
`model.layers.3.self_attn.q_proj.weight` transposed (NNX kernels are [in, out]); embeddings and
norm weights map as they are. Loading never builds random weights first: the model is created
abstractly and each parameter is filled straight from its tensor, placed with `sharding_fn` (for
example a mesh sharding) as it is read. `save_checkpoint` writes the inverse: a directory that
`transformers` (4.x and 5.x) and `load_checkpoint` read back to the same model.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.models.config import FULL, SLIDING, ModelConfig, RopeScaling, from_hf
from ftjax.models.transformer import Transformer

ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None]
_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")


def hf_name(path: tuple) -> tuple[str, bool]:
    """HF tensor name for one of our parameter paths, and whether it is stored transposed."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    transposed = leaf == "kernel"
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    name = ".".join(parts)
    return (name if name.startswith("lm_head.") else "model." + name), transposed


def _key(tensors: Mapping[str, object], name: str) -> str:
    """The checkpoint key of `name`, allowing the wrappers multimodal checkpoints add."""
    bare = name.removeprefix("model.")
    for prefix in _PREFIXES:
        if prefix + bare in tensors:
            return prefix + bare
    if name in tensors:
        return name
    raise ValueError(f"checkpoint is missing weight {name!r}")


# Tensors a text-only model legitimately leaves unused: RoPE buffers some exporters save, a tied
# lm_head copy, and the vision side of multimodal checkpoints.
_IGNORABLE = ("rotary_emb.inv_freq", "lm_head.weight", "vision_tower.", "multi_modal_projector.")


def model_from_tensors(
    cfg: ModelConfig,
    tensors: Mapping[str, object],
    *,
    param_dtype=jnp.float32,
    dtype=None,
    sharding_fn: ShardingFn | None = None,
) -> Transformer:
    """Build the Transformer for `cfg` with every parameter taken from `tensors` (HF names)."""
    abstract = nnx.eval_shape(
        lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    filled, used = [], set()
    for path, variable in flat:
        name, transposed = hf_name(path)
        key = _key(tensors, name)
        used.add(key)
        array = tensors[key]
        array = jnp.asarray(array).T if transposed else jnp.asarray(array)
        expected = tuple(variable.get_value().shape)
        if tuple(array.shape) != expected:
            raise ValueError(
                f"weight {name!r} has shape {tuple(array.shape)}, the config needs {expected}"
            )
        array = array.astype(param_dtype)
        sharding = sharding_fn(name, expected) if sharding_fn else None
        filled.append(
            (
                path,
                variable.replace(
                    jax.device_put(array, sharding) if sharding is not None else array
                ),
            )
        )
    unused = sorted(k for k in tensors if k not in used and not any(p in k for p in _IGNORABLE))
    if unused:
        raise ValueError(
            f"checkpoint has {len(unused)} weights the {cfg.family} config does not use (a config "
            f"switch the model does not honour?): {unused[:5]}"
        )
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def read_safetensors(directory: pathlib.Path) -> dict[str, jax.Array]:
    """All tensors of a single-file or sharded (index.json) safetensors checkpoint."""
    from safetensors import safe_open

    directory = pathlib.Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    tensors = {}
    for file in files:
        with safe_open(str(directory / file), framework="flax") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                tensors[key] = handle.get_tensor(key)
    return tensors


def load_checkpoint(
    directory, *, param_dtype=jnp.float32, dtype=None, sharding_fn: ShardingFn | None = None
) -> tuple[ModelConfig, Transformer]:
    """(config, model) from a local HF checkpoint directory: config.json + safetensors."""
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ValueError(f"no config.json in checkpoint directory {directory}")
    cfg = from_hf(json.loads(config_path.read_text()))
    tensors = read_safetensors(directory)
    return cfg, model_from_tensors(
        cfg, tensors, param_dtype=param_dtype, dtype=dtype, sharding_fn=sharding_fn
    )


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The inverse map (HF names, HF layouts), e.g. to save a trained policy for other tools."""
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(path)
        array = np.asarray(variable.get_value())
        out[name] = array.T if transposed else array
    return out


# ----------------------------------------------------------------------------- export


_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


def _rope(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    """One `rope_parameters` entry (transformers 5)."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    out = {"rope_type": scaling.kind, "factor": scaling.factor, "rope_theta": theta}
    if scaling.kind == "llama3":
        out.update(
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    return out


def _legacy_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    """transformers 4's `rope_scaling` for one `rope_parameters` entry."""
    if params["rope_type"] == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of `cfg` (both transformers 5's `rope_parameters` and 4's flat RoPE keys).
    Raises ValueError naming the fields when the family's HF config cannot say what `cfg` says
    (what `from_hf` reads back differs): e.g. QK-norm on Llama, or an attention logit soft-cap,
    which transformers' Gemma3 stores but never applies."""
    model_type, architecture = _ARCHITECTURES[cfg.family]
    eos = list(cfg.eos_token_ids)
    out: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.family == "gemma3":
        if cfg.query_pre_attn_scalar is None:  # the same scale, said as HF says it
            cfg = dataclasses.replace(cfg, query_pre_attn_scalar=float(cfg.head_dim))
        scalar = cfg.query_pre_attn_scalar
        if not float(scalar).is_integer():
            raise ValueError(
                f"the gemma3 model has settings a Hugging Face gemma3_text config cannot express: "
                f"query_pre_attn_scalar={scalar!r} (an int there)"
            )
        rope = {
            FULL: _rope(cfg.rope_theta, cfg.rope_scaling),
            SLIDING: _rope(cfg.rope_local_theta or 1e4, None),
        }
        out.update(
            hidden_activation="gelu_pytorch_tanh",
            attention_bias=False,
            query_pre_attn_scalar=int(scalar),
            sliding_window=cfg.sliding_window,
            layer_types=list(cfg.layer_types),
            final_logit_softcapping=cfg.final_logit_softcap,
            attn_logit_softcapping=None,
            rope_parameters=rope,
            rope_theta=cfg.rope_theta,
            rope_local_base_freq=rope[SLIDING]["rope_theta"],
            rope_scaling=_legacy_scaling(rope[FULL]),
        )
    else:
        rope = _rope(cfg.rope_theta, cfg.rope_scaling)
        out.update(
            hidden_act="silu",
            rope_parameters=rope,
            rope_theta=cfg.rope_theta,
            rope_scaling=_legacy_scaling(rope),
        )
        if cfg.family != "qwen2":  # Qwen2's q/k/v biases are implied by its model_type
            out["attention_bias"] = cfg.attention_bias
        if cfg.family == "llama":
            out["mlp_bias"] = cfg.mlp_bias
        else:
            out.update(use_sliding_window=False, sliding_window=None)
    back = from_hf(out)
    lost = [
        f"{f.name}={getattr(cfg, f.name)!r}"
        for f in dataclasses.fields(cfg)
        if getattr(back, f.name) != getattr(cfg, f.name)
    ]
    if lost:
        raise ValueError(
            f"the {cfg.family} model has settings a Hugging Face {model_type} config cannot "
            f"express: {', '.join(lost)}"
        )
    return out


def _shards(names: list[str], sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """`names`, in order, split greedily into groups of at most `max_bytes` (a larger tensor
    alone in its group)."""
    groups: list[list[str]] = [[]]
    total = 0
    for name in names:
        if groups[-1] and total + sizes[name] > max_bytes:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += sizes[name]
    return groups


def save_checkpoint(
    model: Transformer, directory, *, dtype=None, max_shard_bytes: int = 5 * 10**9
) -> list[str]:
    """Write `model` as a HF checkpoint into `directory` (created if missing): safetensors
    (sharded with model.safetensors.index.json above `max_shard_bytes`), a generation config when
    the model config names special tokens, and config.json last, so that a directory with a
    config.json is complete. `dtype` casts floating tensors (default: as they are). Returns the
    names of the files written."""
    from safetensors.numpy import save_file

    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    tensors = to_hf_tensors(model)
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        tensors = {
            k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for k, v in tensors.items()
        }
    floats = {str(v.dtype) for v in tensors.values() if jnp.issubdtype(v.dtype, jnp.floating)}
    if len(floats) != 1:
        raise ValueError(f"expected one floating dtype among the weights, got {sorted(floats)}")
    config = to_hf_config(model.cfg, floats.pop())
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    sizes = {name: tensors[name].nbytes for name in names}
    groups = _shards(names, sizes, max_shard_bytes)
    written = []
    if len(groups) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, group in zip(files, groups, strict=True):
        save_file(
            {n: np.ascontiguousarray(tensors[n]) for n in group},
            str(directory / file),
            metadata={"format": "pt"},
        )
        written.append(file)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {n: f for f, group in zip(files, groups, strict=True) for n in group},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        written.append("model.safetensors.index.json")
    generation = {
        key: config[key]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id")
        if config[key] is not None
    }
    if generation:
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        written.append("generation_config.json")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [*written, "config.json"]
