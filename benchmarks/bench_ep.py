"""Expert parallelism with dynamic routing across GPUs (or CPU processes): time, bytes exchanged, load.

Run under torchrun, one process per GPU (two H200s for the measurement the issue asks for)::

    torchrun --nproc_per_node 2 benchmarks/bench_ep.py                  # writes results/ep_2gpu.json
    torchrun --nproc_per_node 2 benchmarks/bench_ep.py --device cpu --shapes tiny \\
        --prefill 64 --decode-batches 4 --out /tmp/ep.json                # CPU, gloo, a tiny model

Models: random weights of the Mixtral-8x7B and OLMoE-1B-7B layer shapes (bf16 on GPU, ``--layers``
decoder layers each, 2 by default), or ``tiny`` (``dynamic_moe_router.hf.tiny``, fp32, CPU). Rank 0
saves the model, and every rank loads it with transformers' expert parallelism
(``DistributedConfig(tp_size=N, ep_size=N)``, from ``dmr.hf.parallel.expert_parallel_config``).

Workloads: prefill of ``--prefill`` tokens (one sequence, one forward) and decode at each
``--decode-batches`` batch (a 32-token prompt, then ``--steps`` timed one-token steps with the KV
cache).

Variants: ``unpatched`` (transformers' own expert-parallel layer), ``static`` and ``dynamic``
(``dmr.StaticTopK()`` / ``dmr.TopP`` for about ``--target`` fewer routed pairs, bisected on the
prefill) with the ``all_reduce`` dispatch, and ``a2a_static`` / ``a2a_dynamic`` with the kept-pairs
``all_to_all`` dispatcher. Per cell (rank 0 writes, with every rank's numbers): the median ms (every
rank synchronised, the slowest rank's time), the bytes each rank sent in the MoE layers'
collectives (for ``unpatched``: transformers' all-reduce of the output, counted the same way as
``all_reduce``), executed pairs per rank and the load imbalance (max / mean).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "ep_2gpu.json"
VARIANTS = ("unpatched", "static", "dynamic", "a2a_static", "a2a_dynamic")
sys.path.insert(0, str(HERE))

from bench_gpu_decode import bisect_top_p  # noqa: E402  (the dynamic policy's p, as for decode)


def build(shape: str, layers: int, device: str):  # type: ignore[no-untyped-def]
    """A random-weight model of the shape (CPU; rank 0 saves it)."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig

    if shape == "tiny":
        from dynamic_moe_router.hf.tiny import tiny_model

        return tiny_model("olmoe")
    if shape == "mixtral":
        cfg: Any = MixtralConfig(
            vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
            num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        )  # fmt: skip
    else:
        cfg = OlmoeConfig(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=layers,
            num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def sync(device: str) -> None:
    import torch
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def timed(fn, device: str, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median ms of ``fn`` over ``repeats`` calls (one warm-up), all ranks synchronised."""
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def decode_fn(model, prompt, steps: int):  # type: ignore[no-untyped-def]
    """A prefilled KV cache and a function that runs ``steps`` one-token steps from a copy of it."""
    import copy

    import torch

    with torch.no_grad():
        out = model(prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def run():  # type: ignore[no-untyped-def]
        c, tok = copy.deepcopy(cache), nxt
        with torch.no_grad():
            for _ in range(steps):
                tok = model(tok, past_key_values=c, use_cache=True).logits[:, -1:].argmax(-1)

    return run


def measure(model, variant: str, policy, work, device: str, repeats: int, prompt) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """One cell: time, then (a separate call) bytes, pairs and load, gathered from every rank."""
    import torch
    import torch.distributed as dist

    import dynamic_moe_router as dmr
    from dynamic_moe_router.hf.layers import find_moe_layers, model_family
    from dynamic_moe_router.hf.parallel import all_reduce_bytes

    cell: dict[str, Any] = {"variant": variant}
    if variant == "unpatched":
        cell["ms"] = timed(work, device, repeats)
        with torch.no_grad(), dmr.profile(model, count_dense=False) as rep:
            model(prompt)
        layers, _ = find_moe_layers(model, model_family(model))
        n = dist.get_world_size()
        tokens = prompt.numel()
        elt = 2 if device == "cuda" else 4
        # transformers' AllReduceEP sums the (T, H) output with one all-reduce per layer
        cell["bytes_sent_per_rank"] = [
            sum(all_reduce_bytes(n, tokens * layer.hidden_size, elt) for layer in layers)
        ] * n
        cell["executed_pairs"] = rep.to_dict()["executed_pairs"]
        return cell
    dispatch = "all_to_all" if variant.startswith("a2a") else "all_reduce"
    with dmr.patched(model, policy, validate=False, dispatch=dispatch) as handle:
        cell["ms"] = timed(work, device, repeats)
        for e in handle.experts:
            e.exchange.reset()
        with torch.no_grad(), dmr.profile(model, count_dense=False) as rep:
            model(prompt)
        sent = sum(e.exchange.bytes_sent for e in handle.experts)
        moved = sum(e.exchange.dispatch_bytes + e.exchange.combine_bytes for e in handle.experts)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {"sent": sent, "moved": moved})
    d = rep.to_dict()
    cell["bytes_sent_per_rank"] = [x["sent"] for x in every]  # type: ignore[index]
    cell["pair_bytes_per_rank"] = [x["moved"] for x in every]  # type: ignore[index]
    cell["executed_pairs"] = d["executed_pairs"]
    cell["native_pairs"] = d["native_pairs"]
    cell["rank_executed_pairs"] = d["expert_parallel"]["rank_executed_pairs"]
    cell["load_imbalance"] = d["expert_parallel"]["load_imbalance"]
    return cell


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shapes", default="mixtral,olmoe", help="comma list of mixtral, olmoe, tiny")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", default="4096,16384")
    ap.add_argument("--decode-batches", default="32,128")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.30)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    if unknown := set(shapes) - {"mixtral", "olmoe", "tiny"}:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from mixtral, olmoe, tiny")
    if "WORLD_SIZE" not in os.environ:
        ap.error("run under torchrun, e.g. torchrun --nproc_per_node 2 benchmarks/bench_ep.py")
    try:  # fail before any model is built when the output path cannot be written
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out: cannot create {args.out.parent}: {exc}")
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    import bench_cpu_experts as cpu_bench  # the shared result writer
    import dynamic_moe_router as dmr
    from dynamic_moe_router.hf.parallel import expert_parallel_config

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    cells: list[dict[str, Any]] = []
    tmp = Path(tempfile.gettempdir()) / f"dmr_bench_ep_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    for shape in shapes:
        path = tmp / shape
        if rank == 0:
            build(shape, args.layers, args.device).save_pretrained(path)
        dist.barrier()
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.bfloat16 if args.device == "cuda" else torch.float32,
            distributed_config=expert_parallel_config(config),
        ).eval()
        if model.device.type != args.device:
            raise SystemExit(f"the model loaded on {model.device}, not {args.device}")
        gen = torch.Generator().manual_seed(0)
        prefill_len = max(int(x) for x in args.prefill.split(","))
        calib = torch.randint(3, config.vocab_size, (1, prefill_len), generator=gen).to(args.device)
        p = bisect_top_p(model, calib, args.target, steps=12)
        policies = {"static": dmr.StaticTopK(), "dynamic": dmr.TopP(p=p)}
        works = []
        for n in (int(x) for x in args.prefill.split(",")):
            prompt = calib[:, :n]

            def run(prompt=prompt, model=model):  # type: ignore[no-untyped-def]
                with torch.no_grad():
                    model(prompt)

            works.append(({"workload": "prefill", "tokens": n}, run, prompt))
        for b in (int(x) for x in args.decode_batches.split(",")):
            prompt = torch.randint(3, config.vocab_size, (b, 32), generator=gen).to(args.device)
            step_ids = prompt[:, -1:]
            works.append(({"workload": "decode", "batch": b}, None, (prompt, step_ids)))
        for meta, run, prompt in works:
            for variant in VARIANTS:
                policy = policies["static" if variant.endswith("static") else "dynamic"]
                if meta["workload"] == "decode":
                    full, step_ids = prompt
                    if variant == "unpatched":
                        work = decode_fn(model, full, args.steps)
                        cell = measure(model, variant, None, work, args.device, args.repeats, step_ids)
                    else:  # the cache is built by the patched model itself
                        with dmr.patched(model, policy, validate=False):
                            work = decode_fn(model, full, args.steps)
                        cell = measure(model, variant, policy, work, args.device, args.repeats, step_ids)
                    cell["ms"] /= args.steps  # per decode step
                else:
                    cell = measure(model, variant, policy, run, args.device, args.repeats, prompt)
                cell = {"shape": shape, **meta, **cell, "top_p": p if "dynamic" in variant else None}
                cells.append(cell)
                if rank == 0:
                    print(json.dumps(cell), flush=True)
        del model
    if rank == 0:
        command = cpu_bench.command_line("bench_ep.py", argv, launcher=f"torchrun --nproc_per_node {world}")
        out = {
            **cpu_bench.result_header("ep_2gpu" if args.device == "cuda" else "ep_cpu", command),
            "machine": {
                "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                "ranks": world,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "wall_s": time.perf_counter() - t0,
            "cells": cells,
        }
        cpu_bench.write_result(out, args.out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
