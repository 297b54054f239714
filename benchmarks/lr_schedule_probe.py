"""Does a decaying learning rate let the default allocator training (400 steps x 4 windows) do
what 4x the work does? A CPU probe for issue 10, on the valid split only.

Run from the repository root (about 8 minutes per schedule on 2 CPU cores)::

    python benchmarks/lr_schedule_probe.py --out benchmarks/results/lr_schedule_probe.json

For each ``AllocatorTraining.lr_schedule`` it trains the learned allocator of ``dmr calibrate
--family learned`` (its training and budget windows, defaults otherwise), fits the quantile budget
for the target on the budget windows, and scores it on other valid windows (two per document,
starting where ``dmr calibrate``'s held-out windows do: past the budget windows' last token): the
perplexity ratio against the native model with a paired bootstrap standard error over windows, and
the achieved routed-FLOP reduction.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main(argv: list[str] | None = None) -> int:
    from dynamic_moe_router._version import __version__
    from dynamic_moe_router.calibrate import SELECT_SKIP_CONTEXTS
    from dynamic_moe_router.data import data_file, read_jsonl
    from dynamic_moe_router.eval import load_checkpoint
    from dynamic_moe_router.eval.stats import paired_ratio
    from dynamic_moe_router.learn import (
        AllocatorTraining,
        allocator_windows,
        fit_quantile_budget,
        score_windows,
        spread_windows,
        train_allocator,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "ref-olmoe"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--schedules",
        default="constant,linear,cosine",
        help="comma-separated lr_schedule values, each optionally @LR (e.g. constant@0.006)",
    )
    ap.add_argument("--append", action="store_true", help="add rows to an existing --out file")
    ap.add_argument("--target", type=float, default=0.35)
    ap.add_argument("--steps", type=int, default=AllocatorTraining.steps)
    ap.add_argument("--batch-windows", type=int, default=AllocatorTraining.batch_windows)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_checkpoint(args.model)
    context = 512

    def docs(split: str) -> Any:
        name = f"gutenberg/{split}.jsonl" + (".xz" if split == "train" else "")
        return (r["text"] for r in read_jsonl(data_file(name)))

    train = allocator_windows(tok, docs("train"), "train", context=context)
    budget = allocator_windows(tok, docs("valid"), "budget", context=context)
    skip = SELECT_SKIP_CONTEXTS * context + 1  # past the budget windows' last token
    held = spread_windows(tok, docs("valid"), per_doc=2, context=context, skip=skip, max_windows=64)
    native = score_windows(model, None, held).nll  # (W,)
    start = time.time()
    command = "python benchmarks/lr_schedule_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows: list[dict[str, Any]] = []
    commands = [command]
    if args.append:
        old = json.loads(args.out.read_text())
        scored_as = (old.get("context"), old.get("held_skip"), old.get("model"), old.get("target"))
        if scored_as != (context, skip, Path(args.model).name, args.target):
            raise SystemExit(
                f"--append: {args.out} was scored otherwise (context, held-out skip, model, target = "
                f"{scored_as}); rerun without --append"
            )
        rows, commands = old["rows"], [*old.get("commands", [old.get("command")]), command]
    for item in args.schedules.split(","):
        schedule, _, lr = item.partition("@")
        cfg = AllocatorTraining(
            target_reduction=args.target, steps=args.steps, batch_windows=args.batch_windows,
            lr_schedule=schedule, lr=float(lr) if lr else AllocatorTraining.lr,
        )  # fmt: skip
        t0 = time.time()
        policy = train_allocator(model, train, budget, cfg)
        train_s = time.time() - t0
        policy, _ = fit_quantile_budget(model, policy, budget, args.target, refit_offset=False)
        score = score_windows(model, policy, held)
        ratio, se = paired_ratio(score.nll, native)  # (W,) paired per window, bootstrap SE
        rows.append({
            "config": asdict(cfg), "train_seconds": round(train_s, 1),
            "final_kl": policy.record["history"][-1]["kl"], "reduction": score.reduction,
            "ppl_change": ratio - 1.0, "ppl_change_se": se,
            "window_nll": [round(x, 6) for x in score.nll.tolist()],
        })  # fmt: skip
        print(item, rows[-1]["ppl_change"], se, score.reduction, flush=True)
        payload = {
            "benchmark": "lr_schedule_probe",
            "commands": commands,
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads},
            "versions": {"torch": torch.__version__, "dmr": __version__},
            "model": Path(args.model).name,
            "split": "gutenberg valid (held-out windows)",
            "windows": {"train": len(train), "budget": len(budget), "scored": len(held)},
            "target": args.target,
            "context": context,
            "held_skip": skip,
            "native_window_nll": [round(x, 6) for x in native.tolist()],
            "wall_s": round(time.time() - start, 1),  # of the last command
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
