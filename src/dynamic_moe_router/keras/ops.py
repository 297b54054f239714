"""``KerasOps``: the :class:`~dynamic_moe_router.core.Ops` adapter written with ``keras.ops``.

It runs on every Keras 3 backend; the tests cover TensorFlow and JAX. The index dtype (``"int"``)
is ``int32``, the dtype ``keras.ops.top_k`` returns on TensorFlow and on JAX without x64.
``keras.ops.top_k`` breaks exact ties toward the lower index on TensorFlow (``tf.math.top_k``) and
JAX (``jax.lax.top_k``), the cross-framework rule of the core.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops as _keras_ops

#: ``keras.ops``, typed loosely: its inferred result types are incomplete (some read as None)
ops: Any = _keras_ops

__all__ = ["KERAS_OPS", "KerasOps"]

_DTYPES = {"int": "int32", "float32": "float32", "bool": "bool"}


@dataclass(frozen=True)
class KerasOps:
    """``keras.ops`` implementation of :class:`~dynamic_moe_router.core.Ops` (index dtype int32)."""

    name: str = "keras"

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        values, indices = ops.top_k(x, k, sorted=True)
        return values, ops.cast(indices, "int32")

    def take_along_axis(self, x: Any, indices: Any) -> Any:
        return ops.take_along_axis(x, indices, axis=-1)

    def cumsum(self, x: Any) -> Any:
        return ops.cumsum(x, axis=-1)

    def cumprod(self, x: Any) -> Any:
        return ops.cast(ops.cumprod(x, axis=-1), keras.backend.standardize_dtype(x.dtype))

    def amax(self, x: Any, keepdims: bool = False) -> Any:
        return ops.max(x, axis=-1, keepdims=keepdims)

    def sum(self, x: Any, keepdims: bool = False) -> Any:
        return ops.cast(ops.sum(x, axis=-1, keepdims=keepdims), keras.backend.standardize_dtype(x.dtype))

    def where(self, cond: Any, x: Any, y: Any) -> Any:
        return ops.where(cond, x, y)

    def full_like(self, x: Any, value: float) -> Any:
        return ops.full_like(x, value, dtype=keras.backend.standardize_dtype(x.dtype))

    def clip(self, x: Any, low: float, high: float) -> Any:
        return ops.clip(x, low, high)

    def floor(self, x: Any) -> Any:
        return ops.floor(x)

    def xlogy(self, x: Any, y: Any) -> Any:
        zero = ops.zeros_like(x)
        safe_y = ops.where(x == 0, ops.ones_like(y), y)  # log(1) = 0: no -inf * 0 = NaN
        return ops.where(x == 0, zero, x * ops.log(safe_y))

    def isfinite(self, x: Any) -> Any:
        return ops.isfinite(x)

    def arange(self, n: int, like: Any) -> Any:
        return ops.arange(n, dtype="int32")

    def minimum(self, x: Any, y: Any) -> Any:
        return ops.minimum(x, y)

    def softmax(self, x: Any) -> Any:
        with warnings.catch_warnings():  # k_max == 1: Keras warns that a softmax over one entry is 1
            warnings.simplefilter("ignore", UserWarning)
            return ops.softmax(x, axis=-1)

    def astype(self, x: Any, dtype: str) -> Any:
        return ops.cast(x, _DTYPES[dtype])

    def expand_dims(self, x: Any, axis: int) -> Any:
        return ops.expand_dims(x, axis)


#: The adapter :func:`dynamic_moe_router.keras.route` uses.
KERAS_OPS = KerasOps()
