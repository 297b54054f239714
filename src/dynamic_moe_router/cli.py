"""The ``dmr`` command line: ``families``, ``inspect``, ``profile``, ``eval``, ``calibrate``, ``bench``.

Every subcommand takes ``--json`` for machine-readable output. Exit status:

* ``0``: success;
* ``2``: bad input. Every argument is checked before any model loads or any work starts; usage
  errors print the usage line and ``dmr CMD: error: argument --flag: ...``, errors of the library
  (:class:`~dynamic_moe_router.errors.DmrError`) print one line ``error: ...``. Never a traceback;
* ``130``: interrupted (Ctrl-C). ``dmr bench`` and ``dmr calibrate`` keep their finished work in a
  partial-results file, print one line saying where, and continue from it with ``--resume``
  (without ``--resume`` an existing partial-results file is refused, never overwritten);
* ``141``: standard output was closed early (``dmr families --json | head -1``); nothing is printed.

Progress bars (with an ETA) go to standard error and are off under ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _cli_args as check
from ._version import __version__

#: experts backends offered by ``--backend``: the PyTorch entries of the backend table
#: (:mod:`dynamic_moe_router.backends` imports no torch, so building the parser stays light)
from .backends import BACKENDS as CLI_BACKENDS
from .errors import DataNotFoundError, DmrError, MissingDependencyError, PolicyError, PolicyFileError

#: calibration families offered by ``--family`` (kept equal to ``calibrate.FAMILIES`` by a test; a
#: literal so that building the parser does not import torch)
CLI_CALIBRATION_FAMILIES = ("top_p", "relative_threshold", "entropy", "static", "learned")
#: the families of ``dmr bench --families`` (kept equal to ``sweeps.quality.FAMILIES`` by a test;
#: ``batch_aware`` is the batched-decoding measurement, not a point)
CLI_SWEEP_FAMILIES = (
    "native", "static", "lu_median", "top_p", "relative_threshold", "entropy", "calibrated", "learned",
    "batch_aware",
)  # fmt: skip
#: the shared corpora of ``dmr eval --corpus`` (kept equal to ``eval.CORPORA`` by a test)
CLI_CORPORA = ("gutenberg_test", "wikitext2_test")
#: exit status of an interrupted command (128 + SIGINT, the shell convention)
EXIT_INTERRUPTED = 130
#: exit status when standard output is closed early (128 + SIGPIPE, the shell convention)
EXIT_BROKEN_PIPE = 141

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_INTERRUPTED", "build_parser", "main"]


class Interrupted(Exception):
    """Ctrl-C during a command that kept its finished work; the message says where and how to resume."""


def _need_transformers(args: argparse.Namespace) -> None:
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError(
            "this command needs transformers; install the extra: pip install 'dynamic-moe-router-kit[hf]'"
        ) from err
    if args.json:  # quiet: no weight-loading bars on stderr either
        transformers.utils.logging.disable_progress_bar()


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


def _progress(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ._progress import Progress

    return Progress(enabled=not args.json)


def _read_texts(args: argparse.Namespace) -> dict[str, list[str]]:
    """The ``--text`` files' documents (typed errors for bad encodings or empty files)."""
    from .eval.perplexity import read_text_file

    paths = [args.text] if isinstance(args.text, str) else list(args.text or ())
    return {path: read_text_file(path, encoding=args.encoding) for path in paths}


# -- commands ----------------------------------------------------------------------------------------
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
            "scoring_kind": spec.scoring,
            "min_transformers": spec.min_transformers,
            "gpu_kernels": spec.gpu_kernels,
            "keras_hub": spec.keras_hub or None,
        }
        for spec in FAMILIES.values()
    ]
    rows.sort(key=lambda r: r["family"])
    width = max(len(r["family"]) for r in rows)
    text = [f"supported families (transformers >= {MIN_TRANSFORMERS}):"]
    text += [
        f"  {r['family']:<{width}}  {r['scoring']}; weights {r['weights']}"
        + (f" (transformers >= {r['min_transformers']})" if r["min_transformers"] != MIN_TRANSFORMERS else "")
        for r in rows
    ]
    text.append(f"{len(rows)} families")
    _emit(args, {"min_transformers": MIN_TRANSFORMERS, "families": rows}, "\n".join(text))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    _need_transformers(args)
    from .hf.inspect import inspect_model, load_model_skeleton

    skeleton = load_model_skeleton(args.model)
    from_folder = args.policy is None and _folder_policy(args) is not None
    try:
        source = _saved_policy(args, None)  # --policy, else the folder's dmr_policy.json, else native
        info = inspect_model(skeleton, args.policy)
    except (PolicyError, PolicyFileError) as err:
        if not from_folder:
            raise
        raise type(err)(
            f"{err} (the policy saved in {_folder_policy(args)}); pass --policy static_top_k to inspect "
            "the model under the native routing"
        ) from None
    info["policy_source"] = source
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
    lines += [f"  recognised by {r}" for r in dict.fromkeys(row["recognised_by"] for row in info["layers"])]
    fused: dict[str, list[int]] = {}
    for row in info["layers"]:
        fused.setdefault(row["fused_routing"], []).append(row["layer"])
    lines.append(f"  policy checked: {info['policy']} (from {source})")
    lines += [
        f"  fused routing (fused_routing=True) with {info['policy']}: {state} (MoE layers {ids})"
        for state, ids in fused.items()
    ]
    _emit(args, info, "\n".join(lines))
    return 0


