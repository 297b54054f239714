"""The experts forward against an fp64 per-token reference, on every CPU-runnable backend."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import dynamic_moe_router as dmr
from dynamic_moe_router.experts import GPT_OSS, STANDARD, ExpertsCounter, experts_forward, resolve_backend
from dynamic_moe_router.experts._forward import _cuda, _cuda_full_buffer, _expert_mlp


def mixtral_experts(num_experts: int, hidden: int, inter: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts)
    m = MixtralExperts(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.gate_up_proj.copy_(torch.randn(m.gate_up_proj.shape, generator=gen) * 0.2)
        m.down_proj.copy_(torch.randn(m.down_proj.shape, generator=gen) * 0.2)
    return m


def gpt_oss_experts(num_experts: int, hidden: int, inter: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts)
    m = GptOssExperts(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)  # large enough to hit the clamps
    return m


def reference(module, layout, hidden, ids, weights):  # type: ignore[no-untyped-def]
    """fp64, one token and one slot at a time, sentinels skipped."""
    m64 = {name: p.detach().double() for name, p in module.named_parameters()}
    shim = type("Shim", (), {})()
    for name, p in m64.items():
        setattr(shim, name, p)
    shim.act_fn = getattr(module, "act_fn", None)
    shim.alpha, shim.limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    num_experts = module.gate_up_proj.shape[0]
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e == num_experts:
                continue
            y = _expert_mlp(shim, e, hidden[t : t + 1].double(), layout)
            out[t] += float(weights[t, j]) * y[0]
    return out


def random_routing(tokens, num_experts, k_max, seed=0, drop=0.3):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, num_experts, generator=gen)
    ids = torch.topk(scores, k_max, dim=-1).indices
    keep = torch.rand(tokens, k_max, generator=gen) > drop
    keep = keep.cumprod(dim=-1).bool()  # prefix
    ids = torch.where(keep, ids, torch.full_like(ids, num_experts))
    weights = torch.rand(tokens, k_max, generator=gen) * keep
    return ids, weights


RUNNERS = {
    "loop": lambda m, lay, h, i, w, c: experts_forward(m, h, i, w, layout=lay, backend="loop", counter=c),
    "grouped": lambda m, lay, h, i, w, c: experts_forward(
        m, h, i, w, layout=lay, backend="grouped", counter=c
    ),
    # the sync-free CUDA algorithm, run on CPU (grouped_mm has a CPU kernel)
    "cuda-algorithm": lambda m, lay, h, i, w, c: _cuda(m, h, i, w, lay, c),
    # the torch-only fallback of "cuda" (no Triton, or a layout the Triton kernels do not cover);
    # on CPU "cuda-algorithm" itself runs the Triton kernels interpreted for the standard layout
    "cuda-full-buffer": lambda m, lay, h, i, w, c: _cuda_full_buffer(m, h, i, w, lay, c),
}


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("layout_name", ["standard", "gpt_oss"])
def test_matches_per_token_reference(runner, layout_name):  # type: ignore[no-untyped-def]
    make, layout = (mixtral_experts, STANDARD) if layout_name == "standard" else (gpt_oss_experts, GPT_OSS)
    module = make(8, 32, 16)
    hidden = torch.randn(37, 32)
    ids, weights = random_routing(37, 8, 3)
    ids[5] = 8  # a token with no kept expert
    weights[5] = 0
    ids[ids == 6] = 8  # expert 6 gets no token
    weights[ids == 8] = 0
    counter = ExpertsCounter()
    with torch.no_grad():
        out = RUNNERS[runner](module, layout, hidden, ids, weights, counter)
    ref = reference(module, layout, hidden, ids, weights)
    assert out.dtype == hidden.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert out[5].abs().sum() == 0
    assert counter.executed_pairs == int((ids < 8).sum())


@given(st.integers(0, 24), st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_any_routing_any_backend(tokens, num_experts, k_max, seed, drop):  # type: ignore[no-untyped-def]
    k_max = min(k_max, num_experts)
    module = mixtral_experts(num_experts, 16, 8, seed=seed % 7)
    hidden = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(seed))
    ids, weights = random_routing(tokens, num_experts, k_max, seed=seed, drop=drop)
    ref = reference(module, STANDARD, hidden, ids, weights)
    for runner in RUNNERS.values():
        counter = ExpertsCounter()
        with torch.no_grad():
            out = runner(module, STANDARD, hidden, ids, weights, counter)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        assert counter.executed_pairs == int((ids < num_experts).sum())


def test_device_counts_accumulate_in_place_across_grad_modes():  # type: ignore[no-untyped-def]
    """After its first call a counter allocates nothing: a static-cache generate() keeps its CUDA
    graphs only if the allocator's state repeats between calls (test_cuda checks that end to end)."""
    counter = ExpertsCounter()
    with torch.inference_mode():  # the first count made in inference mode ...
        counter.add(torch.tensor(3))
        counter.add_zero_experts(torch.tensor(2))
    total, zero = counter._device, counter._zero_device
    assert total is not None and zero is not None
    ptrs = (total.data_ptr(), zero.data_ptr())
    with torch.no_grad():  # ... still adds outside it
        counter.add(torch.tensor(4, dtype=torch.int32))
        counter.add_zero_experts(torch.tensor(1))
    counter.add(5)
    counter.add(torch.tensor([0]))  # a one-element count of another shape
    assert counter._device is total and counter._zero_device is zero
    assert (total.data_ptr(), zero.data_ptr()) == ptrs
    assert counter.executed_pairs == 12 and counter.zero_expert_pairs == 3
    counter.reset()
    assert counter.executed_pairs == 0 and counter.zero_expert_pairs == 0
    counter.add(torch.tensor(2))
    assert counter._device is total and counter.executed_pairs == 2


