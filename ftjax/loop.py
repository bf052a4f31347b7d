"""The RL loop: prompts -> rollouts -> rewards and answer spans -> train steps, resumable exactly.

Dims: P prompts per step, G responses per prompt, B = P * G, L prompt slots, N new tokens,
R rows of the batch held by this process (R = B with one process).

Everything a step consumes is a pure function of (config, step index, train state): the task's
prompts for step s are `task.prompts(s * P, P)` and the sampling key is `fold_in(seed, s)`. So a
run resumed from the checkpoint after step s reproduces the uninterrupted run's metrics exactly.
With several processes each loads only the prompts of its own rows (`multihost.batch_rows`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import multihost, sampling, sharding, train
from ftjax.checkpoint import Checkpointer
from ftjax.logging import MetricsLogger, scalars


class Task(Protocol):
    """A prompt source and a verifier, both deterministic."""

    def prompts(self, start: int, count: int) -> list[list[int]]:
        """Token ids of prompts start, ..., start + count - 1 of the task's stream."""

    def score(self, prompt: list[int], response: list[int]) -> tuple[float, list[bool]]:
        """Reward of `response` and its answer span (a mask over the response tokens)."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 100
    prompts_per_step: int = 8
    prompt_len: int = 32  # prompt slots; shorter prompts are left-padded
    sampling: sampling.SamplingConfig = sampling.SamplingConfig()
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    seed: int = 0
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "prompt_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A held-out evaluation the loop runs after every `every` steps (0: never) and after the
    last step: `fn(policy, steps_done) -> scalars`, logged with that step's metrics."""

    every: int
    fn: Callable[[nnx.Module, int], dict[str, float]]

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"Evaluation.every must be >= 0, got {self.every}")

    def due(self, steps_done: int, total: int) -> bool:
        return steps_done == total or (self.every > 0 and steps_done % self.every == 0)


