"""Zero-computation (identity) experts (longcat_flash): reproduced exactly, counted apart from the
executed pairs, visible to policies, and accounted for honestly in the profile report."""

from __future__ import annotations

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.experts import ExpertsCounter, experts_forward
from dynamic_moe_router.hf.layers import find_moe_layers
from dynamic_moe_router.hf.tiny import tiny_model

KEYS = (
    "tokens",
    "kept_pairs",
    "executed_pairs",
    "zero_expert_pairs",
    "native_zero_expert_pairs",
    "native_pairs",
)


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return tiny_model("longcat_flash")


def test_layers_know_their_zero_experts(model):  # type: ignore[no-untyped-def]
    layers = find_moe_layers(model)[0]
    assert [(layer.num_experts, layer.zero_experts, layer.real_experts) for layer in layers] == [
        (9, 3, 6)
    ] * 2
    # the policies see all 9 experts (real + zero): the router's softmax over them
    layer = layers[0]
    sc = dmr.hf.families.FAMILIES["longcat_flash"].scorer.scores(
        layer.router, torch.randn(5, 32), "fp32_inputs"
    )
    assert sc.probs.shape == (5, 9)
    torch.testing.assert_close(sc.probs.sum(-1), torch.ones(5))


@torch.no_grad()
def test_experts_forward_adds_identity_for_zero_experts_and_counts_them_apart(model):  # type: ignore[no-untyped-def]
    layer = find_moe_layers(model)[0][0]
    experts = layer.experts  # 6 real experts, 3 zero experts, sentinel 9
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 7, 9], [6, 8, 9], [9, 9, 9]])
    w = torch.tensor([[0.5, 0.25, 0.0], [0.75, 1.5, 0.0], [0.0, 0.0, 0.0]])
    counter = ExpertsCounter()
    out = experts_forward(experts, h, ids, w, counter=counter, zero_experts=3, backend="loop")
    only_real = experts_forward(experts, h, torch.where(ids < 6, ids, 9), w, zero_experts=3)
    assert counter.executed_pairs == 1 and counter.zero_expert_pairs == 3
    torch.testing.assert_close(out[0], only_real[0] + 0.25 * h[0])
    torch.testing.assert_close(out[1], (0.75 + 1.5) * h[1])
    assert torch.equal(out[2], torch.zeros(32))  # all sentinels: nothing
    # transformers' own experts forward on the same pairs (the sentinel slots carry weight 0)
    pairs, pw = ids[:2, :2], w[:2, :2]
    if layer.zero_in_block:  # transformers >= 5.25, as its block does it: each zero slot goes to a real
        # expert at weight 0 ((id - E) * E // Z; never id E, which its grouped kernels do not bound-check),
        # and the block adds the identity
        zero = (pairs >= 6) & (pairs < 9)
        dummy = torch.where(zero, (pairs - 6) * 6 // 3, pairs)
        native = experts(h[:2], dummy, torch.where(zero, 0.0, pw)) + (pw * zero).sum(-1, keepdim=True) * h[:2]
    else:  # the experts module adds it
        native = experts(h[:2], pairs, pw)
    torch.testing.assert_close(out[:2], native, atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_static_topk_equals_native_counts_and_outputs(model, backend):  # type: ignore[no-untyped-def]
    x = tokens()
    with dmr.profile(model) as native:
        ref = model(x).logits
    with dmr.patched(model, dmr.StaticTopK(), backend=backend) as handle, dmr.profile(model) as static:
        out = model(x).logits
    assert (out - ref).abs().max().item() <= 1e-5
    n, s = native.to_dict(), static.to_dict()
    assert {k: s[k] for k in KEYS} == {k: n[k] for k in KEYS}
    assert s["zero_expert_pairs"] > 0  # the tiny model does route to its zero experts
    assert s["executed_pairs"] + s["zero_expert_pairs"] == s["kept_pairs"] == s["native_pairs"]
    assert s["native_zero_expert_pairs"] == s["zero_expert_pairs"]
    assert s["routed_flop_reduction"] == 0.0 and n["routed_flop_reduction"] == 0.0
    assert s["routed_flops"] == n["routed_flops"] == s["native_routed_flops"]
    assert handle.zero_expert_pairs() == s["zero_expert_pairs"]


@torch.no_grad()
def test_fewer_slots_change_both_counts_consistently(model):  # type: ignore[no-untyped-def]
    x = tokens(seed=2)
    layers = find_moe_layers(model)[0]
    with dmr.patched(model, dmr.StaticTopK()), dmr.profile(model, count_dense=False) as full:
        model(x)
    with dmr.patched(model, dmr.StaticTopK(k=1)) as handle, dmr.profile(model, count_dense=False) as one:
        model(x)
    f, d = full.to_dict(), one.to_dict()
    for row, layer in zip(d["layers"], layers, strict=True):
        assert row["executed_pairs"] + row["zero_expert_pairs"] == row["kept_pairs"] == x.numel()
        assert row["routed_flops"] == row["executed_pairs"] * layer.flops_per_pair
        native_real = row["native_pairs"] - row["native_zero_expert_pairs"]
        assert row["native_routed_flops"] == native_real * layer.flops_per_pair
        assert row["routed_flop_reduction"] == pytest.approx(1 - row["executed_pairs"] / native_real)
    assert d["executed_pairs"] < f["executed_pairs"] and d["zero_expert_pairs"] <= f["zero_expert_pairs"]
    assert d["executed_pairs"] + d["zero_expert_pairs"] == x.numel() * len(layers)
    assert (handle.executed_pairs(), handle.zero_expert_pairs()) == (
        d["executed_pairs"],
        d["zero_expert_pairs"],
    )
    assert d["routed_flop_reduction"] > 0


@torch.no_grad()
def test_report_totals_and_summary(model):  # type: ignore[no-untyped-def]
    with dmr.patched(model, dmr.TopP(p=0.4)), dmr.profile(model) as report:
        model(tokens(seed=3))
    d = report.to_dict()
    for key in (
        "kept_pairs",
        "executed_pairs",
        "zero_expert_pairs",
        "native_zero_expert_pairs",
        "routed_flops",
    ):
        assert d[key] == sum(row[key] for row in d["layers"])
    assert d["native_pairs"] == sum(row["native_pairs"] for row in d["layers"])
    assert d["native_routed_flops"] == sum(
        (row["native_pairs"] - row["native_zero_expert_pairs"]) * layer.flops_per_pair
        for row, layer in zip(d["layers"], find_moe_layers(model)[0], strict=True)
    )
    assert d["executed_pairs"] + d["zero_expert_pairs"] == d["kept_pairs"]
    assert f"zero-computation expert pairs (no expert FLOPs, not executed): {d['zero_expert_pairs']}" in (
        report.summary()
    )
    assert d["attention_flops"] > 0  # longcat_flash's two attention sublayers (self_attn.0 / .1)


def test_families_without_zero_experts_report_none():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    with torch.no_grad(), dmr.patched(model, dmr.TopP(p=0.5)), dmr.profile(model) as report:
        model(tokens())
    d = report.to_dict()
    assert d["zero_expert_pairs"] == d["native_zero_expert_pairs"] == 0
    assert d["executed_pairs"] == d["kept_pairs"]
    assert "zero-computation" not in report.summary()


@torch.no_grad()
def test_a_block_that_remaps_zero_experts_hands_the_router_ids_to_the_experts(model):  # type: ignore[no-untyped-def]
    """transformers >= 5.25: longcat_flash's block adds the zero experts' identity itself and sends
    each zero-expert slot to its experts as a real expert at weight 0; the patched experts take the
    router's own ids instead, so those slots run no GEMM, and refuse a call without a routing."""
    layer = find_moe_layers(model)[0][0]
    if not layer.zero_in_block:
        pytest.skip("this transformers release keeps zero experts in the experts module")
    h = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    with dmr.patched(model, dmr.StaticTopK(), backend="loop") as handle:
        ref = layer.block(h[None])  # router, then experts
        experts = handle.experts[0]
        assert experts.router.routed_ids is None  # handed over, not kept
        executed, zero = experts.counter.executed_pairs, experts.counter.zero_expert_pairs
        assert executed + zero == 4 * layer.native_k and zero > 0
        with pytest.raises(dmr.errors.RoutingInputError, match="router's last call left no routing"):
            layer.experts(h, torch.zeros(4, layer.native_k, dtype=torch.long), torch.ones(4, layer.native_k))
    torch.testing.assert_close(ref, layer.block(h[None]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_watch_routing_reads_the_router_ids_where_the_block_remaps_them(model):  # type: ignore[no-untyped-def]
    """The ids a hook sees are the router's (zero experts included), however the router is called."""
    from dynamic_moe_router.hf.layers import watch_routing

    layer = find_moe_layers(model)[0][0]
    if not layer.zero_in_block:
        pytest.skip("this transformers release keeps zero experts in the experts module")
    seen: list[tuple[int, torch.Tensor]] = []
    handle = watch_routing(layer, lambda h, ids: seen.append((h.shape[0], ids)))
    try:
        h = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
        ids = layer.router(h)[2]  # longcat_flash's router: (logits, weights, ids)
        layer.router(hidden_states=h)
        model(tokens()[:, :4])
    finally:
        handle.remove()
    assert [n for n, _ in seen[:2]] == [5, 5] and all(torch.equal(i, ids) for _, i in seen[:2])
    assert len(seen) == 3 and seen[2][0] == 8  # the block's call: 2 x 4 tokens
    assert int(seen[2][1].max()) < layer.num_experts  # router ids, zero experts (6..8) included
