"""The learned allocator, through the library, against static top-k at equal routed FLOPs (issue 10).

For each reference model this script uses only the public API (``dmr.train_allocator``,
``dmr.learn.fit_budget``, ``dmr.LearnedAllocator``, ``dmr.patched``):

* test text: the first ``--tokens`` tokens of the Gutenberg test split and of WikiText-2 test, in
  windows of 512 (the ``dmr bench`` / ``dmr eval`` windows), each target scored once;
* budget text: windows spread over the Gutenberg valid books (2 per book); training text: windows
  spread over the Gutenberg train books (8 per book, 800 windows); test text is only for reporting;
* static baselines: uniform k below the native one, and per-layer k chosen greedily on the budget
  text (lower k by one in the layer whose valid NLL rises least), each with and without
  compensation (``LearnedAllocator.fixed``: dropped native slots replaced by their expert's mean
  output on training text);
* learned points: for each compensation mode and target, an allocator trained for that target (or,
  with ``--allocators DIR``, the saved allocator of the model with its offset refit per target);
  the achieved reduction is read from the patch's pair counters on each corpus;
* equal routed FLOPs: each learned point against the static frontier (native, uniform k and
  per-layer k of the same compensation mode, linearly interpolated per window between the two
  static points that bracket the learned point's reduction on that corpus), as a paired ratio of
  perplexities with its bootstrap standard error over windows.

Run (the recorded result: ``benchmarks/results/learned.json``; see BENCHMARKS.md)::

    python benchmarks/learned_eval.py --device cuda --model models/ref-olmoe --model models/ref-mixtral \\
        --out benchmarks/results/learned.json
    # quick CPU check (minutes)
    python benchmarks/learned_eval.py --model models/ref-olmoe --tokens 2048 --steps 5 --targets 0.35 \\
        --out /tmp/learned.json
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

import dynamic_moe_router as dmr
from dynamic_moe_router.data import data_file, read_jsonl
from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.eval.stats import paired_ratio
from dynamic_moe_router.hf.layers import find_moe_layers, model_family
from dynamic_moe_router.learn import (
    allocator_windows,
    expert_means,
    fit_budget,
    fit_quantile_budget,
    score_windows,
    train_means,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_experts import write_result  # sibling scripts: one result writer
from oracle import corpus_ids, windows_of  # the dmr bench windows

TARGETS = (0.25, 0.30, 0.35, 0.40, 0.50)
CORPORA = {"gutenberg_test": "gutenberg/test.jsonl", "wikitext2_test": "wikitext2/test.txt"}


def window_nll(model: Any, policy: Any, windows: torch.Tensor, batch: int) -> tuple[torch.Tensor, float]:
    """Per-window mean NLL ``(W,)`` and the routed-FLOP reduction (``dmr.profile``) under ``policy``."""
    score = score_windows(model, policy, windows, batch)
    return score.nll, score.reduction


def ppl_of(nll: torch.Tensor) -> float:
    return math.exp(float(nll.mean()))


def paired(a: torch.Tensor, b: torch.Tensor, reps: int = 2000) -> tuple[float, float]:
    """``ppl(b) / ppl(a) - 1`` of per-window NLLs and its bootstrap SE over windows (paired)."""
    ratio, se = paired_ratio(b, a, draws=reps)
    return ratio - 1.0, se


def static_path(model: Any, valid: torch.Tensor, native_k: int, layers: int, targets, batch: int):  # type: ignore[no-untyped-def]
    """Per-layer k chosen greedily on valid (nested over targets), as in oracle.py."""
    ks = [native_k] * layers
    out: dict[float, list[int]] = {}
    for target in sorted(targets):
        while 1.0 - sum(ks) / (layers * native_k) < target - 1e-9:
            trials = {}
            for i in range(layers):
                if ks[i] > 1:
                    trial = [*ks[:i], ks[i] - 1, *ks[i + 1 :]]
                    trials[i] = float(
                        window_nll(model, dmr.LearnedAllocator.fixed(model, trial), valid, batch)[0].mean()
                    )
            i = min(trials, key=trials.__getitem__)
            ks[i] -= 1
        out[target] = list(ks)
    return out


def interp(points: list[tuple[float, torch.Tensor]], r: float) -> tuple[torch.Tensor, str] | None:
    """Static per-window NLL at reduction ``r``, interpolated between the bracketing static points."""
    lo = [p for p in points if p[0] <= r + 1e-9]
    hi = [p for p in points if p[0] >= r - 1e-9]
    if not lo or not hi:
        return None
    a = min(lo, key=lambda p: (-p[0], float(p[1].sum())))
    b = min(hi, key=lambda p: (p[0], float(p[1].sum())))
    if b[0] - a[0] < 1e-9:
        return a[1], f"{a[0]:.3f}"
    w = (b[0] - r) / (b[0] - a[0])
    return w * a[1] + (1 - w) * b[1], f"{a[0]:.3f}..{b[0]:.3f}"


def run_model(path: Path, args: argparse.Namespace, log, checkpoint) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    model, tokenizer = load_checkpoint(str(path))
    device = torch.device(args.device)
    model.to(device)
    layers = find_moe_layers(model, model_family(model))[0]
    native_k = layers[0].native_k
    test = {
        name: windows_of(corpus_ids(tokenizer, rel, args.tokens)).to(device) for name, rel in CORPORA.items()
    }
    valid_docs = [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]
    budget = allocator_windows(tokenizer, valid_docs, "budget").to(device)
    train_docs = (r["text"] for r in read_jsonl(data_file("gutenberg/train.jsonl.xz")))
    train = allocator_windows(tokenizer, train_docs, "train", max_windows=args.train_windows).to(device)
    native = {n: window_nll(model, dmr.StaticTopK(), w, args.batch)[0] for n, w in test.items()}
    log(f"{path.name}: native ppl " + ", ".join(f"{n} {ppl_of(v):.3f}" for n, v in native.items()))
    means = expert_means(model, train[: args.means_windows])
    out: dict[str, Any] = {
        "model": path.name,
        "native_k": native_k,
        "moe_layers": len(layers),
        "native_ppl": {n: ppl_of(v) for n, v in native.items()},
        "native_valid_nll": float(window_nll(model, dmr.StaticTopK(), budget, args.batch)[0].mean()),
        "means": "plain"
        if args.plain_means
        else f"trained ({args.static_means_steps} steps for a static point)",
        "native_nll_per_window": {n: [round(float(x), 5) for x in v] for n, v in native.items()},
        "test_tokens": {n: int(w[:, :-1].numel()) for n, w in test.items()},
        "budget_windows": int(budget.shape[0]),
        "train_windows": int(train.shape[0]),
        "static": [],
        "learned": [],
    }

    def evaluate(policy: Any) -> dict[str, Any]:
        res = {}
        for name, w in test.items():
            nll, red = window_nll(model, policy, w, args.batch)
            change, se = paired(native[name], nll)
            res[name] = {
                "reduction": red,
                "ppl": ppl_of(nll),
                "ppl_change": change,
                "ppl_change_se": se,
                "nll_per_window": [round(float(x), 5) for x in nll],
            }
        return res

    def fmt(res: dict[str, Any]) -> str:
        return "; ".join(
            f"{n}: red {r['reduction']:.3f} ppl {r['ppl_change']:+.2%}±{r['ppl_change_se']:.2%}"
            for n, r in res.items()
        )

    statics: list[tuple[str, list[int]]] = [
        (f"uniform k={k}", [k] * len(layers)) for k in range(native_k - 1, 0, -1)
    ]
    if not args.no_static:
        t0 = time.time()
        for target, ks in static_path(model, budget, native_k, len(layers), args.targets, args.batch).items():
            if ks not in [s[1] for s in statics]:
                statics.append((f"per-layer {ks} (target {target:.0%})", ks))
        log(f"  per-layer static chosen on valid in {time.time() - t0:.0f} s")
        static_means = dmr.AllocatorTraining(
            steps=args.static_means_steps,
            batch_windows=args.batch_windows,
            means_lr=args.means_lr,
            seed=args.seed,
        )
        for name, ks in statics:
            for comp in args.comp_modes:
                pol = dmr.LearnedAllocator.fixed(model, ks, means=means if comp else None)
                if comp and not args.plain_means:  # the same trained compensation the learned points get
                    pol = train_means(model, pol, train, static_means)
                res = evaluate(pol)
                out["static"].append({"point": name, "ks": ks, "comp": bool(comp), "results": res})
                checkpoint(out)
                log(f"  static {name:<36} comp={bool(comp)!s:<5} {fmt(res)}")

    saved = {}
    if args.allocators:
        for f in sorted(Path(args.allocators).glob(f"{path.name}*.json")):
            pol = dmr.load_policy(f)
            saved[pol.compensation] = (pol, f.name)
    for comp in [] if args.no_learned else args.comp_modes:
        for target in args.targets:
            t0 = time.time()
            if args.train_once is not None and bool(comp) in saved and target != args.train_once:
                pass  # refit the offset of the allocator trained once (below)
            elif args.train_once is not None:
                cfg = dmr.AllocatorTraining(
                    target_reduction=args.train_once, steps=args.steps, batch_windows=args.batch_windows,
                    lr=args.lr, seed=args.seed, compensation=bool(comp), means_windows=args.means_windows,
                    offset_iterations=args.offset_iterations, noise_final=args.noise_final,
                    learn_means=not args.plain_means, means_lr=args.means_lr,
                )  # fmt: skip
                saved[bool(comp)] = (
                    dmr.train_allocator(model, train, budget, cfg),
                    f"trained once at {args.train_once}",
                )
            if saved:
                if bool(comp) not in saved:
                    continue
                base, source = saved[bool(comp)]
                pol, valid_red = fit_budget(model, base, budget, target, iterations=args.offset_iterations)
                record = dict(base.record or {})
                train_seconds = record.get("train_seconds")
            else:
                cfg = dmr.AllocatorTraining(
                    target_reduction=target, steps=args.steps, batch_windows=args.batch_windows, lr=args.lr,
                    seed=args.seed, compensation=bool(comp), means_windows=args.means_windows,
                    offset_iterations=args.offset_iterations, noise_final=args.noise_final,
                    learn_means=not args.plain_means, means_lr=args.means_lr,
                )  # fmt: skip
                pol = dmr.train_allocator(model, train, budget, cfg)
                record = dict(pol.record or {})
                valid_red, source, train_seconds = (
                    record["budget_reduction"],
                    "trained here",
                    record["train_seconds"],
                )
                if args.save_allocators:
                    folder = Path(args.save_allocators)
                    pol.save(
                        folder / f"{path.name}-{'comp' if comp else 'nocomp'}-t{round(target * 100)}.json"
                    )
            if args.budget != "threshold":  # each call keeps 1 - target of its pairs (layer shares: valid)
                shares = {"quantile": "best"}.get(args.budget, args.budget.removeprefix("quantile-"))
                pol, valid_red = fit_quantile_budget(
                    model, pol, budget, target, layer_shares=shares, iterations=args.offset_iterations
                )
            res = evaluate(pol)
            valid_nll = float(window_nll(model, pol, budget, args.batch)[0].mean())  # for choices on valid
            hidden = layers[0].hidden_size
            out["learned"].append(
                {
                    "comp": bool(comp),
                    "target": target,
                    "tag": args.tag,
                    "budget": args.budget,
                    "keep_fraction": pol.keep_fraction,
                    "noise_final": (record.get("config") or {}).get("noise_final"),
                    "learn_means": (record.get("config") or {}).get("learn_means", False),
                    "source": source,
                    "valid_reduction": valid_red,
                    "valid_nll": valid_nll,
                    "valid_nll_change": valid_nll - out["native_valid_nll"],
                    "offset": pol.offset,
                    "steps": (record.get("config") or {}).get("steps"),
                    "batch_windows": (record.get("config") or {}).get("batch_windows"),
                    "train_seconds": train_seconds,
                    "train_device": record.get("device"),
                    "head_flops_vs_native_routed": pol.overhead_flops(hidden)
                    / (native_k * layers[0].flops_per_pair),
                    "sha256": pol.sha256,
                    "results": res,
                }
            )
            log(f"  learned comp={bool(comp)!s:<5} target {target:.0%}: valid {valid_red:.3f}; {fmt(res)} "
                f"({time.time() - t0:.0f} s)")  # fmt: skip
            checkpoint(out)
    out["equal_flops"] = compare(out)
    return out


def compare(model_out: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for lp in model_out["learned"]:
        for corpus, res in lp["results"].items():
            native = torch.tensor(model_out["native_nll_per_window"][corpus])
            pts = [(0.0, native)] + [
                (st["results"][corpus]["reduction"], torch.tensor(st["results"][corpus]["nll_per_window"]))
                for st in model_out["static"]
                if st["comp"] == lp["comp"]
            ]
            got = interp(pts, res["reduction"])
            if got is None:
                continue
            static, between = got
            d, se = paired(static, torch.tensor(res["nll_per_window"]))
            rows.append(
                {
                    "comp": lp["comp"],
                    "target": lp["target"],
                    "tag": lp.get("tag", ""),
                    "corpus": corpus,
                    "reduction": res["reduction"],
                    "static_between": between,
                    "ppl_vs_static": d,
                    "se": se,
                    "z": d / se if se > 0 else float("nan"),
                }
            )
    return rows


def merge(files: list[str], out: str) -> None:
    """Join result files of the same models (partial ones too): per model, the static rows of the first
    file that has them, every learned point (later files add targets, compensation modes or tagged
    variants), and the equal-FLOP comparisons recomputed over the merged rows."""
    merged: dict[str, dict[str, Any]] = {}
    sources = []
    for f in files:
        payload = json.loads(Path(f).read_text())
        sources += payload.get("merged_from") or [  # a merged file brings its own sources
            {"file": Path(f).name, "device": payload.get("device"), "args": payload.get("args")}
        ]
        for m in payload["models"]:
            cur = merged.setdefault(m["model"], {**m, "static": [], "learned": []})
            for key, value in m.items():  # fields that later runs record (e.g. native_valid_nll)
                cur.setdefault(key, value)
            if not cur["static"]:
                cur["static"] = m["static"]
            seen = {(p["comp"], p["target"], p.get("tag", "")) for p in cur["learned"]}
            cur["learned"] += [
                p for p in m["learned"] if (p["comp"], p["target"], p.get("tag", "")) not in seen
            ]
    for m in merged.values():
        m["learned"].sort(key=lambda p: (p.get("tag", ""), p["comp"], p["target"]))
        for p in m["learned"]:  # the valid NLL change from native: the run's own, else where both exist
            if "valid_nll_change" not in p and p.get("valid_nll") is not None and m.get("native_valid_nll"):
                p["valid_nll_change"] = p["valid_nll"] - m["native_valid_nll"]
        m["equal_flops"] = compare(m)
    payload = {
        "script": "benchmarks/learned_eval.py",
        "merged_from": sources,
        "torch": torch.__version__,
        "dmr_version": dmr.__version__,
        "models": list(merged.values()),
    }
    write_result(payload, Path(out), say=False)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--merge":
        *files, flag, out = argv[1:]
        assert flag == "--out", "usage: learned_eval.py --merge FILE... --out OUT"
        merge(files, out)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="reference checkpoint folder (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--comp-modes", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-windows", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--noise-final", type=float, default=1.0)
    p.add_argument("--tag", default="", help="label of this configuration in the output")
    p.add_argument(
        "--budget",
        choices=("threshold", "quantile", "quantile-threshold", "quantile-uniform"),
        default="threshold",
        help="threshold: the offset fit on valid; quantile: each call keeps exactly 1 - target of the pairs "
        "(fit_quantile_budget; layer shares: the better on valid of the threshold budget's and uniform); "
        "quantile-threshold / quantile-uniform: those layer shares",
    )
    p.add_argument(
        "--train-once",
        type=float,
        help="train one allocator per compensation mode at this target, refit its offset for the others",
    )
    p.add_argument(
        "--plain-means",
        action="store_true",
        help="compensate with the plain mean outputs (default: trained, learned and static alike)",
    )
    p.add_argument("--means-lr", type=float, default=1e-2)
    p.add_argument(
        "--static-means-steps", type=int, default=200, help="training steps of a static point's means"
    )
    p.add_argument("--no-learned", action="store_true", help="only the static baselines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-windows", type=int, default=800)
    p.add_argument("--means-windows", type=int, default=64)
    p.add_argument("--offset-iterations", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--no-static", action="store_true")
    p.add_argument(
        "--allocators", help="folder of saved allocators (MODEL*.json): refit offsets, no training"
    )
    p.add_argument("--save-allocators", help="save every trained allocator to this folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    run_models(args, "benchmarks/learned_eval.py", sys.argv[1:] if argv is None else argv, run_model, log)
    return 0


def run_models(args: argparse.Namespace, script: str, argv: list[str], run_model: Any, log: Any) -> None:
    """Run ``run_model(path, args, log, checkpoint)`` for each ``args.model``, keeping partial results
    in ``<out>.partial.json`` after each, and write the result JSON (this script's and
    ``router_tuning.py``'s)."""
    t0 = time.time()
    device = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"CPU ({platform.machine()}, {args.threads} threads)"
    )
    out = Path(args.out)
    models: list[dict[str, Any]] = []

    def checkpoint(current: dict[str, Any]) -> None:  # partial results, in case the run is cut short
        partial = {"partial": True, "device": device, "args": vars(args), "models": [*models, current]}
        write_result(partial, out.with_suffix(".partial.json"), indent=None, say=False)

    for m in args.model:
        models.append(run_model(Path(m), args, log, checkpoint))
    payload = {
        "script": script,
        "argv": argv,
        "args": vars(args),
        "device": device,
        "torch": torch.__version__,
        "dmr_version": dmr.__version__,
        "seconds": time.time() - t0,
        "models": models,
    }
    write_result(payload, out, say=False)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    log(f"wrote {out} in {payload['seconds']:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
