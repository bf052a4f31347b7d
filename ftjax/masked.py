"""Reductions over masked positions, shared by the loss, the credit variants and the metrics.

Dims: any; the mask broadcasts against the values.
"""

from __future__ import annotations

import jax.numpy as jnp


def mean(x, mask, axis=None, keepdims: bool = False):
    """Mean of x where mask is True; 0 where nothing is. `where`, not a product: a non-finite
    value at a masked-out position must not leak into the result."""
    mask = jnp.asarray(mask, bool)
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis, keepdims=keepdims)
    return total / jnp.maximum(jnp.sum(mask, axis=axis, keepdims=keepdims), 1)
