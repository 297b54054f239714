"""``patch(..., compile_routing=True)``: the routing runs through ``torch.compile`` with identical results."""

from __future__ import annotations

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf import patching
from dynamic_moe_router.hf.tiny import tiny_model


def test_compile_routing_option_is_validated():  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral")
    with pytest.raises(dmr.PolicyError, match="compile_routing must be True or False"):
        dmr.patch(model, dmr.TopP(p=0.5), compile_routing="yes")  # type: ignore[arg-type]
    assert dmr.get_patch(model) is None


@pytest.mark.slow
def test_compiled_routing_matches_eager_routing_with_inductor():  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe")
    x = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(x).logits
        with dmr.patched(model, dmr.TopP(p=0.5)) as eager:
            dyn = model(x).logits
        with dmr.patched(model, dmr.TopP(p=0.5), compile_routing=True) as compiled:
            dyn_compiled = model(x).logits
            assert compiled.executed_pairs() == eager.executed_pairs() < 2 * 9 * 2 * 2
            compiled.set_policy(dmr.StaticTopK())  # a new policy recompiles
            static_compiled = model(x).logits
    torch.testing.assert_close(dyn_compiled, dyn, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(static_compiled, native, atol=1e-5, rtol=1e-5)


def test_every_layer_is_compiled_past_dynamos_default_limit(monkeypatch):  # type: ignore[no-untyped-def]
    """12 per-layer policies > dynamo's 8 entries per code object: none may fall back to eager."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(patching, "_COMPILE_BACKEND", "eager")  # fast: tracing only
    model = tiny_model("mixtral", num_hidden_layers=12)
    x = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    policy = dmr.PerLayer(
        default=dmr.TopP(p=0.5), overrides={i: dmr.TopP(p=0.05 + 0.07 * i) for i in range(12)}
    )
    with torch.no_grad():
        with dmr.patched(model, policy):
            ref = model(x).logits
        with dmr.patched(model, policy, compile_routing=True):
            out = model(x).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert counters["stats"]["unique_graphs"] >= 12  # one graph per layer: none hit the limit
