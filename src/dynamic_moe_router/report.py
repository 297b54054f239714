"""The profile report: per-layer counts and the FLOP accounting, framework-neutral.

:class:`LayerStats` and :class:`ProfileReport` hold plain numbers; the torch profiler
(:func:`dynamic_moe_router.hf.profiling.profile`, also ``dmr.profile``) and the keras-hub one
(:func:`dynamic_moe_router.keras.profile`) fill them. Accounting (all FLOPs are matmul FLOPs, a
multiply-add counting 2):

* routed-expert FLOPs = executed (token, expert) pairs x ``flops_per_pair`` (``6 * H * I`` for a
  SwiGLU expert) per layer; native routed FLOPs = (tokens x native k - the native routing's
  zero-expert pairs) x ``flops_per_pair``;
* zero-computation (identity) experts (longcat_flash) cost no expert FLOPs: pairs routed to them
  are kept pairs (``kept_pairs`` counts every kept slot, ``mean_k`` averages them) but never
  executed pairs; they are counted apart as ``zero_expert_pairs``. ``native_pairs`` stays the
  native slot count ``tokens x native k``; ``native_zero_expert_pairs`` says how many of those slots
  the family's own top-k sent to zero experts, so that ``StaticTopK`` shows no FLOP reduction and a
  policy that swaps a real expert for a zero expert shows exactly the FLOPs it saves;
* ``routed_flop_reduction = 1 - routed / native_routed``; ``total_flop_reduction`` is the same
  saving over the whole model, ``(native_routed - routed) / (native_routed + dense)``, where the
  dense FLOPs (shared experts, attention, other layers) are what the profiler measured.

Example:
    >>> from dynamic_moe_router.report import LayerStats, ProfileReport
    >>> layer = LayerStats(index=0, num_experts=8, native_k=2, flops_per_pair=6, tokens=4,
    ...                    kept_pairs=6, executed_pairs=6, k_histogram=[0, 2, 2])
    >>> d = ProfileReport("demo", "top_p(p=0.5)", [layer], dense_measured=False).to_dict()
    >>> d["routed_flops"], d["native_routed_flops"], d["routed_flop_reduction"], d["mean_k"]
    (36, 48, 0.25, 1.5)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerStats", "ProfileReport"]


@dataclass
class LayerStats:
    """Counts of one MoE layer during a profile."""

    index: int
    num_experts: int
    native_k: int
    flops_per_pair: int
    tokens: int = 0
    kept_pairs: int = 0
    executed_pairs: int = 0
    k_histogram: list[int] = field(default_factory=list)  # k_histogram[k] = tokens that kept k experts
    #: matmul FLOPs the policy itself spends per token (a learned allocator's head; 0 otherwise)
    policy_flops_per_token: int = 0
    #: pairs each rank's experts executed, in rank order (expert-parallel models only; their sum is
    #: ``executed_pairs``)
    rank_executed_pairs: list[int] = field(default_factory=list)
    #: kept pairs routed to zero-computation (identity) experts: no GEMM, not in ``executed_pairs``
    zero_expert_pairs: int = 0
    #: of the ``native_pairs`` slots, those the family's own routing sends to zero experts
    native_zero_expert_pairs: int = 0

    @property
    def native_pairs(self) -> int:
        return self.tokens * self.native_k

    @property
    def native_executed_pairs(self) -> int:
        """The pairs the native routing runs through an expert's GEMMs."""
        return self.native_pairs - self.native_zero_expert_pairs

    def to_dict(self) -> dict[str, Any]:
        native = self.native_executed_pairs
        return {
            "layer": self.index,
            "num_experts": self.num_experts,
            "native_k": self.native_k,
            "tokens": self.tokens,
            "kept_pairs": self.kept_pairs,
            "executed_pairs": self.executed_pairs,
            "native_pairs": self.native_pairs,
            "zero_expert_pairs": self.zero_expert_pairs,
            "native_zero_expert_pairs": self.native_zero_expert_pairs,
            "mean_k": self.kept_pairs / self.tokens if self.tokens else 0.0,
            "routed_flops": self.executed_pairs * self.flops_per_pair,
            "native_routed_flops": native * self.flops_per_pair,
            "routed_flop_reduction": 1.0 - self.executed_pairs / native if native else 0.0,
            "k_histogram": {str(k): n for k, n in enumerate(self.k_histogram)},
            "policy_flops": self.tokens * self.policy_flops_per_token,
            **({"rank_executed_pairs": list(self.rank_executed_pairs)} if self.rank_executed_pairs else {}),
        }


