"""CUDA path: run through the device tool (skipped where there is no GPU, as in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.experts import STANDARD, ExpertsCounter, experts_forward, resolve_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: the policies of the compiled and graphed tests: static, a threshold, both batch-aware forms
GPU_POLICIES = [
    dmr.StaticTopK(),
    dmr.TopP(p=0.5),
    dmr.BatchAware(experts=0.5),
    dmr.BatchAware(experts=0.5, reroute=True),
    dmr.TileAware(dmr.TopP(p=0.5), rows=4),  # 4 x 16 prompt tokens: whole tiles move
]
REPLAY_WORKER = Path(__file__).parent / "cuda_workers" / "replay_worker.py"
SRC = Path(__file__).parent.parent / "src"


@pytest.fixture
def deterministic():  # type: ignore[no-untyped-def]
    """For tests that compare runs bit for bit. Where the Triton kernels refuse a layer (the tiny
    lfm2_moe and gpt_oss experts, whose activation is not a SiLU module), the ``cuda`` backend runs its
    full-buffer path, which sums each token's expert outputs with one ``index_add_`` over repeated token
    indices; its CUDA atomics add in a varying order (``grouped`` does the same). The logits of a tiny
    bf16 lfm2_moe model differed in the last bit in 1 to 6 of 60 repetitions of four calls (H200, with
    and without CUDA graphs), and in none of 80 in PyTorch's deterministic mode, which orders that sum.
    ``warn_only=True``: cuBLAS calls would otherwise raise unless ``CUBLAS_WORKSPACE_CONFIG`` is set."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def test_cuda_backend_matches_fp64_reference_and_counts_pairs():  # type: ignore[no-untyped-def]
    from test_experts import mixtral_experts, random_routing, reference

    for num_experts, hidden_size, inter, tokens, k_max in [(8, 64, 128, 300, 2), (64, 128, 64, 257, 8)]:
        module = mixtral_experts(num_experts, hidden_size, inter)
        hidden = torch.randn(tokens, hidden_size)
        ids, weights = random_routing(tokens, num_experts, k_max)
        ids[0] = num_experts  # a token with no kept expert
        weights[0] = 0
        ref = reference(module, STANDARD, hidden, ids, weights)
        dev = module.cuda().bfloat16()
        counter = ExpertsCounter()
        with torch.no_grad():
            out = experts_forward(
                dev, hidden.cuda().bfloat16(), ids.cuda(), weights.cuda(), backend="cuda", counter=counter
            )
        assert resolve_backend("auto", dev, hidden.cuda().bfloat16(), ids.cuda(), STANDARD) in (
            "cuda",
            "triton",
        )
        assert torch.isfinite(out).all()
        assert rel_err(out.cpu(), ref) < 1e-2
        assert out[0].abs().sum() == 0
        assert counter.executed_pairs == int((ids < num_experts).sum())


