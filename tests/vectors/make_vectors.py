"""Generate the cross-framework parity vectors with torch, the reference implementation.

Run from the repository root: ``python tests/vectors/make_vectors.py``. It writes
``tests/vectors/routing.npz`` (routing cases) and ``tests/vectors/layer.npz`` (a small dynamic MoE
layer). ``tests/test_vectors_torch.py`` checks that torch still reproduces them and
``tests/test_jax.py`` (and the Keras tests) that the other backends do.

Routing cases: every policy type (StaticTopK native and reduced, TopP, RelativeThreshold,
EntropyAdaptive, PerLayer resolved at an overridden and at a default layer) x normalize
none/sum/softmax x four input kinds:

* ``softmax``: scores = probs = gate = a softmax;
* ``separate``: ranking scores, a different policy distribution and a different gate;
* ``excluded``: some candidates scored ``-inf`` (never kept), probs zero there;
* ``ties``: logits on an integer grid, so many scores tie exactly. The expected ids follow the
  cross-framework tie rule (lower index first, ``spec.TorchOps(stable_ties=True)``); torch.topk's
  own order among ties differs, so for these cases ``dmr.route`` is only compared up to the order
  of tied candidates (its counts and weights are identical).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router import core as spec
from dynamic_moe_router.policies import policy_to_dict

HERE = Path(__file__).parent
NUM_TOKENS, NUM_EXPERTS, NATIVE_K = 7, 8, 2

POLICIES: list[tuple[dmr.RoutingPolicy, int | None]] = [
    (dmr.StaticTopK(), None),
    (dmr.StaticTopK(k=1), None),
    (dmr.TopP(p=0.6), None),
    (dmr.TopP(p=0.9, min_k=1, max_k=4), None),
    (dmr.RelativeThreshold(beta=0.3), None),
    (dmr.RelativeThreshold(beta=0.6, min_k=0, max_k=5), None),
    (dmr.EntropyAdaptive(min_k=1, max_k=4), None),
    (dmr.EntropyAdaptive(min_k=0, max_k=3, low=0.2, high=0.8), None),
    (dmr.PerLayer(dmr.TopP(p=0.5), {2: dmr.RelativeThreshold(beta=0.4, max_k=3)}), 2),
    (dmr.PerLayer(dmr.TopP(p=0.5), {2: dmr.RelativeThreshold(beta=0.4, max_k=3)}), 0),
]
NORMALIZE = ("none", "sum", "softmax")
KINDS = ("softmax", "separate", "excluded", "ties")


def _inputs(kind: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``scores``, ``probs`` and ``gate`` (T, E) float32 for one input kind."""
    temperature = torch.linspace(0.3, 3.0, NUM_TOKENS).unsqueeze(1)  # confident ... uncertain tokens
    logits = torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=g) / temperature
    if kind == "ties":
        logits = torch.randint(-1, 2, (NUM_TOKENS, NUM_EXPERTS), generator=g).float()
        logits[0] = 0.0  # all experts tied
    probs = torch.softmax(logits, -1)
    if kind == "softmax" or kind == "ties":
        return {"scores": probs, "probs": probs, "gate": logits}
    if kind == "separate":
        scores = probs + 0.05 * torch.rand(NUM_TOKENS, NUM_EXPERTS, generator=g)  # e.g. a selection bias
        return {"scores": scores, "probs": probs, "gate": logits}
    excluded = torch.rand(NUM_TOKENS, NUM_EXPERTS, generator=g) < 0.4
    excluded[:, 0] = False
    excluded[1, 1:] = True  # one token with a single candidate left
    scores = probs.masked_fill(excluded, float("-inf"))
    masked = probs.masked_fill(excluded, 0.0)
    return {"scores": scores, "probs": masked / masked.sum(-1, keepdim=True), "gate": logits}


