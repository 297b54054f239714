"""Bad input to patch(): typed errors, and a model left exactly as it was."""

from __future__ import annotations

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.tiny import tiny_model


def snapshot(model):  # type: ignore[no-untyped-def]
    return {name: set(m.__dict__) for name, m in model.named_modules()}


def test_unsupported_model_lists_the_families():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(dmr.UnsupportedModelError, match="'llama': it is not a supported MoE family") as info:
        dmr.patch(model)
    for family in dmr.supported_families():
        assert family in str(info.value)
    with pytest.raises(dmr.UnsupportedModelError, match="expected a transformers model"):
        dmr.patch("not a model")  # type: ignore[arg-type]
    with pytest.raises(dmr.UnsupportedModelError, match=r"has no config\.model_type"):
        dmr.patch(torch.nn.Linear(2, 2))


def test_model_without_moe_layers():  # type: ignore[no-untyped-def]
    model = tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(dmr.NoMoELayersError, match="no Qwen2MoeSparseMoeBlock block to patch"):
        dmr.patch(model)
    assert isinstance(dmr.NoMoELayersError("x"), dmr.UnsupportedModelError)


def test_policy_that_does_not_fit_leaves_the_model_untouched():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    before = snapshot(model)
    with pytest.raises(dmr.PolicyError, match=r"MoE layer 0 \(E=8, native k=2\).*max_k=9 exceeds") as info:
        dmr.patch(model, dmr.TopP(p=0.5, max_k=9))
    assert info.value.field == "max_k"
    assert snapshot(model) == before and dmr.get_patch(model) is None


def test_per_layer_override_of_a_dense_layer_is_refused():  # type: ignore[no-untyped-def]
    model = tiny_model("qwen2_moe")  # layer 1 is dense
    with pytest.raises(
        dmr.PolicyError, match=r"name layers \[1, 9\] that have no MoE block; the MoE layers are \[0, 2\]"
    ):
        dmr.patch(model, dmr.PerLayer(dmr.StaticTopK(), {1: dmr.TopP(p=0.5), 9: dmr.TopP(p=0.5)}))
    assert dmr.get_patch(model) is None


def test_per_layer_without_default_must_cover_every_moe_layer():  # type: ignore[no-untyped-def]
    model = tiny_model("qwen2_moe")  # MoE layers 0 and 2
    before = snapshot(model)
    with pytest.raises(
        dmr.PolicyError, match=r"MoE layer 2 .*layer 2 has no override and the policy has no default"
    ):
        dmr.patch(model, dmr.PerLayer(None, {0: dmr.TopP(p=0.5)}))
    assert snapshot(model) == before and dmr.get_patch(model) is None
    handle = dmr.patch(model, dmr.PerLayer(None, {0: dmr.TopP(p=0.5), 2: dmr.StaticTopK()}))
    assert dmr.get_patch(model) is handle
    dmr.unpatch(model)


def test_not_a_policy():  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyError, match="policy must be a RoutingPolicy"):
        dmr.patch(tiny_model("olmoe"), "top_p")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"renormalize": "yes"}, "renormalize must be"),
        ({"backend": "tensorrt"}, "backend must be one of"),
        ({"validate": 1}, "validate must be"),
    ],
)
def test_bad_options(kwargs, match):  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    with pytest.raises(dmr.PolicyError, match=match):
        dmr.patch(model, **kwargs)
    assert dmr.get_patch(model) is None


def test_explicit_backend_that_cannot_run_is_refused_at_patch_time():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    before = snapshot(model)
    with pytest.raises(dmr.BackendUnavailableError, match="needs CUDA tensors"):
        dmr.patch(model, backend="cuda")
    assert snapshot(model) == before


def test_unpatch_errors():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    with pytest.raises(dmr.NotPatchedError, match="is not patched"):
        dmr.unpatch(model)
    handle = dmr.patch(model)
    handle.unpatch()
    with pytest.raises(dmr.NotPatchedError, match="already undone"):
        handle.unpatch()


def test_set_policy_is_all_or_nothing():  # type: ignore[no-untyped-def]
    model = tiny_model("qwen2_moe")
    handle = dmr.patch(model, dmr.TopP(p=0.5))
    with pytest.raises(dmr.PolicyError):
        handle.set_policy(dmr.PerLayer(dmr.StaticTopK(), {2: dmr.StaticTopK(k=20)}))
    assert handle.policy == dmr.TopP(p=0.5)
    assert all(r.policy == dmr.TopP(p=0.5) for r in handle.routers)
    dmr.unpatch(model)


