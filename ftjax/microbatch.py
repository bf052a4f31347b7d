"""Micro-batches: one rollout batch taken in n passes inside the jitted step.

Dims: B rows of the batch, S batch shards (the mesh's data x fsdp devices, each holding one
contiguous block of B / S rows), n passes, b = B / n rows per pass (b / S per device).

Pass k takes rows [k b/S, (k+1) b/S) of every shard's block, so every device works in every
pass and no row moves between devices: the split and its inverse are local reshapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftjax import sharding


def passes(rows: int, micro_batch: int | None, shards: int) -> int:
    """How many passes take `rows` rows at `micro_batch` rows per shard per pass (None: one)."""
    if rows % shards:
        raise ValueError(f"batch of {rows} is not divisible by the {shards} batch shards")
    if micro_batch is None:
        return 1
    per_shard = rows // shards
    if micro_batch < 1 or per_shard % micro_batch:
        raise ValueError(
            f"StepConfig.micro_batch {micro_batch} does not divide the {per_shard} rows each of "
            f"the {shards} batch shards holds ({rows} rows in all)"
        )
    return per_shard // micro_batch


def split(tree, n: int, shards: int, mesh: jax.sharding.Mesh | None = None):
    """Leaves (B, ...) -> (n, B / n, ...), pass k holding rows k of every shard's block."""

    def one(x):
        B = x.shape[0]
        x = x.reshape(shards, n, B // (shards * n), *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(n, B // n, *x.shape[3:])

    out = jax.tree.map(one, tree)
    if mesh is None:
        return out
    spec = NamedSharding(mesh, P(None, sharding.AXES))
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), out)


def merge(tree, shards: int, mesh: jax.sharding.Mesh | None = None):
    """The inverse of `split`: leaves (n, B / n, ...) -> (B, ...) in the batch's row order."""

    def one(x):
        n, b = x.shape[:2]
        x = x.reshape(n, shards, b // shards, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape(n * b, *x.shape[3:])

    out = jax.tree.map(one, tree)
    if mesh is None:
        return out
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh)), out
    )


def grads(loss_fn, params, xs, n: int):
    """Sum over passes of value_and_grad(loss_fn, has_aux=True)(params, x_k), one pass at a
    time (`lax.scan`: one pass's activations live at once). `xs` leaves are (n, ...); returns
    (summed loss, summed grads in the parameters' dtype, aux stacked (n, ...))."""
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if n == 1:
        (loss, aux), g = value_and_grad(params, jax.tree.map(lambda x: x[0], xs))
        return loss, g, jax.tree.map(lambda x: x[None], aux)

    def body(carry, x):
        loss_sum, g_sum = carry
        (loss, aux), g = value_and_grad(params, x)
        return (loss_sum + loss, jax.tree.map(jnp.add, g_sum, g)), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, g), aux = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
    return loss, g, aux


def forward(fn, xs, n: int):
    """fn(x_k) for every pass, one at a time (no gradient); outputs stacked (n, ...)."""
    if n == 1:
        return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.map(fn, xs)
