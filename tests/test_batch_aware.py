"""``BatchAware``: fewer distinct experts per routing call, kept slots still a prefix."""

from __future__ import annotations

import json
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.tiny import tiny_model
from dynamic_moe_router.policies import policy_from_dict
from strategies import policies_for, routing_problems


def reference_counts(policy: dmr.BatchAware, probs: torch.Tensor, native_k: int) -> list[int]:
    """The documented rule, token by token in plain Python (ids from torch.topk, as route ranks)."""
    num_experts = probs.shape[1]
    inner = dmr.route(probs, policy.inner, native_k=native_k, validate=False)
    ids = [[e for e in row if e < num_experts] for row in inner.ids.tolist()]
    mass = [0.0] * num_experts
    for t, row in enumerate(ids):
        for e in row:
            mass[e] += float(probs[t, e])
    n_active = max(1, math.ceil(policy.experts * num_experts))
    order = torch.tensor(mass).topk(min(n_active, num_experts)).indices.tolist()
    active = set(order) | {e for row in ids for e in row[: policy.min_keep]}
    counts = []
    for row in ids:
        count = len(row)
        for slot, e in enumerate(row):
            if slot >= policy.min_keep and e not in active:
                count = slot
                break
        counts.append(count)
    return counts


@st.composite
def batch_cases(draw):  # type: ignore[no-untyped-def]
    probs, native_k = draw(routing_problems(max_tokens=24, max_experts=16))
    inner = draw(policies_for(probs.shape[1], native_k))
    experts = draw(st.sampled_from([0.05, 0.25, 0.5, 0.75, 1.0]))
    min_keep = draw(st.integers(1, 3))
    return probs, native_k, dmr.BatchAware(inner, experts=experts, min_keep=min_keep)


@settings(max_examples=200, deadline=None)
@given(batch_cases())
def test_counts_follow_the_documented_rule(case) -> None:  # type: ignore[no-untyped-def]
    probs, native_k, policy = case
    # ties make the ranking ambiguous (ids are recovered from the probabilities); random logits
    # rarely tie, and a tie only lets the reference disagree, so such draws are skipped
    if probs.numel() and any(len(set(row)) < len(row) for row in probs.tolist()):
        return
    r = dmr.route(probs, policy, native_k=native_k)
    inner = dmr.route(probs, policy.inner, native_k=native_k)
    assert r.counts.tolist() == reference_counts(policy, probs, native_k)
    # never more than inner, never below min(inner, min_keep); ids are inner's own prefix
    assert bool((r.counts <= inner.counts).all())
    assert bool((r.counts >= torch.clamp(inner.counts, max=policy.min_keep)).all())
    kept = r.ids < probs.shape[1]
    assert torch.equal(r.ids[kept], inner.ids[: r.ids.shape[0], : r.ids.shape[1]][kept])
    if policy.experts == 1.0:
        assert torch.equal(r.ids, inner.ids) and torch.equal(r.weights, inner.weights)


def test_cuts_distinct_experts_of_a_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(64, 64, generator=gen) * 2, -1)  # (T, E): decode batch of 64
    static = dmr.route(probs, dmr.StaticTopK(), native_k=8)
    aware = dmr.route(probs, dmr.BatchAware(dmr.StaticTopK(), experts=0.5), native_k=8)
    ids, aware_ids = static.ids, aware.ids[aware.ids < 64]
    mass = torch.zeros(64).index_add_(0, ids.reshape(-1), probs.gather(1, ids).reshape(-1))  # (E,)
    allowed = set(mass.topk(32).indices.tolist()) | set(ids[:, 0].tolist())  # top mass + protected
    assert set(aware_ids.tolist()) <= allowed
    assert len(set(aware_ids.tolist())) < len(set(ids.reshape(-1).tolist())) == 64
    assert 0 < aware.kept_pairs() < static.kept_pairs()


def test_save_load_and_spec_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = dmr.BatchAware(dmr.TopP(p=0.8, min_k=2), experts=0.4, min_keep=2)
    policy.save(tmp_path / "p.json")
    assert dmr.load_policy(tmp_path / "p.json") == policy
    assert policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert dmr.parse_policy("batch_aware:experts=0.5") == dmr.BatchAware(dmr.StaticTopK(), experts=0.5)
    assert "experts=0.4" in policy.describe() and "top_p" in policy.describe()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"experts": 0.0}, "experts"),
        ({"experts": 1.5}, "experts"),
        ({"experts": float("nan")}, "experts"),
        ({"experts": "half"}, "experts"),
        ({"min_keep": 0}, "min_keep"),
        ({"inner": dmr.PerLayer(dmr.StaticTopK(), {0: dmr.TopP(p=0.5)})}, "inner"),
        ({"inner": dmr.BatchAware()}, "inner"),
        ({"inner": {"_type": "top_p"}}, "inner"),
    ],
)
def test_invalid_values_raise_policy_error(kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyError) as err:
        dmr.BatchAware(**kwargs)
    assert err.value.field == field


def test_a_corrupt_file_names_the_inner_policy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = dmr.BatchAware(dmr.TopP(p=0.8)).to_dict()
    data["_data"]["inner"]["_data"]["p"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(dmr.PolicyFileError, match=r"inner.*p must be in"):
        dmr.load_policy(tmp_path / "bad.json")


def test_other_frameworks_get_a_policy_error() -> None:
    class OtherOps:
        name = "jax"

    with pytest.raises(dmr.PolicyError, match="torch only"):
        dmr.BatchAware().keep_counts_ops(OtherOps(), None, None, 1, 2)


@pytest.mark.parametrize("family", list(dmr.supported_families()))
def test_patched_models_route_through_it(family: str) -> None:
    model = tiny_model(family)
    x = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with dmr.patched(model, dmr.TopP(p=0.6)):
            inner = model(x).logits
        with dmr.patched(model, dmr.BatchAware(dmr.TopP(p=0.6), experts=1.0)):
            same = model(x).logits
        with dmr.patched(model, dmr.StaticTopK()) as static:
            model(x)
        with dmr.patched(model, dmr.BatchAware(dmr.StaticTopK(), experts=0.25)) as aware:
            out = model(x).logits
            pairs = aware.executed_pairs()
            tokens = model.generate(x[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(same, inner)  # experts=1.0 is exactly the inner policy
    assert torch.isfinite(out).all() and tokens.shape == (4, 8)
    assert 0 < pairs <= static.executed_pairs()
