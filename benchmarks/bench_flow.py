"""Time `flow.trace` against its floor: one float32 triangular solve of the same shape.

`trace` needs two triangular solves with the same matrix (backward for h, forward for f), so a
ratio near 2 is the floor for any method that reads the matrix twice. Usage:
    python -m benchmarks.bench_flow [--block-size 128] [--shapes 8x512,8x1024,2x4096] [--repeats 10]
On a GPU the default shapes add (1, 8192) and (8, 2048).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from benchmarks.common import environment_line, interleaved_median_ms
from ftjax.flow import trace

CPU_SHAPES = ((8, 512), (8, 1024), (2, 4096))
GPU_SHAPES = ((1, 8192), (8, 2048))


def causal_attention(key, B: int, T: int):
    """Row-stochastic causal attention from random logits, a sink on token 0, local emphasis."""
    logits = jax.random.normal(key, (B, T, T), jnp.float32)
    pos = jnp.arange(T)
    logits = logits - 0.05 * (pos[:, None] - pos[None, :]).astype(jnp.float32)
    logits = logits.at[:, :, 0].add(3.0)
    logits = jnp.where(pos[None, :] <= pos[:, None], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def bench_shape(B: int, T: int, block_size: int, repeats: int) -> tuple[float, float]:
    attn = causal_attention(jax.random.PRNGKey(0), B, T)
    source = jnp.zeros((B, T), bool).at[:, : T // 8].set(True)
    sink = jnp.zeros((B, T), bool).at[:, T - 16 : T - 4].set(True)
    trace_fn = jax.jit(lambda a, s, t: trace(a, s, t, block_size=block_size).throughput_BxT)
    # The floor: (I - W) x = b with W = attn^T, one float32 triangular solve per sequence.
    system = jnp.eye(T, dtype=jnp.float32) - jnp.swapaxes(jnp.tril(attn, -1), -1, -2)
    rhs = jnp.ones((B, T, 1), jnp.float32)
    solve_fn = jax.jit(lambda m, r: solve_triangular(m, r, lower=False))
    return tuple(
        interleaved_median_ms(
            [(trace_fn, (attn, source, sink)), (solve_fn, (system, rhs))], repeats=repeats
        )
    )


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple(tuple(int(x) for x in item.split("x")) for item in text.split(","))
    except ValueError as err:
        raise ValueError(f"--shapes must look like 8x512,2x4096, got {text!r}") from err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--shapes", type=str, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    backend = jax.default_backend()
    shapes = (
        parse_shapes(args.shapes)
        if args.shapes
        else (CPU_SHAPES + (GPU_SHAPES if backend == "gpu" else ()))
    )
    print(
        f"{environment_line()}, block_size {args.block_size}, median of {args.repeats} "
        f"interleaved calls"
    )
    print(f"{'B':>3} {'T':>6} {'trace ms':>10} {'solve ms':>10} {'ratio':>7}")
    for B, T in shapes:
        trace_ms, solve_ms = bench_shape(B, T, args.block_size, args.repeats)
        print(f"{B:>3} {T:>6} {trace_ms:>10.3f} {solve_ms:>10.3f} {trace_ms / solve_ms:>7.2f}")


if __name__ == "__main__":
    main()
