"""The two parameterised building blocks every part of the decoder shares: RMSNorm and Linear.

Dims: E input width, O output width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """x / rms(x) * w, or * (1 + w) for Gemma; computed in float32."""

    def __init__(self, dim: int, eps: float, plus_one: bool, param_dtype=jnp.float32):
        init = jnp.zeros if plus_one else jnp.ones  # Gemma's 1 + w starts at 1 too
        self.weight = nnx.Param(init(dim, param_dtype))
        self.eps, self.plus_one = eps, plus_one

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.weight.get_value().astype(jnp.float32)
        return (normed * (1.0 + w if self.plus_one else w)).astype(x.dtype)


def linear(
    in_features: int, out_features: int, bias: bool, rngs: nnx.Rngs, dtype, param_dtype
) -> nnx.Linear:
    """An E -> O `nnx.Linear` initialised N(0, 0.02), as the from-scratch configs expect."""
    init = nnx.initializers.normal(0.02)
    kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    return nnx.Linear(in_features, out_features, **kw)
