"""``patch`` / ``unpatch`` / ``patched``: per-instance, atomic, reversible dynamic routing.

Patching replaces the ``forward`` of each MoE block's *router instance* and *experts instance*
(never a class), so:

* the module tree, parameter names and ``state_dict`` are unchanged;
* router forward hooks (``output_router_logits``, auxiliary losses) still see the router's logits;
* accelerate's device hooks keep working: where a module carries one, its ``_old_forward`` is
  replaced instead, so the hook still moves weights around our forward;
* ``unpatch`` restores exactly the instance attributes that were there before.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .. import core
from .._deprecation import warn_renamed
from ..backends import BACKENDS
from ..core import Selected
from ..core._torch import TORCH_OPS
from ..errors import (
    BackendUnavailableError,
    PolicyError,
    RoutingInputError,
    UnsupportedModeError,
    UnsupportedModelError,
)
from ..experts import ExpertsCounter, experts_forward, graph_safe_backend, resolve_backend
from ..experts._forward import split_zero_experts
from ..experts._gpu import _interpret
from ..policies import RoutingPolicy, StaticTopK
from ..routing import finish, select
from .families import FamilySpec
from .fused_routing import device_reason, layer_reason, policy_rule, softmax_route
from .graphs import GraphCache, GraphPool, module_state
from .layers import MoELayer, find_moe_layers, model_family, unwrap
from .parallel import ExchangeCounter, ExpertShard, check_dispatch, expert_shard, local_weights, shard_forward
from .scoring import RouterScores, _linear_logits, weights_dtype

__all__ = ["PatchHandle", "PatchOptions", "get_patch", "patch", "patched", "unpatch"]

_HANDLE_ATTR = "_dmr_patch_handle"
_COMPILE_BACKEND = "inductor"  # of compile_routing (tests use "eager")
_RECOMPILE_LIMIT = 1024  # compiled routing entries per code object: one per layer and policy


@dataclass(frozen=True)
class PatchOptions:
    """Options of a patch (see :func:`~dynamic_moe_router.patch`)."""

    renormalize: bool | None = None
    backend: str = "auto"
    validate: bool = True
    compile_routing: bool = False
    cuda_graphs: bool = False
    dispatch: str = "auto"
    fused_routing: bool = False

    def __post_init__(self) -> None:
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise PolicyError(
                f"renormalize must be None, True or False, got {self.renormalize!r}", field="renormalize"
            )
        if self.backend not in BACKENDS:
            raise PolicyError(f"backend must be one of {BACKENDS}, got {self.backend!r}", field="backend")
        if not isinstance(self.validate, bool):
            raise PolicyError(f"validate must be True or False, got {self.validate!r}", field="validate")
        if not isinstance(self.compile_routing, bool):
            raise PolicyError(
                f"compile_routing must be True or False, got {self.compile_routing!r}",
                field="compile_routing",
            )
        if not isinstance(self.cuda_graphs, bool):
            raise PolicyError(
                f"cuda_graphs must be True or False, got {self.cuda_graphs!r}", field="cuda_graphs"
            )
        check_dispatch(self.dispatch)
        if not isinstance(self.fused_routing, bool):
            raise PolicyError(
                f"fused_routing must be True or False, got {self.fused_routing!r}", field="fused_routing"
            )
        if self.fused_routing and self.compile_routing:
            raise PolicyError(
                "fused_routing=True and compile_routing=True both replace the routing's launches; "
                "choose one (fused_routing runs one Triton kernel per layer)",
                field="fused_routing",
            )
        if self.cuda_graphs and self.compile_routing:
            raise PolicyError(
                "cuda_graphs=True and compile_routing=True both take over the routing's launches; "
                "choose one (cuda_graphs replays the routing and the experts as CUDA graphs)",
                field="cuda_graphs",
            )


class DynamicRouter:
    """Replacement router forward: the family's scoring, then the policy, then the family's weights."""

    def __init__(
        self,
        layer: MoELayer,
        family: FamilySpec,
        policy: RoutingPolicy,
        options: PatchOptions,
        pool: GraphPool | None = None,
    ) -> None:
        import transformers

        self.layer = layer
        self.family = family
        self.options = options
        self.output_order = family.router_output_order(transformers.__version__)
        self._compiled: Any = None
        self.graphs = GraphCache(f"MoE layer {layer.index} router", pool or GraphPool())
        self.compensation: torch.Tensor | None = None  # (T, H), handed to the experts forward
        #: the last call's ids ``(T, k_max)``, handed to the experts forward of a block that remaps
        #: them before its experts see them (zero experts owned by the block: ``layer.zero_in_block``)
        self.routed_ids: torch.Tensor | None = None
        #: pairs the family's own top-k would have sent to zero-computation experts (layers with
        #: zero experts only): the native routing's zero-expert pairs, for honest FLOP accounting
        self.native_counter = ExpertsCounter()
        #: called with ``(layer index, RouterScores)`` on every routing call outside torch.compile when
        #: set (calibration records the routing statistics it searches on, patched without CUDA graphs;
        #: with ``cuda_graphs=True`` it would also see the capture's warm-up calls, not the replays)
        self.observe: Callable[[int, RouterScores], None] | None = None
        self.set_policy(policy)

    def set_policy(self, policy: RoutingPolicy) -> None:
        layer_policy = policy.for_layer(self.layer.index)
        k_range = layer_policy.k_range(
            self.layer.native_k, self.layer.num_experts
        )  # raises PolicyError early
        self.policy = policy
        #: why the fused routing kernel does not cover this layer under the policy (None: it does)
        self.fused_reason: str | None = (
            layer_reason(self.family.scorer, self.layer, policy) if self.options.fused_routing else "off"
        )
        #: Triton's interpreter runs the kernel on CPU tensors (read once: no environment lookups in a trace)
        self._interpret = _interpret()
        # the layer's policy, its (k_min, k_max) and its count rule in the kernel, resolved once
        rule = policy_rule(layer_policy) if self.fused_reason is None else None
        self._fused = (layer_policy, *k_range, rule)
        self._compiled = None  # recompiled for the new policy on the next call
        self.graphs.clear()  # captured with the old policy
        self.compensation = None
        self.routed_ids = None

    @property
    def renormalize(self) -> bool:
        if self.options.renormalize is not None:
            return self.options.renormalize
        return self.family.scorer.native_renormalize(self.layer.router, self.family.renorm)

    def __call__(self, hidden_states: torch.Tensor, *router_inputs: torch.Tensor):
        layer, router = self.layer, self.layer.router
        if self.family.training_unsupported and router.training:
            raise UnsupportedModeError(
                f"{self.family.model_type} routing in training mode is stochastic and is not reproduced by "
                "dynamic-moe-router-kit; call model.eval() before running a patched model"
            )
        h = hidden_states.reshape(-1, layer.hidden_size)  # (T, H)
        compiling = torch.compiler.is_compiling()  # inside the user's torch.compile of the model
        if self.options.compile_routing and not compiling:
            if self._compiled is None:  # one compiled graph per layer, shapes symbolic in T
                self._compiled = torch.compile(
                    self._route, dynamic=True, fullgraph=True, backend=_COMPILE_BACKEND
                )
            # every layer guards its own router, so one code object gets one entry per layer: lift
            # dynamo's per-code-object limit (8) for this call, or layers past the 8th run uncompiled
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                logits, ids, weights, comp, native_zero = self._compiled(h, *router_inputs)
        else:
            replayed = self._replayed(h, *router_inputs) if self.options.cuda_graphs else None
            routed = replayed if replayed is not None else self._route(h, *router_inputs)
            logits, ids, weights, comp, native_zero = routed
        self.compensation = comp  # added to the experts' output by this layer's DynamicExperts
        if layer.zero_in_block:  # the block turns zero-expert slots into real experts at weight 0
            self.routed_ids = ids
        if native_zero is not None:
            self.native_counter.add_zero_experts(native_zero)
        if self.options.validate and h.shape[0] and not compiling:  # a host sync: eager only
            core.check_finite(TORCH_OPS, "logits", logits, layer.index, allow_neg_inf=False)
        outputs = {"logits": logits, "weights": weights, "ids": ids}
        return tuple(outputs[name] for name in self.output_order)

    def _replayed(self, h: torch.Tensor, *router_inputs: torch.Tensor) -> tuple[Any, ...] | None:
        """:meth:`_route` from a CUDA graph (``None``: this call runs eagerly)."""
        if not h.is_cuda:
            return None
        # the policy's own tensors (a learned allocator's weights, cached per device) live as long
        # as the policy, and set_policy drops the graphs
        if any(not isinstance(a, torch.Tensor) for a in router_inputs):  # e.g. lfm2_moe's bias = None
            fixed = router_inputs  # constants of the block, not graph inputs
            return self.graphs(lambda x: self._route(x, *fixed), h, state=module_state(self.layer.router))
        return self.graphs(self._route, h, *router_inputs, state=module_state(self.layer.router))

    def _route(
        self, h: torch.Tensor, *router_inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Scores, policy, weights, sentinel (and a learned allocator's compensation ``(T, H)``) for
        ``h (T, H)`` and the block's extra router inputs: no host synchronisation. Last, on a layer
        with zero-computation experts, how many pairs the family's own top-k sends to them."""
        layer, router = self.layer, self.layer.router
        if self.fused_reason is None and self._fused_runs(h):  # one Triton launch after the linear
            return (*self._route_fused(h), None)
        sc = self.family.scorer.scores(router, h, self.family.logits_dtype, *router_inputs)
        if self.observe is not None and not torch.compiler.is_compiling():
            self.observe(layer.index, sc)
        native_zero = None
        if layer.zero_experts:  # one top-k over the ranking scores: the native choice
            native = torch.topk(sc.select, k=layer.native_k, dim=-1).indices
            native_zero = (native >= layer.real_experts).sum()
        layer_policy = self.policy.for_layer(layer.index)
        if layer_policy.reads_router_input:
            return (*self._route_by_mask(layer_policy, h, sc), native_zero)
        sel = select(
            sc.select, self.policy, native_k=layer.native_k, probs=sc.probs, layer=layer.index, validate=False
        )
        weights = self.family.scorer.weights(
            router, sc, sel, self.renormalize, h.dtype, self.family.weights_dtype
        )
        routing = finish(sel, weights)
        return sc.logits, routing.ids, routing.weights, None, native_zero

    def _fused_runs(self, h: torch.Tensor) -> bool:
        """Whether this call of a covered layer takes the fused kernel: not while calibration observes
        the scores, not on a device it cannot run on (a model moved off the GPU after patching), and
        not when gradients are wanted (the kernel has no backward; the ordinary routing has)."""
        if self.observe is not None or not (h.is_cuda or self._interpret):
            return False
        if not torch.is_grad_enabled():  # generate(), inference_mode, no_grad: no attribute lookups
            return True
        weight = self.family.router_attribute(self.layer.router, self.family.router_weight)
        return not (h.requires_grad or weight.requires_grad)

    def _route_fused(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        """:meth:`_route` of a plain softmax router with the fused kernel (:mod:`.fused_routing`)."""
        logits = _linear_logits(self.layer.router, h, self.family.logits_dtype)  # (T, E)
        layer_policy, k_min, k_max, rule = self._fused
        dtype = weights_dtype(self.family.weights_dtype, logits.dtype, h.dtype)
        ids, weights = softmax_route(logits, layer_policy, k_min, k_max, self.renormalize, dtype, rule=rule)
        return logits, ids, weights, None

    def _route_by_mask(
        self, policy: Any, h: torch.Tensor, sc: RouterScores
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Routing of a policy that returns a keep mask per ranked slot (a learned allocator).

        A bool mask keeps any subset of the ranked slots: the kept ones are packed to the front (in
        rank order), so the routing contract holds. A float mask (training: hard values with a
        straight-through gradient) keeps every slot in the experts forward and scales each slot's
        weight by its mask value, with the family's own weight rule, so gradients reach the mask.

        With compensation (the policy holds per-expert mean outputs), kept slots keep their native
        weights (no renormalisation over the kept ones) and each dropped native slot adds its native
        weight times its expert's mean output: the fourth return value ``(T, H)``.
        """
        layer, router, scorer = self.layer, self.layer.router, self.family.scorer
        num_experts = sc.select.shape[-1]
        _, k_max = policy.k_range(layer.native_k, num_experts)
        top, ranked = torch.topk(sc.select, k_max, dim=-1)  # (T, k_max), rank order
        finite = torch.isfinite(top)  # (T, k_max): False = excluded by the family
        ranked_probs = sc.probs.gather(1, ranked).float()  # (T, k_max)
        mask = _at_least_top(policy.keep_mask(h, ranked_probs, sc.probs.float(), layer.index), finite)
        wdtype = self.family.weights_dtype
        means = policy.layer_means(layer.index, h.device) if policy.compensated else None  # (E, H)
        if means is not None:
            return self._compensated(sc, ranked, finite, mask, means, h)
        if mask.dtype == torch.bool:
            # weights on the family's ranking (sparsemixer's depend on the experts ranked before),
            # then the kept slots packed first
            sel = Selected(ranked_ids=ranked, keep=mask, counts=mask.sum(-1), num_experts=num_experts)
            weights = scorer.weights(router, sc, sel, self.renormalize, h.dtype, wdtype)
            order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)  # kept slots first
            ranked, keep, weights = ranked.gather(1, order), mask.gather(1, order), weights.gather(1, order)
            sel = Selected(ranked_ids=ranked, keep=keep, counts=sel.counts, num_experts=num_experts)
        else:
            sel = Selected(ranked_ids=ranked, keep=finite, counts=finite.sum(-1), num_experts=num_experts)
            raw = scorer.weights(router, sc, sel, False, h.dtype, wdtype)  # (T, k_max)
            soft = raw.float() * mask
            if self.renormalize:  # the family's rule over the (soft) kept slots; keeps its scale
                full = scorer.weights(router, sc, sel, True, h.dtype, wdtype).float().sum(-1, keepdim=True)
                soft = soft / soft.sum(-1, keepdim=True).clamp_min(1e-9) * full
            weights = soft.to(raw.dtype)
        routing = finish(sel, weights)
        return sc.logits, routing.ids, routing.weights, None

    def _compensated(
        self,
        sc: RouterScores,
        ranked: torch.Tensor,  # (T, k_max) int, k_max == native k
        finite: torch.Tensor,  # (T, k_max) bool
        mask: torch.Tensor,  # (T, k_max) bool, or float in training
        means: torch.Tensor,  # (E, H) fp32 mean output of each expert
        h: torch.Tensor,  # (T, H)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        num_experts = sc.select.shape[-1]
        sel = Selected(ranked_ids=ranked, keep=finite, counts=finite.sum(-1), num_experts=num_experts)
        native = self.family.scorer.weights(
            self.layer.router, sc, sel, self.renormalize, h.dtype, self.family.weights_dtype
        )  # (T, k_max): the native weights of the native slots
        keep = mask
        dropped = native.float() * (~keep if keep.dtype == torch.bool else 1.0 - keep) * finite  # (T, k_max)
        # 2 * k_max * H FLOPs per token (LearnedAllocator.overhead_flops counts them)
        comp = torch.einsum("tk,tkh->th", dropped, means[ranked])  # (T, H)
        if keep.dtype == torch.bool:
            weights = torch.where(keep, native, torch.zeros_like(native))
            order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept slots first
            ranked, keep, weights = ranked.gather(1, order), keep.gather(1, order), weights.gather(1, order)
            sel = Selected(ranked_ids=ranked, keep=keep, counts=keep.sum(-1), num_experts=num_experts)
        else:  # training: every slot computed, weights scaled by the (straight-through) mask
            weights = (native.float() * keep).to(native.dtype)
        routing = finish(sel, weights)
        return sc.logits, routing.ids, routing.weights, comp


def _at_least_top(mask: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``mask (T, k_max)`` limited to the slots the family allows (``finite``), with the top slot kept
    where nothing else is (bool; a float training mask gets the top slot's 1.0 there)."""
    first = torch.zeros_like(finite)
    first[:, 0] = True
    if mask.dtype == torch.bool:
        keep = mask & finite
        return keep | (first & ~keep.any(-1, keepdim=True))
    keep = mask * finite
    return torch.where((keep.detach() > 0).any(-1, keepdim=True), keep, first.to(keep.dtype))


class DynamicExperts:
    """Replacement experts forward: computes the kept pairs only and counts them."""

    def __init__(
        self,
        layer: MoELayer,
        family: FamilySpec,
        options: PatchOptions,
        router: DynamicRouter,
        pool: GraphPool | None = None,
    ) -> None:
        self.layer = layer
        self.layout = family.layout
        self.backend = options.backend
        self.cuda_graphs = options.cuda_graphs
        self.counter = ExpertsCounter()
        self.router = router
        self.graphs = GraphCache(f"MoE layer {layer.index} experts", pool or GraphPool())
        #: this rank's experts when transformers split them over processes (expert parallelism)
        self.shard: ExpertShard | None = expert_shard(layer)
        self.dispatch = "all_reduce" if options.dispatch == "auto" else options.dispatch
        self.exchange = ExchangeCounter()  # what the expert-parallel dispatch sent to other ranks

    def _forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The experts on ``hidden (T, H)``, the kept-pair and zero-expert-pair counts as device
        tensors (what a graph captures; the layer's counter is updated from them after each replay)."""
        counter, layout = ExpertsCounter(), self.layout
        out = experts_forward(
            self.layer.experts, hidden, ids, weights, layout=layout, backend=self.backend, counter=counter,
            zero_experts=self.layer.zero_experts,
        )  # fmt: skip
        return out, counter._device, counter._zero_device

    def _replayed(
        self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor | None:
        """The experts from a CUDA graph, or ``None`` where this call runs eagerly (a host-syncing
        backend, or a call :func:`~dynamic_moe_router.hf.graphs.graph_ineligible` refuses)."""
        if not self.cuda_graphs or not hidden.is_cuda or torch.compiler.is_compiling() or self.shard:
            return None  # expert-parallel layers run their collectives eagerly
        experts = self.layer.experts
        chosen = resolve_backend(self.backend, experts, hidden, ids, self.layout)
        if not graph_safe_backend(chosen, experts, hidden, self.layout):
            return None
        replayed = self.graphs(self._forward, hidden, ids, weights, state=module_state(experts))
        if replayed is None:
            return None
        out, pairs, zero_pairs = replayed
        self.counter.calls += 1
        if pairs is not None:
            self.counter.add(pairs)
        if zero_pairs is not None:
            self.counter.add_zero_experts(zero_pairs)
        return out

    def _local(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's experts on ``hidden (N, H)`` with local ids (expert parallelism)."""
        with local_weights(self.layer.experts):
            return experts_forward(
                self.layer.experts, hidden, ids, weights, layout=self.layout, backend=self.backend,
                counter=self.counter,
            )  # fmt: skip

    def _routed_ids(self, given: torch.Tensor) -> torch.Tensor:
        """The router's own ids for a block that remaps them before its experts (zero experts owned
        by the block, ``layer.zero_in_block``): the block sends each zero-expert slot to a real expert
        at weight 0, whose GEMM would run and be counted; with the router's ids that slot is a
        zero-expert pair again (not executed, counted apart), and the block adds its identity."""
        ids, self.router.routed_ids = self.router.routed_ids, None
        if ids is None or ids.shape != given.shape:
            found = "no routing" if ids is None else f"ids of shape {tuple(ids.shape)}"
            raise RoutingInputError(
                f"MoE layer {self.layer.index}: the experts were called with ids of shape "
                f"{tuple(given.shape)}, and the router's last call left {found}; the block must call "
                "its router, then its experts, on the same tokens"
            )
        return ids

    def _real_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (T, k)`` with the zero-expert slots (counted here, on every rank: each holds the
        whole batch) made dropped ones, for split experts of a block that adds their identity."""
        return split_zero_experts(ids, self.layer.real_experts, self.layer.zero_experts, self.counter)[0]

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.layer.zero_in_block:
            top_k_index = self._routed_ids(top_k_index)
        if self.shard is not None:
            ids = self._real_ids(top_k_index) if self.layer.zero_experts else top_k_index
            # torch.compiler.disable hides shard_forward's signature from type checkers
            out = shard_forward(
                self.shard, self.dispatch, self._local, hidden_states, ids, top_k_weights,  # pyright: ignore[reportCallIssue]
                self.exchange,
            )  # fmt: skip
        else:
            out = self._replayed(hidden_states, top_k_index, top_k_weights)
        if out is None:
            out = experts_forward(
                self.layer.experts,
                hidden_states,
                top_k_index,
                top_k_weights,
                layout=self.layout,
                backend=self.backend,
                counter=self.counter,
                zero_experts=self.layer.zero_experts,
            )
        comp, self.router.compensation = self.router.compensation, None
        if comp is not None:  # (T, H): the dropped native slots' weighted mean outputs
            if comp.shape != out.shape:
                raise RoutingInputError(
                    f"MoE layer {self.layer.index}: the compensation of the router's last call has shape "
                    f"{tuple(comp.shape)}, the experts output {tuple(out.shape)}; the block must call its "
                    "router, then its experts, on the same tokens"
                )
            out = out + comp.to(out.device, out.dtype)
        return out


def _forward_slot(module: torch.nn.Module) -> str:
    """``_old_forward`` under an accelerate hook (the hook calls it), else ``forward``."""
    return "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"


def _install(module: torch.nn.Module, fn: Any) -> tuple[Any, str, Any]:
    """Replace ``module``'s forward slot by ``fn``; return the record that undoes it."""
    return core.set_attribute(module, _forward_slot(module), fn)


class PatchHandle(core.PatchHandleBase):
    """What :func:`patch` returns: the patch's state, statistics and undo (the lifecycle of
    :class:`dynamic_moe_router.core.PatchHandleBase`).

    Attributes:
        family: the model's ``model_type``.
        family_record: the :class:`~dynamic_moe_router.hf.families.FamilySpec` of that family.
        layers: the patched :class:`~dynamic_moe_router.hf.layers.MoELayer` records.
        skipped: paths of MoE-like blocks left unpatched (only with ``strict=False``).
    """

    handle_attr = _HANDLE_ATTR
    router_input = True

    def __init__(
        self,
        model: torch.nn.Module,
        family: FamilySpec,
        layers: list[MoELayer],
        policy: RoutingPolicy,
        options: PatchOptions,
        skipped: list[str],
    ) -> None:
        super().__init__(model, layers, policy, family=family.model_type)
        self.family_record = family
        self.options = options
        self.skipped = skipped
        pool = GraphPool()  # every graph of this patch shares one memory pool
        self.routers = [DynamicRouter(layer, family, policy, options, pool) for layer in layers]
        self.experts = [
            DynamicExperts(layer, family, options, router, pool)
            for layer, router in zip(layers, self.routers, strict=True)
        ]

    @property
    def spec(self) -> FamilySpec:
        """Deprecated name of :attr:`family_record`."""
        warn_renamed("PatchHandle.spec", "PatchHandle.family_record")
        return self.family_record

    def _install(self) -> None:
        for layer, router, experts in zip(self.layers, self.routers, self.experts, strict=True):
            self._saved.append(_install(layer.router, router))
            self._saved.append(_install(layer.experts, experts))

    def _policy_changed(self, policy: Any) -> None:
        # fused routing: the device check of patch(), for layers the new policy newly covers, before
        # any router changes; its reasons name the uncovered layers after the switch
        reasons = (
            _check_fused_devices(self.layers, self.family_record, policy)
            if self.options.fused_routing
            else None
        )
        for router in self.routers:
            router.set_policy(policy)
        if reasons is not None:  # set_policy -> _policy_changed -> here
            _warn_uncovered(reasons, 4)

    def counters(self) -> list[ExpertsCounter]:
        return [e.counter for e in self.experts]

    def zero_expert_pairs(self) -> int:
        """Pairs routed to zero-computation (identity) experts since the last reset, over all layers
        (longcat_flash; 0 for families without them): kept, but never executed pairs."""
        return sum(c.zero_expert_pairs for c in self.counters())

    def graph_caches(self) -> list[GraphCache]:
        """The CUDA graph caches of every layer's router and experts (used with ``cuda_graphs=True``)."""
        return [c for r, e in zip(self.routers, self.experts, strict=True) for c in (r.graphs, e.graphs)]


def _check_backend(options: PatchOptions, layers: list[MoELayer], family: FamilySpec) -> None:
    if options.backend == "auto":
        return
    for layer in layers:
        with local_weights(layer.experts):  # an expert-parallel rank's own experts, as at run time
            w = layer.experts.gate_up_proj
            probe = torch.empty(0, layer.hidden_size, dtype=w.dtype, device=w.device)
            ids = torch.empty(0, layer.native_k, dtype=torch.long, device=w.device)
            resolve_backend(options.backend, layer.experts, probe, ids, family.layout)


def _check_fused(
    options: PatchOptions, layers: list[MoELayer], family: FamilySpec, policy: RoutingPolicy
) -> None:
    """``fused_routing=True``: the model's routers must be where the kernel runs; layers it does not
    cover are named in a warning (they run the ordinary routing)."""
    if not options.fused_routing:
        return
    _warn_uncovered(_check_fused_devices(layers, family, policy), 4)


def _check_fused_devices(
    layers: list[MoELayer], family: FamilySpec, policy: RoutingPolicy
) -> dict[int, str | None]:
    """Per MoE layer, why the fused kernel does not cover it under ``policy`` (``None``: it does);
    raises :class:`BackendUnavailableError` when a covered layer's router is where the kernel cannot
    run."""
    reasons = {layer.index: layer_reason(family.scorer, layer, policy) for layer in layers}
    for layer in layers:
        if reasons[layer.index] is not None:
            continue  # runs the ordinary routing wherever it is
        reason = device_reason(family.router_attribute(layer.router, family.router_weight))
        if reason is not None:
            raise BackendUnavailableError(
                f"fused_routing=True: {reason}. Move the model to a CUDA device first (model.cuda()) or "
                "patch without fused_routing"
            )
    return reasons


def _warn_uncovered(reasons: dict[int, str | None], stacklevel: int) -> None:
    """Warn once, naming the layers ``fused_routing=True`` does not cover (``reasons``: per MoE layer,
    ``None`` where it does) and why."""
    skipped = {i: r for i, r in reasons.items() if r is not None}
    if skipped:
        text = "; ".join(
            f"{r} (MoE layers {[i for i in skipped if skipped[i] == r]})"
            for r in dict.fromkeys(skipped.values())
        )
        warnings.warn(
            f"dynamic-moe-router: fused_routing=True does not cover every layer: {text}",
            stacklevel=stacklevel,
        )


def _check_graphs(options: PatchOptions, layers: list[MoELayer]) -> None:
    if not options.cuda_graphs:
        return
    devices = sorted({str(layer.experts.gate_up_proj.device) for layer in layers})
    if any(not d.startswith("cuda") for d in devices):
        raise PolicyError(
            f"cuda_graphs=True needs the model's experts on a CUDA device; they are on {devices}. Move "
            "the model first (model.cuda()) or patch without cuda_graphs",
            field="cuda_graphs",
        )


def model_folder(model: torch.nn.Module) -> str | None:
    """The local folder ``model`` was loaded from (``from_pretrained``'s path), or ``None``."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
        model, "name_or_path", None
    )
    return name if isinstance(name, str) and name and os.path.isdir(name) else None


def _resolve_auto(policy: RoutingPolicy | str, model: torch.nn.Module) -> RoutingPolicy:
    """``"auto"``: the policy saved in the model's folder (``dmr_policy.json``)."""
    if not isinstance(policy, str):
        return policy
    from ..errors import PolicyNotFoundError
    from ..policies import POLICY_FILE, from_pretrained

    if policy != "auto":
        raise PolicyError(
            f'policy must be a RoutingPolicy or "auto" (the {POLICY_FILE} saved in the model\'s folder), '
            f"got the string {policy!r}; parse a spec with dmr.parse_policy({policy!r})",
            field="policy",
        )
    folder = model_folder(model)
    if folder is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        where = (
            f"its name_or_path {name!r} is not a local directory" if name else "it was not loaded from one"
        )
        raise PolicyNotFoundError(
            f'policy="auto" reads {POLICY_FILE} from the folder the model was loaded from, but {where}; '
            "pass a policy, or dmr.from_pretrained(folder)"
        )
    return from_pretrained(folder)


def get_patch(model: torch.nn.Module) -> PatchHandle | None:
    """The active :class:`PatchHandle` of ``model``, or ``None`` if it is not patched."""
    return unwrap(model).__dict__.get(_HANDLE_ATTR)


def patch(
    model: torch.nn.Module,
    policy: RoutingPolicy | str | None = None,
    *,
    strict: bool = True,
    replace: bool = False,
    renormalize: bool | None = None,
    backend: str = "auto",
    validate: bool = True,
    compile_routing: bool = False,
    cuda_graphs: bool = False,
    dispatch: str = "auto",
    fused_routing: bool = False,
) -> PatchHandle:
    """Give every MoE layer of ``model`` dynamic routing with ``policy`` (in place, per instance).

    Args:
        model: a transformers model of a supported family (see :func:`supported_families`).
        policy: the routing policy; default ``StaticTopK()`` (the model's own routing). ``"auto"``:
            the policy saved in the folder the model was loaded from (``dmr_policy.json``, see
            :meth:`RoutingPolicy.save_pretrained <dynamic_moe_router.RoutingPolicy.save_pretrained>`);
            :class:`~dynamic_moe_router.PolicyNotFoundError` when there is none.
        strict: when True (default) every MoE-like block must be one the family record knows;
            when False unknown blocks are left alone, listed in ``handle.skipped`` and warned about.
        replace: allow patching an already patched model (its patch is undone first). Without it,
            patching twice raises :class:`~dynamic_moe_router.AlreadyPatchedError`.
        renormalize: override the family's weight rule: True renormalises the kept weights, False
            keeps the raw probabilities; None (default) follows the family (see the families table).
        backend: experts backend: ``"auto"``, ``"loop"``, ``"grouped"``, ``"cuda"`` or
            ``"triton"`` (see :mod:`dynamic_moe_router.experts`).
        validate: raise :class:`~dynamic_moe_router.NonFiniteRouterScoresError` when a router
            produces NaN or infinite logits (costs a host sync per layer; pass False to capture
            the model in a CUDA graph). Inside a ``torch.compile`` of the model the check is not
            run (it needs the host): a NaN row then routes to some valid experts, never out of
            bounds. The experts' pair counters (``dmr.profile``) count eager calls only.
        compile_routing: run each layer's scoring, policy and weights through ``torch.compile``
            (``fullgraph=True``, dynamic in the number of tokens), which fuses the routing into a
            few kernels; the first call of each layer compiles (seconds). On GPU this cuts the
            routing's launch overhead (see BENCHMARKS.md).
        cuda_graphs: in eager mode on a CUDA GPU, capture each layer's routing and experts as CUDA
            graphs (one per number of tokens, up to 256 tokens and 8 sizes per layer) and replay
            them: a decode step then launches two graphs per MoE layer instead of dozens of
            kernels. Calls the graphs cannot serve (more tokens, the host-synchronising ``loop`` /
            ``grouped`` backends, gradients, a ``torch.compile`` trace) run eagerly. A size is
            captured the second time it is seen (milliseconds per layer). The model must be on a
            CUDA device. See :mod:`dynamic_moe_router.hf.graphs`.
        dispatch: on a model whose experts transformers split over processes (expert parallelism,
            ``DistributedConfig(tp_size=N, ep_size=N)`` under ``torchrun``), how the kept pairs reach
            their experts: ``"all_reduce"`` (each rank runs its experts' kept pairs of the shared
            batch, one all-reduce sums them) or ``"all_to_all"`` (each rank sends only the kept
            pairs of its slice to the experts' ranks: the bytes exchanged fall with the dropped
            pairs, at one host sync per layer). ``"auto"`` (default) is ``"all_reduce"``. Ignored on a
            model in one process. See :mod:`dynamic_moe_router.hf.parallel`.
        fused_routing: route each covered layer (a plain softmax router, a policy of
            :data:`~dynamic_moe_router.hf.fused_routing.FUSED_POLICIES`) with one Triton kernel:
            softmax, ranking, the policy's count and the weights in one launch (a CUDA device, or
            ``TRITON_INTERPRET=1``). Other layers run the ordinary routing, named in a warning and
            by ``dmr inspect --policy``. Its weights may differ from the eager ones in the last bits
            of fp32 (and exact ties or threshold cases may route differently); leave it off for a
            bit-exact reproduction. Calls that need gradients run the ordinary routing. See
            :mod:`dynamic_moe_router.hf.fused_routing`.

    Returns:
        A :class:`PatchHandle`; ``handle.unpatch()`` or :func:`unpatch` undoes the patch.

    Raises:
        UnsupportedModelError: the model is not of a supported family or has unknown MoE blocks.
        ExpertParallelError: its experts are split over processes in a layout the patch does not
            support (tensor-parallel or FSDP-sharded experts, ranks holding different batches).
        NoMoELayersError: the model has no MoE layer.
        PolicyError: the policy or an option does not fit the model's layers.
        AlreadyPatchedError: the model is already patched and ``replace`` is False.
        BackendUnavailableError: the requested ``backend`` cannot run on the model's device or dtype.

    Nothing is changed when any of them is raised.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> model = tiny_model("mixtral")
        >>> ids = torch.tensor([[5, 6, 7, 8]])
        >>> before = model(ids).logits
        >>> handle = dmr.patch(model, dmr.StaticTopK())
        >>> torch.allclose(model(ids).logits, before, atol=1e-5)
        True
        >>> dmr.unpatch(model)
    """
    target = unwrap(model)
    family = model_family(target)
    options = PatchOptions(
        renormalize=renormalize,
        backend=backend,
        validate=validate,
        compile_routing=compile_routing,
        cuda_graphs=cuda_graphs,
        dispatch=dispatch,
        fused_routing=fused_routing,
    )
    policy = StaticTopK() if policy is None else _resolve_auto(policy, target)
    existing = get_patch(target)
    core.refuse_if_patched(existing, replace, unpatch_call="dmr.unpatch(model)")
    layers, unknown = find_moe_layers(target, family)
    if unknown:
        if strict:
            raise UnsupportedModelError(
                f"{family.model_type}: MoE-like blocks {unknown} are not of the family's block classes "
                f"{family.block_classes}; nothing was patched. Pass strict=False to patch the known layers "
                "only."
            )
        warnings.warn(
            f"dynamic-moe-router: leaving unknown MoE-like blocks unpatched: {unknown}", stacklevel=2
        )
    # also LearnedAllocator.check_model (zero-computation experts included), as set_policy does
    core.validate_policy(policy, layers, family=family.model_type, router_input=True)
    _check_backend(options, layers, family)
    _check_graphs(options, layers)
    _check_fused(options, layers, family, policy)
    return core.apply_replacing(PatchHandle(target, family, layers, policy, options, unknown), existing)


def unpatch(model: torch.nn.Module) -> None:
    """Undo :func:`patch`: outputs and ``state_dict`` are exactly those of the unpatched model."""
    core.require_handle(get_patch(model), unwrap(model)).unpatch()


@contextmanager
def patched(
    model: torch.nn.Module, policy: RoutingPolicy | None = None, **kwargs: Any
) -> Iterator[PatchHandle]:
    """Context manager: :func:`patch` on entry, :func:`unpatch` on exit (also on error).

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> model = tiny_model("olmoe")
        >>> with dmr.patched(model, dmr.TopP(p=0.5)) as handle:
        ...     _ = model(torch.tensor([[3, 4, 5]]))
        ...     handle.executed_pairs() < 3 * 4 * 2  # fewer than T * native_k * layers
        True
        >>> dmr.get_patch(model) is None
        True
    """
    with core.undo_on_exit(patch(model, policy, **kwargs)) as handle:
        yield handle
