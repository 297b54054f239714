"""The Triton kernels of the GPU paths, run on CPU by Triton's interpreter (``TRITON_INTERPRET=1``).

The same kernels run compiled on CUDA in ``tests/test_cuda.py`` (through the device tool); here
they are checked in fp32 against the fp64 per-token reference of ``test_experts.py``: shape logic,
sentinels, tokens with no kept expert, experts with no tokens, odd sizes (H = 511, E = 257) and
split-K.
"""

from __future__ import annotations

import os

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example, given, settings

pytest.importorskip("triton")

from dynamic_moe_router.experts import (
    STANDARD,
    ExpertsCounter,
    _gpu,
)
from test_experts import mixtral_experts, random_routing, reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests (with a GPU, tests/test_cuda.py runs these)",
)


def _check_plan(ids: torch.Tensor, num_experts: int, small: bool) -> None:
    saved = _gpu._SMALL_PLAN_ELEMENTS
    _gpu._SMALL_PLAN_ELEMENTS = 1 << 30 if small else 0  # force the one-program or the 3-launch plan
    try:
        plan = _gpu.plan_pairs(ids, num_experts)
    finally:
        _gpu._SMALL_PLAN_ELEMENTS = saved
    ref = _gpu.plan_pairs_reference(ids, num_experts)
    assert torch.equal(plan.counts, ref.counts.to(torch.int32))
    assert torch.equal(plan.ends, ref.ends)
    flat = ids.reshape(-1)
    kept = torch.nonzero(flat < num_experts).squeeze(1)
    rows = plan.inv[kept].long()
    assert sorted(rows.tolist()) == list(range(kept.numel()))  # each kept pair owns one row
    assert torch.equal(plan.tokens[rows].long(), kept // ids.shape[1])  # the row knows its token
    starts = plan.ends.long() - plan.counts.long()
    experts = flat[kept]
    assert bool(((rows >= starts[experts]) & (rows < plan.ends.long()[experts])).all())  # in its group
    if small:  # no atomics: the stable order of the sorted reference
        assert torch.equal(rows, ref.inv[kept].long())


@given(st.integers(0, 40), st.integers(1, 20), st.integers(1, 6), st.integers(0, 2**16), st.floats(0.0, 1.0))
@settings(max_examples=25)
def test_counting_sort_plan_matches_the_sorted_reference(tokens, num_experts, k_max, seed, drop):  # type: ignore[no-untyped-def]
    k_max = min(k_max, num_experts)
    ids, _ = random_routing(tokens, num_experts, k_max, seed=seed, drop=drop)
    for small in (True, False):
        _check_plan(ids, num_experts, small)


CASES = [  # E, H, I, T, k_max
    (8, 32, 16, 37, 3),
    (5, 48, 32, 1, 2),  # decode
    (257, 511, 24, 5, 3),  # odd sizes
    (16, 64, 48, 70, 4),
]


@pytest.mark.parametrize("path", ["fused", "fused-split-k", "grouped"])
@pytest.mark.parametrize("case", CASES)
def test_paths_match_fp64_reference(path, case):  # type: ignore[no-untyped-def]
    num_experts, hidden_size, inter, tokens, k_max = case
    if path == "grouped" and hidden_size % 4:
        pytest.skip("grouped_mm needs 16-byte aligned rows")
    if path == "fused-split-k" and num_experts > 64:
        pytest.skip("split-K is covered by the other cases; the interpreter is slow on 257 experts")
    module = mixtral_experts(num_experts, hidden_size, inter)
    hidden = torch.randn(tokens, hidden_size)
    ids, weights = random_routing(tokens, num_experts, k_max)
    if tokens > 3:
        ids[2] = num_experts  # a token with no kept expert
    ids[ids == 1] = num_experts  # expert 1 gets no token
    weights[ids == num_experts] = 0
    ref = reference(module, STANDARD, hidden, ids, weights)
    counter = ExpertsCounter()
    with torch.no_grad():
        if path == "grouped":
            out = _gpu.grouped_path(module, hidden, ids, weights, counter)
        else:
            split = 3 if path == "fused-split-k" else 1
            cfg = (
                _gpu.TileConfig(16, 16, 16, 4, 1, split_k=1),
                _gpu.TileConfig(16, 16, 16, 4, 1, split_k=split),
            )
            out = _gpu.fused_path(module, hidden, ids, weights, counter, configs=cfg)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if tokens > 3:
        assert out[2].abs().sum() == 0
    assert counter.executed_pairs == int((ids < num_experts).sum())


@given(
    st.integers(1, 12),
    st.integers(1, 20),
    st.integers(1, 4),
    st.integers(0, 2**16),
    st.floats(0.0, 1.0),
    st.booleans(),
)
@settings(max_examples=20, deadline=None)
@example(3, 5, 2, 0, 1.0, True)  # every pair dropped: the plan is stored before any program returns
def test_decode_gemm_sorts_the_pairs_itself(tokens, num_experts, k_max, seed, drop, in_gemm):  # type: ignore[no-untyped-def]
    """The decode path's first GEMM computes the plan in every program (no plan launch) and leaves
    counts, ends and rows for the second GEMM and the combine: same output and count either way."""
    k_max = min(k_max, num_experts)
    module = mixtral_experts(num_experts, 24, 16)
    hidden = torch.randn(tokens, 24)
    ids, weights = random_routing(tokens, num_experts, k_max, seed=seed, drop=drop)
    weights[ids == num_experts] = 0
    saved, allocate = _gpu._GEMM_PLAN_ELEMENTS, _gpu._unfilled_small_plan
    buffers: list[_gpu.PairPlan] = []

    def kept_buffers(*args):  # type: ignore[no-untyped-def]
        buffers.append(allocate(*args))
        return buffers[-1]

    _gpu._GEMM_PLAN_ELEMENTS = 1 << 30 if in_gemm else 0
    _gpu._unfilled_small_plan = kept_buffers
    counter = ExpertsCounter()
    cfg = (_gpu.TileConfig(16, 16, 16, 4, 1), _gpu.TileConfig(16, 16, 16, 4, 1, split_k=2))
    try:
        with torch.no_grad():
            for _ in range(2):  # the counter accumulates over calls
                out = _gpu.fused_path(module, hidden, ids, weights, counter, configs=cfg)
    finally:
        _gpu._GEMM_PLAN_ELEMENTS, _gpu._unfilled_small_plan = saved, allocate
    torch.testing.assert_close(
        out.double(), reference(module, STANDARD, hidden, ids, weights), atol=1e-5, rtol=1e-5
    )
    assert counter.executed_pairs == 2 * int((ids < num_experts).sum())
    # the plan the GEMM left behind is plan_small's, tokens included (whichever program wrote it)
    plan = buffers[-1]
    ends, tokens, inv, counts = plan.ends, plan.tokens, plan.inv, plan.counts
    ref = _gpu.plan_pairs_reference(ids, num_experts)
    kept = torch.nonzero(ids.reshape(-1) < num_experts).squeeze(1)
    assert torch.equal(counts, ref.counts.to(torch.int32)) and torch.equal(ends, ref.ends)
    assert torch.equal(inv[kept], ref.inv[kept]) and torch.equal(
        tokens[: kept.numel()], ref.tokens[: kept.numel()]
    )


def test_all_dropped_and_zero_tokens():  # type: ignore[no-untyped-def]
    module = mixtral_experts(4, 16, 16)
    for path in (_gpu.fused_path, _gpu.grouped_path):
        counter = ExpertsCounter()
        out = path(module, torch.randn(3, 16), torch.full((3, 2), 4), torch.zeros(3, 2), counter)
        assert out.abs().sum() == 0 and counter.executed_pairs == 0
        empty = path(module, torch.randn(0, 16), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), None)
        assert empty.shape == (0, 16)


