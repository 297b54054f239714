"""GPU layer time of ``dmr.BatchAware`` at decode-batch sizes (16-1024 tokens), against static top-k.

Run on a CUDA GPU::

    python benchmarks/bench_gpu_batch_aware.py        # writes benchmarks/results/gpu_batch_aware.json

Shapes and router logits as in ``bench_gpu_experts.py`` (bf16 Mixtral-8x7B and OLMoE-1B-7B layers;
Gaussian logits with per-token confidence and per-expert bias at the reference models' mean
normalised entropy). Per token count, routings from ``dmr.route``: ``static`` (the native top-k),
``top_p`` (about 30% fewer pairs), and for each fraction ``BatchAware(StaticTopK(), experts=f)``
(trims low slots) and its ``reroute=True`` form (a hard cap on the distinct experts, same pairs).
Each experts layer (``experts_forward(backend="auto")``) and each routing (softmax + ``dmr.route``)
is timed by CUDA-graph replay (``triton.testing.do_bench_cudagraph``, median), in one run on one card.
Recorded per cell: kept pairs, distinct experts touched, layer time and its ratio to static, and
routing time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_cpu_experts as cpu_bench  # noqa: E402  (shared logits / experts builders)
import dynamic_moe_router as dmr  # noqa: E402
from bench_gpu_experts import ENTROPY, SHAPES, TARGET_RATIO  # noqa: E402
from dynamic_moe_router.experts import experts_forward  # noqa: E402

DEFAULT_OUT = HERE / "results" / "gpu_batch_aware.json"


def graph_ms(fn) -> float:  # type: ignore[no-untyped-def]
    import triton.testing as tt

    return float(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def measure(experts, hidden, logits, policy, k: int, norm: str):  # type: ignore[no-untyped-def]
    """``(routing, layer ms, routing ms)`` of one policy, both timed by CUDA-graph replay."""

    def routing():  # type: ignore[no-untyped-def]
        probs = torch.softmax(logits, dim=-1)  # (T, E)
        return dmr.route(probs, policy, native_k=k, normalize=norm, validate=False)

    r = routing()
    ids, w = r.ids, r.weights.to(torch.bfloat16)
    with torch.no_grad():
        layer_ms = graph_ms(lambda: experts_forward(experts, hidden, ids, w))
    return r, layer_ms, graph_ms(routing)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16,64,128,256,1024")
    ap.add_argument("--fractions", default="0.75,0.5,0.25")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_batch_aware needs a CUDA GPU", file=sys.stderr)
        return 2
    tokens_list = [int(x) for x in args.tokens.split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    t0 = time.perf_counter()
    cells: list[dict[str, Any]] = []
    for si, shape in enumerate(SHAPES):
        e, k, norm = shape["E"], shape["k"], shape["normalize"]
        experts = cpu_bench.build_experts(shape, seed=si).to("cuda", torch.bfloat16)
        sigma = cpu_bench.calibrate_sigma(e, ENTROPY, seed=17 * si)
        logits_all = cpu_bench.draw_logits(max([*tokens_list, 4096]), e, sigma, si)
        p = cpu_bench.search_top_p(torch.softmax(logits_all, -1), k, TARGET_RATIO)
        policies: dict[str, Any] = {"static": dmr.StaticTopK(), "top_p": dmr.TopP(p=p)}
        policies.update({f"batch_aware_{f}": dmr.BatchAware(dmr.StaticTopK(), experts=f) for f in fractions})
        policies.update(
            {
                f"batch_aware_reroute_{f}": dmr.BatchAware(dmr.StaticTopK(), experts=f, reroute=True)
                for f in fractions
            }
        )
        for tokens in tokens_list:
            logits = logits_all[:tokens].to("cuda")  # (T, E)
            hidden = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
            native_ms = graph_ms(lambda logits=logits, k=k: torch.softmax(logits, -1).topk(k, dim=-1))
            static_ms = static_pairs = None
            for name, policy in policies.items():
                r, layer_ms, route_ms = measure(experts, hidden, logits, policy, k, norm)
                if static_ms is None:  # the first policy is static
                    static_ms, static_pairs = layer_ms, r.kept_pairs()
                kept = r.ids[r.ids < e]
                cell = {
                    "shape": shape["name"],
                    "tokens": tokens,
                    "policy": name,
                    "spec": policy.describe(),
                    "pair_ratio": r.kept_pairs() / static_pairs,
                    "distinct_experts": int(torch.unique(kept).numel()),
                    "layer_ms": layer_ms,
                    "layer_ratio": layer_ms / static_ms,
                    "route_ms": route_ms,
                    "native_route_ms": native_ms,
                }
                cells.append(cell)
                print(json.dumps(cell), flush=True)
    command = cpu_bench.command_line("bench_gpu_batch_aware.py", argv)
    out = {
        **cpu_bench.result_header("gpu_batch_aware", command),
        "machine": cpu_bench.gpu_machine(transformers=False),
        "wall_s": time.perf_counter() - t0,
        "cells": cells,
    }
    cpu_bench.write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
