"""torch, the reference, still reproduces the stored cross-framework vectors (tests/vectors/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router import core as spec
from dynamic_moe_router.policies import policy_from_dict

VECTORS = Path(__file__).parent / "vectors"
ROUTING = np.load(VECTORS / "routing.npz")
MANIFEST = json.loads(str(ROUTING["manifest"]))


def case(i: int) -> tuple[dict, dict[str, torch.Tensor]]:
    names = ("scores", "probs", "gate", "ids", "weights", "counts")
    return MANIFEST[i], {n: torch.from_numpy(ROUTING[f"{i}/{n}"]) for n in names}


def route_kwargs(meta: dict, arrays: dict[str, torch.Tensor]) -> dict:
    return {
        "native_k": meta["native_k"],
        "probs": arrays["probs"],
        "gate": arrays["gate"],
        "normalize": meta["normalize"],
        "scaling": meta["scaling"],
        "layer": meta["layer"],
    }


def test_vectors_cover_every_policy_type_mode_and_input_kind():  # type: ignore[no-untyped-def]
    types = {m["policy"]["_type"] for m in MANIFEST}
    assert types == {"static_top_k", "top_p", "relative_threshold", "entropy", "per_layer"}
    assert {m["normalize"] for m in MANIFEST} == {"none", "sum", "softmax"}
    assert {m["kind"] for m in MANIFEST} == {"softmax", "separate", "excluded", "ties"}
    counts = np.concatenate([ROUTING[f"{i}/counts"] for i in range(len(MANIFEST))])
    assert counts.min() == 0 and counts.max() == 5  # tokens with nothing kept, and max_k > native k
    assert sum(f.stat().st_size for f in VECTORS.glob("*.npz")) < 2**20


@pytest.mark.parametrize("i", range(len(MANIFEST)))
def test_torch_reproduces_routing_vectors(i):  # type: ignore[no-untyped-def]
    meta, arrays = case(i)
    policy = policy_from_dict(meta["policy"])
    kwargs = route_kwargs(meta, arrays)
    stable = spec.route(spec.TorchOps(stable_ties=True), arrays["scores"], policy, **kwargs)
    assert torch.equal(stable.ids.to(torch.int32), arrays["ids"])
    assert torch.equal(stable.counts.to(torch.int32), arrays["counts"])
    torch.testing.assert_close(stable.weights, arrays["weights"], rtol=0, atol=1e-6)
    r = dmr.route(arrays["scores"], policy, **kwargs)
    assert torch.equal(r.counts.to(torch.int32), arrays["counts"])
    torch.testing.assert_close(r.weights, arrays["weights"], rtol=0, atol=1e-6)
    if meta["kind"] == "ties":  # torch.topk orders tied candidates its own way: same scores, same weights
        kept = r.kept
        picked = arrays["scores"].gather(1, r.ids.clamp(max=r.num_experts - 1)) * kept
        expected = arrays["scores"].gather(1, arrays["ids"].long().clamp(max=r.num_experts - 1)) * kept
        assert torch.equal(picked, expected)
        assert torch.equal(kept, arrays["ids"] < r.num_experts)
    else:
        assert torch.equal(r.ids.to(torch.int32), arrays["ids"])


def test_torch_reproduces_layer_vector():  # type: ignore[no-untyped-def]
    z = np.load(VECTORS / "layer.npz")
    t = {k: torch.from_numpy(z[k]) for k in ("hidden", "router", "gate_up", "down", "ids", "weights", "out")}
    policy = policy_from_dict(json.loads(str(z["policy"])))
    probs = torch.softmax(t["hidden"] @ t["router"].T, -1)
    r = dmr.route(probs, policy, native_k=int(z["native_k"]), normalize="sum")
    assert torch.equal(r.ids.to(torch.int32), t["ids"])
    torch.testing.assert_close(r.weights, t["weights"], rtol=0, atol=1e-6)
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(t["gate_up"])
    experts.down_proj = torch.nn.Parameter(t["down"])
    experts.act_fn = torch.nn.SiLU()
    out = dmr.experts_forward(experts, t["hidden"], r.ids, r.weights, backend="loop")
    torch.testing.assert_close(out, t["out"], rtol=0, atol=1e-5)
    assert (r.counts == 0).any() and not (r.ids == 7).any()  # a token with no expert, an expert with no token
