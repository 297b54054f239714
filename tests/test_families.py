"""Every supported family: equivalence with the native policy, real skipping, exact undo."""

from __future__ import annotations

import copy

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.families import FAMILIES
from dynamic_moe_router.hf.layers import find_moe_layers
from dynamic_moe_router.hf.tiny import tiny_model

FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):  # type: ignore[no-untyped-def]
    return request.param


def tokens(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded batch of two prompts of different lengths (pad id 0)."""
    ids = tokens(2, 9, seed=1)
    mask = torch.ones_like(ids)
    ids[1, :4] = 0
    mask[1, :4] = 0
    return ids, mask


@torch.no_grad()
@pytest.mark.parametrize("backend", ["loop", "grouped"])
def test_static_policy_reproduces_fp32_logits(family, backend):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    x = tokens()
    ref = model(x).logits
    with dmr.profile(model, count_dense=False) as native:  # unpatched: the native routing's pairs
        model(x)
    with dmr.patched(model, dmr.StaticTopK(), backend=backend) as handle:
        out = model(x).logits
        executed, zero = handle.executed_pairs(), handle.zero_expert_pairs()
    assert (out - ref).abs().max().item() <= 1e-5
    layers = find_moe_layers(model)[0]
    # every native slot either ran a real expert or went to a zero-computation expert (longcat_flash)
    assert executed + zero == sum(x.numel() * layer.native_k for layer in layers)
    n = native.to_dict()
    assert (executed, zero) == (n["executed_pairs"], n["zero_expert_pairs"])
    assert zero == n["native_zero_expert_pairs"]
    assert zero == 0 or any(layer.zero_experts for layer in layers)


@torch.no_grad()
def test_static_policy_reproduces_greedy_generate_with_padding(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    ids, mask = padded_batch()
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    with dmr.patched(model, dmr.StaticTopK()):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)
    assert (logits - model(input_ids=ids, attention_mask=mask).logits).abs().max().item() <= 1e-5


@torch.no_grad()
def test_dynamic_policy_runs_generate_and_skips_pairs(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    ids, mask = padded_batch()
    with dmr.patched(model, dmr.TopP(p=0.4)) as handle, dmr.profile(model) as report:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 6)
    d = report.to_dict()
    # executed pairs == the sum of kept counts seen at the experts' inputs, and fewer than native
    # (kept pairs routed to zero-computation experts run no GEMM: counted apart, never executed)
    assert d["executed_pairs"] + d["zero_expert_pairs"] == d["kept_pairs"]
    assert d["executed_pairs"] == handle.executed_pairs()
    assert d["zero_expert_pairs"] == handle.zero_expert_pairs()
    assert 0 < d["executed_pairs"] < d["native_pairs"] - d["native_zero_expert_pairs"]
    assert d["routed_flop_reduction"] > 0
    assert d["tokens"] == ids.numel() + 2 * 5  # prompt, then one token per decode step (6 - 1 steps)


@torch.no_grad()
def test_flop_counter_confirms_executed_pairs(family):  # type: ignore[no-untyped-def]
    """An independent count: the matmul FLOPs torch sees inside the experts == executed pairs x 6HI."""
    from dynamic_moe_router.hf.profiling import flop_counter  # torch's FlopCounterMode, no_grad-safe

    model = tiny_model(family)
    layers = find_moe_layers(model)[0]
    with dmr.patched(model, dmr.RelativeThreshold(beta=0.5), backend="loop") as handle:
        with flop_counter() as counter:
            model(tokens())
        per_module = counter.get_flop_counts()
        for layer, experts in zip(handle.layers, handle.experts, strict=False):
            name = f"{type(model).__name__}.{layer.path}.experts"
            measured = sum(per_module.get(name, {}).values())
            assert measured == experts.counter.executed_pairs * layer.flops_per_pair
    assert handle.executed_pairs() < sum(tokens().numel() * layer.native_k for layer in layers)


@torch.no_grad()
def test_unpatch_restores_outputs_and_state_dict_exactly(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    x = tokens()
    ref = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dicts = {name: set(m.__dict__) for name, m in model.named_modules()}
    handle = dmr.patch(model, dmr.EntropyAdaptive(min_k=1, max_k=3))
    model(x)
    assert dmr.get_patch(model) is handle
    dmr.unpatch(model)
    assert torch.equal(model(x).logits, ref)
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == dicts
    assert dmr.get_patch(model) is None


@torch.no_grad()
def test_patching_is_per_instance(family):  # type: ignore[no-untyped-def]
    a, b = tiny_model(family), tiny_model(family)
    x = tokens()
    ref = b(x).logits
    with dmr.patched(a, dmr.StaticTopK(k=1)):
        assert torch.equal(b(x).logits, ref)  # the other instance (same classes) is untouched
        assert not torch.allclose(a(x).logits, ref, atol=1e-5)


@torch.no_grad()
def test_repatching_replaces_the_policy(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    x = tokens()
    ref = model(x).logits
    dmr.patch(model, dmr.StaticTopK(k=1))
    with pytest.raises(dmr.AlreadyPatchedError, match="already patched"):
        dmr.patch(model, dmr.TopP(p=0.5))
    handle = dmr.patch(model, dmr.StaticTopK(), replace=True)
    assert (model(x).logits - ref).abs().max().item() <= 1e-5
    handle.set_policy(dmr.StaticTopK(k=1))
    assert handle.policy == dmr.StaticTopK(k=1)
    handle.set_policy(dmr.StaticTopK())
    assert (model(x).logits - ref).abs().max().item() <= 1e-5
    dmr.unpatch(model)
    assert torch.equal(model(x).logits, ref)


@torch.no_grad()
def test_bf16_is_as_accurate_as_native_bf16(family):  # type: ignore[no-untyped-def]
    x = tokens()
    exact = tiny_model(family)(x).logits
    model = tiny_model(family, dtype=torch.bfloat16)
    native = model(x).logits
    ref_gen = model.generate(x, max_new_tokens=6, do_sample=False)
    with dmr.patched(model, dmr.StaticTopK()):
        out = model(x).logits
        gen = model.generate(x, max_new_tokens=6, do_sample=False)
        with dmr.profile(model):
            model(x)
    assert out.dtype == torch.bfloat16
    native_err = (native.float() - exact).abs().max().item()
    patched_err = (out.float() - exact).abs().max().item()
    assert patched_err <= 1.5 * native_err + 1e-3
    assert torch.equal(gen, ref_gen)
    with dmr.patched(model, dmr.TopP(p=0.5)):
        assert torch.isfinite(model(x).logits).all()


@torch.no_grad()
def test_output_router_logits_and_aux_loss(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    x = tokens()
    ref = model(x, output_router_logits=True)
    with dmr.patched(model, dmr.StaticTopK()):
        same = model(x, output_router_logits=True)
    with dmr.patched(model, dmr.TopP(p=0.5)):
        dynamic = model(x, output_router_logits=True)
    if getattr(ref, "router_logits", None) is None:  # e.g. deepseek_v3 before transformers 5.18
        assert (
            getattr(same, "router_logits", None) is None and getattr(dynamic, "router_logits", None) is None
        )
        return
    assert len(same.router_logits) == len(dynamic.router_logits) == len(ref.router_logits) > 0
    # as accurate as the unpatched model against an fp64 run: past the first layer both fp32 runs carry
    # re-association noise that grows with depth and changes with the thread count (qwen3_next's
    # unpatched layer-2 logits differ by 1e-5 between 2 and 4 threads)
    exact_model = copy.deepcopy(model).double()
    exact_model.set_experts_implementation("eager")  # transformers' grouped_mm has no fp64
    exact = exact_model(x, output_router_logits=True).router_logits
    for a, b, e in zip(same.router_logits, ref.router_logits, exact, strict=True):
        native_err = (b.double() - e).abs().max().item()
        patched_err = (a.double() - e).abs().max().item()
        assert patched_err <= 2 * native_err + 1e-6, (patched_err, native_err)
    # the first MoE layer sees the same input under any policy, so its logits are identical
    torch.testing.assert_close(dynamic.router_logits[0], ref.router_logits[0], atol=0, rtol=0)
    if getattr(ref, "aux_loss", None) is not None:
        torch.testing.assert_close(same.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
        assert torch.isfinite(dynamic.aux_loss)


@torch.no_grad()
def test_accelerate_cpu_offload_hooks(family):  # type: ignore[no-untyped-def]
    from accelerate import cpu_offload

    model = tiny_model(family)
    x = tokens()
    ref = model(x).logits
    cpu_offload(model, execution_device=torch.device("cpu"))
    offloaded = model(x).logits
    # transformers' longcat_flash router reads router.classifier.weight without calling classifier,
    # so offloaded it reads the meta placeholder: its native output is undefined (it can differ per
    # call); the patched router loads the weight through the hook, so the patched output stays exact
    native_broken = {"longcat_flash"}
    layer = find_moe_layers(model)[0][0]
    # a router with no parameters of its own (hunyuan_v1_moe: its linear is the submodule `wg`)
    # carries no accelerate hook (its submodule does): then there is none to keep
    old = layer.router.__dict__.get("_old_forward")
    with dmr.patched(model, dmr.StaticTopK()) as handle:
        out = model(x).logits
        assert handle.executed_pairs() > 0  # our experts ran under the hook
    assert (out - ref).abs().max().item() <= 1e-5
    assert layer.router.__dict__.get("_old_forward") is old
    if family not in native_broken:
        assert torch.equal(model(x).logits, offloaded)


@torch.no_grad()
def test_accelerate_device_map_with_disk_offload(tmp_path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    x = tokens()
    ref = model(x).logits
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt",
        device_map=device_map,
        offload_folder=str(tmp_path / "offload"),
        dtype=torch.float32,
    )
    with dmr.patched(loaded, dmr.StaticTopK()) as handle:
        out = loaded(x).logits
    assert handle.executed_pairs() == 2 * x.numel() * 2
    assert (out - ref).abs().max().item() <= 1e-5


@torch.no_grad()
def test_per_layer_policy_applies_per_layer(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    layers = find_moe_layers(model)[0]
    first, second = layers[0].index, layers[1].index
    policy = dmr.PerLayer(dmr.StaticTopK(), {second: dmr.StaticTopK(k=1)})
    with dmr.patched(model, policy), dmr.profile(model, count_dense=False) as report:
        model(tokens())
    by_layer = {row["layer"]: row for row in report.to_dict()["layers"]}
    assert by_layer[first]["mean_k"] == layers[0].native_k
    assert by_layer[second]["mean_k"] == 1


def test_torch_compile_wrapper_is_unwrapped():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    compiled = torch.compile(model)  # not run: patching must reach the original module
    handle = dmr.patch(compiled, dmr.TopP(p=0.5))
    assert dmr.get_patch(model) is handle
    dmr.unpatch(compiled)
    assert dmr.get_patch(model) is None
