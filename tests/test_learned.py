"""The learned allocator: policy contract, files, patching for every family, training, typed errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.layers import find_moe_layers
from dynamic_moe_router.hf.tiny import tiny_model
from dynamic_moe_router.learn import (
    AllocatorTraining,
    expert_means,
    fit_budget,
    fit_quantile_budget,
    measure_reduction,
    train_allocator,
    train_means,
    trainer,
)
from dynamic_moe_router.learn.trainer import _KL_CHUNK_ROWS, _ChunkedKL
from dynamic_moe_router.policies.learned import spread_keep

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def random_heads(model, seed: int = 0, scale: float = 1.0, k_max: int | None = None):  # type: ignore[no-untyped-def]
    """Keep-native heads plus random weights: masks that differ per token and layer."""
    base = dmr.LearnedAllocator.keep_native(model, k_max)
    g = torch.Generator().manual_seed(seed)
    assert base.params is not None
    weight = torch.randn(base.params["weight"].shape, generator=g) * scale
    bias = torch.randn(base.params["bias"].shape, generator=g)
    return dmr.LearnedAllocator(
        family=base.family,
        moe_layers=base.moe_layers,
        hidden_size=base.hidden_size,
        num_experts=base.num_experts,
        native_k=base.native_k,
        k_max=base.k_max,
        params={"weight": weight, "bias": bias},
    )


@pytest.mark.parametrize("family", dmr.supported_families())
def test_keep_native_heads_reproduce_the_unpatched_model(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    ids = torch.tensor([[3, 9, 4, 1, 7, 2]])
    before = model(ids).logits
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    pol = dmr.LearnedAllocator.keep_native(model)
    with dmr.patched(model, pol) as handle:
        after = model(ids).logits
        # zero-computation experts (longcat_flash) are kept but never executed: counted apart
        kept = handle.executed_pairs() + handle.zero_expert_pairs()
        assert kept == ids.numel() * sum(layer.native_k for layer in handle.layers)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), greedy)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # unpatch restores exactly


@pytest.mark.parametrize("family", dmr.supported_families())
def test_random_heads_run_generate_and_count_their_own_flops(family):  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    pol = random_heads(model)
    with dmr.patched(model, pol) as handle, dmr.profile(model) as report:
        out = model.generate(IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (1, IDS.shape[1] + 4)
    d = report.to_dict()
    tokens = d["tokens"]
    layer = handle.layers[0]
    per_token = 2 * (layer.hidden_size + pol.k_max + 1) * pol.k_max
    assert d["policy_flops"] == tokens * per_token * len(handle.layers)
    assert 0 < d["kept_pairs"] <= d["native_pairs"]
    assert d["k_histogram"].get("0", 0) == 0  # every token keeps at least one expert


def test_masks_need_not_be_prefixes():  # type: ignore[no-untyped-def]
    """A head that keeps only the second-ranked slot routes every token to its second expert."""
    model = tiny_model("mixtral")
    base = dmr.LearnedAllocator.keep_native(model)
    assert base.params is not None
    bias = torch.tensor([[-5.0, 5.0]]).expand_as(base.params["bias"]).clone()
    pol = dmr.LearnedAllocator(
        family=base.family, moe_layers=base.moe_layers, hidden_size=base.hidden_size,
        num_experts=base.num_experts, native_k=base.native_k, k_max=base.k_max,
        params={"weight": base.params["weight"], "bias": bias},
    )  # fmt: skip
    seen = []
    with dmr.patched(model, pol) as handle:
        router = handle.layers[0].router
        hook = router.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            model(IDS)
        finally:
            hook.remove()
        assert handle.executed_pairs() == IDS.numel() * len(handle.layers)
    logits_out, weights, ids = seen[0]
    second = torch.topk(torch.softmax(logits_out.float(), -1), 2, dim=-1).indices[:, 1]  # (T,)
    assert torch.equal(ids[:, 0], second)
    assert bool((ids[:, 1] == base.num_experts).all())  # sentinel after the one kept slot
    torch.testing.assert_close(weights[:, 0].float(), torch.ones(ids.shape[0]))  # mixtral renormalises


def test_save_load_round_trip(tmp_path):  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    pol = random_heads(model).with_offset(0.25)
    path = tmp_path / "alloc.json"
    pol.save(path)
    assert (tmp_path / "alloc.safetensors").is_file()
    loaded = dmr.load_policy(path)
    assert loaded == pol and loaded.sha256 == pol.sha256 and loaded.offset == 0.25
    assert loaded.params is not None and pol.params is not None
    assert torch.equal(loaded.params["weight"], pol.params["weight"])
    with dmr.patched(model, pol):
        a = model(IDS).logits
    with dmr.patched(model, loaded):
        b = model(IDS).logits
    assert torch.equal(a, b)
    data = json.loads(path.read_text())
    assert data["_type"] == "learned" and data["_data"]["weights"] == "alloc.safetensors"
    assert "params" not in data["_data"]


def test_corrupt_and_mismatched_files_raise_typed_errors(tmp_path):  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    pol = random_heads(model)
    path = tmp_path / "a.json"
    pol.save(path)
    weights = tmp_path / "a.safetensors"
    blob = weights.read_bytes()

    weights.write_bytes(blob[:-7])  # truncated
    with pytest.raises(dmr.PolicyFileError, match="corrupt"):
        dmr.load_policy(path)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(dmr.PolicyFileError, match="corrupt"):
        dmr.load_policy(path)
    random_heads(model, seed=1).save(tmp_path / "b.json")  # another policy's weights under this name
    weights.write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(dmr.PolicyFileError, match="SHA-256"):
        dmr.load_policy(path)
    weights.unlink()
    with pytest.raises(dmr.PolicyFileError, match="missing"):
        dmr.load_policy(path)
    weights.write_bytes(blob)
    data = json.loads(path.read_text())
    data["_data"]["weights"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(data))
    with pytest.raises(dmr.PolicyFileError, match="file name beside"):
        dmr.load_policy(path)
    data["_data"]["weights"] = "a.safetensors"
    data["_data"]["hidden_size"] = 64  # config no longer matches the tensors
    path.write_text(json.dumps(data))
    with pytest.raises(dmr.PolicyFileError, match="shapes"):
        dmr.load_policy(path)
    del data["_data"]["k_max"]
    path.write_text(json.dumps(data))
    with pytest.raises(dmr.PolicyFileError, match="missing"):
        dmr.load_policy(path)
    with pytest.raises(dmr.PolicyError, match=r"must not end in \.safetensors"):
        pol.save(tmp_path / "x.safetensors")


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (lambda: tiny_model("qwen3_moe"), "trained for a 'olmoe' model"),
        (lambda: tiny_model("olmoe", num_hidden_layers=3), "the model has MoE layers"),
        (lambda: tiny_model("olmoe", hidden_size=48), "hidden size"),
        (lambda: tiny_model("olmoe", num_experts=16), "E=16"),
    ],
)
def test_patching_a_model_the_heads_do_not_fit_raises_before_any_change(other, match):  # type: ignore[no-untyped-def]
    pol = random_heads(tiny_model("olmoe"))
    model = other()
    before = model(IDS).logits
    with pytest.raises(dmr.PolicyMismatchError, match=match):
        dmr.patch(model, pol)
    assert dmr.get_patch(model) is None
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    with dmr.patched(model, dmr.TopP(p=0.5)) as handle, pytest.raises(dmr.PolicyMismatchError):
        handle.set_policy(pol)  # set_policy validates the same way


def test_learned_policies_are_refused_where_the_router_input_is_not_seen():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    pol = random_heads(model)
    with pytest.raises(dmr.PolicyError, match="score policy"):
        dmr.PerLayer(dmr.StaticTopK(), {0: pol})
    with pytest.raises(dmr.PolicyError, match="router input"):
        dmr.route(torch.randn(4, 8), pol, native_k=2)
    with pytest.raises(dmr.PolicyError, match="needs its head weights"):
        dmr.LearnedAllocator(
            family="mixtral", moe_layers=(0,), hidden_size=32, num_experts=4, native_k=2, k_max=2
        )
    with pytest.raises(dmr.PolicyError, match="NaN"):
        bad = random_heads(model)
        assert bad.params is not None
        w = bad.params["weight"].clone()
        w[0, 0, 0] = float("nan")
        dmr.LearnedAllocator(
            family="mixtral", moe_layers=bad.moe_layers, hidden_size=32, num_experts=4, native_k=2, k_max=2,
            params={"weight": w, "bias": bad.params["bias"]},
        )  # fmt: skip


@pytest.mark.parametrize(
    ("family", "compensated"),
    [("mixtral", False), ("deepseek_v3", False), ("gpt_oss", False), ("phimoe", False), ("mixtral", True),
     ("olmoe", True), ("phimoe", True)],
)  # fmt: skip
def test_training_path_with_hard_masks_equals_the_inference_path(family, compensated):  # type: ignore[no-untyped-def]
    """The soft (straight-through) routing, fed the hard mask, gives the inference routing's output."""
    from dynamic_moe_router.learn import expert_means
    from dynamic_moe_router.learn.trainer import _TrainableHeads

    model = tiny_model(family)
    pol = random_heads(model, k_max=None)
    if compensated:
        pol = pol.with_means(expert_means(model, torch.randint(0, 64, (2, 9))))
    with dmr.patched(model, pol):
        expected = model(IDS).logits
    heads = _TrainableHeads(pol, seed=0)

    def hard_mask(h, ranked_probs, probs, layer):  # type: ignore[no-untyped-def]
        keep = pol.keep_mask(h, ranked_probs, probs, layer).float()
        return keep + 0.0 * heads.weight.sum()  # float: the training path

    heads.keep_mask = hard_mask  # type: ignore[method-assign]
    with dmr.patched(model, heads, validate=False):
        got = model(IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_changes_nothing_the_user_owns_and_lands_the_budget():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = torch.randint(0, 64, (16, 33), generator=torch.Generator().manual_seed(0))
    cfg = AllocatorTraining(target_reduction=0.4, steps=20, batch_windows=4, offset_iterations=12)
    pol = train_allocator(model, data, data, cfg)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert dmr.get_patch(model) is None
    model.eval()
    reached = measure_reduction(model, pol, data)
    assert reached == pytest.approx(pol.record["budget_reduction"]) if pol.record else False
    assert abs(reached - 0.4) < 0.05  # 16 x 32 tokens: coarse, but the offset must land near it
    history = pol.record["history"] if pol.record else []
    assert history[0]["step"] == 0 and history[-1]["step"] == 19


def test_training_is_deterministic_for_a_seed():  # type: ignore[no-untyped-def]
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    cfg = AllocatorTraining(target_reduction=0.3, steps=4, batch_windows=2, offset_iterations=3)
    a = train_allocator(tiny_model("mixtral"), data, data, cfg)
    b = train_allocator(tiny_model("mixtral"), data, data, cfg)
    assert a == b  # same digest, offset and config


def test_cpu_training_is_bit_reproducible_and_restores_the_determinism_setting(monkeypatch):  # type: ignore[no-untyped-def]
    # 8 windows of 64 tokens on 2 threads: without deterministic algorithms the compensation
    # means' accumulating index_put_ sums in thread order and two runs differ in the last digits
    data = torch.randint(0, 64, (16, 65), generator=torch.Generator().manual_seed(0))
    cfg = AllocatorTraining(steps=8, batch_windows=8, offset_iterations=2, means_windows=4)
    static = dmr.LearnedAllocator.fixed(tiny_model("olmoe"), [2, 3])
    means_cfg = AllocatorTraining(steps=4, batch_windows=8, means_windows=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not torch.are_deterministic_algorithms_enabled()
        runs = [train_allocator(tiny_model("olmoe"), data[:12], data[12:], cfg) for _ in range(2)]
        assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is back
        torch.use_deterministic_algorithms(True, warn_only=True)  # another caller setting, kept too
        tuned = [train_means(tiny_model("olmoe"), static, data, means_cfg) for _ in range(2)]
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)

        def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
            assert torch.are_deterministic_algorithms_enabled()  # on while training
            raise RuntimeError("stop")

        monkeypatch.setattr(trainer, "_distil_kl", fail)
        with pytest.raises(RuntimeError, match="stop"):
            train_allocator(tiny_model("olmoe"), data[:12], data[12:], cfg)
        assert not torch.are_deterministic_algorithms_enabled()  # restored after an error too
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    a, b = runs
    assert a.params is not None and b.params is not None and set(a.params) == {"weight", "bias", "means"}
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name
    assert a.record is not None and a.record["deterministic"] is True
    assert tuned[0].params is not None and tuned[1].params is not None
    assert torch.equal(tuned[0].params["means"], tuned[1].params["means"])
    assert tuned[0].record is not None and tuned[0].record["means_deterministic"] is True


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_reduction": 1.0}, "target_reduction"),
        ({"steps": 0}, "steps"),
        ({"batch_windows": True}, "batch_windows"),
        ({"k_max": 0}, "k_max"),
        ({"lr": float("nan")}, "lr"),
        ({"means_lr": 0.0}, "means_lr"),
        ({"learn_means": 1}, "learn_means"),
        ({"lr_schedule": "exponential"}, "lr_schedule"),
        ({"lr_schedule": None}, "lr_schedule"),
        ({"lr_schedule": ["linear"]}, "lr_schedule"),
    ],
)
def test_training_config_is_validated(kwargs, field):  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyError) as err:
        AllocatorTraining(**kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("linear", [1.0, 0.75, 0.5, 0.25]),
        ("cosine", [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.cos(math.pi / 4)]),
    ],
)
def test_lr_schedule_sets_the_rate_of_every_step_for_heads_and_means(schedule, expected, monkeypatch):  # type: ignore[no-untyped-def]
    seen: list[list[float]] = []
    step = torch.optim.Adam.step

    def record(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    cfg = AllocatorTraining(
        steps=4, batch_windows=2, offset_iterations=2, means_windows=2, lr_schedule=schedule
    )
    pol = train_allocator(tiny_model("olmoe"), data, data, cfg)
    assert len(seen) == 4 and all(len(groups) == 2 for groups in seen)  # heads, compensation means
    for groups, factor in zip(seen, expected, strict=True):
        assert groups == pytest.approx([cfg.lr * factor, cfg.means_lr * factor])
    assert pol.record is not None and pol.record["config"]["lr_schedule"] == schedule
    seen.clear()  # train_means: one group, the compensation means
    tuned = train_means(
        tiny_model("olmoe"), dmr.LearnedAllocator.fixed(tiny_model("olmoe"), [2, 3]), data, cfg
    )
    assert [groups[0] for groups in seen] == pytest.approx([cfg.means_lr * f for f in expected])
    assert all(len(groups) == 1 for groups in seen)
    assert tuned.record is not None and tuned.record["means_lr_schedule"] == schedule


@torch.no_grad()
def _kl_to_native(model, policy, data: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    """Mean per-token KL(native || patched) of the next-token distributions on ``data``."""
    native = torch.log_softmax(model(data[:, :-1]).logits.float(), -1)
    with dmr.patched(model, policy, validate=False):
        dynamic = torch.log_softmax(model(data[:, :-1]).logits.float(), -1)
    return float((native.exp() * (native - dynamic)).sum(-1).mean())


def test_trained_compensation_lowers_the_loss_of_a_fixed_allocation_and_changes_nothing_else():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")  # 2 MoE layers, native k 4
    data = torch.randint(0, 64, (16, 33), generator=torch.Generator().manual_seed(2))
    plain = dmr.LearnedAllocator.fixed(model, [2, 3], means=expert_means(model, data))
    cfg = AllocatorTraining(steps=40, batch_windows=4, means_lr=1e-2)
    tuned = train_means(model, plain, data, cfg)
    assert plain.params is not None and tuned.params is not None and tuned.record is not None
    assert torch.equal(tuned.params["weight"], plain.params["weight"]) and tuned.offset == plain.offset
    assert torch.equal(tuned.params["bias"], plain.params["bias"])
    assert not torch.equal(tuned.params["means"], plain.params["means"])
    assert tuned.record["means_steps"] == 40 and len(tuned.record["means_history"]) == 5
    assert _kl_to_native(model, tuned, data) < 0.9 * _kl_to_native(model, plain, data)
    assert measure_reduction(model, tuned, data) == measure_reduction(model, plain, data) == 0.375
    assert dmr.get_patch(model) is None
    # a fixed allocation without compensation gets the experts' means first, then trains them
    bare = train_means(model, dmr.LearnedAllocator.fixed(model, [2, 3]), data, cfg)
    assert bare.compensation and bare.params is not None
    assert bare.params["means"].shape == plain.params["means"].shape
    with pytest.raises(dmr.PolicyError, match="LearnedAllocator"):
        train_means(model, dmr.StaticTopK(), data, cfg)  # type: ignore[arg-type]
    with pytest.raises(dmr.PolicyMismatchError):
        train_means(tiny_model("mixtral"), plain, data, cfg)


def test_learn_means_trains_the_allocators_compensation_and_can_be_turned_off():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(3))
    base = {
        "target_reduction": 0.3,
        "steps": 6,
        "batch_windows": 2,
        "offset_iterations": 3,
        "means_windows": 8,
    }
    means = expert_means(model, data)
    off = train_allocator(model, data, data, AllocatorTraining(**base, learn_means=False))
    on = train_allocator(model, data, data, AllocatorTraining(**base))
    assert off.params is not None and on.params is not None
    torch.testing.assert_close(off.params["means"], means)
    assert not torch.allclose(on.params["means"], means)
    assert on.record is not None and on.record["config"]["learn_means"] is True


def test_bad_windows_and_targets_fail_before_training():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    good = torch.randint(0, 64, (2, 9))
    with pytest.raises(dmr.PolicyError, match="int64 tensor"):
        train_allocator(model, good.float(), good)
    with pytest.raises(dmr.PolicyError, match="no window"):
        train_allocator(model, good, good[:0])
    with pytest.raises(dmr.PolicyError, match="target_reduction"):
        fit_budget(model, dmr.LearnedAllocator.keep_native(model), good, 1.5)
    with dmr.patched(model), pytest.raises(dmr.AlreadyPatchedError):
        train_allocator(model, good, good, AllocatorTraining(steps=1))


@pytest.mark.parametrize("family", dmr.supported_families())
def test_compensation_keeps_native_when_nothing_is_dropped_and_adds_means_when_it_is(family):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.learn import expert_means

    model = tiny_model(family)
    if any(layer.zero_experts for layer in find_moe_layers(model)[0]):
        pytest.skip("compensation is refused for zero-computation experts (see the test below)")
    data = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    means = expert_means(model, data)  # (L, E, H)
    before = model(IDS).logits
    with dmr.patched(model, dmr.LearnedAllocator.keep_native(model, means=means)):
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=1e-5)
    n_layers = means.shape[0]
    top1 = dmr.LearnedAllocator.fixed(model, [1] * n_layers)
    with dmr.patched(model, top1):
        plain = model(IDS).logits
    zero = dmr.LearnedAllocator.fixed(model, [1] * n_layers, means=torch.zeros_like(means))
    comp = dmr.LearnedAllocator.fixed(model, [1] * n_layers, means=means)
    with dmr.patched(model, zero):
        unnormalised = model(IDS).logits
    with dmr.patched(model, comp) as handle, dmr.profile(model) as report:
        compensated = model(IDS).logits
        executed = handle.executed_pairs()
    assert executed == IDS.numel() * n_layers  # compensation computes no expert
    assert not torch.allclose(compensated, unnormalised)  # the means are added
    d = report.to_dict()
    hidden, k = handle.layers[0].hidden_size, top1.k_max
    assert d["policy_flops"] == (2 * (hidden + k + 1) * k + 2 * k * hidden) * d["tokens"] * n_layers
    assert plain.shape == compensated.shape


