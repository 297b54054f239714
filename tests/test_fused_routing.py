"""The fused routing kernel against ``dmr.route`` for every policy, and the patch option around it.

On CPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py); with a
GPU ``tests/test_cuda.py`` runs it compiled. Policies the kernel does not cover must say so
(:func:`layer_reason`), and every registered policy is one or the other: a policy added later
without a case here fails ``test_every_registered_policy_is_fused_or_says_why``.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.errors import BackendUnavailableError, PolicyError
from dynamic_moe_router.hf.fused_routing import FUSED_POLICIES, fused_reason, softmax_route
from dynamic_moe_router.hf.tiny import tiny_model
from dynamic_moe_router.policies import POLICY_REGISTRY

pytest.importorskip("triton")
needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the fused routing kernel needs CUDA or TRITON_INTERPRET=1",
)

#: policies the kernel covers, with settings that keep different numbers of experts per token
FUSED_CASES: dict[str, list[dmr.RoutingPolicy]] = {
    "static_top_k": [dmr.StaticTopK(), dmr.StaticTopK(k=1)],
    "top_p": [dmr.TopP(p=0.5), dmr.TopP(p=0.9, min_k=2, max_k=6)],
    "relative_threshold": [dmr.RelativeThreshold(beta=0.3), dmr.RelativeThreshold(beta=0.7, max_k=5)],
    "entropy": [dmr.EntropyAdaptive(low=0.2, high=0.9), dmr.EntropyAdaptive(min_k=2, max_k=6)],
}
#: the other registered policies, one instance each: they must run the ordinary routing
OTHER_CASES: dict[str, dmr.RoutingPolicy] = {
    "batch_aware": dmr.BatchAware(dmr.TopP(p=0.5)),
    "tile_aware": dmr.TileAware(dmr.TopP(p=0.5)),
}


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _spy(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Record every fused-kernel routing call of a patched model (the number of tokens)."""
    import dynamic_moe_router.hf.patching as patching

    calls: list[int] = []
    real = patching.softmax_route

    def spy(logits, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(int(logits.shape[0]))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(patching, "softmax_route", spy)
    return calls


def test_every_registered_policy_is_fused_or_says_why():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    covered = {cls.type_name for cls in FUSED_POLICIES}  # type: ignore[attr-defined]
    for name, cls in POLICY_REGISTRY.items():
        if cls in FUSED_POLICIES:
            assert name in FUSED_CASES, f"fused policy {name} has no case in FUSED_CASES"
            assert all(r is None for r in fused_reason(model, FUSED_CASES[name][0]))
        elif name in OTHER_CASES:
            reasons = fused_reason(model, OTHER_CASES[name])
            assert all(r is not None and f"policy {name} is not covered" in r for r in reasons)
        else:  # e.g. learned and per_layer: checked below through the patch
            assert name in {"learned", "per_layer"}, f"policy {name} is neither fused nor in OTHER_CASES"
    assert covered == set(FUSED_CASES)


def _reference(logits: torch.Tensor, policy: dmr.RoutingPolicy, native_k: int, renorm: bool):  # type: ignore[no-untyped-def]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return dmr.route(probs, policy, native_k=native_k, normalize="sum" if renorm else "none")


@needs_kernel
@pytest.mark.parametrize("name", list(FUSED_CASES))
@pytest.mark.parametrize(("tokens", "experts", "native_k"), [(1, 8, 2), (37, 8, 2), (70, 64, 8), (5, 60, 4)])
@pytest.mark.parametrize("renorm", [True, False])
def test_kernel_matches_route(name, tokens, experts, native_k, renorm):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(tokens * 1000 + experts)
    logits = (torch.randn(tokens, experts, generator=gen) * 2.0).to(_device())  # (T, E)
    for policy in FUSED_CASES[name]:
        k_min, k_max = policy.k_range(native_k, experts)
        ids, weights = softmax_route(logits, policy, k_min, k_max, renorm, torch.float32)
        ref = _reference(logits, policy, native_k, renorm)
        assert torch.equal(ids.cpu(), ref.ids.cpu()), policy  # the same experts, in the same slots
        # the kernel's exp and sums are Triton's: the weights agree to a few fp32 ulps
        torch.testing.assert_close(weights.cpu(), ref.weights.cpu(), rtol=1e-5, atol=1e-7)
        assert int((ids < experts).sum()) == int(ref.counts.sum())


@needs_kernel
def test_kernel_writes_the_weights_dtype_and_handles_no_tokens():  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(4)  # bf16 logits with no exact ties in a row (checked below)
    logits = torch.randn(9, 8, generator=gen).to(torch.bfloat16).to(_device())
    assert all(len(set(row)) == 8 for row in logits.float().tolist())
    ids, weights = softmax_route(logits, dmr.TopP(p=0.6), 1, 2, True, torch.bfloat16)
    ref = _reference(logits, dmr.TopP(p=0.6), 2, True)
    assert weights.dtype == torch.bfloat16 and torch.equal(ids.cpu(), ref.ids.cpu())
    torch.testing.assert_close(weights.float().cpu(), ref.weights.to(torch.bfloat16).float().cpu())
    empty_ids, empty_w = softmax_route(logits[:0], dmr.TopP(p=0.6), 1, 2, True, torch.float32)
    assert empty_ids.shape == (0, 2) and empty_w.shape == (0, 2)


@needs_kernel
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
def test_patched_model_with_fused_routing_matches_the_ordinary_routing(family, monkeypatch):  # type: ignore[no-untyped-def]
    model = tiny_model(family).to(_device())
    x = torch.randint(3, model.config.vocab_size, (2, 11), device=_device())
    policy = dmr.PerLayer(dmr.TopP(p=0.6), {0: dmr.RelativeThreshold(beta=0.4)})
    with torch.no_grad(), dmr.patched(model, policy), dmr.profile(model) as plain_report:
        plain = model(x).logits
    calls = _spy(monkeypatch)
    fused_patch = dmr.patched(model, policy, fused_routing=True)
    with torch.no_grad(), fused_patch as handle, dmr.profile(model) as fused_report:
        assert all(r.fused_reason is None for r in handle.routers)
        fused = model(x).logits
    assert len(calls) == len(handle.routers)  # every layer ran the kernel
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused_report.to_dict()["routed_flop_reduction"] == plain_report.to_dict()["routed_flop_reduction"]


@needs_kernel
def test_uncovered_layers_are_named_and_run_the_ordinary_routing():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral").to(_device())
    x = torch.randint(3, model.config.vocab_size, (1, 7), device=_device())
    policy = dmr.BatchAware(dmr.TopP(p=0.5))
    with dmr.patched(model, policy):
        plain = model(x).logits
    with pytest.warns(
        UserWarning, match=r"does not cover every layer: policy batch_aware .*MoE layers \[0, 1\]"
    ):
        handle = dmr.patch(model, policy, fused_routing=True)
    try:
        assert all("batch_aware" in (r.fused_reason or "") for r in handle.routers)
        assert torch.equal(model(x).logits, plain)  # the ordinary routing, bit for bit
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            handle.set_policy(dmr.TopP(p=0.5))  # covered: no warning
        assert all(r.fused_reason is None for r in handle.routers)
        with pytest.warns(UserWarning, match=r"policy batch_aware is not covered"):
            handle.set_policy(policy)
    finally:
        handle.unpatch()


def test_fused_routing_refuses_what_it_cannot_do(monkeypatch):  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    with pytest.raises(PolicyError, match="fused_routing must be True or False"):
        dmr.patch(model, dmr.TopP(p=0.5), fused_routing="yes")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="choose one"):
        dmr.patch(model, dmr.TopP(p=0.5), fused_routing=True, compile_routing=True)
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"), warnings.catch_warnings():
            warnings.simplefilter("error")
            dmr.patch(model, dmr.TopP(p=0.5), fused_routing=True)
    assert dmr.get_patch(model) is None  # nothing half-applied


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_set_policy_checks_the_device_of_newly_covered_layers(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model("mixtral")
    uncovered = dmr.BatchAware(dmr.TopP(p=0.5))
    with pytest.warns(UserWarning, match="not covered"):
        handle = dmr.patch(model, uncovered, fused_routing=True)  # no covered layer: nothing to check
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        handle.set_policy(dmr.TopP(p=0.5))  # every layer now covered, on a CPU: refused up front
    assert handle.policy is uncovered and all(r.policy is uncovered for r in handle.routers)
    handle.unpatch()


def test_policy_rule_names_the_covered_policies():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.fused_routing import policy_rule

    assert policy_rule(dmr.EntropyAdaptive(low=0.2, high=0.7))[0] == 3
    with pytest.raises(PolicyError, match=r"batch_aware is not covered by the fused routing kernel \(cov"):
        policy_rule(dmr.BatchAware(dmr.TopP(p=0.5)))


def test_other_families_name_their_scorer():  # type: ignore[no-untyped-def]
    reasons = fused_reason(tiny_model("deepseek_v3"), dmr.TopP(p=0.5))
    assert reasons and all(r is not None and "plain softmax routers" in r for r in reasons)


@needs_kernel
def test_a_model_moved_off_the_gpu_after_patching_routes_the_ordinary_way():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    x = torch.randint(3, model.config.vocab_size, (1, 6))
    with dmr.patched(model, dmr.TopP(p=0.5)):
        plain = model(x).logits
    handle = dmr.patch(model.to(_device()), dmr.TopP(p=0.5), fused_routing=True)
    try:
        model.cpu()
        for router in handle.routers:
            router._interpret = False  # CPU tensors and no interpreter: the kernel cannot run them
        assert torch.equal(model(x).logits, plain)
    finally:
        handle.unpatch()


@needs_kernel
def test_nan_rows_keep_nothing_as_the_reference_does():  # type: ignore[no-untyped-def]
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(5)).to(_device())
    logits[1] = float("nan")
    for policy in (dmr.StaticTopK(), dmr.TopP(p=0.5)):
        ids, weights = softmax_route(logits, policy, *policy.k_range(2, 8), True, torch.float32)
        ref = dmr.route(torch.softmax(logits, -1), policy, native_k=2, normalize="sum", validate=False)
        assert torch.equal(ids.cpu(), ref.ids.cpu()) and ids[1].tolist() == [8, 8]
        assert torch.equal(weights[1].cpu(), torch.zeros(2))  # exactly zero at sentinels
        torch.testing.assert_close(
            weights[[0, 2, 3]].cpu(), ref.weights[[0, 2, 3]].cpu(), rtol=1e-5, atol=1e-7
        )


