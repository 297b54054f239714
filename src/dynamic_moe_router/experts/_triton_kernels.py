# Triton DSL values are typed loosely by triton.language (tl.sum may return a tuple):
# pyright: reportOperatorIssue=false, reportArgumentType=false, reportIndexIssue=false
"""Triton kernels of the GPU experts forward. Imported only when a Triton path runs.

Every kernel is bounded by the kept (token, expert) pairs: each program reads the per-expert
counts (from device memory, or from the plan it sorted itself) and returns at once when it has no
kept work. Nothing is synchronised
with the host, so the kernels can be captured in a CUDA graph and traced by ``torch.compile``.

Plan (a counting sort of the kept pairs by expert; for a few pairs, one launch,
:func:`plan_small`, or none at decode, where every program of the first :func:`moe_gemm` sorts
them in registers and its first program stores the plan for the later launches; otherwise three).
The combine, the last launch, also adds the number of kept pairs to the layer's int64 pair
counter when given one (``COUNT``), so counting costs no launch of its own:

* :func:`expert_histogram`: ``counts[e] += 1`` for every kept pair (atomics);
* :func:`expert_offsets`: one program, ``ends = cumsum(counts)`` (inclusive, int32, also the
  ``grouped_mm`` offsets);
* :func:`scatter_pairs`: each kept pair takes the next free row of its expert's group
  (``row = ends[e] - counts[e] + atomic_add(fill[e], 1)``) and records ``tokens[row]`` and
  ``inv[pair] = row``. The order of rows inside a group depends on the atomics, but every row is
  computed independently and the combine sums each token's slots in slot order, so the *output* is
  deterministic.

Compute:

* :func:`gather_rows`: ``xs[r] = x[tokens[r]]`` for sorted rows ``r < n_valid``;
* :func:`swiglu_rows`: ``a[r] = silu(h[r, :I]) * h[r, I:]`` for ``r < n_valid``;
* :func:`moe_gemm`: a grouped GEMM over row blocks of ``BLOCK_M`` rows of one expert each (each
  program finds its expert from the counts), with the gather fused into the A loads and, for the
  first GEMM, SwiGLU fused into the epilogue; optional split-K writes fp32 partials;
* :func:`combine`: ``out[t] = sum_j w[t, j] * sum_s y[s, inv[t, j]]`` over the kept slots of
  token ``t`` only, in fp32 and in slot order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def expert_histogram(ids_ptr, counts_ptr, N, E, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    e = tl.load(ids_ptr + offs, mask=m, other=E).to(tl.int32)
    valid = m & (e < E) & (e >= 0)
    tl.atomic_add(counts_ptr + tl.where(valid, e, 0), tl.full((BLOCK,), 1, tl.int32), mask=valid)


@triton.jit
def expert_offsets(counts_ptr, ends_ptr, E, E_POW2: tl.constexpr):
    er = tl.arange(0, E_POW2)
    em = er < E
    c = tl.load(counts_ptr + er, mask=em, other=0)
    tl.store(ends_ptr + er, tl.cumsum(c, 0), mask=em)


@triton.jit
def scatter_pairs(
    ids_ptr, counts_ptr, ends_ptr, fill_ptr, tokens_ptr, inv_ptr, N, E, K_MAX, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    e = tl.load(ids_ptr + offs, mask=m, other=E).to(tl.int32)
    valid = m & (e < E) & (e >= 0)
    es = tl.where(valid, e, 0)
    start = tl.load(ends_ptr + es, mask=valid, other=0) - tl.load(counts_ptr + es, mask=valid, other=0)
    slot = tl.atomic_add(fill_ptr + es, tl.full((BLOCK,), 1, tl.int32), mask=valid)
    row = start + slot
    tl.store(tokens_ptr + row, (offs // K_MAX).to(tl.int32), mask=valid)
    tl.store(inv_ptr + offs, row, mask=valid)


@triton.jit
def _plan_rows(ids_ptr, N, E, N_POW2: tl.constexpr, E_POW2: tl.constexpr):
    """The counting sort of a few pairs in one program, stable (no atomics): for pairs ``p (N2,)``
    whether each is ``valid`` (kept), the per-expert ``counts`` and ``ends (E2,)`` and each pair's
    sorted ``row (N2,)`` (meaningless where not valid)."""
    p = tl.arange(0, N_POW2)
    pm = p < N
    e = tl.load(ids_ptr + p, mask=pm, other=E).to(tl.int32)
    valid = pm & (e < E) & (e >= 0)
    ev = tl.where(valid, e, -1)
    er = tl.arange(0, E_POW2)
    onehot = (ev[:, None] == er[None, :]).to(tl.int32)  # (N2, E2)
    counts = tl.sum(onehot, 0)  # (E2,) 0 at padded experts
    ends = tl.cumsum(counts, 0)  # (E2,)
    start = tl.sum(onehot * (ends - counts)[None, :], 1)  # (N2,) first row of each pair's expert
    same_before = (ev[:, None] == ev[None, :]) & (p[None, :] < p[:, None])  # (N2, N2)
    row = start + tl.sum(same_before.to(tl.int32), 1)  # (N2,)
    return p, valid, counts, ends, row


@triton.jit
def _store_plan(
    counts_ptr, ends_ptr, tokens_ptr, inv_ptr, p, valid, counts, ends, row, E, K_MAX, E_POW2: tl.constexpr
):  # fmt: skip
    er = tl.arange(0, E_POW2)
    em = er < E
    tl.store(counts_ptr + er, counts, mask=em)
    tl.store(ends_ptr + er, ends, mask=em)
    tl.store(tokens_ptr + row, (p // K_MAX).to(tl.int32), mask=valid)
    tl.store(inv_ptr + p, row, mask=valid)


@triton.jit
def plan_small(
    ids_ptr,
    counts_ptr,
    ends_ptr,
    tokens_ptr,
    inv_ptr,
    N,
    E,
    K_MAX,
    N_POW2: tl.constexpr,
    E_POW2: tl.constexpr,
):
    """The whole plan in one program for few pairs: stable order, no atomics."""
    p, valid, counts, ends, row = _plan_rows(ids_ptr, N, E, N_POW2, E_POW2)
    _store_plan(counts_ptr, ends_ptr, tokens_ptr, inv_ptr, p, valid, counts, ends, row, E, K_MAX, E_POW2)


@triton.jit
def gather_rows(x_ptr, tok_ptr, out_ptr, nvalid_ptr, H, stride_x, stride_o, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    if row >= tl.load(nvalid_ptr):
        return
    t = tl.load(tok_ptr + row).to(tl.int64)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        m = offs < H
        v = tl.load(x_ptr + t * stride_x + offs, mask=m)
        tl.store(out_ptr + row.to(tl.int64) * stride_o + offs, v, mask=m)


@triton.jit
def swiglu_rows(h_ptr, a_ptr, nvalid_ptr, inter, stride_h, stride_a, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if row >= tl.load(nvalid_ptr):
        return
    base = row.to(tl.int64)
    for i0 in range(0, inter, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < inter
        g = tl.load(h_ptr + base * stride_h + offs, mask=m).to(tl.float32)
        u = tl.load(h_ptr + base * stride_h + inter + offs, mask=m).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        tl.store(a_ptr + base * stride_a + offs, a.to(a_ptr.dtype.element_ty), mask=m)


@triton.jit
def moe_gemm(
    a_ptr,  # (rows or tokens, K) activations
    tok_ptr,  # (N,) token of each sorted row (read when GATHER and not PLAN; written when PLAN)
    w_ptr,  # (E, n_out, K) expert weights, out = a @ w[e].T
    c_ptr,  # (SPLIT_K, N, N_OUT) output rows in sorted order
    counts_ptr,  # (E,) kept rows per expert (written here when PLAN)
    ends_ptr,  # (E,) inclusive prefix sum of counts (written here when PLAN)
    ids_ptr,  # (N,) expert of each (token, slot), E = sentinel (read when PLAN)
    inv_ptr,  # (N,) sorted row of each kept (token, slot) (written when PLAN)
    N_OUT,  # output columns (I for the fused SwiGLU GEMM, else the weight rows)
    K,
    E,
    K_PER_SPLIT,
    N,  # T * k_max slots (PLAN)
    K_MAX,  # slots per token (PLAN)
    stride_a,
    stride_we,
    stride_wn,
    stride_wk,
    stride_cs,
    stride_c,
    GATHER: tl.constexpr,
    SWIGLU: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    PLAN: tl.constexpr,  # few pairs: every program sorts them itself (no plan launch)
    N_POW2: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    er = tl.arange(0, E_POW2)
    em = er < E
    if PLAN:  # the counting sort in registers; the first program stores it for the later launches
        p, valid, cnt, ends, prow = _plan_rows(ids_ptr, N, E, N_POW2, E_POW2)
        if (pid_m == 0) & (pid_n == 0) & (pid_s == 0):
            _store_plan(counts_ptr, ends_ptr, tok_ptr, inv_ptr, p, valid, cnt, ends, prow, E, K_MAX, E_POW2)
    else:
        cnt = tl.load(counts_ptr + er, mask=em, other=0)
        ends = tl.load(ends_ptr + er, mask=em, other=0)
    # which expert owns row block pid_m: blocks are laid out expert by expert
    nb = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(nb, 0)  # inclusive block prefix
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    if e >= E:
        return
    sel = er == e
    first_block = tl.sum(tl.where(sel, cum - nb, 0), 0)
    row_end = tl.sum(tl.where(sel, ends, 0), 0)
    row_start = row_end - tl.sum(tl.where(sel, cnt, 0), 0)
    rows = row_start + (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    if GATHER:
        if PLAN:  # the token of each row: the pair sorted to it
            match = (prow[None, :] == rows[:, None]) & valid[None, :]  # (BM, N2)
            src = tl.sum(tl.where(match, (p // K_MAX)[None, :], 0), 1).to(tl.int64)
        else:
            src = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        src = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * K_PER_SPLIT
    for k0 in range(k_lo, k_lo + K_PER_SPLIT, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        xmask = rmask[:, None] & kmask[None, :]
        x = tl.load(a_ptr + src[:, None] * stride_a + ks[None, :], mask=xmask, other=0.0)
        wmask = kmask[:, None] & cmask[None, :]
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if SWIGLU:
            wu = tl.load(
                w_base + (cols[None, :] + N_OUT) * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0
            )
            acc_up = tl.dot(x, wu, acc_up, input_precision=PRECISION)
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    out = c_ptr + pid_s.to(tl.int64) * stride_cs + rows[:, None].to(tl.int64) * stride_c + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def combine(
    y_ptr,  # (SPLIT_K, N, H) expert outputs in sorted order (partials when SPLIT_K > 1)
    inv_ptr,  # (T * k_max,) sorted row of each (token, slot)
    ids_ptr,  # (T * k_max,) expert of each slot, E = sentinel
    w_ptr,  # (T * k_max,) combine weight of each slot
    out_ptr,  # (T, H)
    ends_ptr,  # (E,) the plan's inclusive prefix sum of counts (read when COUNT)
    total_ptr,  # (,) int64 executed-pair counter (when COUNT)
    H,
    K_MAX,
    E,
    stride_ys,
    stride_y,
    stride_o,
    SPLIT_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COUNT: tl.constexpr,
):
    if COUNT:  # noqa: SIM102  (a constexpr branch, then a runtime one: Triton compiles them apart)
        # the layer's pair counter += the kept pairs, by the first program (no launch of its own)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(total_ptr, tl.load(total_ptr) + tl.load(ends_ptr + E - 1).to(tl.int64))
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in range(0, K_MAX):
        e = tl.load(ids_ptr + t * K_MAX + j)
        if (e < E) & (e >= 0):
            r = tl.load(inv_ptr + t * K_MAX + j).to(tl.int64)
            w = tl.load(w_ptr + t * K_MAX + j).to(tl.float32)
            y = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for s in range(0, SPLIT_K):
                y += tl.load(y_ptr + s * stride_ys + r * stride_y + offs, mask=m, other=0.0).to(tl.float32)
            acc += w * y
    tl.store(out_ptr + t * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=m)
