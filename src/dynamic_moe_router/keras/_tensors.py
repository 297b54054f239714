"""Small backend helpers: is a tensor concrete (eager) or traced, and reading values on the host."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["as_tensor", "is_concrete", "is_floating", "to_numpy"]


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values now (eager), False inside ``jax.jit`` / ``tf.function`` tracing."""
    if isinstance(x, (np.ndarray, np.generic)):
        return True
    name = keras.backend.backend()
    if name == "jax":
        from jax.core import Tracer

        return not isinstance(x, Tracer)
    if name == "tensorflow":
        import tensorflow as tf

        return bool(tf.executing_eagerly()) and hasattr(x, "numpy")
    return not keras.backend.is_keras_tensor(x)


def to_numpy(x: Any) -> np.ndarray:
    """The values of a concrete tensor as a NumPy array (a host sync)."""
    return np.asarray(keras.ops.convert_to_numpy(x))


def as_tensor(x: Any) -> Any:
    """``x`` as a backend tensor (NumPy arrays and backend tensors are accepted)."""
    return keras.ops.convert_to_tensor(x)


def is_floating(x: Any) -> bool:
    return "float" in keras.backend.standardize_dtype(x.dtype)