def test_compensation_adds_the_native_weight_times_the_mean_of_each_dropped_slot():  # type: ignore[no-untyped-def]
    """Layer by layer: output = sum over kept native slots of w * expert(x) + dropped w * mean."""
    from dynamic_moe_router.learn import expert_means

    model = tiny_model("olmoe")  # softmax router, no renormalisation: w = the router probability
    means = expert_means(model, torch.randint(0, 64, (2, 17)))
    pol = dmr.LearnedAllocator.fixed(model, [2] * means.shape[0], means=means)
    captured = {}
    with dmr.patched(model, pol) as handle:
        layer = handle.layers[0]
        hook = layer.block.register_forward_hook(lambda m, a, out: captured.update(x=a[0], y=out))
        try:
            model(IDS)
        finally:
            hook.remove()
    x = captured["x"].reshape(-1, layer.hidden_size)  # (T, H)
    y = captured["y"][0] if isinstance(captured["y"], tuple) else captured["y"]
    probs = torch.softmax(torch.nn.functional.linear(x, layer.router.weight).float(), -1)  # (T, E)
    top, ranked = torch.topk(probs, layer.native_k, dim=-1)  # (T, 4)
    from dynamic_moe_router.experts._forward import _expert_mlp
    from dynamic_moe_router.hf.families import get_family

    layout = get_family("olmoe").layout
    expected = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(layer.native_k):
            e = int(ranked[t, j])
            value = _expert_mlp(layer.experts, e, x[t : t + 1], layout)[0] if j < 2 else means[0, e]
            expected[t] += top[t, j] * value
    torch.testing.assert_close(y.reshape(-1, layer.hidden_size), expected, rtol=1e-4, atol=1e-5)


