"""How long ``dmr calibrate`` takes on the reference models, and what it finds (issue 14, item 4).

For each model: ``dmr.calibrate.calibrate`` of the router-score families (``dmr calibrate
--no-learned``, default settings: 8,192 valid tokens, per-layer refinement) at each target, timed
from the loaded model to the chosen policy, with the count of model runs, the chosen policy, its
reduction and its valid NLL. Also timed: one plain pass over the calibration windows, so that the
calibration time reads as "so many passes" on any machine. Other processes' CPU use during each
calibration is recorded (in cores); a run measured while the machine was busy is marked.

``--before FILE`` (repeatable) adds a calibration report written by the previous release
(``dmr calibrate --report``, or the ``to_dict()`` of its result, with ``seconds`` and ``model`` added)
as the reference the new search is compared with: the chosen policy must be no worse on valid.

Run (the recorded result: ``benchmarks/results/calibrate.json``; see BENCHMARKS.md)::

    python benchmarks/bench_calibrate.py --threads 2 --out benchmarks/results/calibrate.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dynamic_moe_router as dmr
from bench_cpu_experts import (
    _cpu_snapshot,
    command_line,
    machine_info,
    others_cores,
    result_header,
    write_result,
)
from dynamic_moe_router.calibrate import KNOBS, calibrate, calibration_windows
from dynamic_moe_router.data import data_file, read_jsonl
from dynamic_moe_router.eval import load_checkpoint
from learned_eval import window_nll  # per-window NLL under a policy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "calibrate.json"
MODELS = ("models/ref-olmoe", "models/ref-mixtral")
#: issue 14's limit for the router-score families on one reference model, on 2 CPU cores
LIMIT_S = 30.0


@torch.inference_mode()
def _pass_seconds(model: Any, windows: torch.Tensor, batch_size: int = 8) -> float:
    """One plain (unpatched) pass over the calibration windows: the unit of calibration cost (timed
    after one warm-up batch)."""
    model(windows[:batch_size, :-1])
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        model(windows[i : i + batch_size, :-1])
    return time.perf_counter() - start


def held_out(
    model: Any, policy: dict[str, Any], before: dict[str, Any] | None, windows: torch.Tensor
) -> dict:
    """The chosen policy (and the previous release's) on valid windows the calibration never saw:
    perplexity change against native, and the paired difference of the two (mean NLL per window)."""
    native = window_nll(model, dmr.StaticTopK(), windows, 8)[0]
    new = window_nll(model, dmr.policies.policy_from_dict(policy), windows, 8)[0]
    out: dict[str, Any] = {
        "windows": len(windows),
        "relative_ppl_change": math.exp(float((new - native).mean())) - 1.0,
    }
    if before is not None:
        old = window_nll(model, dmr.policies.policy_from_dict(before["policy"]), windows, 8)[0]
        diff = new - old  # (W,) paired
        out["before_relative_ppl_change"] = math.exp(float((old - native).mean())) - 1.0
        out["nll_diff_vs_before"] = float(diff.mean())
        out["nll_diff_se"] = float(diff.std(unbiased=True) / math.sqrt(len(diff)))
    return out


def run_model(
    path: str, targets: list[float], tokens: int, holdout: int, before: list[dict]
) -> dict[str, Any]:
    model, tokenizer = load_checkpoint(ROOT / path if not Path(path).is_absolute() else path)
    documents = [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]
    every = calibration_windows(tokenizer, documents, tokens + holdout)
    windows, unseen = every[: tokens // 512], every[tokens // 512 :]  # calibrate's windows, then the rest
    one_pass = _pass_seconds(model, windows)
    runs = []
    for target in targets:
        snap = _cpu_snapshot()
        start = time.perf_counter()
        result = calibrate(model, tokenizer, target, families=tuple(KNOBS), tokens=tokens)
        seconds = time.perf_counter() - start
        busy = others_cores(snap)
        report = result.to_dict()
        name = Path(path).name
        prior = next(
            (b for b in before if Path(b["model"]).name == name and abs(b["target"] - target) < 1e-9), None
        )
        check = held_out(model, report["policy"], prior, unseen)
        made = [m for m in report["measurements"] if m.get("stage") != "per_layer_skipped"]
        runs.append(
            {
                "target": target,
                "seconds": seconds,
                "passes": seconds / one_pass,
                "model_runs": len(made),
                "refined": sorted({m["family"] for m in made if m.get("stage") == "per_layer"}),
                "others_cores": busy,
                "family": report["family"],
                "per_layer": report["per_layer"],
                "policy": report["policy"],
                "reduction": report["reduction"],
                "nll": report["nll"],
                "native_nll": report["native_nll"],
                "relative_ppl_change": report["relative_ppl_change"],
                "held_out": check,
            }
        )
        print(
            f"{path} @{target:.0%}: {seconds:.1f} s ({seconds / one_pass:.1f} passes, "
            f"{len(made)} runs), {report['family']} {report['reduction']:.2%} "
            f"{report['relative_ppl_change']:+.2%} ppl"
        )
    return {"model": path, "tokens": tokens, "pass_seconds": one_pass, "runs": runs}


def _before(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        "model": data["model"],
        "target": data["target"],
        "seconds": data.get("seconds"),
        "model_runs": len(data["measurements"]),
        "family": data["family"],
        "per_layer": data["per_layer"],
        "policy": data["policy"],
        "reduction": data["reduction"],
        "nll": data["nll"],
        "native_nll": data["native_nll"],
        "relative_ppl_change": math.exp(data["nll"] - data["native_nll"]) - 1.0,
        "note": data.get("note", ""),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="a checkpoint folder (repeatable; default: both)")
    ap.add_argument("--target", type=float, action="append", help="target reduction (default: 0.30)")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument(
        "--holdout", type=int, default=16384, help="valid tokens after the calibration ones, for the check"
    )
    ap.add_argument("--before", type=Path, action="append", default=[], help="a previous release's report")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = [_before(p) for p in args.before]  # unreadable files fail before the long work
    models = [
        run_model(m, args.target or [0.30], args.tokens, args.holdout, before) for m in args.model or MODELS
    ]
    result = {
        **result_header("calibrate", command_line("bench_calibrate.py", argv)),
        "machine": machine_info(args.threads),
        "limit_s": LIMIT_S,
        "models": models,
        "before": before,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
