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

Policies: the native top-k, ``StaticTopK(k - 1)`` (the static point at fewer pairs), and for each
``--fractions`` value ``BatchAware(StaticTopK(), experts=f)`` and its ``reroute=True`` form. Outputs
depend on the batch, so the same policy is measured at each batch size. The policy routes the
prompts too (one call per batch's prefill), as ``dmr.patch`` would in use: a rerouting policy's
cost includes the capped prefill's effect on the KV cache.

The measurement itself is the library's (:mod:`dynamic_moe_router.sweeps.batched_decode`, which
``dmr bench`` also runs, on fewer batch sizes); this script runs it on more of them.

Run (the recorded result: ``benchmarks/results/batch_aware.json``; see BENCHMARKS.md)::

    python benchmarks/batch_aware_eval.py --out benchmarks/results/batch_aware.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dynamic_moe_router as dmr
from dynamic_moe_router._atomic import write_text_atomic
from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.sweeps.batched_decode import batched_decoding, corpus_ids

ROOT = Path(__file__).resolve().parent.parent


def evaluate(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_checkpoint(model_dir)
    length = args.prompt + args.steps + 1
    ids = corpus_ids(tokenizer, "gutenberg/test.jsonl", max(args.batches) * length)
    result = batched_decoding(
        model, ids, args.batches, args.fractions, args.prompt, args.steps,
        log=lambda line: print(f"{model_dir.name} {line}", flush=True),
    )  # fmt: skip
    return {"model": model_dir.name, **result}


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