def test_odd_sizes_fall_back_to_loop_and_explicit_grouped_raises():  # type: ignore[no-untyped-def]
    module = mixtral_experts(257, 511, 7)
    hidden = torch.randn(9, 511)
    ids, weights = random_routing(9, 257, 4)
    assert resolve_backend("auto", module, hidden, ids, STANDARD) == "loop"
    with pytest.raises(dmr.BackendUnavailableError, match="16-byte aligned"):
        experts_forward(module, hidden, ids, weights, backend="grouped")
    counter = ExpertsCounter()
    with torch.no_grad():
        out = experts_forward(module, hidden, ids, weights, counter=counter)
    torch.testing.assert_close(
        out.double(), reference(module, STANDARD, hidden, ids, weights), atol=1e-5, rtol=1e-5
    )
    assert counter.executed_pairs == int((ids < 257).sum())


def test_explicit_cuda_backend_on_cpu_raises(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would run Triton on CPU
    module = mixtral_experts(4, 16, 8)
    ids, weights = random_routing(3, 4, 2)
    with pytest.raises(dmr.BackendUnavailableError, match="needs CUDA tensors"):
        experts_forward(module, torch.randn(3, 16), ids, weights, backend="cuda")
    with pytest.raises(
        dmr.BackendUnavailableError,
        match=r"'triton' cannot run: (Triton is not installed|Triton kernels need CUDA)",
    ):
        experts_forward(module, torch.randn(3, 16), ids, weights, backend="triton")
    with pytest.raises(dmr.BackendUnavailableError, match="unknown experts backend"):
        experts_forward(module, torch.randn(3, 16), ids, weights, backend="tensorrt")


def test_fp16_auto_falls_back_and_grouped_raises():  # type: ignore[no-untyped-def]
    module = mixtral_experts(4, 16, 8).half()
    hidden = torch.randn(3, 16).half()
    ids, weights = random_routing(3, 4, 2)
    assert resolve_backend("auto", module, hidden, ids, STANDARD) == "loop"
    with pytest.raises(dmr.BackendUnavailableError, match="supports"):
        experts_forward(module, hidden, ids, weights.half(), backend="grouped")


def test_zero_tokens_and_all_dropped():  # type: ignore[no-untyped-def]
    module = mixtral_experts(4, 16, 8)
    for backend in ("loop", "grouped"):
        out = experts_forward(
            module,
            torch.randn(0, 16),
            torch.zeros(0, 2, dtype=torch.long),
            torch.zeros(0, 2),
            backend=backend,
        )
        assert out.shape == (0, 16)
        ids = torch.full((3, 2), 4)
        counter = ExpertsCounter()
        out = experts_forward(
            module, torch.randn(3, 16), ids, torch.zeros(3, 2), backend=backend, counter=counter
        )
        assert out.abs().sum() == 0 and counter.executed_pairs == 0


def test_shape_errors():  # type: ignore[no-untyped-def]
    module = mixtral_experts(4, 16, 8)
    with pytest.raises(dmr.RoutingInputError, match="expects hidden"):
        experts_forward(module, torch.randn(3, 16), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2))


def test_gradients_flow_like_the_reference():  # type: ignore[no-untyped-def]
    module = mixtral_experts(4, 16, 8)
    hidden = torch.randn(5, 16, requires_grad=True)
    ids, weights = random_routing(5, 4, 2, drop=0.0)
    weights.requires_grad_(True)
    out = experts_forward(module, hidden, ids, weights, backend="loop")
    out.sum().backward()
    assert hidden.grad is not None and weights.grad is not None and module.gate_up_proj.grad is not None


def test_cpu_backend_rule_follows_the_benchmark_crossover():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.experts import choose_cpu_backend

    assert choose_cpu_backend(num_pairs=512 * 8, num_experts=64, intermediate=256) == "grouped"
    assert choose_cpu_backend(num_pairs=2048 * 8, num_experts=64, intermediate=256) == "loop"
    assert choose_cpu_backend(num_pairs=1 * 2, num_experts=8, intermediate=1792) == "grouped"
    module = mixtral_experts(8, 16, 8)
    big_ids, _ = random_routing(1024, 8, 2)
    assert resolve_backend("auto", module, torch.randn(1024, 16), big_ids, STANDARD) == "loop"


def test_misaligned_data_pointer_is_refused_by_grouped():  # type: ignore[no-untyped-def]
    module = mixtral_experts(4, 16, 8)
    storage = torch.randn(3 * 16 + 1)
    hidden = storage[1:].view(3, 16)  # data pointer 4 bytes past an aligned address
    ids, weights = random_routing(3, 4, 2)
    assert resolve_backend("auto", module, hidden, ids, STANDARD) == "loop"
    with pytest.raises(dmr.BackendUnavailableError, match="aligned data pointers"):
        experts_forward(module, hidden, ids, weights, backend="grouped")


def test_cli_offers_every_backend():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.cli import CLI_BACKENDS
    from dynamic_moe_router.experts import BACKENDS

    assert CLI_BACKENDS == BACKENDS
