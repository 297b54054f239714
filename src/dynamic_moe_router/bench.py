"""Deprecated: the quality sweep behind ``dmr bench`` moved to :mod:`dynamic_moe_router.sweeps.quality`.

``from dynamic_moe_router.bench import BenchSettings, run_bench`` keeps working for one release and
warns once when this module is imported; import from ``dynamic_moe_router.sweeps.quality`` instead.
"""

from __future__ import annotations

import warnings

from .sweeps.quality import BenchSettings, run_bench, summary_table

warnings.warn(
    "dynamic_moe_router.bench is deprecated and will be removed in the next release; import "
    "dynamic_moe_router.sweeps.quality instead (same names)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["BenchSettings", "run_bench", "summary_table"]
