"""``TileAware``: each expert's rows in a batch moved to whole row tiles, by the documented rule."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

import dynamic_moe_router as dmr
from dynamic_moe_router.core import TORCH_OPS, select
from dynamic_moe_router.hf.tiny import tiny_model
from dynamic_moe_router.policies import policy_from_dict
from strategies import policies_for, routing_problems


def reference_kept(policy: dmr.TileAware, probs: torch.Tensor, native_k: int) -> set[tuple[int, int]]:
    """The documented rule in plain Python: the kept ``(token, expert)`` pairs."""
    num_experts = probs.shape[1]
    inner = dmr.route(probs, policy.inner, native_k=native_k, validate=False)
    k_max = inner.ids.shape[1]
    rows = probs.tolist()
    ranked = [sorted(range(num_experts), key=lambda e, r=r: -r[e])[:k_max] for r in rows]
    counts = inner.counts.tolist()
    cands: dict[int, list[tuple[int, float, int, int]]] = {e: [] for e in range(num_experts)}
    for t, ids in enumerate(ranked):
        for j, e in enumerate(ids):
            kept = j < counts[t]
            cls = 2 if kept and j == 0 else 1 if kept else 0
            cands[e].append((cls, rows[t][e], t * k_max + j, t))
    tile, out = policy.rows, set()
    for e, group in cands.items():
        have = sum(c[0] > 0 for c in group)
        firsts = sum(c[0] == 2 for c in group)
        down, up = have // tile * tile, min(-(-have // tile) * tile, len(group))
        trim = have if have < tile else max(down, firsts)
        target = {"trim": trim, "refill": up}.get(policy.mode)
        if target is None:  # round
            target = up if have - down >= (tile + 1) // 2 else trim
        group.sort(key=lambda c: (-c[0], -c[1], c[2]))
        out |= {(c[3], e) for c in group[:target]}
    return out


def kept_pairs(routing: dmr.Routing) -> set[tuple[int, int]]:
    e = routing.num_experts
    return {(t, i) for t, row in enumerate(routing.ids.tolist()) for i in row if i < e}


@st.composite
def tile_cases(draw):  # type: ignore[no-untyped-def]
    probs, native_k = draw(routing_problems(max_tokens=40, max_experts=8))
    inner = draw(policies_for(probs.shape[1], native_k))
    rows = draw(st.sampled_from([1, 2, 3, 4, 8]))
    mode = draw(st.sampled_from(["round", "trim", "refill"]))
    return probs, native_k, dmr.TileAware(inner, rows=rows, mode=mode)


@settings(max_examples=300, deadline=None)
@given(tile_cases())
def test_kept_pairs_follow_the_documented_rule(case) -> None:  # type: ignore[no-untyped-def]
    probs, native_k, policy = case
    # ties make the ranking (and the order within a class) ambiguous; random logits rarely tie
    if probs.numel() and any(len(set(row)) < len(row) for row in probs.tolist()):
        return
    r = dmr.route(probs, policy, native_k=native_k)
    inner = dmr.route(probs, policy.inner, native_k=native_k)
    got, before = kept_pairs(r), kept_pairs(inner)
    assert got == reference_kept(policy, probs, native_k)
    assert r.kept_pairs() == len(got)  # no pair kept twice
    if policy.mode == "trim":  # only drops, never a token's first slot
        assert got <= before
        assert {(t, int(inner.ids[t, 0])) for t in range(len(probs)) if inner.counts[t] > 0} <= got
    if policy.mode == "refill":  # only adds, and only on experts the batch already uses
        assert got >= before and {e for _, e in got} == {e for _, e in before}
    if policy.rows == 1:
        assert torch.equal(r.ids, inner.ids) and torch.equal(r.weights, inner.weights)
    # weights are the routing probabilities at the kept ids (normalize="none")
    kept = r.ids < probs.shape[1]
    assert torch.equal(r.weights[kept], probs.gather(1, r.ids.clamp(max=probs.shape[1] - 1))[kept])
    assert bool((r.weights[~kept] == 0).all())


def test_round_moves_rows_onto_whole_tiles_at_about_the_inner_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4096, 32, generator=gen) * 1.5, -1)  # (T, E)
    inner = dmr.TopP(p=0.5)
    base = dmr.route(probs, inner, native_k=4)
    out = dmr.route(probs, dmr.TileAware(inner, rows=64), native_k=4)
    rows = torch.bincount(out.ids[out.ids < 32], minlength=32)  # (E,)
    tiles = lambda r: int(((r + 63) // 64).sum())  # noqa: E731
    assert tiles(rows) < tiles(torch.bincount(base.ids[base.ids < 32], minlength=32))
    assert abs(out.kept_pairs() / base.kept_pairs() - 1) < 0.05
    assert int((rows % 64 != 0).sum()) <= 4  # a few experts keep first slots past a boundary


def test_excluded_candidates_are_never_refilled() -> None:
    # token 1 keeps expert 2; refilling expert 2 would take token 0's candidate there, but the family
    # excludes it (-inf score), as select() caps a count at the finite candidates
    probs = torch.tensor([[0.5, 0.2, 0.25, 0.05], [0.15, 0.1, 0.7, 0.05]])  # (T, E)
    scores = probs.clone()
    scores[0, 2] = float("-inf")
    policy = dmr.TileAware(dmr.TopP(p=0.1), rows=4, mode="refill")
    sel = select(TORCH_OPS, scores, policy, native_k=4, probs=probs)
    kept = [sorted(row[: int(c)].tolist()) for row, c in zip(sel.ranked_ids, sel.counts, strict=True)]
    assert kept == [[0], [0, 2]]  # expert 0 refilled with token 1; expert 2 not with token 0
    scores[0, 2] = 0.25  # not excluded: refilled
    sel = select(TORCH_OPS, scores, policy, native_k=4, probs=probs)
    assert sorted(sel.ranked_ids[0, : int(sel.counts[0])].tolist()) == [0, 2]


def test_a_negative_zero_probability_is_ranked_as_zero() -> None:
    # -0.0's float32 bits would spill into the class field of the sort key (a review found both cases)
    scores = torch.tensor([[0.9, 0.5, float("-inf")], [0.1, 0.9, 0.5], [0.9, float("-inf"), 0.5]])
    probs = torch.tensor([[0.9, -0.0, 0.1], [0.05, 0.9, 0.05], [0.6, 0.3, 0.1]])
    policy = dmr.TileAware(dmr.TopP(p=0.5), rows=2, mode="refill")
    sel = select(TORCH_OPS, scores, policy, native_k=3, probs=probs)
    assert 1 not in sel.ranked_ids[2, : int(sel.counts[2])].tolist()  # excluded (-inf): never refilled
    probs = torch.tensor([[-0.0, 0.5]] + [[0.3, 0.4]] * 3 + [[0.2, 0.8]] * 3)  # (7, 2)
    scores = torch.tensor([[0.6, 0.4]] * 4 + [[0.2, 0.8]] * 3)  # tokens 0-3 rank expert 0 first
    sel = select(
        TORCH_OPS, scores, dmr.TileAware(dmr.StaticTopK(), rows=4, mode="trim"), native_k=2, probs=probs
    )
    assert sel.counts.tolist()[0] >= 1  # a kept first slot is never trimmed, whatever its probability


def test_save_load_and_spec_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = dmr.TileAware(dmr.TopP(p=0.8, min_k=2), rows=128, mode="trim")
    policy.save(tmp_path / "p.json")
    assert dmr.load_policy(tmp_path / "p.json") == policy
    assert policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert dmr.parse_policy("tile_aware:rows=64") == dmr.TileAware(dmr.StaticTopK(), rows=64)
    assert "rows=128" in policy.describe() and "top_p" in policy.describe()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rows": 0}, "rows"),
        ({"rows": 2.5}, "rows"),
        ({"rows": "256"}, "rows"),
        ({"mode": "nearest"}, "mode"),
        ({"mode": None}, "mode"),
        ({"inner": dmr.PerLayer(dmr.StaticTopK(), {0: dmr.TopP(p=0.5)})}, "inner"),
        ({"inner": dmr.BatchAware()}, "inner"),
        ({"inner": dmr.TileAware()}, "inner"),
        ({"inner": {"_type": "top_p"}}, "inner"),
    ],
)
def test_invalid_values_raise_policy_error(kwargs, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyError) as err:
        dmr.TileAware(**kwargs)
    assert err.value.field == field


def test_keep_counts_and_other_frameworks_get_a_policy_error() -> None:
    class OtherOps:
        name = "jax"

    policy = dmr.TileAware(dmr.TopP(p=0.5))
    with pytest.raises(dmr.PolicyError, match="torch operations only"):
        policy.rerank_ops(OtherOps(), None, None, None, torch.zeros(1, 4), 2)
    with pytest.raises(dmr.PolicyError, match="need not be a prefix"):
        policy.keep_counts(torch.ones(1, 2), torch.ones(1, 4), 1, 2)


@pytest.mark.parametrize("family", list(dmr.supported_families()))
def test_patched_models_route_through_it(family: str) -> None:
    model = tiny_model(family)
    x = torch.randint(3, 90, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with dmr.patched(model, dmr.TopP(p=0.6)) as inner:
            base = model(x).logits
            base_pairs = inner.executed_pairs()
        with dmr.patched(model, dmr.TileAware(dmr.TopP(p=0.6), rows=1)):
            same = model(x).logits
        with dmr.patched(model, dmr.TileAware(dmr.TopP(p=0.6), rows=4, mode="refill")) as aware:
            out = model(x).logits
            pairs = aware.executed_pairs()
            tokens = model.generate(x[:, :4], max_new_tokens=4, do_sample=False)
    assert torch.equal(same, base)  # rows=1 is exactly the inner policy
    assert torch.isfinite(out).all() and tokens.shape == (4, 8)
    assert pairs >= base_pairs


def test_a_bare_string_in_a_spec_names_the_quoted_form() -> None:
    with pytest.raises(dmr.PolicyFileError, match=r'a string is double-quoted: mode="trim"'):
        dmr.parse_policy("tile_aware:mode=trim")
    with pytest.raises(dmr.PolicyFileError) as err:
        dmr.parse_policy("top_p:p=abc")  # a number field: no string hint
    assert "double-quoted" not in str(err.value)
    assert dmr.parse_policy('tile_aware:mode="trim"') == dmr.TileAware(mode="trim")
