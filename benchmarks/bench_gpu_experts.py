"""GPU benchmark of one MoE experts layer at real shapes: static top-k against ~30% fewer pairs.

Run on a CUDA GPU (the device tool lends an H100/H200)::

    python benchmarks/bench_gpu_experts.py                 # writes benchmarks/results/gpu_experts.json
    python benchmarks/bench_gpu_experts.py --quick         # fewer sizes, for a smoke run

Shapes (bf16): a Mixtral-8x7B layer (H 4096, I 14336, E 8, k 2) and an OLMoE-1B-7B layer
(H 2048, I 1024, E 64, k 8); tokens 1, 16, 256, 4096, 16384. Router logits are drawn as in
``bench_cpu_experts.py`` (Gaussian with per-token confidence and per-expert bias) with the mean
normalised entropy measured on this project's reference models (0.75); the dynamic routing is
``dmr.TopP`` with ``p`` searched so that about 30% of the native pairs are dropped (the achieved
ratio is recorded per cell). At 1 token the first drawn token that keeps fewer than k experts is
used, and its kept/native ratio is the cell's pair ratio.

Variants, all in one run on one card, each timed with ``triton.testing.do_bench`` (L2 flushed
before every call, median of the repeats) and, where capturable, also with CUDA-graph replay
(``do_bench_cudagraph``):

* ``hf_eager``, ``hf_grouped_mm``: transformers' experts module called directly on the static
  routing with ``config._experts_implementation`` set to each;
* ``cuda/static``, ``cuda/dynamic``: this project's grouped_mm path (Triton gather, SwiGLU and
  combine bounded by the kept pairs);
* ``triton/static``, ``triton/dynamic``: this project's fused Triton path;
* ``auto/static``, ``auto/dynamic``: whichever of the two ``experts_forward(backend="auto")`` picks.

Ceilings measured first on the same card: device-to-device copy bandwidth (bytes read + written)
and the bf16 rate of an 8192^3 matmul on random data. Each cell reports achieved TFLOP/s over the
kept pairs (6*H*I FLOPs each) and achieved bandwidth over the bytes of the touched experts, and the
time of the routing and policy (softmax + ``dmr.route``) against the layer. Every cell also checks
correctness: this project's static output against transformers eager (relative error in bf16),
and the dynamic output against the per-expert ``loop`` backend.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_cpu_experts as cpu_bench  # noqa: E402  (shared logits / experts builders)
import dynamic_moe_router as dmr  # noqa: E402
from dynamic_moe_router.experts import STANDARD, choose_cuda_backend, experts_forward  # noqa: E402
from dynamic_moe_router.experts._forward import _cuda_full_buffer  # noqa: E402

DEFAULT_OUT = HERE / "results" / "gpu_experts.json"
SHAPES: list[dict[str, Any]] = [
    {"name": "mixtral-8x7b", "family": "mixtral", "E": 8, "k": 2, "H": 4096, "I": 14336, "normalize": "sum"},
    {"name": "olmoe-1b-7b", "family": "olmoe", "E": 64, "k": 8, "H": 2048, "I": 1024, "normalize": "none"},
]
TOKENS_FULL = (1, 16, 256, 4096, 16384)
TOKENS_QUICK = (1, 256, 4096)
ENTROPY = 0.75  # mean normalised router entropy of models/ref-mixtral and models/ref-olmoe
TARGET_RATIO = 0.70


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def ceilings() -> dict[str, float]:
    """Copy bandwidth and bf16 matmul rate of this card, measured on random data."""
    import triton.testing as tt

    n = 1 << 30  # 2 GiB of bf16
    bufs = [
        torch.randn(n, device="cuda", dtype=torch.bfloat16),
        torch.empty(n, device="cuda", dtype=torch.bfloat16),
    ]
    ms = tt.do_bench(lambda: bufs[1].copy_(bufs[0]), warmup=50, rep=300, return_mode="median")
    copy_tbs = 2 * n * 2 / (ms * 1e-3) / 1e12
    bufs.clear()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    mm_tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_tb_s": copy_tbs, "bf16_matmul_tflop_s": mm_tflops}


def time_fn(fn: Callable[[], Any], graph: bool) -> float | None:
    """Median ms of ``fn`` (L2 flushed between calls), or of its CUDA-graph replay."""
    import triton.testing as tt

    try:
        if graph:
            return float(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception as exc:  # not capturable (host sync): recorded as n/a
        print(f"    ({'graph' if graph else 'eager'} timing failed: {type(exc).__name__}: {exc})"[:200])
        torch.cuda.synchronize()
        return None


def _routings(shape: dict[str, Any], tokens: int, sigma: float, seed: int):  # type: ignore[no-untyped-def]
    k, e = shape["k"], shape["E"]
    draw = max(tokens, 4096)
    logits = cpu_bench.draw_logits(draw, e, sigma, seed)
    probs = torch.softmax(logits, dim=-1)
    p = cpu_bench.search_top_p(probs, k, TARGET_RATIO)
    if tokens == 1:  # a decode step: the first token that keeps fewer than k experts
        dyn_all = dmr.route(probs, dmr.TopP(p=p), native_k=k)
        first = int(torch.nonzero(dyn_all.counts < k)[0, 0])
        logits, probs = logits[first : first + 1], probs[first : first + 1]
    else:
        logits, probs = logits[:tokens], probs[:tokens]
    norm = shape["normalize"]
    static = dmr.route(probs, dmr.StaticTopK(), native_k=k, normalize=norm)
    dynamic = dmr.route(probs, dmr.TopP(p=p), native_k=k, normalize=norm)
    return logits, p, static, dynamic


def run_cell(copies, shape, tokens, sigma, graph_max_tokens, seed=0):  # type: ignore[no-untyped-def]
    """``copies``: identical experts modules; decode cells cycle through them so that the touched
    experts are not served from L2 by the previous repeat (graph replay does not flush L2)."""
    dev = "cuda"
    experts = copies[0]
    rotate = copies if tokens <= 16 else copies[:1]
    e, k, h, i = shape["E"], shape["k"], shape["H"], shape["I"]
    logits, p, static, dynamic = _routings(shape, tokens, sigma, seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    hidden = torch.randn(tokens, h, device=dev, dtype=torch.bfloat16, generator=gen)
    s_ids, s_w = static.ids.to(dev), static.weights.to(dev, torch.bfloat16)
    d_ids, d_w = dynamic.ids.to(dev), dynamic.weights.to(dev, torch.bfloat16)
    pairs_s, pairs_d = static.kept_pairs(), dynamic.kept_pairs()
    touched = {
        "static": int(torch.unique(static.ids[static.kept]).numel()),
        "dynamic": int(torch.unique(dynamic.ids[dynamic.kept]).numel()),
    }

    def hf(impl: str) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            for m in rotate:
                m.config._experts_implementation = impl
                out = m(hidden, s_ids, s_w)
            return out

        return call

    def ours(backend: str, ids: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            for m in rotate:
                out = experts_forward(m, hidden, ids, w, backend=backend)
            return out

        return call

    def full(ids: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            for m in rotate:
                out = _cuda_full_buffer(m, hidden, ids, w, STANDARD, None)
            return out

        return call

    variants: dict[str, Callable[[], torch.Tensor]] = {
        "hf_eager/static": hf("eager"),
        "hf_grouped_mm/static": hf("grouped_mm"),
        "cuda/static": ours("cuda", s_ids, s_w),
        "cuda/dynamic": ours("cuda", d_ids, d_w),
        "triton/static": ours("triton", s_ids, s_w),
        "triton/dynamic": ours("triton", d_ids, d_w),
        # the earlier sync-free path: GEMMs skip the sentinel tail, gather/activation/combine do not
        "full_buffer/static": full(s_ids, s_w),
        "full_buffer/dynamic": full(d_ids, d_w),
    }
    checks: dict[str, float] = {}
    with torch.no_grad():
        experts.config._experts_implementation = "eager"
        ref_static = experts(hidden, s_ids, s_w)
        ref_dynamic = experts_forward(experts, hidden, d_ids, d_w, backend="loop")
        for name, fn in variants.items():
            if name.startswith("hf_"):
                continue
            out = fn()  # the last copy's output: copies are identical
            checks[name] = rel_err(out, ref_static if name.endswith("static") else ref_dynamic)
        timings: dict[str, float | None] = {}
        graphs: dict[str, float | None] = {}
        per = len(rotate)
        for name, fn in variants.items():
            t = time_fn(fn, graph=False)
            timings[name] = None if t is None else t / per
            if tokens <= graph_max_tokens and name != "hf_eager/static":
                t = time_fn(fn, graph=True)
                graphs[name] = None if t is None else t / per
        # routing + policy (softmax, top-k, policy, weights, sentinel) on the device, no validation
        dlogits = logits.to(dev)

        policy = dmr.TopP(p=p)

        def route_dyn() -> tuple[torch.Tensor, torch.Tensor]:
            probs = torch.softmax(dlogits, -1)
            r = dmr.route(probs, policy, native_k=k, normalize=shape["normalize"], validate=False)
            return r.ids, r.weights

        def route_native() -> tuple[torch.Tensor, torch.Tensor]:
            w, idx = torch.topk(torch.softmax(dlogits, -1), k, dim=-1)
            return idx, w / w.sum(-1, keepdim=True) if shape["normalize"] == "sum" else w

        route_ms = {
            "dynamic": time_fn(route_dyn, graph=False),
            "dynamic_graph": time_fn(route_dyn, graph=True),
            "native_topk": time_fn(route_native, graph=False),
            "native_topk_graph": time_fn(route_native, graph=True),
        }
        if tokens == 4096:  # torch.compile'd routing (inductor fuses the policy ops); one size only
            compiled = torch.compile(route_dyn, fullgraph=True)
            route_ms["dynamic_compiled"] = time_fn(compiled, graph=False)
            route_ms["dynamic_compiled_graph"] = time_fn(compiled, graph=True)
    auto = choose_cuda_backend(tokens * k, e)
    for kind in ("static", "dynamic"):
        timings[f"auto/{kind}"] = timings[f"{auto}/{kind}"]
        if f"{auto}/{kind}" in graphs:
            graphs[f"auto/{kind}"] = graphs[f"{auto}/{kind}"]
    flops = {"static": pairs_s * 6 * h * i, "dynamic": pairs_d * 6 * h * i}
    expert_bytes = 3 * h * i * 2  # bf16 gate, up, down
    cell = {
        "shape": shape["name"],
        "tokens": tokens,
        "top_p": p,
        "pairs": {"static": pairs_s, "dynamic": pairs_d},
        "pair_ratio": pairs_d / pairs_s,
        "touched_experts": touched,
        "counts_hist": torch.bincount(dynamic.counts, minlength=k + 1).tolist(),
        "auto_backend": auto,
        "weight_copies_cycled": len(rotate),
        "ms": timings,
        "graph_ms": graphs,
        "route_ms": route_ms,
        "flops": flops,
        "touched_bytes": {kk: v * expert_bytes for kk, v in touched.items()},
        "rel_err": checks,
    }
    return cell


def summarise(cells: list[dict[str, Any]], ceil: dict[str, float]) -> list[dict[str, Any]]:
    """Per-cell ratios and target checks (see the issue's targets)."""
    out = []
    for c in cells:
        ms = c["ms"]
        best_hf = min(v for kk, v in ms.items() if kk.startswith("hf_") and v is not None)
        row: dict[str, Any] = {"shape": c["shape"], "tokens": c["tokens"], "pair_ratio": c["pair_ratio"]}
        for timing in ("ms", "graph_ms"):
            t = c[timing]
            if t.get("auto/static") and t.get("auto/dynamic"):
                row[f"time_ratio{'' if timing == 'ms' else '_graph'}"] = t["auto/dynamic"] / t["auto/static"]
        row["static_vs_best_hf"] = ms["auto/static"] / best_hf
        row["dynamic_vs_best_hf"] = ms["auto/dynamic"] / best_hf
        row["tflop_s_static"] = c["flops"]["static"] / (ms["auto/static"] * 1e-3) / 1e12
        row["tflop_s_dynamic"] = c["flops"]["dynamic"] / (ms["auto/dynamic"] * 1e-3) / 1e12
        row["matmul_fraction_static"] = row["tflop_s_static"] / ceil["bf16_matmul_tflop_s"]
        for kind in ("static", "dynamic"):
            tb_s = c["touched_bytes"][kind] / (ms[f"auto/{kind}"] * 1e-3) / 1e12
            row[f"bw_fraction_{kind}"] = tb_s / ceil["copy_tb_s"]
        g = c["graph_ms"]
        for key, val in c["route_ms"].items():
            layer = g.get("auto/dynamic") if key.endswith("graph") else ms["auto/dynamic"]
            if val is not None and layer:
                row[f"route_fraction_{key}"] = val / layer
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--shapes", nargs="*", default=[s["name"] for s in SHAPES])
    ap.add_argument("--graph-max-tokens", type=int, default=16384)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_experts needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ceil = ceilings()
    print(f"ceilings: {ceil}")
    cells = []
    for si, shape in enumerate(s for s in SHAPES if s["name"] in args.shapes):
        experts = cpu_bench.build_experts(shape, seed=si).to("cuda", torch.bfloat16)
        # decode reads 1-8 experts; cycle through enough copies that they exceed L2 several times
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        copies = [experts] + [
            copy.deepcopy(experts)
            for _ in range(min(15, -(-3 * l2 // (3 * shape["H"] * shape["I"] * 2))) - 1)
        ]
        sigma = cpu_bench.calibrate_sigma(shape["E"], ENTROPY, seed=17 * si)
        for tokens in TOKENS_QUICK if args.quick else TOKENS_FULL:
            t1 = time.perf_counter()
            cell = run_cell(copies, shape, tokens, sigma, args.graph_max_tokens, seed=si)
            cells.append(cell)
            ms = cell["ms"]
            print(
                f"{shape['name']:>13} T={tokens:>5} pairs {cell['pair_ratio']:.3f} "
                + " ".join(f"{kk}={v:.3f}" if v is not None else f"{kk}=n/a" for kk, v in ms.items())
                + f" ({time.perf_counter() - t1:.1f}s)"
            )
        del experts, copies
        torch.cuda.empty_cache()
    import transformers
    import triton

    command = "python benchmarks/bench_gpu_experts.py" + (" --quick" if args.quick else "")
    result = {
        **cpu_bench.result_header("gpu_experts", command, kind=True),
        "wall_s": time.perf_counter() - t0,
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "dynamic_moe_router": dmr.__version__,
        },
        "ceilings": ceil,
        "settings": {
            "dtype": "bfloat16",
            "target_pair_ratio": TARGET_RATIO,
            "router_entropy": ENTROPY,
            "timing": "triton do_bench median (L2 flushed per call); graph: do_bench_cudagraph median",
            "flops_per_pair": "6*H*I",
        },
        "cells": cells,
        "summary": summarise(cells, ceil),
    }
    cpu_bench.write_result(result, args.out, say=False)
    for row in result["summary"]:
        print(json.dumps({kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in row.items()}))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
