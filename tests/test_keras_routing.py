"""dynamic_moe_router.keras.route: the shared spec on Keras tensors (this process's Keras backend;
tests/test_keras_backends.py reruns this module on the other backends)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router import core as spec
from dynamic_moe_router.policies import policy_from_dict

keras = pytest.importorskip("keras")
dk = pytest.importorskip("dynamic_moe_router.keras")

VECTORS = Path(__file__).parent / "vectors"
ROUTING = np.load(VECTORS / "routing.npz")
MANIFEST = json.loads(str(ROUTING["manifest"]))


def np_(x):  # type: ignore[no-untyped-def]
    return np.asarray(keras.ops.convert_to_numpy(x))


def random_probs(seed: int, tokens: int = 16, experts: int = 8) -> np.ndarray:
    logits = (
        np.random.default_rng(seed).standard_normal((tokens, experts))
        * np.linspace(0.3, 3.0, tokens)[:, None]
    )
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype("float32")  # (T, E)


def test_keras_ops_is_an_ops_adapter():  # type: ignore[no-untyped-def]
    assert isinstance(dk.KERAS_OPS, spec.Ops)
    values, ids = dk.KERAS_OPS.top_k(keras.ops.ones((1, 8)), 3)
    assert np_(ids).tolist() == [[0, 1, 2]]  # exact ties: lower index first
    assert np_(values).tolist() == [[1.0, 1.0, 1.0]]


@pytest.mark.parametrize("i", range(len(MANIFEST)))
def test_routing_vectors(i):  # type: ignore[no-untyped-def]
    meta = MANIFEST[i]
    a = {n: ROUTING[f"{i}/{n}"] for n in ("scores", "probs", "gate", "ids", "weights", "counts")}
    r = dk.route(
        a["scores"],
        policy_from_dict(meta["policy"]),
        native_k=meta["native_k"],
        probs=a["probs"],
        gate=a["gate"],
        normalize=meta["normalize"],
        scaling=meta["scaling"],
        layer=meta["layer"],
    )
    np.testing.assert_array_equal(np_(r.ids), a["ids"])
    np.testing.assert_array_equal(np_(r.counts), a["counts"])
    np.testing.assert_allclose(np_(r.weights), a["weights"], rtol=0, atol=1e-6)
    assert r.num_experts == a["scores"].shape[1] and r.k_max == a["ids"].shape[1]


@pytest.mark.parametrize(
    "policy",
    [
        dmr.StaticTopK(),
        dmr.TopP(p=0.6),
        dmr.RelativeThreshold(beta=0.3, max_k=4),
        dmr.EntropyAdaptive(max_k=3),
    ],
)
@pytest.mark.parametrize("normalize", ["none", "sum", "softmax"])
def test_route_matches_torch_route(policy, normalize):  # type: ignore[no-untyped-def]
    probs = random_probs(3)
    logits = np.log(probs)
    gate = logits if normalize == "softmax" else probs
    expected = dmr.route(
        torch.from_numpy(probs), policy, native_k=2, gate=torch.from_numpy(gate), normalize=normalize
    )
    r = dk.route(probs, policy, native_k=2, gate=gate, normalize=normalize)
    np.testing.assert_array_equal(np_(r.ids), expected.ids.numpy())
    np.testing.assert_array_equal(np_(r.counts), expected.counts.numpy())
    np.testing.assert_allclose(np_(r.weights), expected.weights.numpy(), rtol=0, atol=1e-6)
    assert r.kept_pairs() == expected.kept_pairs()
    np.testing.assert_array_equal(np_(r.kept), expected.kept.numpy())


def test_tokens_with_no_kept_expert_get_sentinels_and_zero_weights():  # type: ignore[no-untyped-def]
    probs = random_probs(5)
    policy = dmr.EntropyAdaptive(min_k=0, max_k=3, low=0.3, high=0.9)
    r = dk.route(probs, policy, native_k=2, normalize="sum")
    counts, ids, weights = np_(r.counts), np_(r.ids), np_(r.weights)
    empty = counts == 0
    assert empty.any() and (~empty).any()
    assert (ids[empty] == r.sentinel).all() and (weights[empty] == 0).all()
    np.testing.assert_allclose(weights[~empty].sum(-1), 1.0, atol=1e-6)


def test_excluded_candidates_are_never_kept():  # type: ignore[no-untyped-def]
    scores = np.array([[0.6, -np.inf, 0.4, -np.inf]], "float32")
    probs = np.array([[0.6, 0.0, 0.4, 0.0]], "float32")
    r = dk.route(scores, dmr.StaticTopK(k=3), native_k=2, probs=probs)
    expected = dmr.route(
        torch.from_numpy(scores), dmr.StaticTopK(k=3), native_k=2, probs=torch.from_numpy(probs)
    )
    np.testing.assert_array_equal(np_(r.ids), expected.ids.numpy())
    np.testing.assert_array_equal(np_(r.counts), expected.counts.numpy())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": np.ones(4, "float32")}, "2-D"),
        ({"scores": np.ones((2, 4), "int32")}, "floating"),
        ({"scores": np.ones((2, 4), "float32"), "probs": np.ones((2, 3), "float32")}, "shape of scores"),
        ({"scores": np.ones((2, 4), "float32"), "gate": np.ones((3, 4), "float32")}, "shape of scores"),
        ({"scores": np.ones((2, 4), "float32"), "native_k": 5}, "native_k"),
        ({"scores": np.ones((2, 4), "float32"), "native_k": True}, "native_k"),
        ({"scores": np.ones((2, 4), "float32"), "normalize": "max"}, "normalize"),
        ({"scores": np.ones((2, 4), "float32"), "policy": "top_p"}, "RoutingPolicy"),
        ({"scores": "not a tensor"}, "tensor"),
    ],
)
def test_bad_inputs_raise_routing_input_error(kwargs, match):  # type: ignore[no-untyped-def]
    args = {"policy": dmr.TopP(p=0.5), "native_k": 2, **kwargs}
    scores = args.pop("scores")
    policy = args.pop("policy")
    with pytest.raises(dmr.RoutingInputError, match=match):
        dk.route(scores, policy, **args)


def test_policy_that_does_not_fit_raises_policy_error():  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyError, match="max_k"):
        dk.route(random_probs(0, experts=4), dmr.TopP(p=0.5, max_k=6), native_k=2)


def test_non_finite_scores_raise_with_layer_and_count():  # type: ignore[no-untyped-def]
    scores = random_probs(1, tokens=4)
    scores[1, 2] = np.nan
    scores[3, 0] = np.inf
    with pytest.raises(dmr.NonFiniteRouterScoresError) as info:
        dk.route(scores, dmr.TopP(p=0.5), native_k=2, layer=3)
    assert info.value.layer == 3 and info.value.bad_tokens == 2
    r = dk.route(scores, dmr.TopP(p=0.5), native_k=2, validate=False)  # skipped: still routes
    assert np_(r.ids).shape == (4, 2)
