"""``calibrate``: the policy that meets a routed-FLOP reduction with the least loss increase.

Calibration runs on held-out text (the Gutenberg valid split by default) and measures, for each
candidate policy, the routed-FLOP reduction against the native top-k and the mean token NLL.

1. **Global parameter.** Each policy family has one knob that trades FLOPs for quality:
   ``top_p`` (``theta = 1 - p``), ``relative_threshold`` (``theta = beta``) and ``entropy``
   (``theta = low``, with ``high = min(1, low + 0.3)``); the reduction grows with ``theta``.
   Bisection towards the least aggressive ``theta`` whose reduction reaches the target; of the
   probes that reach it, the one with the lowest NLL is kept.
2. **Per-layer budgets.** The NLL increase of each layer alone at the global ``theta`` measures its
   sensitivity. Layers are then shifted away from the global ``theta`` in proportion to their
   standardised insensitivity (``theta_l = theta + lambda * 0.1 * z_l + offset``), the common
   ``offset`` bisected again to meet the target, for a few ``lambda``; the per-layer policy
   (:class:`~dynamic_moe_router.PerLayer`) is kept only if its measured NLL is lower than the
   global one's.

3. **Learned allocation** (``family="learned"``). Per-layer keep-heads are distilled on the frozen
   model on the Gutenberg **train** split (:func:`~dynamic_moe_router.train_allocator`), their
   budget offset is fitted on windows spread over the documents of the calibration text, and the
   result is measured like every other candidate.

Without a family, every family of ``families`` (default :data:`FAMILIES`, the learned one included;
pass ``families=tuple(KNOBS)`` for the score families only) is calibrated and the one with the
least NLL increase wins. A target that no family reaches raises
:class:`~dynamic_moe_router.errors.TargetUnreachableError`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ._progress import Progress, Task
from ._progress import task as _task
from .errors import PolicyError, TargetUnreachableError
from .hf.layers import find_moe_layers
from .hf.patching import patched
from .policies import EntropyAdaptive, PerLayer, RelativeThreshold, RoutingPolicy, StaticTopK, TopP
from .profiling import profile

__all__ = [
    "FAMILIES",
    "KNOBS",
    "CalibrationResult",
    "Knob",
    "calibrate",
    "calibration_windows",
    "measurement_key",
]


@dataclass(frozen=True)
class Knob:
    """A policy family's one-parameter knob: ``make(theta)``, reduction increasing in ``theta``."""

    name: str
    low: float
    high: float
    make: Callable[[float], RoutingPolicy]


KNOBS: dict[str, Knob] = {
    k.name: k
    for k in (
        Knob("top_p", 0.0, 0.99, lambda t: TopP(p=round(1.0 - t, 6))),
        Knob("relative_threshold", 0.0, 1.0, lambda t: RelativeThreshold(beta=round(t, 6))),
        Knob(
            "entropy", 0.0, 0.95, lambda t: EntropyAdaptive(low=round(t, 6), high=round(min(1.0, t + 0.3), 6))
        ),
    )
}

#: every calibration family: the score-policy knobs, then the learned allocator
FAMILIES: tuple[str, ...] = (*KNOBS, "learned")
#: the learned family's budget is fitted on windows spread over the calibration documents, then
#: measured on the calibration windows: it counts as reaching the target within this margin
LEARNED_TOLERANCE = 0.01


@dataclass
class CalibrationResult:
    """The chosen policy, its measured reduction and NLL, and every measurement made."""

    policy: RoutingPolicy
    family: str
    reduction: float
    nll: float
    native_nll: float
    per_layer: bool
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nll_increase(self) -> float:
        return self.nll - self.native_nll

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "policy": self.policy.to_dict(),
            "reduction": self.reduction,
            "nll": self.nll,
            "native_nll": self.native_nll,
            "nll_increase": self.nll_increase,
            "relative_ppl_change": math.exp(self.nll_increase) - 1.0,
            "per_layer": self.per_layer,
            "measurements": self.history,
        }


def calibration_windows(tokenizer, documents: Sequence[str], tokens: int, context: int = 512) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``(N, context + 1)`` non-overlapping windows covering the first ``tokens`` tokens."""
    ids: list[int] = []
    for chunk in tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(chunk)
        ids.append(tokenizer.eos_token_id)
        if len(ids) > tokens + 1:
            break
    ids = ids[: tokens + 1]
    n = (len(ids) - 1) // context
    if n == 0:
        raise PolicyError(f"calibration needs at least {context + 1} tokens; got {len(ids)}", field="tokens")
    return torch.tensor([ids[i * context : i * context + context + 1] for i in range(n)], dtype=torch.long)


def measurement_key(policy: RoutingPolicy | None) -> str:
    """The key of a measurement in a calibration cache: the policy's JSON (``"native"`` for none)."""
    return "native" if policy is None else json.dumps(policy.to_dict(), sort_keys=True)


