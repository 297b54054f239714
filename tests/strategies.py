"""Hypothesis strategies shared by the tests: routing score matrices and policies."""

from __future__ import annotations

import hypothesis.strategies as st
import torch

import dynamic_moe_router as dmr


@st.composite
def routing_problems(draw, max_tokens: int = 12, max_experts: int = 16):  # type: ignore[no-untyped-def]
    """``(probs (T, E), native_k)`` with probabilities from random logits (ties are rare but allowed)."""
    num_experts = draw(st.integers(1, max_experts))
    tokens = draw(st.integers(0, max_tokens))
    native_k = draw(st.integers(1, num_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    temperature = draw(st.sampled_from([0.1, 0.5, 1.0, 3.0, 10.0]))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen, dtype=torch.float64).float() * temperature
    return torch.softmax(logits, dim=-1), native_k


def bounds(draw, num_experts: int, native_k: int) -> tuple[int, int | None]:  # type: ignore[no-untyped-def]
    max_k = draw(st.one_of(st.none(), st.integers(1, num_experts)))
    top = native_k if max_k is None else max_k
    min_k = draw(st.integers(0, top))
    return min_k, max_k


@st.composite
def policies_for(draw, num_experts: int, native_k: int):  # type: ignore[no-untyped-def]
    """Any valid non-PerLayer policy for a layer with ``num_experts`` and ``native_k``."""
    kind = draw(st.sampled_from(["static", "top_p", "threshold", "entropy"]))
    if kind == "static":
        return dmr.StaticTopK(k=draw(st.one_of(st.none(), st.integers(1, num_experts))))
    min_k, max_k = bounds(draw, num_experts, native_k)
    if kind == "top_p":
        return dmr.TopP(p=draw(st.floats(0.01, 1.0)), min_k=min_k, max_k=max_k)
    if kind == "threshold":
        return dmr.RelativeThreshold(beta=draw(st.floats(0.0, 1.0)), min_k=min_k, max_k=max_k)
    low = draw(st.floats(0.0, 0.9))
    high = draw(st.floats(low + 0.05, 1.0))
    return dmr.EntropyAdaptive(min_k=min_k, max_k=max_k, low=low, high=high)
