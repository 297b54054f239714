"""``calibrate``: the policy that meets a routed-FLOP reduction with the least loss increase.

Calibration runs on held-out text (the Gutenberg valid split by default) and measures, for each
candidate policy, the routed-FLOP reduction against the native top-k and the mean token NLL.

1. **Global parameter.** Each policy family has one knob that trades FLOPs for quality:
   ``top_p`` (``theta = 1 - p``), ``relative_threshold`` (``theta = beta``) and ``entropy``
   (``theta = low``, with ``high = min(1, low + 0.3)``); the reduction grows with ``theta``.
   A search (:func:`_search`) finds a ``theta`` whose reduction reaches the target by at most
   :data:`SEARCH_TOLERANCE`; of the probes that reach it, the one with the lowest NLL is kept.
2. **Per-layer budgets.** For the :data:`REFINE_FAMILIES` families with the lowest global NLL
   increase, the NLL increase of each layer alone at the global ``theta`` (on a quarter of the
   windows) measures its sensitivity. Layers are then shifted away from the global ``theta`` in
   proportion to their standardised insensitivity (``theta_l = theta + lambda * 0.1 * z_l +
   offset``), the common ``offset`` searched again to meet the target, for a few ``lambda``; the
   per-layer policy (:class:`~dynamic_moe_router.PerLayer`) is kept only if its measured NLL is
   lower than the global one's.

**Few model runs.** The native pass (run once, for the native NLL) also records every MoE layer's
router scores (:class:`RoutingStats`) and every decoder layer's outputs. A policy's reduction on
the recorded scores costs a top-k per layer, so each search inverts that prediction and runs the
model only to correct it: one or two runs per search instead of eight bisection steps. A
sensitivity probe (layers before its own routed natively) replays the recorded outputs of those
layers instead of running them again (exact: they see the native inputs).

3. **Static top-k** (``family="static"``), the baseline every dynamic family has to beat: per
   layer, starting from the native ``k`` everywhere, one slot at a time is taken from the layer
   where a probe (that layer alone at ``k - 1``, on a quarter of the windows) costs the least, until
   the routed FLOPs fall by the target; with ``per_layer=False`` the smallest uniform cut that
   reaches it. A dynamic family therefore wins only where it beats static top-k on the held-out
   windows (static top-k cuts whole slots, so it may pass the target by up to one slot's share).
4. **Learned allocation** (``family="learned"``). Per-layer keep-heads are distilled on the frozen
   model on the Gutenberg **train** split (:func:`~dynamic_moe_router.train_allocator`), their
   budget offset is fitted on windows spread over the documents of the calibration text, and the
   result is measured like every other candidate.

Without a family, every family of ``families`` (default :data:`FAMILIES`, the learned one included;
pass ``families=tuple(KNOBS)`` for the score families only) is calibrated and the one with the
least NLL increase wins: on held-out windows (:func:`held_out_windows`: one from each calibration
document that the tuning windows do not reach, past the learned budget's windows; among the
candidates that save at least the target there, within :data:`SELECT_TOLERANCE`) where the text has at least
:data:`SELECT_MIN_WINDOWS` of them, else on the tuning windows. The score families' parameters are
searched on the tuning windows, so choosing there would favour them. A target that no family reaches raises
:class:`~dynamic_moe_router.errors.TargetUnreachableError`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ._progress import Progress, Task
from ._progress import task as _task
from .errors import PolicyError, TargetUnreachableError, UnsupportedModelError
from .hf.layers import _LAYER_RE, find_moe_layers, unwrap
from .hf.patching import get_patch, patched
from .policies import EntropyAdaptive, PerLayer, RelativeThreshold, RoutingPolicy, StaticTopK, TopP
from .profiling import profile
from .routing import select

__all__ = [
    "FAMILIES",
    "KNOBS",
    "CalibrationResult",
    "Knob",
    "RoutingStats",
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

#: a search probe aims this far past the target reduction, so that most probes reach it
SEARCH_MARGIN = 0.002
#: a search stops at the first probe whose reduction exceeds the target by at most this much
SEARCH_TOLERANCE = 0.005
#: the chosen policy is searched once more when it passed the target by more than this, aiming
#: ``FINAL_MARGIN`` past it (the candidates are compared at up to ``SEARCH_TOLERANCE`` past it)
FINAL_TOLERANCE = 0.0015
FINAL_MARGIN = 0.0005
#: a family whose global NLL increase is more than this many times the best family's is not refined
#: per layer (on the reference models the refinement cut a family's increase by about half at most)
REFINE_WITHIN = 2.0
#: at most this many families (the lowest global NLL increases) are refined per layer: on the
#: reference models, at 25-50% fewer routed FLOPs, the third never won after refinement
REFINE_FAMILIES = 2
#: the sensitivity probes run on this fraction of the calibration windows (at least one window):
#: only the differences between layers matter there, and they are paired on the same windows
PROBE_FRACTION = 0.25
_INVERT_ITERATIONS = 18  # bisection steps on the routing statistics (no model runs)
_TOKENIZE_BATCH = 16  # documents tokenised at a time for the calibration windows
#: the held-out windows that choose among the families: at most this many, one per document ...
SELECT_WINDOWS = 16
#: ... and used only when the calibration text gives at least this many (else the tuning windows)
SELECT_MIN_WINDOWS = 4
#: a held-out window starts this many contexts (plus one token) into its document: after the
#: learned family's budget windows (``learn.ALLOCATOR_WINDOWS['budget']``: 2 per document after the first)
SELECT_SKIP_CONTEXTS = 3
#: a candidate may win on the held-out windows only if it saves at least the target less this there
SELECT_TOLERANCE = 0.01
#: the native pass keeps every decoder layer's outputs for replays when they fit in this many bytes
PREFIX_BYTES = 2 * 2**30
#: config fields of models whose decoder layers hand each other state besides their outputs: no replay
_CROSS_LAYER_STATE = ("num_kv_shared_layers",)

#: every calibration family: the score-policy knobs, static top-k, then the learned allocator
FAMILIES: tuple[str, ...] = (*KNOBS, "static", "learned")
#: the learned family's budgets: a fixed logit threshold, or a per-call quantile (exact reduction)
LEARNED_BUDGETS: tuple[str, ...] = ("threshold", "quantile")
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
    #: how the family was chosen: ``{"windows": N, "native_nll": ..., "nll": {family: ...}}`` on
    #: held-out windows, or ``None`` (one candidate, or too little text: chosen on the tuning windows)
    selection: dict[str, Any] | None = None

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
            "selection": self.selection,
            "measurements": self.history,
        }


def calibration_windows(tokenizer, documents: Sequence[str], tokens: int, context: int = 512) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``(N, context + 1)`` non-overlapping windows covering the first ``tokens`` tokens."""
    ids: list[int] = []
    documents = list(documents)
    for start in range(0, len(documents), _TOKENIZE_BATCH):  # stop tokenising once there is enough
        batch = documents[start : start + _TOKENIZE_BATCH]
        for chunk in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(chunk)
            ids.append(tokenizer.eos_token_id)
            if len(ids) > tokens + 1:
                break
        if len(ids) > tokens + 1:
            break
    ids = ids[: tokens + 1]
    n = (len(ids) - 1) // context
    if n == 0:
        raise PolicyError(f"calibration needs at least {context + 1} tokens; got {len(ids)}", field="tokens")
    return torch.tensor([ids[i * context : i * context + context + 1] for i in range(n)], dtype=torch.long)


