"""``dmr.profile`` and its report: the torch profiler lives in :mod:`dynamic_moe_router.hf.profiling`,
the framework-neutral report in :mod:`dynamic_moe_router.report`; this module re-exports both."""

from .hf.profiling import profile
from .report import LayerStats, ProfileReport

__all__ = ["LayerStats", "ProfileReport", "profile"]
