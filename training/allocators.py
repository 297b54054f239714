"""Train the learned allocators committed beside the reference models (``models/NAME/allocators/``).

For each model this runs what ``dmr calibrate --family learned --target-reduction 0.35`` runs (the
same training text, budget text and defaults of :class:`dynamic_moe_router.AllocatorTraining`), on
this machine's CPU, and writes:

* ``learned-t35.json`` + ``learned-t35.safetensors``: the allocator, its budget fitted for 35% fewer
  routed FLOPs on the Gutenberg valid split, with its training record (time, loss curve, threads);
* ``learned-t25.json``, ``-t30``, ``-t40``, ``-t50``: the same heads with the offset refitted for the
  other targets; they share ``learned-t35.safetensors`` (the JSON names the weights file), so their
  ``record`` is the 35% training's (its target, offset and budget reduction are those of t35; each
  file's own offset is in its JSON).

* ``learned-q25.json`` ... ``learned-q50.json``: the same heads with the quantile budget
  (:func:`dynamic_moe_router.learn.fit_quantile_budget` on the Gutenberg valid split): every forward
  call of at least 64 tokens keeps exactly ``1 - target`` of its native pairs, so the reduction holds
  on any text; shorter calls (decoding) use the threshold offset fitted for the target.

Run from the repository root. The committed heads: ref-olmoe with 4x the default training work (the
setting chosen on valid NLL; 2463 s of training on 2 CPU threads), ref-mixtral with the default
(about 5-10 minutes; its 35% target is out of reach of selection, see BENCHMARKS.md's oracle)::

    python training/allocators.py --train-steps 800 --train-windows 8 models/ref-olmoe
    python training/allocators.py models/ref-mixtral
    # only refit the budgets of the committed heads (minutes; e.g. after a change to fit_budget)
    python training/allocators.py --refit models/ref-olmoe models/ref-mixtral
    # only the quantile budgets of the committed heads, on a GPU (the recorded q files: H200)
    python training/allocators.py --quantile-only --device cuda models/ref-olmoe models/ref-mixtral
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dynamic_moe_router._atomic import write_text_atomic
from dynamic_moe_router.calibrate import _calibrate_learned
from dynamic_moe_router.data import data_file, read_jsonl
from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.learn import AllocatorTraining, allocator_windows, fit_budget, fit_quantile_budget
from dynamic_moe_router.policies import LearnedAllocator, load_policy

HEADLINE = 0.35
OTHERS = (0.25, 0.30, 0.40, 0.50)


def main(argv: list[str]) -> int:
    default = AllocatorTraining()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="reference model folders")
    parser.add_argument("--refit", action="store_true", help="only refit the budgets of the committed heads")
    parser.add_argument("--quantile-only", action="store_true", help="only the quantile budgets")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-steps", type=int, default=default.steps)
    parser.add_argument("--train-windows", type=int, default=default.batch_windows)
    args = parser.parse_args(argv)
    refit, quantile_only, device, paths = args.refit, args.quantile_only, args.device, args.paths
    training = replace(default, steps=args.train_steps, batch_windows=args.train_windows)
    torch.set_num_threads(2)
    valid = [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]
    for path in paths:
        model, tokenizer = load_checkpoint(str(path))
        model.to(device)
        out = path / "allocators"
        head = out / f"learned-t{round(HEADLINE * 100)}.json"
        budget = allocator_windows(tokenizer, valid, "budget")
        if quantile_only:
            policy = load_policy(head)
            assert isinstance(policy, LearnedAllocator)
        elif refit:
            policy = load_policy(head)
            assert isinstance(policy, LearnedAllocator)
            data = json.loads(head.read_text())
            policy, reached = fit_budget(model, policy, budget, HEADLINE)
            data["_data"]["offset"] = policy.offset
            write_text_atomic(head, json.dumps(data, indent=2, sort_keys=True) + "\n")
            print(f"{path.name} {HEADLINE:.0%}: offset {policy.offset:+.4f}, valid reduction {reached:.4f}")
        else:
            start = time.time()
            policy = _calibrate_learned(model, tokenizer, HEADLINE, valid, None, training, 512, None)
            print(f"{path.name}: trained in {time.time() - start:.0f} s, {policy.describe()}", flush=True)
            policy.save(head)
        for target in () if quantile_only else OTHERS:
            variant, reached = fit_budget(model, policy, budget, target)
            data = json.loads(head.read_text())
            data["_data"]["offset"] = variant.offset
            write_text_atomic(
                out / f"learned-t{round(target * 100)}.json",
                json.dumps(data, indent=2, sort_keys=True) + "\n",
            )
            print(f"  {target:.0%}: offset {variant.offset:+.4f}, valid reduction {reached:.4f}", flush=True)
        for target in sorted((*OTHERS, HEADLINE)):
            variant, reached = fit_quantile_budget(model, policy, budget, target)
            data = json.loads(head.read_text())
            data["_data"].update(
                offset=variant.offset,
                budget=variant.budget,
                keep_fraction=variant.keep_fraction,
                quantile_min_tokens=variant.quantile_min_tokens,
            )
            write_text_atomic(
                out / f"learned-q{round(target * 100)}.json",
                json.dumps(data, indent=2, sort_keys=True) + "\n",
            )
            print(f"  {target:.0%} quantile: keep {variant.keep_fraction}, valid reduction {reached:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
