"""One expert-parallel rank's local work on one GPU: transformers' layer against this project's dispatch.

Run on a CUDA GPU::

    python benchmarks/bench_gpu_ep_local.py         # writes benchmarks/results/gpu_ep_local.json

Two ranks split each layer's experts (``--ranks``, 2 by default); this times what *rank 0* computes,
without the collectives (they need a second GPU: ``bench_ep.py``). Shapes as in
``bench_gpu_experts.py`` (bf16 Mixtral-8x7B and OLMoE-1B-7B layers, real widths, random weights),
router logits Gaussian at the reference models' mean normalised entropy; ``static`` is the native
top-k, ``dynamic`` is ``dmr.TopP`` with about 30% fewer pairs. Token counts: decode batches (32, 128)
and prefills (4096, 16384) of the batch every rank holds.

Variants (median ms by ``triton.testing.do_bench``; the ratios are what the issue asks for):

* ``hf``: transformers' expert-parallel layer at inference (``AllReduceEP``): the rank's experts
  module (``E / ranks`` experts, transformers' default ``grouped_mm`` implementation) on every token,
  off-rank routes masked to the local sentinel with weight 0, as transformers itself calls it;
* ``all_reduce``: this project's ``all_reduce`` dispatch: ``experts_forward`` on the rank's kept
  pairs only (``ExpertShard.local_routes``);
* ``all_to_all``: this project's kept-pairs dispatcher, its three local stages timed apart and
  together: ``pack`` (the rank's slice of the batch: sort its kept pairs by expert, count them,
  gather their rows), ``experts`` (the rank's experts on the rows it would receive: every kept pair
  of its experts, top-1, unit weight) and ``unpack`` (the returned rows weighted and summed per token
  of the slice).
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
from dynamic_moe_router.hf.parallel import ExpertShard, combine_pairs, pack_pairs, run_received  # noqa: E402

DEFAULT_OUT = HERE / "results" / "gpu_ep_local.json"


def bench_ms(fn) -> float:  # type: ignore[no-untyped-def]
    import triton.testing as tt

    return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def local_experts(shape: dict[str, Any], ranks: int, seed: int) -> torch.nn.Module:
    """Rank 0's experts module: ``E / ranks`` experts, transformers' default implementation, bf16."""
    local = dict(shape, E=shape["E"] // ranks)
    experts = cpu_bench.build_experts(local, seed=seed).to("cuda", torch.bfloat16)
    experts.config._experts_implementation = "grouped_mm"  # transformers' GPU default
    experts.num_experts = local["E"]
    experts._is_expert_parallel = True  # transformers >= 5.2x skips sentinel rows only when set
    return experts


def hf_masked(shard: ExpertShard, ids: torch.Tensor, weights: torch.Tensor):  # type: ignore[no-untyped-def]
    """``AllReduceEP``'s view of the routing on rank ``shard.rank``: local ids, off-rank weight 0."""
    off = (ids // shard.num_local) != shard.rank
    local = torch.where(off, shard.num_local, ids % shard.num_local)
    return local, weights.masked_fill(off, 0.0)


def all_to_all_stages(shard: ExpertShard, experts, hidden, ids, weights):  # type: ignore[no-untyped-def]
    """The dispatcher's local stages on rank 0 (``hf.parallel``'s ``pack_pairs``, ``run_received`` and
    ``combine_pairs``, as ``_all_to_all`` calls them), minus the collectives."""
    tokens, k = ids.shape
    rows = -(-tokens // shard.size)
    mine_h, mine_ids, mine_w = hidden[:rows], ids[:rows], weights[:rows]

    def pack():  # type: ignore[no-untyped-def]
        order, sent = pack_pairs(shard, mine_ids)
        return order, sent.sum(1)

    order, sizes = pack()
    kept = int(sizes.sum())
    pairs = order[:kept]

    def gather():  # type: ignore[no-untyped-def]
        return mine_h[pairs // k]

    # what rank 0 receives: from each rank's slice, the kept pairs of rank 0's experts, grouped by
    # expert (the first rows of that slice's packed order), in (source rank, expert) order
    received, recv_parts = [], []
    for r in range(shard.size):  # a slice past the batch's end is empty
        part = slice(r * rows, (r + 1) * rows)
        part_order, part_sent = pack_pairs(shard, ids[part])
        received.append(part_sent[0])  # (E_local,)
        recv_parts.append(hidden[part][part_order[: int(part_sent[0].sum())] // k])
    received_counts, recv_rows = torch.stack(received), torch.cat(recv_parts)  # (N, E_local), (R, H)

    def run_local(h, i, w):  # type: ignore[no-untyped-def]
        return experts_forward(experts, h, i, w)

    def run_experts():  # type: ignore[no-untyped-def]
        return run_received(shard, run_local, recv_rows, received_counts, weights.dtype)

    back = torch.randn(kept, hidden.shape[1], device=hidden.device, dtype=hidden.dtype)

    def unpack():  # type: ignore[no-untyped-def]
        return combine_pairs(back, pairs, mine_w, rows, hidden.dtype)

    def whole():  # type: ignore[no-untyped-def]
        pack()
        gather()
        run_experts()
        unpack()

    return {
        "pack_ms": bench_ms(lambda: (pack(), gather())),
        "experts_ms": bench_ms(run_experts),
        "unpack_ms": bench_ms(unpack),
        "total_ms": bench_ms(whole),
        "rows_received": int(recv_rows.shape[0]),
        "pairs_sent": kept - int(sizes[0]),
    }


def run_shape(si: int, shape: dict[str, Any], tokens_list: list[int], ranks: int) -> list[dict[str, Any]]:
    e, k, norm = shape["E"], shape["k"], shape["normalize"]
    shard = ExpertShard(group=None, rank=0, size=ranks, num_local=e // ranks)
    experts = local_experts(shape, ranks, seed=si)
    sigma = cpu_bench.calibrate_sigma(e, ENTROPY, seed=17 * si)
    logits_all = cpu_bench.draw_logits(max(tokens_list), e, sigma, si)
    probs_all = torch.softmax(logits_all, -1)
    p = cpu_bench.search_top_p(probs_all[:4096], k, TARGET_RATIO)
    cells = []
    for tokens in tokens_list:
        probs = probs_all[:tokens].cuda()
        hidden = torch.randn(tokens, shape["H"], device="cuda", dtype=torch.bfloat16)
        hf_ms = None
        for routing in ("static", "dynamic"):
            policy = dmr.StaticTopK() if routing == "static" else dmr.TopP(p=p)
            r = dmr.route(probs, policy, native_k=k, normalize=norm, validate=False)
            ids, w = r.ids, r.weights.to(torch.bfloat16)
            with torch.no_grad():
                if routing == "static":  # transformers' layer runs the native routing
                    hf_ids, hf_w = hf_masked(shard, ids, w)
                    hf_ms = bench_ms(lambda h=hidden, i=hf_ids, hw=hf_w: experts(h, i, hw))
                local_ids = shard.local_routes(ids)
                ar_ms = bench_ms(lambda h=hidden, i=local_ids, w=w: experts_forward(experts, h, i, w))
                a2a = all_to_all_stages(shard, experts, hidden, ids, w)
            cell = {
                "shape": shape["name"],
                "ranks": ranks,
                "local_experts": shard.num_local,
                "tokens": tokens,
                "routing": routing,
                "pair_ratio": r.kept_pairs() / (tokens * k),
                "local_pairs": int((local_ids < shard.num_local).sum()),
                "hf_ms": hf_ms,
                "all_reduce_ms": ar_ms,
                "all_to_all": a2a,
                "all_reduce_vs_hf": ar_ms / hf_ms,
                "all_to_all_vs_hf": a2a["total_ms"] / hf_ms,
            }
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32,128,4096,16384")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_ep_local needs a CUDA GPU", file=sys.stderr)
        return 2
    tokens_list = [int(x) for x in args.tokens.split(",")]
    t0 = time.perf_counter()
    cells: list[dict[str, Any]] = []
    for si, shape in enumerate(SHAPES):
        cells += run_shape(si, shape, tokens_list, args.ranks)
    command = cpu_bench.command_line("bench_gpu_ep_local.py", argv)
    out = {
        **cpu_bench.result_header("gpu_ep_local", command),
        "machine": cpu_bench.gpu_machine(),
        "wall_s": time.perf_counter() - t0,
        "cells": cells,
    }
    cpu_bench.write_result(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