def held_out_windows(  # type: ignore[no-untyped-def]
    tokenizer, documents: Sequence[str], tokens: int, context: int = 512, max_windows: int = SELECT_WINDOWS
) -> torch.Tensor | None:
    """``(N, context + 1)`` windows that choose among the calibrated families, or ``None`` (fewer
    than :data:`SELECT_MIN_WINDOWS`).

    One window per document that the tuning windows (:func:`calibration_windows`, the first
    ``tokens`` tokens of the documents joined) do not reach, starting ``SELECT_SKIP_CONTEXTS *
    context + 1`` tokens in, past the learned family's budget windows: text that no family was
    fitted on.

    Example:
        >>> class Tok:  # one token per character
        ...     eos_token_id = 0
        ...     def __call__(self, texts, **kw):
        ...         one = isinstance(texts, str)
        ...         ids = [[ord(c) % 50 for c in t] for t in ([texts] if one else texts)]
        ...         return {"input_ids": ids[0] if one else ids}
        >>> held_out_windows(Tok(), ["a" * 100] * 9, tokens=150, context=8).shape  # docs 0-1 tune
        torch.Size([7, 9])
    """
    from .learn.windows import spread_windows

    documents = list(documents)
    start, first_unseen = 0, len(documents)
    for index, text in enumerate(documents):  # the documents' offsets in the joined tuning text
        if start > tokens:  # the tuning windows read ids[: tokens + 1]
            first_unseen = index
            break
        start += len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + 1  # + eos
    unseen = documents[first_unseen:]
    if len(unseen) < SELECT_MIN_WINDOWS:
        return None
    skip = SELECT_SKIP_CONTEXTS * context + 1
    chars = max(40_000, 8 * (skip + context + 1))  # enough characters for the window's tokens
    try:
        windows = spread_windows(
            tokenizer, unseen, per_doc=1, context=context, skip=skip, max_windows=max_windows, chars=chars
        )
    except PolicyError:  # no document long enough
        return None
    return windows if len(windows) >= SELECT_MIN_WINDOWS else None


def measurement_key(policy: RoutingPolicy | None) -> str:
    """The key of a measurement in a calibration cache: the policy's JSON (``"native"`` for none)."""
    return "native" if policy is None else json.dumps(policy.to_dict(), sort_keys=True)


