"""Per-family semantics: the distribution policies read, and the weight rules for kept experts."""

from __future__ import annotations

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.families import FAMILIES
from dynamic_moe_router.hf.layers import find_moe_layers
from dynamic_moe_router.hf.tiny import tiny_model


def first_layer(model):  # type: ignore[no-untyped-def]
    return find_moe_layers(model)[0][0]


def router_inputs(layer, h):  # type: ignore[no-untyped-def]
    """The arguments the MoE block passes its router for the tokens ``h (T, H)``: the hidden states in
    the block's own shape, then the block's inputs (``FamilySpec.router_inputs``, e.g. lfm2_moe's
    ``expert_bias``), recorded by running the block."""
    seen = {}

    def record(module, args, kwargs):  # type: ignore[no-untyped-def]
        seen.setdefault("call", (args, kwargs))

    hook = layer.router.register_forward_pre_hook(record, with_kwargs=True)
    try:
        layer.block(h.unsqueeze(0))  # (1, T, H)
    finally:
        hook.remove()
    return seen["call"]


def call_router(model, layer, h):  # type: ignore[no-untyped-def]
    """``(logits, weights, ids)`` whatever order this transformers release returns them in."""
    import transformers

    family = FAMILIES[model.config.model_type]
    order = family.router_output_order(transformers.__version__)
    # a router that takes block inputs is called as its block calls it; the others on h (T, H)
    args, kwargs = router_inputs(layer, h) if family.router_inputs else ((h,), {})
    out = dict(zip(order, layer.router(*args, **kwargs), strict=False))
    return out["logits"], out["weights"], out["ids"]


def hidden(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_native_router_output_is_reproduced(family):  # type: ignore[no-untyped-def]
    """The patched router with StaticTopK returns the same logits, experts and weights."""
    model = tiny_model(family)
    layer = first_layer(model)
    h = hidden()
    logits, weights, ids = call_router(model, layer, h)
    with dmr.patched(model, dmr.StaticTopK()):
        p_logits, p_weights, p_ids = call_router(model, layer, h)
    assert torch.equal(p_logits, logits)
    assert p_weights.dtype == weights.dtype
    # same experts with the same weights (deepseek returns them unsorted)
    order, p_order = ids.argsort(-1), p_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), p_ids.gather(1, p_order))
    torch.testing.assert_close(weights.gather(1, order), p_weights.gather(1, p_order), atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "granitemoe"])
