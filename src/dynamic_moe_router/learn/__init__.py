"""Learned allocation: train a :class:`~dynamic_moe_router.LearnedAllocator` on a frozen model.

* :mod:`.windows`: training and budget windows spread over the documents of a corpus;
* :mod:`.trainer`: :func:`train_allocator` (distillation with a routed-FLOP budget) and
  :func:`fit_budget` (the logit offset that lands a trained allocator on a target reduction),
  :func:`fit_quantile_budget` (the per-call quantile budget, with per-layer shares), and
  :func:`train_means` (trained compensation for a fixed allocation, such as static per-layer top-k);
* :mod:`.measure`: :func:`score_windows` (per-window NLL and routed-pair accounting of a policy in
  one pass) and :func:`measure_reduction`.
"""

from .measure import WindowScore, measure_reduction, score_windows
from .trainer import (
    AllocatorTraining,
    expert_means,
    fit_budget,
    fit_quantile_budget,
    train_allocator,
    train_means,
)
from .windows import allocator_windows, spread_windows

__all__ = [
    "AllocatorTraining",
    "WindowScore",
    "allocator_windows",
    "expert_means",
    "fit_budget",
    "fit_quantile_budget",
    "measure_reduction",
    "score_windows",
    "spread_windows",
    "train_allocator",
    "train_means",
]
