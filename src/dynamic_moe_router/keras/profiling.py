"""``profile(model)`` for a patched keras-hub model: tokens, kept pairs and routed FLOPs per layer.

It reads the counters of the patch (see :class:`~.experts.ExpertsCounter`) and reports them in the
library's framework-neutral :class:`~dynamic_moe_router.report.ProfileReport` (routed FLOPs =
pairs x ``6 H I``). Dense
FLOPs (attention, shared experts) are not measured for Keras models (``dense_flops_measured`` is
False).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import NotPatchedError
from ..report import LayerStats, ProfileReport
from .hub import get_patch

__all__ = ["profile"]


@contextmanager
def profile(model: Any) -> Iterator[Any]:
    """Count what the patched keras-hub ``model`` computes inside the block.

    Eager calls, ``jax.jit``-compiled calls and ``tf.function`` calls are counted (not XLA-compiled
    TensorFlow functions).

    Raises:
        NotPatchedError: ``model`` is not patched by :func:`dynamic_moe_router.keras.patch`.
    """
    handle = get_patch(model)
    if handle is None:
        raise NotPatchedError(
            f"{type(model).__name__} is not patched; profile a model patched with "
            "dynamic_moe_router.keras.patch(model, policy) (StaticTopK() counts the native routing)"
        )
    stats = [
        LayerStats(layer.index, layer.num_experts, layer.native_k, layer.flops_per_pair)
        for layer in handle.layers
    ]
    report = ProfileReport(
        family=handle.family, policy=handle.policy.describe(), layers=stats, dense_measured=False
    )
    start = [(c.counter.tokens, c.counter.executed_pairs, list(c.counter.k_histogram)) for c in handle.calls]
    try:
        yield report
    finally:
        for st, call, (tokens, pairs, hist) in zip(stats, handle.calls, start, strict=True):
            counter = call.counter
            st.tokens = counter.tokens - tokens
            st.executed_pairs = counter.executed_pairs - pairs
            hist = hist + [0] * (len(counter.k_histogram) - len(hist))
            st.k_histogram = [n - h for n, h in zip(counter.k_histogram, hist, strict=True)]
            st.kept_pairs = sum(k * n for k, n in enumerate(st.k_histogram))
