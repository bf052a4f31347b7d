"""Export a run's policy as a Hugging Face checkpoint directory (transformers, vLLM, ...).

    python -m experiments.export --checkpoint runs/math_rl --out exports/math_rl
    python -m experiments.export --checkpoint runs/math_rl --out exports/math_rl --dtype bfloat16

--checkpoint is a run directory (or its checkpoints/ directory, as `experiments.evaluate` takes
it); its latest checkpoint's policy is written to --out: config.json, the weights as safetensors
(sharded with an index above --max_shard_mb), a generation config with the model's special token
ids, and the tokenizer files (and generation config) of the checkpoint the run started from (the
run's recorded `model`, or --tokenizer DIR), when it has any. The model config comes from the
identity every RL checkpoint records (`loop.identity`), so the export needs nothing but the run
directory. A model whose settings a Hugging Face config cannot express is refused before anything
is written; so is a non-empty --out without --overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import checkpoint, overrides, state_init
from ftjax.checkpoint import Checkpointer
from ftjax.models import hf, pretrained
from ftjax.models.config import ModelConfig, RopeScaling
from ftjax.models.transformer import Transformer

# The files of a HF checkpoint directory that describe its tokenizer (and chat template), and its
# generation settings (the publisher's, which replace the one made from the model config's ids).
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = ""  # a run directory, or its checkpoints/ directory
    out: str = ""  # the Hugging Face checkpoint directory to write
    dtype: str | None = None  # float32 or bfloat16; none: as trained
    max_shard_mb: float = 5000.0  # larger weights are split into shards with an index
    tokenizer: str | None = None  # copy tokenizer files from here; none: the run's starting model
    overwrite: bool = False  # write into a non-empty --out (its old weights are removed first)

    def __post_init__(self):
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"ExportConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not self.max_shard_mb > 0:
            raise ValueError(f"ExportConfig.max_shard_mb must be > 0, got {self.max_shard_mb}")


def checkpoint_dirs(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(run directory, its checkpoints directory) from either of the two."""
    path = pathlib.Path(path)
    if (path / "checkpoints").is_dir():
        return path, path / "checkpoints"
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path.parent, path
    raise ValueError(f"{path} is neither a run directory with checkpoints/ nor a checkpoints one")


def model_config(identity: Mapping[str, str] | None, where: object) -> ModelConfig:
    """The ModelConfig a checkpoint's identity records (its `model.*` keys, `rundir.flatten`ed)."""
    fields = {
        key.removeprefix("model."): json.loads(value)
        for key, value in (identity or {}).items()
        if key.startswith("model.")
    }
    if not fields:
        raise ValueError(
            f"{where} records no model config: only an RL run's checkpoint of a ftjax Transformer "
            f"(a Llama, Qwen2, Qwen3 or Gemma3 family model) can be exported"
        )
    scaling = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("rope_scaling.")}
    plain = {k: v for k, v in fields.items() if "." not in k}
    if scaling:
        plain["rope_scaling"] = RopeScaling(**scaling)
    for name in ("layer_types", "eos_token_ids"):
        if isinstance(plain.get(name), list):
            plain[name] = tuple(plain[name])
    try:
        return ModelConfig(**plain)
    except TypeError as error:
        raise ValueError(
            f"{where} records a model config this ftjax cannot read ({error})"
        ) from None


def param_dtype(dtypes: Mapping[str, str], kind: str, where: object) -> str:
    """The one floating dtype of the policy's parameters in a checkpoint's array dtypes."""
    prefix = "params." if kind == checkpoint.TRAIN_STATE else ""
    floats = {d for name, d in dtypes.items() if name.startswith(prefix) and "float" in d}
    if len(floats) != 1:
        raise ValueError(f"{where}: expected one parameter dtype, found {sorted(floats)}")
    return floats.pop()


def source_model(run_dir: pathlib.Path, identity: Mapping[str, str] | None) -> str | None:
    """The `model` the run started from (a checkpoint directory or a name), as it recorded it."""
    config = run_dir / "config.json"
    recorded = json.loads(config.read_text()).get("model") if config.is_file() else None
    if recorded is None and identity and "model" in identity:
        recorded = json.loads(identity["model"])
    return recorded if isinstance(recorded, str) else None


def check_out(out: pathlib.Path, overwrite: bool) -> None:
    """Refuse an `out` that is a file, or a non-empty directory without `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite true")


def remove_stale(out: pathlib.Path) -> None:
    """Remove the weights, index and config an earlier export left in `out`: a stale shard or
    single file would be read instead of the new ones."""
    if out.is_dir():
        for stale in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
            stale.unlink()
        (out / "config.json").unlink(missing_ok=True)


def copy_from_source(source: pathlib.Path, out: pathlib.Path) -> list[str]:
    copied = [name for name in COPIED_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, out / name)
    return copied


def restore(cfg: ModelConfig, checkpoints: pathlib.Path, dtype: str) -> tuple[Transformer, int]:
    """The latest policy in `checkpoints` (`state_init.restore_policy`), restored on this host's CPU
    whatever mesh the run had, into a model made abstractly (no random weights are computed)."""
    cpu = jax.local_devices(backend="cpu")[0]
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(dtype)))
    graphdef, shapes = nnx.split(model)
    placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_cpu), shapes)
    with jax.default_device(cpu):  # where the optimiser state it restores alongside is made
        return state_init.restore_policy(nnx.merge(graphdef, placed), checkpoints)


def main(argv: list[str]) -> pathlib.Path:
    cfg = overrides.apply(ExportConfig(), argv)
    if not cfg.checkpoint or not cfg.out:
        raise ValueError("give both --checkpoint RUN_DIR and --out HF_DIR")
    run_dir, checkpoints = checkpoint_dirs(cfg.checkpoint)
    out = pathlib.Path(cfg.out)
    reader = Checkpointer(checkpoints, keep=1)
    try:
        record = reader.meta()
        dtypes = reader.array_dtypes()
    finally:
        reader.close()
    where = f"checkpoint {record.get('step')} in {checkpoints}"
    model_cfg = model_config(record.get("identity"), where)
    hf.to_hf_config(model_cfg)  # a model HF cannot express is refused before any work
    tokenizer = cfg.tokenizer
    if tokenizer is not None and not pathlib.Path(tokenizer).is_dir():
        raise ValueError(f"--tokenizer {tokenizer} is not a directory")
    check_out(out, cfg.overwrite)
    model, step = restore(model_cfg, checkpoints, param_dtype(dtypes, record.get("kind"), where))
    remove_stale(out)
    written = hf.save_checkpoint(
        model, out, dtype=cfg.dtype, max_shard_bytes=int(cfg.max_shard_mb * 10**6)
    )
    source = tokenizer or source_model(run_dir, record.get("identity"))
    copied = []
    if source is not None and pathlib.Path(source).is_dir():
        copied = copy_from_source(pathlib.Path(source), out)
    elif source == pretrained.GEMMA3_270M:
        print(f"no tokenizer files: {source} is a GGUF; pass --tokenizer DIR", file=sys.stderr)
    elif source is not None:
        print(f"no tokenizer files: {source} is not here; pass --tokenizer DIR", file=sys.stderr)
    print(
        f"step {step} of {run_dir} ({model_cfg.family}) -> {out}: {', '.join(written)}"
        + (f"; from {source}: {', '.join(copied)}" if copied else "; no tokenizer")
    )
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
