"""``route`` for JAX: :func:`dynamic_moe_router.route` over jax arrays, pure and ``jax.jit``-able."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from .. import core
from ..core import Routing
from ..errors import RoutingInputError
from ..policies import RoutingPolicy
from ._ops import JAX_OPS

__all__ = ["Routing", "route"]

# the one routing type (dynamic_moe_router.core.Routing) as a pytree: arrays are leaves,
# num_experts is static
if not getattr(Routing, "_dmr_jax_pytree", False):
    jax.tree_util.register_dataclass(
        Routing, data_fields=["ids", "weights", "counts"], meta_fields=["num_experts"]
    )
    Routing._dmr_jax_pytree = True  # type: ignore[attr-defined]


def _as_array(name: str, x: Any, shape: tuple[int, ...] | None = None) -> jax.Array:
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    if not isinstance(x, jax.Array):
        raise RoutingInputError(f"{name} must be a jax.Array (or numpy array), got {type(x).__name__}")
    core.check_matrix(
        name,
        tuple(x.shape),
        floating=jnp.issubdtype(x.dtype, jnp.floating),
        dtype=x.dtype,
        scores_shape=shape,
    )
    return x


def _check_finite(name: str, x: jax.Array, layer: int | None, *, allow_neg_inf: bool) -> None:
    if isinstance(x, Tracer):
        raise RoutingInputError(
            f"route(validate=True) checks that the router {name} are finite on the host, which is not "
            "possible for traced values (inside jax.jit, vmap or grad); pass validate=False there and check "
            "the inputs outside the transformation if needed"
        )
    core.check_finite(JAX_OPS, name, x, layer, allow_neg_inf=allow_neg_inf)


def route(
    scores: jax.Array,
    policy: RoutingPolicy,
    *,
    native_k: int,
    probs: jax.Array | None = None,
    gate: jax.Array | None = None,
    normalize: core.Normalize = "none",
    scaling: float = 1.0,
    layer: int | None = None,
    validate: bool = True,
) -> Routing[jax.Array]:
    """Route ``T`` tokens over ``E`` experts with ``policy``: :func:`dynamic_moe_router.route` in JAX.

    The same arguments and results (ids in int32, the one
    :class:`~dynamic_moe_router.core.Routing` type), computed by the same shared math
    (:mod:`dynamic_moe_router.core`). Pure and ``jax.jit``-compatible with ``policy``,
    ``native_k``, ``normalize``, ``scaling`` and ``layer`` static.

    ``validate=True`` checks on the host that ``scores`` has no NaN/``+inf`` and ``probs`` no
    NaN/inf (:class:`~dynamic_moe_router.NonFiniteRouterScoresError`). Traced values cannot be read
    on the host, so under ``jax.jit`` (or ``vmap``/``grad``) ``validate=True`` raises a
    :class:`~dynamic_moe_router.RoutingInputError`: pass ``validate=False`` there. Shapes, dtypes,
    ``native_k``, ``normalize`` and the policy's bounds are always checked (they are static).

    Example:
        >>> import jax, jax.numpy as jnp, dynamic_moe_router as dmr
        >>> from dynamic_moe_router import jax as djax
        >>> probs = jnp.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
        >>> r = djax.route(probs, dmr.TopP(p=0.7), native_k=2, normalize="sum")
        >>> r.ids.tolist(), r.counts.tolist()
        ([[0, 1], [0, 4]], [2, 1])
        >>> [[round(w, 3) for w in row] for row in r.weights.tolist()]
        [[0.625, 0.375], [1.0, 0.0]]
        >>> fast = jax.jit(lambda p: djax.route(p, dmr.TopP(p=0.7), native_k=2, validate=False))
        >>> fast(probs).counts.tolist()
        [2, 1]
    """
    scores = _as_array("scores", scores)
    num_tokens, num_experts = scores.shape
    if probs is not None:
        probs = _as_array("probs", probs, (num_tokens, num_experts))
    core.check_native_k(native_k, num_experts)
    core.check_normalize(normalize)
    layer_policy = policy.for_layer(layer)
    layer_policy.k_range(native_k, num_experts)  # a PolicyError before the host checks
    if gate is not None:
        gate = _as_array("gate", gate, (num_tokens, num_experts))
    if validate and num_tokens:
        _check_finite("scores", scores, layer, allow_neg_inf=True)
        _check_finite("probabilities", scores if probs is None else probs, layer, allow_neg_inf=False)
    return core.route(
        JAX_OPS,
        scores,
        layer_policy,
        native_k=native_k,
        probs=probs,
        gate=gate,
        normalize=normalize,
        scaling=scaling,
    )
