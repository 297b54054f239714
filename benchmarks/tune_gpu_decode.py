"""Tile sweep of the fused Triton path for decode (1 and 16 tokens), timed by CUDA-graph replay.

    python benchmarks/tune_gpu_decode.py        # prints a table; the chosen tiles go to _gpu.decode_config

Each line: shape, tokens, routing (static k / dynamic with fewer experts), the tile configs and the
median replay time; the bytes of the touched experts over that time give the achieved bandwidth.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton.testing as tt

import bench_cpu_experts as cpu_bench
from dynamic_moe_router.experts import _gpu

SHAPES = [("mixtral-8x7b", "mixtral", 8, 2, 4096, 14336), ("olmoe-1b-7b", "olmoe", 64, 8, 2048, 1024)]
T = _gpu.TileConfig
CANDIDATES = [
    (T(16, 32, 128, 4, 4), T(16, 32, 128, 4, 4, split_k=7)),
    (T(16, 16, 256, 4, 4), T(16, 32, 256, 4, 3, split_k=7)),
    (T(16, 64, 128, 4, 4), T(16, 64, 128, 4, 4, split_k=14)),
    (T(16, 32, 256, 4, 3), T(16, 16, 256, 4, 4, split_k=4)),
    (T(16, 32, 128, 2, 5), T(16, 32, 128, 2, 5, split_k=7)),
    (T(16, 64, 64, 4, 6), T(16, 32, 128, 4, 4, split_k=2)),
    (T(16, 32, 128, 4, 4), T(16, 32, 128, 4, 4, split_k=1)),
]


def main() -> None:
    for name, family, e, k, h, i in SHAPES:
        shape = {"family": family, "E": e, "k": k, "H": h, "I": i}
        experts = cpu_bench.build_experts(shape, seed=0).to("cuda", torch.bfloat16)
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        copies = [experts] + [
            copy.deepcopy(experts) for _ in range(min(15, -(-3 * l2 // (3 * h * i * 2))) - 1)
        ]
        for tokens in (1, 16):
            for kept in sorted({k, max(1, k // 2), max(1, k // 4)}, reverse=True):
                ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
                ids[:, kept:] = e
                ids = ids.cuda()
                w = torch.where(ids < e, 0.5, 0.0).to("cuda", torch.bfloat16)
                x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)
                touched = int(torch.unique(ids[ids < e]).numel())
                nbytes = touched * 3 * h * i * 2
                for c1, c2 in CANDIDATES:
                    split = max(1, min(c2.split_k, i // 1024))
                    c2 = T(c2.block_m, c2.block_n, c2.block_k, c2.num_warps, c2.num_stages, split)

                    def fn(c1=c1, c2=c2, ids=ids, w=w, x=x, mods=copies):  # type: ignore[no-untyped-def]
                        for m in mods:  # cycle copies: replay does not flush L2
                            _gpu.fused_path(m, x, ids, w, None, configs=(c1, c2))

                    try:
                        ms = tt.do_bench_cudagraph(fn, rep=50, return_mode="median") / len(copies)
                    except Exception as exc:
                        print(f"{name} T={tokens} kept={kept} {c1} {c2}: {type(exc).__name__}")
                        continue
                    tb = nbytes / (ms * 1e-3) / 1e12
                    print(
                        f"{name:>12} T={tokens:>2} kept={kept} touched={touched:>2} "
                        f"{ms * 1e3:8.1f} us {tb:5.2f} TB/s  "
                        f"g1=({c1.block_n},{c1.block_k},{c1.num_warps},{c1.num_stages}) "
                        f"g2=({c2.block_n},{c2.block_k},{c2.num_warps},{c2.num_stages},s{c2.split_k})"
                    )
        del experts, copies
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
