"""``dmr bench``: the quality / routed-FLOP sweep on the reference models (the main job).

For each model it evaluates, on the same test tokens and task items, the native routing, the
static baselines, a sweep of each dynamic policy family and the calibrated policy:

* ``native``: the model's own top-k;
* ``static``: uniform reduced top-k (every ``k`` below the native one) and a per-layer reduced
  top-k (``k - 1`` in the least sensitive layers, chosen on the valid split, about 35% fewer pairs);
* ``lu_median``: relative threshold with a per-layer ``beta`` = the median ratio of the last native
  candidate's probability to the top one on the valid split (Lu et al. 2024, generalised to any k);
* ``top_p`` (Huang et al. 2024), ``relative_threshold`` and ``entropy`` over fixed operating points;
* ``calibrated``: ``calibrate(target_reduction=0.35)`` on the valid split (the score-policy families,
  per layer; the learned family trains, which the sweep leaves to the committed allocators);
* ``learned``: the learned allocators committed beside the checkpoint
  (``MODEL/allocators/learned-*.json``, trained on the train split, budget fitted on valid:
  ``learned-tNN`` with the threshold budget, ``learned-qNN`` with the per-call quantile budget);
* ``batch_aware``: not a point of the sweep but a second measurement, in batched decoding
  (:mod:`.batched_decode`): many test sequences decoded at once with a KV cache, teacher-forced,
  under the native routing, static ``k - 1``, ``BatchAware(StaticTopK(), experts=f)`` and its
  ``reroute=True`` form; per batch
  size, the decode perplexity ratio to native, the pair reduction and the distinct experts one decode
  step touches (``batched_decoding`` in each model's result).

Quality: perplexity on the first ``ppl_tokens`` tokens of the Gutenberg test split (windows of
512), BLiMP (the first ``blimp_limit`` pairs of each of its 67 paradigms) and LAMBADA (the first
``lambada_limit`` passages). Differences against native come with paired standard errors.

Accuracy confirmation: the small task samples above cost little per point, but their paired
standard errors (about 1 point) are as large as the headline's accuracy limit (1 point), so a point
that reaches the smallest of :data:`TARGETS` within :data:`PPL_LIMIT` is scored again, with native,
on more items (``confirm_blimp_limit`` pairs per paradigm, ``confirm_lambada_limit`` passages; the
row's ``confirm``). The points are chosen by routed FLOPs and perplexity only, never by their
accuracy, so the larger sample decides the accuracy verdicts without a selection bias.

No lost work: after every finished row (and every calibration measurement) the state is written
atomically to ``quality_flops.partial.json`` in the output folder. ``run_bench(..., resume=True)``
(``dmr bench --resume``) reads it back, keeps the finished rows as they are and computes only the
rest; the partial file is removed once the complete result is written. Paths in the result are
relative to the repository (see :func:`portable_path`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .._atomic import write_text_atomic
from .._progress import Progress
from .._progress import task as _task
from .._version import __version__
from ..calibrate import KNOBS, calibrate, calibration_windows
from ..data import data_file, read_jsonl
from ..errors import PolicyError, ResumeError
from ..eval import evaluate, load_checkpoint
from ..eval.stats import paired_delta
from ..hf.layers import find_moe_layers
from ..hf.patching import patched
from ..policies import (
    EntropyAdaptive,
    PerLayer,
    RelativeThreshold,
    RoutingPolicy,
    StaticTopK,
    TopP,
    load_policy,
    policy_from_dict,
)
from .targets import PPL_LIMIT, TARGETS

__all__ = [
    "FAMILIES",
    "PARTIAL_NAME",
    "PLOT_NAME",
    "QUICK",
    "RESULT_NAME",
    "BenchSettings",
    "portable_path",
    "run_bench",
    "summary_table",
]

#: the families of the sweep, in order (``native`` is always run: every change is against it);
#: ``batch_aware`` is not a point of the sweep but the batched-decoding measurement of each model
FAMILIES = (
    "native", "static", "lu_median", "top_p", "relative_threshold", "entropy", "calibrated", "learned",
    "batch_aware",
)  # fmt: skip
#: where a checkpoint's committed learned allocators live (``learned`` points), relative to it
ALLOCATORS_GLOB = "allocators/learned-*.json"
RESULT_NAME = "quality_flops.json"
PARTIAL_NAME = "quality_flops.partial.json"
PLOT_NAME = "pareto.png"
#: the repository root when the package runs from a checkout (``src/dynamic_moe_router/sweeps``)
_REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class BenchSettings:
    """How much test data each point is scored on, and how the calibrated point is found."""

    ppl_tokens: int = 16384
    blimp_limit: int = 5
    lambada_limit: int = 150
    calibration_tokens: int = 4096
    calibration_target: float = 0.35
    batch_size: int = 16
    #: most model runs per parameter search of the calibration (``calibrate(iterations=...)``)
    calibration_iterations: int = 4
    #: batched decoding (the ``batch_aware`` family): sequences decoded at once, prompt and decode
    #: tokens per sequence, and the ``BatchAware`` expert fractions
    decode_batches: tuple[int, ...] = (16, 64)
    decode_prompt: int = 64
    decode_steps: int = 32
    batch_aware_fractions: tuple[float, ...] = (0.75, 0.5)
    #: accuracy confirmation of the points that reach a target within the perplexity limit (module
    #: docstring): BLiMP pairs per paradigm and LAMBADA passages; 0 and 0 turn it off
    confirm_blimp_limit: int = 50
    confirm_lambada_limit: int = 1000

    def __post_init__(self) -> None:
        """The batched-decoding fields, checked before any model loads (lists become tuples)."""
        from .batched_decode import batch_aware_policies

        for name in ("decode_batches", "batch_aware_fractions"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        batches = self.decode_batches
        if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
            raise PolicyError(
                f"BenchSettings.decode_batches must be a non-empty tuple of batch sizes >= 1, "
                f"got {batches!r}",
                field="decode_batches",
            )
        for name, low, note in (
            ("decode_prompt", 1, ""),
            ("decode_steps", 1, ""),
            ("confirm_blimp_limit", 0, " (0: no confirmation)"),
            ("confirm_lambada_limit", 0, " (0: no confirmation)"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PolicyError(
                    f"BenchSettings.{name} must be an int >= {low}{note}, got {value!r}", field=name
                )
        flags = "(dmr bench --confirm-blimp-limit / --confirm-lambada-limit)"
        if (self.confirm_blimp_limit == 0) != (self.confirm_lambada_limit == 0):
            raise PolicyError(
                "BenchSettings.confirm_blimp_limit and confirm_lambada_limit must both be 0 (no accuracy "
                f"confirmation) or both positive, got {self.confirm_blimp_limit} and "
                f"{self.confirm_lambada_limit} {flags}",
                field="confirm_blimp_limit",
            )
        for task in ("blimp", "lambada"):
            confirm, sweep = getattr(self, f"confirm_{task}_limit"), getattr(self, f"{task}_limit")
            if confirm and confirm <= sweep:
                raise PolicyError(
                    f"BenchSettings.confirm_{task}_limit ({confirm}) must exceed {task}_limit ({sweep}): the "
                    f"confirmation scores more items than the sweep, or none (0 and 0) {flags}",
                    field=f"confirm_{task}_limit",
                )
        try:
            batch_aware_policies(2, self.batch_aware_fractions)
        except PolicyError as err:
            raise PolicyError(
                f"BenchSettings.batch_aware_fractions: {err}", field="batch_aware_fractions"
            ) from None


#: ``dmr bench --quick``: the same sweep on less data (4.5 minutes measured on 2 CPU cores); a smoke run,
#: not the published numbers
QUICK = BenchSettings(
    ppl_tokens=1024,
    blimp_limit=1,
    lambada_limit=10,
    calibration_tokens=512,
    calibration_iterations=3,
    decode_batches=(8,),
    decode_prompt=32,
    decode_steps=8,
    confirm_blimp_limit=2,
    confirm_lambada_limit=20,
)


def portable_path(path: str | os.PathLike[str]) -> str:
    """``path`` relative to the repository when it lies in it or beside it (``../shared/data/...``),
    else as given, so result files do not record the machine they ran on.

    Example:
        >>> from dynamic_moe_router.sweeps.quality import _REPO, portable_path
        >>> portable_path(_REPO / "models" / "ref-olmoe")
        'models/ref-olmoe'
    """
    p = Path(os.path.abspath(path))  # symlinks kept: a linked models/ folder stays in the repository
    if (_REPO / "pyproject.toml").is_file():
        for base, prefix in ((_REPO, ""), (_REPO.parent, "../")):
            try:
                return prefix + p.relative_to(base).as_posix()
            except ValueError:
                continue
    return str(path)


def _valid_documents() -> list[str]:
    return [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]


@torch.no_grad()
def _lu_median_betas(model, windows: torch.Tensor) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """Per layer, the median over tokens of p_(k) / p_(1) under the native routing (softmax routers)."""
    out = model(windows[:, :-1], output_router_logits=True)
    layers = find_moe_layers(model)[0]
    betas = {}
    for layer, logits in zip(layers, out.router_logits, strict=True):  # logits: (T, E)
        top = torch.topk(torch.softmax(logits.float(), -1), layer.native_k, dim=-1).values  # (T, k)
        betas[layer.index] = float((top[:, -1] / top[:, 0]).median())
    return betas


@torch.no_grad()
def _static_per_layer(model, windows: torch.Tensor, target: float) -> RoutingPolicy:  # type: ignore[no-untyped-def]
    """``k - 1`` in the least sensitive layers (NLL when only that layer drops one expert), until
    the pair reduction reaches ``target``."""
    layers = find_moe_layers(model)[0]

    def nll(policy: RoutingPolicy) -> float:
        with patched(model, policy):
            logits = model(windows[:, :-1]).logits.float()  # (N, context, V)
        flat = logits.reshape(-1, logits.shape[-1])
        return float(torch.nn.functional.cross_entropy(flat, windows[:, 1:].reshape(-1)))

    cost = {
        layer.index: nll(PerLayer(StaticTopK(), {layer.index: StaticTopK(k=layer.native_k - 1)}))
        for layer in layers
    }
    native_pairs = sum(layer.native_k for layer in layers)
    chosen: dict[int, RoutingPolicy] = {}
    for index in sorted(cost, key=cost.__getitem__):
        if len(chosen) / native_pairs >= target:  # each chosen layer drops one pair per token
            break
        k = next(layer.native_k for layer in layers if layer.index == index)
        chosen[index] = StaticTopK(k=k - 1)
    return PerLayer(StaticTopK(), chosen)


@dataclass(frozen=True)
class _Point:
    family: str
    label: str
    make: Callable[[], RoutingPolicy | Path | None]  # a Path: a policy file (a learned allocator)


class _Model:
    """One model's sweep: its points (policies made lazily, the expensive ones only when reached)."""

    def __init__(
        self, model, tokenizer, settings: BenchSettings, state: dict[str, Any], save, log, progress, path=None
    ):  # type: ignore[no-untyped-def]
        self.model, self.tokenizer, self.settings, self.path = model, tokenizer, settings, path
        self.state, self.save, self.log, self.progress = state, save, log, progress
        self.layers = find_moe_layers(model)[0]

    @cached_property
    def documents(self) -> list[str]:
        return _valid_documents()

    @cached_property
    def windows(self) -> torch.Tensor:
        return calibration_windows(self.tokenizer, self.documents, self.settings.calibration_tokens)

    def _calibrated(self) -> RoutingPolicy:
        s = self.settings
        self.log(f"calibrating to {s.calibration_target:.0%} fewer routed FLOPs on the valid split")
        cache = self.state.setdefault("calibration_cache", {})
        result = calibrate(
            self.model,
            self.tokenizer,
            s.calibration_target,
            documents=self.documents,
            tokens=s.calibration_tokens,
            iterations=s.calibration_iterations,
            families=tuple(KNOBS),
            cache=cache,
            on_measure=lambda _: self.save(),
            progress=self.progress,
        )
        self.state["calibrated_label"] = (
            f"{result.family}{' per layer' if result.per_layer else ''} @{s.calibration_target:.0%}"
        )
        return result.policy

    def _per_layer_static(self) -> RoutingPolicy:
        self.log("choosing the per-layer static baseline on the valid split")
        return _static_per_layer(self.model, self.windows, 0.35)

    def _lu(self) -> RoutingPolicy:
        betas = _lu_median_betas(self.model, self.windows)
        return PerLayer(StaticTopK(), {i: RelativeThreshold(beta=b) for i, b in betas.items()})

    def points(self, families: tuple[str, ...] = FAMILIES) -> list[_Point]:
        """The sweep's points of ``families`` (plus native, first), in a fixed order."""
        return [p for p in self._all_points() if p.family == "native" or p.family in families]

    def _all_points(self) -> list[_Point]:
        native_k = self.layers[0].native_k
        pts = [_Point("native", "native top-k", lambda: None)]
        pts += [
            _Point("static", f"uniform k={k}", lambda k=k: StaticTopK(k=k))
            for k in range(native_k - 1, 0, -1)
        ]
        pts.append(_Point("static", "per-layer k-1 (least sensitive)", self._per_layer_static))
        pts.append(_Point("lu_median", "per-layer median beta", self._lu))
        pts += [_Point("top_p", f"p={p}", lambda p=p: TopP(p=p)) for p in (0.75, 0.6, 0.45, 0.3)]
        pts += [
            _Point("relative_threshold", f"beta={b}", lambda b=b: RelativeThreshold(beta=b))
            for b in (0.2, 0.4, 0.6, 0.8)
        ]
        pts += [
            _Point(
                "entropy",
                f"low={c}",
                lambda c=c: EntropyAdaptive(low=c, high=round(min(1.0, c + 0.3), 3)),
            )
            for c in (0.5, 0.65, 0.8)
        ]
        pts.append(_Point("calibrated", "calibrated", self._calibrated))
        for file in sorted(Path(self.path).glob(ALLOCATORS_GLOB)) if self.path is not None else ():
            pts.append(_Point("learned", f"learned {file.stem.removeprefix('learned-')}", lambda f=file: f))
        return pts

    def policy(self, point: _Point) -> RoutingPolicy | None:
        """The point's policy: made once, kept in the partial state (so a resume does not redo it)."""
        made = self.state.setdefault("policies", {})
        if point.family == "native":
            return None
        if point.label not in made:
            made_policy = point.make()
            if isinstance(made_policy, Path):  # a policy file with its own weights file: kept by path
                made[point.label] = {
                    "file": portable_path(made_policy),
                    "sha256": getattr(load_policy(made_policy), "sha256", None),
                }
            else:
                made[point.label] = made_policy.to_dict()  # type: ignore[union-attr]
            self.save()
        if "file" in made[point.label]:
            file = Path(made[point.label]["file"])
            policy = load_policy(file if file.is_absolute() else _REPO / file)
            if getattr(policy, "sha256", None) != made[point.label]["sha256"]:
                raise ResumeError(
                    f"--resume: {file} was retrained since the partial run began (its weights differ); "
                    "rerun without --resume"
                )
            return policy
        return policy_from_dict(made[point.label])


