# Triton DSL values are typed loosely by triton.language (tl.sum may return a tuple):
# pyright: reportOperatorIssue=false, reportAttributeAccessIssue=false, reportCallIssue=false
# pyright: reportArgumentType=false, reportGeneralTypeIssues=false
"""The fused routing kernel of softmax routers: one launch per MoE layer. Imported only when it runs.

:func:`softmax_route` takes the router logits ``(T, E)`` and writes, for each token, the family's
ranked candidates (``ids (T, K_MAX)``, sentinel ``E`` in the slots it drops), their combine weights
(``(T, K_MAX)``, zero at sentinels, renormalised over the kept ones when ``RENORM``) and nothing
else: the softmax, the top-``K_MAX`` ranking, the policy's count and the weights all stay in
registers. It mirrors :func:`dynamic_moe_router.core.route` with the policy's
``keep_counts_ops`` (``POLICY`` selects one of :data:`~.fused_routing.FUSED_POLICIES`; ``A``/``B``
are its parameters); ``tests/test_fused_routing.py`` checks every policy against it.
"""

from __future__ import annotations

import triton
import triton.language as tl

STATIC, TOP_P, RELATIVE_THRESHOLD, ENTROPY = 0, 1, 2, 3


@triton.jit
def softmax_route(
    logits_ptr, ids_ptr, weights_ptr, T, E, stride_t, A, B, LOG_E, K_MIN,
    K_MAX: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
    POLICY: tl.constexpr, RENORM: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    cols = tl.arange(0, E_POW2)  # (E2,)
    slots = tl.arange(0, K_POW2)  # (K2,)
    rm, cm = rows < T, cols < E
    x = tl.load(
        logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0
    ).to(tl.float32)  # (BT, E2)
    x = tl.where(cm[None, :], x, float("-inf"))
    ex = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = ex / tl.sum(ex, axis=1)[:, None]  # (BT, E2) softmax in fp32; 0 at padded columns
    if POLICY == 3:  # entropy-adaptive: k from the normalised entropy of the whole distribution
        ent = -tl.sum(p * tl.log(tl.where(p > 0.0, p, 1.0)), axis=1)  # (BT,) nats, 0 log 0 = 0
        t = tl.minimum(tl.maximum((ent / LOG_E - A) / B, 0.0), 1.0)  # B = high - low
        span = K_MAX - K_MIN
        extra = tl.minimum(tl.maximum(tl.floor(t * (span + 1)).to(tl.int32), 0), span)
        count = extra + K_MIN
    else:
        count = tl.zeros((BLOCK_T,), tl.int32)
    work = tl.where(cm[None, :] & (p == p), p, -1.0)  # padded columns and NaN are never kept
    ranked_ids = tl.zeros((BLOCK_T, K_POW2), tl.int32)
    ranked_p = tl.zeros((BLOCK_T, K_POW2), tl.float32)
    cum = tl.zeros((BLOCK_T,), tl.float32)
    alive = tl.full((BLOCK_T,), 1, tl.int32)
    available = tl.zeros((BLOCK_T,), tl.int32)  # candidates with a real (not NaN) probability
    top = tl.max(work, axis=1)  # (BT,) the best candidate's probability
    for j in tl.static_range(K_MAX):
        best = tl.max(work, axis=1)  # (BT,)
        idx = tl.argmax(work, axis=1, tie_break_left=True).to(tl.int32)  # (BT,) lowest index on ties
        work = tl.where(cols[None, :] == idx[:, None], -2.0, work)
        ranked_ids = tl.where(slots[None, :] == j, idx[:, None], ranked_ids)
        ranked_p = tl.where(slots[None, :] == j, best[:, None], ranked_p)
        available += ((best == best) & (best >= 0.0)).to(tl.int32)
        if POLICY == 1:  # top-p: kept while the mass ranked before it (cumsum - p) is below p
            cum = cum + best
            before = cum - best
            if j == 0:
                before = tl.zeros_like(before)
            count += (before < A).to(tl.int32)
        if POLICY == 2:  # relative threshold: the prefix with p >= beta * top
            alive = alive & (best >= A * top).to(tl.int32)
            count += alive
    if POLICY == 0:
        count = tl.full((BLOCK_T,), K_MAX, tl.int32)
    count = tl.minimum(tl.minimum(tl.maximum(count, K_MIN), K_MAX), available)  # as core.select caps it
    keep = (slots[None, :] < count[:, None]) & (slots[None, :] < K_MAX) & (ranked_ids < E)  # (BT, K2)
    w = tl.where(keep, ranked_p, 0.0)
    if RENORM:
        total = tl.sum(w, axis=1)[:, None]
        w = w / tl.where(total > 0.0, total, 1.0)
    w = tl.where(keep, w, 0.0)  # exactly zero at sentinels
    ids = tl.where(keep, ranked_ids, E)  # a NaN row never indexes past E
    out = rows[:, None] * K_MAX + slots[None, :]
    om = rm[:, None] & (slots[None, :] < K_MAX)
    tl.store(ids_ptr + out, ids.to(ids_ptr.dtype.element_ty), mask=om)
    if weights_ptr.dtype.element_ty == tl.float32:
        tl.store(weights_ptr + out, w, mask=om)
    elif weights_ptr.dtype.element_ty == tl.float64:
        tl.store(weights_ptr + out, w.to(tl.float64), mask=om)
    else:  # fp16 / bf16: round to nearest even, as torch's .to() does
        tl.store(weights_ptr + out, w.to(weights_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=om)
