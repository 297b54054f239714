"""Where a compiled decode step's time goes, patched and not (a GPU diagnostic for issue 11).

Run on a CUDA GPU::

    python benchmarks/diag_compiled_step.py --out /tmp/diag_compiled_step.json

The compiled static-cache mode (``generate(..., cache_implementation="static")``: transformers
compiles the forward with ``torch.compile(mode="reduce-overhead")``) was timed by
``bench_gpu_decode.py`` as the wall time between decode steps. This script asks why the dynamic
variant's step does not shrink with its pairs, at batch 1, in one process, the variants interleaved
in rounds (each has its own model object over one shared set of weight tensors, patched once):

* **per decode step of** ``generate()`` (the difference between a run of ``8 + N`` new tokens and
  one of 8, divided by ``N``): the wall time with no clock of ours in the loop, and under the
  profiler the GPU's kernel time (all, and this project's kernels), the CUDA-graph launches, the
  kernel launches issued outside graphs, and the host synchronisations;
* whether inductor skipped CUDA graphs for a variant (its ``cudagraph_skips`` counter and the
  messages it logged);
* the routed-pair reduction of the timed decode steps themselves (the policy was bisected on the
  prompt): the dynamic variant's own greedy tokens of its ``8 + N`` run, those of steps 8 to
  ``7 + N`` fed back one at a time through its eager forward with a dynamic cache, under
  ``dmr.profile``;
* the greedy first token after the prompt: each variant's token, and the unpatched prefill
  logits' top-1 / top-2 margin against each patched variant's largest logit difference from
  unpatched (random bf16 weights: a margin below twice static's difference is a near-tie that
  another summation order may flip; dynamic's difference comes from its routing).

Variants: ``unpatched``; ``static`` / ``dynamic`` (``dmr.StaticTopK()`` / ``dmr.TopP(p)`` with
``p`` bisected for about 30% fewer pairs on the prompt; ``validate=False``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from diag_eager_host import SYNC_EVENTS  # noqa: E402  (the host synchronisations it counts too)

LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


class SkipLog(logging.Handler):
    """Keeps the log messages that mention CUDA graphs being skipped."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "cudagraph" in msg.lower() and "skip" in msg.lower():
            self.messages.append(msg[:300])


def generate(model, prompt, n: int) -> Any:  # type: ignore[no-untyped-def]
    return model.generate(
        prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static"
    )  # fmt: skip


def wall_ms(model, prompt, n: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(model, prompt, n)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0)


def profiled(model, prompt, n: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Kernel time, this project's kernel time, graph and kernel launches, syncs of one ``generate()``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_gpu_decode import DMR_KERNELS

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, prompt, n)
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    events = prof.events()
    kernels = [e for e in events if e.device_type == cuda and e.device_time_total > 0]
    ours = [e for e in kernels if any(name in e.name for name in DMR_KERNELS)]
    names = [e.name for e in events if e.device_type != cuda]
    by_kernel: dict[str, float] = {}
    for e in kernels:
        by_kernel[e.name[:70]] = by_kernel.get(e.name[:70], 0.0) + 1e-3 * e.device_time_total
    return {
        "by_kernel": by_kernel,
        "gpu_ms": 1e-3 * sum(e.device_time_total for e in kernels),
        "dmr_kernels_ms": 1e-3 * sum(e.device_time_total for e in ours),
        "graph_launches": sum(name == "cudaGraphLaunch" for name in names),
        "kernel_launches": sum(name in LAUNCH_EVENTS for name in names),
        "syncs": sum(name in SYNC_EVENTS for name in names),
    }


def per_step_profile(model, prompt, new_tokens: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    short, long = profiled(model, prompt, 8), profiled(model, prompt, 8 + new_tokens)
    a, b = short.pop("by_kernel"), long.pop("by_kernel")
    per_kernel = {k: (b[k] - a.get(k, 0.0)) / new_tokens for k in b}
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        **{f"{k}_per_step": (long[k] - short[k]) / new_tokens for k in short},
        "top_kernels_ms_per_step": {k: round(v, 4) for k, v in top},
    }


def decode_pair_reduction(model, prompt, tokens: list[int], new_tokens: int) -> float:  # type: ignore[no-untyped-def]
    """Routed-pair reduction over the decode steps the step time covers: of ``generate()`` with
    ``8 + new_tokens`` tokens (``tokens``, a variant's own greedy ones) minus that with 8, the steps
    that feed generated tokens 8 .. 7 + new_tokens (1-based). The prompt and the first 7 tokens are
    prefilled uncounted; those steps' tokens are then fed one at a time, eager with a dynamic cache,
    counted by ``dmr.profile``."""
    import torch

    import dynamic_moe_router as dmr

    if len(tokens) < 7 + new_tokens:
        raise ValueError(f"need {7 + new_tokens} generated tokens, got {len(tokens)}")
    head = torch.tensor([tokens[:7]], device=prompt.device)  # (1, 7)
    with torch.no_grad():
        cache = model(torch.cat([prompt, head], 1), use_cache=True).past_key_values
        with dmr.profile(model, count_dense=False) as rep:
            for t in tokens[7 : 7 + new_tokens]:
                step = torch.tensor([[t]], device=prompt.device)  # (1, 1)
                cache = model(step, past_key_values=cache, use_cache=True).past_key_values
    return float(rep.to_dict()["routed_flop_reduction"])


