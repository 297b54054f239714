"""The routing math (select, combine weights, sentinel), written once against :class:`~._ops.Ops`.

The only value check here is :func:`check_finite` (it reads a count on the host, so callers run
it on concrete arrays); the other rules and messages are in :mod:`._checks`. Every other function
is pure and traceable: with static ``policy``, ``native_k``, ``normalize``, ``scaling`` and
``layer`` it runs under ``jax.jit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ._checks import check_normalize, non_finite_error
from ._ops import Array, Ops

__all__ = [
    "Routed",
    "Routing",
    "Selected",
    "apply_sentinel",
    "check_finite",
    "combine_weights",
    "host_int",
    "keep_counts",
    "route",
    "select",
]

A = TypeVar("A")


class PolicyLike(Protocol):
    """What the math needs from a policy (every :class:`~dynamic_moe_router.RoutingPolicy` has it)."""

    def for_layer(self, layer: int | None) -> Any: ...

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]: ...

    def keep_counts_ops(self, ops: Ops, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any: ...

    # optional (RoutingPolicy has it): the policy's own (ranked_ids, counts), or None
    # def rerank_ops(self, ops, scores, ranked_ids, ranked_probs, probs, native_k) -> Any: ...


@dataclass(frozen=True)
class Selected(Generic[A]):
    """Ranked candidates and which of them are kept (arrays of the adapter's framework)."""

    ranked_ids: A  # (T, k_max) "int", the family's ranking, or a rerank_ops policy's (no sentinel yet)
    keep: A  # (T, k_max) bool, a prefix of each row
    counts: A  # (T,) "int"
    num_experts: int


@dataclass(frozen=True)
class Routing(Generic[A]):
    """The routing contract, one type for every framework (torch, JAX, Keras, any :class:`~._ops.Ops`).

    ``ids (T, k_max)`` in the adapter's ``"int"`` dtype with the sentinel ``num_experts`` in every
    unused slot, ``weights (T, k_max)`` exactly zero at sentinels, ``counts (T,)`` the kept experts
    per token; the kept slots of a token are a prefix. The arrays are of the framework that
    produced them (``torch.Tensor``, ``jax.Array``, a Keras backend tensor); under JAX the type is
    a pytree with ``num_experts`` static.

    Example:
        >>> import torch
        >>> from dynamic_moe_router.core import Routing
        >>> r = Routing(ids=torch.tensor([[0, 1], [1, 2]]), weights=torch.tensor([[0.7, 0.3], [1.0, 0.0]]),
        ...             counts=torch.tensor([2, 1]), num_experts=2)
        >>> r.sentinel, r.k_max, r.kept.tolist(), r.kept_pairs()
        (2, 2, [[True, True], [True, False]], 3)
    """

    ids: A  # (T, k_max) "int", sentinel = num_experts
    weights: A  # (T, k_max), 0 at sentinels
    counts: A  # (T,) "int"
    num_experts: int

    @property
    def sentinel(self) -> int:
        """The id that marks an unused slot (equal to ``num_experts``)."""
        return self.num_experts

    @property
    def k_max(self) -> int:
        """The width of ``ids`` and ``weights``: the layer policy's largest k."""
        ids: Any = self.ids
        return int(ids.shape[-1])

    @property
    def kept(self) -> A:  # (T, k_max) bool
        """Mask of the kept slots."""
        ids: Any = self.ids
        return ids < self.num_experts

    def kept_pairs(self) -> int:
        """Number of (token, expert) pairs an experts forward must compute (reads the value on the
        host: a device sync, and not possible on traced values such as under ``jax.jit``)."""
        return host_int(self.counts)


#: The earlier name of :class:`Routing` in this package.
Routed = Routing


def host_int(x: Any) -> int:
    """The sum of all entries of ``x``, as a Python int read on the host (any framework)."""
    total = x.sum() if hasattr(x, "sum") else None  # torch, JAX, NumPy
    if total is None:
        import numpy as np

        total = np.asarray(x).sum()  # TensorFlow eager tensors
    return int(total)


def check_finite(ops: Ops, name: str, x: Array, layer: int | None, *, allow_neg_inf: bool) -> None:
    """Raise :class:`~dynamic_moe_router.NonFiniteRouterScoresError` if a row of ``x (T, E)`` holds NaN
    or an infinity (``-inf`` allowed with ``allow_neg_inf``): one rule for every framework.

    It reads a count on the host (a device sync), so call it on concrete arrays only.
    """
    num_tokens, num_experts = (int(n) for n in x.shape)
    ok = ops.astype(ops.isfinite(x), "int")  # (T, E)
    if allow_neg_inf:
        ok = ok + ops.astype(x == float("-inf"), "int")
    bad_rows = ops.astype(ops.sum(ok) < num_experts, "int")  # (T,)
    n_bad = host_int(bad_rows)
    if n_bad:
        raise non_finite_error(name, layer, n_bad, num_tokens)


def keep_counts(
    ops: Ops, policy: PolicyLike, ranked_probs: Array, probs: Array, k_min: int, k_max: int
) -> Array:
    """``counts (T,)`` of a (layer-resolved) policy: ``policy.keep_counts_ops(ops, ...)``."""
    return policy.keep_counts_ops(ops, ranked_probs, probs, k_min, k_max)


def select(
    ops: Ops,
    scores: Array,  # (T, E)
    policy: PolicyLike,
    *,
    native_k: int,
    probs: Array | None = None,  # (T, E), defaults to scores
    layer: int | None = None,
) -> Selected[Any]:
    """Rank by ``scores`` (``ops.top_k``), let the layer's policy count, cap at the finite candidates.

    ``policy.for_layer(layer).k_range(native_k, E)`` gives ``(k_min, k_max)`` (a ``PolicyError`` if
    they do not fit). The policy reads ``probs`` as float32; a count is capped at the number of
    the token's top-``k_max`` candidates whose score is finite (``-inf`` = excluded by the family).
    A policy whose ``rerank_ops`` returns ``(ranked_ids, counts)`` replaces both: its own candidates
    (for ``BatchAware(..., reroute=True)``, the family's ranking restricted to the batch's active
    experts), capped the same way.
    """
    num_experts = int(scores.shape[-1])
    layer_policy = policy.for_layer(layer)
    k_min, k_max = layer_policy.k_range(native_k, num_experts)
    top_scores, ranked_ids = ops.top_k(scores, k_max)  # (T, k_max), sorted descending
    if probs is None or probs is scores:
        probs, ranked_probs = scores, top_scores
    else:
        ranked_probs = ops.take_along_axis(probs, ranked_ids)  # (T, k_max)
    ranked_probs = ops.astype(ranked_probs, "float32")
    probs = ops.astype(probs, "float32")
    rerank = getattr(layer_policy, "rerank_ops", None)  # a PolicyLike need not have it
    reranked = None if rerank is None else rerank(ops, scores, ranked_ids, ranked_probs, probs, native_k)
    if reranked is None:
        counts = keep_counts(ops, layer_policy, ranked_probs, probs, k_min, k_max)  # (T,)
    else:  # the policy's own candidates (a subset of the experts, in the family's order) and counts
        ranked_ids, counts = reranked
        top_scores = ops.take_along_axis(scores, ranked_ids)  # (T, k_max)
    available = ops.sum(ops.astype(ops.isfinite(top_scores), "int"))  # (T,) candidates not excluded
    counts = ops.minimum(counts, available)
    slots = ops.arange(k_max, scores)  # (k_max,)
    keep = ops.expand_dims(slots, 0) < ops.expand_dims(counts, 1)  # (T, k_max)
    return Selected(ranked_ids=ranked_ids, keep=keep, counts=counts, num_experts=num_experts)


def combine_weights(
    ops: Ops,
    ranked_gate: Array,  # (T, k_max): weight source at the ranked candidates
    keep: Array,  # (T, k_max) bool
    normalize: str = "none",
    scaling: float = 1.0,
) -> Array:  # (T, k_max), zero where not kept
    """``"none"``: the gate values; ``"sum"``: divided by their sum over the kept candidates;
    ``"softmax"``: a softmax over the kept candidates (gate = logits). Rows with nothing kept are
    all zero; ``scaling`` multiplies the result."""
    check_normalize(normalize)
    if normalize == "softmax":
        masked = ops.where(keep, ranked_gate, ops.full_like(ranked_gate, float("-inf")))
        weights = ops.softmax(masked)
        weights = ops.where(keep, weights, ops.full_like(weights, 0.0))  # nothing kept: NaN -> 0
    else:
        weights = ops.where(keep, ranked_gate, ops.full_like(ranked_gate, 0.0))
        if normalize == "sum":
            denom = ops.sum(weights, keepdims=True)  # (T, 1)
            weights = weights / ops.where(denom > 0, denom, ops.full_like(denom, 1.0))
    return weights * scaling


def apply_sentinel(ops: Ops, ranked_ids: Array, keep: Array, num_experts: int) -> Array:  # (T, k_max)
    """``ranked_ids`` with the sentinel ``num_experts`` in every slot that is not kept."""
    return ops.where(keep, ranked_ids, ops.full_like(ranked_ids, num_experts))


def route(
    ops: Ops,
    scores: Array,  # (T, E)
    policy: PolicyLike,
    *,
    native_k: int,
    probs: Array | None = None,  # (T, E)
    gate: Array | None = None,  # (T, E)
    normalize: str = "none",
    scaling: float = 1.0,
    layer: int | None = None,
) -> Routing[Any]:
    """The whole of :func:`dynamic_moe_router.route` without its host checks."""
    sel = select(ops, scores, policy, native_k=native_k, probs=probs, layer=layer)
    source = (scores if probs is None else probs) if gate is None else gate
    ranked_gate = ops.take_along_axis(source, sel.ranked_ids)  # (T, k_max)
    weights = combine_weights(ops, ranked_gate, sel.keep, normalize, scaling)
    ids = apply_sentinel(ops, sel.ranked_ids, sel.keep, sel.num_experts)
    return Routing(ids=ids, weights=weights, counts=sel.counts, num_experts=sel.num_experts)
