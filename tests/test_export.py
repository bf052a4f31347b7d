"""`python -m experiments.export`: a run's checkpoint becomes a HF directory that transformers loads
with the same logits as ftjax, for every family; bad inputs are refused before anything is written.

Each family's tiny ftjax model (norm weights and biases moved off their init, so a dropped bias or
a (1 + w) / w mix-up shows) is saved as an RL run's train state with the project's checkpoint
code and the identity `loop.identity` records, then exported and read back by transformers
(torch, float32, eager attention).

Dims: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from experiments import export  # noqa: E402
from ftjax import checkpoint, loop, state_init, train  # noqa: E402
from ftjax.checkpoint import Checkpointer  # noqa: E402
from ftjax.models import config, hf  # noqa: E402
from ftjax.models.transformer import Transformer  # noqa: E402

LOGITS_ATOL = 1e-4
B, T = 2, 16
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


class PromptsTask:
    """All `loop.identity` asks of a task."""

    def prompts(self, start, count):
        return [[1 + (start + i) % 7, 2] for i in range(count)]


def tiny_model(family: str, seed: int = 0, **overrides) -> Transformer:
    """The family's tiny model, its 1-D parameters (norm weights, biases) perturbed and its
    matrices scaled up, so that logits are O(1) and every parameter matters."""
    model = Transformer(config.tiny(family, **overrides), rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    moved = [
        x + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 1 else 3.0 * x
        for x, k in zip(leaves, keys, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, moved))
    return model


def make_run(run_dir: pathlib.Path, model: Transformer, step: int = 3, config_json=None):
    """A run directory as `loop.run` leaves it: a train-state checkpoint whose record names its
    kind and the run's identity, and the run's config.json."""
    cfg = loop.LoopConfig(steps=step, prompts_per_step=2)
    identity = loop.identity(model, PromptsTask(), train.StepConfig(), cfg, config_json)
    _, state = state_init.init_state(model, train.StepConfig(), jax.random.PRNGKey(0))
    ckpt = Checkpointer(run_dir / "checkpoints")
    meta = {"step": step, "kind": checkpoint.TRAIN_STATE, "identity": identity}
    ckpt.save(step, state, meta)
    ckpt.close()
    written = config_json if config_json is not None else identity
    (run_dir / "config.json").write_text(json.dumps(written, default=str))


def random_tokens(vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(B, T), dtype=np.int32)


def hf_logits(directory: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens, np.int64)), use_cache=False)
    return out.logits.double().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_run_loads_in_transformers_with_ftjax_logits(tmp_path, family):
    model = tiny_model(family)
    run_dir = tmp_path / "run"
    make_run(run_dir, model)
    out = tmp_path / "hf"
    assert export.main(["--checkpoint", str(run_dir), "--out", str(out)]) == out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    tokens = random_tokens(model.cfg.vocab_size)
    ours = np.asarray(model(jnp.asarray(tokens)).logits_BxTxV, np.float64)
    theirs = hf_logits(out, tokens)
    assert np.abs(theirs).max() > 0.5  # the tolerance below is not vacuous
    np.testing.assert_allclose(theirs, ours, atol=LOGITS_ATOL, rtol=0)
    # ... and ftjax's own loader reads back the same config and the same bits.
    cfg, loaded = hf.load_checkpoint(out)
    assert cfg == model.cfg
    for name, array in hf.to_hf_tensors(model).items():
        np.testing.assert_array_equal(hf.to_hf_tensors(loaded)[name], array, err_msg=name)


def test_sharded_bf16_export_with_tokenizer_and_generation_config(tmp_path, capsys):
    model = tiny_model("qwen3", bos_token_id=1, eos_token_ids=(2, 3), pad_token_id=0)
    source = tmp_path / "Qwen3-tiny"  # the checkpoint the run started from
    source.mkdir()
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    (source / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    (source / "generation_config.json").write_text('{"eos_token_id": [2, 3], "temperature": 0.6}')
    run_dir = tmp_path / "run"
    make_run(run_dir, model, config_json={"model": str(source), "param_dtype": "float32"})
    out = tmp_path / "hf"
    argv = ["--checkpoint", str(run_dir / "checkpoints"), "--out", str(out)]
    export.main([*argv, "--max_shard_mb", "0.2", "--dtype", "bfloat16"])
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert sorted(index["weight_map"]) == sorted(hf.to_hf_tensors(model))
    copied = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    for name in (*copied, "generation_config.json"):  # the publisher's generation settings win
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert f"from {source}: generation_config.json, tokenizer.json," in capsys.readouterr().out
    # The bf16 weights are the float32 ones rounded, and transformers reads them as such.
    _, loaded = hf.load_checkpoint(out, param_dtype=jnp.bfloat16)
    for name, array in hf.to_hf_tensors(model).items():
        want = np.asarray(jnp.asarray(array).astype(jnp.bfloat16))
        np.testing.assert_array_equal(hf.to_hf_tensors(loaded)[name], want, err_msg=name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf_model.dtype == torch.bfloat16
    assert hf_model.generation_config.temperature == 0.6


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="--checkpoint RUN_DIR and --out"):
        export.main(["--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="neither a run directory"):
        export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        export.main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()

    run_dir = tmp_path / "run"
    make_run(run_dir, tiny_model("llama"))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass --overwrite true"):
        export.main(["--checkpoint", str(run_dir), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "model-00001-of-00002.safetensors").write_text("stale")  # an earlier, larger export
    export.main(["--checkpoint", str(run_dir), "--out", str(out), "--overwrite", "true"])
    left = sorted(p.name for p in out.iterdir())
    assert left == ["config.json", "model.safetensors", "notes.txt"]


@pytest.mark.parametrize(
    ("family", "overrides", "named"),
    [
        ("llama", {"qk_norm": True}, "qk_norm=True"),  # a from-scratch switch HF Llama lacks
        ("gemma3", {"attn_logit_softcap": 50.0}, "attn_logit_softcap=50.0"),
        ("qwen2", {"attention_bias": False}, "attention_bias=False"),  # Qwen2 always has them
    ],
)
def test_a_model_hf_cannot_express_is_refused(tmp_path, family, overrides, named):
    make_run(tmp_path / "run", tiny_model(family, **overrides))
    with pytest.raises(ValueError, match=f"config cannot express: .*{named}"):
        export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_without_a_model_config_is_refused(tmp_path):
    """A warm-up's parameters (no identity), or a policy that is not a ftjax Transformer."""
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    params = nnx.state(tiny_model("llama"), nnx.Param)
    ckpt.save(5, params, {"step": 5, "kind": checkpoint.PARAMS})
    ckpt.close()
    with pytest.raises(ValueError, match="records no model config"):
        export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_round_trips_every_field(family):
    """`from_hf(to_hf_config(cfg)) == cfg`, also with the optional switches each family has."""
    extra = {
        "llama": dict(attention_bias=True, output_bias=True, mlp_bias=True, tie_embeddings=True,
                      rope_scaling=config.RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),
        "qwen2": dict(tie_embeddings=True, rope_theta=1e6),
        "qwen3": dict(attention_bias=True, output_bias=True, eos_token_ids=(5,)),
        "gemma3": dict(final_logit_softcap=30.0, rope_scaling=config.RopeScaling("linear", 8.0)),
    }[family]
    for cfg in (config.tiny(family), config.tiny(family, **extra)):
        hf_config = hf.to_hf_config(cfg)
        assert config.from_hf(hf_config) == cfg
        legacy = {k: v for k, v in hf_config.items() if k != "rope_parameters"}
        assert config.from_hf(legacy) == cfg  # what transformers 4.x reads says the same


