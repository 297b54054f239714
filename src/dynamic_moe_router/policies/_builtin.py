"""The built-in per-token policies: static top-k, top-p, relative threshold, entropy-adaptive.

All of them read the *policy distribution* ``probs (T, E)`` of a layer (for softmax routers the
softmax itself; other families define it in :mod:`dynamic_moe_router.hf.families`) and return how
many of the family's ranked candidates each token keeps. The candidates kept are always a prefix of
the family's own ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError
from ..spec import Ops
from ..spec._policies import entropy_counts, relative_threshold_counts, static_counts, top_p_counts
from ._base import RoutingPolicy, check_bounds, check_float, check_int, register_policy, resolve_bounds

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
        return static_counts(ops, ranked_probs, k_max)


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
        return top_p_counts(ops, ranked_probs, self.p, k_min, k_max)


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
        return relative_threshold_counts(ops, ranked_probs, self.beta, k_min, k_max)


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
        return entropy_counts(ops, probs, self.low, self.high, k_min, k_max)
