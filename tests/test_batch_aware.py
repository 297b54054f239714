"""``BatchAware``: fewer distinct experts per routing call, kept slots still a prefix."""

from __future__ import annotations

import json
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings

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


def _old_trim_counts(policy: dmr.BatchAware, ranked: torch.Tensor, probs: torch.Tensor, k_max: int):  # type: ignore[no-untyped-def]
    """keep_counts as it was before 0.2.0: the slot ids and the masses through (T, k_max, E) tensors."""
    inner_min = policy.inner.k_range(k_max, probs.shape[1])[0]
    counts = policy.inner.keep_counts(ranked, probs, inner_min, k_max)
    num_experts = probs.shape[1]
    slots = torch.arange(k_max)
    kept = slots[None, :] < counts[:, None]
    slot_ids = (probs[:, None, :] == ranked[:, :, None]).to(torch.uint8).argmax(-1)
    owner = slot_ids[:, :, None] == torch.arange(num_experts)
    mass = ((ranked * kept)[:, :, None] * owner).sum((0, 1))
    protected = kept & (slots[None, :] < policy.min_keep)
    votes = torch.zeros(num_experts).index_add_(0, slot_ids.reshape(-1), protected.reshape(-1).float())
    n_active = max(1, math.ceil(policy.experts * num_experts))
    top = torch.zeros(num_experts).scatter_(0, mass.topk(min(n_active, num_experts)).indices, 1.0)
    active = (votes + top) > 0
    outside = ~active[slot_ids] & (slots[None, :] >= policy.min_keep)
    return torch.minimum(counts, torch.where(outside, slots[None, :], k_max).amin(-1))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 40), st.integers(2, 16), st.integers(1, 8), st.sampled_from([0.05, 0.25, 0.5, 0.75]),
    st.integers(1, 3), st.integers(0, 2**31 - 1), st.sampled_from([4, 16, 256]),
)  # fmt: skip
def test_trimming_without_t_k_e_temporaries_equals_the_old_formula(  # type: ignore[no-untyped-def]
    tokens, experts, k, fraction, min_keep, seed, levels
):
    # probabilities on a grid of 1/levels: exact ties are common (the id recovery must resolve them
    # to the lower index, as the old argmax did) and every mass is exact in float32, so the two
    # summation orders agree to the bit and so must the counts
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    probs = torch.randint(0, levels + 1, (tokens, experts), generator=gen).float() / levels  # (T, E)
    ranked = probs.gather(1, probs.topk(k).indices)  # (T, k) as the family ranks them
    policy = dmr.BatchAware(dmr.StaticTopK(), experts=fraction, min_keep=min_keep)
    got = policy.keep_counts(ranked, probs, 1, k)
    assert torch.equal(got, _old_trim_counts(policy, ranked, probs, k))


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


# --- reroute=True: a hard cap on the distinct experts, the inner policy's counts kept ---------


def reroute_reference(policy: dmr.BatchAware, probs: torch.Tensor, native_k: int) -> list[list[int]] | None:
    """The documented rerouting, token by token in float64 plain Python; ``None`` where the active
    set is ambiguous (two masses at its boundary within rounding)."""
    num_experts = probs.shape[1]
    inner = dmr.route(probs, policy.inner, native_k=native_k, validate=False)
    ids = [[e for e in row if e < num_experts] for row in inner.ids.tolist()]
    mass = [0.0] * num_experts
    for t, row in enumerate(ids):
        for e in row:
            mass[e] += float(probs[t, e])
    n_active = max(1, math.ceil(policy.experts * num_experts))
    by_mass = sorted(range(num_experts), key=lambda e: -mass[e])
    if n_active < num_experts and abs(mass[by_mass[n_active - 1]] - mass[by_mass[n_active]]) < 1e-5:
        return None
    active = set(by_mass[:n_active])
    out = []
    for t, row in enumerate(ids):
        ranking = sorted(range(num_experts), key=lambda e: -float(probs[t, e]))
        out.append([e for e in ranking if e in active][: len(row)])
    return out


