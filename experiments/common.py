"""Pieces the experiments share: the tiny policy, warm-up with a checkpoint, RL runs, evaluation.

Dims: B responses, T tokens (prompt slots + response slots).

Task index streams never overlap: RL prompts are indices [0, ...), held-out evaluation prompts
[EVAL_START, ...), warm-up demonstrations [WARMUP_START, ...).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from ftjax import credit, evaluation, loop, sampling, sft, train
from ftjax.checkpoint import Checkpointer
from ftjax.logging import MetricsLogger, read_jsonl
from ftjax.models import config as model_config
from ftjax.models.transformer import Transformer
from ftjax.tasks.vocab import EOS, PAD, VOCAB

EVAL_START = 10**6
WARMUP_START = 2 * 10**6


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """A from-scratch Llama-family policy over the task vocabulary."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4

    def __post_init__(self):
        if self.layers < 1 or self.heads < 1 or self.hidden % self.heads:
            raise ValueError(
                f"PolicyConfig needs layers >= 1 and hidden divisible by heads, got {self}"
            )

    def model_config(self) -> model_config.ModelConfig:
        return model_config.tiny(
            "llama",
            vocab_size=VOCAB.size,
            num_layers=self.layers,
            hidden_size=self.hidden,
            intermediate_size=4 * self.hidden,
            num_heads=self.heads,
            num_kv_heads=self.heads,
            head_dim=self.hidden // self.heads,
            max_position_embeddings=256,
            eos_token_ids=(EOS,),
            pad_token_id=PAD,
        )


def build_policy(cfg: PolicyConfig, seed: int) -> Transformer:
    return Transformer(cfg.model_config(), rngs=nnx.Rngs(seed))


def sampling_config(max_new_tokens: int, temperature: float) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, eos_ids=(EOS,), pad_id=PAD
    )


def warm_up(
    model: Transformer,
    task,
    cfg: sft.SFTConfig,
    prompt_len: int,
    response_len: int,
    run_dir: pathlib.Path,
    progress: bool = True,
) -> float:
    """Supervised warm-up on the task's solver traces, logged to run_dir/metrics.jsonl and
    checkpointed; a finished warm-up in run_dir is restored instead of redone. Returns seconds."""
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=1)
    params = nnx.state(model, nnx.Param)
    try:
        if checkpoints.latest_step() == cfg.steps:
            restored, _ = checkpoints.restore(params)
            nnx.update(model, restored)
            return 0.0
        logger = MetricsLogger(
            run_dir, total_steps=cfg.steps, console_keys=("loss",), progress=progress
        )
        started = time.perf_counter()
        try:
            sft.warm_up(
                model,
                lambda start, count: task.demonstrations(WARMUP_START + start, count),
                cfg,
                prompt_len,
                response_len,
                PAD,
                on_step=lambda step, loss: logger.log(step, {"loss": loss}),
            )
        finally:
            logger.close()
        seconds = time.perf_counter() - started
        checkpoints.save(cfg.steps, nnx.state(model, nnx.Param), {"step": cfg.steps})
        return seconds
    finally:
        checkpoints.close()


def rl_run(
    warm_params,
    policy: PolicyConfig,
    task,
    step_cfg: train.StepConfig,
    loop_cfg: loop.LoopConfig,
    run_dir: pathlib.Path,
) -> tuple[Transformer, dict[int, dict[str, float]]]:
    """RL from the warm-up parameters; resumes a run directory that has checkpoints. Returns
    the trained policy and every step's metrics (read back from the run's JSONL)."""
    model = build_policy(policy, seed=0)
    nnx.update(model, warm_params)
    loop.run(model, task, step_cfg, loop_cfg, run_dir)
    restored = Checkpointer(run_dir / "checkpoints", keep=loop_cfg.keep_checkpoints)
    try:
        graphdef, state = train.init_state(model, step_cfg, jax.random.PRNGKey(loop_cfg.seed))
        state, _ = restored.restore(state)
    finally:
        restored.close()
    trained = nnx.merge(graphdef, state.params)
    return trained, read_jsonl(run_dir / "metrics.jsonl")


def write_result(out_dir: pathlib.Path, stem: str, result: dict, table: str) -> None:
    """Print an experiment's table and keep it as out_dir/stem.md, its numbers as stem.json."""
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table + "\n")


def median_step_seconds(history: dict[int, dict[str, float]], key: str = "time/step_s") -> float:
    """Median over steps, the first (compilation) left out."""
    times = [m[key] for step, m in sorted(history.items()) if step > min(history) and key in m]
    return float(np.median(times)) if times else float("nan")


def credit_precision(
    model,
    task,
    variants: list[str],
    count: int,
    prompt_len: int,
    max_new_tokens: int,
    rng,
    fraction: float = 0.4,
) -> dict[str, float]:
    """precision@fraction of each variant's gamma against the task's ground-truth labels, on
    `count` sampled responses (temperature 1) to held-out prompts that have an answer span."""
    got = evaluation.sample(
        model, task, EVAL_START, count, prompt_len, sampling_config(max_new_tokens, 1.0), rng
    )
    labels_BxT = evaluation.task_labels(task, got)
    gammas = evaluation.credit_gammas(
        model, got.batch, variants, credit.CreditConfig(), train.StepConfig().capture, rng
    )
    answer_BxT = np.asarray(got.batch.answer_mask_BxT)
    keep_B = answer_BxT.any(-1)
    return {
        name: evaluation.precision(
            gamma_BxT[keep_B],
            labels_BxT[keep_B],
            answer_BxT[keep_B],
            np.asarray(got.batch.response_mask_BxT)[keep_B],
            fraction,
        )
        for name, gamma_BxT in gammas.items()
    }


def load_policy(checkpoint_dir: pathlib.Path, policy: PolicyConfig) -> Transformer:
    """The policy parameters of the latest checkpoint in `checkpoint_dir` (a warm-up's or an RL
    run's)."""
    model = build_policy(policy, seed=0)
    checkpoints = Checkpointer(checkpoint_dir, keep=1)
    try:
        if checkpoints.latest_step() is None:
            raise ValueError(f"no checkpoint in {checkpoint_dir}; run the quickstart first")
        params = nnx.state(model, nnx.Param)
        try:  # an RL run's checkpoint holds a whole train state
            _, like = train.init_state(model, train.StepConfig(), jax.random.PRNGKey(0))
            state, _ = checkpoints.restore(like)
            params = state.params
        except (ValueError, KeyError, TypeError):  # a warm-up checkpoint holds the params only
            params, _ = checkpoints.restore(params)
    finally:
        checkpoints.close()
    nnx.update(model, params)
    return model
