"""The train step, `prepare` and the KL reference jitted once for a mesh (explicit in/out
shardings, donated state), and the per-device memory XLA plans for a step.

Dims: B sequences, T tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ftjax import microbatch, sharding, train
from ftjax.capture import NONE
from ftjax.state_init import state_shardings


def _batch_shardings(batch: train.Batch, mesh: jax.sharding.Mesh) -> train.Batch:
    return jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)


def make_train_step(
    graphdef,
    state: train.TrainState,
    batch: train.Batch,
    cfg: train.StepConfig,
    mesh: jax.sharding.Mesh,
):
    """`train.train_step` jitted once for this mesh: state sharded FSDP-style and donated, batch
    over (data, fsdp), metrics replicated. Returns (step_fn, state placed on the mesh)."""
    sharding.check_batch(batch.tokens_BxT.shape[0], mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, train.batch_shards(mesh))
    train.check_credit_passes(cfg, batch, n)
    placed = state_shardings(state, mesh)
    step_fn = jax.jit(
        functools.partial(train.train_step, graphdef, cfg=cfg, mesh=mesh),
        in_shardings=(placed, _batch_shardings(batch, mesh)),
        out_shardings=(placed, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return step_fn, jax.device_put(state, placed)


def planned_bytes(step_fn, state: train.TrainState, batch: train.Batch) -> int:
    """Per-device bytes XLA plans for one step: arguments, outputs and temporaries, less what the
    donated state lets it reuse."""
    stats = step_fn.lower(state, batch).compile().memory_analysis()
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def device_memory_limit(mesh: jax.sharding.Mesh) -> int | None:
    """Bytes one device of the mesh can hold, where the backend says (GPU, TPU); None on CPU."""
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    stats = mine[0].memory_stats()  # only this process's own devices answer
    return None if not stats else stats.get("bytes_limit")


def check_fits(
    step_fn, state: train.TrainState, batch: train.Batch, mesh: jax.sharding.Mesh
) -> None:
    """Refuse, before the first rollout, a step that cannot fit on the mesh's devices."""
    limit = device_memory_limit(mesh)
    if limit is None:
        return
    planned = planned_bytes(step_fn, state, batch)
    if planned > limit:
        raise ValueError(
            f"the train step plans {planned / 2**30:.2f} GiB per device, over the device's "
            f"{limit / 2**30:.2f} GiB: use fewer prompts per step or responses per prompt, "
            "shorter prompts or responses, more minibatches, or a larger fsdp axis"
        )


def make_prepare(
    graphdef, state: train.TrainState, batch: train.Batch, cfg: train.StepConfig, mesh
):
    """`train.prepare` jitted for this mesh: fn(state, batch) -> batch with old log-probs and gamma
    (state read, not donated). `batch` gives shapes (without gamma)."""
    sharding.check_batch(batch.tokens_BxT.shape[0], mesh)
    microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, train.batch_shards(mesh))
    out = dataclasses.replace(batch, gamma_BxT=batch.old_log_probs_BxT)
    return jax.jit(
        functools.partial(train.prepare, graphdef, cfg=cfg, mesh=mesh),
        in_shardings=(state_shardings(state, mesh), _batch_shardings(batch, mesh)),
        out_shardings=_batch_shardings(out, mesh),
    )


def response_log_probs(
    graphdef,
    params: nnx.State,
    batch: train.Batch,
    cfg: train.StepConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
):
    """log p(token_t | tokens_<t) of the batch's response tokens under `params` (0 elsewhere),
    no capture, computed as the train step computes (dtype, micro-batch passes, logit chunks):
    the KL reference's log-probs."""
    cfg = train.StepConfig() if cfg is None else cfg
    model = train.policy_model(graphdef, params, cfg)
    shards = train.batch_shards(mesh)
    n = microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, shards)

    def one_pass(part):
        with train.kernel_mesh(cfg, mesh):
            return train.sequence_log_probs(
                model, part, NONE, "none", cfg.logit_chunk, cfg.scan_layers, cfg.attention
            )[0]

    parts = microbatch.split(batch, n, shards, mesh)
    logp_BxT = microbatch.merge(microbatch.forward(one_pass, parts, n), shards, mesh)
    return jnp.where(batch.response_mask_BxT, logp_BxT, 0.0)


def make_reference(
    graphdef, params: nnx.State, batch: train.Batch, mesh, cfg: train.StepConfig | None = None
):
    """The KL reference policy: a frozen copy of `params`, sharded like the policy's, and
    fn(batch) -> ref_log_probs_BxT jitted for this mesh, computed as the step `cfg` computes."""
    cfg = train.StepConfig() if cfg is None else cfg
    microbatch.passes(batch.tokens_BxT.shape[0], cfg.micro_batch, train.batch_shards(mesh))
    placed = sharding.tree_shardings(params, mesh)
    frozen = jax.device_put(jax.tree.map(jnp.copy, params), placed)
    fn = jax.jit(
        functools.partial(response_log_probs, graphdef, cfg=cfg, mesh=mesh),
        in_shardings=(placed, _batch_shardings(batch, mesh)),
        out_shardings=sharding.batch_sharding(mesh),
    )
    return lambda batch: fn(frozen, batch)
