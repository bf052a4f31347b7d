"""The train state: created on one device, abstractly (shapes and shardings, nothing allocated),
or directly sharded on a mesh; and a policy restored from a checkpoint.

`init_state` is the reference; `init_state_sharded` (a fresh model) and `init_state_placed` (a
model that already has its weights) give the same state with every device holding only its
FSDP shard of the parameters and Adam moments.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import checkpoint, sharding, train
from ftjax.checkpoint import Checkpointer


def init_state(
    model: nnx.Module, cfg: train.StepConfig, rng
) -> tuple[nnx.GraphDef, train.TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    state = train.TrainState(
        params=params,
        opt_state=train.optimizer(cfg.optim).init(params),
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        nonfinite_streak=jnp.zeros((), jnp.int32),
    )
    return graphdef, state


def _traced_init(make_model, cfg: train.StepConfig):
    """fn(rng) -> the TrainState of `init_state(make_model(nnx.Rngs(rng)), cfg, rng)`, for tracing
    under jit / eval_shape; the graphdef (static) lands in the returned list when it is traced."""
    graphdefs = []

    def init(rng) -> train.TrainState:
        graphdef, state = init_state(make_model(nnx.Rngs(rng)), cfg, rng)
        graphdefs.append(graphdef)
        return state

    return init, graphdefs


def state_shardings(state: train.TrainState, mesh: jax.sharding.Mesh) -> train.TrainState:
    """Parameters and optimiser state FSDP-sharded, the scalars replicated."""
    return train.TrainState(
        params=sharding.tree_shardings(state.params, mesh),
        opt_state=sharding.tree_shardings(state.opt_state, mesh),
        step=sharding.replicated(mesh),
        rng=sharding.replicated(mesh),
        nonfinite_streak=sharding.replicated(mesh),
    )


def abstract_state(
    make_model, cfg: train.StepConfig, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, train.TrainState]:
    """(graphdef, the train state as `jax.ShapeDtypeStruct`s carrying their `state_shardings`):
    what `init_state_sharded` would make, without computing or allocating anything, to plan
    (`jit(...).lower(state, batch)`) on any mesh. make_model(rngs) -> nnx.Module."""
    init, graphdefs = _traced_init(make_model, cfg)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    placed = state_shardings(shapes, mesh)
    like = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    return graphdefs[0], jax.tree.map(like, shapes, placed)


def init_state_sharded(
    make_model, cfg: train.StepConfig, rng, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, train.TrainState]:
    """`init_state(make_model(nnx.Rngs(rng)), cfg, rng)` created already sharded: one jit whose
    outputs have `state_shardings`, so each device computes and holds only its shard of the
    parameters and Adam moments (a whole float32 state of an 8B model would not fit on one
    device). Same values as the unsharded init (jax's random bits do not depend on sharding)."""
    graphdef, like = abstract_state(make_model, cfg, mesh)
    init, _ = _traced_init(make_model, cfg)
    placed = jax.tree.map(lambda x: x.sharding, like)
    return graphdef, jax.jit(init, out_shardings=placed)(rng)


def init_state_placed(
    model: nnx.Module, cfg: train.StepConfig, rng, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, train.TrainState]:
    """`init_state(model, cfg, rng)` for a model that already has its weights (a loaded
    checkpoint), made sharded: the parameters are placed FSDP-style first (nothing moves when
    the loader placed them, `sharding.param_sharding_fn`), then one jit whose outputs have
    `state_shardings` makes the Adam moments shard by shard and copies the parameters (the
    train step donates its state; the caller's model stays usable). No device ever holds the
    whole optimizer state."""
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.device_put(params, sharding.tree_shardings(params, mesh))

    def build(params, rng) -> train.TrainState:
        state = init_state(nnx.merge(graphdef, params), cfg, rng)[1]
        return dataclasses.replace(state, params=jax.tree.map(jnp.copy, state.params))

    placed = state_shardings(jax.eval_shape(build, params, rng), mesh)
    return graphdef, jax.jit(build, out_shardings=placed)(params, rng)


def restore_policy(model: nnx.Module, checkpoint_dir) -> tuple[nnx.Module, int]:
    """(`model` with the parameters of the latest checkpoint in `checkpoint_dir`, its step). The
    checkpoint's record says what it holds: an RL run's whole train state (the optimiser's
    structure does not depend on its settings, so the default config describes it) or a
    warm-up's parameters alone."""
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ValueError(f"no checkpoint directory {checkpoint_dir}")
    checkpoints = Checkpointer(checkpoint_dir, keep=1)
    try:
        if checkpoints.latest_step() is None:
            raise ValueError(f"no checkpoint in {checkpoint_dir}")
        meta = checkpoints.meta()
        kind = meta.get("kind")
        if kind == checkpoint.TRAIN_STATE:
            graphdef, like = init_state(model, train.StepConfig(), jax.random.PRNGKey(0))
            state, _ = checkpoints.restore(like)
            params = state.params
        elif kind == checkpoint.PARAMS:
            graphdef, like = nnx.split(model, nnx.Param)
            params, _ = checkpoints.restore(like)
        else:
            raise ValueError(
                f"checkpoint in {checkpoint_dir} records kind {kind!r}, not "
                f"{checkpoint.TRAIN_STATE!r} or {checkpoint.PARAMS!r} (written by an older ftjax?)"
            )
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, params), int(meta["step"])
