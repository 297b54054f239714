"""Deprecated: the framework-neutral math moved to :mod:`dynamic_moe_router.core` (0.2.0).

``dynamic_moe_router.spec`` keeps working for one release and warns once when imported. The
per-policy count functions (``top_p_counts`` and friends) now live in each policy's
``keep_counts_ops``; the names here call it.
"""

from __future__ import annotations

from typing import Any

from . import core
from ._deprecation import warn_renamed

warn_renamed("dynamic_moe_router.spec", "dynamic_moe_router.core (same names)", stacklevel=3)

__all__ = [  # core's names plus the deprecated count functions
    *core.__all__,  # pyright: ignore[reportUnsupportedDunderAll]
    "entropy_counts",
    "relative_threshold_counts",
    "static_counts",
    "top_p_counts",
]


def static_counts(ops: Any, ranked_probs: Any, k: int) -> Any:
    """Deprecated: ``StaticTopK(k).keep_counts_ops(ops, ranked_probs, None, k, k)``."""
    from .policies import StaticTopK

    return StaticTopK(k).keep_counts_ops(ops, ranked_probs, None, k, k)


def top_p_counts(ops: Any, ranked_probs: Any, p: float, k_min: int, k_max: int) -> Any:
    """Deprecated: ``TopP(p=p).keep_counts_ops(ops, ranked_probs, None, k_min, k_max)``."""
    from .policies import TopP

    return TopP(p=p).keep_counts_ops(ops, ranked_probs, None, k_min, k_max)


def relative_threshold_counts(ops: Any, ranked_probs: Any, beta: float, k_min: int, k_max: int) -> Any:
    """Deprecated: ``RelativeThreshold(beta=beta).keep_counts_ops(ops, ranked_probs, None, k_min, k_max)``."""
    from .policies import RelativeThreshold

    return RelativeThreshold(beta=beta).keep_counts_ops(ops, ranked_probs, None, k_min, k_max)


def entropy_counts(ops: Any, probs: Any, low: float, high: float, k_min: int, k_max: int) -> Any:
    """Deprecated: ``EntropyAdaptive(low=low, high=high).keep_counts_ops(ops, None, probs, k_min, k_max)``."""
    from .policies import EntropyAdaptive

    return EntropyAdaptive(low=low, high=high).keep_counts_ops(ops, None, probs, k_min, k_max)


def __getattr__(name: str) -> Any:
    return getattr(core, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
