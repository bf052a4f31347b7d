"""Time `flow.trace` against its floor: two matrix-vector products over the same map.

Any exact method reads the B x T x T map at least twice (the backward pass for h, the forward pass
for f), so `floor` is two dependent float32 matrix-vector products over the map, timed in the same
interleaved run; `trace / floor` is the figure of merit. `solve` (one float32 triangular solve of
the same shape) is kept for continuity with earlier tables: it is not a floor, XLA's CPU solve is
slow for a vector right-hand side. Usage:
    python -m benchmarks.bench_flow [--block-size 64] [--shapes 8x512,2x4096] [--repeats 10]
On a GPU the default shapes add (8, 2048).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from benchmarks.common import environment_line, interleaved_median_ms
from ftjax.flow import trace

CPU_SHAPES = ((8, 512), (8, 1024), (2, 4096), (1, 8192))
GPU_SHAPES = ((8, 2048),)


def causal_attention(key, B: int, T: int):
    """Row-stochastic causal attention from random logits, a sink on token 0, local emphasis."""
    logits = jax.random.normal(key, (B, T, T), jnp.float32)
    pos = jnp.arange(T)
    logits = logits - 0.05 * (pos[:, None] - pos[None, :]).astype(jnp.float32)
    logits = logits.at[:, :, 0].add(3.0)
    logits = jnp.where(pos[None, :] <= pos[:, None], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


@jax.jit
def two_matvecs(attn_BxTxT, x_BxT):
    """The floor: the map streamed twice, the second product depending on the first."""
    y_BxT = jnp.einsum("bki,bi->bk", attn_BxTxT, x_BxT)
    return jnp.einsum("bki,bi->bk", attn_BxTxT, y_BxT)


def timings(B: int, T: int, block_size: int, repeats: int) -> dict[str, float]:
    """Median ms of trace, floor and solve at (B, T), timed alternately in one run."""
    attn = causal_attention(jax.random.PRNGKey(0), B, T)
    source = jnp.zeros((B, T), bool).at[:, : T // 8].set(True)
    sink = jnp.zeros((B, T), bool).at[:, T - 16 : T - 4].set(True)
    trace_fn = jax.jit(lambda a, s, t: trace(a, s, t, block_size=block_size).throughput_BxT)
    # One triangular solve (I - W) x = b with W = attn^T, for continuity with earlier tables.
    system = jnp.eye(T, dtype=jnp.float32) - jnp.swapaxes(jnp.tril(attn, -1), -1, -2)
    rhs = jnp.ones((B, T, 1), jnp.float32)
    solve_fn = jax.jit(lambda m, r: solve_triangular(m, r, lower=False))
    calls = [
        (trace_fn, (attn, source, sink)),
        (two_matvecs, (attn, jnp.ones((B, T), jnp.float32))),
        (solve_fn, (system, rhs)),
    ]
    trace_ms, floor_ms, solve_ms = interleaved_median_ms(calls, repeats=repeats)
    return {"trace": trace_ms, "floor": floor_ms, "solve": solve_ms}


def bench_shape(B: int, T: int, block_size: int, repeats: int) -> tuple[float, float]:
    """(trace ms, solve ms), the columns before the floor existed (tests/test_benchmarks.py)."""
    result = timings(B, T, block_size, repeats)
    return result["trace"], result["solve"]


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
    header = ("B", "T", "trace ms", "floor ms", "trace/floor", "solve ms", "trace/solve")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (3, 6, 10, 10, 12, 10, 12), strict=True)))
    for B, T in shapes:
        t = timings(B, T, args.block_size, args.repeats)
        print(
            f"{B:>3} {T:>6} {t['trace']:>10.3f} {t['floor']:>10.3f} "
            f"{t['trace'] / t['floor']:>12.2f} {t['solve']:>10.3f} {t['trace'] / t['solve']:>12.2f}"
        )


if __name__ == "__main__":
    main()