def _profile_ids(args: argparse.Namespace, vocab: int | None):  # type: ignore[no-untyped-def]
    """``(batch, tokens)`` input ids: the first tokens of ``--text``, or random ids."""
    import torch

    if args.text is None:
        gen = torch.Generator().manual_seed(args.seed)
        return torch.randint(3, vocab, (args.batch, args.tokens), generator=gen)  # type: ignore[arg-type]
    from transformers import AutoTokenizer

    docs = _read_texts(args)[args.text]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    need = args.batch * args.tokens
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise argparse.ArgumentError(
            None,
            f"--text {args.text!r} has {len(ids)} tokens, fewer than --batch x --tokens = {need}; "
            "lower --tokens or --batch, or pass a longer text",
        )
    return torch.tensor(ids[:need], dtype=torch.long).reshape(args.batch, args.tokens)  # (B, T)


def _folder_policy(args: argparse.Namespace) -> Path | None:
    """The model folder's saved policy file (``dmr_policy.json``), if it has one."""
    from .policies import POLICY_FILE

    path = Path(str(args.model)) / POLICY_FILE
    return path if not str(args.model).startswith("tiny:") and path.is_file() else None


def _saved_policy(args: argparse.Namespace, default: str | None) -> str:
    """Without ``--policy``: the policy saved in the model's folder (``dmr_policy.json``), else
    ``default`` (a spec, or ``None`` = the native routing). Returns where the policy came from."""
    from .policies import POLICY_FILE, from_pretrained, parse_policy

    if args.policy is not None:
        return f"--policy {getattr(args, '_policy_file', None) or 'spec'}"
    saved = _folder_policy(args)
    if saved is not None:
        args.policy = from_pretrained(saved.parent)
        return str(saved)
    if default is None:
        return "native routing (no --policy, no saved policy)"
    args.policy = parse_policy(default)
    return f"default {default} (no --policy, no {POLICY_FILE} in the model folder)"


def cmd_profile(args: argparse.Namespace) -> int:
    _need_transformers(args)
    import torch

    from .hf.patching import patch
    from .profiling import profile

    ids = _profile_ids(args, None) if args.text else None  # text problems before the model loads
    source = _saved_policy(args, "top_p:p=0.5")  # a broken saved policy fails before the load too
    if args.model.startswith("tiny:"):
        from .hf.tiny import tiny_model

        model = tiny_model(args.model.split(":", 1)[1])
    else:
        from transformers import AutoModelForCausalLM

        from .hf.inspect import load_model_skeleton

        load_model_skeleton(args.model)  # typed errors for non-checkpoints and unsupported families
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if ids is None:
        ids = _profile_ids(args, model.config.vocab_size)
    patch(model, args.policy, backend=args.backend)
    with torch.no_grad(), profile(model) as report:
        model(ids)
    _emit(args, {**report.to_dict(), "policy_source": source}, f"policy from {source}\n" + report.summary())
    return 0


def _eval_lines(result: dict[str, Any], delta: dict[str, Any] | None) -> list[str]:
    lines = []
    for name, res in result["perplexity"].items():
        lo, hi = res["ppl_ci95"]
        line = f"  perplexity {name}: {res['ppl']:.3f} (95% CI {lo:.3f}-{hi:.3f}, {res['tokens']:,} tokens)"
        if delta:
            d = delta["perplexity"][name]
            line += f"; {d['rel_change']:+.2%} vs native {d['native_ppl']:.3f}"
        lines.append(line)
    for name, res in result["tasks"].items():
        extra = f", acc_norm {res['acc_norm']:.4f}" if "acc_norm" in res else ""
        line = f"  {name}: acc {res['acc']:.4f} +- {res['acc_stderr']:.4f}{extra} ({res['items']} items)"
        if delta:
            d = delta["tasks"][name]
            line += (
                f"; {100 * d['acc_delta']:+.1f} +- {100 * d['acc_delta_se']:.1f} points vs native (paired)"
            )
        lines.append(line)
    return lines


