"""``profile(model)`` for transformers models: routed-expert pairs and FLOPs, kept apart from everything else.

The report is a :class:`~dynamic_moe_router.report.ProfileReport` (see :mod:`dynamic_moe_router.report`
for the accounting). Executed pairs come from the patched experts' own counters (rows actually fed
to the expert GEMMs); for an unpatched model they are the native pairs. Shared-expert, attention
and other dense FLOPs (routers, dense MLP layers, lm_head) are *measured* with
``torch.utils.flop_counter.FlopCounterMode`` per module, excluding the routed experts; they do
not depend on the policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch

from ..report import LayerStats, ProfileReport
from .layers import MoELayer, find_moe_layers, model_family, unwrap, watch_routing
from .parallel import gather_pairs
from .patching import get_patch

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LayerStats", "ProfileReport", "flop_counter", "profile"]


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU SDPA kernel (not in torch's table): ``QK^T`` and ``AV`` for full masks."""
    *batch, s, d = query_shape
    length, dv = key_shape[-2], value_shape[-1]
    b = 1
    for n in batch:
        b *= n
    return 2 * b * s * length * d + 2 * b * s * length * dv


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode`` (per-module counts, no display), with the CPU SDPA kernel's FLOPs,
    that also runs forward passes under ``torch.no_grad()`` of models that hand a module a
    parameter's view (transformers 5.25's hybrid families pass ``conv1d.weight.squeeze(1)`` to a
    kernel layer): torch's module tracker would attach a backward hook to that view and fail
    ("Expected gradient function to be set"); with gradients off, no backward hooks are attached.

    Example:
        >>> import torch
        >>> from dynamic_moe_router.hf.profiling import flop_counter
        >>> with torch.no_grad(), flop_counter() as counter:
        ...     _ = torch.nn.Linear(4, 3)(torch.ones(2, 4))
        >>> counter.get_total_flops()
        48
    """
    from torch.utils.flop_counter import FlopCounterMode
    from torch.utils.module_tracker import ModuleTracker

    class ForwardTracker(ModuleTracker):
        """Module nesting for FLOP attribution; backward hooks only while gradients are on."""

        def _fw_pre_hook(self, mod: torch.nn.Module, input: object) -> None:
            super()._fw_pre_hook(mod, input if torch.is_grad_enabled() else ())

        def _fw_post_hook(self, mod: torch.nn.Module, input: object, output: object) -> None:
            super()._fw_post_hook(mod, input, output if torch.is_grad_enabled() else ())

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    counter.mod_tracker = ForwardTracker()
    return counter


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
    family = model_family(root)
    handle = get_patch(root)
    layers: list[MoELayer] = handle.layers if handle is not None else find_moe_layers(root, family)[0]
    counters = [e.counter for e in handle.experts] if handle is not None else [None] * len(layers)
    start = [c.executed_pairs if c is not None else 0 for c in counters]
    start_zero = [c.zero_expert_pairs if c is not None else 0 for c in counters]
    natives = [r.native_counter for r in handle.routers] if handle is not None else [None] * len(layers)
    start_native_zero = [c.zero_expert_pairs if c is not None else 0 for c in natives]
    stats = [
        LayerStats(
            layer.index,
            layer.num_experts,
            layer.native_k,
            layer.flops_per_pair,
            policy_flops_per_token=0
            if handle is None
            else handle.policy.for_layer(layer.index).overhead_flops(layer.hidden_size),
        )
        for layer in layers
    ]
    report = ProfileReport(
        family=family.model_type,
        policy=handle.policy.describe() if handle is not None else "native (unpatched)",
        layers=stats,
        dense_measured=count_dense,
    )

    def make_hook(st: LayerStats, num_experts: int, real_experts: int):
        def hook(hidden: torch.Tensor, ids: torch.Tensor) -> None:  # (T, H), (T, k)
            counts = (ids < num_experts).sum(dim=-1)  # (T,)
            if real_experts < num_experts:  # zero-computation experts: their pairs counted apart
                st.zero_expert_pairs += int(((ids >= real_experts) & (ids < num_experts)).sum())
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
            hook = make_hook(st, layer.num_experts, layer.real_experts)
            stack.callback(watch_routing(layer, hook).remove)
        counter = stack.enter_context(flop_counter()) if count_dense else None
        yield report
    for st, c, s, s_zero in zip(stats, counters, start, start_zero, strict=False):
        if c is not None:  # the patched experts' own counts (zero-expert pairs are never executed)
            st.executed_pairs = c.executed_pairs - s
            st.zero_expert_pairs = c.zero_expert_pairs - s_zero
        else:  # unpatched: the native routing, seen at the experts' inputs
            st.executed_pairs = st.kept_pairs - st.zero_expert_pairs
    for st, n, s in zip(stats, natives, start_native_zero, strict=False):
        # the native routing's zero-expert pairs: counted by the patched router, else seen directly
        st.native_zero_expert_pairs = n.zero_expert_pairs - s if n is not None else st.zero_expert_pairs
    experts = handle.experts if handle is not None else []
    sharded = [(st, e.shard) for st, e in zip(stats, experts, strict=False) if e.shard is not None]
    if sharded:  # each rank ran its own experts' pairs only: one gather of every rank's counts
        every = gather_pairs(sharded[0][1], [st.executed_pairs for st, _ in sharded])  # [rank][layer]
        for i, (st, _) in enumerate(sharded):
            st.rank_executed_pairs = [counts[i] for counts in every]
            st.executed_pairs = sum(st.rank_executed_pairs)
    if counter is not None:
        _split_dense(report, root, layers, counter.get_flop_counts())


def _split_dense(report: ProfileReport, root: torch.nn.Module, layers: list[MoELayer], counts: dict) -> None:
    prefix = type(root).__name__
    names = {id(m): f"{prefix}.{n}" if n else prefix for n, m in root.named_modules()}

    def total(name: str) -> int:
        return int(sum(counts.get(name, {}).values()))

    whole = total("Global")
    routed = sum(total(names[id(layer.experts)]) for layer in layers)
    shared = sum(total(names[id(m)]) for layer in layers for m in layer.shared)
    # self_attn, or self_attn.0 / self_attn.1 (longcat_flash: two attention sublayers per layer)
    attention = sum(total(n) for n in {v for v in names.values() if re.search(r"self_attn(\.\d+)?$", v)})
    report.shared_expert_flops = shared
    report.attention_flops = attention
    policy = sum(st.to_dict()["policy_flops"] for st in report.layers)  # counted apart
    report.other_flops = whole - routed - shared - attention - policy