def _bench_model(  # type: ignore[no-untyped-def]
    path: Path, settings: BenchSettings, state: dict[str, Any], save, log, progress, families
) -> dict[str, Any]:
    model, tokenizer = load_checkpoint(path)
    sweep = _Model(model, tokenizer, settings, state, save, log, progress, path)
    layers = sweep.layers
    points = sweep.points(families)
    rows: list[dict[str, Any]] = state.setdefault("rows", [])
    if rows:
        log(f"resuming: {len(rows)} of {len(points)} points already done, kept as they are")
    bar = _task(progress, path.name, len(points))
    bar.advance(len(rows))
    for n, point in enumerate(points, 1):
        if n <= len(rows):
            continue
        policy = sweep.policy(point)
        label = state.get("calibrated_label", point.label) if point.family == "calibrated" else point.label
        start = time.time()
        res = evaluate(
            model,
            tokenizer,
            policy=policy,
            corpora=["gutenberg_test"],
            tasks=["blimp", "lambada"],
            limit={"blimp": settings.blimp_limit, "lambada": settings.lambada_limit},
            max_tokens=settings.ppl_tokens,
            batch_size=settings.batch_size,
            count_dense=policy is None,  # dense FLOPs do not depend on the policy: measured once
        )
        f = res["flops"]
        ppl = res["perplexity"]["gutenberg_test"]
        blimp, lambada = res["tasks"]["blimp"], res["tasks"]["lambada"]
        if point.family == "native":
            state["native"] = {
                "dense_flops": f["shared_expert_flops"] + f["attention_flops"] + f["other_flops"],
                "ppl": ppl["ppl"],
                "blimp_item_scores": blimp["item_scores"],
                "lambada_item_scores": lambada["item_scores"],
                "data": {
                    "perplexity": {
                        "file": portable_path(ppl["file"]),
                        "tokens": ppl["tokens"],
                        "context": 512,
                    },
                    "blimp": {"file": portable_path(blimp["file"]), "items": blimp["items"]},
                    "lambada": {"file": portable_path(lambada["file"]), "items": lambada["items"]},
                    "calibration": {
                        "file": portable_path(data_file("gutenberg/valid.jsonl")),
                        "tokens": settings.calibration_tokens,
                    },
                },
            }
        native = state["native"]
        d_blimp = paired_delta(blimp["item_scores"], native["blimp_item_scores"])
        d_lambada = paired_delta(lambada["item_scores"], native["lambada_item_scores"])
        rows.append(
            {
                "family": point.family,
                "label": label,
                "policy": None if policy is None else policy.to_dict(),
                "routed_flop_reduction": f["routed_flop_reduction"],
                "total_flop_reduction": (f["native_routed_flops"] - f["routed_flops"])
                / (f["native_routed_flops"] + native["dense_flops"]),
                "mean_k": f["mean_k"],
                "ppl": ppl["ppl"],
                "ppl_ci95": ppl["ppl_ci95"],
                "ppl_rel_change": ppl["ppl"] / native["ppl"] - 1.0,
                "blimp_acc": blimp["acc"],
                "blimp_delta": d_blimp[0],
                "blimp_delta_se": d_blimp[1],
                "lambada_acc": lambada["acc"],
                "lambada_delta": d_lambada[0],
                "lambada_delta_se": d_lambada[1],
                "wall_s": round(time.time() - start, 1),
            }
        )
        save()
        bar.advance()
        r = rows[-1]
        log(
            f"[{n}/{len(points)}] {point.family:<18} {label:<34} routed -{r['routed_flop_reduction']:6.1%}  "
            f"ppl {r['ppl']:7.3f} ({r['ppl_rel_change']:+.2%})  BLiMP {r['blimp_delta'] * 100:+.1f}  "
            f"LAMBADA {r['lambada_delta'] * 100:+.1f} pts"
        )
    _confirm(sweep, points, rows, state, save, log)
    result = {
        "model": portable_path(path),
        "family": model.config.model_type,
        "moe_layers": len(layers),
        "native_k": layers[0].native_k,
        "data": state["native"]["data"],
        "rows": rows,
    }
    if "batch_aware" in families:
        if "batched_decoding" not in state:
            state["batched_decoding"] = _batched_decoding(model, tokenizer, settings, log)
            save()
        result["batched_decoding"] = state["batched_decoding"]
    return result


