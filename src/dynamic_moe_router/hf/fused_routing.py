# Triton launches take Python ints for tl.constexpr parameters, which its annotations do not express:
# pyright: reportArgumentType=false
"""Fused routing: a softmax router's scores, policy and weights in one Triton launch per layer.

Opt in with ``dmr.patch(model, policy, fused_routing=True)``. On a CUDA GPU (or under
``TRITON_INTERPRET=1``) each covered layer then turns its router logits into kept ids and combine
weights in one kernel (:mod:`._triton_routing`) instead of the dozen eager launches of softmax,
top-k, the policy's count and the weight rule; in eager decoding those launches cost more than the
experts themselves.

What it covers (:func:`fused_reason` says why a layer is not): routers whose family scores with a
plain softmax over all experts (mixtral, olmoe, qwen2_moe, qwen3_moe, ...), and the policies of
:data:`FUSED_POLICIES` (per layer too, through :class:`~dynamic_moe_router.PerLayer`). Any other
layer or policy runs the ordinary routing, and ``dmr inspect --policy P`` names the reason.

The kernel follows :func:`dynamic_moe_router.route` step by step (fp32 softmax, ranking, the
policy's count rule, the family's weight rule, a count capped at the candidates with a real
probability); its exponential and sums are Triton's, so its weights may differ from the eager ones
in the last bits of fp32, and a token whose probability sits exactly at a policy threshold, or two
experts with exactly equal probabilities (the kernel ranks the lower index first; ``torch.topk``'s
order among ties is its own), may be routed differently (``tests/test_fused_routing.py`` compares
every policy with ``dmr.route``). It has no backward: a call that needs gradients runs the ordinary
routing. For a bit-exact reproduction of the unpatched model leave ``fused_routing`` off (the
default).

Example:
    >>> import dynamic_moe_router as dmr
    >>> from dynamic_moe_router.hf.fused_routing import fused_reason
    >>> from dynamic_moe_router.hf.tiny import tiny_model
    >>> model = tiny_model("mixtral")
    >>> fused_reason(model, dmr.TopP(p=0.5))[0] is None
    True
    >>> fused_reason(model, dmr.BatchAware(dmr.TopP(p=0.5)))[0][:50]
    'policy batch_aware is not covered by the fused rou'
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import PolicyError
from ..policies import EntropyAdaptive, RelativeThreshold, RoutingPolicy, StaticTopK, TopP

__all__ = ["FUSED_POLICIES", "fused_reason", "layer_reason", "policy_rule", "softmax_route"]

#: policy class -> (kernel code, parameter A, parameter B) of its count rule in the kernel
FUSED_POLICIES: dict[type, Callable[[Any], tuple[int, float, float]]] = {
    StaticTopK: lambda p: (0, 0.0, 0.0),
    TopP: lambda p: (1, float(p.p), 0.0),
    RelativeThreshold: lambda p: (2, float(p.beta), 0.0),
    EntropyAdaptive: lambda p: (3, float(p.low), float(p.high - p.low)),
}
#: the largest expert count the kernel keeps in registers
MAX_EXPERTS = 1024
#: the largest k_max the kernel unrolls its ranking loop for
MAX_K = 32


def _type_name(policy: RoutingPolicy) -> str:
    return getattr(type(policy), "type_name", type(policy).__name__)


def layer_reason(scorer: Any, layer: Any, policy: RoutingPolicy) -> str | None:
    """``None`` if the fused kernel can route ``layer`` (an ``MoELayer``) of a family scoring with
    ``scorer`` under ``policy``, else why not (device aside: see :func:`device_reason`)."""
    from .scoring import SoftmaxScorer

    if type(scorer) is not SoftmaxScorer:
        return (
            f"the fused routing kernel covers plain softmax routers; this family scores with "
            f"{scorer.name!r}; it runs the ordinary routing"
        )
    if layer.zero_experts:
        return "a layer with zero-computation experts runs the ordinary routing"
    if layer.num_experts > MAX_EXPERTS:
        return f"more than {MAX_EXPERTS} experts ({layer.num_experts}); it runs the ordinary routing"
    layer_policy = policy.for_layer(layer.index)
    if type(layer_policy) not in FUSED_POLICIES:
        covered = ", ".join(_type_name(cls) for cls in FUSED_POLICIES)  # type: ignore[arg-type]
        return (
            f"policy {_type_name(layer_policy)} is not covered by the fused routing kernel "
            f"(covered: {covered}); it runs the ordinary routing"
        )
    k_max = layer_policy.k_range(layer.native_k, layer.num_experts)[1]
    if k_max == 0:
        return "the policy keeps no expert (k_max = 0); it runs the ordinary routing"
    if k_max > MAX_K:
        return f"k_max = {k_max} is above the fused kernel's {MAX_K}; it runs the ordinary routing"
    return None


def fused_reason(model: torch.nn.Module, policy: RoutingPolicy) -> list[str | None]:
    """Per MoE layer of ``model``: ``None`` where fused routing covers it under ``policy``, else why
    not."""
    from .layers import find_moe_layers, model_family, unwrap

    target = unwrap(model)
    family = model_family(target)
    return [layer_reason(family.scorer, layer, policy) for layer in find_moe_layers(target, family)[0]]


def device_reason(logits: torch.Tensor) -> str | None:
    """``None`` if the kernel can run on ``logits``' device, else why not."""
    from ..experts._gpu import device_reason as triton_device_reason

    return triton_device_reason(logits, "the fused routing kernel needs")


