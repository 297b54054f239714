"""Patched models under the transformers speed recipe: static cache + ``torch.compile`` of the forward.

On CPU the compile uses the ``aot_eager`` backend (dynamo + AOT autograd tracing, no code
generation), which catches what breaks a compiled patched model on any device: Python-side state
changed inside the graph (re-specialisation on every step), host-synchronising checks, ops whose
meta kernels refuse the shapes. ``tests/test_cuda.py`` runs the inductor + CUDA-graph mode on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.tiny import tiny_model

FAMILIES = list(dmr.supported_families())


def _compile_config() -> CompileConfig:
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless asked
    return config


def _generate(model, ids: torch.Tensor, compiled: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    kw = {"cache_implementation": "static", "compile_config": _compile_config()} if compiled else {}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_static_cache_generate_matches_eager(family: str) -> None:
    from torch._dynamo.utils import counters

    model = tiny_model(family).eval()
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    native = _generate(model, ids, compiled=False)
    torch._dynamo.reset()
    with dmr.patched(model, dmr.StaticTopK()) as handle:  # default validate=True: skipped when compiled
        static = _generate(model, ids, compiled=True)
        eager_pairs = handle.executed_pairs()
        graphs = counters["stats"]["unique_graphs"]
        again = _generate(model, ids, compiled=True)
        # a second generate reuses the compiled graphs: nothing re-specialised per call or step
        assert counters["stats"]["unique_graphs"] == graphs
        assert handle.executed_pairs() - eager_pairs <= eager_pairs  # compiled steps are not counted
    assert torch.equal(static, native)
    assert torch.equal(again, native)
    tile = dmr.TileAware(dmr.TopP(p=0.5), rows=4)  # 14 prompt tokens x 2 slots: whole tiles move
    for policy in (dmr.TopP(p=0.5), dmr.BatchAware(dmr.TopP(p=0.8), experts=0.5), tile):
        with dmr.patched(model, policy):
            dynamic_eager = _generate(model, ids, compiled=False)
            dynamic = _generate(model, ids, compiled=True)
        assert torch.equal(dynamic, dynamic_eager)
