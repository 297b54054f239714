"""Distil a :class:`~dynamic_moe_router.LearnedAllocator` on a frozen model, then fit its budget.

Training (the model's own weights never change; their ``requires_grad`` flags and train/eval mode
are restored afterwards):

* the model is patched with trainable heads; every step runs the native model (the teacher) and
  the patched one on a batch of windows;
* loss = KL(native || dynamic) of the next-token distributions, per token, plus
  ``lambda * (kept-pair fraction)``; ``lambda`` rises by dual ascent while the batch's hard
  reduction is below the target, so it settles where the budget holds;
* masks are straight-through Bernoulli: logistic noise on the keep-logits, a hard 0/1 mask forward,
  the sigmoid's gradient backward; the experts compute every ranked slot during training, so the
  gradient of the loss with respect to each slot's mask is pathwise (no reinforcement learning).

Budget: :func:`fit_budget` bisects one global logit offset so that the routed-FLOP reduction measured
by the library's own pair counters lands on the target on budget text (tune on valid, not test).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .._progress import Progress, task
from .._version import __version__
from ..errors import PolicyError, TargetUnreachableError
from ..hf.layers import experts_inputs, find_moe_layers, model_family, unwrap
from ..hf.patching import patched
from ..policies import RoutingPolicy
from ..policies.learned import LearnedAllocator, allocator_logits, check_reachable
from .measure import WindowScore, score_windows

__all__ = [
    "AllocatorTraining",
    "expert_means",
    "fit_budget",
    "fit_quantile_budget",
    "train_allocator",
    "train_means",
]


#: the learning-rate factor at step ``s`` of ``n`` (``s`` from 0) for each ``lr_schedule``
LR_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda s, n: 1.0,
    "linear": lambda s, n: 1.0 - s / n,
    "cosine": lambda s, n: 0.5 * (1.0 + math.cos(math.pi * s / n)),
}


@dataclass(frozen=True)
class AllocatorTraining:
    """How :func:`train_allocator` trains (the defaults train the reference models in about 7 minutes
    on 2 CPU cores).

    Attributes:
        target_reduction: routed-FLOP reduction the budget term aims at (and the offset is fit to).
        k_max: ranked slots a head chooses among; ``None`` = the native k (more let hard tokens take
            extra experts; on the reference models that bought nothing, see ORACLE_NOTES.md).
        steps: optimiser steps.
        batch_windows: windows per step.
        lr: Adam learning rate of the heads.
        lambda_lr: dual-ascent rate of the budget multiplier.
        seed: seeds the batch order and the mask noise.
        offset_iterations: bisection steps of :func:`fit_budget` after training.
        noise_final: scale of the logistic mask noise at the last step (it falls linearly from 1):
            less noise late in training trains the heads for the deterministic masks of inference.
        compensation: replace each dropped native slot by its expert's mean output on the training
            windows (weighted by the slot's native weight); trained with it on.
        means_windows: training windows the compensation means are computed on.
        learn_means: train the compensation vectors too (with ``compensation``): they start at the
            experts' mean outputs and follow the same distillation loss, so a dropped slot is replaced
            by the vector that best stands in for it under the learned masks; the policy's size and
            FLOPs do not change. Set ``False`` for the plain means.
        means_lr: Adam learning rate of the compensation vectors (with ``learn_means``).
        lr_schedule: how the Adam rates (``lr`` and ``means_lr``; ``means_lr`` alone in
            :func:`train_means`) move over the steps: ``"constant"``, ``"linear"`` (falls linearly
            to ``1 / steps`` of the rate at the last step) or ``"cosine"`` (half a cosine down to
            almost 0). The budget multiplier's rate does not change.
    """

    target_reduction: float = 0.35
    k_max: int | None = None
    steps: int = 400
    batch_windows: int = 4
    lr: float = 3e-3
    lambda_lr: float = 0.1
    seed: int = 0
    offset_iterations: int = 10
    noise_final: float = 1.0
    compensation: bool = True
    means_windows: int = 64
    learn_means: bool = True
    means_lr: float = 1e-2
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        t = self.target_reduction
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
            raise PolicyError(f"target_reduction must be in (0, 1), got {t!r}", field="target_reduction")
        for name in ("compensation", "learn_means"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"{name} must be True or False, got {getattr(self, name)!r}", field=name)
        checks = (
            ("steps", 1),
            ("batch_windows", 1),
            ("seed", 0),
            ("offset_iterations", 1),
            ("means_windows", 1),
        )
        for name, minimum in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise PolicyError(f"{name} must be an integer >= {minimum}, got {value!r}", field=name)
        if self.k_max is not None and (
            isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or self.k_max < 1
        ):
            raise PolicyError(f"k_max must be None or an integer >= 1, got {self.k_max!r}", field="k_max")
        if self.compensation and self.k_max is not None:
            raise PolicyError(
                "compensation replaces dropped native slots, so k_max must be None (the native k); pass "
                "compensation=False to train heads with extra slots",
                field="k_max",
            )
        if not isinstance(self.lr_schedule, str) or self.lr_schedule not in LR_SCHEDULES:
            raise PolicyError(
                f"lr_schedule must be one of {', '.join(map(repr, LR_SCHEDULES))}, got {self.lr_schedule!r}",
                field="lr_schedule",
            )
        n = self.noise_final
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0.0 <= n <= 1.0:
            raise PolicyError(f"noise_final must be in [0, 1], got {n!r}", field="noise_final")
        for name in ("lr", "lambda_lr", "means_lr"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (value > 0 and math.isfinite(value))
            ):
                raise PolicyError(f"{name} must be a positive number, got {value!r}", field=name)


class _TrainableHeads(RoutingPolicy):
    """The heads during training: a keep-mask policy whose masks carry a straight-through gradient."""

    reads_router_input = True
    type_name = "learned (training)"

    def __init__(self, template: LearnedAllocator, seed: int, learn_means: bool = False) -> None:
        assert template.params is not None
        self.template = template
        self.weight = torch.nn.Parameter(template.params["weight"].clone())  # (L, k_max, D)
        self.bias = torch.nn.Parameter(template.params["bias"].clone())  # (L, k_max)
        self.means: torch.nn.Parameter | None = None  # (L, E, H) when the compensation is trained too
        if learn_means and template.compensation:
            self.means = torch.nn.Parameter(template.params["means"].clone())
        self.frozen = False  # True: the template's own (deterministic) masks; only the means train
        self.rows = {layer: row for row, layer in enumerate(template.moe_layers)}
        self.native = False  # True: keep exactly the native top-k (the teacher)
        self.noise = 1.0  # scale of the logistic noise
        self.soft: list[torch.Tensor] = []  # per layer: mean soft kept slots per token
        self.hard: list[float] = []  # per layer: mean hard kept slots per token
        self.generator = torch.Generator().manual_seed(seed)

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        return self.template.k_range(native_k, num_experts)

    @property
    def compensated(self) -> bool:
        return self.template.compensated and not self.native

    def layer_means(self, layer: int, device: Any) -> torch.Tensor:
        if self.means is not None:
            return self.means[self.rows[layer]].to(device)
        return self.template.layer_means(layer, device)

    def check_model(self, family: str, layers: Any) -> None:
        self.template.check_model(family, layers)

    def describe(self) -> str:
        return "learned (training)"

    def keep_mask(
        self, h: torch.Tensor, ranked_probs: torch.Tensor, probs: torch.Tensor, layer: int
    ) -> torch.Tensor:
        k_max, native_k = self.template.k_max, self.template.native_k
        if self.native:
            return (torch.arange(k_max, device=h.device) < native_k).expand(h.shape[0], k_max)
        if self.frozen:
            return self.template.keep_mask(h, ranked_probs, probs, layer).float()
        row = self.rows[layer]
        w, b = self.weight[row].to(h.device), self.bias[row].to(h.device)
        z = allocator_logits(w, b, h, ranked_probs, probs)  # (T, k_max)
        u = torch.rand(z.shape, generator=self.generator).to(z.device).clamp(1e-6, 1 - 1e-6)
        z = z + self.noise * (u.log() - (-u).log1p())  # logistic noise: a Bernoulli sample
        soft = torch.sigmoid(z)
        hard = (z > 0).float()
        first = torch.zeros_like(hard)
        first[:, 0] = 1.0
        hard = torch.where(hard.sum(-1, keepdim=True) == 0, first, hard)  # at least the top slot
        self.soft.append(soft.sum(-1).mean())
        self.hard.append(float(hard.sum(-1).mean()))
        return hard + soft - soft.detach()

    def export(self, offset: float, record: dict[str, Any]) -> LearnedAllocator:
        params = {"weight": self.weight.detach().cpu().clone(), "bias": self.bias.detach().cpu().clone()}
        t = self.template
        if self.means is not None:
            params["means"] = self.means.detach().cpu().clone()
        elif t.compensation:
            assert t.params is not None
            params["means"] = t.params["means"]
        return LearnedAllocator(
            family=t.family, moe_layers=t.moe_layers, hidden_size=t.hidden_size, num_experts=t.num_experts,
            native_k=t.native_k, k_max=t.k_max, offset=offset, compensation=t.compensation, params=params,
            record=record,
        )  # fmt: skip


def _check_windows(name: str, windows: Any) -> torch.Tensor:
    if (
        not isinstance(windows, torch.Tensor)
        or windows.dim() != 2
        or windows.dtype != torch.long
        or windows.shape[1] < 2
    ):
        raise PolicyError(
            f"{name} must be an int64 tensor (N, context + 1) of token ids (see dmr.learn.spread_windows), "
            f"got {getattr(windows, 'shape', type(windows).__name__)}",
            field=name,
        )
    if windows.shape[0] == 0:
        raise PolicyError(f"{name} holds no window", field=name)
    return windows


@torch.no_grad()
def expert_means(model: Any, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """``(L, E, H)`` fp32: each MoE layer's per-expert mean (unweighted) output over the tokens the
    native routing sends to it on ``windows`` (zero for an expert that gets none): the compensation
    values of a dropped slot.

    Example:
        >>> import torch
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> from dynamic_moe_router.learn import expert_means
        >>> expert_means(tiny_model("olmoe"), torch.randint(0, 64, (2, 9))).shape  # 2 layers, 8 experts, H 32
        torch.Size([2, 8, 32])
    """
    from ..experts._forward import _expert_mlp
    from ..hf.families import get_family

    windows = _check_windows("windows", windows)
    root = unwrap(model)
    family = model_family(root)
    layout = get_family(family.model_type).layout
    layers = find_moe_layers(root, family)[0]
    device = next(root.parameters()).device
    sums = torch.zeros(len(layers), layers[0].num_experts, layers[0].hidden_size, device=device)
    counts = torch.zeros(len(layers), layers[0].num_experts, device=device)

    def hook(row: int, layer: Any):  # type: ignore[no-untyped-def]
        def capture(module: Any, args: Any, kwargs: Any) -> None:
            hidden, ids = experts_inputs(args, kwargs)  # (T, H), (T, k)
            flat = ids.reshape(-1)  # (T * k,)
            tokens = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
            for e in torch.unique(flat[flat < layer.num_experts]).tolist():
                rows = tokens[flat == e]
                y = _expert_mlp(module, e, hidden[rows], layout).float()  # (n, H)
                sums[row, e] += y.sum(0)
                counts[row, e] += rows.numel()

        return capture

    was_training = root.training
    root.eval()
    handles = [
        layer.experts.register_forward_pre_hook(hook(row, layer), with_kwargs=True)
        for row, layer in enumerate(layers)
    ]
    try:
        with patched(model, validate=False):
            for start in range(0, len(windows), batch_size):
                model(windows[start : start + batch_size, :-1].to(device))
    finally:
        for handle in handles:
            handle.remove()
        root.train(was_training)
    return (sums / counts.clamp_min(1).unsqueeze(-1)).cpu()


def fit_budget(
    model: Any,
    policy: LearnedAllocator,
    windows: torch.Tensor,
    target_reduction: float,
    *,
    iterations: int = 10,
    batch_size: int = 8,
    bracket: tuple[float, float] = (-8.0, 8.0),
    on_step: Callable[[], None] | None = None,
) -> tuple[LearnedAllocator, float]:
    """Bisect the global logit offset so that the reduction on ``windows`` lands on the target.

    Returns the policy with the probed offset whose reduction is the least that reaches the target
    (the most aggressive one probed when none does), and that reduction.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> from dynamic_moe_router.learn import fit_budget
        >>> model = tiny_model("olmoe")
        >>> windows = torch.randint(0, 64, (4, 17))
        >>> heads = dmr.LearnedAllocator.keep_native(model)  # equal logits: keep 4 of 4 slots, or 1
        >>> pol, red = fit_budget(model, heads, windows, 0.6, iterations=6)
        >>> red, pol.offset <= -4.0
        (0.75, True)
    """
    fitted, score = _fit_budget(
        model, policy, windows, target_reduction,
        iterations=iterations, batch_size=batch_size, bracket=bracket, on_step=on_step,
    )  # fmt: skip
    return fitted, score.reduction


def _check_target(policy: LearnedAllocator, target_reduction: Any) -> None:
    if (
        isinstance(target_reduction, bool)
        or not isinstance(target_reduction, (int, float))
        or not 0.0 < float(target_reduction) < 1.0
    ):
        raise PolicyError(
            f"target_reduction must be in (0, 1), got {target_reduction!r}", field="target_reduction"
        )
    check_reachable(policy.native_k, float(target_reduction))


def _fit_budget(
    model: Any,
    policy: LearnedAllocator,
    windows: torch.Tensor,
    target_reduction: float,
    *,
    iterations: int,
    batch_size: int,
    bracket: tuple[float, float] = (-8.0, 8.0),
    on_step: Callable[[], None] | None = None,
) -> tuple[LearnedAllocator, WindowScore]:
    """:func:`fit_budget`, returning the chosen offset's measurement (its NLL and per-layer shares)."""
    windows = _check_windows("windows", windows)
    _check_target(policy, target_reduction)
    lo, hi = bracket  # a larger offset keeps more slots
    best: tuple[float, WindowScore] | None = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        score = score_windows(model, policy.with_offset(mid), windows, batch_size)
        red = score.reduction
        if on_step is not None:
            on_step()
        # the least reduction that reaches the target; the largest one while none does
        best_red = best[1].reduction if best is not None else 0.0
        reaches, best_reaches = red >= target_reduction, best is not None and best_red >= target_reduction
        if (
            best is None
            or (reaches and (not best_reaches or red < best_red))
            or (not best_reaches and red > best_red)
        ):
            best = (mid, score)
        if red > target_reduction:
            lo = mid
        else:
            hi = mid
    assert best is not None
    if best[1].reduction < target_reduction - 0.01:
        raise TargetUnreachableError(
            f"learned: the largest reduction probed is {best[1].reduction:.1%} (offset {best[0]:+.3g}), "
            f"short of the {target_reduction:.1%} target; lower the target or widen the bracket {bracket}"
        )
    return policy.with_offset(best[0]), best[1]


#: how :func:`fit_quantile_budget` spreads the kept pairs over the MoE layers
LAYER_SHARES = ("best", "threshold", "uniform")


def fit_quantile_budget(
    model: Any,
    policy: LearnedAllocator,
    windows: torch.Tensor,
    target_reduction: float,
    *,
    layer_shares: str = "best",
    min_tokens: int = 64,
    refit_offset: bool = True,
    iterations: int = 10,
    batch_size: int = 8,
) -> tuple[LearnedAllocator, float]:
    """The quantile budget at ``target_reduction``, fitted on ``windows`` (calibration text).

    Every call of at least ``min_tokens`` tokens keeps exactly ``1 - target_reduction`` of its
    native pairs on any text (see :meth:`~dynamic_moe_router.LearnedAllocator.with_quantile_budget`);
    shorter calls (decoding) use the threshold offset that :func:`fit_budget` lands on the target
    (``refit_offset=False``: the policy's offset is already fitted for this target on these
    windows, as :func:`train_allocator` returns it, and is kept). ``layer_shares`` spreads the kept
    pairs over the MoE layers:

    * ``"threshold"``: each layer keeps the share the threshold budget gives it on ``windows``;
    * ``"uniform"``: every layer keeps the same share;
    * ``"best"`` (default): whichever of the two has the lower NLL on ``windows`` (on the reference
      models, the threshold shares at every committed target; ref-mixtral's 50% is one slot per token
      in every layer, the floor).

    Returns the policy and its reduction on ``windows``.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> from dynamic_moe_router.learn import fit_quantile_budget
        >>> model = tiny_model("olmoe")  # native k 4, 2 MoE layers
        >>> heads = dmr.LearnedAllocator.keep_native(model)
        >>> pol, red = fit_quantile_budget(model, heads, torch.randint(0, 64, (4, 17)), 0.5, min_tokens=8)
        >>> pol.budget, round(red, 6)
        ('quantile', 0.5)
    """
    if layer_shares not in LAYER_SHARES:
        raise PolicyError(
            f"layer_shares must be one of {list(LAYER_SHARES)}, got {layer_shares!r}", field="layer_shares"
        )
    windows = _check_windows("windows", windows)
    threshold = policy.with_threshold_budget()
    if refit_offset:
        fitted, measured = _fit_budget(
            model, threshold, windows, target_reduction, iterations=iterations, batch_size=batch_size
        )
    else:
        _check_target(policy, target_reduction)
        fitted = threshold
        measured = score_windows(model, fitted, windows, batch_size) if layer_shares != "uniform" else None
    candidates = []
    if layer_shares in ("best", "uniform"):
        candidates.append(fitted.with_quantile_budget(target_reduction, min_tokens))
    if measured is not None and layer_shares in ("best", "threshold"):
        share = measured.layer_keep()  # each layer's kept share under the threshold budget
        layer_keep = [max(share[i], 1e-6) for i in fitted.moe_layers]
        candidates.append(fitted.with_quantile_budget(target_reduction, min_tokens, layer_keep=layer_keep))
    scored = [(score_windows(model, cand, windows, batch_size), cand) for cand in candidates]
    score, best = min(scored, key=lambda s: s[0].mean_nll)
    return best, score.reduction


@contextmanager
def _frozen(root: Any) -> Iterator[None]:
    """The model's weights frozen and in eval mode; their ``requires_grad`` flags and train/eval mode
    restored afterwards."""
    params = list(root.parameters())
    saved_flags = [p.requires_grad for p in params]
    was_training = root.training
    try:
        for p in params:
            p.requires_grad_(False)
        root.eval()
        yield
    finally:
        for p, flag in zip(params, saved_flags, strict=True):
            p.requires_grad_(flag)
        root.train(was_training)


@contextmanager
def _reproducible(root: Any) -> Iterator[None]:
    """With every parameter of ``root`` on a CPU, torch's deterministic algorithms for the block (the
    caller's setting, ``warn_only`` included, restored after, also on an error).

    Without them the backward's accumulating ``index_put_`` (the gradient of the compensation means'
    gather) sums in thread order, so two trainings with the same seed, data and thread count
    differed in the 7th digit. It costs no time on 2 cores (one training step of 8 windows 1.71 ->
    1.66 s, same process). A model with any parameter on a GPU is left as it is: deterministic mode
    is process-wide, and there it needs ``CUBLAS_WORKSPACE_CONFIG`` and refuses ops without a
    deterministic kernel.
    """
    if any(p.device.type != "cpu" for p in root.parameters()):
        yield
        return
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only and was)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