class _Meter:
    """Measures (routed-FLOP reduction, mean NLL) of a policy on fixed windows.

    ``cache`` maps :func:`measurement_key` to ``[reduction, nll]``: a policy found there is not run
    again (a resumed calibration replays the same bisection from it). ``on_measure(cache)`` is called
    after every new measurement, e.g. to save the cache; ``task`` advances a progress bar.
    """

    def __init__(  # type: ignore[no-untyped-def]
        self,
        model,
        windows: torch.Tensor,
        batch_size: int,
        cache: dict[str, list[float]] | None = None,
        on_measure: Callable[[dict[str, list[float]]], None] | None = None,
        task: Task | None = None,
    ) -> None:
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.cache = {} if cache is None else cache
        self.on_measure, self.task = on_measure, task
        self.history: list[dict[str, Any]] = []

    def __call__(self, policy: RoutingPolicy | None, **note: Any) -> tuple[float, float]:
        key = measurement_key(policy)
        if key in self.cache:
            reduction, mean = self.cache[key]
        else:
            reduction, mean = self._measure(policy)
            self.cache[key] = [reduction, mean]
            if self.on_measure is not None:
                self.on_measure(self.cache)
        if self.task is not None:
            self.task.advance()
        self.history.append(
            {
                "policy": None if policy is None else policy.describe(),
                "reduction": reduction,
                "nll": mean,
                **note,
            }
        )
        return reduction, mean

    @torch.no_grad()
    def _measure(self, policy: RoutingPolicy | None) -> tuple[float, float]:
        total, count = 0.0, 0
        routing = patched(self.model, policy) if policy is not None else nullcontext()
        with routing, profile(self.model, count_dense=False) as report:
            for start in range(0, len(self.windows), self.batch_size):
                batch = self.windows[start : start + self.batch_size]  # (B, context + 1)
                logits = self.model(batch[:, :-1]).logits.float()  # (B, context, V)
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(nll)
                count += batch[:, 1:].numel()
        return report.to_dict()["routed_flop_reduction"], total / count