def confirmation_candidates(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of the non-native ``rows`` that reach the smallest of :data:`TARGETS` within
    :data:`PPL_LIMIT` (chosen by routed FLOPs and perplexity only, never by accuracy).

    Example:
        >>> rows = [{"family": "native", "routed_flop_reduction": 0.0, "ppl_rel_change": 0.0},
        ...         {"family": "learned", "routed_flop_reduction": 0.35, "ppl_rel_change": 0.009},
        ...         {"family": "top_p", "routed_flop_reduction": 0.34, "ppl_rel_change": 0.04}]
        >>> confirmation_candidates(rows)
        [1]
    """
    return [
        i
        for i, r in enumerate(rows)
        if r["family"] != "native"
        and r["routed_flop_reduction"] >= min(TARGETS)
        and r["ppl_rel_change"] <= PPL_LIMIT
    ]


def _confirm(sweep: _Model, points: list[_Point], rows: list[dict[str, Any]], state, save, log) -> None:  # type: ignore[no-untyped-def]
    """Score the :func:`confirmation_candidates` again on the larger task samples, native first
    (its item scores kept in the partial state only), each into its row's ``confirm``."""
    s = sweep.settings
    todo = [i for i in confirmation_candidates(rows) if "confirm" not in rows[i]]
    if not s.confirm_blimp_limit or not todo:
        return
    for i in todo:  # rows are the points' results in order; a resumed run must list the same points
        point = points[i] if i < len(points) else None
        expected = None if point is None else point.label
        if point is not None and point.family == "calibrated":  # its row names the family it chose
            expected = state.get("calibrated_label", expected)
        if rows[i]["label"] != expected:
            raise ResumeError(
                f"--resume: row {i} ({rows[i]['label']!r}) is not the sweep's point {i} now ({expected!r}); "
                "the points changed since the partial run began (an allocator file added or removed?); "
                "rerun without --resume"
            )
    limit = {"blimp": s.confirm_blimp_limit, "lambada": s.confirm_lambada_limit}

    def tasks(policy: RoutingPolicy | None) -> dict[str, Any]:
        res = evaluate(
            sweep.model,
            sweep.tokenizer,
            policy=policy,
            corpora=[],
            tasks=["blimp", "lambada"],
            limit=limit,
            batch_size=s.batch_size,
            count_dense=False,
        )
        return res["tasks"]

    if "native_confirm" not in state:
        log(f"confirming the accuracies of {len(todo)} point(s) on more items: native first")
        native = tasks(None)
        state["native_confirm"] = {
            task: {
                "acc": native[task]["acc"],
                "items": native[task]["items"],
                "scores": native[task]["item_scores"],
            }
            for task in ("blimp", "lambada")
        }
        save()
    base = state["native_confirm"]
    for i in todo:
        row = rows[i]
        start = time.time()
        got = tasks(sweep.policy(points[i]))  # rows are the points' results, in order
        confirm: dict[str, Any] = {}
        for task in ("blimp", "lambada"):
            delta, se = paired_delta(got[task]["item_scores"], base[task]["scores"])
            confirm[task] = {
                "items": got[task]["items"],
                "acc": got[task]["acc"],
                "native_acc": base[task]["acc"],
                "delta": delta,
                "delta_se": se,
            }
        confirm["wall_s"] = round(time.time() - start, 1)
        row["confirm"] = confirm
        save()
        log(
            f"confirmed {row['label']}: BLiMP {100 * confirm['blimp']['delta']:+.2f} ± "
            f"{100 * confirm['blimp']['delta_se']:.2f} ({confirm['blimp']['items']} pairs), LAMBADA "
            f"{100 * confirm['lambada']['delta']:+.2f} ± {100 * confirm['lambada']['delta_se']:.2f} pts "
            f"({confirm['lambada']['items']} passages)"
        )


def _batched_decoding(model, tokenizer, settings: BenchSettings, log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The ``batch_aware`` measurement on the first test tokens (see :mod:`.batched_decode`)."""
    from .batched_decode import batched_decoding, corpus_ids

    s = settings
    log(
        f"batched decoding at batch sizes {list(s.decode_batches)} "
        f"(BatchAware fractions {list(s.batch_aware_fractions)})"
    )
    length = s.decode_prompt + s.decode_steps + 1
    relative = "gutenberg/test.jsonl"
    ids = corpus_ids(tokenizer, relative, max(s.decode_batches) * length)
    start = time.time()
    result = batched_decoding(
        model, ids, s.decode_batches, s.batch_aware_fractions, s.decode_prompt, s.decode_steps, log=log
    )
    return {"file": portable_path(data_file(relative)), **result, "wall_s": round(time.time() - start, 1)}


def _load_partial(partial: Path, header: dict[str, Any]) -> dict[str, Any]:
    if not partial.is_file():
        raise ResumeError(f"--resume: no partial results at {partial}; run without --resume to start afresh")
    try:
        state = json.loads(partial.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResumeError(
            f"--resume: {partial} is unreadable ({err}); delete it and run without --resume"
        ) from None
    results = state.get("results") if isinstance(state, dict) else None
    if (
        not isinstance(results, dict)
        or not all(isinstance(r, dict) and isinstance(r.get("rows", []), list) for r in results.values())
        or not isinstance(state.get("elapsed_s"), (int, float))
        or isinstance(state.get("elapsed_s"), bool)
    ):
        raise ResumeError(
            f"--resume: {partial} is not a dmr bench partial-results file (a JSON object with 'results' "
            "and 'elapsed_s'); delete it and run without --resume"
        )
    for key, value in header.items():
        if state.get(key) != value:
            raise ResumeError(
                f"--resume: {partial} holds a run with other {key} ({state.get(key)!r}, now {value!r}); "
                "rerun with the same options, or without --resume to start afresh"
            )
    return state


#: the hindsight oracle's result (``benchmarks/oracle.py``), drawn as the ceiling when it was run on
#: the same test windows as the sweep
ORACLE_RESULT = _REPO / "benchmarks" / "results" / "oracle.json"


def _oracle_ceiling(settings: BenchSettings, models: list[str]) -> dict[str, Any]:
    """Per model, the oracle's selection-only points (reduction, perplexity change) from
    :data:`ORACLE_RESULT`, when it exists and scored the same number of test tokens."""
    try:
        oracle = json.loads(ORACLE_RESULT.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for m in oracle.get("models", []) if isinstance(oracle, dict) else []:
        if (
            not isinstance(m, dict)
            or m.get("model") not in models
            or m.get("test_tokens") != settings.ppl_tokens
        ):
            continue  # the ceiling is drawn only for the same first ppl_tokens test tokens
        points = [
            [p["reduction"], p["ppl_change"]]
            for p in m.get("points", [])
            if isinstance(p, dict) and p.get("kind") == "oracle" and {"reduction", "ppl_change"} <= set(p)
        ]
        if points:
            out[m["model"]] = {"source": portable_path(ORACLE_RESULT), "points": sorted(points)}
    return out


def run_bench(  # type: ignore[no-untyped-def]
    models: list[Path],
    out_dir: Path,
    settings: BenchSettings,
    log=print,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    plot: bool = True,
    families: tuple[str, ...] = FAMILIES,
) -> dict[str, Any]:
    """Run the sweep on ``models``; write ``quality_flops.json`` and ``pareto.png`` into ``out_dir``.

    The state after every finished row is kept in ``out_dir/quality_flops.partial.json``;
    ``resume=True`` continues from it (its settings, models and families must be the same); without
    it an existing partial file is refused (:class:`~dynamic_moe_router.errors.ResumeError`), never
    overwritten.
    ``families`` restricts the sweep to some of :data:`FAMILIES` (native is always run).
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise PolicyError(
            f"unknown sweep families {unknown}; choose from {', '.join(FAMILIES)}", field="families"
        )
    families = tuple(f for f in FAMILIES if f in families)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / PARTIAL_NAME
    header = {
        "kind": "quality_flops.partial",
        "settings": json.loads(json.dumps(asdict(settings))),  # as read back from the partial file
        "models": [portable_path(m) for m in models],
        "families": list(families),
    }
    if not resume and partial.exists():
        raise ResumeError(
            f"{partial} holds the partial results of an earlier run; pass --resume to continue it, or "
            "delete it to start over"
        )
    state = _load_partial(partial, header) if resume else {**header, "elapsed_s": 0.0, "results": {}}
    start = time.time() - state["elapsed_s"]

    def save() -> None:
        state["elapsed_s"] = round(time.time() - start, 1)
        write_text_atomic(partial, json.dumps(state) + "\n")

    torch.manual_seed(0)
    results = []
    for path in models:
        log(f"== {portable_path(path)}")
        model_state = state["results"].setdefault(portable_path(path), {})
        results.append(_bench_model(path, settings, model_state, save, log, progress, families))
    payload = {
        "kind": "quality_flops",
        "created_by": "dmr bench",
        "settings": asdict(settings),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "dynamic_moe_router": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "wall_s": round(time.time() - start, 1),
        "models": results,
    }
    ceiling = _oracle_ceiling(settings, [Path(r["model"]).name for r in results])
    if ceiling:
        payload["ceiling"] = ceiling
    if families != FAMILIES:
        payload["families"] = list(families)
    write_text_atomic(out_dir / RESULT_NAME, json.dumps(payload, indent=1) + "\n")
    if plot:
        from .plot import plot_pareto

        plot_pareto(payload, out_dir / PLOT_NAME)
    partial.unlink(missing_ok=True)
    return payload


def summary_table(payload: dict[str, Any]) -> str:
    """The printable table of a bench run."""
    lines = []
    for result in payload["models"]:
        lines.append(f"{Path(result['model']).name} ({result['family']}, top-{result['native_k']})")
        lines.append(
            f"  {'family':<18} {'point':<34} {'routed':>7} {'whole':>7} {'ppl':>8} {'dppl':>7} "
            f"{'BLiMP':>6} {'dBLiMP':>7} {'LAMB.':>6} {'dLAMB.':>7}"
        )
        for r in result["rows"]:
            lines.append(
                f"  {r['family']:<18} {r['label']:<34} {r['routed_flop_reduction']:>7.1%} "
                f"{r['total_flop_reduction']:>7.1%} {r['ppl']:>8.3f} {r['ppl_rel_change']:>+7.2%} "
                f"{r['blimp_acc']:>6.3f} {100 * r['blimp_delta']:>+7.1f} {r['lambada_acc']:>6.3f} "
                f"{100 * r['lambada_delta']:>+7.1f}"
            )
        decoding = result.get("batched_decoding")
        if decoding:
            lines.append(
                f"  batched decoding ({decoding['prompt']}-token prompts, {decoding['steps']} steps)"
            )
            lines.append(f"  {'batch':>5} {'policy':<18} {'ppl ratio':>16} {'pairs':>7} {'distinct':>9}")
            for r in decoding["rows"]:
                lines.append(
                    f"  {r['batch']:>5} {r['policy']:<18} {r['ppl_ratio']:>8.4f} ± {r['ppl_ratio_se']:.4f} "
                    f"{r['pair_reduction']:>7.1%} "
                    f"{r['distinct_experts_per_call']:>5.1f}/{decoding['num_experts']}"
                )
    return "\n".join(lines)


def with_overrides(settings: BenchSettings, **changes: Any) -> BenchSettings:
    """``settings`` with the given fields replaced (``None`` values are ignored)."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
