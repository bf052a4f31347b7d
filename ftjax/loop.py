"""The RL loop: prompts -> rollouts -> rewards and answer spans -> train steps, resumable exactly.

Dims: P prompts per step, G responses per prompt, B = P * G, L prompt slots, N new tokens,
R rows of the batch held by this process (R = B with one process).

Everything a step consumes is a pure function of (config, step index, train state): the task's
prompts for step s are `task.prompts(s * P, P)` and the sampling key is `fold_in(seed, s)`. So a
run resumed from the checkpoint after step s reproduces the uninterrupted run's metrics exactly.
With several processes each loads only the prompts of its own rows (`rollout.ProcessRows`).

One rollout batch makes `epochs x minibatches` optimizer updates. With one (the default, and the
paper's setting) the train step computes old log-probs' ratio, credit and loss in one pass. With
more, `train.prepare` first computes the pre-update policy's log-probs and credit once for the whole
batch; each epoch then walks the minibatches in order, each a contiguous block of whole groups.
With `kl_coef > 0` the reference policy is a frozen copy of `model`'s parameters as passed in (the
start of training, also on resume), and its log-probs are computed with the rollout batch. A
credit variant that reads ground-truth labels (`oracle`) gets them from `task.labels` for every
row (`train.needs_labels`); a task without `labels` is refused before any work. With
`log_completions_every`, the steps that log write their completions with per-token credit
(`ftjax.completions`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ftjax import (
    checkpoint,
    completions,
    mesh_step,
    multihost,
    rollout,
    rundir,
    sampling,
    sharding,
    state_init,
    train,
)
from ftjax.checkpoint import Checkpointer
from ftjax.logging import MetricsLogger, WandbConfig, scalars


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 100  # RL steps (rollout batches)
    prompts_per_step: int = 8  # prompts per rollout batch, each sampled group_size times
    prompt_len: int = 32  # prompt slots; shorter prompts are left-padded
    sampling: sampling.SamplingConfig = sampling.SamplingConfig()
    checkpoint_every: int = 50  # steps between checkpoints (and after the last)
    keep_checkpoints: int = 3  # the latest this many are kept
    seed: int = 0  # random keys of the train state and of sampling
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    progress: bool = True  # a progress bar on stderr
    epochs: int = 1  # optimisation passes over each rollout batch
    minibatches: int = 1  # optimizer updates per pass; each takes prompts_per_step / minibatches
    # Write the step's completions (text, reward, answer span, gamma and tau per token) to
    # completions.jsonl and completions/step_N.html every this many steps and at each
    # evaluation (`ftjax.completions`; one extra forward pass then); 0: never.
    log_completions_every: int = 0
    wandb: WandbConfig = WandbConfig()  # Weights & Biases logging, off by default

    def __post_init__(self):
        for name in (
            "steps",
            "prompts_per_step",
            "prompt_len",
            "checkpoint_every",
            "epochs",
            "minibatches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.log_completions_every < 0:
            raise ValueError(
                f"LoopConfig.log_completions_every must be >= 0, got {self.log_completions_every}"
            )
        if self.prompts_per_step % self.minibatches:
            raise ValueError(
                f"LoopConfig.minibatches ({self.minibatches}) must divide prompts_per_step "
                f"({self.prompts_per_step}): a minibatch holds whole groups"
            )


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


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` returns: the final train state (on the mesh), the model's graph to rebuild the
    policy, and the metrics of the steps run by this call (step -> scalars)."""

    graphdef: nnx.GraphDef
    state: train.TrainState
    history: dict[int, dict[str, float]]

    def policy(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.state.params)


@dataclasses.dataclass(frozen=True)
class Updates:
    """The jitted functions that turn one rollout batch into optimizer updates."""

    step: Callable  # (state, batch) -> (state, metrics)
    prepare: Callable | None  # (state, batch) -> batch with old log-probs and gamma
    minibatch: Callable | None  # (batch, index) -> that minibatch
    reference: Callable | None  # batch -> ref_log_probs_BxT

    @staticmethod
    def build(graphdef, state, model, step_cfg, cfg: LoopConfig, mesh):
        """(the functions, state placed on the mesh)."""
        B = cfg.prompts_per_step * step_cfg.group_size
        T = cfg.prompt_len + cfg.sampling.max_new_tokens
        several = cfg.epochs * cfg.minibatches > 1
        kl = step_cfg.loss.kl_coef > 0
        labels = train.needs_labels(step_cfg)
        P = cfg.prompt_len
        whole = rollout.batch_like(B, T, reference=kl, labels=labels, response_start=P)
        part = rollout.batch_like(
            B // cfg.minibatches, T, reference=kl, gamma=several, labels=labels, response_start=P
        )
        step_fn, state = mesh_step.make_train_step(graphdef, state, part, step_cfg, mesh)
        mesh_step.check_fits(step_fn, state, part, mesh)
        prepare = minibatch = reference = None
        if several:
            prepare = mesh_step.make_prepare(graphdef, state, whole, step_cfg, mesh)
            rows = B // cfg.minibatches
            minibatch = jax.jit(
                lambda batch, m: jax.tree.map(
                    lambda x: jax.lax.dynamic_slice_in_dim(x, m * rows, rows, 0), batch
                ),
                out_shardings=sharding.batch_sharding(mesh),
            )
        if kl:
            reference = mesh_step.make_reference(
                graphdef, nnx.state(model, nnx.Param), whole, mesh, step_cfg
            )
        return Updates(step_fn, prepare, minibatch, reference), state

    def apply(self, state, batch: train.Batch, cfg: LoopConfig):
        """(state after every update of this batch, metrics: the mean over the updates)."""
        if self.prepare is None:
            state, metrics = self.step(state, batch)
            return state, jax.device_get(metrics)  # waits for the step: timings stay honest
        batch = self.prepare(state, batch)
        every = []
        for _ in range(cfg.epochs):
            for m in range(cfg.minibatches):
                state, metrics = self.step(state, self.minibatch(batch, m))
                every.append(jax.device_get(metrics))
        return state, {k: float(np.mean([m[k] for m in every])) for k in every[0]}


