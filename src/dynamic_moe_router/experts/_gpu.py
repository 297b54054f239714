# Triton launches take Python ints for tl.constexpr parameters and launch options (num_warps),
# which its annotations do not express:
# pyright: reportArgumentType=false, reportCallIssue=false
"""GPU experts forwards whose every stage is bounded by the kept (token, expert) pairs.

Two paths over the same sorted-pairs plan (:func:`plan_pairs`), both free of host
synchronisation (CUDA-graph capturable, ``torch.compile(fullgraph=True)`` traceable):

* ``"cuda"`` (prefill): Triton gather of the kept rows, ``grouped_mm`` with device-side offsets
  (it skips rows past the last offset), a Triton SwiGLU over the kept rows, ``grouped_mm`` again,
  and a Triton combine that reads only the kept rows of each token.
* ``"triton"`` (decode and small batches): a Triton grouped GEMM over a block table with the gather
  fused into its A loads and SwiGLU fused into its epilogue, a second grouped GEMM, and the same
  combine. Each expert's weights are streamed once per block of ``BLOCK_M`` rows, so a decode step
  reads each touched expert once.

The plan is a counting sort of the ``T * k_max`` ids in Triton (one launch for a few pairs, none
at decode, where the first GEMM sorts them itself, three otherwise); the float work (gather,
GEMMs, activation, weighting, combine) touches only kept pairs. At decode the experts are then three
launches (two GEMMs and the combine): each costs the host more time than the GPU work it issues
takes, so launches are what the decode path saves. Buffers are allocated at ``T * k_max`` rows
but rows past the kept count are never written or read.

The combine accumulates in fp32, in each token's slot order, without atomics: results are
deterministic run to run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "PairPlan",
    "decode_config",
    "device_reason",
    "experts_op",
    "fused_path",
    "grouped_path",
    "on_device",
    "plan_pairs",
    "plan_pairs_reference",
    "triton_reason",
]

_SILU_NAMES = frozenset({"SiLU", "SiLUActivation"})


@torch.compiler.assume_constant_result  # host facts: constants while torch.compile traces
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_FOUND: list[bool] = []  # find_spec costs ~35 us: looked up once per process


@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    if not _TRITON_FOUND:
        _TRITON_FOUND.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_FOUND[0]


def device_reason(t: torch.Tensor, who: str = "Triton kernels need") -> str | None:
    """``None`` if a Triton kernel can run on ``t``'s device (Triton installed; CUDA, or CPU under
    ``TRITON_INTERPRET=1``), else why not (``who``: the subject of the message, with its verb)."""
    if not _triton_installed():
        return "Triton is not installed (pip install triton; it ships with CUDA builds of PyTorch)"
    if not t.is_cuda and not _interpret():
        return f"{who} CUDA tensors (or TRITON_INTERPRET=1); got {t.device}"
    return None


def on_device(t: torch.Tensor) -> Any:
    """Triton launches on the current CUDA device: make it ``t``'s (a model spread over GPUs)."""
    if t.is_cuda and not torch.compiler.is_compiling() and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def triton_reason(module: torch.nn.Module, hidden: torch.Tensor, layout: Any) -> str | None:
    """``None`` if the Triton kernels can run this layer, else why not."""
    reason = device_reason(hidden)
    if reason is not None:
        return reason
    if layout.transposed or layout.interleaved or layout.has_bias or layout.activation != "act_fn":
        return "the Triton kernels support the standard layout (gate_up (E, 2I, H), down (E, H, I), no bias)"
    if type(getattr(module, "act_fn", None)).__name__ not in _SILU_NAMES:
        return f"the Triton kernels fuse SiLU only; this layer uses {type(module.act_fn).__name__}"
    if module.gate_up_proj.dtype != hidden.dtype or module.down_proj.dtype != hidden.dtype:
        return "expert weights and hidden states must share one dtype"
    if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"Triton kernels support bf16, fp16 and fp32; got {hidden.dtype}"
    return None


def _kernels():
    from . import _triton_kernels  # a plain import (not importlib): torch.compile traces it

    return _triton_kernels


@dataclass(frozen=True)
class PairPlan:
    """The kept pairs grouped by expert, all on the device (no host synchronisation)."""

    tokens: torch.Tensor  # (N,) int32 token of each grouped row, N = T * k_max; rows >= n_valid unused
    counts: torch.Tensor  # (E,) int32 kept rows per expert
    ends: torch.Tensor  # (E,) int32 end (exclusive) of each expert's rows = grouped_mm offsets
    inv: torch.Tensor  # (N,) int32 grouped row of each kept (token, slot); unspecified at sentinels
    ids: torch.Tensor  # (N,) expert of each (token, slot), E = sentinel
    num_experts: int

    @property
    def n_valid(self) -> torch.Tensor:  # (1,) int32 number of kept pairs
        return self.ends[-1:]