@needs_kernel
def test_gradients_take_the_ordinary_routing(monkeypatch):  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral").to(_device())
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(3, model.config.vocab_size, (1, 5), generator=gen).to(_device())
    calls = _spy(monkeypatch)
    # two kept experts per token: renormalised weights that depend on the router (TopP may keep one
    # expert, whose weight 1.0 has no gradient)
    with dmr.patched(model, dmr.StaticTopK(), fused_routing=True):
        model(x).logits.sum().backward()  # grad enabled, weights require grad: no kernel
        assert calls == []
        router = model.model.layers[0].mlp.gate
        assert router.weight.grad is not None and bool(router.weight.grad.abs().sum() > 0)
        with torch.no_grad():
            model(x)
        assert len(calls) == 2  # inference: both layers ran the kernel


@needs_kernel
@pytest.mark.parametrize("family", ["deepseek_v3", "hunyuan_v1_moe", "gemma4_text"])
def test_families_without_a_plain_softmax_router_warn_and_route_the_ordinary_way(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family).to(_device())
    x = torch.randint(3, model.config.vocab_size, (1, 6), device=_device())
    with torch.no_grad(), dmr.patched(model, dmr.TopP(p=0.5)):
        plain = model(x).logits
    with pytest.warns(UserWarning, match="plain softmax routers"):
        handle = dmr.patch(model, dmr.TopP(p=0.5), fused_routing=True)
    try:
        with torch.no_grad():
            assert torch.equal(model(x).logits, plain)
    finally:
        handle.unpatch()