def _bisect(measure: Callable[[float], tuple[float, float]], lo: float, hi: float, target: float, iters: int):  # type: ignore[no-untyped-def]
    """Bisect towards the smallest ``x`` in ``[lo, hi]`` whose reduction reaches ``target``.

    Returns ``(x, reduction, nll)`` of the probe with the lowest NLL among those that reached the
    target (usually the last), or ``(None, reduction, nll)`` of ``hi`` when even ``hi`` falls short.
    """
    red_hi, nll_hi = measure(hi)
    if red_hi < target:
        return None, red_hi, nll_hi
    best = (hi, red_hi, nll_hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        red, nll = measure(mid)
        if red >= target:
            hi = mid
            if nll < best[2]:
                best = (mid, red, nll)
        else:
            lo = mid
    return best


def calibrate(
    model,  # type: ignore[no-untyped-def]
    tokenizer,
    target_reduction: float,
    *,
    documents: Sequence[str] | None = None,
    family: str | None = None,
    tokens: int = 8192,
    context: int = 512,
    per_layer: bool = True,
    iterations: int = 8,
    batch_size: int = 8,
    cache: dict[str, list[float]] | None = None,
    on_measure: Callable[[dict[str, list[float]]], None] | None = None,
    progress: Progress | None = None,
    families: Sequence[str] | None = None,
    training: Any = None,
    train_documents: Sequence[str] | None = None,
) -> CalibrationResult:
    """Find the policy reaching ``target_reduction`` of routed-expert FLOPs with the least NLL increase.

    ``documents`` default to the Gutenberg valid split (tune on valid, report on test).

    No lost work: ``cache`` (a dict, filled in place) holds every measurement made, keyed by
    :func:`measurement_key`, and ``on_measure(cache)`` runs after each new one (``dmr calibrate``
    saves it to a partial-results file). Calibrating again with the same arguments and that cache
    replays the finished measurements without running the model. ``progress`` draws a bar with an
    ETA (the step count is an upper bound: a family that cannot reach the target stops early).

    ``families`` (default: all of :data:`FAMILIES`) limits the families tried when ``family`` is
    None. The learned family trains on ``train_documents`` (default: the Gutenberg train split) with
    ``training`` (an :class:`~dynamic_moe_router.AllocatorTraining`; its target is replaced by
    ``target_reduction``); its training is not cached (a resumed run trains again).
    """
    if not isinstance(target_reduction, (int, float)) or not 0.0 < target_reduction < 1.0:
        raise PolicyError(
            f"target_reduction must be in (0, 1), got {target_reduction!r}", field="target_reduction"
        )
    names = [family] if family is not None else list(FAMILIES if families is None else families)
    for name in names:
        if name not in FAMILIES:
            raise PolicyError(
                f"unknown policy family {name!r}; choose from {', '.join(FAMILIES)}", field="family"
            )
    if documents is None:
        from .data import data_file, read_jsonl

        documents = [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]
    if "learned" in names and train_documents is None:
        from .data import data_file

        data_file("gutenberg/train.jsonl.xz")  # missing data fails here, before any long work
    windows = calibration_windows(tokenizer, documents, tokens, context)
    layers = [layer.index for layer in find_moe_layers(model)[0]]
    knobs = [name for name in names if name in KNOBS]
    refine = per_layer and len(layers) > 1
    steps = 1 + len(knobs) * ((1 + iterations) + (len(layers) + 3 * (1 + iterations) if refine else 0))
    steps += len(names) - len(knobs)  # the learned family's measurement
    bar = _task(progress, f"calibrating to {target_reduction:.0%} fewer routed FLOPs", steps)
    meter = _Meter(model, windows, batch_size, cache, on_measure, bar)
    _, native_nll = meter(None, stage="native")

    candidates: list[CalibrationResult] = []
    reachable: dict[str, float] = {}
    if "learned" in names:
        learned = _calibrate_learned(
            model, tokenizer, target_reduction, documents, train_documents, training, context, progress
        )
        red, nll = meter(learned, stage="learned", family="learned")
        reachable["learned"] = red
        if red >= target_reduction - LEARNED_TOLERANCE:  # its budget was fitted on other windows
            candidates.append(CalibrationResult(learned, "learned", red, nll, native_nll, True))
    for name in knobs:
        knob = KNOBS[name]
        theta, red, nll = _bisect(
            lambda t, k=knob: meter(k.make(t), stage="global", family=k.name, theta=t),
            knob.low, knob.high, target_reduction, iterations,
        )  # fmt: skip
        reachable[name] = red
        if theta is None:
            continue
        best = CalibrationResult(knob.make(theta), name, red, nll, native_nll, False)
        if refine:
            best = _refine_per_layer(
                meter, knob, theta, layers, target_reduction, native_nll, best, iterations
            )
        candidates.append(best)
    if not candidates:
        best_seen = ", ".join(
            f"{k}: {v:.1%}{' (its fitted budget, measured here)' if k == 'learned' else ''}"
            for k, v in reachable.items()
        )
        raise TargetUnreachableError(
            f"no policy family reaches a {target_reduction:.1%} routed-FLOP reduction on this model "
            f"(most aggressive setting of each: {best_seen}); lower the target"
        )
    bar.finish()
    result = min(candidates, key=lambda c: c.nll)
    result.history = meter.history
    return result


def _calibrate_learned(  # type: ignore[no-untyped-def]
    model, tokenizer, target: float, documents, train_documents, training, context: int, progress
) -> RoutingPolicy:
    """Train a learned allocator (train split) and fit its budget on spread calibration windows."""
    from dataclasses import replace

    from .learn import AllocatorTraining, spread_windows, train_allocator

    if train_documents is None:
        from .data import data_file, read_jsonl

        train_documents = (r["text"] for r in read_jsonl(data_file("gutenberg/train.jsonl.xz")))
    config = replace(training or AllocatorTraining(), target_reduction=target)
    train = spread_windows(
        tokenizer, train_documents, per_doc=8, context=context, skip=context, max_windows=800
    )
    budget = spread_windows(tokenizer, documents, per_doc=2, context=context, skip=context, max_windows=64)
    return train_allocator(model, train, budget, config, progress=progress)


def _refine_per_layer(meter, knob, theta, layers, target, native_nll, best, iterations):  # type: ignore[no-untyped-def]
    sensitivity = []
    for layer in layers:
        alone = PerLayer(StaticTopK(), {layer: knob.make(theta)})  # every other layer native
        _, nll = meter(alone, stage="sensitivity", layer=layer)
        sensitivity.append(nll - native_nll)
    mean = statistics.fmean(sensitivity)
    spread = statistics.pstdev(sensitivity) or 1.0
    z = [(mean - s) / spread for s in sensitivity]  # > 0: less sensitive than average

    def make(lam: float, offset: float) -> RoutingPolicy:
        thetas = [min(knob.high, max(knob.low, theta + lam * 0.1 * zl + offset)) for zl in z]
        # every MoE layer has its override, so the policy carries no default: patching a model
        # with other MoE layers raises a PolicyError naming them instead of routing them natively
        return PerLayer(None, {layer: knob.make(t) for layer, t in zip(layers, thetas, strict=True)})

    for lam in (0.5, 1.0, 2.0):
        offset, red, nll = _bisect(
            lambda o, lam=lam: meter(make(lam, o), stage="per_layer", family=knob.name, lam=lam, offset=o),
            -0.3, 0.3, target, iterations,
        )  # fmt: skip
        if offset is not None and nll < best.nll:
            best = CalibrationResult(make(lam, offset), knob.name, red, nll, native_nll, True)
    return best
