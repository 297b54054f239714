"""keras-hub models: patch / unpatch / profile, per instance, atomic and reversible (this process's
Keras backend; tests/test_keras_backends.py reruns this module on the others)."""

from __future__ import annotations

import numpy as np
import pytest

import dynamic_moe_router as dmr

keras = pytest.importorskip("keras")
pytest.importorskip("keras_hub")
dk = pytest.importorskip("dynamic_moe_router.keras")
from dynamic_moe_router.keras.tiny import tiny_hub_backbone  # noqa: E402

SUPPORTED = ["mixtral", "qwen_moe", "qwen3_moe", "qwen3_5_moe"]


def np_(x):  # type: ignore[no-untyped-def]
    return np.asarray(keras.ops.convert_to_numpy(x))


def inputs(seed: int = 0, batch: int = 2, length: int = 9) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(seed).integers(0, 64, (batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


@pytest.fixture(scope="module")
def backbones():  # type: ignore[no-untyped-def]
    return {family: tiny_hub_backbone(family) for family in SUPPORTED}


@pytest.mark.parametrize("family", SUPPORTED)
def test_static_top_k_reproduces_and_unpatch_restores_exactly(backbones, family):  # type: ignore[no-untyped-def]
    model = backbones[family]
    x = inputs()
    reference = np_(model(x))
    handle = dk.patch(model, dmr.StaticTopK())
    assert handle.family == family and dk.get_patch(model) is handle
    np.testing.assert_allclose(np_(model(x)), reference, rtol=0, atol=1e-5)
    layers = handle.layers
    native = sum(2 * 9 * layer.native_k for layer in layers)
    assert handle.executed_pairs() == native
    dk.unpatch(model)
    assert dk.get_patch(model) is None and not handle.active
    assert all("call" not in vars(layer.block) for layer in layers)
    np.testing.assert_array_equal(np_(model(x)), reference)


@pytest.mark.parametrize("family", SUPPORTED)
def test_dynamic_policy_computes_fewer_pairs_and_profiles_them(backbones, family):  # type: ignore[no-untyped-def]
    model = backbones[family]
    x = inputs(1)
    with dk.patched(model, dmr.RelativeThreshold(beta=0.9)) as handle:
        with dk.profile(model) as report:
            model(x)
        d = report.to_dict()
    assert d["family"] == family and d["tokens"] == 18
    assert d["executed_pairs"] == d["kept_pairs"] == handle.executed_pairs()
    assert d["executed_pairs"] < d["native_pairs"] == sum(18 * layer.native_k for layer in handle.layers)
    assert sum(d["k_histogram"].values()) == 18 * len(handle.layers)
    assert 0 < d["routed_flop_reduction"] < 1 and d["dense_flops_measured"] is False
    assert dk.get_patch(model) is None


def test_compiled_predict_follows_patch_set_policy_and_unpatch(backbones):  # type: ignore[no-untyped-def]
    model = backbones["mixtral"]
    x = inputs(2)
    reference = np_(model.predict(x, verbose=0))
    with dk.patched(model, dmr.StaticTopK()) as handle:
        np.testing.assert_allclose(np_(model.predict(x, verbose=0)), reference, rtol=0, atol=1e-5)
        handle.set_policy(dmr.StaticTopK(k=1))
        eager = np_(model(x))
        before = handle.executed_pairs()
        np.testing.assert_allclose(np_(model.predict(x, verbose=0)), eager, rtol=0, atol=1e-5)
        assert handle.executed_pairs() - before == 18 * 1 * len(handle.layers)  # counted in the compiled call
        assert np.abs(eager - reference).max() > 1e-3  # k=1 really changed the routing
    np.testing.assert_allclose(np_(model.predict(x, verbose=0)), reference, rtol=0, atol=1e-6)


def test_causal_lm_task_model_is_patched_through_its_backbone():  # type: ignore[no-untyped-def]
    import keras_hub

    lm = keras_hub.models.MixtralCausalLM(backbone=tiny_hub_backbone("mixtral", seed=3), preprocessor=None)
    x = inputs(3)
    reference = np_(lm(x))
    with dk.patched(lm, dmr.StaticTopK()) as handle:
        np.testing.assert_allclose(np_(lm(x)), reference, rtol=0, atol=1e-5)
        assert [layer.index for layer in handle.layers] == [0, 1]
        assert dk.get_patch(lm.backbone) is handle  # the backbone knows it is patched
        with pytest.raises(dmr.AlreadyPatchedError):
            dk.patch(lm.backbone, dmr.TopP(p=0.5))
    np.testing.assert_array_equal(np_(lm(x)), reference)
    assert dk.get_patch(lm) is None and dk.get_patch(lm.backbone) is None


def test_already_patched_replace_and_not_patched(backbones):  # type: ignore[no-untyped-def]
    model = backbones["qwen3_moe"]
    first = dk.patch(model, dmr.TopP(p=0.5))
    try:
        with pytest.raises(dmr.AlreadyPatchedError, match="already patched"):
            dk.patch(model, dmr.StaticTopK())
        assert dk.get_patch(model) is first and first.active
        second = dk.patch(model, dmr.StaticTopK(), replace=True)
        assert not first.active and dk.get_patch(model) is second
        with pytest.raises(dmr.NotPatchedError):
            first.unpatch()
    finally:
        dk.unpatch(model)
    with pytest.raises(dmr.NotPatchedError, match="not patched"):
        dk.unpatch(model)
    with pytest.raises(dmr.NotPatchedError, match="not patched"), dk.profile(model):
        pass


def test_policy_errors_change_nothing(backbones):  # type: ignore[no-untyped-def]
    model = backbones["mixtral"]
    x = inputs(4)
    reference = np_(model(x))
    bad = [
        dmr.PerLayer(dmr.TopP(p=0.5), {1: dmr.TopP(p=0.5, max_k=9)}),  # layer 1 fails after layer 0 fits
        dmr.PerLayer(dmr.TopP(p=0.5), {5: dmr.TopP(p=0.5)}),  # no layer 5
        "top_p",
    ]
    for policy in bad:
        with pytest.raises(dmr.PolicyError):
            dk.patch(model, policy)  # type: ignore[arg-type]
        assert dk.get_patch(model) is None
        assert all("call" not in vars(layer) for layer in model._flatten_layers())
    with pytest.raises(dmr.PolicyError, match="method"):
        dk.patch(model, method="fast")
    with dk.patched(model, dmr.TopP(p=0.5)) as handle:
        with pytest.raises(dmr.PolicyError):
            handle.set_policy(dmr.PerLayer(dmr.TopP(p=0.5), {1: dmr.StaticTopK(k=9)}))
        assert handle.policy == dmr.TopP(p=0.5)
    np.testing.assert_array_equal(np_(model(x)), reference)


def test_patching_is_per_instance(backbones):  # type: ignore[no-untyped-def]
    patched_model, other = backbones["mixtral"], tiny_hub_backbone("mixtral", seed=5)
    x = inputs(5)
    reference = np_(other(x))
    with dk.patched(patched_model, dmr.StaticTopK(k=1)):
        assert dk.get_patch(other) is None
        np.testing.assert_array_equal(np_(other(x)), reference)


@pytest.mark.parametrize(
    ("family", "error", "match"),
    [
        ("gpt_oss", dmr.UnsupportedModelError, "GptOssSparseMoeBlock"),
        ("qwen3", dmr.NoMoELayersError, "no sparse MoE block"),
    ],
)
def test_unsupported_keras_hub_models(family, error, match):  # type: ignore[no-untyped-def]
    model = tiny_hub_backbone(family)
    with pytest.raises(error, match=match):
        dk.patch(model, dmr.TopP(p=0.5))
    assert dk.get_patch(model) is None


def test_not_a_keras_hub_model():  # type: ignore[no-untyped-def]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(dmr.UnsupportedModelError, match="not a keras-hub"):
        dk.patch(model)


def test_training_mode_is_refused(backbones):  # type: ignore[no-untyped-def]
    model = backbones["qwen3_moe"]
    with dk.patched(model, dmr.TopP(p=0.5)), pytest.raises(dmr.UnsupportedModeError, match="inference only"):
        model(inputs(6), training=True)


def test_greedy_generate_with_static_top_k_is_unchanged():  # type: ignore[no-untyped-def]
    import keras_hub

    lm = keras_hub.models.MixtralCausalLM(backbone=tiny_hub_backbone("mixtral", seed=7), preprocessor=None)
    lm.compile(sampler="greedy")
    ids = np.array([[5, 6, 7, 0, 0, 0, 0, 0]], "int32")
    x = {"token_ids": ids, "padding_mask": (ids > 0).astype("int32")}
    reference = np_(lm.generate(x, stop_token_ids=None)["token_ids"])
    with dk.patched(lm, dmr.StaticTopK()) as handle:
        np.testing.assert_array_equal(np_(lm.generate(x, stop_token_ids=None)["token_ids"]), reference)
        assert handle.executed_pairs() > 0  # counted inside the compiled generate loop
    np.testing.assert_array_equal(np_(lm.generate(x, stop_token_ids=None)["token_ids"]), reference)
