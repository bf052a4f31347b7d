"""A policy's parameters as one safetensors file with a JSON record: small models shipped in the
repository (the quickstart's warm-up), readable by any safetensors reader.

Tensor names are the parameter paths joined by "/" (`layers/0/attn/q_proj/kernel`); the record
(any JSON-serialisable dict, e.g. the settings that made the parameters) is stored as the file's
metadata under "record". `save` writes a temporary file and renames it, so a crash never leaves
a half-written file under the final name; `load` checks that every parameter of the model is in
the file with its shape and dtype, and that the file holds nothing else.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from flax import nnx


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _flat(params_state) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params_state))
    return {_name(path): np.asarray(value) for path, value in leaves}


def save(path: str | pathlib.Path, params_state, record: dict) -> None:
    """Write `params_state` (an nnx.Param state) and `record` to `path` (atomically)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _flat(params_state)
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise ValueError(f"parameter {name} is not finite; not writing {path}")
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"record": json.dumps(record, sort_keys=True)})
    os.replace(partial, path)


def record(path: str | pathlib.Path) -> dict:
    """The JSON record stored in the file (without reading its tensors)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return json.loads((f.metadata() or {}).get("record", "{}"))


def load(path: str | pathlib.Path, model: nnx.Module) -> dict:
    """Put the file's parameters into `model` (in place); returns the file's record. A missing,
    extra or differently shaped tensor is a ValueError naming it, and `model` is left as it was."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"no parameter file at {path}")
    tensors = load_file(str(path))
    like = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(like))
    names = [_name(p) for p, _ in leaves]
    if missing := sorted(set(names) - set(tensors)):
        raise ValueError(f"{path} lacks parameters {missing[:5]} (of {len(missing)})")
    if extra := sorted(set(tensors) - set(names)):
        raise ValueError(f"{path} has parameters the model does not: {extra[:5]}")
    for name, (_, value) in zip(names, leaves, strict=True):
        if tensors[name].shape != value.shape or tensors[name].dtype != value.dtype:
            raise ValueError(
                f"{path}: parameter {name} is {tensors[name].dtype}{list(tensors[name].shape)}, "
                f"the model's is {value.dtype}{list(value.shape)}"
            )
    pure = jax.tree_util.tree_unflatten(treedef, [tensors[n] for n in names])
    nnx.replace_by_pure_dict(like, pure)
    nnx.update(model, like)
    return record(path)