def test_a_token_keeps_an_allowed_expert_even_when_its_head_keeps_only_excluded_slots():  # type: ignore[no-untyped-def]
    model = tiny_model("deepseek_v3")  # group-limited: the last ranked slots are excluded (-inf)
    base = dmr.LearnedAllocator.keep_native(model, k_max=8)
    assert base.params is not None
    bias = torch.full_like(base.params["bias"], -5.0)
    bias[:, -1] = 5.0  # keep only the last ranked slot, which the family excludes
    pol = dmr.LearnedAllocator(
        family=base.family, moe_layers=base.moe_layers, hidden_size=base.hidden_size,
        num_experts=base.num_experts, native_k=base.native_k, k_max=8,
        params={"weight": base.params["weight"], "bias": bias},
    )  # fmt: skip
    seen = []
    with dmr.patched(model, pol) as handle:
        hook = handle.layers[0].router.register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            model(IDS)
        finally:
            hook.remove()
        assert handle.executed_pairs() >= IDS.numel() * len(handle.layers)
    _, weights, ids = seen[0]
    assert bool((ids[:, 0] < 8).all()) and bool((weights.sum(-1) > 0).all())


def test_compensated_round_trip_and_validation(tmp_path):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.learn import expert_means

    model = tiny_model("mixtral")
    means = expert_means(model, torch.randint(0, 64, (2, 9)))
    pol = random_heads(model).with_means(means)
    assert pol.compensation and pol.sha256 != random_heads(model).sha256
    pol.save(tmp_path / "c.json")
    loaded = dmr.load_policy(tmp_path / "c.json")
    assert loaded == pol and loaded.params is not None
    assert torch.equal(loaded.params["means"], means)
    with pytest.raises(dmr.PolicyError, match="k_max must equal native_k"):
        dmr.LearnedAllocator.keep_native(model, k_max=3, means=means)
    with pytest.raises(dmr.PolicyError, match="compensation means have shape"):
        random_heads(model).with_means(means[:, :3])
    with pytest.raises(dmr.PolicyError, match="one count in"):
        dmr.LearnedAllocator.fixed(model, [0, 2])