@st.composite
def reroute_cases(draw):  # type: ignore[no-untyped-def]
    probs, native_k = draw(routing_problems(max_tokens=24, max_experts=16))
    inner = draw(policies_for(probs.shape[1], native_k))
    experts = draw(st.sampled_from([0.05, 0.25, 0.5, 0.75, 1.0]))
    return probs, native_k, dmr.BatchAware(inner, experts=experts, reroute=True)


@settings(max_examples=200, deadline=None)
@given(reroute_cases())
def test_reroute_follows_the_documented_rule(case) -> None:  # type: ignore[no-untyped-def]
    probs, native_k, policy = case
    # ties make the ranking ambiguous (see test_counts_follow_the_documented_rule)
    assume(not any(len(set(row)) < len(row) for row in probs.tolist()))
    r = dmr.route(probs, policy, native_k=native_k)
    inner = dmr.route(probs, policy.inner, native_k=native_k)
    n_active = max(1, math.ceil(policy.experts * probs.shape[1]))
    assert torch.equal(r.counts, inner.counts.clamp(max=n_active))  # inner's pairs, at most n_active each
    expected = reroute_reference(policy, probs, native_k)
    if expected is not None:
        kept = [[e for e in row if e < probs.shape[1]] for row in r.ids.tolist()]
        assert kept == expected
    assert len(set(r.ids[r.ids < probs.shape[1]].tolist())) <= n_active
    # the routing contract: kept slots first, then the sentinel; weights only on kept slots
    slots = torch.arange(r.ids.shape[1])
    assert torch.equal(r.ids < probs.shape[1], slots[None, :] < r.counts[:, None])
    kept_mask = r.ids < probs.shape[1]
    gathered = probs.gather(1, r.ids.clamp(max=probs.shape[1] - 1))  # (T, k): the gate at each slot
    assert torch.equal(r.weights, torch.where(kept_mask, gathered, torch.zeros_like(gathered)))
    if policy.experts == 1.0:
        assert torch.equal(r.ids[:, : inner.ids.shape[1]], inner.ids)


def test_reroute_ranks_by_the_familys_scores_and_weighs_mass_by_probs() -> None:
    # DeepSeek-like: the ranking scores carry a bias (+0.3 on expert 1) and an excluded expert
    probs = torch.tensor([[0.50, 0.05, 0.25, 0.20], [0.10, 0.05, 0.45, 0.40], [0.30, 0.05, 0.20, 0.45]])
    scores = probs + torch.tensor([0.0, 0.3, 0.0, 0.0])  # (T, E)
    scores[1, 0] = float("-inf")  # token 1 may not use expert 0
    policy = dmr.BatchAware(dmr.StaticTopK(), experts=0.5, reroute=True)
    r = dmr.route(scores, policy, native_k=2, probs=probs)
    # native (by scores): [0, 1], [2, 3], [3, 1]. Mass by probs: 0: .50, 1: .10, 2: .45, 3: .85, so
    # active {3, 0} (by scores it would be {3, 1}). Token 1 has one active candidate (0 is excluded).
    assert r.ids.tolist() == [[0, 3], [3, 4], [3, 0]]
    assert r.counts.tolist() == [2, 1, 2]
    assert torch.allclose(r.weights, torch.tensor([[0.50, 0.20], [0.40, 0.0], [0.45, 0.30]]))


def test_reroute_caps_the_distinct_experts_of_a_decode_batch() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(128, 8, generator=gen) * 2, -1)  # (T, E): Mixtral-like, 128 tokens
    trim = dmr.route(probs, dmr.BatchAware(dmr.StaticTopK(), experts=0.5), native_k=2)
    aware = dmr.route(probs, dmr.BatchAware(dmr.StaticTopK(), experts=0.5, reroute=True), native_k=2)
    assert len(set(trim.ids[trim.ids < 8].tolist())) == 8  # every expert is some token's first slot
    assert len(set(aware.ids[aware.ids < 8].tolist())) == 4
    assert aware.kept_pairs() == trim.kept_pairs() == 2 * 128  # the same pairs, on 4 experts


