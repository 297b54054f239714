"""The ``dmr`` command line: ``families``, ``inspect``, ``profile``, ``eval``, ``calibrate``.

Every subcommand takes ``--json`` for machine-readable output. Errors of the library are printed
as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._version import __version__
from .errors import DmrError, MissingDependencyError, PolicyFileError

#: experts backends offered by ``--backend`` (kept equal to ``experts.BACKENDS`` by a test; a literal
#: so that building the parser does not import torch)
CLI_BACKENDS = ("auto", "loop", "grouped", "cuda", "triton")

__all__ = ["main"]


def _need_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "this command needs transformers; install the extra: pip install 'dynamic-moe-router-kit[hf]'"
        ) from err


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


def cmd_families(args: argparse.Namespace) -> int:
    from .hf.families import FAMILIES, MIN_TRANSFORMERS

    rows = [
        {
            "family": spec.model_type,
            "blocks": list(spec.block_classes),
            "router": spec.router_attr,
            "scoring": spec.notes,
            "policy_distribution": spec.scorer.distribution,
            "weights": spec.renorm_doc(),
            "shared_experts": list(spec.shared_experts),
            "experts_layout": "gpt_oss (transposed, interleaved, biases)"
            if spec.layout.has_bias
            else "standard",
        }
        for spec in FAMILIES.values()
    ]
    rows.sort(key=lambda r: r["family"])
    width = max(len(r["family"]) for r in rows)
    text = [f"supported families (transformers >= {MIN_TRANSFORMERS}):"]
    text += [f"  {r['family']:<{width}}  {r['scoring']}; weights {r['weights']}" for r in rows]
    _emit(args, {"min_transformers": MIN_TRANSFORMERS, "families": rows}, "\n".join(text))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    _need_transformers()
    from .hf.inspect import inspect_model, load_model_skeleton

    info = inspect_model(load_model_skeleton(args.model))
    lines = [
        f"{info['model_class']} ({info['family']}): {info['moe_layers']} MoE layers",
        f"  scoring: {info['scoring']}",
        f"  policies read: {info['policy_distribution']}",
        f"  weights: {info['weights']}",
        f"  {'layer':>5} {'E':>5} {'k':>3} {'H':>6} {'I':>6}  shared experts",
    ]
    for row in info["layers"]:
        shared = ", ".join(row["shared_experts"]) or "-"
        lines.append(
            f"  {row['layer']:>5} {row['num_experts']:>5} {row['native_k']:>3} {row['hidden_size']:>6} "
            f"{row['expert_intermediate_size']:>6}  {shared}"
        )
    _emit(args, info, "\n".join(lines))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    _need_transformers()
    import torch

    from .hf.patching import patch
    from .policies import parse_policy
    from .profiling import profile

    policy = parse_policy(args.policy)
    if args.model.startswith("tiny:"):
        from .hf.tiny import tiny_model

        model = tiny_model(args.model.split(":", 1)[1])
    else:
        from transformers import AutoModelForCausalLM

        from .hf.inspect import load_model_skeleton

        load_model_skeleton(args.model)  # typed errors for non-checkpoints and unsupported families
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (args.batch, args.tokens), generator=gen)
    patch(model, policy, backend=args.backend)
    with torch.no_grad(), profile(model) as report:
        model(input_ids)
    _emit(args, report.to_dict(), report.summary())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _need_transformers()
    from ._atomic import write_text_atomic
    from .eval import TASKS, evaluate, load_checkpoint
    from .policies import parse_policy

    policy = parse_policy(args.policy) if args.policy else None
    if args.tasks is None:
        tasks = [] if args.text else list(TASKS)
    else:
        tasks = [t for t in args.tasks.split(",") if t and t != "none"]
        if tasks == ["all"]:
            tasks = list(TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise PolicyFileError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}, all or none")
    corpora = list(args.text) if args.text else (args.corpus or ["gutenberg_test", "wikitext2_test"])
    model, tokenizer = load_checkpoint(args.model)
    result = evaluate(
        model,
        tokenizer,
        policy=policy,
        corpora=corpora,
        tasks=tasks,
        limit=args.limit,
        max_tokens=args.max_tokens,
        context=args.context,
        stride=args.stride,
        batch_size=args.batch_size,
    )
    result["model"] = str(args.model)
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    lines = [f"model: {args.model}   policy: {result['flops']['policy']}"]
    for name, res in result["perplexity"].items():
        lo, hi = res["ppl_ci95"]
        lines.append(
            f"  perplexity {name}: {res['ppl']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {res['tokens']:,} tokens)"
        )
    for name, res in result["tasks"].items():
        extra = f", acc_norm {res['acc_norm']:.4f}" if "acc_norm" in res else ""
        lines.append(
            f"  {name}: acc {res['acc']:.4f} +- {res['acc_stderr']:.4f}{extra} ({res['items']} items)"
        )
    f = result["flops"]
    lines.append(
        f"  routed-expert FLOPs: {f['routed_flop_reduction']:.1%} fewer than native; whole model: "
        f"{f['total_flop_reduction']:.1%} fewer (mean k {f['mean_k']:.3f})"
    )
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    _need_transformers()
    from ._atomic import write_text_atomic
    from .calibrate import calibrate
    from .eval import load_checkpoint

    model, tokenizer = load_checkpoint(args.model)
    result = calibrate(
        model,
        tokenizer,
        args.target_reduction,
        family=args.family,
        tokens=args.tokens,
        per_layer=not args.global_only,
    )
    result.policy.save(args.out)
    report = result.to_dict()
    report.update(model=str(args.model), out=str(args.out), calibration_tokens=args.tokens)
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")
    text = (
        f"{result.family}{' (per layer)' if result.per_layer else ''}: {result.policy.describe()}\n"
        f"  routed-FLOP reduction {result.reduction:.1%} (target {args.target_reduction:.1%}), valid NLL "
        f"{result.nll:.4f} vs native {result.native_nll:.4f} "
        f"({report['relative_ppl_change']:+.2%} perplexity)\n"
        f"  policy written to {args.out}"
    )
    _emit(args, report, text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _need_transformers()
    from pathlib import Path

    from .bench import BenchSettings, run_bench, summary_table

    models = [Path(m) for m in args.models] if args.models else _bundled_models()
    settings = BenchSettings(
        ppl_tokens=args.ppl_tokens, blimp_limit=args.blimp_limit, lambada_limit=args.lambada_limit
    )
    payload = run_bench(models, Path(args.out_dir), settings, log=(lambda *_: None) if args.json else print)
    _emit(args, payload, summary_table(payload) + f"\nwrote {args.out_dir}/quality_flops.json and pareto.png")
    return 0


def _bundled_models() -> list:  # type: ignore[type-arg]
    from pathlib import Path

    for root in (Path.cwd(), *Path(__file__).resolve().parents):
        if (root / "models" / "ref-mixtral" / "config.json").is_file():
            return [root / "models" / "ref-mixtral", root / "models" / "ref-olmoe"]
    raise MissingDependencyError(
        "the bundled reference models (models/ref-mixtral, models/ref-olmoe) were not found; run dmr bench "
        "from the repository or pass --models DIR ..."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmr", description="Dynamic per-token expert routing for MoE models."
    )
    parser.add_argument("--version", action="version", version=f"dmr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("families", help="list the supported MoE families")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_families)

    p = sub.add_parser("inspect", help="show the MoE layers of a checkpoint directory or tiny:FAMILY")
    p.add_argument("model", help="a transformers checkpoint directory, or tiny:FAMILY (e.g. tiny:mixtral)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("profile", help="patch a model, run random tokens through it and print the FLOP table")
    p.add_argument("model", help="a transformers checkpoint directory, or tiny:FAMILY")
    p.add_argument(
        "--policy",
        default="top_p:p=0.5",
        help="policy JSON file or NAME:key=value,... (default: top_p:p=0.5)",
    )
    p.add_argument("--tokens", type=int, default=64, help="sequence length (default 64)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--backend", default="auto", choices=list(CLI_BACKENDS))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a checkpoint, with FLOP accounting")
    p.add_argument(
        "--model", required=True, help="a local transformers checkpoint directory (with tokenizer)"
    )
    p.add_argument("--policy", help="policy JSON file or NAME:key=value,... (default: the native routing)")
    p.add_argument("--text", nargs="+", help="plain text or JSONL (field 'text') files: perplexity only")
    p.add_argument("--corpus", nargs="+", choices=["gutenberg_test", "wikitext2_test"], help="shared corpora")
    p.add_argument("--tasks", help="comma-separated tasks, 'all' or 'none' (default: all, none with --text)")
    p.add_argument("--limit", type=int, help="first N items per task (per paradigm for BLiMP)")
    p.add_argument("--max-tokens", type=int, help="score at most N tokens per corpus")
    p.add_argument("--context", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--stride", type=int, help="perplexity window stride (default: the context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="also write the JSON result to this file (atomically)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "calibrate", help="find the policy that meets a routed-FLOP reduction with the least loss"
    )
    p.add_argument(
        "--model", required=True, help="a local transformers checkpoint directory (with tokenizer)"
    )
    p.add_argument("--target-reduction", type=float, required=True, help="routed-FLOP reduction, e.g. 0.35")
    p.add_argument("--family", choices=["top_p", "relative_threshold", "entropy"], help="default: try all")
    p.add_argument("--out", required=True, help="policy JSON to write (dmr.load_policy, --policy read it)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens from the valid split")
    p.add_argument("--global-only", action="store_true", help="skip the per-layer refinement")
    p.add_argument("--report", help="also write the calibration report (every measurement) as JSON")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", help="quality / routed-FLOP sweep of every policy family (the main job)")
    p.add_argument(
        "--models", nargs="+", help="checkpoint directories (default: the bundled reference models)"
    )
    p.add_argument("--out-dir", default="dmr-bench", help="where quality_flops.json and pareto.png go")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="Gutenberg test tokens for perplexity")
    p.add_argument("--blimp-limit", type=int, default=5, help="BLiMP pairs per paradigm (1000 = all)")
    p.add_argument("--lambada-limit", type=int, default=150, help="LAMBADA passages (5153 = all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmr`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DmrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