#: rows (tokens) per chunk of :class:`_ChunkedKL` on a CPU: a chunk's few ``(rows, V)`` fp32 temporaries
#: stay in cache (32 rows of a vocabulary of 8192 are 1 MiB each; 16 to 128 rows timed alike on 2 cores)
_KL_CHUNK_ROWS = 32
#: rows per chunk on a GPU, where each chunk costs a few kernel launches and the cache matters less
_KL_CHUNK_ROWS_GPU = 4096


class _ChunkedKL(torch.autograd.Function):
    """Mean per-token KL(softmax(teacher) || softmax(student)) of ``(..., V)`` logits, in fp32.

    The value and the gradient of ``(p * (log p - log q)).sum(-1).mean()`` (``p``, ``q`` the
    softmaxes of the teacher and the student), computed a chunk of rows at a time so that the
    full-vocabulary temporaries never leave the cache; the forward writes the gradient with respect
    to the student logits, ``(q - p) / N``, and keeps only it (the backward scales it in place, so
    it runs once). The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        shape = student.shape
        if teacher.shape != shape:
            got = f"{tuple(teacher.shape)} differ from the student's {tuple(shape)}"
            raise ValueError(f"teacher logits {got}")
        vocab = shape[-1]
        teacher = teacher.detach().float().reshape(-1, vocab)  # (N, V)
        student = student.detach().float().reshape(-1, vocab)  # (N, V)
        n = student.shape[0]
        rows = _KL_CHUNK_ROWS if student.device.type == "cpu" else _KL_CHUNK_ROWS_GPU
        grad = torch.empty_like(student)  # (N, V): d mean KL / d student logits
        kl = torch.empty(n, dtype=student.dtype, device=student.device)  # (N,)
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            t, s = teacher[lo:hi], student[lo:hi]  # (c, V)
            # softmax rather than exp(log_softmax): aten::exp is ~10x slower where the result is
            # subnormal, as it is for many tokens of a trained model's vocabulary
            p, q = torch.softmax(t, -1), torch.softmax(s, -1)  # (c, V)
            log_ratio = torch.log_softmax(t, -1).sub_(torch.log_softmax(s, -1))  # (c, V) log p - log q
            kl[lo:hi] = log_ratio.mul_(p).sum(-1)  # (c,)
            torch.sub(q, p, out=grad[lo:hi]).div_(n)  # (c, V) (q - p) / N
        ctx.grad, ctx.shape = grad, shape  # not save_for_backward: the backward scales it in place
        return kl.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, torch.Tensor]:
        grad, ctx.grad = ctx.grad, None  # (N, V); scaled in place: no second (N, V) tensor per step
        if grad is None:
            raise RuntimeError("the distillation KL's backward ran twice; it keeps no graph to retain")
        return None, grad.mul_(grad_output).reshape(ctx.shape)  # (..., V)


def _distil_kl(model: Any, heads: _TrainableHeads, batch: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(native || dynamic) of the next-token distributions on ``batch (B, T + 1)``
    (the model is patched with ``heads``; the native pass is the teacher)."""
    heads.native = True
    with torch.no_grad():
        teacher = model(batch[:, :-1]).logits.float()  # (B, T, V)
    heads.native = False
    student = model(batch[:, :-1]).logits.float()  # (B, T, V)
    return _ChunkedKL.apply(teacher, student)