def test_compensation_is_refused_for_zero_computation_experts():  # type: ignore[no-untyped-def]
    model = tiny_model("longcat_flash")
    layers = find_moe_layers(model)[0]
    means = torch.zeros(len(layers), layers[0].num_experts, layers[0].hidden_size)
    policy = dmr.LearnedAllocator.keep_native(model, means=means)
    quantile = dmr.LearnedAllocator.keep_native(model).with_quantile_budget(0.25)
    for bad, field in ((policy, "policy"), (quantile, "budget")):
        with pytest.raises(dmr.PolicyError, match="zero-computation") as err:
            dmr.patch(model, bad)
        assert err.value.field == field and dmr.get_patch(model) is None
        with dmr.patched(model, dmr.LearnedAllocator.keep_native(model)) as handle:  # set_policy too
            with pytest.raises(dmr.PolicyError, match="zero-computation"):
                handle.set_policy(bad)
            assert handle.policy == dmr.LearnedAllocator.keep_native(model)  # unchanged


def test_quantile_budget_keeps_the_fraction_of_each_long_call_and_round_trips(tmp_path):  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")  # 2 MoE layers, native k 4
    heads = random_heads(model, seed=4, scale=3.0)
    pol = heads.with_quantile_budget(0.35, min_tokens=8)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(5))
    with dmr.patched(model, pol) as handle:
        model(ids)
        long_call = handle.executed_pairs()
    assert long_call == 2 * round(0.65 * 40 * 4)  # exact per layer: 104 of 160 pairs
    with dmr.patched(model, heads) as handle:
        model(ids)
        assert handle.executed_pairs() != long_call  # the threshold budget keeps another count
    with dmr.patched(model, pol) as handle:  # a call shorter than min_tokens uses the threshold
        model(ids[:1, :4])
        short = handle.executed_pairs()
    with dmr.patched(model, heads) as handle:
        model(ids[:1, :4])
        assert handle.executed_pairs() == short
    pol.save(tmp_path / "q.json")
    back = dmr.load_policy(tmp_path / "q.json")
    assert back == pol and back.budget == "quantile"
    assert back.with_threshold_budget() == dataclasses.replace(heads, quantile_min_tokens=8)
    with pytest.raises(dmr.PolicyError) as err:
        dataclasses.replace(heads, budget="quantile")
    assert err.value.field == "keep_fraction"
    with pytest.raises(dmr.PolicyError) as err:
        dataclasses.replace(heads, budget="per-token")
    assert err.value.field == "budget"