def test_renormalising_families_renormalise_over_kept_experts(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    layer = first_layer(model)
    with dmr.patched(model, dmr.TopP(p=0.3)):
        _, weights, ids = call_router(model, layer, hidden())
    kept = ids < layer.num_experts
    assert bool((kept.sum(-1) < layer.native_k).any()), "the policy must drop something for this test"
    torch.testing.assert_close(
        weights.float().sum(-1),
        torch.ones(ids.shape[0]),
        atol=1e-2 if weights.dtype == torch.bfloat16 else 1e-6,
        rtol=0,
    )
    assert bool((weights[~kept] == 0).all())


@torch.no_grad()
@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_non_renormalising_families_keep_raw_probabilities(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    layer = first_layer(model)
    assert not layer.router.norm_topk_prob
    with dmr.patched(model, dmr.TopP(p=0.3)):
        logits, weights, ids = call_router(model, layer, hidden())
    probs = torch.softmax(logits.float(), -1)
    kept = ids < layer.num_experts
    expected = probs.gather(1, ids.clamp(max=layer.num_experts - 1)) * kept
    torch.testing.assert_close(weights.float(), expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_renormalize_override_both_ways():  # type: ignore[no-untyped-def]
    h = hidden()
    model = tiny_model("mixtral")  # renormalises natively
    layer = first_layer(model)
    with dmr.patched(model, dmr.TopP(p=0.3), renormalize=False):
        logits, weights, ids = call_router(model, layer, h)
    probs = torch.softmax(logits.float(), -1)
    kept = ids < layer.num_experts
    torch.testing.assert_close(weights, probs.gather(1, ids.clamp(max=7)) * kept, atol=1e-7, rtol=0)
    model = tiny_model("olmoe")  # raw natively
    layer = first_layer(model)
    with dmr.patched(model, dmr.TopP(p=0.3), renormalize=True):
        _, weights, _ = call_router(model, layer, h)
    torch.testing.assert_close(weights.sum(-1), torch.ones(16), atol=1e-6, rtol=0)


@torch.no_grad()
def test_deepseek_distribution_scaling_and_groups():  # type: ignore[no-untyped-def]
    model = tiny_model("deepseek_v3")
    layer = first_layer(model)
    router = layer.router
    scorer = FAMILIES["deepseek_v3"].scorer
    sc = scorer.scores(router, hidden(), "fp32_inputs")
    # policies read the sigmoid scores of the selected groups, normalised to sum 1
    torch.testing.assert_close(sc.probs.sum(-1), torch.ones(16), atol=1e-6, rtol=0)
    excluded = torch.isinf(sc.select)
    assert bool((sc.probs[excluded] == 0).all())
    group_size = router.num_experts // router.num_group
    groups_kept = (~excluded).view(16, router.num_group, group_size).any(-1).sum(-1)
    assert bool((groups_kept == router.topk_group).all())
    # ranking uses the selection bias, weights do not; kept weights sum to routed_scaling_factor
    with dmr.patched(model, dmr.RelativeThreshold(beta=0.9)):
        logits, weights, ids = call_router(model, layer, hidden())
    kept = ids < layer.num_experts
    torch.testing.assert_close(
        weights.sum(-1), torch.full((16,), router.routed_scaling_factor), atol=1e-5, rtol=0
    )
    raw = logits.sigmoid().gather(1, ids.clamp(max=layer.num_experts - 1)) * kept
    torch.testing.assert_close(
        weights, raw / raw.sum(-1, keepdim=True) * router.routed_scaling_factor, atol=1e-6, rtol=0
    )
    # never an expert of an unselected group, even when the policy asks for every expert
    with dmr.patched(model, dmr.StaticTopK(k=layer.num_experts)):
        _, _, ids = call_router(model, layer, hidden())
    allowed = (~excluded).sum(-1)
    assert torch.equal((ids < layer.num_experts).sum(-1), allowed)


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt_oss", "granitemoe", "phimoe"])
def test_topk_first_families_read_the_full_softmax(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    layer = first_layer(model)
    spec = FAMILIES[family]
    sc = spec.scorer.scores(layer.router, hidden(), spec.logits_dtype)
    torch.testing.assert_close(sc.probs, torch.softmax(sc.logits.float(), -1), atol=0, rtol=0)
    assert torch.equal(sc.select, sc.logits)


@torch.no_grad()
def test_phimoe_generalised_sparsemixer_matches_the_original_for_two_slots():  # type: ignore[no-untyped-def]
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    model = tiny_model("phimoe")
    layer = first_layer(model)
    logits = call_router(model, layer, hidden())[0]
    ref_w, ref_ids = sparsemixer(logits, jitter_eps=layer.router.router_jitter_noise, training=False)
    with dmr.patched(model, dmr.StaticTopK(k=4)):  # more slots than phimoe ever uses
        _, w, ids = call_router(model, layer, hidden())
    assert torch.equal(ids[:, :2], ref_ids)
    assert torch.equal(w[:, :2], ref_w)
    assert bool((w[:, 2:] >= 0).all()) and bool((w[:, 2:] <= 1).all())


def test_phimoe_training_mode_is_refused():  # type: ignore[no-untyped-def]
    model = tiny_model("phimoe")
    dmr.patch(model)
    model.train()
    with pytest.raises(dmr.UnsupportedModeError, match=r"call model\.eval"):
        model(torch.tensor([[3, 4, 5]]))


def test_router_output_order_follows_the_release():  # type: ignore[no-untyped-def]
    granite = FAMILIES["granitemoe"]
    assert granite.router_output_order("5.17.0") == ("ids", "weights", "logits")
    assert granite.router_output_order("5.20.0") == ("ids", "weights", "logits")
    assert granite.router_output_order("5.21.0") == ("logits", "weights", "ids")
    assert FAMILIES["mixtral"].router_output_order("5.17.0") == ("logits", "weights", "ids")
