"""profile(): counts, FLOP accounting, and the separation of routed from dense FLOPs."""

from __future__ import annotations

import json

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.layers import find_moe_layers
from dynamic_moe_router.hf.tiny import tiny_model

X = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_unpatched_model_reports_native_routing():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    with dmr.profile(model) as report:
        model(X)
    d = report.to_dict()
    assert d["policy"] == "native (unpatched)"
    assert d["tokens"] == 20 and d["executed_pairs"] == d["native_pairs"] == 20 * 2 * 2
    assert d["routed_flop_reduction"] == 0.0 and d["total_flop_reduction"] == 0.0
    assert d["k_histogram"] == {"0": 0, "1": 0, "2": 40}


@torch.no_grad()
def test_accounting_identities():  # type: ignore[no-untyped-def]
    model = tiny_model("qwen2_moe")
    layers = find_moe_layers(model)[0]
    with dmr.patched(model, dmr.TopP(p=0.4)), dmr.profile(model) as report:
        model(X)
    d = report.to_dict()
    assert d["moe_layers"] == len(layers) == len(d["layers"])
    assert sum(d["k_histogram"].values()) == d["tokens"] * len(layers)
    assert sum(int(k) * n for k, n in d["k_histogram"].items()) == d["kept_pairs"]
    fpp = layers[0].flops_per_pair
    assert fpp == 6 * 32 * 24
    assert d["routed_flops"] == d["executed_pairs"] * fpp
    assert d["native_routed_flops"] == d["tokens"] * 4 * fpp * len(layers)
    assert d["routed_flop_reduction"] == pytest.approx(1 - d["executed_pairs"] / d["native_pairs"])
    # shared expert: 3 linears of 32x40 (gate, up, down) + the 32x1 gate, per token and MoE layer
    assert d["shared_expert_flops"] == 20 * len(layers) * (3 * 2 * 32 * 40 + 2 * 32)
    assert d["attention_flops"] > 0 and d["other_flops"] > 0
    dense = d["shared_expert_flops"] + d["attention_flops"] + d["other_flops"]
    assert d["total_flop_reduction"] == pytest.approx(
        (d["native_routed_flops"] - d["routed_flops"]) / (d["native_routed_flops"] + dense)
    )
    assert 0 < d["total_flop_reduction"] < d["routed_flop_reduction"]
    json.dumps(d)  # JSON-ready
    text = report.summary()
    assert "routed-expert FLOPs" in text and "whole model" in text and "shared-expert FLOPs" in text


@torch.no_grad()
def test_attention_flops_are_counted_including_scores():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    with dmr.profile(model) as report:
        model(X)
    d = report.to_dict()
    projections = 2 * 20 * (32 * 32 + 2 * 32 * 16 + 32 * 32) * 2  # q, k, v, o per token and layer
    scores = 2 * (2 * 2 * 4 * 10 * 10 * 8) * 2  # QK^T and AV, batch 2, 4 heads, 10x10, d=8, 2 layers
    assert d["attention_flops"] == projections + scores


@torch.no_grad()
def test_count_dense_false_skips_the_flop_counter():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    with dmr.patched(model, dmr.TopP(p=0.5)), dmr.profile(model, count_dense=False) as report:
        model(X)
    d = report.to_dict()
    assert not d["dense_flops_measured"] and d["other_flops"] == 0 and d["executed_pairs"] > 0


@torch.no_grad()
def test_more_experts_than_native_is_reported_honestly():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    with dmr.patched(model, dmr.StaticTopK(k=3)), dmr.profile(model, count_dense=False) as report:
        model(X)
    assert report.to_dict()["routed_flop_reduction"] == pytest.approx(-0.5)
