"""Quality cost of ``dmr.BatchAware`` in batched decoding on the reference models (issue 11).

``BatchAware`` decides per routing call, so what it costs depends on the batch: it is measured the
way it runs, with many sequences decoded at once. For each reference model and batch size ``B``:

* ``B`` windows of Gutenberg test (``--prompt`` + ``--steps`` + 1 tokens each, the first ones of
  the split, in the ``dmr bench`` tokenisation);
* the model, patched with each policy, reads the prompts (prefill) and then decodes ``--steps``
  steps with its KV cache, teacher-forced: every step routes the ``B`` sequences' next true tokens
  together (``T = B`` tokens per MoE call), and the negative log-likelihood of each true token is
  recorded;
* per policy: the decode perplexity, its paired ratio to the native policy with a bootstrap
  standard error over sequences, the routed-pair reduction of the decode steps, and the mean
  number of distinct experts one decode step touches per layer (what a bandwidth-bound GPU layer
  pays for).

Policies: the native top-k, ``StaticTopK(k - 1)`` (the static point at fewer pairs), and
``BatchAware(StaticTopK(), experts=f)`` for each ``--fractions`` value. Outputs depend on the
batch, so the same policy is measured at each batch size.

Run (the recorded result: ``benchmarks/results/batch_aware.json``; see BENCHMARKS.md)::

    python benchmarks/batch_aware_eval.py --out benchmarks/results/batch_aware.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import dynamic_moe_router as dmr
from dynamic_moe_router._atomic import write_text_atomic
from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.hf.layers import experts_inputs, find_moe_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import corpus_ids  # a sibling script: the dmr bench tokenisation

ROOT = Path(__file__).resolve().parent.parent


class DecodeMeter:
    """Pre-hooks on each experts module: kept pairs and distinct experts per call, while ``on``."""

    def __init__(self, model: Any) -> None:
        self.on = False
        self.pairs = 0
        self.calls = 0
        self.distinct = 0
        self.tokens = 0
        self._handles = []
        for layer in find_moe_layers(model)[0]:
            self._handles.append(
                layer.experts.register_forward_pre_hook(self._hook(layer.num_experts), with_kwargs=True)
            )

    def _hook(self, num_experts: int):  # type: ignore[no-untyped-def]
        def hook(module, args, kwargs):  # type: ignore[no-untyped-def]
            if not self.on:
                return
            hidden, ids = experts_inputs(args, kwargs)  # (T, H), (T, k)
            kept = ids[ids < num_experts]
            self.pairs += int(kept.numel())
            self.distinct += int(torch.unique(kept).numel())
            self.calls += 1
            self.tokens += int(hidden.shape[0])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def decode_nll(model: Any, windows: torch.Tensor, prompt: int, meter: DecodeMeter) -> torch.Tensor:
    """``(B, steps)`` NLL of the true next tokens, decoded with the cache, all sequences per step."""
    out = model(windows[:, :prompt], use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]  # (B, V)
    nll = []
    meter.on = True
    for s in range(prompt, windows.shape[1]):
        target = windows[:, s]  # (B,)
        nll.append(F.cross_entropy(logits.float(), target, reduction="none"))
        if s + 1 == windows.shape[1]:
            break
        out = model(target[:, None], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    meter.on = False
    return torch.stack(nll, dim=1)


def paired_ratio(
    nll: torch.Tensor, base: torch.Tensor, seed: int = 0, draws: int = 2000
) -> tuple[float, float]:
    """``exp(mean nll - mean base)`` and its bootstrap standard error over sequences."""
    gen = torch.Generator().manual_seed(seed)
    diff = (nll - base).mean(dim=1).double()  # (B,) per sequence
    idx = torch.randint(0, diff.numel(), (draws, diff.numel()), generator=gen)
    boot = torch.exp(diff[idx].mean(dim=1))
    return math.exp(float(diff.mean())), float(boot.std())


def policies(native_k: int, fractions: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"native": dmr.StaticTopK()}
    if native_k > 1:
        out[f"static_k{native_k - 1}"] = dmr.StaticTopK(k=native_k - 1)
    for f in fractions:
        out[f"batch_aware_{f}"] = dmr.BatchAware(dmr.StaticTopK(), experts=f)
    return out


def evaluate(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_checkpoint(model_dir)
    layers = find_moe_layers(model)[0]
    native_k, num_experts = layers[0].native_k, layers[0].num_experts
    length = args.prompt + args.steps + 1
    ids = corpus_ids(tokenizer, "gutenberg/test.jsonl", max(args.batches) * length)
    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        windows = ids[: batch * length].reshape(batch, length)  # (B, prompt + steps + 1)
        base = None
        for name, policy in policies(native_k, args.fractions).items():
            t0 = time.perf_counter()
            meter = DecodeMeter(model)
            try:
                with dmr.patched(model, policy, validate=False):
                    nll = decode_nll(model, windows, args.prompt, meter)
            finally:
                meter.remove()
            if base is None:
                base, base_pairs = nll, meter.pairs
            ratio, se = paired_ratio(nll, base)
            row = {
                "batch": batch,
                "policy": name,
                "spec": policy.describe(),
                "decode_ppl": math.exp(float(nll.mean())),
                "ppl_ratio": ratio,
                "ppl_ratio_se": se,
                "pair_reduction": 1 - meter.pairs / base_pairs,
                "distinct_experts_per_call": meter.distinct / meter.calls,
                "distinct_fraction": meter.distinct / meter.calls / num_experts,
                "decode_tokens": int(nll.numel()),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"{model_dir.name} B={batch:4d} {name:18s} ppl x{ratio:.4f} (se {se:.4f}) "
                f"pairs -{row['pair_reduction']:.3f} "
                f"distinct {row['distinct_experts_per_call']:.1f}/{num_experts}",
                flush=True,
            )
    return {"model": model_dir.name, "native_k": native_k, "num_experts": num_experts, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", type=Path, help="checkpoint dir (repeatable)")
    ap.add_argument("--batches", default="16,64,256")
    ap.add_argument("--fractions", default="0.75,0.5,0.25")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "batch_aware.json")
    args = ap.parse_args(argv)
    args.batches = [int(x) for x in args.batches.split(",")]
    args.fractions = [float(x) for x in args.fractions.split(",")]
    for f in args.fractions:
        dmr.BatchAware(experts=f)  # a PolicyError before any long work
    models = args.model or [ROOT / "models" / "ref-olmoe", ROOT / "models" / "ref-mixtral"]
    for m in models:
        if not (m / "config.json").is_file():
            ap.error(f"--model {m}: no config.json there; pass a checkpoint directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [evaluate(m, args) for m in models]
    out = {
        "benchmark": "batch_aware",
        "schema_version": 1,
        "command": " ".join(["python", "benchmarks/batch_aware_eval.py", *(argv or sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "prompt": args.prompt,
        "steps": args.steps,
        "corpus": "gutenberg/test.jsonl",
        "wall_s": time.perf_counter() - t0,
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