@dataclass
class ProfileReport:
    """Filled while the ``profile`` block runs; read it after the block."""

    family: str
    policy: str
    layers: list[LayerStats]
    shared_expert_flops: int = 0
    attention_flops: int = 0
    other_flops: int = 0
    dense_measured: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Totals, per-layer entries and the k histogram as plain JSON-ready values."""
        per_layer = [layer.to_dict() for layer in self.layers]
        tokens = self.layers[0].tokens if self.layers else 0
        executed = sum(layer.executed_pairs for layer in self.layers)
        kept = sum(layer.kept_pairs for layer in self.layers)
        native = sum(layer.native_pairs for layer in self.layers)
        routed = sum(d["routed_flops"] for d in per_layer)
        native_routed = sum(d["native_routed_flops"] for d in per_layer)
        dense = self.shared_expert_flops + self.attention_flops + self.other_flops
        policy_flops = sum(d["policy_flops"] for d in per_layer)
        hist: dict[str, int] = {}
        for layer in self.layers:
            for k, n in enumerate(layer.k_histogram):
                hist[str(k)] = hist.get(str(k), 0) + n
        return {
            "family": self.family,
            "policy": self.policy,
            "moe_layers": len(self.layers),
            "tokens": tokens,
            "kept_pairs": kept,
            "executed_pairs": executed,
            "native_pairs": native,
            "zero_expert_pairs": sum(layer.zero_expert_pairs for layer in self.layers),
            "native_zero_expert_pairs": sum(layer.native_zero_expert_pairs for layer in self.layers),
            "mean_k": kept / sum(layer.tokens for layer in self.layers) if tokens else 0.0,
            "routed_flops": routed,
            "native_routed_flops": native_routed,
            "routed_flop_reduction": 1.0 - routed / native_routed if native_routed else 0.0,
            "shared_expert_flops": self.shared_expert_flops,
            "attention_flops": self.attention_flops,
            "other_flops": self.other_flops,
            "dense_flops_measured": self.dense_measured,
            "policy_flops": policy_flops,
            "policy_flop_fraction": policy_flops / native_routed if native_routed else 0.0,
            "total_flops": routed + dense + policy_flops,
            "native_total_flops": native_routed + dense,
            "total_flop_reduction": (native_routed - routed - policy_flops) / (native_routed + dense)
            if native_routed
            else 0.0,
            "k_histogram": hist,
            "layers": per_layer,
            **self._expert_parallel(),
        }

    def _expert_parallel(self) -> dict[str, Any]:
        """Per-rank load of an expert-parallel model: pairs per rank summed over layers, and the
        imbalance ``max / mean`` (1.0 = even)."""
        ranked = [layer.rank_executed_pairs for layer in self.layers if layer.rank_executed_pairs]
        if not ranked:
            return {}
        per_rank = [sum(col) for col in zip(*ranked, strict=True)]
        mean = sum(per_rank) / len(per_rank)
        return {
            "expert_parallel": {
                "ranks": len(per_rank),
                "rank_executed_pairs": per_rank,
                "load_imbalance": max(per_rank) / mean if mean else 1.0,
            }
        }

    def plot(self):  # type: ignore[no-untyped-def]
        """A matplotlib figure for notebooks: mean kept k per MoE layer (against the native k) and the
        histogram of k over all layers. Needs matplotlib (``pip install "dynamic-moe-router-kit[bench]"``).

        Example:
            >>> import torch, dynamic_moe_router as dmr
            >>> from dynamic_moe_router.hf.tiny import tiny_model
            >>> model = tiny_model("olmoe")
            >>> with dmr.patched(model, dmr.TopP(p=0.5)), dmr.profile(model) as report:
            ...     _ = model(torch.tensor([[5, 6, 7, 8]]))
            >>> fig = report.plot()
            >>> [ax.get_title() for ax in fig.axes]
            ['mean kept k per MoE layer', 'tokens by kept k (all layers)']
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as err:
            from .errors import MissingDependencyError

            raise MissingDependencyError(
                'ProfileReport.plot needs matplotlib: pip install "dynamic-moe-router-kit[bench]"'
            ) from err
        d = self.to_dict()
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
        layers = [row["layer"] for row in d["layers"]]
        left.bar([str(x) for x in layers], [row["mean_k"] for row in d["layers"]], color="#d66000")
        left.plot([str(x) for x in layers], [row["native_k"] for row in d["layers"]], "k--", label="native k")
        left.set_title("mean kept k per MoE layer")
        left.set_xlabel("MoE layer")
        left.legend()
        hist = d["k_histogram"]
        right.bar(list(hist), list(hist.values()), color="#1f5fbf")
        right.set_title("tokens by kept k (all layers)")
        right.set_xlabel("k")
        fig.suptitle(f"{d['policy']}: {d['routed_flop_reduction']:.1%} fewer routed FLOPs", fontsize=10)
        fig.tight_layout()
        return fig

    def summary(self) -> str:
        """A printable table: one row per MoE layer, then the totals."""
        d = self.to_dict()
        lines = [
            f"family: {d['family']}   policy: {d['policy']}   tokens: {d['tokens']}",
            f"{'layer':>5} {'E':>4} {'k*':>3} {'mean k':>7} {'executed':>10} {'native':>10} "
            f"{'routed FLOP cut':>16}",
        ]
        for row in d["layers"]:
            lines.append(
                f"{row['layer']:>5} {row['num_experts']:>4} {row['native_k']:>3} {row['mean_k']:>7.3f} "
                f"{row['executed_pairs']:>10} {row['native_pairs']:>10} {row['routed_flop_reduction']:>15.1%}"
            )
        hist = ", ".join(f"k={k}: {n}" for k, n in d["k_histogram"].items() if n)
        if d["zero_expert_pairs"] or d["native_zero_expert_pairs"]:
            lines.append(
                f"zero-computation expert pairs (no expert FLOPs, not executed): {d['zero_expert_pairs']} "
                f"(native routing: {d['native_zero_expert_pairs']})"
            )
        lines += [
            f"k histogram (tokens x layers): {hist}",
            f"routed-expert FLOPs: {d['routed_flops']:.4g} of native {d['native_routed_flops']:.4g} "
            f"-> {d['routed_flop_reduction']:.1%} fewer",
            f"policy FLOPs (the allocator's own, not routed): {d['policy_flops']:.4g} "
            f"= {d['policy_flop_fraction']:.2%} of native routed",
            f"shared-expert FLOPs: {d['shared_expert_flops']:.4g}   "
            f"attention FLOPs: {d['attention_flops']:.4g}   other dense FLOPs: {d['other_flops']:.4g}",
            f"whole model: {d['total_flops']:.4g} of native {d['native_total_flops']:.4g} "
            f"-> {d['total_flop_reduction']:.1%} fewer",
        ]
        return "\n".join(lines)
