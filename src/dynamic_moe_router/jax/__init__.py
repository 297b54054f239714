"""The JAX / Flax backend: routing, a dynamic experts forward and a Flax NNX MoE block.

Everything computes the shared math of :mod:`dynamic_moe_router.core` with
:class:`JaxOps`, so it agrees with the torch reference (:func:`dynamic_moe_router.route`):

* :func:`route`: :func:`dynamic_moe_router.route` over jax arrays (pure, ``jax.jit``-able);
* :func:`moe_forward`: SwiGLU experts over the kept (token, expert) pairs;
* :class:`DynamicMoE`: a Flax NNX router + experts block, loadable from a transformers Mixtral- or
  OLMoE-style block with :meth:`DynamicMoE.from_transformers`.

Needs the ``jax`` extra: ``pip install "dynamic-moe-router-kit[jax]"``. Importing
``dynamic_moe_router`` never imports JAX; importing this package without JAX raises
:class:`~dynamic_moe_router.MissingDependencyError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError

try:
    import jax as _jax  # noqa: F401
except ImportError as err:
    raise MissingDependencyError(
        'dynamic_moe_router.jax needs JAX: pip install "dynamic-moe-router-kit[jax]"'
    ) from err

from ._experts import BACKENDS, IMPLS, moe_forward
from ._ops import JAX_OPS, JaxOps
from ._routing import Routing, route

if TYPE_CHECKING:
    from ._nnx import DynamicMoE

__all__ = ["BACKENDS", "IMPLS", "JAX_OPS", "DynamicMoE", "JaxOps", "Routing", "moe_forward", "route"]


def __getattr__(name: str) -> Any:
    if name == "DynamicMoE":  # imports Flax only when asked for
        from ._nnx import DynamicMoE

        return DynamicMoE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