class RoutingStats:
    """Router scores of every MoE layer over the calibration windows, recorded in one pass.

    The routed-FLOP reduction of a router-score policy on these scores (:meth:`reduction`) costs a
    top-k per layer, not a model run. It is exact for the first MoE layer; a later layer's inputs
    drift once earlier layers route differently, so the search uses it as a guide and the model's
    measured reductions correct it (see :func:`_search`).

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> from dynamic_moe_router.calibrate import RoutingStats
        >>> model = tiny_model("mixtral")
        >>> stats = RoutingStats.record(model, torch.tensor([[5, 6, 7, 8, 9]]))
        >>> stats.reduction(dmr.StaticTopK()), stats.reduction(dmr.StaticTopK(k=1))
        (0.0, 0.5)
    """

    def __init__(self, layers: Sequence[Any]) -> None:
        self._layers = {layer.index: layer for layer in layers}
        self._parts: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {i: [] for i in self._layers}
        self._scores: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def observe(self, index: int, sc: Any) -> None:
        """``DynamicRouter.observe`` hook: keep one call's ranking scores and probabilities."""
        select = sc.select.detach().float().cpu()  # (T, E)
        probs = None if sc.probs is sc.select else sc.probs.detach().float().cpu()  # (T, E)
        self._parts[index].append((select, probs))
        self._scores.pop(index, None)

    @classmethod
    @torch.no_grad()
    def record(cls, model: Any, input_ids: torch.Tensor, batch_size: int = 8) -> RoutingStats:
        """Run ``model`` (patched with the native :class:`~dynamic_moe_router.StaticTopK`) on
        ``input_ids (B, S)`` and record every MoE layer's router scores."""
        stats = cls(find_moe_layers(model)[0])
        with patched(model, StaticTopK()), stats.recording(model):
            for start in range(0, len(input_ids), batch_size):
                model(input_ids[start : start + batch_size])
        return stats

    @contextmanager
    def recording(self, model: Any) -> Iterator[None]:
        """Record the router scores of every call of the patched ``model`` inside the block."""
        handle = get_patch(unwrap(model))
        if handle is None:
            raise PolicyError("RoutingStats.recording needs a patched model (dmr.patched)", field="model")
        for router in handle.routers:
            router.observe = self.observe
        try:
            yield
        finally:
            for router in handle.routers:
                router.observe = None

    def _layer_scores(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if index not in self._scores:
            parts = self._parts[index]
            if not parts:
                raise PolicyError(
                    f"MoE layer {index} was never routed eagerly while the routing statistics were "
                    "recorded; calibrate an eager (not torch.compile'd) model whose forward runs every "
                    "MoE layer",
                    field="model",
                )
            select = torch.cat([p[0] for p in parts])  # (T, E)
            probs = None if parts[0][1] is None else torch.cat([p[1] for p in parts])  # type: ignore[misc]
            self._scores[index] = (select, probs)
            self._parts[index] = [(select, probs)]  # one copy
        return self._scores[index]

    @torch.no_grad()
    def reduction(self, policy: RoutingPolicy) -> float:
        """The routed-FLOP reduction of ``policy`` on the recorded scores (no model run)."""
        routed = native = 0
        for index, layer in self._layers.items():
            select_scores, probs = self._layer_scores(index)
            sel = select(
                select_scores, policy, native_k=layer.native_k, probs=probs, layer=index, validate=False
            )
            kept, natives = int(sel.counts.sum()), select_scores.shape[0] * layer.native_k
            if layer.zero_experts:  # zero-computation experts run nothing: count executed pairs
                kept -= int((sel.keep & (sel.ranked_ids >= layer.real_experts)).sum())
                top = torch.topk(select_scores, layer.native_k, dim=-1).indices  # (T, k)
                natives -= int((top >= layer.real_experts).sum())
            routed += kept * layer.flops_per_pair
            native += natives * layer.flops_per_pair
        return 1.0 - routed / native if native else 0.0


class _Prefix:
    """The native pass's decoder-layer outputs, batch by batch, replayed for the layers before the
    first MoE layer that a policy routes differently (the per-layer sensitivity probes): those layers
    see exactly the native inputs, so running them again would only repeat the native pass.

    Kept only where every decoder layer returns a tensor, the outputs fit in ``limit`` bytes, and
    the layers pass nothing to each other but their outputs (not for a model whose layers share
    key/value states, such as gemma4's ``num_kv_shared_layers``).
    """

    def __init__(self, model: Any, layers: Sequence[Any], limit: int) -> None:
        self.decoders: torch.nn.ModuleList | None = None
        self.outputs: list[list[torch.Tensor]] = []  # [decoder layer][batch] (B, S, H)
        self.native_flops: dict[int, tuple[int, int]] = {}  # MoE layer -> (routed, native routed)
        self.limit, self.size = limit, 0
        root = unwrap(model)
        config = getattr(root, "config", None)
        if any(getattr(config, a, 0) for a in _CROSS_LAYER_STATE):
            return
        first = layers[0]
        match = _LAYER_RE.search(first.path)
        if match is None:
            return
        decoders = root.get_submodule(first.path[: match.start(1) - 1])  # the ModuleList
        if isinstance(decoders, torch.nn.ModuleList):
            self.decoders = decoders
            self.outputs = [[] for _ in decoders]

    def _keep(self, j: int, out: Any) -> None:
        if self.decoders is None:
            return
        if not isinstance(out, torch.Tensor) or self.size + out.nbytes > self.limit:
            self.decoders, self.outputs = None, []  # a tuple output, or too large: run in full
            return
        self.size += out.nbytes
        self.outputs[j].append(out)

    @contextmanager
    def recording(self) -> Iterator[None]:
        if self.decoders is None:
            yield
            return
        handles = [
            d.register_forward_hook(lambda _m, _a, out, j=j: self._keep(j, out))
            for j, d in enumerate(self.decoders)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def first_dynamic(self, policy: RoutingPolicy | None) -> int:
        """Decoder layers before the first one ``policy`` routes differently from the native top-k
        (0: run every layer)."""
        if self.decoders is None or not self.native_flops or not isinstance(policy, PerLayer):
            return 0
        if policy.default != StaticTopK() or not policy.overrides:
            return 0
        return min(policy.overrides)

    @contextmanager
    def replaying(self, first: int) -> Iterator[None]:
        """Decoder layers ``[0, first)`` return their native outputs, one batch per call, in order
        (the first rows of a recorded batch for a partial one)."""
        assert self.decoders is not None
        replaced = []  # (decoder, its own instance-level forward, e.g. accelerate's hook wrapper)
        for j in range(first):
            decoder = self.decoders[j]
            replaced.append((decoder, decoder.__dict__.get("forward")))
            outputs = iter(self.outputs[j])
            decoder.forward = partial(_replay, outputs)
        try:
            yield
        finally:
            for decoder, own in replaced:
                if own is None:
                    del decoder.forward  # the class's forward again
                else:
                    decoder.forward = own

    def reduction(self, report: dict[str, Any], first: int, fraction: float = 1.0) -> float:
        """The routed-FLOP reduction of a replayed run over ``fraction`` of the windows: the skipped
        MoE layers routed natively."""
        routed = native = 0.0
        for row in report["layers"]:
            if row["layer"] < first:
                row_routed, row_native = (fraction * f for f in self.native_flops[row["layer"]])
            else:
                row_routed, row_native = row["routed_flops"], row["native_routed_flops"]
            routed, native = routed + row_routed, native + row_native
        return 1.0 - routed / native if native else 0.0


def _replay(outputs: Iterator[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """A replayed decoder layer's forward: the next recorded output ``(B, S, H)``, cut to the rows
    of the batch it is given (its hidden states, positional or by name)."""
    hidden = args[0] if args else next((kwargs[n] for n in _HIDDEN_NAMES if n in kwargs), None)  # (b, S, H)
    if not isinstance(hidden, torch.Tensor):
        raise UnsupportedModelError(
            f"calibrate: a decoder layer was called without its hidden states as the first argument or as "
            f"one of {list(_HIDDEN_NAMES)} (keywords: {sorted(kwargs)}); calibrate with per_layer=False "
            "(dmr calibrate --global-only), which replays no layer"
        )
    return next(outputs)[: hidden.shape[0]]


#: the keywords a decoder layer's hidden states may come under, in the order they are looked up
_HIDDEN_NAMES = ("hidden_states", "hidden_state", "x", "inputs_embeds")


class _Meter:
    """Measures (routed-FLOP reduction, mean NLL) of a policy on fixed windows.

    ``cache`` maps :func:`measurement_key` to ``[reduction, nll]``: a policy found there is not run
    again (a resumed calibration replays the same search from it). ``on_measure(cache)`` is called
    after every new measurement, e.g. to save the cache; ``task`` advances a progress bar.
    :attr:`stats` (the native pass's :class:`RoutingStats`) is recorded during the native
    measurement, or by one extra pass when that measurement came from the cache; with
    ``record_stats=False`` (windows that only judge candidates) the native pass still runs patched
    with the native policy, and records nothing.
    """

    def __init__(  # type: ignore[no-untyped-def]
        self,
        model,
        windows: torch.Tensor,
        batch_size: int,
        cache: dict[str, list[float]] | None = None,
        on_measure: Callable[[dict[str, list[float]]], None] | None = None,
        task: Task | None = None,
        keep_prefix: bool = True,
        key: str = "",
        record_stats: bool = True,
    ) -> None:
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.record_stats = record_stats
        self.key = key  # names these windows in the cache keys (other windows: other measurements)
        self.keep_prefix = keep_prefix  # record the native decoder outputs for replays
        self.cache = {} if cache is None else cache
        self.on_measure, self.task = on_measure, task
        self.history: list[dict[str, Any]] = []
        self._stats: RoutingStats | None = None
        self._prefix: _Prefix | None = None
        self._limit: int | None = None  # the windows of the measurement under way

    @property
    def stats(self) -> RoutingStats:
        if self._stats is None:
            self._stats = RoutingStats.record(self.model, self.windows[:, :-1], self.batch_size)
        return self._stats

    def __call__(
        self, policy: RoutingPolicy | None, *, windows: int | None = None, **note: Any
    ) -> tuple[float, float]:
        """Measure ``policy`` on every window, or on the first ``windows`` (whole batches, or fewer
        than one batch)."""
        if windows is not None and (windows < 1 or (windows > self.batch_size and windows % self.batch_size)):
            raise PolicyError(
                f"a measurement on part of the windows takes whole batches of {self.batch_size} or one "
                f"partial batch; got {windows}",
                field="windows",
            )
        key = measurement_key(policy) + (f"@{windows}" if windows is not None else "")
        key = f"{self.key}:{key}" if self.key else key
        if key in self.cache:
            reduction, mean = self.cache[key]
        else:
            self._limit = windows
            try:
                reduction, mean = self._measure(policy)
            finally:
                self._limit = None
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
                **({"windows": windows} if windows is not None else {}),
                **note,
            }
        )
        return reduction, mean

    def drop_prefix(self) -> None:
        """Free the recorded decoder outputs (later probes run every layer)."""
        self._prefix = None

    @property
    def probe(self) -> int | None:
        """Windows of a sensitivity probe: :data:`PROBE_FRACTION` of them, rounded to the nearest
        whole number of batches (at least one), or one partial batch when that fraction is less
        than a batch (``None``: too few windows to take part of them)."""
        exact = len(self.windows) * PROBE_FRACTION
        part = max(1, int(exact))
        if part > self.batch_size:  # whole batches, halves rounded up
            part = max(1, int(exact / self.batch_size + 0.5)) * self.batch_size
        return part if part < len(self.windows) else None

    @torch.inference_mode()
    def _measure(self, policy: RoutingPolicy | None) -> tuple[float, float]:
        total, count = 0.0, 0
        native = policy is None and self._stats is None and self._limit is None
        record = native and self.record_stats
        first = self._prefix.first_dynamic(policy) if self._prefix is not None else 0
        routing: Any = ExitStack()
        if native:  # the native pass: patched with the native policy (the same model outputs)
            routing.enter_context(patched(self.model, StaticTopK()))
        if record:  # it also records the routing statistics and the decoder outputs for replays
            layers = find_moe_layers(self.model)[0]
            stats = RoutingStats(layers)
            prefix = _Prefix(self.model, layers, PREFIX_BYTES if self.keep_prefix else 0)
            routing.enter_context(stats.recording(self.model))
            routing.enter_context(prefix.recording())
        elif policy is not None:
            routing.enter_context(patched(self.model, policy))
        if first:
            routing.enter_context(self._prefix.replaying(first))  # type: ignore[union-attr]
        with routing, profile(self.model, count_dense=False) as report:
            windows = self.windows[: self._limit]
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start : start + self.batch_size]  # (B, context + 1)
                logits = self.model(batch[:, :-1]).logits.float()  # (B, context, V)
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(nll)
                count += batch[:, 1:].numel()
        summary = report.to_dict()
        if record:
            self._stats = stats
            prefix.native_flops = {
                row["layer"]: (row["routed_flops"], row["native_routed_flops"]) for row in summary["layers"]
            }
            self._prefix = prefix
        if first:
            fraction = len(windows) / len(self.windows)
            return self._prefix.reduction(summary, first, fraction), total / count  # type: ignore[union-attr]
        return summary["routed_flop_reduction"], total / count


def _invert(predict: Callable[[float], float], aim: float, lo: float, hi: float) -> float:
    """The smallest ``x`` in ``[lo, hi]`` whose predicted reduction reaches ``aim`` (``hi`` if none)."""
    if predict(hi) < aim:
        return hi
    for _ in range(_INVERT_ITERATIONS):
        mid = (lo + hi) / 2
        if predict(mid) >= aim:
            hi = mid
        else:
            lo = mid
    return hi


def _search(  # type: ignore[no-untyped-def]
    measure: Callable[[float], tuple[float, float]],
    predict: Callable[[float], float],
    lo: float,
    hi: float,
    target: float,
    budget: int,
    bias: float = 0.0,
    margin: float = SEARCH_MARGIN,
    tolerance: float = SEARCH_TOLERANCE,
):
    """Find an ``x`` in ``[lo, hi]`` (reduction increasing in ``x``) whose measured reduction reaches
    ``target`` by at most ``tolerance``, in few model runs.

    ``predict(x)`` is the reduction on the native pass's routing statistics (no model run). The
    measured reduction is ``predict(x) + bias``, the bias read from the measurements made so far
    (interpolated between the nearest ones on both sides of the target, else the last one's); each
    probe aims at ``target + margin`` through it, inside the bracket the measurements leave.
    At most ``budget`` probes, then ``hi`` if none reached the target.

    Returns ``(x, reduction, nll, bias)`` of the probe with the lowest NLL among those that reached
    the target, or ``(None, reduction, nll, bias)`` of ``hi`` when even ``hi`` falls short.
    """
    below: tuple[float, float] | None = None  # (predicted, measured) of the best probe short of it
    above: tuple[float, float] | None = None  # ... and of the least one reaching it
    reached: list[tuple[float, float, float]] = []
    tried: set[float] = set()
    red = nll = float("nan")
    for _ in range(budget):
        x = _invert(predict, target + margin - bias, lo, hi)
        if x in tried:  # the bracket closed: nothing new to probe
            break
        tried.add(x)
        red, nll = measure(x)
        u = predict(x)
        if red >= target:
            reached.append((x, red, nll))
            hi, above = x, (u, red)
            if red - target <= tolerance:
                break
        else:
            if x >= hi:  # the most aggressive setting falls short
                return None, red, nll, bias
            lo, below = x, (u, red)
        if below is not None and above is not None and above[1] > below[1]:
            # the predicted reduction at which the measured one crosses the target, by interpolation
            u_star = below[0] + (target - below[1]) * (above[0] - below[0]) / (above[1] - below[1])
            bias = target - u_star
        else:
            bias = red - u
    if not reached:
        if hi in tried:
            return None, red, nll, bias
        red, nll = measure(hi)
        if red < target:
            return None, red, nll, bias
        reached.append((hi, red, nll))
    x, red, nll = min(reached, key=lambda r: r[2])
    return x, red, nll, bias


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
    iterations: int = 4,
    batch_size: int = 8,
    cache: dict[str, list[float]] | None = None,
    on_measure: Callable[[dict[str, list[float]]], None] | None = None,
    progress: Progress | None = None,
    families: Sequence[str] | None = None,
    training: Any = None,
    train_documents: Sequence[str] | None = None,
    learned_budget: str = "threshold",
) -> CalibrationResult:
    """Find the policy reaching ``target_reduction`` of routed-expert FLOPs with the least NLL increase.

    ``documents`` default to the Gutenberg valid split (tune on valid, report on test).

    ``iterations`` bounds the probes of one parameter search (one more run if none reached the
    target; most stop after one or two).

    No lost work: ``cache`` (a dict, filled in place) holds every measurement made, keyed by
    :func:`measurement_key`, and ``on_measure(cache)`` runs after each new one (``dmr calibrate``
    saves it to a partial-results file). Calibrating again with the same arguments and that cache
    replays the finished measurements; the model runs once, to record the routing statistics the
    searches read. ``progress`` draws a bar with an ETA (the step count is an upper bound: most
    searches stop early).

    ``families`` (default: all of :data:`FAMILIES`) limits the families tried when ``family`` is
    None; their candidates are compared on :func:`held_out_windows` of ``documents`` where there are
    enough (:attr:`CalibrationResult.selection` records it), else on the calibration windows. The
    learned family trains on ``train_documents`` (default: the Gutenberg train split) with
    ``training`` (an :class:`~dynamic_moe_router.AllocatorTraining`; its target is replaced by
    ``target_reduction``); its training is not cached (a resumed run trains again).
    ``learned_budget="quantile"`` gives the learned family the per-call quantile budget
    (:func:`dynamic_moe_router.learn.fit_quantile_budget`): its reduction then holds on any text, at
    the price of routing that depends on the other tokens of a call.
    """
    if not isinstance(target_reduction, (int, float)) or not 0.0 < target_reduction < 1.0:
        raise PolicyError(
            f"target_reduction must be in (0, 1), got {target_reduction!r}", field="target_reduction"
        )
    if learned_budget not in LEARNED_BUDGETS:
        raise PolicyError(
            f"learned_budget must be one of {list(LEARNED_BUDGETS)}, got {learned_budget!r}",
            field="learned_budget",
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
    documents = list(documents)  # read twice: the calibration and the held-out windows
    windows = calibration_windows(tokenizer, documents, tokens, context)
    held_out = held_out_windows(tokenizer, documents, tokens, context) if len(names) > 1 else None
    moe_layers = find_moe_layers(model)[0]
    layers = [layer.index for layer in moe_layers]
    knobs = [name for name in names if name in KNOBS]
    refine = per_layer and len(layers) > 1
    steps = 1 + len(knobs) * (1 + iterations)
    if refine:  # the refined families' sensitivity probes and two offset searches
        steps += min(len(knobs), REFINE_FAMILIES) * (len(layers) + 2 * (1 + iterations))
    if "static" in names:  # its base probe, probes (at most one per layer and k), a second measurement
        steps += 1 + (1 + sum(layer.native_k - 1 for layer in moe_layers) if refine else 0)
    steps += len(names) - len(knobs) + 3  # the static and learned measurements, the final search
    if held_out is not None:  # native, every family's candidate and a polished one on the held-out windows
        steps += 2 + len(names)
    bar = _task(progress, f"calibrating to {target_reduction:.0%} fewer routed FLOPs", steps)
    keep_prefix = refine and (bool(knobs) or "static" in names)
    meter = _Meter(model, windows, batch_size, cache, on_measure, bar, keep_prefix=keep_prefix)
    _, native_nll = meter(None, stage="native")

    candidates: list[CalibrationResult] = []
    reachable: dict[str, float] = {}
    if "learned" in names:
        learned = _calibrate_learned(
            model, tokenizer, target_reduction, documents, train_documents, training, context, progress,
            learned_budget,
        )  # fmt: skip
        red, nll = meter(learned, stage="learned", family="learned")
        reachable["learned"] = red
        if red >= target_reduction - LEARNED_TOLERANCE:  # its budget was fitted on other windows
            candidates.append(CalibrationResult(learned, "learned", red, nll, native_nll, True))
    #: a candidate's parameter search again, closer to the target: () -> result or None
    polishers: dict[int, tuple[CalibrationResult, Callable[[], CalibrationResult | None]]] = {}
    found: list[tuple[CalibrationResult, float, float]] = []  # (global result, theta, bias)
    for name in knobs:
        knob = KNOBS[name]
        theta, red, nll, bias = _search(
            lambda t, k=knob: meter(k.make(t), stage="global", family=k.name, theta=t),
            lambda t, k=knob: meter.stats.reduction(k.make(t)),
            knob.low, knob.high, target_reduction, iterations,
        )  # fmt: skip
        reachable[name] = red
        if theta is not None:
            result = CalibrationResult(knob.make(theta), name, red, nll, native_nll, False)
            found.append((result, theta, bias))
            polishers[id(result)] = result, partial(
                _polish,
                lambda t, k=knob: meter(k.make(t), stage="final", family=k.name, theta=t),
                lambda t, k=knob: meter.stats.reduction(k.make(t)),
                knob.low, theta, bias, target_reduction,
                lambda t, red, nll, k=knob: CalibrationResult(k.make(t), k.name, red, nll, native_nll, False),
            )  # fmt: skip
    if found and refine:
        lowest = min(result.nll_increase for result, _, _ in found)
        ranked = sorted(found, key=lambda f: f[0].nll_increase)
        leaders = {id(result) for result, _, _ in ranked[:REFINE_FAMILIES]}
        for result, theta, bias in found:
            if id(result) not in leaders or (lowest > 0 and result.nll_increase > REFINE_WITHIN * lowest):
                meter.history.append(
                    {
                        "policy": result.policy.describe(),
                        "reduction": result.reduction,
                        "nll": result.nll,
                        "stage": "per_layer_skipped",  # not a model run: the global result again
                        "family": result.family,
                    }
                )
                # not among the REFINE_FAMILIES best global results, or far behind the best: kept
                # as its global result, unrefined
                candidates.append(result)
                continue
            knob = KNOBS[result.family]
            refined = _refine_per_layer(
                meter, knob, theta, bias, layers, target_reduction, native_nll, result, iterations, polishers
            )
            candidates.append(refined)
    else:
        candidates += [result for result, _, _ in found]
    if "static" in names:
        static = _calibrate_static(meter, moe_layers, target_reduction, native_nll, refine)
        reachable["static"] = static.reduction
        if static.reduction >= target_reduction - 1e-9:  # measured, as every candidate
            candidates.append(static)
    meter.drop_prefix()  # only the sensitivity probes replay it
    if not candidates:
        best_seen = ", ".join(
            f"{k}: {v:.1%}{' (its fitted budget, measured here)' if k == 'learned' else ''}"
            for k, v in reachable.items()
        )
        raise TargetUnreachableError(
            f"no policy family reaches a {target_reduction:.1%} routed-FLOP reduction on this model "
            f"(most aggressive setting of each: {best_seen}); lower the target"
        )
    result = min(candidates, key=lambda c: c.nll)
    selection: dict[str, Any] | None = None
    judge = None
    if len(candidates) > 1 and held_out is None:
        selection = {"windows": 0}  # too little unseen text: chosen on the calibration windows
    elif len(candidates) > 1 and held_out is not None:  # choose on text that no family was fitted on
        judge = _Meter(
            model, held_out, batch_size, cache, on_measure, bar, keep_prefix=False, key="held_out",
            record_stats=False,
        )  # fmt: skip
        _, held_native = judge(None, stage="held_out_native")
        scores = {id(c): judge(c.policy, stage="held_out", family=c.family) for c in candidates}
        eligible = [c for c in candidates if _saves(scores[id(c)][0], target_reduction)]
        result = (
            min(eligible, key=lambda c: scores[id(c)][1])
            if eligible  # a family that saves less on the held-out text must not win by it
            else max(candidates, key=lambda c: scores[id(c)][0])  # none does: the one that saves most
        )
        selection = {
            "windows": len(held_out),
            "native_nll": held_native,
            "nll": {c.family: scores[id(c)][1] for c in candidates},
            "reduction": {c.family: scores[id(c)][0] for c in candidates},
            "eligible": [c.family for c in eligible],
        }
    entry = polishers.get(id(result))
    if entry is not None and entry[0] is result and result.reduction - target_reduction > FINAL_TOLERANCE:
        closer = entry[1]()  # the winner's search once more, aiming closer to the target
        if closer is not None and closer.nll < result.nll:
            if judge is None:
                result = closer
            else:  # kept only if it holds on the held-out windows too
                red, nll = judge(closer.policy, stage="held_out", family=closer.family, polished=True)
                held = selection or {}
                if nll <= held["nll"][result.family] and _saves(red, target_reduction):
                    result = closer
                    held["polished"] = {"nll": nll, "reduction": red}
    if judge is not None:
        meter.history += judge.history
    bar.finish()
    result.history = meter.history
    result.selection = selection
    return result


def _saves(reduction: float, target: float) -> bool:
    """Whether a held-out reduction reaches ``target`` within :data:`SELECT_TOLERANCE`."""
    return reduction >= target - SELECT_TOLERANCE


def _polish(  # type: ignore[no-untyped-def]
    measure, predict, lo: float, x: float, bias: float, target: float, make
) -> CalibrationResult | None:
    """Search ``[lo, x]`` again (``x`` reached the target) for a point past the target by at most
    :data:`FINAL_TOLERANCE`; ``make(x, reduction, nll)`` builds its result."""
    found, red, nll, _ = _search(measure, predict, lo, x, target, 2, bias, FINAL_MARGIN, FINAL_TOLERANCE)
    return None if found is None else make(found, red, nll)


def _calibrate_learned(  # type: ignore[no-untyped-def]
    model,
    tokenizer,
    target: float,
    documents,
    train_documents,
    training,
    context: int,
    progress,
    budget_kind: str = "threshold",
) -> RoutingPolicy:
    """Train a learned allocator (train split) and fit its budget on spread calibration windows
    (``budget_kind``: the threshold offset, or the per-call quantile budget)."""
    from dataclasses import replace

    from .learn import AllocatorTraining, allocator_windows, fit_quantile_budget, train_allocator

    if train_documents is None:
        from .data import data_file, read_jsonl

        train_documents = (r["text"] for r in read_jsonl(data_file("gutenberg/train.jsonl.xz")))
    config = replace(training or AllocatorTraining(), target_reduction=target)
    train = allocator_windows(tokenizer, train_documents, "train", context=context)
    budget = allocator_windows(tokenizer, documents, "budget", context=context)
    policy = train_allocator(model, train, budget, config, progress=progress)
    if budget_kind == "quantile":
        # train_allocator fitted the threshold offset (used by decode steps) on these windows already
        policy, _ = fit_quantile_budget(model, policy, budget, target, refit_offset=False)
    return policy


def _calibrate_static(  # type: ignore[no-untyped-def]
    meter, moe_layers, target: float, native_nll: float, per_layer: bool
) -> CalibrationResult:
    """Static top-k reaching ``target`` fewer routed FLOPs: per layer (``per_layer``), one slot at a
    time from the layer whose probe (that layer alone at its next ``k``, every other layer native, on
    :attr:`_Meter.probe` windows) raises the NLL least, the probes' costs taken as additive; else the
    smallest uniform cut (clamped at ``k = 1`` per layer). Slots are taken until the reduction on the
    recorded router scores (:meth:`RoutingStats.reduction`: FLOPs, so zero-computation experts and
    per-layer expert sizes count as they run) reaches the target, then the allocation is measured on
    every window; a measurement short of the target (later layers' inputs drift) takes one more slot
    and measures again. Where even ``k = 1`` everywhere falls short, that allocation is returned (its
    reduction says so)."""
    native = {layer.index: layer.native_k for layer in moe_layers}  # {layer: k}

    def policy_of(k: dict[int, int]) -> RoutingPolicy:
        if not per_layer and len(set(k.values())) == 1:  # one k everywhere: a plain global policy
            return StaticTopK(k=next(iter(k.values())))
        # every MoE layer has its override: no default, as for the per-layer score policies
        return PerLayer(None, {i: StaticTopK(k=v) for i, v in k.items()})

    def short(k: dict[int, int]) -> bool:
        return meter.stats.reduction(policy_of(k)) < target - 1e-9

    if not per_layer:
        cuts = range(1, max(native.values()))  # the same cut in every layer, clamped at k = 1

        def uniform(cut: int) -> dict[int, int]:
            return {i: max(1, v - cut) for i, v in native.items()}

        cut = next((c for c in cuts if not short(uniform(c))), cuts[-1] if cuts else 0)
        while True:
            red, nll = meter(policy_of(uniform(cut)), stage="static", family="static")
            if red >= target - 1e-9 or cut + 1 not in cuts:
                return CalibrationResult(policy_of(uniform(cut)), "static", red, nll, native_nll, False)
            cut += 1

    _, base = meter(None, windows=meter.probe, stage="static_probe", family="static")
    probed: dict[tuple[int, int], float] = {}  # (layer, k) -> probe NLL of that layer alone at k
    k = dict(native)

    def take_cheapest() -> None:
        cost = {}
        for i in (i for i in k if k[i] > 1):
            if (i, k[i] - 1) not in probed:
                alone = PerLayer(StaticTopK(), {i: StaticTopK(k=k[i] - 1)})
                _, probed[i, k[i] - 1] = meter(
                    alone, windows=meter.probe, stage="static_probe", family="static", layer=i, k=k[i] - 1
                )
            now = probed[i, k[i]] if (i, k[i]) in probed else float(base)  # native: the base probe
            cost[i] = probed[i, k[i] - 1] - now  # what this layer's next slot costs
        k[min(cost, key=cost.__getitem__)] -= 1

    def room() -> bool:
        return any(v > 1 for v in k.values())

    while room() and short(k):
        take_cheapest()
    while True:
        red, nll = meter(policy_of(k), stage="static", family="static")
        if red >= target - 1e-9 or not room():
            return CalibrationResult(policy_of(k), "static", red, nll, native_nll, True)
        take_cheapest()


def _refine_per_layer(meter, knob, theta, bias, layers, target, native_nll, best, iterations, polishers):  # type: ignore[no-untyped-def]
    sensitivity = []
    for layer in layers:
        alone = PerLayer(StaticTopK(), {layer: knob.make(theta)})  # every other layer native
        # on part of the windows: only the differences between layers matter here
        _, nll = meter(alone, windows=meter.probe, stage="sensitivity", layer=layer)
        sensitivity.append(nll - native_nll)
    mean = statistics.fmean(sensitivity)
    spread = statistics.pstdev(sensitivity) or 1.0
    z = [(mean - s) / spread for s in sensitivity]  # > 0: less sensitive than average

    def make(lam: float, offset: float) -> RoutingPolicy:
        thetas = [min(knob.high, max(knob.low, theta + lam * 0.1 * zl + offset)) for zl in z]
        # every MoE layer has its override, so the policy carries no default: patching a model
        # with other MoE layers raises a PolicyError naming them instead of routing them natively
        return PerLayer(None, {layer: knob.make(t) for layer, t in zip(layers, thetas, strict=True)})

    lam, global_nll, start_bias = 1.0, best.nll, bias
    for step in range(2):  # strength 1, then 2 if it helped, else 0.5
        offset, red, nll, found_bias = _search(
            lambda o, lam=lam: meter(make(lam, o), stage="per_layer", family=knob.name, lam=lam, offset=o),
            lambda o, lam=lam: meter.stats.reduction(make(lam, o)),
            -0.3, 0.3, target, iterations, start_bias,
        )  # fmt: skip
        if offset is not None and nll < best.nll:
            best = CalibrationResult(make(lam, offset), knob.name, red, nll, native_nll, True)
            polishers[id(best)] = best, partial(
                _polish,
                lambda o, lam=lam: meter(make(lam, o), stage="final", family=knob.name, lam=lam, offset=o),
                lambda o, lam=lam: meter.stats.reduction(make(lam, o)),
                -0.3, offset, found_bias, target,
                lambda o, red, nll, lam=lam: CalibrationResult(make(lam, o), knob.name, red, nll, native_nll, True),  # noqa: E501
            )  # fmt: skip
        if step == 0:
            lam = 2.0 if offset is not None and nll < global_nll else 0.5
            start_bias = found_bias
    return best
