"""Keras 3 (TensorFlow and JAX backends) and keras-hub integration of dynamic-moe-router-kit.

Install with ``pip install "dynamic-moe-router-kit[tf]"``; choose the backend as usual for Keras,
with ``KERAS_BACKEND`` (``tensorflow`` or ``jax``) before the first ``import keras``.

* :func:`route`: :func:`dynamic_moe_router.route` on Keras tensors (the shared core through
  :class:`KerasOps`);
* :func:`experts_forward` and :class:`DynamicMoE`: SwiGLU experts computing only the kept pairs;
  ``DynamicMoE.from_transformers`` loads a transformers Mixtral/OLMoE/Qwen3-MoE block;
* :func:`patch` / :func:`unpatch` / :func:`patched` / :func:`profile`: keras-hub Mixtral, Qwen-MoE,
  Qwen3-MoE and Qwen3.5-MoE models, per instance, atomic and reversible;
* :mod:`.convert`: a transformers Mixtral checkpoint as a keras-hub ``MixtralCausalLM``.

Importing :mod:`dynamic_moe_router` never imports Keras; importing this package without Keras
raises :class:`~dynamic_moe_router.MissingDependencyError` naming the extra.
"""

from ._deps import require

require("keras")

from typing import Any  # noqa: E402

from .._deprecation import warn_renamed  # noqa: E402
from .experts import BACKENDS, ExpertsCounter, SwiGLUBank, experts_forward  # noqa: E402
from .hub import HUB_FAMILIES, KerasPatchHandle, find_moe_layers, get_patch, patch, patched, unpatch  # noqa: E402
from .layer import DynamicMoE  # noqa: E402
from .ops import KERAS_OPS, KerasOps  # noqa: E402
from .profiling import profile  # noqa: E402
from .routing import Routing, route  # noqa: E402

__all__ = [
    "BACKENDS",
    "HUB_FAMILIES",
    "KERAS_OPS",
    "DynamicMoE",
    "ExpertsCounter",
    "KerasOps",
    "KerasPatchHandle",
    "Routing",
    "SwiGLUBank",
    "experts_forward",
    "find_moe_layers",
    "get_patch",
    "patch",
    "patched",
    "profile",
    "route",
    "unpatch",
]

_RENAMED = {"METHODS": "BACKENDS", "PairCounter": "ExpertsCounter"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        warn_renamed(f"dynamic_moe_router.keras.{name}", _RENAMED[name])
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
