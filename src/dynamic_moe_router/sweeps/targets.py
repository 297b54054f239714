"""The headline targets ``dmr bench`` judges against, in a module without heavy imports.

``benchmarks/gen_benchmarks_md.py`` reads them to render the verdicts, so rendering
``BENCHMARKS.md`` does not import torch, transformers or the evaluation stack just for three
numbers.

Example:
    >>> from dynamic_moe_router.sweeps.targets import ACC_LIMIT, PPL_LIMIT, TARGETS
    >>> TARGETS, PPL_LIMIT, ACC_LIMIT
    ((0.3, 0.35), 0.01, 0.01)
"""

__all__ = ["ACC_LIMIT", "PPL_LIMIT", "TARGETS"]

#: the headline's routed-FLOP reductions, its perplexity limit (relative change) and its accuracy
#: limit (BLiMP and LAMBADA, in accuracy, i.e. 0.01 = 1 point)
TARGETS = (0.30, 0.35)
PPL_LIMIT = 0.01
ACC_LIMIT = 0.01
