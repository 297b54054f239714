"""``profile(model)``: routed-expert pairs and FLOPs, kept apart from everything else.

Accounting (all FLOPs are matmul FLOPs, a multiply-add counting 2):

* routed-expert FLOPs = executed (token, expert) pairs x ``6 * H * I`` per layer (two GEMMs of the
  SwiGLU expert: ``2*H*2I + 2*I*H``). Executed pairs come from the patched experts' own counters
  (rows actually fed to the expert GEMMs); for an unpatched model they are the native pairs.
* native routed FLOPs = tokens x native k x ``6 * H * I``, per layer.
* shared-expert, attention and other dense FLOPs (routers, dense MLP layers, lm_head) are
  *measured* with ``torch.utils.flop_counter.FlopCounterMode`` per module, excluding the routed
  experts; they do not depend on the policy.
* ``routed_flop_reduction = 1 - routed / native_routed``; ``total_flop_reduction`` is the same
  saving over the whole model, ``(native_routed - routed) / (native_routed + dense)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .hf.layers import MoELayer, find_moe_layers, model_family, unwrap
from .hf.patching import get_patch

__all__ = ["LayerStats", "ProfileReport", "profile"]


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

    @property
    def native_pairs(self) -> int:
        return self.tokens * self.native_k

    def to_dict(self) -> dict[str, Any]:
        native = self.native_pairs
        return {
            "layer": self.index,
            "num_experts": self.num_experts,
            "native_k": self.native_k,
            "tokens": self.tokens,
            "kept_pairs": self.kept_pairs,
            "executed_pairs": self.executed_pairs,
            "native_pairs": native,
            "mean_k": self.kept_pairs / self.tokens if self.tokens else 0.0,
            "routed_flops": self.executed_pairs * self.flops_per_pair,
            "native_routed_flops": native * self.flops_per_pair,
            "routed_flop_reduction": 1.0 - self.executed_pairs / native if native else 0.0,
            "k_histogram": {str(k): n for k, n in enumerate(self.k_histogram)},
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
            "mean_k": kept / sum(layer.tokens for layer in self.layers) if tokens else 0.0,
            "routed_flops": routed,
            "native_routed_flops": native_routed,
            "routed_flop_reduction": 1.0 - routed / native_routed if native_routed else 0.0,
            "shared_expert_flops": self.shared_expert_flops,
            "attention_flops": self.attention_flops,
            "other_flops": self.other_flops,
            "dense_flops_measured": self.dense_measured,
            "total_flops": routed + dense,
            "native_total_flops": native_routed + dense,
            "total_flop_reduction": (native_routed - routed) / (native_routed + dense)
            if native_routed
            else 0.0,
            "k_histogram": hist,
            "layers": per_layer,
        }

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
        lines += [
            f"k histogram (tokens x layers): {hist}",
            f"routed-expert FLOPs: {d['routed_flops']:.4g} of native {d['native_routed_flops']:.4g} "
            f"-> {d['routed_flop_reduction']:.1%} fewer",
            f"shared-expert FLOPs: {d['shared_expert_flops']:.4g}   "
            f"attention FLOPs: {d['attention_flops']:.4g}   other dense FLOPs: {d['other_flops']:.4g}",
            f"whole model: {d['total_flops']:.4g} of native {d['native_total_flops']:.4g} "
            f"-> {d['total_flop_reduction']:.1%} fewer",
        ]
        return "\n".join(lines)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # type: ignore[no-untyped-def]
    """FLOPs of the CPU SDPA kernel (not in torch's table): ``QK^T`` and ``AV`` for full masks."""
    *batch, s, d = query_shape
    length, dv = key_shape[-2], value_shape[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * s * length * d + 2 * b * s * length * dv


def _flop_counter():  # type: ignore[no-untyped-def]
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextmanager
def profile(model: torch.nn.Module, *, count_dense: bool = True) -> Iterator[ProfileReport]:
    """Count routed pairs and FLOPs of everything ``model`` runs inside the block.

    Works on patched models (the dynamic routing) and on unpatched ones (the native routing).
    ``count_dense=False`` skips the FLOP counter for shared experts, attention and other layers
    (faster; those fields are then 0 and ``dense_flops_measured`` is False).

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> model = tiny_model("mixtral")
        >>> with dmr.patched(model, dmr.StaticTopK(k=1)), dmr.profile(model) as report:
        ...     _ = model(torch.tensor([[5, 6, 7, 8]]))
        >>> d = report.to_dict()
        >>> d["tokens"], d["executed_pairs"], d["native_pairs"], d["routed_flop_reduction"]
        (4, 8, 16, 0.5)
    """
    root = unwrap(model)
    spec = model_family(root)
    handle = get_patch(root)
    layers: list[MoELayer] = handle.layers if handle is not None else find_moe_layers(root, spec)[0]
    counters = [e.counter for e in handle.experts] if handle is not None else [None] * len(layers)
    start = [c.executed_pairs if c is not None else 0 for c in counters]
    stats = [
        LayerStats(layer.index, layer.num_experts, layer.native_k, layer.flops_per_pair) for layer in layers
    ]
    report = ProfileReport(
        family=spec.model_type,
        policy=handle.policy.describe() if handle is not None else "native (unpatched)",
        layers=stats,
        dense_measured=count_dense,
    )

    def make_hook(st: LayerStats, num_experts: int):  # type: ignore[no-untyped-def]
        def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
            hidden = args[0] if args else kwargs["hidden_states"]
            ids = (
                args[1]
                if len(args) > 1
                else next(v for k, v in kwargs.items() if "index" in k or "indices" in k)
            )
            counts = (ids < num_experts).sum(dim=-1)  # (T,)
            hist = torch.bincount(counts, minlength=ids.shape[-1] + 1).tolist()
            if len(st.k_histogram) < len(hist):
                st.k_histogram += [0] * (len(hist) - len(st.k_histogram))
            for k, n in enumerate(hist):
                st.k_histogram[k] += n
            st.tokens += int(hidden.shape[0])
            st.kept_pairs += int(counts.sum())

        return hook

    with ExitStack() as stack:
        for layer, st in zip(layers, stats, strict=False):
            h = layer.experts.register_forward_pre_hook(make_hook(st, layer.num_experts), with_kwargs=True)
            stack.callback(h.remove)
        counter = stack.enter_context(_flop_counter()) if count_dense else None
        yield report
    for st, c, s in zip(stats, counters, start, strict=False):
        st.executed_pairs = c.executed_pairs - s if c is not None else st.kept_pairs
    if counter is not None:
        _split_dense(report, root, layers, counter.get_flop_counts())


def _split_dense(report: ProfileReport, root: torch.nn.Module, layers: list[MoELayer], counts: dict) -> None:  # type: ignore[type-arg]
    prefix = type(root).__name__
    names = {id(m): f"{prefix}.{n}" if n else prefix for n, m in root.named_modules()}

    def total(name: str) -> int:
        return int(sum(counts.get(name, {}).values()))

    whole = total("Global")
    routed = sum(total(names[id(layer.experts)]) for layer in layers)
    shared = sum(total(names[id(m)]) for layer in layers for m in layer.shared)
    attention = sum(total(n) for n in {v for v in names.values() if v.endswith("self_attn")})
    report.shared_expert_flops = shared
    report.attention_flops = attention
    report.other_flops = whole - routed - shared - attention
