"""Dynamic routing under transformers' expert parallelism: two processes on gloo (CPU).

The models are loaded by ``tests/distributed/ep_worker.py`` under ``torchrun --standalone
--nproc_per_node 2`` with ``DistributedConfig(tp_size=2, ep_size=2)``; the worker writes each rank's
measurements as JSON and the assertions are made here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.parallel import ExpertShard, check_world_size, expert_parallel_config

WORKER = Path(__file__).parent / "distributed" / "ep_worker.py"


def _has_ep_plan(family: str) -> bool:
    from dynamic_moe_router.hf.tiny import tiny_config

    return bool(getattr(tiny_config(family), "base_model_ep_plan", None))


# the families this transformers release can split (5.17 has no expert-parallel plan for granitemoe)
FAMILIES = tuple(f for f in dmr.supported_families() if _has_ep_plan(f))


def _gloo() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every family's measurements from both ranks (one torchrun for all families)."""
    if not _gloo():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    from dynamic_moe_router.hf.tiny import tiny_model

    root = tmp_path_factory.mktemp("ep")
    models = []
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / family)
        models += ["--model", str(root / family)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, str(WORKER)]
    done = subprocess.run(
        [*cmd, *models, "--out", str(root / "out")], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {
        family: [json.loads((root / "out" / family / f"rank{r}.json").read_text()) for r in (0, 1)]
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_really_splits_the_experts(ep_results, family):  # type: ignore[no-untyped-def]
    for rank, res in enumerate(ep_results[family]):
        assert res["world"] == 2 and res["rank"] == rank
        assert res["local_experts"] * 2 == res["num_experts"]  # half the experts per rank
        assert res["own_weights_equal"]  # and they are this rank's slice of the whole model's
        assert res["unpatched_vs_single"] < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dispatch", ["all_reduce", "all_to_all"])
def test_static_topk_reproduces_the_unpatched_and_single_process_model(ep_results, family, dispatch):  # type: ignore[no-untyped-def]
    for res in ep_results[family]:
        assert res[f"{dispatch}/static_vs_unpatched"] < 1e-5
        assert res[f"{dispatch}/static_vs_single"] < 1e-5
        assert res[f"{dispatch}/static_tokens_equal"]  # greedy generate(), a left-padded row included
        profile = res[f"{dispatch}/static_profile"]  # zero-computation experts' pairs are not executed
        assert profile["executed_pairs"] + profile["zero_expert_pairs"] == profile["native_pairs"]
        assert profile["zero_expert_pairs"] == profile["native_zero_expert_pairs"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dispatch", ["all_reduce", "all_to_all"])
def test_dynamic_routing_matches_single_process_dynamic_routing(ep_results, family, dispatch):  # type: ignore[no-untyped-def]
    for res in ep_results[family]:
        assert res[f"{dispatch}/dynamic_vs_single"] < 1e-5
        assert res[f"{dispatch}/dynamic_tokens_equal"]
        # one token (the other rank's slice is empty), odd counts (uneven slices)
        small = res[f"{dispatch}/small_batches_vs_single"]
        assert set(small) == {"(1, 1)", "(1, 3)", "(3, 5)"} and max(small.values()) < 1e-5, small
        ep, single = res[f"{dispatch}/dynamic_profile"], res[f"{dispatch}/single_dynamic_profile"]
        # pairs counted across ranks: the sum of both ranks' experts equals the single process's count
        assert ep["executed_pairs"] == single["executed_pairs"] < single["native_pairs"]
        per_rank = ep["expert_parallel"]["rank_executed_pairs"]
        assert len(per_rank) == 2 and sum(per_rank) == ep["executed_pairs"]
        assert ep["expert_parallel"]["load_imbalance"] == max(per_rank) / (sum(per_rank) / 2)
        for layer in ep["layers"]:
            assert sum(layer["rank_executed_pairs"]) == layer["executed_pairs"]
    # both ranks report the same totals
    first, second = (r[f"{dispatch}/dynamic_profile"] for r in ep_results[family])
    assert first["expert_parallel"] == second["expert_parallel"]


def _sent(exchange: list[dict[str, int]], *keys: str) -> int:
    return sum(layer[key] for layer in exchange for key in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_all_to_all_dispatcher_sends_fewer_bytes_when_pairs_are_dropped(ep_results, family):  # type: ignore[no-untyped-def]
    for res in ep_results[family]:
        static, dynamic = res["all_to_all/static_exchange"], res["all_to_all/dynamic_exchange"]
        pairs_static = res["all_to_all/static_profile"]["executed_pairs"]
        pairs_dynamic = res["all_to_all/dynamic_profile"]["executed_pairs"]
        assert pairs_dynamic < pairs_static
        moved_static = _sent(static, "dispatch_bytes", "combine_bytes")
        moved_dynamic = _sent(dynamic, "dispatch_bytes", "combine_bytes")
        assert moved_dynamic < moved_static
        # the pairs sent are exactly the kept pairs of this rank's slice that the other rank's
        # experts hold (computed from the single-process routing), layer by layer
        assert [layer["pairs_sent"] for layer in dynamic] == res["all_to_all/expected_pairs_sent"]
        assert sum(res["all_to_all/expected_pairs_sent"]) > 0
        # the all-reduce combine moves the same bytes whatever the routing
        assert (
            _sent(res["all_reduce/static_exchange"], "reduce_bytes")
            == _sent(res["all_reduce/dynamic_exchange"], "reduce_bytes")
            > 0
        )
    # what one rank sends the other receives
    (a, b) = ep_results[family]
    assert _sent(a["all_to_all/dynamic_exchange"], "pairs_sent") == _sent(
        b["all_to_all/dynamic_exchange"], "pairs_received"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_transformers_dispatch_bit_exactly(ep_results, family):  # type: ignore[no-untyped-def]
    for res in ep_results[family]:
        assert res["unpatch_bit_exact"]
        assert res["forward_restored"]  # the very forward transformers installed (ep_forward / tp_forward)
        assert res["grad_error"] is not None and "inference only" in res["grad_error"]


# -- single-process checks ---------------------------------------------------------------------------


def test_local_routes_keep_this_ranks_experts_only() -> None:
    ids = torch.tensor([[0, 5, 8], [7, 2, 3]])  # 8 experts, 8 = dropped
    assert ExpertShard(None, rank=0, size=2, num_local=4).local_routes(ids).tolist() == [[0, 4, 4], [4, 2, 3]]
    assert ExpertShard(None, rank=1, size=2, num_local=4).local_routes(ids).tolist() == [[4, 1, 4], [3, 4, 4]]


def test_a_bad_world_size_is_refused_before_loading() -> None:
    from dynamic_moe_router.hf.tiny import tiny_config

    config = tiny_config("mixtral")  # 8 experts
    with pytest.raises(dmr.ExpertParallelError, match=r"do not split evenly over 3 ranks.*divides 8"):
        expert_parallel_config(config, world_size=3)
    distributed = expert_parallel_config(config, world_size=2)
    assert distributed.tp_size == 2 and distributed.enable_expert_parallel
    assert getattr(distributed, "ep_size", 2) == 2  # transformers 5.17 has no ep_size
    with pytest.raises(dmr.ExpertParallelError, match="over 0 ranks"):
        check_world_size(8, 0)


def test_an_unsupported_family_is_refused_before_loading() -> None:
    from transformers import LlamaConfig

    with pytest.raises(dmr.UnsupportedModelError, match=r"'llama' is not a supported family"):
        expert_parallel_config(LlamaConfig(), world_size=2)


def test_an_invalid_dispatch_is_a_policy_error() -> None:
    from dynamic_moe_router.hf.tiny import tiny_model

    model = tiny_model("olmoe")
    expected = r"dispatch must be one of \('auto', 'all_reduce', 'all_to_all'\)"
    with pytest.raises(dmr.PolicyError, match=expected):
        dmr.patch(model, dispatch="nccl")
    assert dmr.get_patch(model) is None


def test_every_dispatch_has_a_dispatcher_and_shard_forward_refuses_an_unknown_one() -> None:
    from dynamic_moe_router.hf.parallel import _DISPATCHERS, DISPATCHES, ExchangeCounter, shard_forward

    assert tuple(_DISPATCHERS) == DISPATCHES
    shard, exchange = ExpertShard(group=None, rank=0, size=1, num_local=2), ExchangeCounter()
    hidden, ids, weights = torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    expected = r"dispatch must be one of \('auto', 'all_reduce', 'all_to_all'\)"
    with pytest.raises(dmr.PolicyError, match=expected):
        shard_forward(shard, "nccl", lambda h, i, w: h, hidden, ids, weights, exchange)  # pyright: ignore[reportCallIssue]
    assert exchange.calls == 0


def test_dispatch_is_ignored_on_a_model_in_one_process() -> None:
    from dynamic_moe_router.hf.tiny import tiny_model

    model = tiny_model("mixtral")
    ids = torch.tensor([[5, 6, 7, 8]])
    with dmr.patched(model, dmr.TopP(p=0.5)):
        expected = model(ids).logits
    with dmr.patched(model, dmr.TopP(p=0.5), dispatch="all_to_all") as handle:
        assert torch.equal(model(ids).logits, expected)
        assert all(e.shard is None and e.exchange.calls == 0 for e in handle.experts)


def test_the_two_gpu_benchmark_runs_end_to_end_on_cpu_with_a_tiny_model(tmp_path: Path) -> None:
    if not _gloo():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    script = Path(__file__).parents[1] / "benchmarks" / "bench_ep.py"
    out = tmp_path / "ep.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--device", "cpu", "--shapes", "tiny", "--prefill", "48", "--decode-batches", "2"]
    args += ["--steps", "2", "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*torchrun, str(script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "ep_cpu" and data["machine"]["ranks"] == 2
    cells = {(c["workload"], c["variant"]): c for c in data["cells"]}
    variants = ("unpatched", "static", "dynamic", "a2a_static", "a2a_dynamic")
    assert set(cells) == {(w, v) for w in ("prefill", "decode") for v in variants}
    for workload in ("prefill", "decode"):
        static, dynamic = cells[workload, "a2a_static"], cells[workload, "a2a_dynamic"]
        assert dynamic["executed_pairs"] < static["executed_pairs"] == static["native_pairs"]
        assert sum(dynamic["pair_bytes_per_rank"]) < sum(static["pair_bytes_per_rank"])
        for cell in (static, dynamic, cells[workload, "static"]):
            assert sum(cell["rank_executed_pairs"]) == cell["executed_pairs"]
            assert cell["load_imbalance"] >= 1.0 and cell["ms"] > 0
    # the all-reduce combine sends what transformers' own layer sends
    reduced = [cells["prefill", v]["bytes_sent_per_rank"] for v in ("static", "unpatched")]
    assert reduced[0] == reduced[1]
    sys.path.insert(0, str(script.parent))
    try:
        from render_parallel import render_ep
    finally:
        sys.path.remove(str(script.parent))
    data["machine"]["device"] = "CPU"
    table = "\n".join(render_ep(data, out))
    assert "| tiny | prefill 48 | a2a_dynamic |" in table and "all_to_all bytes cut" in table


# -- one process: the layouts the patch refuses, and the dispatch code on a one-rank group -----------


@pytest.fixture
def one_rank_group(tmp_path: Path):  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    if not _gloo():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _shard_experts(model: torch.nn.Module, placement: Any) -> None:
    """Replace every layer's expert weights by DTensors placed as ``placement`` on a 1-rank mesh."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from dynamic_moe_router.hf.layers import find_moe_layers

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    for layer in find_moe_layers(model)[0]:
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(layer.experts, name).detach()
            sharded = distribute_tensor(weight, mesh, [placement])
            layer.experts._parameters[name] = torch.nn.Parameter(sharded, requires_grad=False)


def test_tensor_parallel_experts_are_refused(one_rank_group) -> None:  # type: ignore[no-untyped-def]
    from torch.distributed.tensor import Shard

    from dynamic_moe_router.hf.tiny import tiny_model

    model = tiny_model("mixtral")
    _shard_experts(model, Shard(1))  # split inside each expert: tensor parallelism
    with pytest.raises(dmr.ExpertParallelError, match=r"split as \(Shard\(dim=1\),\).*nothing was patched"):
        dmr.patch(model, dmr.TopP(p=0.5))
    assert dmr.get_patch(model) is None


def test_ranks_holding_different_batches_are_refused(one_rank_group) -> None:  # type: ignore[no-untyped-def]
    from torch.distributed.tensor import Shard

    from dynamic_moe_router.hf.layers import find_moe_layers
    from dynamic_moe_router.hf.tiny import tiny_model

    class AllToAllLike:  # what transformers' EPImplementation exposes, with ep_size > tp_size
        ep_mesh, experts_forward, shares_batch = None, None, False

    model = tiny_model("mixtral")
    _shard_experts(model, Shard(0))
    impl = AllToAllLike()

    def ep_forward(hidden, top_k_index, top_k_weights):  # type: ignore[no-untyped-def]
        return impl.experts_forward(hidden, top_k_index, top_k_weights)  # impl: a closure cell

    for layer in find_moe_layers(model)[0]:
        layer.experts.forward = ep_forward
    with pytest.raises(dmr.ExpertParallelError, match=r"hold different batches.*nothing was patched"):
        dmr.patch(model)
    assert dmr.get_patch(model) is None


@pytest.mark.parametrize("dispatch", ["all_reduce", "all_to_all"])
def test_a_one_rank_expert_parallel_model_matches_the_plain_model(one_rank_group, dispatch) -> None:  # type: ignore[no-untyped-def]
    from torch.distributed.tensor import Shard

    from dynamic_moe_router.hf.tiny import tiny_model

    model = tiny_model("olmoe")
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), dmr.patched(model, dmr.TopP(p=0.5)) as plain:
        expected = model(ids).logits
    _shard_experts(model, Shard(0))
    with torch.no_grad(), dmr.patched(model, dmr.TopP(p=0.5), dispatch=dispatch) as handle:
        got = model(ids).logits
    assert all(e.shard is not None and e.shard.size == 1 for e in handle.experts)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert handle.executed_pairs() == plain.executed_pairs()
    assert all(e.exchange.calls == 1 and e.exchange.bytes_sent == 0 for e in handle.experts)  # one rank
