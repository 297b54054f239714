"""Where an eager decode step's host time goes, patched and not (a GPU diagnostic for issue 11).

Run on a CUDA GPU::

    python benchmarks/diag_eager_host.py --out /tmp/diag_eager_host.json

Eager decoding at batch 1 is host-bound: the GPU idles while Python issues the step's kernels. This
script times, in one process and interleaved (rounds of every variant in turn, so that a drifting
host biases none), one model forward per decode step after a 128-token prompt, with a KV cache
and no ``generate()`` around it, and splits each step's host time with forward hooks (no
synchronisation inside the step): time spent issuing the MoE blocks, and inside them the router
and the experts module. One profiled step per variant gives the GPU's kernel time, the kernel and
Triton launches, and the host synchronisations (``cudaStreamSynchronize`` and friends).

Variants: ``unpatched``; ``static`` / ``dynamic`` (``dmr.StaticTopK()`` / ``dmr.TopP(p)`` for about
30% fewer pairs, ``validate=False``), each also ``+fused`` (``fused_routing=True``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("unpatched", "static", "static+fused", "dynamic", "dynamic+fused")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class HostClock:
    """Forward pre/post hooks that add up the host time spent in a set of modules."""

    def __init__(self, modules: list[Any]) -> None:
        self.total = 0.0
        self._start: dict[int, float] = {}
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module: Any, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, module: Any, args: Any, out: Any) -> None:
        self.total += time.perf_counter() - self._start.pop(id(module))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def decode_steps(model, prompt, steps: int, clocks: dict[str, HostClock]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median wall time of one synchronised decode forward, and the mean host time per step of each clock."""
    import torch

    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        for c in clocks.values():
            c.total = 0.0
        walls = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
    return {
        "step_ms": 1e3 * statistics.median(walls),
        **{f"{k}_host_ms": 1e3 * c.total / steps for k, c in clocks.items()},
    }


def profiled_step(model, prompt) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """GPU kernel time, launches and host synchronisations of one decode forward."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        model(nxt, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(nxt, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
    events = prof.key_averages()
    by_key = {e.key: e for e in events}

    def count(prefix: str) -> int:
        return sum(e.count for k, e in by_key.items() if k.startswith(prefix))

    top_host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
    return {
        "gpu_ms": sum(e.self_device_time_total for e in events) / 1e3,
        "kernel_launches": count("cudaLaunchKernel") + count("cuLaunchKernel"),
        "syncs": {name: count(name) for name in SYNC_EVENTS if count(name)},
        "local_scalar_dense": count("aten::_local_scalar_dense"),
        "aten_ops": sum(e.count for k, e in by_key.items() if k.startswith("aten::")),
        "top_host_ops": [{"op": e.key[:80], "us": e.self_cpu_time_total, "calls": e.count} for e in top_host],
    }


def run_shape(shape: str, layers: int, rounds: int, steps: int, target: float) -> dict[str, Any]:
    import torch

    import dynamic_moe_router as dmr
    from bench_gpu_decode import build_model, dynamic_policy

    model = build_model(shape, layers)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.config.vocab_size, (1, 128), generator=gen).cuda()
    p_policy, chosen = dynamic_policy(model, prompt, target)
    policies = {
        "unpatched": (None, {}),
        "static": (dmr.StaticTopK(), {}),
        "static+fused": (dmr.StaticTopK(), {"fused_routing": True}),
        "dynamic": (p_policy, {}),
        "dynamic+fused": (p_policy, {"fused_routing": True}),
    }
    blocks = [layer.mlp for layer in model.model.layers]
    routers = [b.gate for b in blocks]
    experts = [b.experts for b in blocks]
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    profiles = {}
    for r in range(rounds + 1):  # round 0 warms each variant (Triton JIT, caches)
        for v in VARIANTS:
            policy, options = policies[v]
            patch = dmr.patched(model, policy, validate=False, **options) if policy is not None else None
            with patch or torch.no_grad():
                clocks = {
                    "moe": HostClock(blocks),
                    "router": HostClock(routers),
                    "experts": HostClock(experts),
                }
                try:
                    res = decode_steps(model, prompt, steps if r else 4, clocks)
                finally:
                    for c in clocks.values():
                        c.remove()
                if r:
                    samples[v].append(res)
                elif v not in profiles:
                    decode_steps(model, prompt, 4, {})
                    profiles[v] = profiled_step(model, prompt)
    out = {"shape": shape, "layers": layers, "chosen": chosen, "variants": {}}
    for v in VARIANTS:
        keys = samples[v][0].keys()
        out["variants"][v] = {
            **{k: statistics.median(s[k] for s in samples[v]) for k in keys},
            "profile": profiles[v],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    import platform

    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", default="olmoe:16,mixtral:2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--target", type=float, default=0.30)
    args = ap.parse_args(argv)
    start = time.time()
    results = []
    for item in args.shapes.split(","):
        shape, layers = item.split(":")
        res = run_shape(shape, int(layers), args.rounds, args.steps, args.target)
        results.append(res)
        for v, d in res["variants"].items():
            p = d["profile"]
            print(
                f"{shape:8s} {v:14s} step {d['step_ms']:7.2f} ms  host in MoE {d['moe_host_ms']:6.2f} "
                f"(router {d['router_host_ms']:5.2f}, experts {d['experts_host_ms']:5.2f})  "
                f"GPU {p['gpu_ms']:6.2f} ms  "
                f"launches {p['kernel_launches']}  aten {p['aten_ops']}  syncs {p['syncs']}  "
                f"item {p['local_scalar_dense']}",
                flush=True,
            )
    payload = {
        "benchmark": "diag_eager_host",
        "command": "python benchmarks/diag_eager_host.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"gpu": torch.cuda.get_device_name(), "host": platform.processor() or platform.machine()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_s": round(time.time() - start, 1),
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