def routing_cases() -> tuple[dict[str, np.ndarray], list[dict]]:
    g = torch.Generator().manual_seed(20260501)
    arrays: dict[str, np.ndarray] = {}
    manifest: list[dict] = []
    for kind in KINDS:
        inputs = _inputs(kind, g)
        for policy, layer in POLICIES:
            for normalize in NORMALIZE:
                i = len(manifest)
                gate = inputs["gate"] if normalize == "softmax" else inputs["probs"]
                ops = spec.TorchOps(stable_ties=True)
                r = spec.route(
                    ops,
                    inputs["scores"],
                    policy,
                    native_k=NATIVE_K,
                    probs=inputs["probs"],
                    gate=gate,
                    normalize=normalize,
                    scaling=1.5,
                    layer=layer,
                )
                if kind != "ties":  # no ties: the library's own route gives the same bits
                    ref = dmr.route(
                        inputs["scores"],
                        policy,
                        native_k=NATIVE_K,
                        probs=inputs["probs"],
                        gate=gate,
                        normalize=normalize,
                        scaling=1.5,
                        layer=layer,
                    )
                    assert torch.equal(ref.ids, r.ids) and torch.equal(ref.weights, r.weights)
                for name, value in (
                    ("scores", inputs["scores"]),
                    ("probs", inputs["probs"]),
                    ("gate", gate),
                    ("ids", r.ids.to(torch.int32)),
                    ("weights", r.weights),
                    ("counts", r.counts.to(torch.int32)),
                ):
                    arrays[f"{i}/{name}"] = value.numpy()
                manifest.append(
                    {
                        "kind": kind,
                        "policy": policy_to_dict(policy),
                        "layer": layer,
                        "normalize": normalize,
                        "scaling": 1.5,
                        "native_k": NATIVE_K,
                    }
                )
    return arrays, manifest


class _Experts(torch.nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(gate_up)
        self.down_proj = torch.nn.Parameter(down)
        self.act_fn = torch.nn.SiLU()


def layer_case() -> dict[str, np.ndarray]:
    """A router + SwiGLU experts layer with a dynamic policy: some tokens keep no expert (min_k=0),
    expert 7 gets no token."""
    g = torch.Generator().manual_seed(7)
    tokens, hidden_size, inter, experts = 12, 16, 24, 8
    hidden = torch.randn(tokens, hidden_size, generator=g) + 0.5  # (T, H), positive mean
    router = torch.randn(experts, hidden_size, generator=g)  # (E, H)
    router[7] = -2.0  # logit_7 = -2 * sum(x): about -16, never ranked high
    hidden[:4] *= 4.0  # confident tokens: peaked router softmax, entropy below `low`
    gate_up = torch.randn(experts, 2 * inter, hidden_size, generator=g) * 0.2  # (E, 2I, H)
    down = torch.randn(experts, hidden_size, inter, generator=g) * 0.2  # (E, H, I)
    policy = dmr.EntropyAdaptive(min_k=0, max_k=3, low=0.3, high=0.9)
    probs = torch.softmax(hidden @ router.T, -1)  # (T, E)
    r = dmr.route(probs, policy, native_k=2, normalize="sum")
    out = dmr.experts_forward(_Experts(gate_up, down), hidden, r.ids, r.weights, backend="loop")
    counts = r.counts
    assert (counts == 0).any() and (counts > 0).any(), counts
    assert not (r.ids == 7).any()
    return {
        "hidden": hidden.numpy(),
        "router": router.numpy(),
        "gate_up": gate_up.numpy(),
        "down": down.numpy(),
        "ids": r.ids.to(torch.int32).numpy(),
        "weights": r.weights.numpy(),
        "counts": counts.to(torch.int32).numpy(),
        "out": out.detach().numpy(),
        "policy": np.array(json.dumps(policy_to_dict(policy), sort_keys=True)),
        "native_k": np.array(2),
    }


def main() -> None:
    torch.manual_seed(0)
    arrays, manifest = routing_cases()
    arrays["manifest"] = np.array(json.dumps(manifest, sort_keys=True))
    np.savez_compressed(HERE / "routing.npz", **arrays)
    np.savez_compressed(HERE / "layer.npz", **layer_case())
    sizes = {p.name: p.stat().st_size for p in sorted(HERE.glob("*.npz"))}
    print(f"{len(manifest)} routing cases; files {sizes}")


if __name__ == "__main__":
    main()