def test_routing_and_cuda_dispatch_do_not_synchronise():  # type: ignore[no-untyped-def]
    from test_experts import mixtral_experts

    module = mixtral_experts(16, 64, 64).cuda().bfloat16()
    probs = torch.softmax(torch.randn(512, 16, device="cuda"), -1)
    hidden = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            r = dmr.route(probs, dmr.TopP(p=0.6), native_k=4, normalize="sum", validate=False)
            out = experts_forward(module, hidden, r.ids, r.weights, backend="cuda")
            aware = dmr.BatchAware(experts=0.5, reroute=True)
            rerouted = dmr.route(probs, aware, native_k=4, normalize="sum", validate=False)
            tiled = dmr.route(probs, dmr.TileAware(dmr.TopP(p=0.6), rows=32), native_k=4, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()
    assert torch.unique(rerouted.ids[rerouted.ids < 16]).numel() <= 8
    assert tiled.kept_pairs() > 0


def _families_of_this_release() -> list[str]:
    """Every supported family the installed transformers has (the GPU machine may run an older one)."""
    import transformers
    from packaging.version import Version

    from dynamic_moe_router.hf.families import FAMILIES

    return [
        f
        for f, r in sorted(FAMILIES.items())
        if Version(transformers.__version__) >= Version(r.min_transformers)
    ]


@pytest.mark.parametrize("family", _families_of_this_release())
def test_patched_model_on_cuda(family):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.tiny import tiny_model

    x = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    # fp32: auto picks the loop backend (grouped GEMM on CUDA is bf16-only); equivalence as on CPU
    # eager attention: cuDNN's SDPA rejects the tiny deepseek_v3 head sizes in bf16 (not our code)
    model = tiny_model(family, attn_implementation="eager").cuda()
    with torch.no_grad():
        ref = model(x).logits
        gen_ref = model.generate(x, max_new_tokens=6, do_sample=False)
        with dmr.patched(model, dmr.StaticTopK()):
            out = model(x).logits
            gen = model.generate(x, max_new_tokens=6, do_sample=False)
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(gen, gen_ref)
    # bf16: auto picks the sync-free grouped GEMM backend. Its accumulation order differs from
    # transformers' kernels, so greedy tokens of a random tiny model may flip at near-ties; the
    # check is that its error against fp32 is no larger than native bf16's.
    model = tiny_model(family, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    with torch.no_grad():
        native = model(x).logits
        with dmr.patched(model, dmr.StaticTopK()):
            out = model(x).logits
            assert model.generate(x, max_new_tokens=6, do_sample=False).shape == (2, 18)
        with dmr.patched(model, dmr.TopP(p=0.5)) as dyn:
            dyn_out = model(x).logits
    assert (
        rel_err(out.float().cpu(), ref.double().cpu())
        <= 1.5 * rel_err(native.float().cpu(), ref.double().cpu()) + 1e-3
    )
    native_pairs = sum(x.numel() * layer.native_k for layer in dyn.layers)
    assert torch.isfinite(dyn_out).all() and 0 < dyn.executed_pairs() < native_pairs


# -- the bounded GPU paths (issue 4) ----------------------------------------------------------------
GPU_CASES = [  # E, H, I, T, k_max
    (8, 64, 128, 300, 2),
    (64, 128, 64, 257, 8),
    (257, 511, 48, 33, 4),  # odd sizes: triton only (grouped_mm needs 16-byte rows)
    (4, 256, 512, 1, 2),  # decode
    (64, 128, 64, 4, 8),  # decode batch 4: the first GEMM sorts the pairs itself
    (8, 128, 256, 16, 2),  # likewise at top-2
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_bounded_paths_match_fp64_reference(backend, case):  # type: ignore[no-untyped-def]
    from test_experts import mixtral_experts, random_routing, reference

    num_experts, hidden_size, inter, tokens, k_max = case
    if backend == "cuda" and hidden_size % 8:
        pytest.skip("grouped_mm needs 16-byte aligned rows")
    module = mixtral_experts(num_experts, hidden_size, inter)
    hidden = torch.randn(tokens, hidden_size)
    ids, weights = random_routing(tokens, num_experts, k_max)
    if tokens > 1:
        ids[0] = num_experts  # a token with no kept expert
        ids[ids == 1] = num_experts  # expert 1 gets no token
    weights[ids == num_experts] = 0
    ref = reference(module, STANDARD, hidden, ids, weights)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-5)):
        if backend == "cuda" and dtype == torch.float32:
            continue  # grouped_mm on CUDA is bf16-only
        dev = mixtral_experts(num_experts, hidden_size, inter).cuda().to(dtype)
        counter = ExpertsCounter()
        with torch.no_grad():
            x, w = hidden.cuda().to(dtype), weights.cuda().to(dtype)
            out = experts_forward(dev, x, ids.cuda(), w, backend=backend, counter=counter)
        assert torch.isfinite(out).all()  # every row written
        assert rel_err(out.cpu(), ref) < tol
        assert tokens == 1 or out[0].abs().sum() == 0
        assert counter.executed_pairs == int((ids < num_experts).sum())


def test_auto_picks_triton_for_decode_and_cuda_for_prefill():  # type: ignore[no-untyped-def]
    from test_experts import mixtral_experts, random_routing

    dev = mixtral_experts(8, 64, 128).cuda().bfloat16()
    for tokens, expected in ((1, "triton"), (4096, "cuda")):
        ids, _ = random_routing(tokens, 8, 2)
        hidden = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16)
        assert resolve_backend("auto", dev, hidden, ids.cuda(), STANDARD) == expected


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bounded_paths_do_not_synchronise(backend):  # type: ignore[no-untyped-def]
    from test_experts import mixtral_experts

    module = mixtral_experts(16, 64, 64).cuda().bfloat16()
    probs = torch.softmax(torch.randn(512, 16, device="cuda"), -1)
    hidden = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    ids0 = torch.full((512, 4), 16, device="cuda", dtype=torch.long)
    w0 = torch.zeros(512, 4, device="cuda", dtype=torch.bfloat16)
    experts_forward(module, hidden, ids0, w0, backend=backend)  # compile the kernels before the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            r = dmr.route(probs, dmr.TopP(p=0.6), native_k=4, normalize="sum", validate=False)
            out = experts_forward(module, hidden, r.ids, r.weights.bfloat16(), backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_with_changing_routing(backend):  # type: ignore[no-untyped-def]
    from test_experts import mixtral_experts, random_routing, reference

    module = mixtral_experts(8, 64, 128)
    dev = mixtral_experts(8, 64, 128).cuda().bfloat16()
    tokens, k_max = 48, 3
    hidden = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16)
    ids_buf = torch.full((tokens, k_max), 8, device="cuda", dtype=torch.long)
    w_buf = torch.zeros(tokens, k_max, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        experts_forward(dev, hidden, ids_buf, w_buf, backend=backend)  # warm up (compile) outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = experts_forward(dev, hidden, ids_buf, w_buf, backend=backend)
    for seed, drop in ((1, 0.0), (2, 0.5), (3, 1.0), (4, 0.3)):
        ids, weights = random_routing(tokens, 8, k_max, seed=seed, drop=drop)
        ids_buf.copy_(ids)
        w_buf.copy_(weights)
        graph.replay()
        ref = reference(module, STANDARD, hidden.float().cpu(), ids, weights.bfloat16().float())
        if drop == 1.0:
            assert out.abs().sum() == 0
        else:
            assert rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_fullgraph(backend):  # type: ignore[no-untyped-def]
    from test_experts import mixtral_experts

    dev = mixtral_experts(8, 64, 128).cuda().bfloat16()

    def layer(hidden, probs):  # type: ignore[no-untyped-def]
        r = dmr.route(probs, dmr.TopP(p=0.6), native_k=3, normalize="sum", validate=False)
        return experts_forward(dev, hidden, r.ids, r.weights.to(hidden.dtype), backend=backend)

    compiled = torch.compile(layer, fullgraph=True)
    for tokens in (40, 40, 7):
        hidden = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16)
        probs = torch.softmax(torch.randn(tokens, 8, device="cuda"), -1)
        with torch.no_grad():
            torch.testing.assert_close(compiled(hidden, probs), layer(hidden, probs), atol=2e-2, rtol=2e-2)


