"""The routing contract and :func:`~dynamic_moe_router.route`, the pure function every backend shares.

Contract (a :class:`Routing`), for ``T`` tokens, ``E`` experts and a policy whose largest k is
``k_max``:

* ``ids (T, k_max)`` int64: the kept experts of each token in the family's rank order, then the
  sentinel ``E`` (= ``num_experts``) in every unused slot. Kept ids are unique and in ``[0, E)``.
* ``weights (T, k_max)``: the combine weight of each kept expert, exactly ``0`` at sentinel slots.
* ``counts (T,)`` int64: the number of kept experts per token, ``0 <= counts <= k_max``.

Slots ``[0, counts[t])`` of token ``t`` are kept, the rest are sentinels: kept slots always form a
prefix. An experts forward computes exactly ``counts.sum()`` (token, expert) pairs.

:class:`Routing` is :class:`dynamic_moe_router.core.Routing`, the one routing type that the JAX
and Keras ``route`` functions return as well.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import core
from .core import Routing, Selected
from .core._torch import TORCH_OPS
from .errors import RoutingInputError
from .policies import RoutingPolicy

__all__ = ["Normalize", "Routing", "Selection", "combine_weights", "finish", "route", "select"]

Normalize = Literal["none", "sum", "softmax"]

#: The intermediate result of :func:`select` (:class:`dynamic_moe_router.core.Selected` over torch
#: tensors): ranked candidates, which of them are kept, and the counts.
Selection = Selected


def _check_2d(name: str, x: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise RoutingInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    core.check_matrix(name, tuple(x.shape), floating=x.is_floating_point(), dtype=x.dtype, scores_shape=shape)


def select(
    scores: torch.Tensor,
    policy: RoutingPolicy,
    *,
    native_k: int,
    probs: torch.Tensor | None = None,
    layer: int | None = None,
    validate: bool = True,
) -> Selected[torch.Tensor]:
    """Rank each token's candidates by ``scores`` and let ``policy`` choose how many to keep.

    ``scores`` may hold ``-inf`` for candidates the family excluded (group-limited routing); such a
    candidate is never kept, even if ``min_k`` asks for it. The math is
    :func:`dynamic_moe_router.core.select` with :data:`~dynamic_moe_router.core.TORCH_OPS`.
    """
    _check_2d("scores", scores)
    num_tokens, num_experts = scores.shape
    if probs is not None:
        _check_2d("probs", probs, (num_tokens, num_experts))
    core.check_native_k(native_k, num_experts)
    layer_policy = policy.for_layer(layer)
    layer_policy.k_range(native_k, num_experts)  # a PolicyError before the host checks
    if validate and num_tokens:
        core.check_finite(TORCH_OPS, "scores", scores, layer, allow_neg_inf=True)
        core.check_finite(
            TORCH_OPS, "probabilities", scores if probs is None else probs, layer, allow_neg_inf=False
        )
    return core.select(TORCH_OPS, scores, layer_policy, native_k=native_k, probs=probs)


def combine_weights(
    ranked_gate: torch.Tensor,  # (T, k_max): weight source at the ranked candidates
    keep: torch.Tensor,  # (T, k_max) bool
    normalize: Normalize = "none",
    scaling: float = 1.0,
) -> torch.Tensor:  # (T, k_max), zero where not kept
    """Combine weights of the kept candidates.

    * ``"none"``: the gate values as they are (families that do not renormalise);
    * ``"sum"``: divided by their sum over the kept candidates (renormalising families);
    * ``"softmax"``: a softmax over the kept candidates, ``ranked_gate`` being logits
      (top-k-then-softmax families such as gpt_oss and granitemoe).

    A token with nothing kept gets all-zero weights. ``scaling`` multiplies the result. The math
    is :func:`dynamic_moe_router.core.combine_weights` with :data:`~dynamic_moe_router.core.TORCH_OPS`.
    """
    return core.combine_weights(TORCH_OPS, ranked_gate, keep, normalize, scaling)


def route(
    scores: torch.Tensor,
    policy: RoutingPolicy,
    *,
    native_k: int,
    probs: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    normalize: Normalize = "none",
    scaling: float = 1.0,
    layer: int | None = None,
    validate: bool = True,
) -> Routing[torch.Tensor]:
    """Route ``T`` tokens over ``E`` experts with a dynamic ``policy``.

    Args:
        scores: ``(T, E)`` the family's selection scores; candidates are ranked by them
            (``torch.topk`` order). ``-inf`` marks a candidate the family excluded.
        policy: any :class:`~dynamic_moe_router.RoutingPolicy`; a ``PerLayer`` is resolved with
            ``layer``.
        native_k: the model's own top-k (``StaticTopK()`` and ``max_k=None`` use it).
        probs: ``(T, E)`` the probability distribution the policy reads (defaults to ``scores``,
            which must then be probabilities, e.g. a softmax).
        gate: ``(T, E)`` the source of the combine weights (defaults to ``probs``).
        normalize: how kept weights are normalised: ``"none"``, ``"sum"`` or ``"softmax"``
            (see :func:`~dynamic_moe_router.routing.combine_weights`).
        scaling: a factor applied to every weight (DeepSeek's ``routed_scaling_factor``).
        layer: the MoE layer index, for ``PerLayer`` and error messages.
        validate: check that scores and probabilities are finite (a host sync); on failure
            :class:`~dynamic_moe_router.NonFiniteRouterScoresError` names the layer.

    Returns:
        A :class:`Routing`: ``ids (T, k_max)`` with sentinel ``E``, ``weights (T, k_max)`` zero
        at sentinels, ``counts (T,)``.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
        >>> r = dmr.route(probs, dmr.TopP(p=0.7), native_k=2, normalize="sum")
        >>> r.ids.tolist(), r.counts.tolist()
        ([[0, 1], [0, 4]], [2, 1])
        >>> [[round(w, 3) for w in row] for row in r.weights.tolist()]
        [[0.625, 0.375], [1.0, 0.0]]
    """
    sel = select(scores, policy, native_k=native_k, probs=probs, layer=layer, validate=validate)
    source = (scores if probs is None else probs) if gate is None else gate
    if gate is not None:
        _check_2d("gate", gate, tuple(scores.shape))
    ranked_gate = source.gather(1, sel.ranked_ids)  # (T, k_max)
    weights = combine_weights(ranked_gate, sel.keep, normalize, scaling)
    return finish(sel, weights)


def finish(sel: Selected[torch.Tensor], weights: torch.Tensor) -> Routing[torch.Tensor]:
    """Apply the sentinel to dropped slots and package a :class:`Routing`."""
    ids = core.apply_sentinel(TORCH_OPS, sel.ranked_ids, sel.keep, sel.num_experts)
    return Routing(ids=ids, weights=weights, counts=sel.counts, num_experts=sel.num_experts)