def policy_rule(policy: RoutingPolicy) -> tuple[int, float, float]:
    """The kernel's ``(code, A, B)`` for a policy of :data:`FUSED_POLICIES`.

    Example:
        >>> import dynamic_moe_router as dmr
        >>> policy_rule(dmr.TopP(p=0.5))
        (1, 0.5, 0.0)
    """
    rule = FUSED_POLICIES.get(type(policy))
    if rule is None:
        covered = ", ".join(_type_name(cls) for cls in FUSED_POLICIES)  # type: ignore[arg-type]
        raise PolicyError(
            f"policy {_type_name(policy)} is not covered by the fused routing kernel (covered: {covered}); "
            "route it the ordinary way (fused_routing=False)",
            field="policy",
        )
    return rule(policy)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def softmax_route(
    logits: torch.Tensor,  # (T, E)
    policy: RoutingPolicy,  # the layer's own policy, one of FUSED_POLICIES
    k_min: int,
    k_max: int,
    renormalize: bool,
    weights_dtype: torch.dtype,
    rule: tuple[int, float, float] | None = None,  # policy_rule(policy), when the caller keeps it
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids (T, k_max)`` int64 (sentinel ``E``) and ``weights (T, k_max)`` of ``weights_dtype``:
    what the softmax scorer, ``policy`` and the weight rule give, in one launch."""
    from ..experts._gpu import on_device
    from . import _triton_routing as kernels  # a plain import: torch.compile traces it

    num_tokens, num_experts = logits.shape
    ids = torch.empty(num_tokens, k_max, dtype=torch.int64, device=logits.device)
    # on CUDA the kernel rounds to the weights' dtype itself (to nearest even, as .to() does); Triton's
    # interpreter truncates instead, so there it writes fp32 and torch rounds
    direct = logits.is_cuda or weights_dtype == torch.float32
    weights = torch.empty(
        num_tokens, k_max, dtype=weights_dtype if direct else torch.float32, device=logits.device
    )
    if num_tokens == 0:
        return ids, weights.to(weights_dtype)
    e_pow2 = _next_pow2(num_experts)
    block_t = max(1, min(64, 4096 // e_pow2))
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    with on_device(logits):
        rule = policy_rule(policy) if rule is None else rule
        _launch(kernels, logits, ids, weights, rule, k_min, k_max, renormalize, block_t, e_pow2)
    return ids, weights if direct else weights.to(weights_dtype)


def _launch(kernels, logits, ids, weights, rule, k_min, k_max, renormalize, block_t, e_pow2) -> None:  # type: ignore[no-untyped-def]
    num_tokens, num_experts = logits.shape
    code, a, b = rule
    kernels.softmax_route[(-(-num_tokens // block_t),)](
        logits, ids, weights, num_tokens, num_experts, logits.stride(0), a, b,
        math.log(num_experts) if num_experts > 1 else 1.0, k_min,
        K_MAX=k_max, K_POW2=_next_pow2(k_max), E_POW2=e_pow2, BLOCK_T=block_t, POLICY=code,
        RENORM=renormalize,
    )  # fmt: skip