# -- the compiled decode path (issue 11) ------------------------------------------------------------
def _static_generate(model, x, compiled: bool, new: int = 6):  # type: ignore[no-untyped-def]
    # transformers' speed recipe: a static cache makes generate() compile the forward with
    # torch.compile(mode="reduce-overhead") (inductor + CUDA graphs)
    kw = {"cache_implementation": "static"} if compiled else {}
    with torch.no_grad():
        return model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_compiled_static_cache_generate_on_cuda(family):  # type: ignore[no-untyped-def]
    from torch._dynamo.utils import counters

    from dynamic_moe_router.hf.tiny import tiny_model

    x = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    # fp32: the host-synchronising loop backend runs eagerly between compiled graphs (a graph
    # break); tokens are compared exactly, patched StaticTopK against the unpatched model
    model = tiny_model(family, attn_implementation="eager").cuda()
    native = _static_generate(model, x, compiled=False)
    torch._dynamo.reset()
    with dmr.patched(model, dmr.StaticTopK()):  # validate=True is skipped inside the compiled graph
        static = _static_generate(model, x, compiled=True)
        graphs = counters["stats"]["unique_graphs"]
        again = _static_generate(model, x, compiled=True)
        assert counters["stats"]["unique_graphs"] == graphs  # no re-specialisation per call
    assert torch.equal(static, native) and torch.equal(again, native)
    with dmr.patched(model, dmr.TopP(p=0.5), validate=False):
        dynamic = _static_generate(model, x, compiled=True)
        assert torch.equal(dynamic, _static_generate(model, x, compiled=False))
    # bf16: the sync-free GPU paths run inside the graph as one custom op, captured by CUDA graphs
    torch._dynamo.reset()
    model = tiny_model(family, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    for policy in (dmr.StaticTopK(), dmr.TopP(p=0.5)):
        with dmr.patched(model, policy, validate=False):
            eager = _static_generate(model, x, compiled=False, new=8)
            compiled = _static_generate(model, x, compiled=True, new=8)
            assert torch.equal(_static_generate(model, x, compiled=True, new=8), compiled)  # replay is stable
        # inductor fuses the attention and norms in another order than eager, so a random tiny bf16
        # model may flip a near-tie late in the sequence; the prefill's greedy token never differs
        assert compiled.shape == eager.shape == (2, 20)
        assert torch.equal(compiled[:, 12], eager[:, 12])


@pytest.mark.parametrize("policy", ["none", "static", "top_p"])
def test_static_cache_generate_replays_its_cuda_graphs_on_later_calls(policy):  # type: ignore[no-untyped-def]
    """transformers builds a new static cache per generate() call; the compiled decode step replays
    its CUDA graphs only if that cache lands where it was recorded. A patched model's eager prefill
    used to leave new small tensors behind (its pair counters) every call, so every call recorded
    the decode graph again (about 73 ms per call on the OLMoE shape, and a growing graph tree).
    The calls run in a fresh interpreter (see the worker's docstring for why)."""
    paths = [str(SRC), *(part for part in os.environ.get("PYTHONPATH", "").split(os.pathsep) if part)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run(
        [sys.executable, str(REPLAY_WORKER), policy], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["warmup_recordings"] > 0, "the compiled step ran without CUDA graphs: nothing to check"
    assert result["later_recordings"] == 0, result
    assert result["same_tokens"] == [True, True, True], result


@pytest.mark.parametrize("policy", GPU_POLICIES)
def test_compiled_forward_reduce_overhead_matches_eager(policy):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.tiny import tiny_model

    x = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(1)).cuda()
    model = tiny_model("olmoe", dtype=torch.bfloat16, attn_implementation="eager").cuda()
    ref = tiny_model("olmoe", attn_implementation="eager").cuda()  # fp32, the same weights
    with torch.no_grad():
        with dmr.patched(ref, policy):
            exact = ref(x).logits.double()
        with dmr.patched(model, policy, validate=False):
            eager = model(x).logits.double()
            torch._dynamo.reset()
            step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            for _ in range(3):  # warm-up, record, replay
                compiled = step(x).logits.double().clone()

    # the compiled bf16 forward is no further from fp32 than the eager bf16 forward is. A threshold
    # policy (TopP) makes discrete keep decisions that a bf16 rounding difference may flip for a
    # near-tie token, in eager and compiled alike but not on the same tokens; such a flip moves that
    # token's logits by a whole expert's share. So the bound is checked per token at the median,
    # which a systematic fault (wrong experts, weights or counts) raises on every token, and on the
    # whole tensor for the policies with no threshold.
    def per_token(out: torch.Tensor) -> torch.Tensor:  # (B*S,)
        return (out - exact).flatten(0, 1).norm(dim=-1) / exact.flatten(0, 1).norm(dim=-1)

    assert per_token(compiled).median() <= 1.5 * per_token(eager).median() + 1e-3
    if not isinstance(policy, (dmr.TopP, dmr.TileAware)):  # TileAware(TopP): TopP's thresholds
        assert rel_err(compiled, exact) <= 1.5 * rel_err(eager, exact) + 1e-3


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("policy", GPU_POLICIES)
def test_cuda_graphs_replay_equals_eager_generate(family, policy):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.tiny import tiny_model

    if family == "gpt_oss" and isinstance(policy, (dmr.BatchAware, dmr.TileAware)):
        pytest.skip("one batch-dependent family is enough; gpt_oss runs the StaticTopK and TopP cases")
    x = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(2)).cuda()
    model = tiny_model(family, dtype=torch.bfloat16, attn_implementation="eager").cuda()

    def run(**kw):  # type: ignore[no-untyped-def]
        with dmr.patched(model, policy, validate=False, **kw) as handle, torch.no_grad():
            logits = model(x).logits  # 30 tokens, first sighting: eager
            again = model(x).logits  # second sighting: captured and replayed
            tokens = model.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            return logits, again, tokens, handle.executed_pairs(), handle

    eager_logits, _, eager_tokens, eager_pairs, _ = run()
    logits, replayed, tokens, pairs, handle = run(cuda_graphs=True)
    # the graphs replay the very kernels eager mode launches: bitwise equal results and counts
    assert torch.equal(logits, eager_logits) and torch.equal(replayed, eager_logits)
    assert torch.equal(tokens, eager_tokens)
    assert pairs == eager_pairs
    caches = handle.graph_caches()
    routers, experts = caches[0::2], caches[1::2]
    # two shapes per site: 30 tokens (prefill) and 3 tokens (decode steps)
    assert all(c.captured == 2 and c.replays >= 7 and c.disabled is None for c in routers)
    if family == "gpt_oss":  # its layout runs a host-synchronising backend: never graphed
        assert all(c.captured == 0 and c.replays == 0 for c in experts)
    else:
        assert all(c.captured == 2 and c.replays >= 7 and c.disabled is None for c in experts)


@pytest.mark.usefixtures("deterministic")
def test_cuda_graphs_run_long_prompts_eagerly_and_recapture_after_set_policy():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.tiny import tiny_model

    model = tiny_model("olmoe", dtype=torch.bfloat16, attn_implementation="eager").cuda()
    long = torch.randint(3, 96, (2, 200), generator=torch.Generator().manual_seed(3)).cuda()  # 400 tokens
    short = long[:, :5]
    with dmr.patched(model, dmr.StaticTopK(), validate=False, cuda_graphs=True) as handle, torch.no_grad():
        model(long)
        model(long)
        assert all(c.captured == 0 and c.replays == 0 for c in handle.graph_caches())  # above 256 tokens
        before = [model(short).logits for _ in range(3)]  # eager, captured, replayed
        assert all(c.captured == 1 and c.replays == 2 for c in handle.graph_caches())
        assert torch.equal(before[0], before[1]) and torch.equal(before[0], before[2])
        handle.set_policy(dmr.TopP(p=0.3))
        routers = handle.graph_caches()[0::2]
        assert all(c.captured == 0 for c in routers)  # router graphs dropped
        eager_before = [c.eager_calls for c in routers]
        after = [model(short).logits for _ in range(2)]
        # the counters are cumulative: one more eager call (first sighting again), one more replay
        assert all(c.captured == 1 and c.replays == 3 for c in routers)
        assert [c.eager_calls for c in routers] == [n + 1 for n in eager_before]
        with dmr.patched(model, dmr.TopP(p=0.3), validate=False, replace=True):
            eager = model(short).logits
    assert torch.equal(after[0], eager) and torch.equal(after[1], eager)  # captured with the new policy
    assert not torch.equal(before[0], eager)


@pytest.mark.usefixtures("deterministic")
def test_cuda_graphs_recapture_when_the_weights_move():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.tiny import tiny_model

    model = tiny_model("mixtral", dtype=torch.bfloat16, attn_implementation="eager").cuda()
    x = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4)).cuda()
    with dmr.patched(model, dmr.TopP(p=0.5), validate=False, cuda_graphs=True) as handle, torch.no_grad():
        model(x)
        model(x)  # captured
        model.cpu()
        for layer in handle.layers:  # new values the old graphs never saw
            layer.router.weight.mul_(-1.0)
            layer.experts.down_proj.mul_(2.0)
        model.cuda()  # and every weight at a new address
        moved = model(x).logits
        assert all(c.recaptures == 1 and c.captured == 1 for c in handle.graph_caches())
        with dmr.patched(model, dmr.TopP(p=0.5), validate=False, replace=True):
            eager = model(x).logits
    assert torch.equal(moved, eager)