def test_select_takes_a_policys_own_candidates_and_caps_them_at_finite_scores() -> None:
    class Reversed(dmr.StaticTopK):  # a test-only reranking policy: the experts in reverse id order
        def rerank_ops(self, ops, scores, ranked_ids, ranked_probs, probs, native_k):  # type: ignore[no-untyped-def]
            ids = torch.arange(scores.shape[1] - 1, -1, -1)[: ranked_probs.shape[1]]
            return ids.expand(scores.shape[0], -1), torch.tensor([2, 3])

    scores = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.1, float("-inf"), 0.3]])  # (T, E)
    sel = dmr.core.select(dmr.core.TORCH_OPS, scores, Reversed(k=3), native_k=3)
    assert sel.ranked_ids.tolist() == [[3, 2, 1], [3, 2, 1]]
    assert sel.counts.tolist() == [2, 2]  # token 1: expert 2 is excluded (-inf), one less candidate
    assert sel.keep.tolist() == [[True, True, False], [True, True, False]]


def test_reroute_range_validation_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = dmr.BatchAware(dmr.TopP(p=0.8, min_k=1, max_k=3), experts=0.5, reroute=True)
    assert policy.k_range(2, 8) == (1, 3) == policy.inner.k_range(2, 8)  # inner's range, never trimmed
    assert "reroute=True" in policy.describe() and "min_keep" not in policy.describe()
    policy.save(tmp_path / "p.json")
    assert dmr.load_policy(tmp_path / "p.json") == policy
    parsed = dmr.parse_policy("batch_aware:experts=0.5,reroute=true")
    assert parsed == dmr.BatchAware(experts=0.5, reroute=True)
    assert dmr.parse_policy("batch_aware:experts=0.5,reroute=True") == parsed  # as describe() writes it
    with pytest.raises(dmr.PolicyError) as err:
        dmr.BatchAware(reroute="yes")  # type: ignore[arg-type]
    assert err.value.field == "reroute"
    with pytest.raises(dmr.PolicyError, match="no effect with reroute") as err:
        dmr.BatchAware(reroute=True, min_keep=2)
    assert err.value.field == "min_keep"
    with pytest.raises(dmr.PolicyError, match="keep counts cannot describe"):
        policy.keep_counts(torch.ones(2, 3) / 3, torch.ones(2, 8) / 8, 1, 3)

    class OtherOps:
        name = "jax"

    with pytest.raises(dmr.PolicyError, match="torch operations only"):
        policy.rerank_ops(OtherOps(), torch.ones(2, 8), None, None, torch.ones(2, 8), 2)


@pytest.mark.parametrize("family", list(dmr.supported_families()))
def test_reroute_patched_models_and_generate(family: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf import patching

    calls: list[tuple[int, int]] = []  # (distinct kept experts, experts) per routing call
    real_select = patching.select

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        sel = real_select(*args, **kwargs)
        calls.append((torch.unique(sel.ranked_ids[sel.keep]).numel(), sel.num_experts))
        return sel

    model = tiny_model(family)
    x = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with dmr.patched(model, dmr.StaticTopK()) as static:
            native = model(x).logits
        with dmr.patched(model, dmr.BatchAware(dmr.StaticTopK(), experts=1.0, reroute=True)):
            same = model(x).logits
        monkeypatch.setattr(patching, "select", spy)
        with dmr.patched(model, dmr.BatchAware(dmr.StaticTopK(), experts=0.25, reroute=True)) as aware:
            out = model(x).logits
            pairs = aware.executed_pairs() + aware.zero_expert_pairs()  # longcat: zero experts too
            tokens = model.generate(x[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(same, native)  # every expert active: exactly the inner policy
    assert torch.isfinite(out).all() and tokens.shape == (4, 8)
    # the same pairs, fewer where a token runs out of active experts
    assert 0 < pairs <= static.executed_pairs() + static.zero_expert_pairs()
    # every routing call (the forward, the prefill and each generate step) within its cap
    assert calls and all(distinct <= math.ceil(0.25 * experts) for distinct, experts in calls)