def cmd_eval(args: argparse.Namespace) -> int:
    _need_transformers(args)
    from ._atomic import write_text_atomic
    from .eval import TASKS, evaluate, load_checkpoint
    from .eval.runner import compare_to_native, evaluate_native

    _read_texts(args)  # encodings and empty files fail here, before the model loads
    tasks = args.tasks if args.tasks is not None else ([] if args.text else list(TASKS))
    corpora = list(args.text) if args.text else (args.corpus or list(CLI_CORPORA))
    source = (
        "native routing (--native)" if args.native else _saved_policy(args, None)
    )  # a saved policy's problems fail here, before the model loads
    model, tokenizer = load_checkpoint(args.model)
    settings = {
        "corpora": corpora,
        "tasks": tasks,
        "limit": args.limit,
        "max_tokens": args.max_tokens,
        "context": args.context,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "encoding": args.encoding,
    }
    with _progress(args) as progress:
        delta = None
        if args.policy is not None and not args.no_native:
            native = evaluate_native(model, tokenizer, progress=progress, **settings)
            result = evaluate(model, tokenizer, policy=args.policy, progress=progress, **settings)
            delta = compare_to_native(result, native)
            result["native"] = {k: native[k] for k in ("perplexity", "tasks", "flops")}
            result["delta_vs_native"] = delta
        else:
            result = evaluate(model, tokenizer, policy=args.policy, progress=progress, **settings)
    result["model"] = str(args.model)
    result["policy_source"] = source
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    lines = [f"model: {args.model}   policy: {result['flops']['policy']} (from {source})"]
    lines += _eval_lines(result, delta)
    f = result["flops"]
    lines.append(
        f"  routed-expert FLOPs: {f['routed_flop_reduction']:.1%} fewer than native; whole model: "
        f"{f['total_flop_reduction']:.1%} fewer (mean k {f['mean_k']:.3f})"
    )
    _emit(args, result, "\n".join(lines))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _need_transformers(args)
    from ._atomic import write_text_atomic
    from .eval import load_checkpoint
    from .hf.html_report import render_html, routing_trace

    docs = _read_texts(args)[args.text]  # encoding and empty-file errors before the model loads
    bench = json.loads(Path(args.bench).read_text(encoding="utf-8")) if args.bench else None  # checked
    source = _saved_policy(args, None)
    model, tokenizer = load_checkpoint(args.model)
    ids = tokenizer("\n\n".join(docs))["input_ids"][: args.tokens]
    if not ids:
        raise DataNotFoundError(f"--text {args.text!r} has no tokens; pass a file with text in it")
    trace = routing_trace(model, ids, args.policy)
    tokens = [tokenizer.decode([i]) for i in ids]
    page = render_html(
        trace,
        tokens,
        title=f"Routing report: {Path(str(args.model)).name}",
        source=f"model {args.model}; text {args.text} (first {len(ids)} tokens); policy {trace.policy} "
        f"(from {source})",
        bench=bench,
    )
    write_text_atomic(args.out, page)
    summary = {"out": str(args.out), "tokens": len(ids), "policy": trace.policy, "policy_source": source}
    summary["profile"] = trace.profile
    _emit(args, summary, f"wrote {args.out}: {len(ids)} tokens, policy {trace.policy} (from {source})")
    return 0


def _calibration_partial(args: argparse.Namespace) -> Path:
    return Path(f"{args.out}.partial.json")