def _lr_scheduler(opt: torch.optim.Optimizer, config: AllocatorTraining) -> Any:
    """``config.lr_schedule`` over ``config.steps`` for every group of ``opt`` (step it after each
    ``opt.step()``: step ``s`` then runs at the factor for ``s``)."""
    factor = LR_SCHEDULES[config.lr_schedule]
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor(s, config.steps))


def train_means(
    model: Any,
    policy: LearnedAllocator,
    train_windows: torch.Tensor,
    config: AllocatorTraining | None = None,
    *,
    progress: Progress | None = None,
) -> LearnedAllocator:
    """Train only the compensation vectors of ``policy`` (its heads and offset stay as they are) by
    the distillation loss of :func:`train_allocator`, with ``config``'s ``steps``, ``batch_windows``,
    ``means_lr``, ``lr_schedule`` and ``seed``; a policy without compensation first gets the
    experts' mean outputs (:func:`expert_means` on ``config.means_windows`` windows).

    It gives a fixed allocation (for example static per-layer top-k, :meth:`LearnedAllocator.fixed`)
    the same trained compensation a learned allocator gets, so that the two compare fairly.

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> from dynamic_moe_router.learn import train_means
        >>> model = tiny_model("olmoe")
        >>> static = dmr.LearnedAllocator.fixed(model, [2, 3])  # keep 2 and 3 of the native 4 slots
        >>> cfg = dmr.AllocatorTraining(steps=2, batch_windows=2, means_windows=2)
        >>> tuned = train_means(model, static, torch.randint(0, 64, (4, 17)), cfg)
        >>> tuned.compensation, tuned.params["means"].shape, tuned.record["means_steps"]
        (True, torch.Size([2, 8, 32]), 2)
    """
    config = AllocatorTraining() if config is None else config
    train_windows = _check_windows("train_windows", train_windows)
    if not isinstance(policy, LearnedAllocator):
        raise PolicyError(
            f"train_means trains a LearnedAllocator's compensation, got {type(policy).__name__}",
            field="policy",
        )
    root = unwrap(model)
    policy.check_model(model_family(root).model_type, find_moe_layers(root, model_family(root))[0])
    if not policy.compensation:
        policy = policy.with_means(expert_means(model, train_windows[: config.means_windows]))
    heads = _TrainableHeads(policy, config.seed, learn_means=True)
    heads.frozen = True
    assert heads.means is not None
    device = next(root.parameters()).device
    bar = task(progress, "training compensation", config.steps)
    start = time.perf_counter()
    history: list[dict[str, float]] = []
    with _frozen(root), _reproducible(root):
        opt = torch.optim.Adam([heads.means], lr=config.means_lr)
        sched = _lr_scheduler(opt, config)
        order = torch.Generator().manual_seed(config.seed)
        with patched(model, heads, validate=False):
            for step in range(config.steps):
                pick = torch.randint(0, len(train_windows), (config.batch_windows,), generator=order)
                kl = _distil_kl(model, heads, train_windows[pick].to(device))
                opt.zero_grad()
                kl.backward()
                opt.step()
                sched.step()
                if step % 10 == 0 or step == config.steps - 1:
                    history.append({"step": step, "kl": float(kl.detach())})
                bar.advance()
        deterministic = torch.are_deterministic_algorithms_enabled()
    bar.finish()
    record = {
        **dict(policy.record or {}),
        "means_steps": config.steps,
        "means_lr": config.means_lr,
        "means_lr_schedule": config.lr_schedule,
        "means_seconds": time.perf_counter() - start,
        "means_history": history,
        "means_deterministic": deterministic,
    }
    trained = heads.means.detach().cpu().clone()
    return dataclasses.replace(policy.with_means(trained), record=record)