def test_a_math_rl_run_exports_with_its_starting_models_tokenizer(tmp_path):
    """The whole real path: `experiments.math_rl` trains a step from a HF directory with its own
    tokenizer; the export carries the trained weights and that tokenizer."""
    from experiments import math_rl, synthetic_math, tiny_model
    from ftjax.models import pretrained

    train_path, _ = synthetic_math.write(tmp_path / "data", 16, 4, seed=0)
    texts = [json.loads(line)["question"] for line in train_path.read_text().splitlines()]
    source = tiny_model.write(tmp_path / "model", texts, vocab_size=400)
    run_dir = tmp_path / "run"
    math_rl.main([
        "--model", str(source), "--run_dir", str(run_dir), "--data.path", str(train_path),
        "--eval.enabled", "false", "--loop.steps", "1", "--loop.prompts_per_step", "4",
        "--step.group_size", "2", "--loop.prompt_len", "96", "--loop.sampling.max_new_tokens", "4",
        "--loop.progress", "false", "--step.optim.lr", "1e-2",
        "--step.optim.weight_decay", "0.5",  # moves every weight even when all rewards are equal
    ])  # fmt: skip
    out = tmp_path / "hf"
    export.main(["--checkpoint", str(run_dir), "--out", str(out)])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    generation = json.loads((out / "generation_config.json").read_text())  # from the config's ids
    assert generation == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    start = pretrained.load(str(source)).model
    trained, step = state_init.restore_policy(start, run_dir / "checkpoints")
    assert step == 1
    start = hf.to_hf_tensors(start)
    for name, array in hf.to_hf_tensors(trained).items():  # trained weights, not the starting ones
        assert not np.array_equal(array, start[name]), name
    text = "Ana has 7 apples."
    ids = transformers.AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False).input_ids
    assert ids == pretrained.HFTokenizer(out).encode(text, add_bos=False)
    tokens = np.asarray([ids + ids[:2]], np.int32)
    ours = np.asarray(trained(jnp.asarray(tokens)).logits_BxTxV, np.float64)
    np.testing.assert_allclose(hf_logits(out, tokens), ours, atol=LOGITS_ATOL, rtol=0)