_PLAN_BLOCK = 1024


_SMALL_PLAN_ELEMENTS = 16384  # one-program plan while N_POW2 * max(N_POW2, E_POW2) fits
#: the decode path's first GEMM sorts the pairs itself (every program, in registers; no plan launch)
#: while N_POW2 * max(N_POW2, E_POW2) fits: batch 1-4 at 64 experts, 1-16 at 8 experts of top-2
_GEMM_PLAN_ELEMENTS = 2048


def plan_pairs(ids: torch.Tensor, num_experts: int) -> PairPlan:  # ids (T, k_max)
    """Group the kept (token, slot) pairs by expert with a counting sort (Triton, sync-free).

    Few pairs: one program does it all (:func:`~._triton_kernels.plan_small`); else a histogram,
    an offsets and a scatter launch.
    """
    k = _kernels()
    n, k_max = ids.numel(), ids.shape[1]
    n_pow2, e_pow2 = next_pow2(max(n, 1)), next_pow2(num_experts)
    if n_pow2 * max(n_pow2, e_pow2) <= _SMALL_PLAN_ELEMENTS:
        plan = _unfilled_small_plan(ids, num_experts)
        k.plan_small[(1,)](
            plan.ids, plan.counts, plan.ends, plan.tokens, plan.inv, n, num_experts, k_max,
            N_POW2=n_pow2, E_POW2=e_pow2,
        )  # fmt: skip
        return plan
    flat = ids.reshape(-1).contiguous()  # (N,)
    dev = flat.device
    ends = torch.empty(num_experts, dtype=torch.int32, device=dev)
    tokens = torch.empty(n, dtype=torch.int32, device=dev)
    inv = torch.empty(n, dtype=torch.int32, device=dev)
    scratch = torch.zeros(2, num_experts, dtype=torch.int32, device=dev)  # counts, fill
    counts, fill = scratch[0], scratch[1]
    grid = (triton_cdiv(n, _PLAN_BLOCK),)
    k.expert_histogram[grid](flat, counts, n, num_experts, BLOCK=_PLAN_BLOCK)
    k.expert_offsets[(1,)](counts, ends, num_experts, E_POW2=e_pow2)
    k.scatter_pairs[grid](flat, counts, ends, fill, tokens, inv, n, num_experts, k_max, BLOCK=_PLAN_BLOCK)
    return PairPlan(tokens=tokens, counts=counts, ends=ends, inv=inv, ids=flat, num_experts=num_experts)