def test_quantile_budget_per_layer_shares_and_top_slot_first(tmp_path):  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")  # 2 MoE layers, native k 4
    heads = random_heads(model, seed=6, scale=3.0)
    pol = heads.with_quantile_budget(0.5, min_tokens=8, layer_keep=[0.3, 0.9])
    assert pol.keep_fraction == (0.25, 0.75)  # the proportions of layer_keep, mean 1 - 0.5
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(7))  # 40 tokens
    seen: dict[int, torch.Tensor] = {}

    def hook(index):  # type: ignore[no-untyped-def]
        def record(module, args, kwargs):  # type: ignore[no-untyped-def]
            seen[index] = dmr.hf.layers.experts_inputs(args, kwargs)[1]  # (T, k) kept ids, sentinels after

        return record

    with dmr.patched(model, pol) as handle:
        hooks = [
            layer.experts.register_forward_pre_hook(hook(layer.index), with_kwargs=True)
            for layer in handle.layers
        ]
        model(ids)
        for h in hooks:
            h.remove()
    counts = [int((seen[layer.index] < layer.num_experts).sum()) for layer in handle.layers]
    assert counts == [round(0.25 * 40 * 4), round(0.75 * 40 * 4)]  # 40 and 120 of 160 pairs
    assert all(int((seen[i] < 8).sum(-1).min()) >= 1 for i in seen)  # every token keeps one expert
    pol.save(tmp_path / "q.json")
    back = dmr.load_policy(tmp_path / "q.json")
    assert back == pol and back.keep_fraction == (0.25, 0.75)
    assert "per layer 0.25, 0.75" in back.describe()
    for bad in ((0.5,), (0.5, 0.0), (0.5, 1.5), ("a", 0.5)):
        with pytest.raises(dmr.PolicyError) as err:
            dataclasses.replace(heads, budget="quantile", keep_fraction=bad)
        assert err.value.field == "keep_fraction"
    with pytest.raises(dmr.PolicyError, match="layer_keep must hold 2 positive numbers"):
        heads.with_quantile_budget(0.5, layer_keep=[0.5])
    with pytest.raises(dmr.PolicyError, match="target_reduction"):
        heads.with_quantile_budget(1.0)
    # one check, one error, for the quantile budget and for the threshold fit alike: at most 75% fewer
    with pytest.raises(dmr.TargetUnreachableError, match="out of reach of a native top-4") as quantile:
        heads.with_quantile_budget(0.8)
    with pytest.raises(dmr.TargetUnreachableError, match="out of reach of a native top-4") as fit:
        fit_budget(tiny_model("olmoe"), heads, torch.randint(0, 64, (2, 9)), 0.8)
    assert str(quantile.value) == str(fit.value)
    with pytest.raises(dmr.PolicyError, match="below 1/native_k") as err:
        dataclasses.replace(heads, budget="quantile", keep_fraction=(0.2, 0.5))
    assert err.value.field == "keep_fraction"


