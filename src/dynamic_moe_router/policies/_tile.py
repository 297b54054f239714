"""``TileAware``: move each expert's row count in a large batch to a whole number of GEMM row tiles.

A grouped GEMM (``torch.nn.functional.grouped_mm`` on a Hopper GPU, the ``"cuda"`` experts backend's
prefill path) computes each expert's rows in tiles of a fixed height: an expert with 257 rows costs
about what one with 512 does. Dropping pairs saves time only where an expert's count falls below a
tile boundary, so a dynamic policy's prefill layer time follows the row tiles, not the pairs.
``TileAware`` keeps about the inner policy's pairs but places them on tile boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PolicyError
from ._base import RoutingPolicy, check_int, register_policy

__all__ = ["TileAware"]

#: what each mode does with an expert's partial last tile (see :class:`TileAware`)
TILE_MODES = ("round", "trim", "refill")


@register_policy("tile_aware")
@dataclass(frozen=True)
class TileAware(RoutingPolicy):
    """Wrap a score policy so that, per routing call, each expert's kept rows fill whole row tiles.

    Per call (a layer's batch of ``T`` tokens), with ``inner``'s kept slots as the start and each
    expert's candidates being the batch's ranked slots (up to ``inner``'s ``k_max``) on it:

    - ``"trim"``: an expert with at least one full tile keeps only whole tiles: its lowest-probability
      kept pairs in the partial tile are dropped (never a token's first slot, so an expert may keep
      a few rows past the boundary);
    - ``"refill"``: an expert's partial tile is filled with its highest-probability candidates that
      ``inner`` dropped (up to the candidates there are); an expert with no kept row gets none;
    - ``"round"`` (default): each expert goes to the nearer of the two (refill from half a tile up,
      else trim); an expert with less than half a tile keeps ``inner``'s rows as they are.

    So ``"round"`` keeps about ``inner``'s pairs (its routed FLOPs) on fewer row tiles, ``"trim"``
    saves more than ``inner`` and ``"refill"`` spends tile space that is paid for anyway. Below half a
    tile per expert (decoding) only ``"refill"`` changes anything, and only on experts the batch
    already touches. Kept slots need not be a prefix of the token's ranking; the weights follow the
    family's rule over the kept slots.

    Within an expert, candidates of equal class and probability are taken in batch order (the earlier
    token first). With PhiMoE's ``sparsemixer``, whose weight of a slot depends on the slots ranked
    above it, a kept slot after a dropped one is weighed over the kept slots in their packed order
    (as if the dropped one ranked below it).

    The outputs depend on the composition of the batch (a token routed with other tokens may keep
    other slots), as with :class:`BatchAware`; for a given batch the result is deterministic. Use it
    for prefill (thousands of tokens per call) on a GPU whose grouped GEMM has fixed row tiles; the
    default ``rows=256`` is ``grouped_mm``'s tile height measured on an H100 and an H200
    (``benchmarks/diag_prefill_stages.py``). Under ``rows=1`` it is exactly ``inner``.

    Written with torch operations only: JAX and Keras raise a :class:`~dynamic_moe_router.PolicyError`.
    Inner policies that read the router input (a learned allocator) or vary per layer
    (``PerLayer``) cannot be wrapped; wrap each layer's policy instead.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.65, 0.1, 0.25], [0.2, 0.7, 0.1]])
        >>> inner = dmr.TopP(p=0.6)  # tokens 0-2 keep expert 0 only, token 3 expert 1 only
        >>> dmr.route(probs, inner, native_k=2).ids.tolist()  # 3 is the "dropped" sentinel
        [[0, 3], [0, 3], [0, 3], [1, 3]]
        >>> r = dmr.route(probs, dmr.TileAware(inner, rows=2, mode="refill"), native_k=2)
        >>> r.ids.tolist()  # expert 0: 3 -> 4 rows (token 3's 0.2); expert 1: 1 -> 2 (token 1's 0.3)
        [[0, 3], [0, 1], [0, 3], [1, 0]]
    """

    inner: RoutingPolicy = field(default_factory=lambda: _static())
    #: the grouped GEMM's row-tile height (>= 1)
    rows: int = 256
    #: ``"round"``, ``"trim"`` or ``"refill"`` (see the class doc)
    mode: str = "round"

    def __post_init__(self) -> None:
        from ._batch import BatchAware
        from ._per_layer import PerLayer

        if (
            not isinstance(self.inner, RoutingPolicy)
            or isinstance(self.inner, (PerLayer, BatchAware, TileAware))
            or self.inner.reads_router_input
        ):
            raise PolicyError(
                f"tile_aware: inner must be a score policy (not PerLayer, BatchAware, TileAware or a "
                f"learned allocator), got {self.inner!r}; for per-layer settings use PerLayer of TileAware",
                field="inner",
            )
        check_int("rows", self.rows, minimum=1)
        if self.mode not in TILE_MODES:
            raise PolicyError(
                f"tile_aware: mode must be one of {', '.join(TILE_MODES)}, got {self.mode!r}", field="mode"
            )

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        inner_min, inner_max = self.inner.k_range(native_k, num_experts)
        return min(inner_min, 1), inner_max  # trim may take a token down to its first slot

    def keep_counts(self, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any:
        raise PolicyError(
            "tile_aware keeps slots that need not be a prefix of a token's ranking, which keep counts "
            "cannot describe; route with dmr.route or dmr.patch (they use rerank_ops)",
            field="inner",
        )

    def rerank_ops(
        self,
        ops: Any,
        scores: Any,  # (T, E) the family's ranking scores
        ranked_ids: Any,  # (T, k_max) the family's top-k_max
        ranked_probs: Any,  # (T, k_max) float32
        probs: Any,  # (T, E) float32
        native_k: int,
    ) -> tuple[Any, Any]:  # ((T, k_max) ids, kept first; (T,) counts)
        if getattr(ops, "name", None) != "torch":
            raise PolicyError(
                f"tile_aware is written with torch operations only, not {getattr(ops, 'name', ops)!r}",
                field="inner",
            )
        import torch

        num_experts, k_max = probs.shape[1], ranked_ids.shape[1]
        inner_min = self.inner.k_range(native_k, num_experts)[0]
        counts = self.inner.keep_counts_ops(ops, ranked_probs, probs, inner_min, k_max)  # (T,)
        if self.rows == 1 or ranked_ids.shape[0] == 0:
            return ranked_ids, counts
        slots = torch.arange(k_max, device=probs.device)  # (k_max,)
        # candidates the family excludes (-inf score) are never kept, as in select()
        valid = torch.isfinite(scores.gather(1, ranked_ids))  # (T, k_max)
        counts = torch.minimum(counts, valid.sum(-1))  # (T,)
        kept = slots[None, :] < counts[:, None]  # (T, k_max): inner's choice
        flat_e = ranked_ids.reshape(-1)  # (N,) candidates' experts
        flat_kept, flat_valid = kept.reshape(-1), valid.reshape(-1)  # (N,)
        first = (slots[None, :] == 0).expand_as(kept).reshape(-1)  # (N,)
        # per expert: kept rows, valid candidates, rows that are a token's kept first slot; scatter_add
        # of integers adds exactly in any order, and no boolean indexing keeps it sync-free
        zeros = torch.zeros(num_experts, dtype=torch.int64, device=probs.device)  # (E,)
        have = zeros.scatter_add(0, flat_e, flat_kept.long())  # (E,)
        avail = zeros.scatter_add(0, flat_e, flat_valid.long())  # (E,)
        firsts = zeros.scatter_add(0, flat_e, (flat_kept & first).long())  # (E,)
        tile = self.rows
        down = have // tile * tile  # (E,)
        up = torch.minimum((have + tile - 1) // tile * tile, avail)  # (E,)
        trim = torch.where(have < tile, have, torch.maximum(down, firsts))  # (E,) never below a tile
        if self.mode == "trim":
            target = trim
        elif self.mode == "refill":
            target = up
        else:  # round: refill from half a tile up, else trim (which leaves < 1 tile as it is)
            target = torch.where(have - down >= (tile + 1) // 2, up, trim)
        # rank of each candidate within its expert: kept first slots, then other kept slots, then
        # dropped ones, then excluded ones (2, 1, 0, -1), each class by probability. One sort of an
        # exact int64 key (expert, class, probability's float32 bits, which order non-negative floats
        # as integers; -0.0 would not, so it is mapped to +0.0); a stable sort keeps batch order
        # among equal keys
        cls = flat_kept.long() + (flat_kept & first).long() - (~flat_valid).long()  # (N,)
        prob = ranked_probs.reshape(-1).float()  # (N,)
        prob = torch.where(prob > 0, prob, torch.zeros_like(prob))  # -0.0, NaN (and negatives) -> +0.0
        bits = prob.view(torch.int32).long()  # (N,) in [0, 2**31): ordered as the probabilities
        key = (flat_e << 33) | ((2 - cls) << 31) | (0x7FFFFFFF - bits)  # (N,) ascending = wanted order
        sorted_key, order = torch.sort(key, stable=True)  # (N,)
        total = zeros.scatter_add(0, flat_e, torch.ones_like(flat_e))  # (E,) candidates, excluded too
        start = torch.cumsum(total, 0) - total  # (E,) each expert's first position in order
        rank = torch.empty_like(order)
        rank.scatter_(0, order, torch.arange(order.numel(), device=order.device) - start[sorted_key >> 33])
        keep = (rank < target[flat_e]).reshape(kept.shape)  # (T, k_max)
        # kept slots first, each group in the family's order: a slot's new position from running counts
        n_keep = keep.sum(-1, keepdim=True)  # (T, 1)
        pos = torch.where(keep, keep.cumsum(-1) - 1, n_keep + (~keep).cumsum(-1) - 1)  # (T, k_max)
        return torch.empty_like(ranked_ids).scatter_(1, pos, ranked_ids), n_keep.squeeze(-1)

    def describe(self) -> str:
        return f"tile_aware(inner={self.inner.describe()}, rows={self.rows}, mode={self.mode!r})"


def _static() -> RoutingPolicy:
    from ._builtin import StaticTopK

    return StaticTopK()
