"""``dynamic_moe_router.keras.route``: :func:`dynamic_moe_router.route` for Keras 3 tensors.

The math is the shared core (:mod:`dynamic_moe_router.core`) run through :class:`~.ops.KerasOps`,
so the results are those of the PyTorch function (ties broken toward the lower expert index, the
core's cross-framework rule). The checks are the core's rules and messages; the finiteness check
reads values on the host, so it runs on concrete (eager) tensors and is skipped while tracing
(``jax.jit``, ``tf.function``).
"""

from __future__ import annotations

from typing import Any

from .. import core
from ..core import Routing
from ..errors import RoutingInputError
from ..policies import RoutingPolicy
from ._tensors import as_tensor, is_concrete, is_floating
from .ops import KERAS_OPS

__all__ = ["Routing", "route"]


def _matrix(name: str, x: Any, scores_shape: tuple[int, ...] | None = None) -> Any:
    try:
        x = None if isinstance(x, (str, bytes)) else as_tensor(x)
    except (TypeError, ValueError) as err:
        raise RoutingInputError(f"{name} must be a Keras/backend tensor or a NumPy array: {err}") from err
    if x is None:
        raise RoutingInputError(f"{name} must be a Keras/backend tensor or a NumPy array, got a string")
    core.check_matrix(name, tuple(x.shape), floating=is_floating(x), dtype=x.dtype, scores_shape=scores_shape)
    return x


def route(
    scores: Any,
    policy: RoutingPolicy,
    *,
    native_k: int,
    probs: Any | None = None,
    gate: Any | None = None,
    normalize: str = "none",
    scaling: float = 1.0,
    layer: int | None = None,
    validate: bool = True,
) -> Routing[Any]:
    """Route ``T`` tokens over ``E`` experts with a dynamic ``policy`` (Keras 3 tensors).

    Same arguments and results as :func:`dynamic_moe_router.route`: ``scores (T, E)`` ranks the
    candidates (``-inf`` = excluded), ``probs (T, E)`` is what the policy reads (default
    ``scores``), ``gate (T, E)`` the source of the combine weights (default ``probs``).

    Returns:
        A :class:`~dynamic_moe_router.core.Routing` (the one routing type) of backend tensors:
        ``ids (T, k_max)`` int32 with sentinel ``E``, ``weights (T, k_max)`` zero at sentinels,
        ``counts (T,)`` int32.

    Raises:
        RoutingInputError: wrong shapes, dtypes, ``native_k`` or ``normalize``.
        PolicyError: the policy's bounds do not fit ``E`` and ``native_k``.
        NonFiniteRouterScoresError: NaN/inf in ``scores`` (``-inf`` allowed) or ``probs`` (eager only).

    Example:
        >>> import numpy as np, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.keras import route
        >>> probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]], "float32")
        >>> r = route(probs, dmr.TopP(p=0.7), native_k=2, normalize="sum")
        >>> np.asarray(r.ids).tolist(), np.asarray(r.counts).tolist()
        ([[0, 1], [0, 4]], [2, 1])
    """
    scores = _matrix("scores", scores)
    shape = tuple(scores.shape)
    probs = None if probs is None else _matrix("probs", probs, shape)
    gate = None if gate is None else _matrix("gate", gate, shape)
    num_tokens, num_experts = shape
    core.check_native_k(native_k, num_experts)
    core.check_normalize(normalize)
    if not isinstance(policy, RoutingPolicy):
        raise RoutingInputError(
            f"policy must be a RoutingPolicy (e.g. dmr.TopP(p=0.6)), got {type(policy).__name__}"
        )
    policy.for_layer(layer).k_range(native_k, num_experts)  # PolicyError before any compute
    if validate and num_tokens and is_concrete(scores):
        core.check_finite(KERAS_OPS, "scores", scores, layer, allow_neg_inf=True)
        core.check_finite(
            KERAS_OPS, "probabilities", scores if probs is None else probs, layer, allow_neg_inf=False
        )
    return core.route(
        KERAS_OPS,
        scores,
        policy,
        native_k=native_k,
        probs=probs,
        gate=gate,
        normalize=normalize,
        scaling=scaling,
        layer=layer,
    )