def test_quantile_budget_keeps_each_tokens_top_ranked_slot():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")  # native k 2
    heads = random_heads(model, seed=8, scale=3.0)
    assert heads.params is not None
    bias = heads.params["bias"].clone()
    bias[:, 0], bias[:, 1] = -50.0, 50.0  # every head prefers the second-ranked slot by far
    biased = dataclasses.replace(heads, params={**heads.params, "bias": bias}, sha256="")
    pol = biased.with_quantile_budget(0.5, min_tokens=8)
    h = torch.randn(16, heads.hidden_size)
    probs = torch.softmax(torch.randn(16, heads.num_experts), -1)
    ranked = probs.topk(2, -1).values
    keep = pol.keep_mask(h, ranked, probs, pol.moe_layers[0])  # (T, 2): one slot per token at 50%
    assert keep[:, 0].all() and not keep[:, 1].any()  # the top slot, as the threshold's fallback


@given(
    keep=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=8),
    mean=st.floats(0.05, 1.0),
    native_k=st.sampled_from([1, 2, 4, 8]),
)
def test_spread_keep_has_the_mean_the_proportions_and_the_bounds(keep, mean, native_k):  # type: ignore[no-untyped-def]
    floor = 1.0 / native_k
    out = spread_keep(mean, keep, len(keep), floor=floor)
    assert len(out) == len(keep) and all(floor - 1e-12 <= v <= 1.0 for v in out)
    assert abs(sum(out) / len(out) - max(mean, floor)) < 1e-6
    free = [(o, k) for o, k in zip(out, keep, strict=True) if floor + 1e-9 < o < 1.0 - 1e-9]
    for (o1, k1), (o2, k2) in itertools.pairwise(free):  # uncapped layers keep the given proportions
        assert abs(o1 * k2 - o2 * k1) < 1e-6 * max(1.0, k1, k2)


