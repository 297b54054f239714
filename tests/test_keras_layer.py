"""Keras experts forward and the DynamicMoE layer: kept pairs only, against fp32 references
(this process's Keras backend; tests/test_keras_backends.py reruns this module on the others)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.tiny import tiny_model
from dynamic_moe_router.policies import policy_from_dict

keras = pytest.importorskip("keras")
dk = pytest.importorskip("dynamic_moe_router.keras")
from dynamic_moe_router.keras.experts import resolve_method  # noqa: E402

BACKEND = keras.backend.backend()
NATIVE_METHOD = {"tensorflow": "segments", "jax": "ragged_dot"}.get(BACKEND)
LAYER = np.load(Path(__file__).parent / "vectors" / "layer.npz")


def np_(x):  # type: ignore[no-untyped-def]
    return np.asarray(keras.ops.convert_to_numpy(x))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference(hidden, ids, weights, gate_up, down):  # type: ignore[no-untyped-def]
    """fp64 loop over the kept pairs, transformers layout gate_up (E, 2I, H), down (E, H, I)."""
    out = np.zeros(hidden.shape, "float64")
    inter = down.shape[2]
    for t in range(hidden.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if e == gate_up.shape[0]:
                continue
            h = gate_up[e].astype("float64") @ hidden[t]
            out[t] += weights[t, slot] * (down[e] @ (silu(h[:inter]) * h[inter:]))
    return out


def case(seed: int, tokens: int = 10, hidden: int = 12, inter: int = 20, experts: int = 6, k: int = 3):  # type: ignore[no-untyped-def]
    """Routing with some tokens keeping nothing and experts 4 and 5 getting no token."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((tokens, hidden)).astype("float32")
    ids = g.integers(0, experts - 2, (tokens, k))
    ids = np.stack([g.permutation(experts - 2)[:k] for _ in range(tokens)])  # unique per token
    counts = g.integers(0, k + 1, tokens)
    counts[0], counts[1] = 0, k
    keep = np.arange(k)[None] < counts[:, None]
    ids = np.where(keep, ids, experts).astype("int32")
    w = np.where(keep, g.random((tokens, k)), 0.0).astype("float32")
    gate_up = (g.standard_normal((experts, 2 * inter, hidden)) * 0.3).astype("float32")
    down = (g.standard_normal((experts, hidden, inter)) * 0.3).astype("float32")
    return x, ids, w, gate_up, down


def banks(gate_up: np.ndarray, down: np.ndarray) -> dict[str, dk.SwiGLUBank]:
    inter = down.shape[2]
    xw_gate_up = gate_up.transpose(0, 2, 1)  # (E, H, 2I)
    return {
        "transposed": dk.SwiGLUBank(gate_up=gate_up, down=down, transposed=True),
        "fused": dk.SwiGLUBank(gate_up=np.ascontiguousarray(xw_gate_up), down=down.transpose(0, 2, 1).copy()),
        "separate": dk.SwiGLUBank(
            gate=xw_gate_up[..., :inter].copy(),
            up=xw_gate_up[..., inter:].copy(),
            down=down.transpose(0, 2, 1).copy(),
        ),
    }


def methods() -> list[str]:
    return ["auto", "sorted", "dense"] + ([NATIVE_METHOD] if NATIVE_METHOD else [])


def traced(fn):  # type: ignore[no-untyped-def]
    """``fn`` compiled by the backend (jax.jit / tf.function), or None on other backends."""
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return None


@pytest.mark.parametrize("layout", ["transposed", "fused", "separate"])
@pytest.mark.parametrize("method", methods())
def test_experts_forward_matches_fp64_reference(layout, method):  # type: ignore[no-untyped-def]
    x, ids, w, gate_up, down = case(1)
    bank = banks(gate_up, down)[layout]
    counter = dk.PairCounter()
    out = dk.experts_forward(keras.ops.convert_to_tensor(x), ids, w, bank, method=method, counter=counter)
    np.testing.assert_allclose(np_(out), reference(x, ids, w, gate_up, down), rtol=0, atol=1e-5)
    kept = int((ids < 6).sum())
    assert counter.tokens == 10 and counter.calls == 1
    assert counter.executed_pairs == (10 * 6 if method == "dense" else kept)
    assert np_(out)[0].tolist() == [0.0] * 12  # token 0 kept no expert


def test_experts_forward_traced_matches_eager():  # type: ignore[no-untyped-def]
    x, ids, w, gate_up, down = case(2)
    bank = banks(gate_up, down)["transposed"]
    fn = traced(lambda a, b, c: dk.experts_forward(a, b, c, bank))
    if fn is None:
        pytest.skip(f"no tracing compiler for the {BACKEND} backend")
    out = fn(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(ids), keras.ops.convert_to_tensor(w))
    np.testing.assert_allclose(np_(out), reference(x, ids, w, gate_up, down), rtol=0, atol=1e-5)
    with pytest.raises(Exception, match=r"cannot run while tracing") as info:  # TF: a StagingError
        traced(lambda a, b, c: dk.experts_forward(a, b, c, bank, method="sorted"))(
            keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(ids), keras.ops.convert_to_tensor(w)
        )
    assert "BackendUnavailableError" in str(info.value) or isinstance(info.value, dmr.BackendUnavailableError)


def test_all_sentinel_routing_gives_zeros():  # type: ignore[no-untyped-def]
    x, ids, w, gate_up, down = case(3)
    bank = banks(gate_up, down)["transposed"]
    for method in methods():
        out = dk.experts_forward(x, np.full_like(ids, 6), np.zeros_like(w), bank, method=method)
        assert np.count_nonzero(np_(out)) == 0 and np_(out).shape == x.shape