def _unfilled_small_plan(ids: torch.Tensor, num_experts: int) -> PairPlan:
    """A one-program plan's :class:`PairPlan`, its ``ends (E,)``, ``tokens (N,)``, ``inv (N,)`` and
    ``counts (E,)`` int32 buffers allocated (in this order) but not written yet.

    The decode path whose first GEMM sorts the pairs allocates the same buffers in the same order:
    transformers' static cache replays its compiled decode graphs only where each ``generate()``
    call's cache lands at the addresses they were recorded with, which depends on the blocks earlier
    calls left in the caching allocator (``tests/test_cuda.py``, the static-cache replay test). A
    version that allocated one buffer for all four, and the pair counter's accumulator in the middle
    of the plan, made that test record again on a later call (which of the two did it was not
    isolated); this one keeps main's allocations as they were.
    """
    flat = ids.reshape(-1).contiguous()  # (N,)
    n, dev = flat.numel(), flat.device
    ends = torch.empty(num_experts, dtype=torch.int32, device=dev)
    tokens = torch.empty(n, dtype=torch.int32, device=dev)
    inv = torch.empty(n, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    return PairPlan(tokens=tokens, counts=counts, ends=ends, inv=inv, ids=flat, num_experts=num_experts)


def plan_pairs_reference(ids: torch.Tensor, num_experts: int) -> PairPlan:
    """The same plan with torch ops (a stable sort); rows inside a group in (token, slot) order."""
    flat = ids.reshape(-1)  # (N,)
    n = flat.numel()
    sorted_e, order = torch.sort(flat, stable=True)  # sentinels (== E) sort to the tail
    bounds = torch.arange(num_experts, device=flat.device, dtype=sorted_e.dtype)
    ends = torch.searchsorted(sorted_e, bounds, right=True).to(torch.int32)  # (E,)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    inv = torch.empty(n, dtype=torch.int32, device=flat.device)
    inv[order] = torch.arange(n, dtype=torch.int32, device=flat.device)
    tokens = (order // ids.shape[1]).to(torch.int32)
    return PairPlan(tokens=tokens, counts=counts, ends=ends, inv=inv, ids=flat, num_experts=num_experts)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _launch_combine(
    k, plan: PairPlan, y: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, counter: Any
) -> None:
    """``y (S, N, H)``: per-row expert outputs (S split-K partials). The combine also adds the kept
    pairs to ``counter`` (an :class:`~._forward.ExpertsCounter` or ``None``): no launch of its own."""
    t, h = out.shape
    if t == 0:
        return
    if h == 0:  # no combine program runs: count the way the other backends do
        if counter is not None:
            counter.add(plan.n_valid[0])
        return
    block_h = min(1024, next_pow2(h))
    grid = (t, triton_cdiv(h, block_h))
    flat_weights = weights.reshape(-1).contiguous()  # (N,) a copy only if weights are strided
    # the counter's accumulator is allocated on its first call after this call's buffers, where
    # adding to it after the launches allocated it: the allocator's blocks repeat call to call
    total = _counter_total(counter, out.device)
    k.combine[grid](
        y, plan.inv, plan.ids, flat_weights, out, plan.ends,
        plan.ends if total is None else total, h, weights.shape[1], plan.num_experts, y.stride(0),
        y.stride(1), out.stride(0), SPLIT_K=y.shape[0], BLOCK_H=block_h, COUNT=total is not None,
    )  # fmt: skip


def _counter_total(counter: Any, device: torch.device) -> torch.Tensor | None:
    """The executed-pair counter's int64 device accumulator, which the combine kernel adds to (no
    launch of its own); ``None`` when nothing counts (no counter, or inside torch.compile)."""
    if counter is None or torch.compiler.is_compiling():
        return None
    return counter.device_total(device)


def grouped_path(module, hidden, ids, weights, counter):
    """Prefill path: Triton gather / SwiGLU / combine around two ``grouped_mm`` calls."""
    with on_device(hidden):
        return _grouped_path(module, hidden, ids, weights, counter)


def _grouped_path(module, hidden, ids, weights, counter):
    k = _kernels()
    e = module.gate_up_proj.shape[0]
    h = hidden.shape[1]
    inter = module.down_proj.shape[2]
    out = torch.empty_like(hidden)
    n = ids.numel()
    if n == 0:
        return out.zero_()
    hidden = hidden.contiguous()
    plan = plan_pairs(ids, e)
    xs = torch.empty(n, h, dtype=hidden.dtype, device=hidden.device)  # (N, H), rows >= n_valid unused
    block = min(1024, next_pow2(h))
    k.gather_rows[(n,)](
        hidden, plan.tokens, xs, plan.n_valid, h, hidden.stride(0), xs.stride(0), BLOCK_H=block
    )
    hg = F.grouped_mm(xs, module.gate_up_proj.transpose(1, 2), offs=plan.ends)  # (N, 2I)
    a = torch.empty(n, inter, dtype=hidden.dtype, device=hidden.device)  # (N, I)
    block_i = min(1024, next_pow2(inter))
    k.swiglu_rows[(n,)](hg, a, plan.n_valid, inter, hg.stride(0), a.stride(0), BLOCK=block_i)
    y = F.grouped_mm(a, module.down_proj.transpose(1, 2), offs=plan.ends)  # (N, H)
    _launch_combine(k, plan, y.unsqueeze(0), weights, out, counter)
    return out


_SMEM_BUDGET = 160 * 1024  # bytes of shared memory the pipelined tiles may take (H100/H200: 227 KiB)


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of one fused GEMM launch (``split_k`` > 1 writes fp32 partials)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


def decode_config(num_pairs: int, num_experts: int, hidden: int, inter: int) -> tuple[TileConfig, TileConfig]:
    """Tile shapes of the fused path's two GEMMs for ``num_pairs = T * k_max`` slots.

    Few rows per expert (decode): narrow column tiles so that even one expert spreads over the whole
    GPU, and split-K on the second GEMM when its reduction (``I``) is long; more rows: wider tiles.
    """
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:  # from benchmarks/tune_gpu_decode.py on an H200 (BENCHMARKS.md)
        split = max(1, min(8, inter // 2048))
        return TileConfig(16, 32, 128, 2, 5), TileConfig(16, 32, 128, 2, 5, split_k=split)
    if rows_per_expert <= 64:
        return TileConfig(32, 64, 128, 4, 4), TileConfig(32, 64, 128, 4, 4)
    return TileConfig(64, 128, 64, 8, 3), TileConfig(64, 128, 64, 8, 3)


def fused_path(module, hidden, ids, weights, counter, configs=None):
    """Decode path: two Triton grouped GEMMs (gather and SwiGLU fused into the first) and the combine."""
    with on_device(hidden):
        return _fused_path(module, hidden, ids, weights, counter, configs)


def _fused_path(module, hidden, ids, weights, counter, configs=None):
    k = _kernels()
    w1, w2 = module.gate_up_proj, module.down_proj  # (E, 2I, H), (E, H, I)
    e, two_i, h = w1.shape
    inter = two_i // 2
    out = torch.empty_like(hidden)
    n = ids.numel()
    if n == 0:
        return out.zero_()
    hidden = hidden.contiguous()
    c1, c2 = configs or decode_config(n, e, h, inter)
    n_pow2, e_pow2 = next_pow2(n), next_pow2(e)
    # the first GEMM sorts the pairs (it must launch a program: I > 0); its buffers are plan_small's
    in_gemm = inter > 0 and n_pow2 * max(n_pow2, e_pow2) <= min(_GEMM_PLAN_ELEMENTS, _SMALL_PLAN_ELEMENTS)
    # the buffers plan_pairs would allocate; with in_gemm the first GEMM's first program fills them
    plan = _unfilled_small_plan(ids, e) if in_gemm else plan_pairs(ids, e)
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"  # fp32: full precision, no TF32
    a = torch.empty(1, n, inter, dtype=hidden.dtype, device=hidden.device)  # (1, N, I)
    y_dtype = torch.float32 if c2.split_k > 1 else hidden.dtype
    y = torch.empty(c2.split_k, n, h, dtype=y_dtype, device=hidden.device)  # (S, N, H)
    for c, src, w, dst, n_out, kdim, gather in (
        (c1, hidden, w1, a, inter, h, True),
        (c2, a[0], w2, y, h, inter, False),
    ):
        k_per_split = triton_cdiv(triton_cdiv(kdim, c.split_k), c.block_k) * c.block_k
        stage_bytes = (c.block_m + (2 if gather else 1) * c.block_n) * c.block_k * hidden.element_size()
        stages = max(1, min(c.num_stages, _SMEM_BUDGET // stage_bytes))  # fp32 tiles take twice the room
        # row blocks: sum_e ceil(count_e / BM) <= ceil(N / BM) + (experts with a row) <= ... + min(E, N)
        grid = (triton_cdiv(n, c.block_m) + min(e, n), triton_cdiv(n_out, c.block_n), c.split_k)
        plans = gather and in_gemm
        k.moe_gemm[grid](
            src, plan.tokens, w, dst, plan.counts, plan.ends, plan.ids, plan.inv, n_out, kdim, e,
            k_per_split, n, ids.shape[1], src.stride(0), w.stride(0), w.stride(1), w.stride(2),
            dst.stride(0), dst.stride(1), GATHER=gather, SWIGLU=gather, E_POW2=e_pow2, BLOCK_M=c.block_m,
            BLOCK_N=c.block_n, BLOCK_K=c.block_k, PRECISION=precision, PLAN=plans,
            N_POW2=n_pow2 if plans else 1, num_warps=c.num_warps, num_stages=stages,
        )  # fmt: skip
    _launch_combine(k, plan, y, weights, out, counter)
    return out


class _ExpertsWeights:
    """The two weight tensors a path reads (what the custom op receives instead of the module)."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj


@torch.library.custom_op("dynamic_moe_router::experts", mutates_args=())
def _experts_op(
    hidden: torch.Tensor,  # (T, H)
    ids: torch.Tensor,  # (T, k_max)
    weights: torch.Tensor,  # (T, k_max)
    gate_up_proj: torch.Tensor,  # (E, 2I, H)
    down_proj: torch.Tensor,  # (E, H, I)
    path: str,
) -> torch.Tensor:  # (T, H)
    module = _ExpertsWeights(gate_up_proj, down_proj)
    run = grouped_path if path == "cuda" else fused_path
    return run(module, hidden, ids, weights, None)


@_experts_op.register_fake
def _(hidden, ids, weights, gate_up_proj, down_proj, path):  # type: ignore[no-untyped-def]
    return torch.empty_like(hidden)


def experts_op() -> Any:
    """``dynamic_moe_router::experts(hidden, ids, weights, gate_up_proj, down_proj, path) -> out``:
    the sync-free paths as one opaque custom op, which is how they run inside ``torch.compile``.

    Inductor then neither traces the Triton launches nor plans their buffers, and CUDA graphs
    capture the op as it runs in eager mode. The op is registered when this module is first
    imported (with :mod:`dynamic_moe_router.experts`, not with the top-level package): dynamo
    cannot trace a registration, so it must exist before any compiled graph reaches it.
    """
    return _experts_op