def left_pad(prompts: list[list[int]], slots: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    long = [i for i, p in enumerate(prompts) if len(p) > slots]
    if long:
        raise ValueError(
            f"prompt {long[0]} has {len(prompts[long[0]])} tokens, over the {slots} prompt slots"
        )
    tokens = np.full((len(prompts), slots), pad_id, np.int32)
    valid = np.zeros((len(prompts), slots), bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, slots - len(prompt) :] = prompt
            valid[row, slots - len(prompt) :] = True
    return tokens, valid


def rollout_batch(
    task: Task, prompts, rollout: sampling.Rollout, prompt_BxL, prompt_valid_BxL, group_size: int
) -> train.Batch:
    """Rewards, answer spans and masks for one rollout, laid out as prompt slots + response."""
    tokens_BxN = np.asarray(rollout.tokens_BxN)
    lengths_B = np.asarray(rollout.lengths_B)
    B, N = tokens_BxN.shape
    response_BxN = np.arange(N)[None, :] < lengths_B[:, None]
    answer_BxN = np.zeros((B, N), bool)
    rewards_B = np.zeros(B, np.float32)
    for b in range(B):
        response = tokens_BxN[b, : lengths_B[b]].tolist()
        reward, span = task.score(prompts[b // group_size], response)
        if len(span) != len(response):
            raise ValueError(
                f"task answer span has {len(span)} entries for a response of {len(response)} tokens"
            )
        rewards_B[b] = reward
        answer_BxN[b, : len(span)] = span
    pad = np.zeros_like(prompt_valid_BxL)
    return train.Batch(
        tokens_BxT=jnp.asarray(np.concatenate([prompt_BxL, tokens_BxN], axis=1)),
        prompt_mask_BxT=jnp.asarray(
            np.concatenate([prompt_valid_BxL, np.zeros_like(response_BxN)], axis=1)
        ),
        response_mask_BxT=jnp.asarray(np.concatenate([pad, response_BxN], axis=1)),
        answer_mask_BxT=jnp.asarray(np.concatenate([pad, answer_BxN], axis=1)),
        rewards_B=jnp.asarray(rewards_B),
        old_log_probs_BxT=jnp.asarray(
            np.concatenate(
                [np.zeros(prompt_BxL.shape, np.float32), np.asarray(rollout.log_probs_BxN)], 1
            )
        ),
    )


def batch_like(batch_size: int, tokens: int) -> train.Batch:
    """Shapes and dtypes of a rollout batch: the train step is placed on the mesh (and the
    state with it) before the first rollout, which samples from the placed parameters."""
    mask = jax.ShapeDtypeStruct((batch_size, tokens), jnp.bool_)
    return train.Batch(
        tokens_BxT=jax.ShapeDtypeStruct((batch_size, tokens), jnp.int32),
        prompt_mask_BxT=mask,
        response_mask_BxT=mask,
        answer_mask_BxT=mask,
        rewards_B=jax.ShapeDtypeStruct((batch_size,), jnp.float32),
        old_log_probs_BxT=jax.ShapeDtypeStruct((batch_size, tokens), jnp.float32),
    )


def run(
    model: nnx.Module,
    task: Task,
    step_cfg: train.StepConfig,
    cfg: LoopConfig,
    run_dir: str | pathlib.Path,
    evaluation: Evaluation | None = None,
) -> dict[int, dict[str, float]]:
    """Train `model` on `task` for `cfg.steps` steps, resuming from `run_dir` if it has a
    checkpoint. Returns the metrics of the steps run now (step -> scalars), with `evaluation`'s
    scalars on the steps after which it is due.

    Multi-host (after `multihost.initialize`), every process calls this with the same arguments:
    it loads the prompts of its own batch rows, samples on the global mesh, scores its own rows,
    and joins every checkpoint save; process 0 writes the logs. `run_dir` must be on a filesystem
    every process sees. Every process returns the same metrics, except its own `time/*`."""
    run_dir = pathlib.Path(run_dir)
    G, P = step_cfg.group_size, cfg.prompts_per_step
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, state = train.init_state(model, step_cfg, jax.random.PRNGKey(cfg.seed))
    # The jitted step donates its state; copy so the caller's `model` stays usable afterwards.
    state = dataclasses.replace(state, params=jax.tree.map(jnp.copy, state.params))
    step_fn, state = train.make_train_step(
        graphdef,
        state,
        batch_like(P * G, cfg.prompt_len + cfg.sampling.max_new_tokens),
        step_cfg,
        mesh,
    )
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
    start = 0
    if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore(state)
        start = int(meta["step"])
    # Row b of a step's batch answers prompt b // G. This process loads the prompts from its first
    # row's to its last row's: exactly its own when its rows are one block (always on one host).
    prompt_R = multihost.batch_rows(P * G, mesh) // G
    first, count = int(prompt_R[0]), int(prompt_R[-1] - prompt_R[0]) + 1
    loaded_R = prompt_R - first  # each row's prompt among the loaded ones
    sample_key = jax.random.PRNGKey(cfg.seed + 1)
    logger = (
        MetricsLogger(run_dir, total_steps=cfg.steps, initial_step=start, progress=cfg.progress)
        if multihost.is_main()
        else None
    )
    history = {}
    try:
        for step in range(start, cfg.steps):
            started = time.perf_counter()
            prompts = task.prompts(step * P + first, count)
            padded = left_pad(prompts, cfg.prompt_len, cfg.sampling.pad_id)
            prompt_RxL, valid_RxL = (x[loaded_R] for x in padded)
            policy = nnx.merge(graphdef, state.params)
            rollout = sampling.generate(
                policy,
                *sharding.global_batch((prompt_RxL, valid_RxL), mesh),
                jax.random.fold_in(sample_key, step),
                cfg.sampling,
            )
            mine = jax.tree.map(lambda x: multihost.host_rows(x, mesh), rollout)
            row_prompts = [prompts[i] for i in loaded_R]
            local = rollout_batch(task, row_prompts, mine, prompt_RxL, valid_RxL, group_size=1)
            batch = sharding.global_batch(local, mesh)
            rolled = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)  # waits for the step: the timing below is honest
            stepped = time.perf_counter()
            if evaluation is not None and evaluation.due(step + 1, cfg.steps):
                metrics = {**metrics, **evaluation.fn(nnx.merge(graphdef, state.params), step + 1)}
            history[step] = scalars(
                {
                    **metrics,
                    "response_length": int(jnp.sum(rollout.lengths_B)) / (P * G),
                    "time/rollout_s": rolled - started,
                    "time/step_s": stepped - rolled,
                }
            )
            if logger is not None:
                logger.log(step, history[step])
            if int(state.nonfinite_streak) >= step_cfg.optim.max_nonfinite_steps:
                raise RuntimeError(
                    f"{int(state.nonfinite_streak)} non-finite steps in a row at "
                    f"step {step}; last checkpoint is intact in {run_dir}"
                )
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                checkpoints.save(step + 1, state, {"step": step + 1})
    finally:
        if logger is not None:
            logger.close()
        checkpoints.close()
    return history
