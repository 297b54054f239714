"""Run by ``tests/test_cuda.py`` in a fresh interpreter: count the CUDA graphs that a static-cache
``generate()`` records on its later calls (one JSON line on stdout).

Why a fresh process: transformers builds a new static cache per ``generate()`` call, and the
compiled decode step replays its graphs only if that cache lands where it was recorded. Where it
lands depends on the caching allocator's free blocks, which every earlier test in the same process
leaves behind: after the rest of ``tests/test_cuda.py`` even the unpatched model recorded again on a
later call (1 of 3 calls, seen on an H200), so the check only means something in a clean process.

Usage: ``python tests/cuda_workers/replay_worker.py none|static|top_p``
"""

from __future__ import annotations

import gc
import json
import sys

import torch


def main(name: str) -> dict[str, object]:
    from torch._inductor import cudagraph_trees

    import dynamic_moe_router as dmr
    from dynamic_moe_router.hf.tiny import tiny_model

    policy = {"none": None, "static": dmr.StaticTopK(), "top_p": dmr.TopP(p=0.5)}[name]
    x = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2)).cuda()
    model = tiny_model("olmoe", dtype=torch.bfloat16, attn_implementation="eager").cuda()
    recorded: list[int] = []
    init = cudagraph_trees.CUDAGraphNode.__init__

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        recorded.append(1)
        init(self, *args, **kwargs)

    cudagraph_trees.CUDAGraphNode.__init__ = counting  # type: ignore[method-assign]

    def generate() -> torch.Tensor:
        gc.collect()  # tensors in reference cycles go now, not at a random point of a later call
        with torch.no_grad():
            return model.generate(
                x, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static"
            )

    with dmr.patched(model, policy, validate=False) if policy is not None else torch.no_grad():
        for _ in range(3):  # compile, record (counters allocate on their first call), settle
            first = generate()
        warmup = len(recorded)
        same = [bool(torch.equal(generate(), first)) for _ in range(3)]
    return {"warmup_recordings": warmup, "later_recordings": len(recorded) - warmup, "same_tokens": same}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
