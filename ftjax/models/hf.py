"""Hugging Face-format checkpoints (config.json + safetensors) into the NNX Transformer.

Our parameter paths mirror HF names: `layers.3.self_attn.q_proj.kernel` is
`model.layers.3.self_attn.q_proj.weight` transposed (NNX kernels are [in, out]); embeddings and
norm weights map as they are. Loading never builds random weights first: the model is created
abstractly and each parameter is filled straight from its tensor, placed with `sharding_fn` (for
example a mesh sharding) as it is read.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax.models.config import ModelConfig, from_hf
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
