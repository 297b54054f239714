"""Per-family router scoring, reproduced exactly, plus the distribution each policy reads.

Every scorer turns a router module and its input ``h (T, H)`` into :class:`RouterScores`:

* ``logits``: exactly what the original router returns as its first output (so
  ``output_router_logits`` and auxiliary losses are unchanged);
* ``select (T, E)``: what the family ranks candidates by (``-inf`` = excluded by the family);
* ``probs (T, E)``: the probability distribution policies read (documented per family below).

and computes combine weights for the kept prefix of the ranking with the family's own rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..routing import Selection, combine_weights

__all__ = ["SCORERS", "RouterScores", "Scorer"]


@dataclass(frozen=True)
class RouterScores:
    logits: torch.Tensor  # (T, E) as the original router returns them
    select: torch.Tensor  # (T, E) ranking scores
    probs: torch.Tensor  # (T, E) fp32 distribution for the policy


class Scorer:
    """Base scorer: subclasses define :meth:`scores` and :meth:`weights`."""

    name = ""
    #: how the distribution the policies read is defined, for docs and ``dmr inspect``
    distribution = ""

    def scores(self, router: Any, h: torch.Tensor, logits_dtype: str, *router_inputs: Any) -> RouterScores:
        """``router_inputs``: what the family's block passes to its router after the hidden states
        (``FamilySpec.router_inputs``, e.g. minimax_m2's block-owned selection bias); none for
        most families, whose scorers may leave the parameter out."""
        raise NotImplementedError

    def native_renormalize(self, router: Any, rule: str) -> bool:
        """Whether the family itself renormalises the kept weights of this router (the family
        record's ``renorm`` rule; a scorer whose rule depends on more than ``norm_topk_prob``
        overrides it)."""
        from .. import core

        return core.renormalises(rule, getattr(router, "norm_topk_prob", None))  # the shared weight rule

    def weights(
        self,
        router: Any,
        sc: RouterScores,
        sel: Selection,
        renormalize: bool,
        hidden_dtype: torch.dtype,
        weights_dtype: str,
    ) -> torch.Tensor:  # (T, k_max)
        raise NotImplementedError


def _linear_logits(router: Any, h: torch.Tensor, logits_dtype: str) -> torch.Tensor:
    bias = getattr(router, "bias", None)
    if logits_dtype == "fp32_inputs":  # deepseek_v3: the linear itself runs in fp32
        return F.linear(h.type(torch.float32), router.weight.type(torch.float32))
    logits = F.linear(h, router.weight, bias)
    return logits.float() if logits_dtype == "cast_fp32" else logits


def weights_dtype(rule: str, logits_dtype: torch.dtype, hidden_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the combine weights under a family's ``weights_dtype`` rule (from fp32 weights)."""
    if rule == "logits":
        return logits_dtype
    if rule == "hidden":
        return hidden_dtype
    return torch.float32  # "fp32": left as computed


def _cast(
    w: torch.Tensor, weights_dtype_rule: str, logits: torch.Tensor, hidden_dtype: torch.dtype
) -> torch.Tensor:
    if weights_dtype_rule == "fp32":
        return w  # left as computed
    return w.to(weights_dtype(weights_dtype_rule, logits.dtype, hidden_dtype))


class SoftmaxScorer(Scorer):
    """softmax over all experts, then top-k (mixtral, olmoe, qwen2_moe, qwen3_moe)."""

    name = "softmax"
    distribution = "the router softmax over all E experts"

    def scores(self, router, h, logits_dtype):
        logits = _linear_logits(router, h, logits_dtype)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
        return RouterScores(logits=logits, select=probs, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        ranked = sc.probs.gather(1, sel.ranked_ids)  # (T, k_max)
        w = combine_weights(ranked, sel.keep, "sum" if renormalize else "none")
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class SigmoidGroupScorer(Scorer):
    """DeepSeek-V3: sigmoid scores, a selection-only bias, group-limited top-k, scaling."""

    name = "sigmoid_group"
    distribution = (
        "the sigmoid scores (without the selection bias) of the experts in the token's selected groups, "
        "divided by their sum; experts of unselected groups get 0"
    )

    def scores(self, router, h, logits_dtype):
        logits = _linear_logits(router, h, logits_dtype)  # (T, E) fp32
        s = logits.sigmoid()
        choice = s + router.e_score_correction_bias  # (T, E)
        num_experts, n_group = router.num_experts, router.num_group
        group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (T, G)
        allowed = (
            group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
        )
        select = choice.masked_fill(~allowed.bool(), float("-inf"))
        masked = s * allowed
        probs = masked / masked.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)
        return RouterScores(logits=logits, select=select, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        s = sc.logits.sigmoid()
        ranked = s.gather(1, sel.ranked_ids)
        w = combine_weights(ranked, sel.keep, "sum" if renormalize else "none", router.routed_scaling_factor)
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class TopKSoftmaxScorer(Scorer):
    """top-k over the logits, then a softmax over the kept logits (gpt_oss, granitemoe)."""

    name = "topk_softmax"
    distribution = "the softmax of the router logits over all E experts (the family itself never forms it)"

    def scores(self, router, h, logits_dtype):
        logits = _linear_logits(router, h, logits_dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        return RouterScores(logits=logits, select=logits, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        if renormalize:  # the family's own rule: softmax over the kept logits
            w = combine_weights(sc.logits.gather(1, sel.ranked_ids), sel.keep, "softmax")
        else:  # raw probabilities of the full softmax
            w = combine_weights(sc.probs.gather(1, sel.ranked_ids), sel.keep, "none")
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class SparseMixerScorer(TopKSoftmaxScorer):
    """PhiMoE's sparsemixer (inference form), generalised from its 2 slots to any k.

    Slot ``i`` (the ``i``-th best logit ``m_i``) gets the softmax, evaluated at its expert, over the
    experts not ranked before it whose logit ``l_j`` satisfies ``(m_i - l_j) / max(|l_j|, m_i) <=
    2 * router_jitter_noise``. For slots 0 and 1 this is exactly the family's formula; a slot's
    weight does not depend on which later slots are kept, so the family does not renormalise.
    """

    name = "sparsemixer"
    distribution = "the softmax of the router logits over all E experts"

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        logits, ranked = sc.logits, sel.ranked_ids  # (T, E), (T, K)
        num_experts = logits.shape[-1]
        top = logits.gather(1, ranked)  # (T, K) = m_i
        factor = logits.abs().unsqueeze(1).clamp(min=top.unsqueeze(2))  # (T, K, E)
        too_far = ((top.unsqueeze(2) - logits.unsqueeze(1)) / factor) > (2 * router.router_jitter_noise)
        one_hot = F.one_hot(ranked, num_experts).to(torch.int32)  # (T, K, E)
        earlier = (torch.cumsum(one_hot, dim=1) - one_hot).bool()  # experts ranked before slot i
        masked = logits.unsqueeze(1).masked_fill(too_far | earlier, float("-inf"))  # (T, K, E)
        slot_w = torch.softmax(masked, dim=-1).gather(2, ranked.unsqueeze(2)).squeeze(2)  # (T, K)
        w = combine_weights(slot_w, sel.keep, "sum" if renormalize else "none")
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class SoftmaxGroupScorer(Scorer):
    """DeepSeek-V2: softmax over all experts (fp32), top-k ``greedy`` or ``group_limited_greedy``
    (groups ranked by their best expert's probability, experts of the ``topk_group`` best groups
    only), weights = the full-softmax probabilities times ``routed_scaling_factor`` (never
    renormalised by the family)."""

    name = "softmax_group"
    distribution = (
        "the router softmax over all E experts; with group_limited_greedy, restricted to the token's "
        "selected groups and divided by their sum (experts of unselected groups get 0)"
    )

    def scores(self, router, h, logits_dtype):
        logits = _linear_logits(router, h, logits_dtype)  # (T, E) fp32
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
        if router.topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"deepseek_v2 topk_method {router.topk_method!r} is not reproduced; transformers knows "
                "'greedy' and 'group_limited_greedy'"
            )
        if router.topk_method == "greedy":
            return RouterScores(logits=logits, select=probs, probs=probs)
        num_experts, n_group = router.num_experts, router.num_group
        group_scores = probs.view(-1, n_group, num_experts // n_group).max(dim=-1).values  # (T, G)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (T, G)
        allowed = (
            group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
        ).bool()
        # the family zeroes the other groups' probabilities before its top-k: for k <= the allowed
        # experts that is the same ranking as excluding them (-inf)
        select = probs.masked_fill(~allowed, float("-inf"))
        masked = probs * allowed
        policy_probs = masked / masked.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).tiny)
        return RouterScores(logits=logits, select=select, probs=policy_probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        full = torch.softmax(sc.logits, dim=-1, dtype=torch.float32)
        ranked = full.gather(1, sel.ranked_ids)  # (T, k_max)
        w = combine_weights(ranked, sel.keep, "sum" if renormalize else "none", router.routed_scaling_factor)
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class TopKGateScorer(TopKSoftmaxScorer):
    """top-k over the raw logits, then the router's ``expert_selection_fn`` on the kept logits
    (cohere2_moe): ``"softmax"`` = a softmax over the kept logits in fp32 (always renormalised);
    ``"sigmoid"`` = the sigmoid of each kept logit, divided by their sum if ``norm_topk_prob``.
    """

    name = "topk_gate"
    distribution = (
        "the softmax of the router logits over all E experts (expert_selection_fn='softmax'), or the "
        "sigmoid scores over all E experts divided by their sum ('sigmoid')"
    )

    @staticmethod
    def _sigmoid(router) -> bool:
        fn = getattr(router, "expert_selection_fn", "softmax")
        if fn not in ("softmax", "sigmoid"):
            raise ValueError(f"expert_selection_fn can only be 'softmax' or 'sigmoid', got {fn!r}")
        return fn == "sigmoid"

    def native_renormalize(self, router, rule: str) -> bool:
        """The family's own weight rule: a softmax over the kept logits always renormalises."""
        return bool(getattr(router, "norm_topk_prob", False)) if self._sigmoid(router) else True

    def scores(self, router, h, logits_dtype):
        logits = _linear_logits(router, h, logits_dtype)  # (T, E), model dtype
        if not self._sigmoid(router):
            probs = torch.softmax(logits, -1, dtype=torch.float32)
            return RouterScores(logits=logits, select=logits, probs=probs)
        s = logits.float().sigmoid()
        return RouterScores(logits=logits, select=logits, probs=s / s.sum(-1, keepdim=True))

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        ranked = sc.logits.gather(1, sel.ranked_ids)  # (T, k_max)
        if self._sigmoid(router):  # sigmoid (and its sum) in the logits' dtype, as the family does
            w = combine_weights(ranked.sigmoid(), sel.keep, "sum" if renormalize else "none")
        elif renormalize:  # softmax over the kept logits, in fp32
            w = combine_weights(ranked.float(), sel.keep, "softmax")
        else:  # raw probabilities of the full softmax
            w = combine_weights(sc.probs.gather(1, sel.ranked_ids), sel.keep, "none")
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class SoftmaxExpertScaleScorer(Scorer):
    """Gemma 4 (text MoE): a scale-free RMSNorm and a learned scale before the projection, softmax
    over all experts, top-k, renormalised to sum 1, then times a learned ``per_expert_scale``.
    The router's first output is the softmax itself (no raw logits), so ``logits`` holds it."""

    name = "softmax_expert_scale"
    distribution = "the router softmax over all E experts (its first output)"

    def scores(self, router, h, logits_dtype):
        x = router.norm(h) * router.scale * router.scalar_root_size  # (T, H)
        probs = torch.softmax(router.proj(x), dim=-1, dtype=torch.float32)  # (T, E)
        return RouterScores(logits=probs, select=probs, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        ranked = sc.probs.gather(1, sel.ranked_ids)  # (T, k_max)
        w = combine_weights(ranked, sel.keep, "sum" if renormalize else "none")
        w = w * router.per_expert_scale[sel.ranked_ids]  # after the renormalisation, as the family
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class SoftmaxBiasScorer(Scorer):
    """ERNIE 4.5 MoE: fp32 softmax over all experts; ranking by softmax + a selection-only bias
    (``router.moe_statics.e_score_correction_bias``); kept softmax values renormalised by
    ``clamp(sum, min=router.norm_min)``."""

    name = "softmax_bias"
    distribution = "the router softmax over all E experts (without the selection bias)"

    def scores(self, router, h, logits_dtype, *router_inputs):
        with torch.autocast(h.device.type, enabled=False):  # the family forces fp32 routing
            return self._scores(router, h)

    def _scores(self, router, h):
        logits = F.linear(h.float(), router.weight.float())  # (T, E) fp32
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        # through the submodule's forward, as the family does (an offload hook there loads the bias)
        select = router.moe_statics(probs)  # probs + bias  (T, E)
        return RouterScores(logits=logits, select=select, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        w = combine_weights(sc.probs.gather(1, sel.ranked_ids), sel.keep, "none")  # (T, k_max)
        if renormalize:
            w = w / torch.clamp(w.sum(dim=-1, keepdim=True), min=router.norm_min)
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class HunyuanSoftmaxScorer(SoftmaxScorer):
    """HunYuan-MoE-V1: the router linear lives in ``router.wg`` and runs in fp32 when ``wg`` is
    fp32 (its default), else in the model dtype; then softmax -> top-k like mixtral."""

    name = "softmax_wg"

    def scores(self, router, h, logits_dtype, *router_inputs):
        if router.wg.weight.dtype == torch.float32:
            h = h.float()
        logits = router.wg(h)  # (T, E); through the submodule (an offload hook there loads wg)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        return RouterScores(logits=logits, select=probs, probs=probs)


class SigmoidBiasScorer(Scorer):
    """MiniMax-M2: sigmoid scores, ranking by score + a selection-only bias that the *block*
    owns and passes to the router (``gate(h, e_score_correction_bias)``), no groups, kept
    scores renormalised to sum 1 (no scaling). Needs the router-extra-inputs generalisation."""

    name = "sigmoid_bias"
    distribution = "the sigmoid scores (without the selection bias), divided by their sum"

    def scores(self, router, h, logits_dtype, e_score_correction_bias):
        logits = F.linear(h.to(router.weight.dtype), router.weight)  # (T, E) model dtype
        s = logits.float().sigmoid()
        select = s + e_score_correction_bias
        probs = s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        return RouterScores(logits=logits, select=select, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        s = sc.logits.float().sigmoid()
        w = combine_weights(s.gather(1, sel.ranked_ids), sel.keep, "sum" if renormalize else "none")
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class SigmoidExpertBiasScorer(Scorer):
    """Sigmoid scores, top-k by ``sigmoid + expert_bias`` (the bias the block hands its router; selection
    only), kept sigmoid scores divided by ``their sum + eps`` when renormalising, times a scale (lfm2_moe)."""

    name = "sigmoid_expert_bias"
    distribution = "the sigmoid scores (without the selection bias) of all E experts, divided by their sum"
    eps = 1e-6  # lfm2_moe: routing_weights / (sum + 1e-6)
    scale_attr = "routed_scaling_factor"

    def logits(self, router: Any, h: torch.Tensor, logits_dtype: str) -> torch.Tensor:
        return _linear_logits(router, h, logits_dtype)

    def uses_bias(self, router: Any, expert_bias: Any) -> bool:
        return expert_bias is not None and bool(getattr(router, "use_expert_bias", True))

    def scores(self, router, h, logits_dtype, expert_bias=None):  # type: ignore[override]
        logits = self.logits(router, h, logits_dtype)  # (T, E)
        s = logits.sigmoid()  # in the logits' dtype, as the family computes it
        select = s + expert_bias if expert_bias is not None and self.uses_bias(router, expert_bias) else s
        sf = s.float()
        probs = sf / sf.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return RouterScores(logits=logits, select=select, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        ranked = sc.logits.sigmoid().gather(1, sel.ranked_ids)  # (T, k_max)
        w = torch.where(sel.keep, ranked, torch.zeros_like(ranked))
        if renormalize:  # the family's own rule, epsilon included
            w = w / (w.sum(dim=-1, keepdim=True) + self.eps)
        w = w * getattr(router, self.scale_attr)
        return _cast(w, weights_dtype, sc.logits, hidden_dtype)


class AfmoeSigmoidScorer(SigmoidExpertBiasScorer):
    """AFMoE: the router's ``gate`` linear cast to fp32, sigmoid, top-k by ``sigmoid + expert_bias``,
    kept scores divided by ``their sum + 1e-20`` (always), times ``route_scale``."""

    name = "afmoe_sigmoid"
    eps = 1e-20
    scale_attr = "route_scale"

    def logits(self, router, h, logits_dtype):
        return router.gate(h).to(torch.float32)  # the module call (accelerate hooks live on gate)

    def uses_bias(self, router, expert_bias):
        return True


class SoftmaxZeroScorer(Scorer):
    """LongCat-Flash: an fp32 linear (``router.classifier.weight``, its bias never applied) over the
    routed and the zero-computation experts, softmax over all of them, top-k by softmax + the
    selection-only ``e_score_correction_bias``, weights = the softmax values x
    ``routed_scaling_factor`` (never renormalised by the family). Policies read the full softmax,
    zero experts included, so they can choose a zero expert (which costs no expert FLOPs)."""

    name = "softmax_zero"
    distribution = (
        "the router softmax over all E + Z experts, zero-computation experts included (without the "
        "selection bias)"
    )

    def scores(self, router, h, logits_dtype, *router_inputs):
        classifier = router.classifier
        # the family reads classifier.weight without calling classifier: where accelerate offloads
        # it, its hook loads it here (transformers itself would read the offloaded placeholder)
        hook = getattr(classifier, "_hf_hook", None)
        if hook is not None:
            hook.pre_forward(classifier)
        try:
            weight = classifier.weight.type(torch.float32)
        finally:
            if hook is not None:
                hook.post_forward(classifier, None)
        logits = F.linear(h.type(torch.float32), weight)  # (T, E+Z)
        probs = logits.softmax(dim=-1)
        select = probs + router.e_score_correction_bias.unsqueeze(0)
        return RouterScores(logits=logits, select=select, probs=probs)

    def weights(self, router, sc, sel, renormalize, hidden_dtype, weights_dtype):
        ranked = sc.probs.gather(1, sel.ranked_ids)  # (T, k_max)
        w = combine_weights(ranked, sel.keep, "sum" if renormalize else "none", router.routed_scaling_factor)
        return _cast(w.to(sc.logits.dtype), weights_dtype, sc.logits, hidden_dtype)


SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in (
        SoftmaxScorer(),
        SigmoidGroupScorer(),
        TopKSoftmaxScorer(),
        SparseMixerScorer(),
        SoftmaxGroupScorer(),
        TopKGateScorer(),
        SoftmaxExpertScaleScorer(),
        SoftmaxBiasScorer(),
        HunyuanSoftmaxScorer(),
        SigmoidBiasScorer(),
        SigmoidExpertBiasScorer(),
        AfmoeSigmoidScorer(),
        SoftmaxZeroScorer(),
    )
}