def test_experts_forward_rejects_bad_inputs():  # type: ignore[no-untyped-def]
    x, ids, w, gate_up, down = case(4)
    bank = banks(gate_up, down)["transposed"]
    with pytest.raises(dmr.RoutingInputError, match="expects hidden"):
        dk.experts_forward(x[None], ids, w, bank)
    with pytest.raises(dmr.RoutingInputError, match="expects hidden"):
        dk.experts_forward(x, ids, w[:, :2], bank)
    with pytest.raises(dmr.RoutingInputError, match="hidden size"):
        dk.experts_forward(x[:, :5], ids, w, bank)
    with pytest.raises(dmr.RoutingInputError, match="expert ids"):
        dk.experts_forward(x, ids + 7, w, bank, method="sorted")
    with pytest.raises(dmr.RoutingInputError, match="method"):
        dk.experts_forward(x, ids, w, bank, method="fast")
    other = {"tensorflow": "ragged_dot", "jax": "segments"}.get(BACKEND, "segments")
    with pytest.raises(dmr.BackendUnavailableError, match=other):
        resolve_method(other, keras.ops.convert_to_tensor(x))
    with pytest.raises(dmr.RoutingInputError, match="gate_up, or both"):
        dk.SwiGLUBank(down=down)


def test_layer_reproduces_shared_layer_vector():  # type: ignore[no-untyped-def]
    z = LAYER
    policy = policy_from_dict(json.loads(str(z["policy"])))
    experts, hidden = z["router"].shape
    layer = dk.DynamicMoE(experts, hidden, z["down"].shape[2], native_k=int(z["native_k"]), policy=policy)
    layer.build((None, hidden))
    layer.router.assign(z["router"])
    layer.gate_up.assign(z["gate_up"])
    layer.down.assign(z["down"])
    for method in methods():
        layer.method = method
        np.testing.assert_allclose(np_(layer(z["hidden"])), z["out"], rtol=0, atol=1e-5)
    r = dk.route(
        keras.ops.softmax(z["hidden"] @ z["router"].T), policy, native_k=int(z["native_k"]), normalize="sum"
    )
    np.testing.assert_array_equal(np_(r.ids), z["ids"])
    np.testing.assert_allclose(np_(r.weights), z["weights"], rtol=0, atol=1e-6)
    assert (z["counts"] == 0).any() and not (z["ids"] == 7).any()  # no-expert tokens, token-less expert


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
@pytest.mark.parametrize("policy", [dmr.StaticTopK(), dmr.TopP(p=0.6), dmr.RelativeThreshold(beta=0.5)])
def test_layer_from_transformers_block_matches_patched_torch(family, policy):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), dmr.patched(model, policy) as handle:
        expected = block(x)
        expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
        torch_pairs = handle.executed_pairs()
    layer = dk.DynamicMoE.from_transformers(block, policy, layer_index=0)
    out = layer(x.numpy())
    np.testing.assert_allclose(np_(out), expected, rtol=0, atol=1e-5)
    assert layer.counter.executed_pairs == torch_pairs
    assert layer.normalize == ("none" if family == "olmoe" else "sum")


def test_layer_config_round_trip_and_saving(tmp_path):  # type: ignore[no-untyped-def]
    policy = dmr.PerLayer(dmr.TopP(p=0.6), {3: dmr.RelativeThreshold(beta=0.4, max_k=3)})
    layer = dk.DynamicMoE(8, 16, 24, native_k=2, policy=policy, normalize="none", layer_index=3, name="moe")
    x = np.random.default_rng(0).standard_normal((3, 4, 16)).astype("float32")
    out = np_(layer(x))
    clone = dk.DynamicMoE.from_config(json.loads(json.dumps(layer.get_config())))
    assert clone.policy == policy and clone.normalize == "none" and clone.layer_index == 3
    clone.build((None, 16))
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np_(clone(x)), out)
    model = keras.Sequential([keras.Input((4, 16)), layer])
    path = tmp_path / "moe.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[-1].policy == policy
    np.testing.assert_array_equal(np_(loaded(x)), out)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"intermediate_size": True}, "intermediate_size"),
        ({"normalize": "softmax"}, "normalize"),
        ({"method": "fast"}, "method"),
        ({"policy": "top_p"}, "policy"),
        ({"policy": dmr.TopP(p=0.5, max_k=9)}, "max_k"),
    ],
)
def test_layer_rejects_bad_arguments(kwargs, field):  # type: ignore[no-untyped-def]
    args = {"num_experts": 8, "hidden_size": 16, "intermediate_size": 24, "native_k": 2, **kwargs}
    with pytest.raises(dmr.PolicyError) as info:
        dk.DynamicMoE(**args)
    assert info.value.field == field


def test_layer_rejects_unsupported_transformers_block():  # type: ignore[no-untyped-def]
    model = tiny_model("qwen2_moe")
    with pytest.raises(dmr.UnsupportedModelError, match="Qwen2MoeSparseMoeBlock"):
        dk.DynamicMoE.from_transformers(model.model.layers[0].mlp)


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [({"method": "sorted"}, {"backend": "dense"}, "method= and backend="),
     ({"layer_index": 1}, {"layer": 2}, "layer_index= and layer=")],
)  # fmt: skip
def test_old_and_new_argument_names_together_are_refused(old, new, match):  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=match):
        dk.DynamicMoE(8, 16, 24, native_k=2, **old, **new)