def _nonfinite_cause(metrics: dict[str, float]) -> str:
    """The first place a non-finite value appeared in a skipped step, as the step logged it."""
    for name, what in (
        ("rewards", "the task's rewards"),
        ("loss", "the loss"),
        ("grads", "the gradients"),
        ("update", "the update (learning rate, clipping, optimiser state)"),
    ):
        if metrics.get(f"nonfinite/{name}", 0.0) > 0:
            return f"non-finite {what}"
    return "cause not logged"


def _collect(
    policy, task: rollout.Task, rows: rollout.ProcessRows, step: int, cfg, mesh, key, labels
):
    """(the step's global rollout batch, its mean response length): this process pads and scores
    (and labels, with `labels`) its own rows; sampling runs on the global mesh."""
    row_prompts = rows.prompts(task, step * cfg.prompts_per_step)
    prompt_RxL, valid_RxL = rollout.left_pad(row_prompts, cfg.prompt_len, cfg.sampling.pad_id)
    generated = sampling.generate(
        policy, *sharding.global_batch((prompt_RxL, valid_RxL), mesh), key, cfg.sampling
    )
    mine = jax.tree.map(lambda x: multihost.host_rows(x, mesh), generated)
    local = rollout.rollout_batch(
        task, row_prompts, mine, prompt_RxL, valid_RxL, group_size=1, labels=labels
    )
    B = generated.lengths_B.shape[0]
    return sharding.global_batch(local, mesh), int(jnp.sum(generated.lengths_B)) / B


def identity(model, task, step_cfg, cfg: LoopConfig, config: Mapping | None = None):
    """The run's identity (`rundir.flatten`ed): step and loop configs, overridden by the caller's
    full `config` where it names the same keys, plus the model's config and the task's identity."""
    tree = {"step": step_cfg, "loop": cfg}
    flat = rundir.flatten(tree)
    if config is not None:
        flat.update(rundir.flatten(config))
    flat.update(rundir.flatten({"model": getattr(model, "cfg", {})}))
    flat.update(rundir.flatten({"task": rundir.task_identity(task, cfg.prompts_per_step)}))
    return flat


def run(
    model: nnx.Module,
    task: rollout.Task,
    step_cfg: train.StepConfig,
    cfg: LoopConfig,
    run_dir: str | pathlib.Path,
    evaluation: Evaluation | None = None,
    config: Mapping | None = None,
    allow: Sequence[str] = (),
) -> RunResult:
    """Train `model` on `task` for `cfg.steps` steps, resuming from `run_dir` if it has a
    checkpoint. Returns the final state and the metrics of the steps run now, with
    `evaluation`'s scalars on the steps after which it is due. `model` itself is left unchanged.

    The run directory is locked while this runs (`rundir.RunLock`). `config` (the experiment's
    whole config, JSON-able) is written to run_dir/config.json and, with the model's and task's
    identity, to every checkpoint: a resume under a config that differs outside `allow` (dotted
    keys) is refused before anything is restored (`rundir.check_resume`).

    Multi-host (after `multihost.initialize`), every process calls this with the same arguments:
    it loads the prompts of its own batch rows, samples on the global mesh, scores its own rows,
    and joins every checkpoint save; process 0 writes the logs. `run_dir` must be on a filesystem
    every process sees. Every process returns the same metrics, except its own `time/*`."""
    run_dir = pathlib.Path(run_dir)
    with rundir.RunLock(run_dir, enabled=multihost.is_main()):
        return _run(model, task, step_cfg, cfg, run_dir, evaluation, config, tuple(allow))


