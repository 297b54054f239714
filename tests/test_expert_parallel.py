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
        profile = res[f"{dispatch}/static_profile"]
        assert profile["executed_pairs"] == profile["native_pairs"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dispatch", ["all_reduce", "all_to_all"])
def test_dynamic_routing_matches_single_process_dynamic_routing(ep_results, family, dispatch):  # type: ignore[no-untyped-def]
    for res in ep_results[family]:
        assert res[f"{dispatch}/dynamic_vs_single"] < 1e-5
        assert res[f"{dispatch}/dynamic_tokens_equal"]
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
        # the rows exchanged are the kept pairs that cross ranks, nothing else
        assert _sent(static, "pairs_sent") + _sent(static, "pairs_received") < 2 * pairs_static
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
