"""``JaxOps``: the :class:`~dynamic_moe_router.core.Ops` adapter for JAX (index dtype int32)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from ..core import DType

__all__ = ["JAX_OPS", "JaxOps"]

_DTYPES = {"int": jnp.int32, "float32": jnp.float32, "bool": jnp.bool_}


@dataclass(frozen=True)
class JaxOps:
    """JAX implementation of :class:`~dynamic_moe_router.core.Ops`; traceable, so it runs under
    ``jax.jit``. ``top_k`` is ``jax.lax.top_k`` (exact ties: the lower index first). The index
    dtype (``"int"``) is int32, also with ``jax_enable_x64``."""

    name: str = "jax"

    def top_k(self, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        values, indices = jax.lax.top_k(x, k)
        return values, indices.astype(jnp.int32)

    def take_along_axis(self, x: jax.Array, indices: jax.Array) -> jax.Array:
        return jnp.take_along_axis(x, indices, axis=-1)

    def cumsum(self, x: jax.Array) -> jax.Array:
        return jnp.cumsum(x, axis=-1, dtype=x.dtype)

    def cumprod(self, x: jax.Array) -> jax.Array:
        return jnp.cumprod(x, axis=-1, dtype=x.dtype)

    def amax(self, x: jax.Array, keepdims: bool = False) -> jax.Array:
        return jnp.max(x, axis=-1, keepdims=keepdims)

    def sum(self, x: jax.Array, keepdims: bool = False) -> jax.Array:
        return jnp.sum(x, axis=-1, keepdims=keepdims, dtype=x.dtype)

    def where(self, cond: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.where(cond, x, y)

    def full_like(self, x: jax.Array, value: float) -> jax.Array:
        return jnp.full_like(x, value)

    def clip(self, x: jax.Array, low: float, high: float) -> jax.Array:
        return jnp.clip(x, low, high).astype(x.dtype)

    def floor(self, x: jax.Array) -> jax.Array:
        return jnp.floor(x)

    def xlogy(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return xlogy(x, y)

    def isfinite(self, x: jax.Array) -> jax.Array:
        return jnp.isfinite(x)

    def arange(self, n: int, like: jax.Array) -> jax.Array:
        return jnp.arange(n, dtype=jnp.int32)

    def minimum(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.minimum(x, y)

    def softmax(self, x: jax.Array) -> jax.Array:
        return jax.nn.softmax(x, axis=-1)

    def astype(self, x: jax.Array, dtype: DType) -> jax.Array:
        return x.astype(_DTYPES[dtype])

    def expand_dims(self, x: jax.Array, axis: int) -> jax.Array:
        return jnp.expand_dims(x, axis)


#: The adapter :func:`dynamic_moe_router.jax.route` uses.
JAX_OPS = JaxOps()
