"""Measure a policy on calibration windows: per-window NLL and the routed-FLOP accounting, in one pass.

The budget fits (:func:`~dynamic_moe_router.learn.fit_budget`,
:func:`~dynamic_moe_router.learn.fit_quantile_budget`), the reference-allocator tests and the
learned-allocator benchmark all read a policy's quality and reduction through :func:`score_windows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..hf.layers import unwrap
from ..hf.patching import patched
from ..hf.profiling import profile
from ..policies import RoutingPolicy
from ..report import ProfileReport

__all__ = ["WindowScore", "measure_reduction", "score_windows"]


@dataclass(frozen=True, eq=False)  # a tensor field: compared by identity
class WindowScore:
    """What :func:`score_windows` measured.

    Attributes:
        nll: ``(W,)`` fp32 on the CPU: each window's mean next-token NLL.
        report: the :class:`~dynamic_moe_router.ProfileReport` of the pass (routed pairs per layer).
    """

    nll: torch.Tensor  # (W,)
    report: ProfileReport

    @property
    def mean_nll(self) -> float:
        """Mean next-token NLL over every predicted token (the windows have one length)."""
        return float(self.nll.mean())

    @property
    def reduction(self) -> float:
        """Routed-FLOP reduction against the native top-k (``routed_flop_reduction``)."""
        return float(self.report.to_dict()["routed_flop_reduction"])

    def layer_keep(self) -> dict[int, float]:
        """Each MoE layer's kept share of its native pairs, by layer index."""
        return {st.index: st.kept_pairs / max(1, st.native_pairs) for st in self.report.layers}


@torch.no_grad()
def score_windows(
    model: Any, policy: RoutingPolicy | None, windows: torch.Tensor, batch_size: int = 8
) -> WindowScore:
    """Run ``model`` patched with ``policy`` (``None``: the native routing) on ``windows``
    ``(W, context + 1)`` of token ids, ``batch_size`` windows per forward; return each window's mean
    next-token NLL and the pass's routed-pair accounting (:func:`dynamic_moe_router.profile`).

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> from dynamic_moe_router.learn import score_windows
        >>> model = tiny_model("mixtral")  # native k 2
        >>> s = score_windows(model, dmr.StaticTopK(k=1), torch.randint(0, 64, (3, 9)))
        >>> s.nll.shape, s.reduction, s.layer_keep()
        (torch.Size([3]), 0.5, {0: 0.5, 1: 0.5})
    """
    device = next(unwrap(model).parameters()).device
    out = []
    with patched(model, policy, validate=False), profile(model, count_dense=False) as report:
        for start in range(0, len(windows), batch_size):
            w = windows[start : start + batch_size].to(device)
            logits = model(w[:, :-1]).logits.float()  # (B, S, V)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")
            out.append(nll.mean(1).cpu())  # (B,)
    return WindowScore(torch.cat(out), report)


def measure_reduction(model: Any, policy: RoutingPolicy, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Routed-FLOP reduction of ``policy`` on ``windows``, as :func:`dynamic_moe_router.profile`
    accounts it (``routed_flop_reduction``: executed pairs from the patch's counters)."""
    return score_windows(model, policy, windows, batch_size).reduction
