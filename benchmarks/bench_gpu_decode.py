"""End-to-end ``generate()`` on a GPU: eager and the transformers speed recipe, patched and not.

Run on a CUDA GPU::

    python benchmarks/bench_gpu_decode.py                     # writes results/gpu_decode.json
    python benchmarks/bench_gpu_decode.py --shapes olmoe --batches 1 --modes compiled --out /tmp/x.json

Models (bf16, random weights, real layer width): the OLMoE-1B-7B shape (``--olmoe-layers``, 16 by
default: the whole model) and the Mixtral-8x7B shape (``--mixtral-layers``, 2 by default).

Variants: ``unpatched`` (transformers' own experts), ``static`` (``dmr.StaticTopK()``: this
project's kernels, native routing), ``dynamic`` (``dmr.TopP(p)`` with ``p`` bisected on the
prompts for about 30% fewer routed pairs; the achieved reduction is recorded), and
``batch_aware`` (``dmr.BatchAware(dmr.StaticTopK(), ...)``) where the library has it, and, when
named, ``tile_aware`` (``dmr.TileAware`` of the ``dynamic`` variant's ``TopP``, 256-row tiles). Patched
variants use ``validate=False``. A ``+graphs`` suffix (``static+graphs``, ...) patches with
``cuda_graphs=True`` (each layer's routing and experts replayed as CUDA graphs in eager mode); those
variants run in eager mode only. A ``+fused`` suffix patches with ``fused_routing=True`` (one Triton
kernel for each layer's softmax, ranking, policy and weights).

Modes: ``eager`` (plain ``generate``) and ``compiled`` (``cache_implementation="static"``, which
makes transformers compile the forward with ``torch.compile(mode="reduce-overhead")``: inductor
plus CUDA graphs).

With ``--interleave`` all variants of a shape share one process and alternate in rounds (one mode per
run; compiled variants keep one model each, sharing the weight tensors), so that host-speed drift
between processes does not bias the step ratios. Otherwise each (shape, variant) runs in its own
process (a crash in one, e.g. an illegal memory access, is
recorded as that cell's error and the others still run). Per cell: the prefill time (first step)
and the median decode step time, read by a logits processor that synchronises the GPU after each
step, and the greedy tokens' agreement with the unpatched model (random weights in bf16: kernels
that sum in another order may flip near-ties, so agreement is reported, not asserted). With
``--profile`` the eager batch-1 step's host time per op and GPU time per kernel are recorded too;
with ``--gpu-time`` every cell also records the GPU's kernel time per decode step (``gpu_step_ms``)
beside the step's wall time, which tells the model's own work from ``generate()``'s host work.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # sibling scripts: bench_cpu_experts (the shared result writer)
DEFAULT_OUT = HERE / "results" / "gpu_decode.json"
VARIANTS = (
    "unpatched", "static", "dynamic", "batch_aware", "static+graphs", "dynamic+graphs", "batch_aware+graphs"
)  # fmt: skip
MARK = "@@cell "


def build_model(shape: str, layers: int, vocab: int | None = None):  # type: ignore[no-untyped-def]
    """A random-weight bf16 causal LM of the shape's real layer width on the GPU (``vocab``: the
    shape's own vocabulary by default)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig

    if shape == "mixtral":
        cfg: Any = MixtralConfig(
            vocab_size=vocab or 32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
    else:
        cfg = OlmoeConfig(
            vocab_size=vocab or 50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


class StepClock:
    """A logits processor that records the time after each generated step (GPU synchronised)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):  # type: ignore[no-untyped-def]
        import torch

        torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model, prompt, new_tokens: int, repeats: int, **kw: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    import torch
    from transformers import LogitsProcessorList

    prefill, steps, tokens = [], [], None
    for _ in range(repeats):
        clock = StepClock()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            logits_processor=LogitsProcessorList([clock]), **kw,
        )  # fmt: skip
        prefill.append(clock.times[0] - t0)
        steps.extend(b - a for a, b in zip(clock.times[:-1], clock.times[1:], strict=False))
        tokens = out[:, prompt.shape[1] :]
    step = statistics.median(steps)
    return {
        "prefill_ms": 1e3 * statistics.median(prefill),
        "steps": steps,
        "step_ms": 1e3 * step,
        "decode_tok_s": prompt.shape[0] / step,
        "tokens": tokens.tolist() if tokens is not None else None,
    }


def top_p_reduction(model, prompt, p: float) -> float:  # type: ignore[no-untyped-def]
    """The routed-pair reduction of ``dmr.TopP(p)`` on one forward of ``prompt``."""
    import torch

    import dynamic_moe_router as dmr

    patch = dmr.patched(model, dmr.TopP(p=p), validate=False)
    with torch.no_grad(), patch, dmr.profile(model, count_dense=False) as rep:
        model(prompt)
    return float(rep.to_dict()["routed_flop_reduction"])


def bisect_top_p(model, prompt, target: float, steps: int = 14) -> float:  # type: ignore[no-untyped-def]
    """The ``p`` of ``dmr.TopP`` that drops about ``target`` of the routed pairs on ``prompt``
    (``steps`` bisection steps over ``[1e-4, 1]``)."""
    lo, hi = 1e-4, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if top_p_reduction(model, prompt, mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def dynamic_policy(model, prompt, target: float):  # type: ignore[no-untyped-def]
    import dynamic_moe_router as dmr

    p = bisect_top_p(model, prompt, target)
    return dmr.TopP(p=p), {"top_p": p, "routed_pair_reduction_on_prompt": top_p_reduction(model, prompt, p)}


def host_profile(model, prompt) -> dict[str, list[dict[str, Any]]]:  # type: ignore[no-untyped-def]
    """Self CPU time per op and GPU time per kernel of one eager decode forward (batch 1), top 15."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm
            model(nxt, past_key_values=out.past_key_values, use_cache=True)
            out.past_key_values.crop(prompt.shape[1])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(nxt, past_key_values=out.past_key_values, use_cache=True)
            torch.cuda.synchronize()
    events = prof.key_averages()
    result = {}
    for label, attr in (("host", "self_cpu_time_total"), ("device", "self_device_time_total")):
        rows = sorted(events, key=lambda e, a=attr: -getattr(e, a, 0))[:15]
        total = sum(getattr(e, attr, 0) for e in events)
        result[label] = [{"op": "TOTAL", "us": total, "calls": 0}] + [
            {"op": e.key[:80], "us": getattr(e, attr, 0), "calls": e.count} for e in rows
        ]
    return result


#: this project's Triton kernels (experts and fused routing), by name: their share of a step's GPU time
DMR_KERNELS = (
    "moe_gemm", "combine", "plan_small", "expert_histogram", "expert_offsets", "scatter_pairs",
    "gather_rows", "swiglu_rows", "softmax_route",
)  # fmt: skip


def kernel_ms(model, prompt, new_tokens: int, **kw: Any) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    """Wall ms, summed CUDA kernel ms and the part of it in this project's Triton kernels
    (:data:`DMR_KERNELS`) of one greedy ``generate()`` of ``new_tokens`` tokens, under the profiler
    (kernels replayed from CUDA graphs are traced one by one)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kw
        )  # fmt: skip
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    cuda = torch.autograd.DeviceType.CUDA
    kernels = [e for e in prof.events() if e.device_type == cuda and e.device_time_total > 0]
    ours = [e for e in kernels if any(name in e.name for name in DMR_KERNELS)]
    return (
        1e3 * wall,
        1e-3 * sum(e.device_time_total for e in kernels),
        1e-3 * sum(e.device_time_total for e in ours),
    )


def gpu_step_time(model, prompt, new_tokens: int, **kw: Any) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Per decode step: the GPU's kernel time (all, and this project's kernels: the experts and
    the fused routing) and the wall time, each the difference between a
    ``generate()`` of ``8 + new_tokens`` tokens and one of 8, divided by ``new_tokens`` (the prefill
    and the first steps cancel). The step's wall time minus its kernel time is what the GPU waits
    for: ``generate()``'s own host work between steps, and launches in eager mode."""
    for n in (8, 8 + new_tokens):  # unprofiled: a longer static cache, new graphs, compile outside
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    short = kernel_ms(model, prompt, 8, **kw)
    long = kernel_ms(model, prompt, 8 + new_tokens, **kw)
    return {
        "gpu_step_ms": (long[1] - short[1]) / new_tokens,
        "dmr_kernels_step_ms": (long[2] - short[2]) / new_tokens,
        "profiled_step_ms": (long[0] - short[0]) / new_tokens,
    }


def setup(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """A worker's layer count, model and random prompts (``{length: (max batch, length)}``)."""
    import torch

    layers = args.olmoe_layers if args.shape == "olmoe" else args.mixtral_layers
    model = build_model(args.shape, layers)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(3, vocab, (max(args.batches), n), generator=gen).cuda() for n in args.prompts}
    return layers, model, prompts


def worker(args: argparse.Namespace) -> int:
    import torch

    import dynamic_moe_router as dmr

    layers, model, prompts = setup(args)
    cell: dict[str, Any] = {"shape": args.shape, "layers": layers, "variant": args.variant}
    base, options = variant_options(args.variant)
    graphs = options["cuda_graphs"]
    policy, chosen = make_policy(dmr, model, prompts, args, base)
    cell.update(chosen)
    if policy is not None:
        dmr.patch(model, policy, validate=False, **options)
    for mode in [m for m in args.modes if not (graphs and m == "compiled")]:
        for n in args.prompts:
            for b in args.batches:
                key = {**cell, "mode": mode, "prompt": n, "batch": b}
                kw = {"cache_implementation": "static"} if mode == "compiled" else {}
                try:
                    with torch.no_grad():
                        prompt = prompts[n][:b]
                        # warm-up (compile, graph capture); compiled: at the timed length, so that the
                        # timed calls reuse a graph of their own static-cache length (no second compile)
                        timed_generate(model, prompt, args.new_tokens if mode == "compiled" else 4, 1, **kw)
                        res = timed_generate(model, prompt, args.new_tokens, args.repeats, **kw)
                        res.pop("steps")
                        if args.gpu_time:
                            res.update(gpu_step_time(model, prompt, args.new_tokens, **kw))
                    stats = torch._dynamo.utils.counters
                    res["compiled_graphs"] = int(stats["stats"].get("unique_graphs", 0))
                    res["graph_breaks"] = int(sum(stats["graph_break"].values()))
                    print(MARK + json.dumps({**key, **res}), flush=True)
                except Exception as exc:  # recorded per cell; a CUDA fault ends the process
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    print(MARK + json.dumps({**key, "error": msg}), flush=True)
                    if "CUDA" in msg or "illegal" in msg:
                        return 1
        if mode == "eager" and args.profile:
            prof = host_profile(model, prompts[args.prompts[0]][:1])
            print(MARK + json.dumps({**cell, "mode": "profile", "ops": prof}), flush=True)
    return 0


def variant_options(variant: str) -> tuple[str, dict[str, bool]]:
    """A variant's base name and its patch options: ``+graphs`` is ``cuda_graphs=True``, ``+fused``
    is ``fused_routing=True`` (e.g. ``dynamic+fused+graphs``)."""
    base, *extras = variant.split("+")
    unknown = set(extras) - {"graphs", "fused"}
    if unknown:
        raise SystemExit(f"unknown variant suffix {sorted(unknown)} in {variant!r}; use +graphs or +fused")
    return base, {"cuda_graphs": "graphs" in extras, "fused_routing": "fused" in extras}


def make_policy(dmr, model, prompts, args: argparse.Namespace, base: str):  # type: ignore[no-untyped-def]
    """The policy of a variant's base name (``None`` for unpatched) and what was chosen for it."""
    if base == "static":
        return dmr.StaticTopK(), {}
    if base == "dynamic":
        first = prompts[args.prompts[0]][: min(max(args.batches), 8)]
        return dynamic_policy(model, first, args.target)
    if base == "batch_aware":
        return dmr.BatchAware(dmr.StaticTopK(), **json.loads(args.batch_aware)), {}
    if base == "tile_aware":  # the dynamic variant's TopP with its rows moved to whole 256-row tiles
        first = prompts[args.prompts[0]][: min(max(args.batches), 8)]
        inner, chosen = dynamic_policy(model, first, args.target)
        return dmr.TileAware(inner, rows=256), chosen
    return None, {}


def interleaved_worker(args: argparse.Namespace) -> int:
    """Every variant of a shape in one process, alternating in rounds, so that a host whose speed
    drifts (a shared machine) biases no variant.

    Eager mode: one model, patched and unpatched around each variant's ``generate()``. Compiled
    mode: one model object per variant, all sharing the same weight tensors (patched once), so
    that each keeps its own compiled graphs (transformers builds a static cache per ``generate()``
    call); round 0 runs the timed length once per variant (compilation, CUDA-graph capture) and is
    not counted."""
    import torch

    import dynamic_moe_router as dmr

    layers, model, prompts = setup(args)
    variants = args.variant.split(",")
    policies, info = {}, {}
    for v in variants:
        base, options = variant_options(v)
        policy, chosen = make_policy(dmr, model, prompts, args, base)
        policies[v], info[v] = (policy, options), chosen
    compiled = args.modes == ["compiled"]
    models = {v: model for v in variants}
    if compiled:
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 64)  # an entry per variant and graph (not a recompile storm)
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # weights shared, not copied
        for v in variants:
            policy, options = policies[v]
            models[v] = copy.deepcopy(model, dict(shared)) if policy is not None else model
            if policy is not None:
                dmr.patch(models[v], policy, validate=False, **options)
    kw = {"cache_implementation": "static"} if compiled else {}

    def patched(v: str) -> Any:  # eager: the one model patched for variant v while in the block
        policy, options = policies[v]
        if policy is None or compiled:  # compiled variants' models are patched for good above
            return torch.no_grad()
        return dmr.patched(model, policy, validate=False, **options)

    for n in args.prompts:
        for b in args.batches:
            prompt = prompts[n][:b]
            steps: dict[str, list[float]] = {v: [] for v in variants}
            prefill: dict[str, list[float]] = {v: [] for v in variants}
            tokens: dict[str, Any] = {}
            for r in range(args.rounds + 1):  # round 0 warms every variant (compile, graph capture, JIT)
                for v in variants:
                    length = args.new_tokens if r or compiled else 4
                    with torch.no_grad(), patched(v):
                        res = timed_generate(models[v], prompt, length, 1, **kw)
                    if r:
                        steps[v].extend(res["steps"])
                        prefill[v].append(res["prefill_ms"])
                        tokens[v] = res["tokens"]
            for v in variants:
                step = statistics.median(steps[v])
                cell = {
                    "shape": args.shape, "layers": layers, "variant": v, "mode": args.modes[0], "prompt": n,
                    "batch": b, "interleaved_rounds": args.rounds,
                    "prefill_ms": statistics.median(prefill[v]), "step_ms": 1e3 * step,
                    "decode_tok_s": b / step, "tokens": tokens[v], **info[v],
                }  # fmt: skip
                if args.gpu_time:
                    with torch.no_grad(), patched(v):  # the variant's own model, patched
                        cell.update(gpu_step_time(models[v], prompt, args.new_tokens, **kw))
                if compiled:
                    stats = torch._dynamo.utils.counters
                    cell["compiled_graphs_in_process"] = int(stats["stats"].get("unique_graphs", 0))
                    cell["graph_breaks_in_process"] = int(sum(stats["graph_break"].values()))
                print(MARK + json.dumps(cell), flush=True)
    return 0


def run_cell(args: argparse.Namespace, shape: str, variant: str) -> list[dict[str, Any]]:
    cmd = [
        sys.executable, __file__, "--worker", "--shape", shape, "--variant", variant,
        "--olmoe-layers", str(args.olmoe_layers), "--mixtral-layers", str(args.mixtral_layers),
        "--batches", ",".join(map(str, args.batches)), "--prompts", ",".join(map(str, args.prompts)),
        "--modes", ",".join(args.modes), "--new-tokens", str(args.new_tokens),
        "--repeats", str(args.repeats), "--target", str(args.target), "--batch-aware", args.batch_aware,
        "--rounds", str(args.rounds),
    ] + (["--profile"] if args.profile else []) + (["--interleave"] if args.interleave else []) + (
        ["--gpu-time"] if args.gpu_time else []
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cell_timeout, check=False)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"timed out after {args.cell_timeout}s", -1
    cells = [json.loads(line[len(MARK) :]) for line in out.splitlines() if line.startswith(MARK)]
    if rc != 0:
        tail = [ln for ln in err.splitlines() if ln.strip()][-3:]
        cells.append({"shape": shape, "variant": variant, "error": f"worker rc={rc}: " + " | ".join(tail)})
    print(f"{shape} {variant}: {len(cells)} cells, rc={rc}, {time.perf_counter() - t0:.0f}s", flush=True)
    for c in cells:
        brief = {k: v for k, v in c.items() if k not in ("tokens", "ops")}
        print("   ", json.dumps(brief)[:400], flush=True)
    return cells


def agreement(cells: list[dict[str, Any]]) -> None:
    """Each cell's greedy-token agreement with the unpatched cell of the same key."""
    ref = {
        (c["shape"], c["mode"], c["prompt"], c["batch"]): c["tokens"]
        for c in cells
        if c.get("variant") == "unpatched" and c.get("tokens") is not None
    }
    for c in cells:
        toks = c.get("tokens")
        r = ref.get((c.get("shape"), c.get("mode"), c.get("prompt"), c.get("batch")))
        if toks is None or r is None:
            continue
        flat = [(a == b) for ra, rb in zip(toks, r, strict=True) for a, b in zip(ra, rb, strict=True)]
        first = [next((i for i, (a, b) in enumerate(zip(ra, rb, strict=True)) if a != b), len(ra))
                 for ra, rb in zip(toks, r, strict=True)]  # fmt: skip
        c["token_agreement"] = sum(flat) / len(flat)
        c["first_divergence_median"] = statistics.median(first)
    for c in cells:
        c.pop("tokens", None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--shapes", default="olmoe,mixtral")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--olmoe-layers", type=int, default=16)
    ap.add_argument("--mixtral-layers", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.30, help="routed-pair reduction of 'dynamic'")
    ap.add_argument("--batch-aware", default="{}", help="JSON keyword arguments of dmr.BatchAware")
    ap.add_argument("--cell-timeout", type=int, default=400)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--gpu-time",
        action="store_true",
        help="also record each cell's GPU kernel time per decode step (gpu_step_ms), from the profiler",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="all variants of a shape in one process, alternating in rounds (one mode per run)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --interleave")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batches = [int(x) for x in str(args.batches).split(",")]
    args.prompts = [int(x) for x in str(args.prompts).split(",")]
    args.modes = str(args.modes).split(",")
    if args.worker:
        return interleaved_worker(args) if args.interleave else worker(args)
    bases = {"unpatched", "static", "dynamic", "batch_aware", "tile_aware"}
    for variant in args.variants.split(","):
        if variant_options(variant)[0] not in bases:
            ap.error(f"unknown variant {variant!r}: its name before any + must be one of {sorted(bases)}")
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_decode needs a CUDA GPU", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    cells: list[dict[str, Any]] = []
    if args.interleave and args.modes not in (["eager"], ["compiled"]):
        ap.error("--interleave times one mode per run; pass --modes eager or --modes compiled")
    if args.interleave and args.modes == ["compiled"] and "graphs" in args.variants:
        ap.error("+graphs variants run in eager mode only; leave them out of --variants with compiled")
    for shape in args.shapes.split(","):
        groups = [args.variants] if args.interleave else args.variants.split(",")
        for variant in groups:
            cells.extend(run_cell(args, shape, variant))
            write(args, argv, copy.deepcopy(cells), time.perf_counter() - t0)  # partial results survive
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f}s")
    return 0


def write(args: argparse.Namespace, argv: list[str] | None, cells: list[dict[str, Any]], wall: float) -> None:
    import bench_cpu_experts as cpu_bench  # the shared result writer

    agreement(cells)
    command = cpu_bench.command_line("bench_gpu_decode.py", argv)
    out = {
        **cpu_bench.result_header("gpu_decode", command, kind=True),
        "wall_s": wall,
        "machine": {**cpu_bench.gpu_machine(), "cpu_count": os.cpu_count()},
        "cells": cells,
    }
    cpu_bench.write_result(out, args.out, say=False)


if __name__ == "__main__":
    raise SystemExit(main())