@pytest.mark.usefixtures("deterministic")
def test_cuda_graphs_give_up_with_a_warning_on_a_host_syncing_policy():  # type: ignore[no-untyped-def]
    from dataclasses import dataclass

    from dynamic_moe_router.hf.tiny import tiny_model

    @dataclass(frozen=True)
    class Syncing(dmr.TopP):
        def keep_counts(self, ranked_probs, probs, k_min, k_max):  # type: ignore[no-untyped-def]
            from dynamic_moe_router.core import TORCH_OPS

            _ = float(probs.sum())  # a host read: cannot be captured
            return dmr.TopP.keep_counts_ops(self, TORCH_OPS, ranked_probs, probs, k_min, k_max)

    model = tiny_model("olmoe", dtype=torch.bfloat16, attn_implementation="eager").cuda()
    x = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(5)).cuda()
    with dmr.patched(model, Syncing(p=0.5), validate=False, cuda_graphs=True) as handle, torch.no_grad():
        model(x)
        with pytest.warns(RuntimeWarning, match="cannot be captured"):
            out = model(x).logits
        routers = handle.graph_caches()[0::2]
        assert all(c.disabled is not None and c.captured == 0 for c in routers)
        torch.cuda.empty_cache()  # the allocator is intact: no capture was left open
        with dmr.patched(model, Syncing(p=0.5), validate=False, replace=True):
            assert torch.equal(out, model(x).logits)