@pytest.mark.parametrize("shares", ["threshold", "uniform", "best"])
def test_fit_quantile_budget_lands_on_the_target(shares):  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    heads = random_heads(model, seed=9, scale=3.0)
    windows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(10))
    pol, red = fit_quantile_budget(model, heads, windows, 0.4, layer_shares=shares, min_tokens=8)
    assert pol.budget == "quantile" and red == pytest.approx(0.4, abs=1 / 64)
    assert measure_reduction(model, pol, windows) == red
    if shares == "uniform":
        assert isinstance(pol.keep_fraction, float)
    if shares == "threshold":
        assert isinstance(pol.keep_fraction, tuple) and len(pol.keep_fraction) == 2
    with pytest.raises(dmr.PolicyError) as err:
        fit_quantile_budget(model, heads, windows, 0.4, layer_shares="per-token")
    assert err.value.field == "layer_shares"


def test_fit_quantile_budget_keeps_an_offset_already_fitted():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    heads = random_heads(model, seed=9, scale=3.0)
    windows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(10))
    fitted, _ = fit_budget(model, heads, windows, 0.4)
    again, red = fit_quantile_budget(model, fitted, windows, 0.4, layer_shares="threshold", min_tokens=8)
    kept, red_kept = fit_quantile_budget(
        model, fitted, windows, 0.4, layer_shares="threshold", min_tokens=8, refit_offset=False
    )
    # refitting the offset of a fitted policy lands on the same offset: the same policy, measured once
    assert again.offset == kept.offset == fitted.offset and again == kept and red == red_kept
    moved, _ = fit_quantile_budget(
        model, fitted.with_offset(5.0), windows, 0.4, layer_shares="uniform", min_tokens=8, refit_offset=False
    )
    assert moved.offset == 5.0  # kept as given (decode steps use it)
    with pytest.raises(dmr.TargetUnreachableError):
        fit_quantile_budget(model, fitted, windows, 0.8, refit_offset=False)
    for bad in (0.0, 1.0, "0.4", True):
        with pytest.raises(dmr.PolicyError) as err:
            fit_quantile_budget(model, fitted, windows, bad, refit_offset=False)
        assert err.value.field == "target_reduction"