def test_zero_width_experts_still_count_their_pairs():  # type: ignore[no-untyped-def]
    """Degenerate widths launch no GEMM (I = 0) or no combine (H = 0) program: no plan is left
    unwritten, and the kept pairs are still counted."""
    ids = torch.tensor([[0, 2], [1, 4]])  # 4 = sentinel: 3 kept pairs
    weights = torch.rand(2, 2)
    for hidden_size, inter in ((16, 0), (0, 16)):
        counter = ExpertsCounter()
        out = _gpu.fused_path(
            mixtral_experts(4, hidden_size, inter), torch.randn(2, hidden_size), ids, weights, counter
        )
        assert out.shape == (2, hidden_size) and out.abs().sum() == 0
        assert counter.executed_pairs == 3


def test_decode_config_splits_long_reductions_only():  # type: ignore[no-untyped-def]
    c1, c2 = _gpu.decode_config(num_pairs=2, num_experts=8, hidden=4096, inter=14336)
    assert c1.split_k == 1 and c2.split_k > 1 and c2.block_m == 16
    _, c2 = _gpu.decode_config(num_pairs=8, num_experts=64, hidden=2048, inter=1024)
    assert c2.split_k == 1
    c1, _ = _gpu.decode_config(num_pairs=4096 * 8, num_experts=64, hidden=2048, inter=1024)
    assert c1.block_m == 64