@pytest.mark.usefixtures("deterministic")
def test_cuda_graphs_with_a_router_input_that_is_none():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.tiny import tiny_model

    # lfm2_moe without an expert bias: its block calls gate(h, None)
    model = tiny_model(
        "lfm2_moe", use_expert_bias=False, dtype=torch.bfloat16, attn_implementation="eager"
    ).cuda()
    x = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        with dmr.patched(model, dmr.TopP(p=0.5), validate=False):
            eager = model(x).logits
        with dmr.patched(model, dmr.TopP(p=0.5), validate=False, cuda_graphs=True) as handle:
            runs = [model(x).logits for _ in range(3)]  # eager, captured, replayed
            routers = handle.graph_caches()[0::2]
    assert all(c.captured == 1 and c.replays == 2 and c.disabled is None for c in routers), routers
    # the captured and replayed runs reproduce the same patch's eager run bit for bit
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])
    assert torch.isfinite(eager).all() and runs[0].shape == eager.shape


# -- fused routing (issue 11, item 1) ----------------------------------------------------------------
@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen3_moe"])
@pytest.mark.parametrize(
    "policy", [dmr.StaticTopK(), dmr.TopP(p=0.5), dmr.EntropyAdaptive(low=0.3, high=0.9)]
)
def test_fused_routing_generate_eager_graphs_and_compiled(family, policy):  # type: ignore[no-untyped-def]
    """The fused kernel gives the ordinary routing's tokens in eager generate(); CUDA graphs replay it
    bit for bit; the compiled static-cache recipe runs it (torch.compile traces the Triton launch)."""
    from dynamic_moe_router.hf.tiny import tiny_model

    x = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(3)).cuda()
    model = tiny_model(family, attn_implementation="eager").cuda()  # fp32: tokens compared exactly
    with dmr.patched(model, policy, validate=False):
        ordinary = _static_generate(model, x, compiled=False, new=8)
    with dmr.patched(model, policy, validate=False, fused_routing=True) as handle:
        assert all(r.fused_reason is None for r in handle.routers)
        fused = _static_generate(model, x, compiled=False, new=8)
    assert torch.equal(fused, ordinary)
    bf16 = tiny_model(family, dtype=torch.bfloat16, attn_implementation="eager").cuda()
    with dmr.patched(bf16, policy, validate=False, fused_routing=True), torch.no_grad():
        eager_logits = bf16(x).logits
        eager = _static_generate(bf16, x, compiled=False, new=8)
    with dmr.patched(bf16, policy, validate=False, fused_routing=True, cuda_graphs=True), torch.no_grad():
        assert torch.equal(bf16(x).logits, eager_logits) and torch.equal(bf16(x).logits, eager_logits)
        assert torch.equal(_static_generate(bf16, x, compiled=False, new=8), eager)
    torch._dynamo.reset()
    with dmr.patched(bf16, policy, validate=False, fused_routing=True):
        compiled = _static_generate(bf16, x, compiled=True, new=8)
        assert torch.equal(_static_generate(bf16, x, compiled=True, new=8), compiled)  # replay is stable
    assert compiled.shape == eager.shape and torch.equal(compiled[:, 10], eager[:, 10])
