"""The built-in per-token policies: static top-k, top-p, relative threshold, entropy-adaptive.

All of them read the *policy distribution* ``probs (T, E)`` of a layer (for softmax routers the
softmax itself; other families define it in :mod:`dynamic_moe_router.hf.families`) and return how
many of the family's ranked candidates each token keeps. The candidates kept are always a prefix of
the family's own ranking.

Each policy's whole count is its :meth:`~RoutingPolicy.keep_counts_ops`, written once against the
framework-neutral :class:`~dynamic_moe_router.core.Ops` adapter: ``counts (T,)`` in the adapter's
``"int"`` dtype, within ``[k_min, k_max]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from ._base import RoutingPolicy, check_bounds, check_float, check_int, register_policy, resolve_bounds

if TYPE_CHECKING:
    from ..core import Ops

__all__ = ["EntropyAdaptive", "RelativeThreshold", "StaticTopK", "TopP"]


@register_policy("static_top_k")
@dataclass(frozen=True)
class StaticTopK(RoutingPolicy):
    """Keep a fixed number ``k`` of experts per token; ``k=None`` means the model's native k.

    ``StaticTopK()`` is the identity baseline: a model patched with it reproduces the unpatched
    model. ``StaticTopK(k)`` with ``k`` below the native k is the static reduced top-k baseline.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> r = dmr.route(torch.tensor([[0.1, 0.6, 0.3]]), dmr.StaticTopK(), native_k=2)
        >>> r.ids.tolist(), r.counts.tolist()
        ([[1, 2]], [2])
    """

    k: int | None = None

    def __post_init__(self) -> None:
        check_int("k", self.k, minimum=0, allow_none=True)

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        k = native_k if self.k is None else self.k
        if k > num_experts:
            raise PolicyError(
                f"static_top_k: k={k} exceeds the layer's number of experts E={num_experts}; "
                f"use k <= {num_experts}",
                field="k",
            )
        return k, k

    def keep_counts_ops(self, ops: Ops, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any:
        source = ranked_probs if ranked_probs is not None else probs  # (T, ...): gives T only
        per_token = ops.astype(ops.sum(source), "int")  # (T,), values replaced below
        return ops.full_like(per_token, k_max)


@register_policy("top_p")
@dataclass(frozen=True)
class TopP(RoutingPolicy):
    """Keep a token's best candidates until their cumulative probability reaches ``p``.

    After Huang et al. 2024 ("Harder tasks need more experts"): candidate ``j`` (in the family's
    ranking) is kept when the probability mass of the candidates ranked before it is below ``p``.
    The count is then clamped to ``[min_k, max_k]``; ``max_k=None`` means the native k.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
        >>> dmr.route(probs, dmr.TopP(p=0.6), native_k=2).counts.tolist()
        [1, 2]
    """

    p: float = 0.5
    min_k: int = 1
    max_k: int | None = None

    def __post_init__(self) -> None:
        check_float("p", self.p, low=0.0, high=1.0, low_open=True)
        check_bounds(self.min_k, self.max_k)

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        return resolve_bounds(self, self.min_k, self.max_k, native_k, num_experts)

    def keep_counts_ops(self, ops: Ops, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any:
        before = ops.cumsum(ranked_probs) - ranked_probs  # (T, k_max): mass ranked earlier
        first = ops.arange(k_max, ranked_probs) == 0  # (k_max,)
        before = ops.where(first, ops.full_like(before, 0.0), before)
        counts = ops.sum(ops.astype(before < self.p, "int"))  # (T,)
        return ops.clip(counts, k_min, k_max)


@register_policy("relative_threshold")
@dataclass(frozen=True)
class RelativeThreshold(RoutingPolicy):
    """Keep candidate ``j`` while its probability is at least ``beta`` times the token's top one.

    Generalises the dynamic expert skipping of Lu et al. 2024 (Mixtral: drop the second expert
    when ``w1 < beta * w0``) to any k. The kept candidates form a prefix of the family's ranking:
    the first candidate below ``beta * max`` ends it. ``beta=0`` keeps ``max_k``; ``beta=1`` keeps
    only candidates tied with the top one. Clamped to ``[min_k, max_k]``.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> probs = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
        >>> dmr.route(probs, dmr.RelativeThreshold(beta=0.6), native_k=3).counts.tolist()
        [1, 3]
    """

    beta: float = 0.5
    min_k: int = 1
    max_k: int | None = None

    def __post_init__(self) -> None:
        check_float("beta", self.beta, low=0.0, high=1.0)
        check_bounds(self.min_k, self.max_k)

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        return resolve_bounds(self, self.min_k, self.max_k, native_k, num_experts)

    def keep_counts_ops(self, ops: Ops, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any:
        top = ops.amax(ranked_probs, keepdims=True)  # (T, 1)
        passes = ranked_probs >= self.beta * top  # (T, k_max)
        counts = ops.sum(ops.cumprod(ops.astype(passes, "int")))  # (T,) length of the passing prefix
        return ops.clip(counts, k_min, k_max)


@register_policy("entropy")
@dataclass(frozen=True)
class EntropyAdaptive(RoutingPolicy):
    """k from the normalised entropy of the token's routing distribution.

    The mapping: ``h = H(probs) / log(E)`` lies in ``[0, 1]`` (0: all mass on one expert, 1:
    uniform). It is rescaled to ``t = clip((h - low) / (high - low), 0, 1)`` and ``[0, 1]`` is cut
    into ``max_k - min_k + 1`` equal bins, so ``k = min_k + min(floor(t * (max_k - min_k + 1)),
    max_k - min_k)``. A confident token (``h <= low``) gets ``min_k`` experts, an uncertain one
    (``h >= high``) gets ``max_k``; k never decreases as the entropy grows. ``max_k`` may exceed
    the native k, so uncertain tokens can use more experts than the model was trained with.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> probs = torch.tensor([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])
        >>> dmr.route(probs, dmr.EntropyAdaptive(min_k=1, max_k=3), native_k=2).counts.tolist()
        [1, 3]
    """

    min_k: int = 1
    max_k: int | None = None
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_bounds(self.min_k, self.max_k)
        check_float("low", self.low, low=0.0, high=1.0)
        check_float("high", self.high, low=0.0, high=1.0)
        if not self.low < self.high:
            raise PolicyError(f"entropy: need low < high, got low={self.low}, high={self.high}", field="high")

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        return resolve_bounds(self, self.min_k, self.max_k, native_k, num_experts)

    def keep_counts_ops(self, ops: Ops, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any:
        num_experts = int(probs.shape[-1])
        entropy = -ops.sum(ops.xlogy(probs, probs))  # (T,) nats
        h = entropy / math.log(num_experts) if num_experts > 1 else ops.full_like(entropy, 0.0)
        t = ops.clip((h - self.low) / (self.high - self.low), 0.0, 1.0)
        span = k_max - k_min
        extra = ops.clip(ops.astype(ops.floor(t * (span + 1)), "int"), 0, span)  # (T,)
        return extra + k_min
