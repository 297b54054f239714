"""``BatchAware``: cut the number of distinct experts a batch touches (decode batches of 16-1024 tokens).

Between about 16 and 1024 tokens an MoE layer on a GPU is bound by reading expert weights: nearly
every expert is touched, so dropping a token's pairs saves nothing unless whole experts drop out
of the batch. ``BatchAware`` keeps the experts that carry most of the batch's routing weight and
trims every token's ranked slots at the first one that falls outside that set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from ._base import RoutingPolicy, check_float, check_int, register_policy

if TYPE_CHECKING:
    import torch

__all__ = ["BatchAware"]


@register_policy("batch_aware")
@dataclass(frozen=True)
class BatchAware(RoutingPolicy):
    """Wrap a score policy so that one routing call touches at most ``experts`` of the layer's experts.

    Per call (a layer's batch of ``T`` tokens):

    1. ``inner`` chooses each token's count as usual;
    2. each expert's *mass* is the routing probability that the tokens' kept slots give it, summed
       over the batch; the ``ceil(experts * E)`` experts of largest mass form the active set, plus
       every expert in a protected slot (a token's first ``min_keep`` slots are never dropped);
    3. each token keeps its kept slots up to (not including) its first slot on an expert outside
       the active set. Kept slots stay a prefix of the family's ranking (unlike ``reroute=True``).

    A token may thus keep fewer than ``inner``'s own minimum (``StaticTopK``'s k, ``TopP``'s
    ``min_k``), never fewer than ``min_keep`` (or what ``inner`` chose, if less).

    The outputs therefore depend on the composition of the batch: the same token routed with
    other tokens may keep fewer slots. For a given batch the result is deterministic. Use it for
    batched decoding (many sequences at once) where the experts layer is bandwidth-bound; at one
    token per call it changes nothing beyond ``inner`` as long as ``ceil(experts * E)`` is at
    least the token's count. Under ``experts=1.0`` it is exactly ``inner``.

    It pays on layers with many experts (OLMoE's 64: 0.56-0.80 of static top-k's layer time at 64-256
    tokens on an H200). On layers with few (Mixtral's 8), from about 64 tokens every expert is some
    token's protected first slot, so no expert leaves the batch and the layer time does not change
    (measured: ``BENCHMARKS.md``). For those, ``reroute=True``:

    - the active set is exactly the ``ceil(experts * E)`` experts of largest mass (no slot is
      protected), so the batch touches at most that many experts;
    - each token keeps as many slots as ``inner`` chose (at most the number of active experts), on
      its highest-ranked *active* experts in the family's order: a slot on an inactive expert goes
      to the token's next-ranked active one. The routed pairs, and their FLOPs, stay ``inner``'s
      (fewer only where a token has fewer active candidates); ``min_keep`` is not used.

    Rerouting moves tokens off experts they rank first, which a model trained with fixed top-k
    pays for in quality: on ref-mixtral (top-2 of 8) at 6 of 8 experts, decode perplexity rose by
    35-104% (``BENCHMARKS.md``). It is a hard cap for when the distinct experts are what matters.

    Written with torch operations only: JAX and Keras raise a :class:`~dynamic_moe_router.PolicyError`.
    Inner policies that read the router input (a learned allocator) or vary per layer
    (``PerLayer``) cannot be wrapped; wrap each layer's policy instead (``PerLayer`` of ``BatchAware``).

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.6, 0.0, 0.1, 0.3], [0.4, 0.35, 0.0, 0.25]])
        >>> pol = dmr.BatchAware(dmr.StaticTopK(), experts=0.5)  # 2 of 4 experts, plus protected ones
        >>> r = dmr.route(probs, pol, native_k=3)
        >>> r.ids.tolist()  # expert 3 (mass 0.55) is out of the active set {0, 1}
        [[0, 1, 4], [0, 4, 4], [0, 1, 4]]
        >>> probs[1] = torch.tensor([0.6, 0.05, 0.1, 0.25])  # ranks 0, 3, 2, 1
        >>> pol = dmr.BatchAware(dmr.StaticTopK(), experts=0.5, reroute=True)
        >>> r = dmr.route(probs, pol, native_k=2)  # active {0, 1}: token 1's expert 3 becomes 1
        >>> r.ids.tolist(), r.counts.tolist()
        ([[0, 1], [0, 1], [0, 1]], [2, 2, 2])
    """

    inner: RoutingPolicy = field(default_factory=lambda: _static())
    #: fraction of the layer's experts (in (0, 1]) the batch may touch beyond the protected slots
    experts: float = 0.75
    #: leading ranked slots of every token that are never dropped (>= 1; unused under ``reroute``)
    min_keep: int = 1
    #: replace a slot on an inactive expert by the token's next active one (no protected slots)
    reroute: bool = False

    def __post_init__(self) -> None:
        from ._per_layer import PerLayer

        if (
            not isinstance(self.inner, RoutingPolicy)
            or isinstance(self.inner, (PerLayer, BatchAware))
            or self.inner.reads_router_input
        ):
            raise PolicyError(
                f"batch_aware: inner must be a score policy (not PerLayer, BatchAware or a learned "
                f"allocator), got {self.inner!r}; for per-layer settings use PerLayer of BatchAware",
                field="inner",
            )
        check_float("experts", self.experts, low=0.0, high=1.0, low_open=True)
        check_int("min_keep", self.min_keep, minimum=1)
        if not isinstance(self.reroute, bool):
            raise PolicyError(
                f"batch_aware: reroute must be true or false, got {self.reroute!r}", field="reroute"
            )
        if self.reroute and self.min_keep != 1:
            raise PolicyError(
                f"batch_aware: min_keep={self.min_keep} has no effect with reroute=True (no slot is "
                "protected there); leave min_keep at 1",
                field="min_keep",
            )

    def _n_active(self, num_experts: int) -> int:
        return max(1, math.ceil(self.experts * num_experts))

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        inner_min, inner_max = self.inner.k_range(native_k, num_experts)
        if self.reroute:  # inner's counts, on other experts
            return inner_min, inner_max
        return min(inner_min, self.min_keep), inner_max  # it may trim below inner's minimum

    def rerank_ops(
        self,
        ops: Any,
        scores: Any,  # (T, E) the family's ranking scores
        ranked_ids: Any,  # (T, k_max) the family's top-k_max
        ranked_probs: Any,  # (T, k_max) float32
        probs: Any,  # (T, E) float32
        native_k: int,
    ) -> tuple[Any, Any] | None:  # ((T, k_max) ids, (T,) counts), or None (no reroute)
        if not self.reroute:
            return None
        if getattr(ops, "name", None) != "torch":
            raise PolicyError(
                "batch_aware(reroute=True) is written with torch operations only, not "
                f"{getattr(ops, 'name', ops)!r}",
                field="reroute",
            )
        import torch

        num_experts = probs.shape[1]
        k_min, k_max = self.k_range(native_k, num_experts)
        counts = self.inner.keep_counts_ops(ops, ranked_probs, probs, k_min, k_max)  # (T,): inner's choice
        slots = torch.arange(k_max, device=probs.device)  # (k_max,)
        kept = slots[None, :] < counts[:, None]  # (T, k_max)
        # each expert's mass: a row-wise scatter (a row's ids are distinct, so nothing collides) and a
        # fixed-order sum over tokens, not index_add_ (GPU atomics add in no fixed order, which could
        # flip a near-tie of the active set between two runs of the same batch)
        per_token = torch.zeros_like(probs).scatter_(1, ranked_ids, ranked_probs * kept)  # (T, E)
        mass = per_token.sum(0)  # (E,)
        # scatter_ of a constant, not an index assignment (a host-to-device copy under CUDA graphs)
        hot = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)  # (E,)
        active = hot.scatter_(0, mass.topk(self._n_active(num_experts)).indices, 1.0) > 0  # (E,)
        # the family's ranking over the active experts only (ranked by the same ops as select's, so
        # experts=1.0 is exactly inner); -inf past a token's active candidates
        top, ids = ops.top_k(scores.masked_fill(~active[None, :], float("-inf")), k_max)  # (T, k_max)
        return ids, torch.minimum(counts, torch.isfinite(top).sum(-1))  # no more than its active candidates

    def keep_counts(
        self,
        ranked_probs: torch.Tensor,  # (T, k_max) float32
        probs: torch.Tensor,  # (T, E) float32
        k_min: int,
        k_max: int,
    ) -> torch.Tensor:  # (T,) int64
        import torch

        if self.reroute:
            raise PolicyError(
                "batch_aware(reroute=True) keeps slots outside the family's ranking, which keep counts "
                "cannot describe; route with dmr.route or dmr.patch (they use rerank_ops)",
                field="reroute",
            )
        # inner's own bounds at this k_max (for the built-in policies its minimum does not depend on
        # the native k); k_min here is the lowered minimum of k_range
        inner_min = self.inner.k_range(k_max, probs.shape[1])[0]
        counts = self.inner.keep_counts(ranked_probs, probs, inner_min, k_max)  # (T,)
        if self.experts >= 1.0 or probs.shape[0] == 0:
            return counts
        num_experts = probs.shape[1]
        slots = torch.arange(k_max, device=probs.device)  # (k_max,)
        kept = slots[None, :] < counts[:, None]  # (T, k_max)
        ranked_probs = ranked_probs.to(probs.dtype)
        slot_ids = _ranked_ids(probs, ranked_probs)  # (T, k_max)
        # each expert's mass: a row-wise scatter-add (a row's ids collide only where two experts tie
        # exactly, and two addends commute exactly) and a fixed-order sum over tokens, not index_add_
        # over the batch (GPU atomics add in no fixed order, which could flip a near-tie of the
        # active set between two runs of the same batch); no (T, k_max, E) temporary. (An earlier
        # version summed a (T, k_max, E) product; the two orders may round a near-tie of two
        # experts' masses differently.)
        kept_probs = torch.where(kept, ranked_probs, torch.zeros_like(ranked_probs))  # (T, k_max)
        per_token = torch.zeros_like(probs).scatter_add_(1, slot_ids, kept_probs)  # (T, E)
        mass = per_token.sum(0)  # (E,)
        n_active = max(1, math.ceil(self.experts * num_experts))
        keep_first = self.min_keep  # >= k_min (see k_range)
        protected = kept & (slots[None, :] < keep_first)  # (T, k_max)
        # the active set: the largest masses plus every protected slot's expert (sync-free: no
        # boolean indexing, so CUDA graphs and torch.compile capture it)
        votes = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)  # (E,)
        votes.index_add_(0, slot_ids.reshape(-1), protected.reshape(-1).to(probs.dtype))
        top = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)  # (E,)
        top.scatter_(0, mass.topk(min(n_active, num_experts)).indices, 1.0)
        active = (votes + top) > 0  # (E,)
        # each token's first slot at or after keep_first on an inactive expert: its new count
        outside = ~active[slot_ids] & (slots[None, :] >= keep_first)  # (T, k_max)
        first_out = torch.where(outside, slots[None, :], k_max).amin(-1)  # (T,)
        return torch.minimum(counts, first_out)

    def describe(self) -> str:
        tail = ", reroute=True" if self.reroute else f", min_keep={self.min_keep}"
        return f"batch_aware(inner={self.inner.describe()}, experts={self.experts}{tail})"


def _ranked_ids(probs: torch.Tensor, ranked_probs: torch.Tensor) -> torch.Tensor:
    """The expert id of each ranked slot, recovered from the probabilities (policies see no ids):
    for each value of ``ranked_probs (T, k_max)`` the lowest expert index whose probability in
    ``probs (T, E)`` equals it (exact: ranked_probs are probs gathered at the ranked ids, both
    float32; an exact tie resolves to the lower index). A stable ascending sort and a binary
    search per row: ``(T, E)`` temporaries only. Rows with NaN (refused by routing's validation)
    give unspecified ids; the clamp only keeps the gather in bounds.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[0.1, 0.5, 0.1, 0.3]])
        >>> _ranked_ids(probs, torch.tensor([[0.5, 0.3, 0.1]])).tolist()
        [[1, 3, 0]]
    """
    import torch

    values, order = torch.sort(probs, dim=-1, stable=True)  # (T, E) ascending; ties in index order
    first = torch.searchsorted(values, ranked_probs.contiguous(), side="left")  # (T, k_max)
    return order.gather(1, first.clamp_(max=probs.shape[1] - 1))  # (T, k_max)


def _static() -> RoutingPolicy:
    from ._builtin import StaticTopK

    return StaticTopK()
