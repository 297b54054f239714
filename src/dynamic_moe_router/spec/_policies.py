"""The keep-count math of the built-in policies, written once against :class:`~._ops.Ops`.

Each function returns ``counts (T,)`` in the adapter's ``"int"`` dtype, in ``[k_min, k_max]``.
The policy classes in :mod:`dynamic_moe_router.policies` call them from ``keep_counts_ops``.
"""

from __future__ import annotations

import math

from ._ops import Array, Ops

__all__ = ["entropy_counts", "relative_threshold_counts", "static_counts", "top_p_counts"]


def static_counts(ops: Ops, ranked_probs: Array, k: int) -> Array:  # (T,)
    """``k`` for every token (``ranked_probs (T, k_max)`` only gives the number of tokens)."""
    per_token = ops.astype(ops.sum(ranked_probs), "int")  # (T,), values replaced below
    return ops.full_like(per_token, k)


def top_p_counts(ops: Ops, ranked_probs: Array, p: float, k_min: int, k_max: int) -> Array:  # (T,)
    """Keep candidate ``j`` while the mass ranked before it is below ``p``, clipped to the bounds."""
    before = ops.cumsum(ranked_probs) - ranked_probs  # (T, k_max): mass ranked earlier
    first = ops.arange(k_max, ranked_probs) == 0  # (k_max,)
    before = ops.where(first, ops.full_like(before, 0.0), before)
    counts = ops.sum(ops.astype(before < p, "int"))  # (T,)
    return ops.clip(counts, k_min, k_max)


def relative_threshold_counts(
    ops: Ops, ranked_probs: Array, beta: float, k_min: int, k_max: int
) -> Array:  # (T,)
    """Length of the prefix of candidates with probability ``>= beta * top``, clipped to the bounds."""
    top = ops.amax(ranked_probs, keepdims=True)  # (T, 1)
    passes = ranked_probs >= beta * top  # (T, k_max)
    counts = ops.sum(ops.cumprod(ops.astype(passes, "int")))  # (T,) length of the passing prefix
    return ops.clip(counts, k_min, k_max)


def entropy_counts(ops: Ops, probs: Array, low: float, high: float, k_min: int, k_max: int) -> Array:  # (T,)
    """``k_min + min(floor(t (k_max - k_min + 1)), k_max - k_min)``, ``t = clip((h - low)/(high - low))``
    and ``h`` the entropy of ``probs (T, E)`` divided by ``log(E)``."""
    num_experts = int(probs.shape[-1])
    entropy = -ops.sum(ops.xlogy(probs, probs))  # (T,) nats
    h = entropy / math.log(num_experts) if num_experts > 1 else ops.full_like(entropy, 0.0)
    t = ops.clip((h - low) / (high - low), 0.0, 1.0)
    span = k_max - k_min
    extra = ops.clip(ops.astype(ops.floor(t * (span + 1)), "int"), 0, span)
    return extra + k_min