def first_token(models: dict[str, Any], prompt) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Prefill logits at the last position (eager, no cache): each variant's greedy token, the
    unpatched top-1 / top-2 margin and each variant's largest logit difference from unpatched."""
    import torch

    with torch.no_grad():
        logits = {v: m(prompt, use_cache=False).logits[0, -1].float() for v, m in models.items()}
    ref = logits["unpatched"]
    top2 = ref.topk(2).values
    return {
        "tokens": {v: int(x.argmax()) for v, x in logits.items()},
        "unpatched_top2_margin": float(top2[0] - top2[1]),
        "max_abs_logit_diff": {
            v: float((x - ref).abs().max()) for v, x in logits.items() if v != "unpatched"
        },
    }


def run_shape(shape: str, layers: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import dynamic_moe_router as dmr
    from bench_gpu_decode import build_model, dynamic_policy

    counters = torch._dynamo.utils.counters
    model = build_model(shape, layers)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt), generator=gen).cuda()
    p_policy, chosen = dynamic_policy(model, prompt, args.target)
    policies = {"unpatched": None, "static": dmr.StaticTopK(), "dynamic": p_policy}
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # weights shared, not copied
    models = {}
    for v, policy in policies.items():
        models[v] = model if policy is None else copy.deepcopy(model, dict(shared))
        if policy is not None:
            dmr.patch(models[v], policy, validate=False)
    out: dict[str, Any] = {"shape": shape, "layers": layers, "batch": 1, "prompt": args.prompt, **chosen}
    out["first_token"] = first_token(models, prompt)
    info = {}
    handler = SkipLog()
    logging.getLogger("torch").addHandler(handler)
    for v, m in models.items():  # round 0: compile and capture at both lengths
        skips0 = counters["inductor"].get("cudagraph_skips", 0)
        handler.messages.clear()
        with torch.no_grad():
            generate(m, prompt, 8)
            long_tokens = generate(m, prompt, 8 + args.new_tokens)[0, args.prompt :].tolist()
            tokens = generate(m, prompt, args.new_tokens)[0, args.prompt :].tolist()
        info[v] = {
            "long_tokens": long_tokens,
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0) - skips0,
            "cudagraph_skip_messages": sorted(set(handler.messages))[:5],
            "generated_tokens": tokens,
        }
    logging.getLogger("torch").removeHandler(handler)
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in models}
    for _ in range(args.rounds):
        for v, m in models.items():
            with torch.no_grad():
                short = statistics.median(wall_ms(m, prompt, 8) for _ in range(2))
                long = statistics.median(wall_ms(m, prompt, 8 + args.new_tokens) for _ in range(2))
            samples[v].append({"generate_step_ms": (long - short) / args.new_tokens})
    prof = {}
    for v, m in models.items():
        with torch.no_grad():
            prof[v] = per_step_profile(m, prompt, args.new_tokens)
    ref_tokens = info["unpatched"]["generated_tokens"]
    if "dynamic" in models:
        out["routed_pair_reduction_on_decode"] = decode_pair_reduction(
            models["dynamic"], prompt, info["dynamic"]["long_tokens"], args.new_tokens
        )
    out["variants"] = {}
    for v in models:
        keys = samples[v][0].keys()
        toks = info[v]["generated_tokens"]
        agree = [a == b for a, b in zip(toks, ref_tokens, strict=True)]
        out["variants"][v] = {
            **{k: statistics.median(s[k] for s in samples[v]) for k in keys},
            **{f"{k}_rounds": [round(s[k], 4) for s in samples[v]] for k in keys},
            **prof[v],
            **{k: x for k, x in info[v].items() if k not in ("generated_tokens", "long_tokens")},
            "first_divergence": agree.index(False) if False in agree else len(agree),
        }
    return out


def write(args: argparse.Namespace, results: list[dict[str, Any]], start: float, argv: Any) -> None:
    import torch
    import transformers

    payload = {
        "benchmark": "diag_compiled_step",
        "command": "python benchmarks/diag_compiled_step.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"gpu": torch.cuda.get_device_name(), "host": platform.processor() or platform.machine()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_s": round(time.time() - start, 1),
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "target": args.target,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="olmoe:16,mixtral:8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--target", type=float, default=0.30)
    args = ap.parse_args(argv)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)  # an entry per variant and cache length (not a recompile storm)
    torch._logging.set_logs(perf_hints=True)
    start = time.time()
    results = []
    for item in args.shapes.split(","):
        shape, layers = item.split(":")
        res = run_shape(shape, int(layers), args)
        results.append(res)
        write(args, results, start, argv)
        print(json.dumps(res["first_token"]), flush=True)
        print(
            f"{shape}: pair reduction on the prompt {res['routed_pair_reduction_on_prompt']:.3f}, "
            f"on the decode steps {res.get('routed_pair_reduction_on_decode', float('nan')):.3f}",
            flush=True,
        )
        for v, d in res["variants"].items():
            print(
                f"{shape:8s} {v:10s} generate step {d['generate_step_ms']:6.3f} ms  GPU "
                f"{d['gpu_ms_per_step']:6.3f} (dmr {d['dmr_kernels_ms_per_step']:6.3f})  graph launches "
                f"{d['graph_launches_per_step']:.1f} kernel launches {d['kernel_launches_per_step']:.1f} "
                f"syncs {d['syncs_per_step']:.1f}  cudagraph skips {d['cudagraph_skips']} "
                f"first divergence {d['first_divergence']}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
