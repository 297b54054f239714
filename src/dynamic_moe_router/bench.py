"""Deprecated: the quality sweep behind ``dmr bench`` moved to :mod:`dynamic_moe_router.sweeps.quality`.

``from dynamic_moe_router.bench import BenchSettings, run_bench`` keeps working for one release and
warns once when this module is imported; import from ``dynamic_moe_router.sweeps.quality`` instead.
"""

from __future__ import annotations

from ._deprecation import warn_renamed
from .sweeps.quality import BenchSettings, run_bench, summary_table

warn_renamed("dynamic_moe_router.bench", "dynamic_moe_router.sweeps.quality (same names)", stacklevel=3)

__all__ = ["BenchSettings", "run_bench", "summary_table"]
