"""Diagnostic (issue 11): host time of one Triton launch, and of a patched MoE block at decode.

Eager decode steps are host-bound (``BENCHMARKS.md``, *GPU: eager decode step, host time split*):
each MoE layer's host work decides the step time. This script measures, on one CUDA GPU, the host
time per call (a loop of back-to-back calls, one synchronisation at the end, tiny kernels, so the
GPU waits on the host) of:

* an empty CUDA tensor allocation and a one-element ``add_`` (the cost of a torch op launch);
* the fused routing kernel through :func:`dynamic_moe_router.hf.fused_routing.softmax_route`, and
  the same kernel launched through Triton's ``kernel[grid](...)`` directly;
* the experts' fused decode path (:func:`dynamic_moe_router.experts._gpu.fused_path`, 4 launches)
  at 1 token;
* one OLMoE-1B-7B-shape MoE block at 1 token: unpatched, patched static and patched ``TopP``, each
  with and without ``fused_routing``.

Run (the recorded result, H200 of 2026-12-06: ``benchmarks/diagnostics/diag_launch_overhead.json``;
a diagnostic, not rendered in ``BENCHMARKS.md``)::

    python benchmarks/diag_launch_overhead.py --out benchmarks/diagnostics/diag_launch_overhead.json
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cpu_experts import write_result  # noqa: E402
from bench_gpu_decode import build_model  # noqa: E402  (the same shapes as the decode benchmark)
from bench_gpu_routing import loop_us  # noqa: E402


def per_call_us(fn, calls: int = 2000) -> float:  # type: ignore[no-untyped-def]
    """µs per call of ``calls`` back-to-back calls, median of 5 repeats, after 20 warm-up calls."""
    return loop_us(fn, calls, warmup=20)


def diag_result(kind: str, **fields: Any) -> dict[str, Any]:
    """A diagnostic's result: its kind and script, the card, torch and the host CPU, then ``fields``."""
    return {
        "kind": kind,
        "script": f"benchmarks/{kind}.py",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.processor() or platform.machine(),
        **fields,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="result JSON (a diagnostic: not rendered)")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    import triton

    import dynamic_moe_router as dmr
    from dynamic_moe_router.experts import _gpu
    from dynamic_moe_router.hf import _triton_routing as kernels
    from dynamic_moe_router.hf.fused_routing import policy_rule, softmax_route

    dev = torch.device("cuda")
    res: dict[str, Any] = {}
    x = torch.zeros(1, device=dev)
    res["torch_empty"] = per_call_us(lambda: torch.empty(8, device=dev), args.calls)
    res["torch_add_"] = per_call_us(lambda: x.add_(1.0), args.calls)
    logits = torch.randn(1, 64, device=dev, dtype=torch.float32)
    pol = dmr.TopP(p=0.5)
    res["softmax_route_library"] = per_call_us(
        lambda: softmax_route(logits, pol, 1, 8, False, torch.bfloat16), args.calls
    )
    ids = torch.empty(1, 8, dtype=torch.int64, device=dev)
    w = torch.empty(1, 8, dtype=torch.bfloat16, device=dev)
    code, a, b = policy_rule(pol)

    def raw() -> Any:
        return kernels.softmax_route[(1,)](
            logits, ids, w, 1, 64, 64, a, b, 4.1588830833596715, 1,
            K_MAX=8, K_POW2=8, E_POW2=64, BLOCK_T=64, POLICY=code, RENORM=False,
        )  # fmt: skip

    res["softmax_route_raw_launch"] = per_call_us(raw, args.calls)
    compiled = raw()
    res["triton"] = triton.__version__
    res["compiled_kernel_attrs"] = sorted(a for a in dir(compiled) if not a.startswith("__"))
    model = build_model("olmoe", layers=1, vocab=128)  # one decoder layer, as bench_gpu_routing.py
    block = model.model.layers[0].mlp
    h = torch.randn(1, 1, model.config.hidden_size, device=dev, dtype=torch.bfloat16)
    ids8 = torch.randint(0, 64, (1, 8), device=dev)
    w8 = torch.rand(1, 8, device=dev, dtype=torch.bfloat16)
    res["experts_fused_path"] = per_call_us(
        lambda: _gpu.fused_path(block.experts, h[0], ids8, w8, None), args.calls
    )
    with torch.no_grad():
        res["block_unpatched"] = per_call_us(lambda: block(h), args.calls // 4)
        for name, policy in (("static", dmr.StaticTopK()), ("topp", dmr.TopP(p=0.5))):
            for fused in (False, True):
                with dmr.patched(model, policy, validate=False, fused_routing=fused):
                    res[f"block_{name}{'_fused' if fused else ''}"] = per_call_us(
                        lambda: block(h), args.calls // 4
                    )
    # last (a launch with wrong arguments could leave a sticky CUDA error): the compiled kernel
    # launched directly, as a launch cache keyed on the specialisation would (Triton >= 3.3 passes
    # every argument, constexprs included, after the hooks)
    every = (logits, ids, w, 1, 64, 64, a, b, 4.1588830833596715, 1, 8, 8, 64, 64, code, False)
    torch.cuda.synchronize()
    want_ids, want_w = ids.clone(), w.clone()
    ids.fill_(-1)
    w.fill_(0)

    def direct() -> None:
        stream = torch.cuda.current_stream().cuda_stream
        compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *every)

    try:
        direct()
        torch.cuda.synchronize()
        res["direct_launch_matches"] = bool(torch.equal(ids, want_ids) and torch.equal(w, want_w))
        res["softmax_route_direct_launch"] = per_call_us(direct, args.calls)
    except Exception as err:  # a diagnostic: record what this Triton wants
        res["direct_launch_error"] = f"{type(err).__name__}: {err}"[:500]

    result = diag_result("diag_launch_overhead", us_per_call=res)
    for k, v in res.items():
        print(k, f"{v:.1f} us" if isinstance(v, float) else v)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
