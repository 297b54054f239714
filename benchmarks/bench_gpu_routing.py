"""Eager-mode cost of one MoE layer's routing on a GPU: native, patched, patched with CUDA graphs.

Run on a CUDA GPU::

    python benchmarks/bench_gpu_routing.py        # writes benchmarks/results/gpu_routing.json

One decoder layer of real width (bf16, random weights): the OLMoE-1B-7B shape (64 experts, k 8)
and the Mixtral-8x7B shape (8 experts, k 2). Per token count, the router module is called in a
loop as a model's forward calls it, in eager mode, and the wall time per call is the loop's time
over its calls with one GPU synchronisation at the end (what a host-bound decode step pays):

* ``native``: the unpatched transformers router (linear, softmax, top-k);
* ``patched``: ``dmr.patch(model, policy, validate=False)``: the family's scoring, the policy,
  the weights and the sentinel, op by op;
* ``graphs``: the same with ``cuda_graphs=True`` (one graph replay plus input copy and output
  clones per call, up to 256 tokens; above that the call runs as ``patched``);
* ``fused``: with ``fused_routing=True`` (the router's linear, then one Triton kernel for the
  softmax, ranking, policy and weights);
* ``fused_graphs``: both.

The whole MoE block (router plus experts, patched static, eager) is timed the same way, so that the
routing's share of the layer can be read at 4096 tokens. Policies: ``StaticTopK()`` and ``TopP``.
The block's experts module is also timed alone, on the inputs the block hands it: *block minus
experts* is what the routing adds inside the layer (``in_layer_share``), where its host work
overlaps the GPU's work on the layer; the routing alone in a loop (``share_of_block``) pays its
host time in full.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_cpu_experts as cpu_bench  # noqa: E402  (the shared result writer)
from bench_gpu_decode import build_model  # noqa: E402  (the same shapes as the decode benchmark)

DEFAULT_OUT = HERE / "results" / "gpu_routing.json"
#: patch options of each timed mode
MODES: dict[str, dict[str, bool]] = {
    "patched": {},
    "graphs": {"cuda_graphs": True},
    "fused": {"fused_routing": True},
    "fused_graphs": {"fused_routing": True, "cuda_graphs": True},
}


def loop_us(fn, calls: int, repeats: int = 5, warmup: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Median over ``repeats`` of the wall time per call of ``calls`` back-to-back calls (one sync),
    after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls)
    return 1e6 * statistics.median(times)


def paired_loop_us(block, experts, calls: int, repeats: int = 9) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """:func:`loop_us` of ``block`` and of ``experts`` in alternating repeats (the same machine state
    for both), and the median over repeats of their difference (what the routing adds in the block)."""
    a, b = [], []  # loop_us warms each function up before its loop
    for _ in range(repeats):
        a.append(loop_us(block, calls, repeats=1))
        b.append(loop_us(experts, calls, repeats=1))
    diff = statistics.median(x - y for x, y in zip(a, b, strict=True))
    return statistics.median(a), statistics.median(b), diff


def experts_call(block: torch.nn.Module, x3: torch.Tensor):  # type: ignore[no-untyped-def]
    """A call of ``block``'s experts module on the inputs one call of ``block(x3)`` gives it: the block
    without its routing (what ``block`` costs minus what its routing adds inside the layer)."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def grab(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args, dict(kwargs)))

    handle = block.experts.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        block(x3)
    finally:
        handle.remove()
    args, kwargs = seen[0]
    return lambda: block.experts(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    import dynamic_moe_router as dmr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="olmoe,mixtral")
    ap.add_argument("--tokens", default="1,32,256,4096")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_routing needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    cells: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        model = build_model(shape, layers=1, vocab=128)  # one decoder layer; the vocabulary is not timed
        block = model.model.layers[0].mlp
        router = block.gate if hasattr(block, "gate") else block.router
        hidden_size = model.config.hidden_size
        for tokens in [int(x) for x in args.tokens.split(",")]:
            h = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16)
            x3 = h.unsqueeze(0)  # (1, T, H): the block's input
            calls = max(10, args.calls if tokens <= 256 else args.calls // 10)
            with torch.no_grad():
                cell: dict[str, Any] = {"shape": shape, "tokens": tokens}
                cell["native_us"] = loop_us(lambda h=h, r=router: r(h), calls)
                cell["native_block_us"] = loop_us(lambda x3=x3, b=block: b(x3), calls)
                for pname, policy in (("static", dmr.StaticTopK()), ("top_p", dmr.TopP(p=0.5))):
                    for mode, kw in MODES.items():
                        with dmr.patched(model, policy, validate=False, **kw):
                            cell[f"{pname}_{mode}_us"] = loop_us(lambda h=h, r=router: r(h), calls)
                            run_block = lambda x3=x3, b=block: b(x3)  # noqa: E731
                            block_us, experts_us, in_layer = paired_loop_us(
                                run_block, experts_call(block, x3), calls
                            )
                            cell[f"{pname}_{mode}_block_us"] = block_us
                            cell[f"{pname}_{mode}_experts_us"] = experts_us
                            cell[f"{pname}_{mode}_in_layer_us"] = in_layer
                for pname in ("static", "top_p"):
                    for mode in MODES:
                        cell[f"{pname}_{mode}_over_native"] = cell[f"{pname}_{mode}_us"] / cell["native_us"]
                        block_us = cell[f"{pname}_{mode}_block_us"]
                        cell[f"{pname}_{mode}_share_of_block"] = cell[f"{pname}_{mode}_us"] / block_us
                        in_layer = cell[f"{pname}_{mode}_in_layer_us"]
                        cell[f"{pname}_{mode}_in_layer_share"] = in_layer / block_us
            cells.append(cell)
            print(json.dumps(cell), flush=True)
        model = block = router = None
        torch.cuda.empty_cache()
    command = cpu_bench.command_line("bench_gpu_routing.py", argv)
    out = {
        **cpu_bench.result_header("gpu_routing", command, kind=True),
        "machine": cpu_bench.gpu_machine(),
        "wall_s": time.perf_counter() - t0,
        "cells": cells,
    }
    cpu_bench.write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
