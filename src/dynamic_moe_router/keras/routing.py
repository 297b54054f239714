"""``dynamic_moe_router.keras.route``: :func:`dynamic_moe_router.route` for Keras 3 tensors.

The math is the shared spec (:mod:`dynamic_moe_router.spec`) run through :class:`~.ops.KerasOps`,
so the results are those of the PyTorch function (ties broken toward the lower expert index, the
spec's cross-framework rule). The checks are the spec's rules and messages; the finiteness check
reads values on the host, so it runs on concrete (eager) tensors and is skipped while tracing
(``jax.jit``, ``tf.function``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from keras import ops

from .. import spec
from ..errors import RoutingInputError
from ..policies import RoutingPolicy
from ._tensors import as_tensor, is_concrete, is_floating, to_numpy
from .ops import KERAS_OPS

__all__ = ["Routing", "route"]


@dataclass(frozen=True)
class Routing:
    """The routing contract (see :class:`dynamic_moe_router.Routing`) as Keras backend tensors."""

    ids: Any  # (T, k_max) int32, sentinel = num_experts
    weights: Any  # (T, k_max), 0 at sentinels
    counts: Any  # (T,) int32
    num_experts: int

    @property
    def sentinel(self) -> int:
        """The id that marks an unused slot (equal to ``num_experts``)."""
        return self.num_experts

    @property
    def k_max(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def kept(self) -> Any:  # (T, k_max) bool
        """Mask of the kept slots."""
        return self.ids < self.num_experts

    def kept_pairs(self) -> int:
        """Number of (token, expert) pairs an experts forward must compute (a host sync)."""
        return int(to_numpy(ops.sum(self.counts)))


def _matrix(name: str, x: Any, scores_shape: tuple[int, ...] | None = None) -> Any:
    try:
        x = None if isinstance(x, (str, bytes)) else as_tensor(x)
    except (TypeError, ValueError) as err:
        raise RoutingInputError(f"{name} must be a Keras/backend tensor or a NumPy array: {err}") from err
    if x is None:
        raise RoutingInputError(f"{name} must be a Keras/backend tensor or a NumPy array, got a string")
    spec.check_matrix(name, tuple(x.shape), floating=is_floating(x), dtype=x.dtype, scores_shape=scores_shape)
    return x


def _check_finite(name: str, x: Any, layer: int | None, *, allow_neg_inf: bool) -> None:
    values = to_numpy(x)
    bad = np.isnan(values) | np.isposinf(values) if allow_neg_inf else ~np.isfinite(values)
    n_bad = int(bad.any(axis=-1).sum())
    if n_bad:
        raise spec.non_finite_error(name, layer, n_bad, values.shape[0])


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
) -> Routing:
    """Route ``T`` tokens over ``E`` experts with a dynamic ``policy`` (Keras 3 tensors).

    Same arguments and results as :func:`dynamic_moe_router.route`: ``scores (T, E)`` ranks the
    candidates (``-inf`` = excluded), ``probs (T, E)`` is what the policy reads (default
    ``scores``), ``gate (T, E)`` the source of the combine weights (default ``probs``).

    Returns:
        A :class:`Routing` of backend tensors: ``ids (T, k_max)`` int32 with sentinel ``E``,
        ``weights (T, k_max)`` zero at sentinels, ``counts (T,)`` int32.

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
    spec.check_native_k(native_k, num_experts)
    spec.check_normalize(normalize)
    if not isinstance(policy, RoutingPolicy):
        raise RoutingInputError(
            f"policy must be a RoutingPolicy (e.g. dmr.TopP(p=0.6)), got {type(policy).__name__}"
        )
    policy.for_layer(layer).k_range(native_k, num_experts)  # PolicyError before any compute
    if validate and num_tokens and is_concrete(scores):
        _check_finite("scores", scores, layer, allow_neg_inf=True)
        _check_finite("probabilities", scores if probs is None else probs, layer, allow_neg_inf=False)
    routed = spec.route(
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
    return Routing(ids=routed.ids, weights=routed.weights, counts=routed.counts, num_experts=num_experts)
