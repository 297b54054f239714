"""Standard errors of a score and of the difference between two routings scored on the same items.

A paired comparison scores both routings on the same task items or text windows, so its standard
error comes from the per-item (or per-window) differences, not from two separate spreads. Accuracy
differences here use the analytic standard error of the mean difference; perplexity ratios use a
bootstrap over windows, because the ratio is the exponential of a mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["mean_se", "paired_delta", "paired_ratio"]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and its standard error (0 for a single value).

    Example:
        >>> mean_se([1.0, 0.0, 1.0, 0.0])
        (0.5, 0.28867513459481287)
    """
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def paired_delta(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` item by item and its standard error (``a`` and ``b`` score the same items).

    Example:
        >>> paired_delta([1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0])
        (0.25, 0.25)
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores must cover the same items, got {len(a)} and {len(b)}")
    return mean_se([x - y for x, y in zip(a, b, strict=True)])


def paired_ratio(
    nll: torch.Tensor,  # (B,) per window, or (B, N) per token
    base: torch.Tensor,  # the same shape, the baseline's
    seed: int = 0,
    draws: int = 2000,
) -> tuple[float, float]:
    """``exp(mean nll - mean base)`` (a perplexity ratio) and its bootstrap standard error over the
    ``B`` windows or sequences (a 2-D input is averaged over its tokens first).

    Example:
        >>> import torch
        >>> paired_ratio(torch.ones(4, 3), torch.ones(4, 3))
        (1.0, 0.0)
        >>> ratio, se = paired_ratio(torch.tensor([2.1, 2.0, 2.2]), torch.tensor([2.0, 2.0, 2.0]))
        >>> round(ratio, 4), se > 0
        (1.1052, True)
    """
    import torch

    if nll.shape != base.shape or nll.dim() not in (1, 2):
        raise ValueError(
            f"paired_ratio takes two (B,) or (B, N) tensors of one shape, got {tuple(nll.shape)} and "
            f"{tuple(base.shape)}"
        )
    diff = (nll - base).double().cpu()  # (B,) or (B, N)
    if diff.dim() == 2:
        diff = diff.mean(dim=1)  # (B,) per sequence
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diff.numel(), (draws, diff.numel()), generator=gen)  # (draws, B)
    boot = torch.exp(diff[idx].mean(dim=1))  # (draws,)
    return math.exp(float(diff.mean())), float(boot.std())