def train_allocator(
    model: Any,
    train_windows: torch.Tensor,
    budget_windows: torch.Tensor,
    config: AllocatorTraining | None = None,
    *,
    progress: Progress | None = None,
) -> LearnedAllocator:
    """Train per-layer keep-heads on the frozen ``model`` and fit their budget (see the module doc).

    Args:
        model: a transformers MoE model of a supported family (left unpatched and unchanged).
        train_windows: ``(N, context + 1)`` token windows to distil on (the train split).
        budget_windows: windows the offset is fitted on (the valid split, spread over documents).
        config: :class:`AllocatorTraining` (default: its defaults).
        progress: draws a bar with an ETA.

    Returns:
        A :class:`~dynamic_moe_router.LearnedAllocator` whose ``record`` holds the training record
        (config, seconds, the loss curve, the reduction on the budget windows).

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> model = tiny_model("mixtral")
        >>> data = torch.randint(0, 64, (8, 17))
        >>> cfg = dmr.AllocatorTraining(target_reduction=0.3, steps=3, batch_windows=2, offset_iterations=4)
        >>> pol = dmr.train_allocator(model, data, data, cfg)
        >>> pol.k_max, len(pol.moe_layers), pol.record["config"]["steps"]
        (2, 2, 3)
    """
    config = AllocatorTraining() if config is None else config
    train_windows = _check_windows("train_windows", train_windows)
    budget_windows = _check_windows("budget_windows", budget_windows)
    root = unwrap(model)
    check_reachable(find_moe_layers(root, model_family(root))[0][0].native_k, config.target_reduction)
    means = expert_means(model, train_windows[: config.means_windows]) if config.compensation else None
    template = LearnedAllocator.keep_native(root, config.k_max, means=means)
    heads = _TrainableHeads(template, config.seed, config.learn_means)
    device = next(root.parameters()).device
    history: list[dict[str, float]] = []
    bar = task(progress, f"training allocator ({config.target_reduction:.0%} fewer routed FLOPs)",
               config.steps + config.offset_iterations)  # fmt: skip
    start = time.perf_counter()
    lam = 0.0
    with _frozen(root), _reproducible(root):
        groups: list[dict[str, Any]] = [{"params": [heads.weight, heads.bias], "lr": config.lr}]
        if heads.means is not None:
            groups.append({"params": [heads.means], "lr": config.means_lr})
        opt = torch.optim.Adam(groups)
        sched = _lr_scheduler(opt, config)
        order = torch.Generator().manual_seed(config.seed)
        with patched(model, heads, validate=False):
            for step in range(config.steps):
                pick = torch.randint(0, len(train_windows), (config.batch_windows,), generator=order)
                heads.noise = 1.0 + (config.noise_final - 1.0) * step / max(1, config.steps - 1)
                heads.soft.clear()
                heads.hard.clear()
                kl = _distil_kl(model, heads, train_windows[pick].to(device))
                kept = torch.stack(heads.soft).mean() / template.native_k  # soft kept-pair fraction
                reduction = 1.0 - sum(heads.hard) / len(heads.hard) / template.native_k
                loss = kl + lam * kept
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                lam = max(0.0, lam + config.lambda_lr * (config.target_reduction - reduction))
                if step % 10 == 0 or step == config.steps - 1:
                    history.append(
                        {"step": step, "kl": float(kl.detach()), "reduction": reduction, "lambda": lam}
                    )
                bar.advance()
        train_seconds = time.perf_counter() - start
        record: dict[str, Any] = {
            "config": asdict(config),
            "train_seconds": train_seconds,
            "train_windows": int(train_windows.shape[0]),
            "budget_windows": int(budget_windows.shape[0]),
            "context": int(train_windows.shape[1] - 1),
            "history": history,
            "final_lambda": lam,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "dmr_version": __version__,
        }
        trained = heads.export(0.0, record)
        fitted, reduction = fit_budget(
            model, trained, budget_windows, config.target_reduction,
            iterations=config.offset_iterations, on_step=bar.advance,
        )  # fmt: skip
    bar.finish()
    record["budget_reduction"] = reduction
    record["offset"] = fitted.offset
    record["total_seconds"] = time.perf_counter() - start
    return fitted
