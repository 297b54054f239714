"""Benchmark sweeps run by ``dmr bench`` (kept out of the library core).

* :mod:`.quality`: the quality / routed-FLOP sweep on the reference models (the main job), with a
  partial-results file so that an interrupted run resumes where it stopped;
* :mod:`.plot`: the Pareto plot, redrawn from a result JSON at any time (matplotlib is imported only
  there, and only when a plot is drawn).

Nothing here is imported by ``import dynamic_moe_router``.
"""

__all__: list[str] = []
