"""End-to-end GPU throughput of patched models: prefill and decode tokens per second.

Run on a CUDA GPU::

    python benchmarks/bench_gpu_e2e.py --text carry/e2e_text.txt   # writes results/gpu_e2e.json

Models (bf16): the reference models ``models/ref-mixtral`` and ``models/ref-olmoe`` on real text
(``--text``: any UTF-8 file; the Gutenberg test split is what the project's runs use), and a
Mixtral-8x7B-shaped model with random weights and ``--mixtral-layers`` layers on random tokens.

Variants: the unpatched model (transformers' default experts implementation, recorded), patched
with ``dmr.StaticTopK()`` (this project's kernels, same routing) and patched with ``dmr.TopP(p)``
where ``p`` is bisected on the prefill batch so that about 30% of the native (token, expert) pairs
are dropped (the achieved reduction, from ``dmr.profile``, is recorded). Patched variants use
``validate=False`` (no per-layer host check of the router scores, as for CUDA graphs); the dynamic
variant is also timed with the default ``validate=True`` and with ``compile_routing=True``.

Prefill: a forward over a (batch, length) block, median of repeats (CUDA events). Decode: greedy
``generate`` of ``--new-tokens`` tokens after a short prompt, at batch 1 and ``--decode-batch``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dynamic_moe_router as dmr

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "gpu_e2e.json"
sys.path.insert(0, str(HERE))

import bench_cpu_experts as cpu_bench  # noqa: E402  (the shared result writer)


def cuda_ms(fn, repeats: int = 5, warmup: int = 2) -> float:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def pair_reduction(model, ids: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    with torch.no_grad(), dmr.profile(model, count_dense=False) as report:
        model(ids)
    return float(report.to_dict()["routed_flop_reduction"])


def search_p(model, ids: torch.Tensor, target: float = 0.30) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Bisect ``TopP.p`` for ``target`` routed-pair reduction on ``ids``."""
    lo, hi = 0.0, 1.0
    tried: list[tuple[float, float]] = []
    for _ in range(12):
        mid = (lo + hi) / 2
        with dmr.patched(model, dmr.TopP(p=max(mid, 1e-4)), validate=False):
            red = pair_reduction(model, ids)
        tried.append((abs(red - target), mid))
        if red > target:
            lo = mid  # dropping too much: raise p
        else:
            hi = mid
    p = min(tried)[1]
    with dmr.patched(model, dmr.TopP(p=max(p, 1e-4)), validate=False):
        return p, pair_reduction(model, ids)


def run_model(name: str, model, prefill_ids: torch.Tensor, prompt: torch.Tensor, args) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    model.eval()
    p, reduction = search_p(model, prefill_ids)
    n_new = args.new_tokens
    variants: dict[str, tuple[Any, dict[str, Any]]] = {
        "unpatched": (None, {}),
        "static": (dmr.StaticTopK(), {"validate": False}),
        "dynamic": (dmr.TopP(p=p), {"validate": False}),
        "dynamic_validate": (dmr.TopP(p=p), {"validate": True}),
        "dynamic_compiled": (dmr.TopP(p=p), {"validate": False, "compile_routing": True}),
    }
    res: dict[str, Any] = {
        "model": name,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "top_p": p,
        "routed_pair_reduction": reduction,
        "prefill_shape": list(prefill_ids.shape),
        "prompt_shape": list(prompt.shape),
        "new_tokens": n_new,
        "prefill_tok_s": {},
        "decode_tok_s": {},
    }
    gen_kwargs = {"max_new_tokens": n_new, "min_new_tokens": n_new, "do_sample": False}
    for vname, (policy, kw) in variants.items():
        ctx = dmr.patched(model, policy, **kw) if policy is not None else _null()
        with torch.no_grad(), ctx:
            ms = cuda_ms(lambda: model(prefill_ids))
            res["prefill_tok_s"][vname] = prefill_ids.numel() / (ms * 1e-3)
            dec = {}
            for batch in (1, args.decode_batch):
                x = prompt[:1].expand(batch, -1).contiguous() if batch == 1 else prompt[:batch]
                ms = cuda_ms(lambda x=x: model.generate(x, **gen_kwargs), repeats=3, warmup=1)
                dec[str(batch)] = batch * n_new / (ms * 1e-3)
            res["decode_tok_s"][vname] = dec
        print(f"  {name} {vname}: prefill {res['prefill_tok_s'][vname]:.0f} tok/s, decode {dec}", flush=True)
    return res


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=None, help="UTF-8 text for the reference models")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--mixtral-layers", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--decode-batch", type=int, default=16)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_e2e needs a CUDA GPU", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig

    t0 = time.perf_counter()
    results = []
    gen = torch.Generator().manual_seed(0)
    for ref in ("ref-mixtral", "ref-olmoe"):
        path = ROOT / "models" / ref
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
        tok = AutoTokenizer.from_pretrained(path)
        if args.text is not None:
            ids = tok(args.text.read_text(encoding="utf-8")[:400_000], return_tensors="pt").input_ids[0]
        else:
            ids = torch.randint(3, model.config.vocab_size, (20_000,), generator=gen)
        prefill = ids[: 8 * 512].reshape(8, 512).cuda()
        prompt = ids[8 * 512 : 8 * 512 + 16 * 64].reshape(16, 64).cuda()
        results.append(run_model(ref, model, prefill, prompt, args))
        del model
    cfg = MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.mixtral_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    ids = torch.randint(3, 32000, (4096 + 16 * 64,), generator=gen).cuda()
    results.append(
        run_model(
            f"mixtral-8x7b-shaped-{args.mixtral_layers}L-random",
            model,
            ids[:4096].reshape(1, 4096),
            ids[4096:].reshape(16, 64),
            args,
        )
    )
    out = {
        **cpu_bench.result_header(
            "gpu_e2e", "python benchmarks/bench_gpu_e2e.py --text <Gutenberg test split>", kind=True
        ),
        "wall_s": time.perf_counter() - t0,
        "machine": cpu_bench.gpu_machine(),
        "models": results,
    }
    cpu_bench.write_result(out, args.out, suffix=f" in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
