"""Diagnostic (issue 11): what the decode path saves by launching less, measured in one process.

At decode the experts' fused path used to launch a plan kernel (``plan_small``) before its two
GEMMs and the combine, and to count the kept pairs with a torch ``add_`` after them. Now the first
GEMM sorts the pairs itself (every program, in registers) and the plan kernels add to the layer's
pair counter, so a decode layer launches two kernels fewer. Host overhead drifts between processes
on a shared machine (up to 2x between runs of ``diag_launch_overhead.py``), so this script compares
the two ways inside one process, interleaved in rounds (each round times every variant, in a
rotating order; medians over rounds):

* the experts alone (``_gpu.fused_path``, OLMoE-1B-7B shape, 1 token, 8 of 64 experts): the plan
  launch and the counter's ``add_`` (as before) against neither;
* one patched OLMoE-shape MoE block at 1 token (``fused_routing=True``, ``StaticTopK`` and
  ``TopP``): the plan launch forced (``_GEMM_PLAN_ELEMENTS = 0``) against the plan in the GEMM;
* the launches each variant issues per call (CUDA and Triton launches from the profiler).

Run (a diagnostic, not rendered in ``BENCHMARKS.md``; the recorded result is
``benchmarks/diagnostics/diag_decode_launches.json``)::

    python benchmarks/diag_decode_launches.py --out benchmarks/diagnostics/diag_decode_launches.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cpu_experts import write_result  # noqa: E402
from bench_gpu_decode import build_model  # noqa: E402  (the same shapes as the decode benchmark)
from bench_gpu_routing import loop_us  # noqa: E402
from diag_launch_overhead import diag_result  # noqa: E402

_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def interleaved_us(fns: dict[str, Callable[[], Any]], calls: int, rounds: int) -> dict[str, float]:
    """Host µs per call of each variant: ``rounds`` rounds, each a :func:`loop_us` of ``calls``
    back-to-back calls of every variant (order rotated per round), after 21 warm-up calls each;
    medians over rounds."""
    names = list(fns)
    for fn in fns.values():
        loop_us(fn, 1, repeats=1, warmup=20)  # the warm-up; its one timed call is not kept
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(loop_us(fns[name], calls, repeats=1, warmup=0))
    return {n: statistics.median(v) for n, v in times.items()}


def launches_per_call(fn: Callable[[], Any], calls: int = 10) -> float:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key in _LAUNCHES) / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="result JSON (a diagnostic: not rendered)")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    import dynamic_moe_router as dmr
    from dynamic_moe_router.experts import ExpertsCounter, _gpu

    dev = torch.device("cuda")
    in_gemm = _gpu._GEMM_PLAN_ELEMENTS

    def plan_launch(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            _gpu._GEMM_PLAN_ELEMENTS = 0  # the plan in its own launch, as before
            try:
                return fn()
            finally:
                _gpu._GEMM_PLAN_ELEMENTS = in_gemm

        return run

    model = build_model("olmoe", layers=1, vocab=128)
    experts = model.model.layers[0].mlp.experts
    h = torch.randn(1, model.config.hidden_size, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(64, device=dev)[:8].reshape(1, 8)
    w = torch.rand(1, 8, device=dev, dtype=torch.bfloat16)
    old_counter, new_counter = ExpertsCounter(), ExpertsCounter()
    kept = torch.full((4,), 8, dtype=torch.int32, device=dev)  # stands in for the plan's ends

    def before() -> Any:  # the plan launch, then the counter's own add_ of ends[-1:][0]
        out = _gpu.fused_path(experts, h, ids, w, None)
        old_counter.add(kept[-1:][0])
        return out

    experts_fns = {
        "plan_launch_and_count_launch": plan_launch(before),
        "plan_in_gemm_and_count_in_kernel": lambda: _gpu.fused_path(experts, h, ids, w, new_counter),
    }
    with torch.no_grad():
        res: dict[str, Any] = {"experts_1_token": interleaved_us(experts_fns, args.calls, args.rounds)}
        res["experts_1_token_launches"] = {n: launches_per_call(f) for n, f in experts_fns.items()}
    assert new_counter.executed_pairs > 0  # the kernel counted

    blocks: dict[str, Callable[[], Any]] = {}
    models = []
    x = h.reshape(1, 1, -1)  # (batch 1, 1 token, H)
    for name, policy in (("static", dmr.StaticTopK()), ("topp", dmr.TopP(p=0.5))):
        m = build_model("olmoe", layers=1, vocab=128)
        dmr.patch(m, policy, validate=False, fused_routing=True)
        models.append(m)
        block = m.model.layers[0].mlp
        blocks[f"{name}_fused_plan_launch"] = plan_launch(lambda b=block: b(x))
        blocks[f"{name}_fused_plan_in_gemm"] = lambda b=block: b(x)
    with torch.no_grad():
        res["block_1_token"] = interleaved_us(blocks, args.calls // 4, args.rounds)
        res["block_1_token_launches"] = {n: launches_per_call(f) for n, f in blocks.items()}
    result = diag_result("diag_decode_launches", calls=args.calls, rounds=args.rounds, us_per_call=res)
    for k, v in res.items():
        print(k, {n: round(t, 1) for n, t in v.items()})
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