def _run(model, task, step_cfg, cfg: LoopConfig, run_dir, evaluation, config, allow):
    if train.needs_labels(step_cfg):
        rollout.check_labels(task, f"credit variant {step_cfg.credit.name!r}")
    current = identity(model, task, step_cfg, cfg, config)
    checkpoints = Checkpointer(run_dir / "checkpoints", keep=cfg.keep_checkpoints)
    try:
        mesh = sharding.make_mesh(cfg.mesh)
        # Made sharded (no device holds the whole Adam state); the parameters are copied, since
        # the jitted step donates its state and the caller's `model` must stay usable.
        graphdef, state = state_init.init_state_placed(
            model, step_cfg, jax.random.PRNGKey(cfg.seed), mesh
        )
        updates, state = Updates.build(graphdef, state, model, step_cfg, cfg, mesh)
        start = 0
        if checkpoints.latest_step() is not None:  # the identity is checked before any restore

            def same_run(meta):
                stored = meta.get("identity")
                rundir.check_resume(run_dir, stored, current, int(meta["step"]), allow)

            state, meta = checkpoints.restore_intact(state, same_run)
            start = int(meta["step"])
        if multihost.is_main():
            written = config if config is not None else current
            (run_dir / "config.json").write_text(json.dumps(written, indent=2, default=str) + "\n")
        placed = _Placed(graphdef, state, updates, mesh, start, current)
        return _train(task, step_cfg, cfg, run_dir, evaluation, checkpoints, placed)
    finally:
        checkpoints.close()


class _Placed(NamedTuple):
    """A run ready to step: the state on the mesh (restored if resuming) and its functions."""

    graphdef: nnx.GraphDef
    state: train.TrainState
    updates: Updates
    mesh: jax.sharding.Mesh
    start: int  # the first step to run
    identity: dict[str, str]


def _train(task, step_cfg, cfg, run_dir, evaluation, checkpoints, placed: _Placed) -> RunResult:
    graphdef, state, updates, mesh, start, current = placed
    rows = rollout.ProcessRows.of(cfg.prompts_per_step, step_cfg.group_size, mesh)
    sample_key = jax.random.PRNGKey(cfg.seed + 1)
    logger = None
    if multihost.is_main():
        logger = MetricsLogger(
            run_dir,
            cfg.steps,
            initial_step=start,
            progress=cfg.progress,
            wandb=cfg.wandb,
            config={key: json.loads(value) for key, value in current.items()},
        )
    probe = None  # gamma and tau per token for the completions the step logs
    if cfg.log_completions_every:
        shapes = rollout.batch_like(
            cfg.prompts_per_step * step_cfg.group_size,
            cfg.prompt_len + cfg.sampling.max_new_tokens,
            reference=updates.reference is not None,
            labels=train.needs_labels(step_cfg),
            response_start=cfg.prompt_len,
        )
        probe = completions.make_credit_tokens(graphdef, state, shapes, step_cfg, mesh)
    history = {}
    try:
        for step in range(start, cfg.steps):
            started = time.perf_counter()
            policy = nnx.merge(graphdef, state.params)
            key = jax.random.fold_in(sample_key, step)
            batch, response_length = _collect(
                policy, task, rows, step, cfg, mesh, key, train.needs_labels(step_cfg)
            )
            if updates.reference is not None:
                batch = dataclasses.replace(batch, ref_log_probs_BxT=updates.reference(batch))
            rolled = time.perf_counter()
            evaluating = evaluation is not None and evaluation.due(step + 1, cfg.steps)
            credit_BxT = None
            if probe is not None and completions.due(
                step + 1, cfg.log_completions_every, evaluating
            ):
                credit_BxT = jax.block_until_ready(probe(state, batch))  # the step donates state
            probed = time.perf_counter()
            state, metrics = updates.apply(state, batch, cfg)
            stepped = time.perf_counter()
            if evaluating:
                metrics = {**metrics, **evaluation.fn(nnx.merge(graphdef, state.params), step + 1)}
            if credit_BxT is not None and logger is not None:  # process 0 writes its rows
                written = time.perf_counter()
                shown = completions.host_records(task, step, batch, *credit_BxT, mesh)
                completions.write(run_dir, step, shown)
                logger.log_completions(step, shown)
                written = time.perf_counter() - written
                metrics = {**metrics, "time/completions_s": probed - rolled + written}
            history[step] = scalars(
                {
                    **metrics,
                    "response_length": response_length,
                    "time/rollout_s": rolled - started,
                    "time/step_s": stepped - probed,
                }
            )
            if logger is not None:
                logger.log(step, history[step])
            if int(state.nonfinite_streak) >= step_cfg.optim.max_nonfinite_steps:
                raise RuntimeError(
                    f"{int(state.nonfinite_streak)} non-finite steps in a row at step {step} "
                    f"({_nonfinite_cause(history[step])}); last checkpoint is intact in {run_dir}"
                )
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                meta = {"step": step + 1, "kind": checkpoint.TRAIN_STATE, "identity": current}
                # Returns once the state is in host memory; Orbax writes it while the next steps
                # run, and `checkpoints.close()` (in `_run`) waits for the last write.
                checkpoints.save(step + 1, state, meta)
    finally:
        if logger is not None:
            logger.close()
    return RunResult(graphdef, state, history)
