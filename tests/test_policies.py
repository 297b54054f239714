"""Invariants of every policy and of the routing contract (hypothesis)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import dynamic_moe_router as dmr
from dynamic_moe_router.routing import combine_weights, select
from strategies import policies_for, routing_problems


@st.composite
def problem_and_policy(draw):  # type: ignore[no-untyped-def]
    probs, native_k = draw(routing_problems())
    policy = draw(policies_for(probs.shape[1], native_k))
    return probs, native_k, policy


@given(problem_and_policy(), st.sampled_from(["none", "sum"]))
def test_contract_invariants(case, normalize):  # type: ignore[no-untyped-def]
    probs, native_k, policy = case
    tokens, num_experts = probs.shape
    k_min, k_max = policy.k_range(native_k, num_experts)
    r = dmr.route(probs, policy, native_k=native_k, normalize=normalize)

    assert (
        r.ids.shape == (tokens, k_max) and r.weights.shape == (tokens, k_max) and r.counts.shape == (tokens,)
    )
    assert r.ids.dtype == torch.long and r.counts.dtype == torch.long
    # bounds
    assert bool(((r.counts >= k_min) & (r.counts <= k_max)).all())
    # kept slots form a prefix, the rest are sentinels
    slots = torch.arange(k_max)
    assert torch.equal(r.kept, slots < r.counts[:, None])
    assert bool((r.ids[~r.kept] == num_experts).all())
    # kept ids are unique, in range, and the family's best candidates in rank order
    kept_ids = r.ids.masked_fill(~r.kept, -1)
    assert bool(((r.ids >= 0) & (r.ids <= num_experts)).all())
    for t in range(tokens):
        row = [i for i in kept_ids[t].tolist() if i >= 0]
        assert len(set(row)) == len(row)
        expected = torch.topk(probs[t], k_max).indices[: len(row)].tolist()
        assert row == expected
    # weights: non-negative, zero at sentinels
    assert bool((r.weights >= 0).all())
    assert bool((r.weights[~r.kept] == 0).all())
    if normalize == "none":
        assert torch.equal(r.weights[r.kept], probs.gather(1, r.ids.clamp(max=num_experts - 1))[r.kept])
    else:
        sums = r.weights.sum(-1)
        has = r.counts > 0
        assert torch.allclose(sums[has], torch.ones_like(sums[has]), atol=1e-5)
        assert bool((sums[~has] == 0).all())


@given(routing_problems())
def test_static_top_k_equals_torch_topk(problem):  # type: ignore[no-untyped-def]
    probs, native_k = problem
    r = dmr.route(probs, dmr.StaticTopK(), native_k=native_k)
    values, indices = torch.topk(probs, native_k, dim=-1)
    assert torch.equal(r.ids, indices)
    assert torch.equal(r.weights, values)
    assert bool((r.counts == native_k).all())


@given(routing_problems(), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_top_p_monotone_in_p(problem, p1, p2):  # type: ignore[no-untyped-def]
    probs, native_k = problem
    lo, hi = sorted((p1, p2))
    num_experts = probs.shape[1]
    c_lo = dmr.route(probs, dmr.TopP(p=lo, max_k=num_experts), native_k=native_k).counts
    c_hi = dmr.route(probs, dmr.TopP(p=hi, max_k=num_experts), native_k=native_k).counts
    assert bool((c_lo <= c_hi).all())


@given(routing_problems(), st.floats(0.01, 1.0))
def test_top_p_reaches_p_with_the_fewest_experts(problem, p):  # type: ignore[no-untyped-def]
    probs, native_k = problem
    num_experts = probs.shape[1]
    r = dmr.route(probs, dmr.TopP(p=p, min_k=1, max_k=num_experts), native_k=native_k)
    ranked = torch.sort(probs, dim=-1, descending=True).values.double()
    for t in range(probs.shape[0]):
        n = int(r.counts[t])
        before = float(ranked[t, : n - 1].sum())
        assert before < p + 1e-6  # every kept expert was needed ...
        if n < num_experts:
            assert float(ranked[t, :n].sum()) >= p - 1e-5  # ... and the kept ones reach p


@given(routing_problems(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_relative_threshold_monotone_in_beta(problem, b1, b2):  # type: ignore[no-untyped-def]
    probs, native_k = problem
    lo, hi = sorted((b1, b2))
    c_lo = dmr.route(probs, dmr.RelativeThreshold(beta=lo), native_k=native_k).counts
    c_hi = dmr.route(probs, dmr.RelativeThreshold(beta=hi), native_k=native_k).counts
    assert bool((c_lo >= c_hi).all())


@given(routing_problems())
def test_relative_threshold_rule(problem):  # type: ignore[no-untyped-def]
    probs, native_k = problem
    beta = 0.5
    r = dmr.route(probs, dmr.RelativeThreshold(beta=beta, min_k=1), native_k=native_k)
    for t in range(probs.shape[0]):
        kept = r.ids[t, : int(r.counts[t])]
        top = float(probs[t].max())
        if int(r.counts[t]) > 1:
            assert bool((probs[t, kept] >= beta * top).all())
        if int(r.counts[t]) < native_k:  # the next candidate failed the threshold
            nxt = torch.topk(probs[t], native_k).values[int(r.counts[t])]
            assert float(nxt) < beta * top


@given(routing_problems())
def test_entropy_adaptive_follows_entropy(problem):  # type: ignore[no-untyped-def]
    probs, native_k = problem
    num_experts = probs.shape[1]
    policy = dmr.EntropyAdaptive(min_k=1, max_k=num_experts, low=0.1, high=0.9)
    r = dmr.route(probs, policy, native_k=native_k)
    h = -(torch.special.xlogy(probs, probs)).sum(-1) / (math.log(num_experts) if num_experts > 1 else 1.0)
    order = torch.argsort(h)
    counts = r.counts[order]
    assert bool((counts[1:] >= counts[:-1]).all()), "k must not decrease as entropy grows"
    # the documented mapping, evaluated independently
    t = ((h - 0.1) / 0.8).clamp(0, 1)
    expected = 1 + torch.minimum(torch.floor(t * num_experts).long(), torch.tensor(num_experts - 1))
    assert torch.equal(r.counts, expected)


def test_entropy_extremes():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    r = dmr.route(probs, dmr.EntropyAdaptive(min_k=1, max_k=4), native_k=2)
    assert r.counts.tolist() == [1, 4]


def test_max_k_may_exceed_native_k():
    probs = torch.full((3, 8), 1 / 8)
    r = dmr.route(probs, dmr.TopP(p=1.0, max_k=6), native_k=2)
    assert r.k_max == 6 and r.counts.tolist() == [6, 6, 6]


def test_min_k_zero_skips_routed_experts_only_when_asked():
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45]])
    default = dmr.route(probs, dmr.RelativeThreshold(beta=1.0), native_k=2)
    assert default.counts.tolist() == [1, 1]  # min_k=1 by default
    # min_k=0 is an explicit choice; a threshold above every candidate then keeps nothing
    sel = select(probs, dmr.TopP(p=0.5, min_k=0), native_k=2)
    assert sel.counts.min() >= 1  # top-p always keeps the first candidate it needs
    zero = dmr.route(probs, dmr.StaticTopK(k=0), native_k=2)
    assert zero.counts.tolist() == [0, 0] and zero.ids.shape == (2, 0)


def test_per_layer_resolves_layers():
    policy = dmr.PerLayer(dmr.StaticTopK(), {1: dmr.StaticTopK(k=1)})
    probs = torch.softmax(torch.randn(5, 4), -1)
    assert dmr.route(probs, policy, native_k=2, layer=0).counts.tolist() == [2] * 5
    assert dmr.route(probs, policy, native_k=2, layer=1).counts.tolist() == [1] * 5
    assert policy.layers() == (1,)


def test_combine_weights_modes():
    gate = torch.tensor([[2.0, 1.0, 0.5]])
    keep = torch.tensor([[True, True, False]])
    assert combine_weights(gate, keep, "none").tolist() == [[2.0, 1.0, 0.0]]
    assert torch.allclose(combine_weights(gate, keep, "sum"), torch.tensor([[2 / 3, 1 / 3, 0.0]]))
    soft = combine_weights(gate, keep, "softmax")
    assert torch.allclose(soft, torch.cat([torch.softmax(gate[:, :2], -1), torch.zeros(1, 1)], 1))
    assert combine_weights(gate, torch.zeros_like(keep), "softmax").tolist() == [[0.0, 0.0, 0.0]]
    assert combine_weights(gate, keep, "sum", scaling=2.5).sum().item() == pytest.approx(2.5)


def test_excluded_candidates_are_never_kept():
    scores = torch.tensor([[0.5, float("-inf"), 0.3, float("-inf")]])
    r = dmr.route(scores, dmr.StaticTopK(k=4), native_k=2, probs=torch.tensor([[0.6, 0.0, 0.4, 0.0]]))
    assert r.counts.tolist() == [2] and r.ids.tolist() == [[0, 2, 4, 4]]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: dmr.TopP(p=0.0), "p"),
        (lambda: dmr.TopP(p=1.01), "p"),
        (lambda: dmr.TopP(p=float("nan")), "p"),
        (lambda: dmr.TopP(p="0.5"), "p"),
        (lambda: dmr.TopP(p=0.5, min_k=-1), "min_k"),
        (lambda: dmr.TopP(p=0.5, max_k=0), "max_k"),
        (lambda: dmr.TopP(p=0.5, min_k=1.5), "min_k"),
        (lambda: dmr.RelativeThreshold(beta=-0.1), "beta"),
        (lambda: dmr.RelativeThreshold(beta=True), "beta"),
        (lambda: dmr.StaticTopK(k=-1), "k"),
        (lambda: dmr.EntropyAdaptive(low=0.6, high=0.4), "high"),
        (lambda: dmr.EntropyAdaptive(high=1.5), "high"),
        (lambda: dmr.PerLayer(dmr.TopP(p=0.5), {-1: dmr.StaticTopK()}), "overrides"),
        (lambda: dmr.PerLayer(dmr.TopP(p=0.5), {0: "top_p"}), "overrides"),
        (lambda: dmr.PerLayer(dmr.PerLayer(), {}), "default"),
    ],
)
def test_invalid_policy_values_raise_typed_errors(make, field):  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyError) as info:
        make()
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_bounds_that_do_not_fit_the_layer():
    probs = torch.softmax(torch.randn(3, 4), -1)
    with pytest.raises(dmr.PolicyError, match="exceeds the layer's number of experts E=4") as info:
        dmr.route(probs, dmr.TopP(p=0.5, max_k=5), native_k=2)
    assert info.value.field == "max_k"
    with pytest.raises(dmr.PolicyError, match="min_k=3 is larger than the native k=2"):
        dmr.route(probs, dmr.TopP(p=0.5, min_k=3), native_k=2)
    with pytest.raises(dmr.PolicyError, match="k=5 exceeds"):
        dmr.route(probs, dmr.StaticTopK(k=5), native_k=2)


def test_policies_are_frozen():
    policy = dmr.TopP(p=0.5)
    with pytest.raises(AttributeError):
        policy.p = 0.7  # type: ignore[misc]
    per_layer = dmr.PerLayer(policy, {0: dmr.StaticTopK()})
    with pytest.raises(TypeError):
        per_layer.overrides[1] = policy  # type: ignore[index]
    assert hash(per_layer) == hash(dmr.PerLayer(dmr.TopP(p=0.5), {0: dmr.StaticTopK()}))
