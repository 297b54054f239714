"""``patch(..., cuda_graphs=True)`` on CPU: option checks and the eligibility rule (the replay
itself is tested on the GPU, in ``tests/test_cuda.py``)."""

from __future__ import annotations

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.graphs import GraphCache, graph_ineligible
from dynamic_moe_router.hf.tiny import tiny_model


def test_cuda_graphs_option_is_validated_and_nothing_is_patched():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    with pytest.raises(dmr.PolicyError, match="cuda_graphs must be True or False"):
        dmr.patch(model, dmr.TopP(p=0.5), cuda_graphs="yes")  # type: ignore[arg-type]
    with pytest.raises(dmr.PolicyError, match="choose one"):
        dmr.patch(model, dmr.TopP(p=0.5), cuda_graphs=True, compile_routing=True)
    with pytest.raises(dmr.PolicyError, match=r"needs the model's experts on a CUDA device.*model\.cuda\(\)"):
        dmr.patch(model, dmr.TopP(p=0.5), cuda_graphs=True)
    assert dmr.get_patch(model) is None


def test_graph_ineligible_names_the_reason():  # type: ignore[no-untyped-def]
    assert "not CUDA tensors" in (graph_ineligible([torch.zeros(4, 8)], max_tokens=16) or "")


def test_graph_cache_leaves_cpu_calls_to_the_caller():  # type: ignore[no-untyped-def]
    calls = []

    def fn(x):  # type: ignore[no-untyped-def]
        calls.append(x)
        return (x * 2,)

    cache = GraphCache("test site")
    assert cache(fn, torch.ones(3, 4)) is None  # eager: the caller runs fn itself
    assert (calls, cache.captured, cache.replays, cache.disabled) == ([], 0, 0, None)


def test_state_key_changes_when_a_weight_is_replaced():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.graphs import module_state, state_key

    layer = torch.nn.Linear(4, 4)
    before = state_key(module_state(layer))
    assert state_key(module_state(layer)) == before  # stable while nothing moves
    with torch.no_grad():
        layer.weight.copy_(torch.zeros(4, 4))  # in place: the graph reads the new values, no recapture
    assert state_key(module_state(layer)) == before
    layer.weight = torch.nn.Parameter(torch.zeros(4, 4))  # replaced: a new address
    assert state_key(module_state(layer)) != before
    layer.half()  # cast: new storage and dtype
    assert state_key(module_state(layer)) != before