def test_nan_router_logits_name_the_layer():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight[0, 0] = float("nan")
    with (
        dmr.patched(model, dmr.TopP(p=0.5)),
        pytest.raises(dmr.NonFiniteRouterScoresError, match="MoE layer 1") as info,
    ):
        model(torch.tensor([[3, 4, 5]]))
    assert info.value.layer == 1 and info.value.bad_tokens == 3


def test_nan_with_validate_false_is_documented_behaviour():  # type: ignore[no-untyped-def]
    """validate=False skips the check; only the affected tokens are affected."""
    model = tiny_model("olmoe")
    x = torch.tensor([[3, 4, 5, 6]])
    with dmr.patched(model, dmr.TopP(p=0.5), validate=False):
        out = model(x).logits
    assert torch.isfinite(out).all()


def test_unknown_moe_like_blocks_need_strict_false():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    block = model.model.layers[1].mlp

    class CustomMoE(torch.nn.Module):
        def __init__(self, inner):  # type: ignore[no-untyped-def]
            super().__init__()
            self.gate, self.experts = inner.gate, inner.experts

        def forward(self, x):  # type: ignore[no-untyped-def]
            b, s, h = x.shape
            _, w, i = self.gate(x.view(-1, h))
            return self.experts(x.view(-1, h), i, w).view(b, s, h)

    model.model.layers[1].mlp = CustomMoE(block)
    with pytest.raises(dmr.UnsupportedModelError, match="Pass strict=False"):
        dmr.patch(model)
    assert dmr.get_patch(model) is None
    with pytest.warns(UserWarning, match="leaving unknown MoE-like blocks unpatched"):
        handle = dmr.patch(model, strict=False)
    assert handle.skipped == ["model.layers.1.mlp"] and [layer.index for layer in handle.layers] == [0]
    dmr.unpatch(model)


def test_patched_context_unpatches_on_error():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    with pytest.raises(ZeroDivisionError), dmr.patched(model, dmr.TopP(p=0.5)):
        1 / 0  # noqa: B018
    assert dmr.get_patch(model) is None


def test_failure_while_applying_rolls_everything_back(monkeypatch):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.hf.patching as patch_module

    model = tiny_model("qwen2_moe")
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        ref = model(x).logits
    before = snapshot(model)
    real_install = patch_module._install
    calls = []

    def flaky_install(module, fn):  # type: ignore[no-untyped-def]
        calls.append(module)
        if len(calls) == 3:  # after the first layer's router and experts were replaced
            raise RuntimeError("simulated failure")
        return real_install(module, fn)

    monkeypatch.setattr(patch_module, "_install", flaky_install)
    with pytest.raises(RuntimeError, match="simulated failure"):
        dmr.patch(model, dmr.TopP(p=0.5))
    assert snapshot(model) == before and dmr.get_patch(model) is None
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_replace_with_an_invalid_policy_keeps_the_old_patch():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    handle = dmr.patch(model, dmr.TopP(p=0.5))
    with pytest.raises(dmr.PolicyError):
        dmr.patch(model, dmr.StaticTopK(k=99), replace=True)
    assert dmr.get_patch(model) is handle and handle.active
    dmr.unpatch(model)


def test_an_expert_parallel_mark_without_sharded_weights_is_refused_with_a_typed_error():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.layers import find_moe_layers
    from dynamic_moe_router.hf.tiny import tiny_model

    model = tiny_model("olmoe")
    experts = find_moe_layers(model)[0][1].experts
    experts._is_expert_parallel = True  # transformers' mark, but the weights are plain tensors
    forwards = [layer.experts.forward for layer in find_moe_layers(model)[0]]
    message = r"MoE layer 1 .*expert-parallel but their weights are not sharded.*nothing was patched"
    with pytest.raises(dmr.ExpertParallelError, match=message):
        dmr.patch(model, dmr.TopP(p=0.5))
    assert dmr.get_patch(model) is None
    assert [layer.experts.forward for layer in find_moe_layers(model)[0]] == forwards
