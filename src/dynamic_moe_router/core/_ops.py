"""The array-ops protocol the shared routing math is written against (see :mod:`dynamic_moe_router.core`)."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

__all__ = ["Array", "DType", "Ops"]

#: An array of the adapter's framework (``torch.Tensor``, ``jax.Array``, a Keras/TF tensor).
Array = Any
#: The dtypes the math asks for: ``"int"`` is the adapter's index dtype (the dtype of ``top_k``'s
#: indices: int64 for torch, int32 for JAX without x64), ``"float32"`` and ``"bool"`` are exact.
DType = Literal["int", "float32", "bool"]


@runtime_checkable
class Ops(Protocol):
    """The array operations of one framework; every axis argument is the last axis.

    Arrays must also support the Python operators ``+ - * /`` (true division), unary ``-`` and
    the comparisons ``< <= > >= ==`` elementwise, with broadcasting and with Python scalars
    (which must not change the array's dtype, as in torch and JAX).
    """

    @property
    def name(self) -> str:
        """Framework name, used in error messages (``"torch"``, ``"jax"``, ``"keras"``)."""
        ...

    def top_k(self, x: Array, k: int) -> tuple[Array, Array]:
        """``(values, indices)`` of the ``k`` largest entries of each row of ``x (T, E)``.

        Sorted descending; for exact ties the lower index comes first (``jax.lax.top_k``,
        ``tf.math.top_k``). ``-inf`` entries rank below every finite one. Indices have the
        ``"int"`` dtype. (``TorchOps`` uses ``torch.topk``, whose tie order is its own; see the
        package docstring.)
        """
        ...

    def take_along_axis(self, x: Array, indices: Array) -> Array:
        """``x[t, indices[t, j]]`` for ``x (T, E)`` and ``indices (T, k)`` -> ``(T, k)``."""
        ...

    def cumsum(self, x: Array) -> Array:
        """Inclusive cumulative sum along the last axis, same dtype."""
        ...

    def cumprod(self, x: Array) -> Array:
        """Inclusive cumulative product along the last axis (called on ``"int"`` 0/1 arrays)."""
        ...

    def amax(self, x: Array, keepdims: bool = False) -> Array:
        """Maximum along the last axis."""
        ...

    def sum(self, x: Array, keepdims: bool = False) -> Array:
        """Sum along the last axis, in ``x``'s dtype (``"int"`` for ``"int"`` input)."""
        ...

    def where(self, cond: Array, x: Array, y: Array) -> Array:
        """Elementwise ``x if cond else y`` (arrays of one dtype, broadcast against ``cond``)."""
        ...

    def full_like(self, x: Array, value: float) -> Array:
        """An array of ``x``'s shape and dtype filled with ``value``."""
        ...

    def clip(self, x: Array, low: float, high: float) -> Array:
        """``min(max(x, low), high)`` elementwise, in ``x``'s dtype (``low <= high``)."""
        ...

    def floor(self, x: Array) -> Array:
        """Elementwise floor of a float array (stays float)."""
        ...

    def xlogy(self, x: Array, y: Array) -> Array:
        """``x * log(y)``, and ``0`` where ``x == 0`` (``torch.special.xlogy``)."""
        ...

    def isfinite(self, x: Array) -> Array:
        """Elementwise bool: neither NaN nor +-inf."""
        ...

    def arange(self, n: int, like: Array) -> Array:
        """``[0, 1, ..., n-1]`` in the ``"int"`` dtype (on ``like``'s device)."""
        ...

    def minimum(self, x: Array, y: Array) -> Array:
        """Elementwise minimum of two arrays of one dtype."""
        ...

    def softmax(self, x: Array) -> Array:
        """Softmax along the last axis in ``x``'s dtype; ``-inf`` entries get ``0`` (an all
        ``-inf`` row may give anything: the math masks it)."""
        ...

    def astype(self, x: Array, dtype: DType) -> Array:
        """``x`` converted to ``dtype``; float -> ``"int"`` truncates toward zero (called only on
        values that are already integral)."""
        ...

    def expand_dims(self, x: Array, axis: int) -> Array:
        """``x`` with a new axis of size 1 at ``axis``."""
        ...
