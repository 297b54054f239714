"""Where the GPU prefill experts layer departs from its pair ratio: each stage timed apart (issue 11).

Run on a CUDA GPU::

    python benchmarks/diag_prefill_stages.py --out benchmarks/diagnostics/diag_prefill_stages.json

The 4096-token prefill target is dynamic/static <= 1.05 x the kept/native pair ratio; on the
OLMoE-1B-7B shape the layer gives about 0.75 for 0.70 of the pairs. This script takes the routings
of ``bench_gpu_experts.py`` (bf16 layers, Gaussian router logits at the reference models' entropy,
``TopP`` set for about 30% fewer pairs) and times, by CUDA-graph replay (median), the whole
``experts_forward(backend="cuda")`` and each stage of its prefill path (``experts._gpu._grouped_path``)
on the same inputs: the pair plan, the row gather, the first ``grouped_mm``, the SwiGLU, the second
``grouped_mm`` and the combine. It also times the two ``grouped_mm`` calls on synthetic plans where
every expert gets the same row count, over a range of counts, which shows the GEMMs' row-tile
granularity (time as a step function of rows per expert) without the routing's load imbalance.
Each stage's dynamic/static ratio is recorded beside the pair ratio, and per routing the number of
row tiles of 64, 128 and 256 rows that the experts' row counts round up to.

Tile-aligned variants: the routings of ``dmr.TileAware(TopP(p), rows=ALIGN_ROWS, mode=m)`` for each
mode (each expert's row count moved to whole tiles of 256 rows: ``round``, ``trim``, ``refill``);
their pairs, row tiles and whole-layer times are recorded beside the others (the routings computed on
the CPU), and ``routing_ms`` times ``dmr.route`` on the GPU for ``TopP`` and for each mode (the
policy's own cost, probabilities in, ids and weights out).

``--tiles-only`` needs no GPU: it prints those tile counts for the same routings (drawn on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dynamic_moe_router as dmr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_cpu_experts as cpu_bench  # noqa: E402  (shared builders and result header)
from bench_gpu_batch_aware import graph_ms  # noqa: E402
from bench_gpu_experts import ENTROPY, SHAPES, _routings  # noqa: E402

DEFAULT_OUT = HERE / "diagnostics" / "diag_prefill_stages.json"
TILE_ROWS = (64, 128, 256)
#: rows per tile the aligned variants move each expert's count to (grouped_mm's apparent row tile)
ALIGN_ROWS = 256
ALIGN_MODES = ("trim", "refill", "round")


def row_tiles(counts: torch.Tensor) -> dict[str, int]:  # counts (E,) rows per expert
    """Row tiles per tile height: the sum over experts of ``ceil(rows / tile)``."""
    return {str(t): int(((counts + t - 1) // t).sum()) for t in TILE_ROWS}


def tile_aligned(shape: dict[str, Any], logits: torch.Tensor, p: float, mode: str) -> Any:
    """The routing of ``dmr.TileAware(dmr.TopP(p), rows=ALIGN_ROWS, mode=mode)`` on ``logits``."""
    probs = torch.softmax(logits, dim=-1)
    policy = dmr.TileAware(dmr.TopP(p=p), rows=ALIGN_ROWS, mode=mode)
    return dmr.route(probs, policy, native_k=shape["k"], normalize=shape["normalize"])


def routing_tiles(tokens: int) -> list[dict[str, Any]]:
    """Per shape: pairs and row tiles of the static and dynamic routings (CPU only)."""
    out = []
    for si, shape in enumerate(SHAPES):
        e = shape["E"]
        sigma = cpu_bench.calibrate_sigma(e, ENTROPY, seed=17 * si)
        logits, p, static, dynamic = _routings(shape, tokens, sigma, seed=si)
        row: dict[str, Any] = {"shape": shape["name"], "tokens": tokens}
        variants = {"static": static.ids, "dynamic": dynamic.ids}
        variants.update({f"{m}{ALIGN_ROWS}": tile_aligned(shape, logits, p, m).ids for m in ALIGN_MODES})
        for name, ids in variants.items():
            counts = torch.bincount(ids[ids < e].reshape(-1), minlength=e)  # (E,)
            row[name] = {"pairs": int(counts.sum()), "row_tiles": row_tiles(counts)}
        row["tile_ratio"] = {
            t: row["dynamic"]["row_tiles"][t] / row["static"]["row_tiles"][t]
            for t in row["static"]["row_tiles"]
        }
        out.append(row)
    return out


def stage_fns(experts, hidden, ids, weights) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """One callable per stage of the prefill path, each on the inputs the previous one gives
    (computed once here), mirroring ``experts._gpu._grouped_path``."""
    from dynamic_moe_router.experts import _gpu

    k = _gpu._kernels()
    n, h = ids.numel(), hidden.shape[1]
    e = experts.gate_up_proj.shape[0]
    inter = experts.down_proj.shape[2]
    plan = _gpu.plan_pairs(ids, e)
    xs = torch.empty(n, h, dtype=hidden.dtype, device=hidden.device)  # (N, H)
    block = min(1024, _gpu.next_pow2(h))
    w1, w2 = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)

    def gather() -> None:
        k.gather_rows[(n,)](
            hidden, plan.tokens, xs, plan.n_valid, h, hidden.stride(0), xs.stride(0), BLOCK_H=block
        )

    gather()
    hg = F.grouped_mm(xs, w1, offs=plan.ends)  # (N, 2I)
    a = torch.empty(n, inter, dtype=hidden.dtype, device=hidden.device)  # (N, I)
    block_i = min(1024, _gpu.next_pow2(inter))

    def swiglu() -> None:
        k.swiglu_rows[(n,)](hg, a, plan.n_valid, inter, hg.stride(0), a.stride(0), BLOCK=block_i)

    swiglu()
    y = F.grouped_mm(a, w2, offs=plan.ends)  # (N, H)
    out = torch.empty_like(hidden)
    return {
        "plan": lambda: _gpu.plan_pairs(ids, e),
        "gather": gather,
        "gemm1": lambda: F.grouped_mm(xs, w1, offs=plan.ends),
        "swiglu": swiglu,
        "gemm2": lambda: F.grouped_mm(a, w2, offs=plan.ends),
        "combine": lambda: _gpu._launch_combine(k, plan, y.unsqueeze(0), weights, out, None),
    }


def uniform_gemms(experts, rows_per_expert: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """ms of the two ``grouped_mm`` calls when every expert has ``rows_per_expert`` rows."""
    e, _, h = experts.gate_up_proj.shape  # (E, 2I, H)
    inter = experts.down_proj.shape[2]
    n = e * rows_per_expert
    offs = torch.arange(1, e + 1, device="cuda", dtype=torch.int32) * rows_per_expert  # (E,)
    xs = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(n, inter, device="cuda", dtype=torch.bfloat16)
    w1, w2 = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
    with torch.no_grad():
        return {
            "gemm1": graph_ms(lambda: F.grouped_mm(xs, w1, offs=offs)),
            "gemm2": graph_ms(lambda: F.grouped_mm(a, w2, offs=offs)),
        }


def run_shape(si: int, shape: dict[str, Any], tokens: int, uniform: bool = True) -> dict[str, Any]:
    """Stage times of static and dynamic routing, and the uniform-count GEMM sweep, for one shape."""
    from dynamic_moe_router.experts import STANDARD, _gpu, experts_forward

    e = shape["E"]
    experts = cpu_bench.build_experts(shape, seed=si).to("cuda", torch.bfloat16)
    sigma = cpu_bench.calibrate_sigma(e, ENTROPY, seed=17 * si)
    logits, p, static, dynamic = _routings(shape, tokens, sigma, seed=si)
    hidden = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
    reason = _gpu.triton_reason(experts, hidden, STANDARD)
    if reason is not None:  # the "cuda" backend would time its full-buffer fallback, not these stages
        raise SystemExit(f"the grouped prefill path cannot run here: {reason}")
    row: dict[str, Any] = {"shape": shape["name"], "tokens": tokens, "top_p": p, "variants": {}}
    routings = {"static": (static.ids, static.weights), "dynamic": (dynamic.ids, dynamic.weights)}
    for m in ALIGN_MODES:
        aligned = tile_aligned(shape, logits, p, m)
        routings[f"{m}{ALIGN_ROWS}"] = (aligned.ids, aligned.weights)
    for name, (ids, w) in routings.items():
        ids, w = ids.to("cuda"), w.to("cuda", torch.bfloat16)
        counts = torch.bincount(ids[ids < e].reshape(-1), minlength=e)  # (E,)
        with torch.no_grad():
            times = {
                "layer": graph_ms(
                    lambda ids=ids, w=w: experts_forward(experts, hidden, ids, w, backend="cuda")
                )
            }
            if name in ("static", "dynamic"):  # the aligned variants: the whole layer only
                times.update({st: graph_ms(fn) for st, fn in stage_fns(experts, hidden, ids, w).items()})
        rows = {"mean": float(counts.float().mean()), "min": int(counts.min()), "max": int(counts.max())}
        row["variants"][name] = {
            "pairs": int(counts.sum()), "rows_per_expert": rows, "row_tiles": row_tiles(counts), "ms": times,
        }  # fmt: skip
        print(shape["name"], name, json.dumps(row["variants"][name]), flush=True)
    s, d = row["variants"]["static"], row["variants"]["dynamic"]
    row["pair_ratio"] = d["pairs"] / s["pairs"]
    row["ratios"] = {stage: d["ms"][stage] / s["ms"][stage] for stage in s["ms"]}
    row["aligned"] = {
        m: {"pair_ratio": v["pairs"] / s["pairs"], "layer_ratio": v["ms"]["layer"] / s["ms"]["layer"]}
        for m, v in row["variants"].items()
        if m not in ("static", "dynamic")
    }
    # the routing's own GPU time (softmax probabilities in, ids and weights out), TopP and TileAware
    probs = torch.softmax(logits.to("cuda"), dim=-1)
    route_policies = {"dynamic": dmr.TopP(p=p)}
    route_policies.update(
        {f"{m}{ALIGN_ROWS}": dmr.TileAware(dmr.TopP(p=p), rows=ALIGN_ROWS, mode=m) for m in ALIGN_MODES}
    )
    with torch.no_grad():
        row["routing_ms"] = {
            name: graph_ms(
                lambda pol=pol: dmr.route(
                    probs, pol, native_k=shape["k"], normalize=shape["normalize"], validate=False
                )
            )
            for name, pol in route_policies.items()
        }
    row["stage_sum_ms"] = {
        v: sum(t for stage, t in row["variants"][v]["ms"].items() if stage != "layer")
        for v in ("static", "dynamic")
    }
    if not uniform:
        print(shape["name"], json.dumps({"ratios": row["ratios"], "aligned": row["aligned"],
                                         "routing_ms": row["routing_ms"]}), flush=True)  # fmt: skip
        return row
    mean_static = s["pairs"] / e
    grid = {max(1, round(mean_static * f)) for f in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9, 1.0)}
    fine = range(max(16, 16 * (round(mean_static * 0.62) // 16)), round(mean_static * 0.78) + 1, 16)
    row["uniform_gemm_ms"] = {str(c): uniform_gemms(experts, c) for c in sorted({*grid, *fine})}
    summary = {"ratios": row["ratios"], "aligned": row["aligned"], "uniform": row["uniform_gemm_ms"]}
    print(shape["name"], json.dumps(summary), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,16384", help="comma-separated token counts")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--tiles-only", action="store_true", help="print the routings' row tiles (no GPU)")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform-rows GEMM sweep")
    args = ap.parse_args(argv)
    if args.tiles_only:
        for tokens in (int(t) for t in args.tokens.split(",")):
            print(json.dumps(routing_tiles(tokens)))
        return 0
    if not torch.cuda.is_available():
        print("diag_prefill_stages needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    import triton

    command = cpu_bench.command_line("diag_prefill_stages.py", argv)
    out = {
        **cpu_bench.result_header("diag_prefill_stages", command),
        "machine": {**cpu_bench.gpu_machine(transformers=False), "triton": triton.__version__},
        "note": "each stage is replayed alone (its inputs may still sit in L2 from the previous "
        "replay), so a stage may run faster than inside the layer and stage_sum_ms need not equal "
        "the layer's time",
        "shapes": [],
    }
    for tokens in (int(t) for t in args.tokens.split(",")):
        for si, shape in enumerate(SHAPES):
            out["shapes"].append(run_shape(si, shape, tokens, uniform=not args.no_uniform))
            torch.cuda.empty_cache()
            out["wall_s"] = time.perf_counter() - t0
            cpu_bench.write_result(out, args.out)  # after every shape: a later failure keeps these
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