def test_quantile_budget_runs_in_generate_with_the_kv_cache():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")  # 2 MoE layers, native k 4
    pol = random_heads(model, seed=11, scale=3.0).with_quantile_budget(0.5, min_tokens=8)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(12))
    with dmr.patched(model, pol) as handle:
        first = model.generate(ids, max_new_tokens=5, do_sample=False)
        generated = handle.executed_pairs()
        again = model.generate(ids, max_new_tokens=5, do_sample=False)
    with dmr.patched(model, pol) as handle:
        model(ids)  # the prefill alone: one call of 12 tokens, exactly half of its 96 pairs per layer
        prefill = handle.executed_pairs()
    assert prefill == 2 * round(0.5 * 12 * 4)
    # 4 decode steps of one token each (shorter than min_tokens: the threshold), 1 to 4 slots per layer
    assert 2 * 4 <= generated - prefill <= 2 * 4 * 4
    assert first.shape == (1, 17) and torch.equal(first, again)  # deterministic


@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 2 * _KL_CHUNK_ROWS + 7),  # N = batch * tokens: one chunk, several, a partial last
    vocab=st.integers(1, 96),
    scale=st.sampled_from([0.1, 1.0, 10.0, 1e3]),  # 1e3: most of each softmax underflows in fp32
    seed=st.integers(0, 2**16),
)
def test_chunked_kl_matches_the_full_vocabulary_formula_and_its_gradient(batch, tokens, vocab, scale, seed):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, tokens, vocab, generator=g) * scale  # (B, T, V)
    student = (teacher + torch.randn(batch, tokens, vocab, generator=g) * scale).requires_grad_()
    kl = _ChunkedKL.apply(teacher, student)
    (grad,) = torch.autograd.grad(2.5 * kl, student)  # a non-unit upstream gradient
    ref_student = student.detach().double().requires_grad_()
    t = torch.log_softmax(teacher.double(), -1)
    s = torch.log_softmax(ref_student, -1)
    ref = (t.exp() * (t - s)).sum(-1).mean()  # the formula _distil_kl used before, in float64
    (ref_grad,) = torch.autograd.grad(2.5 * ref, ref_student)
    assert kl.dtype == grad.dtype == torch.float32 and grad.shape == student.shape
    torch.testing.assert_close(kl.double(), ref, rtol=1.3e-6, atol=1e-5)  # the fp32 defaults
    # the gradient is (q - p) / N: the fp32 defaults on q - p, that is an absolute 1e-5 / N
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1.3e-6, atol=1e-5 / (batch * tokens))


def test_chunked_kl_backward_runs_once():  # type: ignore[no-untyped-def]
    teacher = torch.randn(2, 5, 11)  # (B, T, V)
    student = torch.randn(2, 5, 11, requires_grad=True)
    kl = _ChunkedKL.apply(teacher, student)
    kl.backward(retain_graph=True)
    first = student.grad.clone()
    with pytest.raises(RuntimeError, match="backward ran twice"):  # its gradient was scaled in place
        kl.backward()
    assert torch.equal(student.grad, first)  # nothing accumulated by the refused second pass


def test_chunked_kl_refuses_logits_of_different_shapes():  # type: ignore[no-untyped-def]
    shapes = r"teacher logits \(2, 5, 11\) differ from the student's \(2, 5, 12\)"
    with pytest.raises(ValueError, match=shapes):
        _ChunkedKL.apply(torch.randn(2, 5, 11), torch.randn(2, 5, 12, requires_grad=True))


def test_allocator_windows_take_the_tables_counts_and_refuse_an_unknown_use():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.learn import allocator_windows
    from dynamic_moe_router.learn.windows import ALLOCATOR_WINDOWS

    class Tok:  # one token per character
        def __call__(self, text, **kw):  # type: ignore[no-untyped-def]
            return {"input_ids": [ord(c) % 50 for c in text]}

    assert dict(ALLOCATOR_WINDOWS) == {"train": (8, 800), "budget": (2, 64)}  # what calibrate takes
    text = "".join(chr(48 + (i * 7) % 50) for i in range(200))  # no period shorter than 50 tokens
    ids = Tok()(text)["input_ids"]
    for use, per_doc in (("train", 8), ("budget", 2)):
        got = allocator_windows(Tok(), [text] * 3, use, context=8)
        assert got.shape == (3 * per_doc, 9)
        assert got[0].tolist() == ids[8:17]  # the first window is skipped
        assert got[per_doc - 1].tolist() == ids[8 * per_doc : 8 * per_doc + 9]  # consecutive windows
        assert len(allocator_windows(Tok(), [text] * 3, use, context=8, max_windows=2)) == 2
    assert len(allocator_windows(Tok(), [text] * 40, "budget", context=8)) == 64  # the table's cap
    with pytest.raises(dmr.PolicyError, match="'train', 'budget', got 'tune'"):
        allocator_windows(Tok(), [text], "tune", context=8)
    with pytest.raises(dmr.PolicyError, match=r"got \['train'\]"):
        allocator_windows(Tok(), [text], ["train"], context=8)  # type: ignore[arg-type]
