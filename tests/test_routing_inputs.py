"""route(): bad inputs, non-finite scores, zero tokens."""

from __future__ import annotations

import pytest
import torch

import dynamic_moe_router as dmr


def probs(t: int = 4, e: int = 6) -> torch.Tensor:
    return torch.softmax(torch.randn(t, e), dim=-1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_raise(bad):  # type: ignore[no-untyped-def]
    p = probs()
    p[2, 3] = bad
    with pytest.raises(dmr.NonFiniteRouterScoresError, match="1 of 4 tokens") as info:
        dmr.route(p, dmr.TopP(p=0.5), native_k=2, layer=5)
    assert info.value.layer == 5 and info.value.bad_tokens == 1
    assert "MoE layer 5" in str(info.value)


def test_nan_probabilities_raise_even_with_finite_scores():  # type: ignore[no-untyped-def]
    p = probs()
    q = p.clone()
    q[0, 0] = float("nan")
    with pytest.raises(dmr.NonFiniteRouterScoresError):
        dmr.route(p, dmr.TopP(p=0.5), native_k=2, probs=q)


def test_validate_false_keeps_other_tokens_intact():  # type: ignore[no-untyped-def]
    p = probs()
    clean = dmr.route(p, dmr.TopP(p=0.5), native_k=2, normalize="sum")
    p[1, :] = float("nan")
    r = dmr.route(p, dmr.TopP(p=0.5), native_k=2, normalize="sum", validate=False)
    others = torch.tensor([0, 2, 3])
    assert torch.equal(r.ids[others], clean.ids[others])
    assert torch.equal(r.weights[others], clean.weights[others])


def test_negative_infinity_marks_excluded_candidates_not_errors():  # type: ignore[no-untyped-def]
    s = torch.tensor([[0.2, float("-inf"), 0.1]])
    r = dmr.route(s, dmr.StaticTopK(k=3), native_k=2, probs=torch.tensor([[0.6, 0.0, 0.4]]))
    assert r.counts.tolist() == [2]


@pytest.mark.parametrize(
    "policy", [dmr.StaticTopK(), dmr.TopP(p=0.5), dmr.EntropyAdaptive(), dmr.RelativeThreshold()]
)
def test_zero_tokens(policy):  # type: ignore[no-untyped-def]
    r = dmr.route(torch.empty(0, 8), policy, native_k=2)
    assert r.ids.shape == (0, 2) and r.weights.shape == (0, 2) and r.counts.shape == (0,)
    assert r.kept_pairs() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": torch.zeros(3)}, "must be 2-D"),
        ({"scores": torch.zeros(3, 4, dtype=torch.long)}, "floating-point"),
        ({"scores": [[0.1, 0.9]]}, "must be a torch.Tensor"),
        ({"probs": torch.zeros(3, 5)}, "must have the shape of scores"),
        ({"gate": torch.zeros(2, 4)}, "must have the shape of scores"),
        ({"native_k": 0}, "native_k must be an int in"),
        ({"native_k": 5}, "native_k must be an int in"),
        ({"normalize": "l2"}, "normalize must be"),
    ],
)
def test_bad_inputs_raise_routing_input_error(kwargs, match):  # type: ignore[no-untyped-def]
    args = {"scores": torch.softmax(torch.randn(3, 4), -1), "native_k": 2, **kwargs}
    scores = args.pop("scores")
    with pytest.raises(dmr.RoutingInputError, match=match):
        dmr.route(scores, dmr.StaticTopK(), **args)