def cmd_calibrate(args: argparse.Namespace) -> int:
    _need_transformers(args)
    from ._atomic import write_text_atomic
    from .calibrate import calibrate
    from .errors import ResumeError
    from .eval import load_checkpoint

    partial = _calibration_partial(args)
    header = {
        "kind": "calibration.partial",
        "model": os.path.abspath(args.model),
        "target_reduction": args.target_reduction,
        "family": args.family,
        "no_learned": args.no_learned,
        "tokens": args.tokens,
        "per_layer": not args.global_only,
        "train_steps": args.train_steps,
        "train_windows": args.train_windows,
        "budget": args.budget,
    }
    state: dict[str, Any] = {**header, "measurements": {}}
    if not args.resume and partial.exists():
        raise ResumeError(
            f"{partial} holds the partial results of an earlier run; pass --resume to continue it, or "
            "delete it to start over"
        )
    if args.resume:
        if not partial.is_file():
            raise ResumeError(f"--resume: no partial calibration at {partial}; run without --resume")
        try:
            saved = json.loads(partial.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ResumeError(f"--resume: {partial} is unreadable ({err}); delete it and rerun") from None
        measurements = saved.get("measurements") if isinstance(saved, dict) else None
        if not isinstance(measurements, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
            for v in measurements.values()
        ):
            raise ResumeError(
                f"--resume: {partial} is not a dmr calibrate partial-results file (a JSON object with "
                "'measurements' of [reduction, nll] pairs); delete it and rerun without --resume"
            )
        # a file from before --no-learned existed has no such key: it ran without it
        # a file from before --budget existed ran with the threshold budget; one from before
        # --train-windows with 4 windows per step
        before = {"no_learned": False, "budget": "threshold", "train_windows": 4}
        changed = [k for k, v in header.items() if saved.get(k, before.get(k)) != v]
        if changed:
            raise ResumeError(
                f"--resume: {partial} was made with other {', '.join(changed)}; rerun with the same "
                "options, or without --resume to start afresh"
            )
        state = saved

    def save(cache: dict[str, list[float]]) -> None:
        state["measurements"] = cache
        write_text_atomic(partial, json.dumps(state) + "\n")

    from .learn import AllocatorTraining

    training = AllocatorTraining(steps=args.train_steps, batch_windows=args.train_windows)
    model, tokenizer = load_checkpoint(args.model)
    try:
        with _progress(args) as progress:
            result = calibrate(
                model,
                tokenizer,
                args.target_reduction,
                family=args.family,
                families=tuple(f for f in CLI_CALIBRATION_FAMILIES if f != "learned")
                if args.no_learned
                else None,
                tokens=args.tokens,
                per_layer=not args.global_only,
                training=training,
                learned_budget=args.budget,
                cache=state["measurements"],
                on_measure=save,
                progress=progress,
            )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: {len(state['measurements'])} finished measurements kept in {partial}; rerun the "
            "same command with --resume to continue"
        ) from None
    result.policy.save(args.out)
    report = result.to_dict()
    report.update(model=str(args.model), out=str(args.out), calibration_tokens=args.tokens)
    if args.report:
        write_text_atomic(args.report, json.dumps(report, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    text = (
        f"{result.family}{' (per layer)' if result.per_layer else ''}: {result.policy.describe()}\n"
        f"  routed-FLOP reduction {result.reduction:.1%} (target {args.target_reduction:.1%}), valid NLL "
        f"{result.nll:.4f} vs native {result.native_nll:.4f} "
        f"({report['relative_ppl_change']:+.2%} perplexity)\n"
        + _selection_lines(result.selection)
        + f"  policy written to {args.out}"
    )
    _emit(args, report, text)
    return 0


def _selection_lines(selection: dict[str, Any] | None) -> str:
    """How ``dmr calibrate`` chose the family: each candidate's perplexity change on the held-out
    windows, best first."""
    if selection is None:
        return ""
    if not selection["windows"]:
        return "  chosen on the calibration windows (too few documents beyond them for held-out windows)\n"
    native, eligible = selection["native_nll"], selection.get("eligible")
    ranked = sorted(selection["nll"].items(), key=lambda item: item[1])
    changes = ", ".join(
        f"{family} {math.exp(nll - native) - 1:+.2%} at {selection['reduction'][family]:.1%} fewer"
        + ("" if eligible is None or family in eligible else " (saves too little there)")
        for family, nll in ranked
    )
    return f"  chosen on {selection['windows']} held-out valid windows: {changes}\n"


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the plot is drawn at the end: fail before the work
        raise MissingDependencyError(
            "dmr bench draws a Pareto plot with matplotlib; install the extra: "
            "pip install 'dynamic-moe-router-kit[bench]'"
        )
    if args.replot:
        from .sweeps.plot import replot
        from .sweeps.quality import PLOT_NAME

        out = Path(args.out_dir) / PLOT_NAME
        replot(args.replot, out)
        _emit(args, {"plot": str(out)}, f"wrote {out}")
        return 0
    _need_transformers(args)
    from .sweeps.quality import PARTIAL_NAME, QUICK, BenchSettings, run_bench, summary_table, with_overrides

    models = [Path(m) for m in args.models] if args.models else _bundled_models()
    settings = with_overrides(
        QUICK if args.quick else BenchSettings(),
        ppl_tokens=args.ppl_tokens,
        blimp_limit=args.blimp_limit,
        lambada_limit=args.lambada_limit,
        calibration_tokens=args.calibration_tokens,
        confirm_blimp_limit=args.confirm_blimp_limit,
        confirm_lambada_limit=args.confirm_lambada_limit,
    )
    partial = Path(args.out_dir) / PARTIAL_NAME
    log: Callable[..., None] = (lambda *_: None) if args.json else print
    try:
        with _progress(args) as progress:
            payload = run_bench(
                models,
                Path(args.out_dir),
                settings,
                log=log if args.json else progress.log,
                resume=args.resume,
                progress=progress,
                families=tuple(args.families) if args.families else CLI_SWEEP_FAMILIES,
            )
    except KeyboardInterrupt:
        where = f"finished rows kept in {partial}" if partial.is_file() else "no row had finished yet"
        raise Interrupted(f"interrupted: {where}; rerun the same command with --resume to continue") from None
    _emit(args, payload, summary_table(payload) + f"\nwrote {args.out_dir}/quality_flops.json and pareto.png")
    return 0


def _bundled_models() -> list[Path]:
    for root in (Path.cwd(), *Path(__file__).resolve().parents):
        if (root / "models" / "ref-mixtral" / "config.json").is_file():
            return [root / "models" / "ref-mixtral", root / "models" / "ref-olmoe"]
    raise MissingDependencyError(
        "the bundled reference models (models/ref-mixtral, models/ref-olmoe) were not found; run dmr bench "
        "from the repository or pass --models DIR ..."
    )


# -- checks that involve several arguments (run after parsing, before any model loads) ---------------
def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file (symbolic and hard links followed; ``b`` need not exist)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _clash(outputs: dict[str, Any], inputs: dict[str, Any]) -> str | None:
    """The message for the first output (``{flag: path}``) that names the same file as an input."""
    for out_flag, out in outputs.items():
        if out is None:
            continue
        for in_flag, paths in inputs.items():
            for path in [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or ()):
                if _same_file(out, path):
                    return (
                        f"argument {out_flag}: {str(out)!r} is the same file as {in_flag} {str(path)!r}, "
                        f"which would be overwritten; pass another path for {out_flag.split()[0]}"
                    )
    return None


def _model_files(model: str) -> list[Path]:
    """The files of a checkpoint directory (an output must not overwrite one)."""
    folder = Path(model)
    try:
        return [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    except OSError:
        return []


def _explicit(args: argparse.Namespace, dest: str) -> bool:
    """Whether an option was given on the command line (its value differs from the parser default)."""
    return getattr(args, dest) != args._parser.get_default(dest)


def _check_eval(args: argparse.Namespace) -> str | None:
    if args.text and args.corpus:
        return "argument --corpus: not allowed with --text; pass shared corpora or your own files, not both"
    if args.stride is not None and args.stride > args.context:
        return (
            f"argument --stride: {args.stride} is larger than --context {args.context}, which would skip "
            "tokens; pass a stride between 1 and the context"
        )
    limit = _max_positions(args.model)
    if limit is not None and args.context > limit:
        return (
            f"argument --context: {args.context} exceeds the model's max_position_embeddings ({limit}); "
            f"pass --context {limit} or less"
        )
    from .policies import POLICY_FILE

    saved = (Path(str(args.model)) / POLICY_FILE).is_file()
    if args.native and (args.policy is not None or args.no_native):
        return "argument --native: evaluates the native routing only; drop --policy / --no-native"
    if args.no_native and args.policy is None and not saved:
        return (
            f"argument --no-native: only meaningful with --policy or a {POLICY_FILE} in the model folder "
            "(without either the run is native)"
        )
    if not args.text and _explicit(args, "encoding"):
        return "argument --encoding: only applies to --text files; pass --text FILE or drop --encoding"
    if args.limit is not None and (args.tasks == [] or (args.tasks is None and args.text)):
        return (
            "argument --limit: only applies to tasks, and no task runs (--tasks none, the default with "
            "--text); pass --tasks or drop --limit"
        )
    if args.out:
        inputs = {"--text": args.text, "--policy": getattr(args, "_policy_file", None)}
        return _clash({"--out": args.out}, {**inputs, "--model": _model_files(args.model)})
    return None


def _check_profile(args: argparse.Namespace) -> str | None:
    if args.text and args.model.startswith("tiny:"):
        return f"argument --text: {args.model} has no tokenizer; profile a checkpoint directory with --text"
    if args.text and not any((Path(args.model) / f).is_file() for f in check.TOKENIZER_FILES):
        return f"argument --text: {args.model!r} has no tokenizer files; save the tokenizer with the model"
    if not args.text and _explicit(args, "encoding"):
        return "argument --encoding: only applies to --text; pass --text FILE or drop --encoding"
    return None


def _check_calibrate(args: argparse.Namespace) -> str | None:
    if args.no_learned and args.family is not None:
        return (
            f"argument --no-learned: --family {args.family} already names the one family to calibrate; "
            "pass one of them"
        )
    for dest in ("train_steps", "train_windows"):
        flag = "--" + dest.replace("_", "-")
        if _explicit(args, dest) and (args.no_learned or args.family not in (None, "learned")):
            chosen = "--no-learned" if args.no_learned else f"--family {args.family}"
            return (
                f"argument {flag}: only the learned family trains, and {chosen} leaves it out; drop "
                f"{flag} or calibrate the learned family"
            )
    if _explicit(args, "budget") and (args.no_learned or args.family not in (None, "learned")):
        chosen = "--no-learned" if args.no_learned else f"--family {args.family}"
        return (
            f"argument --budget: only the learned family has a budget kind, and {chosen} leaves it out; "
            "drop --budget or calibrate the learned family"
        )
    if args.report and _same_file(args.report, args.out):
        return "argument --report: the same file as --out; pass another path for the report"
    partial = str(_calibration_partial(args))
    return _clash(
        {"--out": args.out, "--report": args.report},
        {"--model": _model_files(args.model), "the partial-results file of --out": partial},
    )


#: ``dmr bench`` options that only the sweep uses (``--replot`` draws from a saved result)
_SWEEP_ONLY = (
    "models",
    "quick",
    "ppl_tokens",
    "blimp_limit",
    "lambada_limit",
    "confirm_blimp_limit",
    "confirm_lambada_limit",
    "calibration_tokens",
    "families",
    "resume",
)


def _check_bench(args: argparse.Namespace) -> str | None:
    if args.replot:
        given = ["--" + d.replace("_", "-") for d in _SWEEP_ONLY if _explicit(args, d)]
        if given:
            return (
                f"argument --replot: only redraws the plot, so {', '.join(given)} would be ignored; "
                "drop them, or drop --replot to run the sweep"
            )
        from .sweeps.quality import PLOT_NAME

        return _clash(
            {"--out-dir (its " + PLOT_NAME + ")": Path(args.out_dir) / PLOT_NAME}, {"--replot": args.replot}
        )
    if args.models and len({os.path.abspath(m) for m in args.models}) < len(args.models):
        return "argument --models: a model is listed twice; list each checkpoint once"
    return None


def _max_positions(model: str) -> int | None:
    try:
        value = json.loads((Path(model) / "config.json").read_text(encoding="utf-8")).get(
            "max_position_embeddings"
        )
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _check_report(args: argparse.Namespace) -> str | None:
    if args.bench:
        try:
            bench = json.loads(Path(args.bench).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return f"argument --bench: {args.bench!r} is not readable JSON ({err}); pass a dmr bench result"
        models = bench.get("models") if isinstance(bench, dict) else None
        if not isinstance(models, list) or not all(isinstance(m, dict) and "rows" in m for m in models):
            return f"argument --bench: {args.bench!r} is not a dmr bench result (no 'models' with 'rows')"
    inputs = {"--text": args.text, "--bench": args.bench, "--policy": getattr(args, "_policy_file", None)}
    return _clash({"--out": args.out}, {**inputs, "--model": _model_files(args.model)})


CHECKS: dict[str, Callable[[argparse.Namespace], str | None]] = {
    "report": _check_report,
    "eval": _check_eval,
    "profile": _check_profile,
    "calibrate": _check_calibrate,
    "bench": _check_bench,
}


# -- the parser --------------------------------------------------------------------------------------
def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (and no progress bar)")


class _PolicyArg(argparse.Action):
    """``--policy``: parsed like ``type=check.policy``; a policy file's path is kept in ``_policy_file``
    (so that an output cannot overwrite it)."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        if not isinstance(values, str):  # nargs is None: argparse passes the one string
            raise argparse.ArgumentError(self, "expected one policy file or NAME:key=value,...")
        try:
            setattr(namespace, self.dest, check.policy(values))
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentError(self, str(err)) from None
        is_file = values.endswith(".json") or Path(values).is_file()
        namespace._policy_file = values if is_file else None


def _encoding_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoding",
        type=check.encoding,
        default="utf-8",
        help="encoding of the --text files (default utf-8)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``dmr`` (also the source of the generated CLI reference page)."""
    parser = argparse.ArgumentParser(
        prog="dmr",
        description="Dynamic per-token expert routing for MoE models.",
        epilog="Exit status: 0 success, 2 bad input (one line on stderr), 130 interrupted (work kept; "
        "see --resume), 141 output closed early.",
    )
    parser.add_argument("--version", action="version", version=f"dmr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "families", help="list the supported MoE families", description="List the supported MoE families."
    )
    _json_flag(p)
    p.set_defaults(func=cmd_families)

    p = sub.add_parser(
        "inspect",
        help="show the MoE layers of a checkpoint directory or tiny:FAMILY",
        description="Show the MoE layers of a checkpoint (config only, no weights are loaded).",
    )
    p.add_argument(
        "model",
        type=check.model_or_tiny,
        help="a transformers checkpoint directory, or tiny:FAMILY (e.g. tiny:mixtral)",
    )
    p.add_argument(
        "--policy",
        action=_PolicyArg,
        help="policy JSON file or NAME:key=value,...: whether the fused routing kernel covers each layer "
        "under it (default: the model folder's dmr_policy.json if there is one, else the native "
        "static_top_k)",
    )
    _json_flag(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "profile",
        help="patch a model, run tokens through it and print the FLOP table",
        description="Patch a model with a policy, run random token ids (or the start of --text) through "
        "it and print the executed pairs and FLOPs per layer.",
    )
    p.add_argument(
        "model", type=check.model_or_tiny, help="a transformers checkpoint directory, or tiny:FAMILY"
    )
    p.add_argument(
        "--policy",
        action=_PolicyArg,
        help="policy JSON file or NAME:key=value,... (default: the model folder's dmr_policy.json if "
        "there is one, else top_p:p=0.5)",
    )
    p.add_argument(
        "--tokens",
        type=check.int_at_least(1, "a sequence length such as 64"),
        default=64,
        help="sequence length (default 64)",
    )
    p.add_argument(
        "--batch",
        type=check.int_at_least(1, "a batch size such as 2"),
        default=2,
        help="batch size (default 2)",
    )
    p.add_argument(
        "--seed",
        type=check.int_at_least(0, "a seed between 0 and 2**63 - 1", 2**63 - 1),
        default=0,
        help="seed of the random token ids (default 0)",
    )
    p.add_argument(
        "--text",
        type=check.input_file,
        metavar="FILE",
        help="profile the first --batch x --tokens tokens of this text or JSONL file "
        "(a checkpoint with a tokenizer) instead of random ids",
    )
    _encoding_flag(p)
    p.add_argument(
        "--backend", default="auto", choices=list(CLI_BACKENDS), help="experts backend (default auto)"
    )
    _json_flag(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "eval",
        help="perplexity and zero-shot accuracy of a checkpoint, with FLOP accounting",
        description="Perplexity and zero-shot accuracy of a checkpoint under a policy, with FLOP "
        "accounting. With --policy the native routing is evaluated too (once per model and data in "
        "this process) and the change against it is reported.",
    )
    p.add_argument(
        "--model",
        required=True,
        type=check.checkpoint_dir,
        help="a local transformers checkpoint directory (with tokenizer)",
    )
    p.add_argument(
        "--policy",
        action=_PolicyArg,
        help="policy JSON file or NAME:key=value,... (default: the model folder's dmr_policy.json if "
        "there is one, else the native routing)",
    )
    p.add_argument("--no-native", action="store_true", help="with --policy: skip the native baseline run")
    p.add_argument(
        "--native",
        action="store_true",
        help="evaluate the native routing only, even when the model folder holds a dmr_policy.json",
    )
    p.add_argument(
        "--text",
        nargs="+",
        type=check.input_file,
        metavar="FILE",
        help="plain text or JSONL (field 'text') files: perplexity only",
    )
    _encoding_flag(p)
    p.add_argument("--corpus", nargs="+", choices=list(CLI_CORPORA), help="shared corpora (default: both)")
    p.add_argument(
        "--tasks",
        type=check.task_list,
        help="comma-separated tasks, all or none (default: all; none with --text)",
    )
    p.add_argument(
        "--limit",
        type=check.int_at_least(1, "a positive item count"),
        help="first N items per task (per paradigm for BLiMP)",
    )
    p.add_argument(
        "--max-tokens",
        type=check.int_at_least(1, "a positive token count"),
        help="score at most N tokens per corpus",
    )
    p.add_argument(
        "--context",
        type=check.int_at_least(1, "a window length such as 512"),
        default=512,
        help="perplexity window (default 512)",
    )
    p.add_argument(
        "--stride",
        type=check.int_at_least(1, "a stride between 1 and --context"),
        help="perplexity window stride (default: the context)",
    )
    p.add_argument(
        "--batch-size",
        type=check.int_at_least(1, "a batch size such as 16"),
        default=16,
        help="windows or requests per forward pass (default 16)",
    )
    p.add_argument(
        "--out", type=check.output_file, help="also write the JSON result to this file (atomically)"
    )
    _json_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "report",
        help="write an HTML page showing which tokens got how many experts, layer by layer",
        description="Run a text through a patched checkpoint and write one self-contained HTML page: "
        "the text shaded by each token's kept experts, per-layer k histograms and expert loads, the FLOP "
        "summary, and (with --bench) the quality/FLOPs Pareto plot.",
    )
    p.add_argument(
        "--model",
        required=True,
        type=check.checkpoint_dir,
        help="a local transformers checkpoint directory (with tokenizer)",
    )
    p.add_argument("--text", required=True, type=check.input_file, metavar="FILE", help="text or JSONL file")
    _encoding_flag(p)
    p.add_argument(
        "--policy",
        action=_PolicyArg,
        help="policy JSON file or NAME:key=value,... (default: the model folder's dmr_policy.json if "
        "there is one, else the native routing)",
    )
    p.add_argument(
        "--tokens",
        type=check.int_at_least(1, "a token count such as 256"),
        default=256,
        help="how many tokens of the text to show (default 256)",
    )
    p.add_argument("--bench", type=check.input_file, metavar="JSON", help="a dmr bench result to plot")
    p.add_argument("--out", required=True, type=check.output_file, help="the HTML file to write")
    _json_flag(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "calibrate",
        help="find the policy that meets a routed-FLOP reduction with the least loss",
        description="Find the policy that meets a routed-FLOP reduction with the least loss increase on the "
        "valid split. Every measurement is kept in OUT.partial.json until the policy is written; after "
        "Ctrl-C, --resume continues from it.",
    )
    p.add_argument(
        "--model",
        required=True,
        type=check.checkpoint_dir,
        help="a local transformers checkpoint directory (with tokenizer)",
    )
    p.add_argument(
        "--target-reduction",
        type=check.fraction,
        required=True,
        help="routed-FLOP reduction to reach, between 0 and 1, e.g. 0.35",
    )
    p.add_argument(
        "--family",
        choices=list(CLI_CALIBRATION_FAMILIES),
        help="policy family (default: try all; 'static' is per-layer static top-k, the baseline; 'learned' "
        "trains per-layer heads on the train split)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=check.output_file,
        help="policy JSON to write (dmr.load_policy and --policy read it)",
    )
    p.add_argument(
        "--tokens",
        type=check.int_at_least(512, "at least one 512-token window, e.g. 8192"),
        default=8192,
        help="calibration tokens from the valid split (default 8192)",
    )
    p.add_argument("--global-only", action="store_true", help="skip the per-layer refinement")
    p.add_argument(
        "--no-learned",
        action="store_true",
        help="without --family: try the router-score families and static top-k only (no allocator training)",
    )
    p.add_argument(
        "--train-steps",
        type=check.int_at_least(1, "a positive number of steps, e.g. 400"),
        default=400,
        help="training steps of the learned family (default 400: 6-9 minutes on 2 CPU cores for "
        "the reference models)",
    )
    p.add_argument(
        "--train-windows",
        type=check.int_at_least(1, "a positive number of 512-token windows, e.g. 8"),
        default=4,
        help="512-token training windows per step of the learned family (default 4). Training time "
        "grows with steps x windows; on ref-olmoe --train-steps 800 --train-windows 8 (4x the default "
        "work) brought the 35%% allocator from +1.13%% to +0.98%% perplexity on Gutenberg test "
        "(with --budget quantile)",
    )
    p.add_argument(
        "--budget",
        choices=["threshold", "quantile"],
        default="threshold",
        help="the learned family's budget: a logit threshold fitted on valid (default), or 'quantile': "
        "every call of >= 64 tokens keeps exactly 1 - target of its pairs, on any text (routing then "
        "depends on the other tokens of a call; decoding steps use the threshold)",
    )
    p.add_argument(
        "--report",
        type=check.output_file,
        help="also write the calibration report (every measurement) as JSON",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial.json")
    _json_flag(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "bench",
        help="quality / routed-FLOP sweep of every policy family (the main job)",
        description="The quality / routed-FLOP sweep of every policy family and the static baselines on the "
        "reference models; writes quality_flops.json and pareto.png. Finished rows are kept in "
        "quality_flops.partial.json; after Ctrl-C, --resume continues from it.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        type=check.checkpoint_dir,
        metavar="DIR",
        help="checkpoint directories (default: the bundled reference models)",
    )
    p.add_argument(
        "--out-dir",
        type=check.output_dir,
        default="dmr-bench",
        help="where quality_flops.json and pareto.png go (default dmr-bench)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run on less data (4.5 minutes measured on 2 cores), not the published numbers",
    )
    p.add_argument(
        "--ppl-tokens",
        type=check.int_at_least(1, "a positive token count"),
        help="Gutenberg test tokens for perplexity (default 16384, --quick 1024)",
    )
    p.add_argument(
        "--blimp-limit",
        type=check.int_at_least(1, "a positive pair count"),
        help="BLiMP pairs per paradigm, 1000 = all (default 5; 1 with --quick)",
    )
    p.add_argument(
        "--lambada-limit",
        type=check.int_at_least(1, "a positive passage count"),
        help="LAMBADA passages, 5153 = all (default 150; 10 with --quick)",
    )
    p.add_argument(
        "--confirm-blimp-limit",
        type=check.int_at_least(0, "a pair count >= 0 (0: no accuracy confirmation)"),
        help="BLiMP pairs per paradigm for the accuracy confirmation of the points that reach 30%% fewer "
        "routed FLOPs within +1%% perplexity (default 50; 2 with --quick; 0 with "
        "--confirm-lambada-limit 0: none)",
    )
    p.add_argument(
        "--confirm-lambada-limit",
        type=check.int_at_least(0, "a passage count >= 0 (0: no accuracy confirmation)"),
        help="LAMBADA passages for the accuracy confirmation (default 1000; 20 with --quick)",
    )
    p.add_argument(
        "--calibration-tokens",
        type=check.int_at_least(512, "at least 512 tokens"),
        help="valid-split tokens for calibration and the per-layer baselines (default 4096; "
        "512 with --quick)",
    )
    p.add_argument(
        "--families",
        nargs="+",
        choices=list(CLI_SWEEP_FAMILIES),
        metavar="FAMILY",
        help=f"sweep only these families ({', '.join(CLI_SWEEP_FAMILIES)}; native always runs; "
        "batch_aware is the batched-decoding measurement; default: all)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUT_DIR/quality_flops.partial.json",
    )
    p.add_argument(
        "--replot",
        type=check.input_file,
        metavar="RESULT_JSON",
        help="only redraw pareto.png in --out-dir from a saved quality_flops.json",
    )
    _json_flag(p)
    p.set_defaults(func=cmd_bench)

    for name, subparser in sub.choices.items():
        subparser.set_defaults(_parser=subparser, _check=CHECKS.get(name))
    return parser


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dmr`` console script; returns the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # usage errors (2, message printed), --help and --version (0)
            return exit_.code if isinstance(exit_.code, int) else 2
        problem = args._check(args) if args._check else None
        if problem:
            args._parser.print_usage(sys.stderr)
            print(f"{args._parser.prog}: error: {problem}", file=sys.stderr)
            return 2
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except DmrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as err:  # a check that needs the data (e.g. --text too short)
        print(f"error: {err.message}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(str(err), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
