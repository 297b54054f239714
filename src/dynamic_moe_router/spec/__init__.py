"""The framework-neutral routing specification: the policy and routing math, written once.

The math of every built-in policy (``keep_counts``) and of routing (``select``,
``combine_weights``, the sentinel) is written against a small array-ops adapter, :class:`Ops`.
PyTorch uses :class:`TorchOps` (the reference; :func:`dynamic_moe_router.route` and patched
models run through it), JAX uses ``dynamic_moe_router.jax.JaxOps``, Keras 3 uses
``dynamic_moe_router.keras.KerasOps``. A new framework needs only an adapter:

.. code-block:: python

    from dynamic_moe_router import spec

    routed = spec.route(MyOps(), scores, policy, native_k=2, probs=probs, normalize="sum")
    routed.ids, routed.weights, routed.counts  # arrays of the adapter's framework

**The Ops protocol.** An adapter is any object with a ``name`` (``str``, used in messages) and
these methods, every axis being the last one (``T`` tokens, ``E`` experts, ``k`` slots):

=====================================  =====================================================
``top_k(x, k) -> (values, indices)``   the ``k`` largest of each row of ``x (T, E)``, sorted
                                       descending; **exact ties: the lower index first**;
                                       ``-inf`` ranks below every finite value; indices in the
                                       ``"int"`` dtype
``take_along_axis(x, indices)``        ``x[t, indices[t, j]]``: ``(T, E), (T, k) -> (T, k)``
``cumsum(x)``, ``cumprod(x)``          inclusive, along the last axis, same dtype
``amax(x, keepdims=False)``            maximum along the last axis
``sum(x, keepdims=False)``             sum along the last axis in ``x``'s dtype
``where(cond, x, y)``                  elementwise select; ``cond`` broadcasts (e.g. ``(k,)``
                                       against ``(T, k)``)
``full_like(x, value)``                ``x``'s shape and dtype, filled with ``value``
``clip(x, low, high)``                 elementwise, Python scalar bounds, keeps the dtype
``floor(x)``                           elementwise floor of a float array (stays float)
``xlogy(x, y)``                        ``x * log(y)``, ``0`` where ``x == 0``
``isfinite(x)``                        elementwise bool
``arange(n, like)``                    ``[0, n)`` in the ``"int"`` dtype, on ``like``'s device
``minimum(x, y)``                      elementwise minimum
``softmax(x)``                         along the last axis, in ``x``'s dtype
``astype(x, dtype)``                   ``dtype`` is ``"int"`` (the index dtype: int64 in
                                       torch, int32 in JAX without x64), ``"float32"`` or
                                       ``"bool"``; float -> int truncates (only called on
                                       integral values)
``expand_dims(x, axis)``               a new axis of size 1
=====================================  =====================================================

Arrays must support ``+ - * /``, unary ``-`` and ``< <= > >= ==`` with broadcasting and with
Python scalars that do not change their dtype (weak scalars, as in torch and JAX: ``fp32 < 0.5``
compares in fp32).

**Ties.** The cross-framework rule is *lower index first* among exactly equal scores
(``jax.lax.top_k`` and ``tf.math.top_k`` do this). ``torch.topk`` does not promise it (on CPU
an all-equal row of 8 ranks ``[6, 5, 4, 7, ...]``), and the torch path keeps ``torch.topk`` so that
``StaticTopK()`` reproduces the transformers families bit for bit: ``TorchOps()`` ranks with
``torch.topk``, ``TorchOps(stable_ties=True)`` with the cross-framework rule. Results agree
across frameworks whenever no two of a token's scores tie at the ``k_max`` boundary or inside
the kept prefix (``keras.ops.top_k`` on its torch backend also inherits ``torch.topk``'s order).

**Policies.** Every policy has ``keep_counts_ops(ops, ranked_probs, probs, k_min, k_max) ->
counts (T,)`` (the math, from :mod:`._policies`); its torch ``keep_counts(ranked_probs, probs,
k_min, k_max)`` calls it with :data:`TORCH_OPS`. A user policy that only implements the torch
``keep_counts`` keeps working with torch and raises a ``PolicyError`` with another adapter.

**Checks** are per framework (they read values on the host), with shared rules and messages on
plain Python values: :func:`check_matrix` (2-D, floating, same shape as scores),
:func:`check_native_k`, :func:`check_normalize`, :func:`non_finite_error` (the typed error for
NaN/inf scores, to raise when a framework counted the bad tokens) and
:func:`check_experts_inputs`.

Example:
    >>> import torch, dynamic_moe_router as dmr
    >>> from dynamic_moe_router import spec
    >>> probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    >>> r = spec.route(spec.TORCH_OPS, probs, dmr.TopP(p=0.7), native_k=2, normalize="sum")
    >>> r.ids.tolist(), r.counts.tolist()
    ([[0, 1], [0, 4]], [2, 1])
    >>> tied = torch.ones(1, 8)
    >>> spec.TorchOps(stable_ties=True).top_k(tied, 3)[1].tolist()
    [[0, 1, 2]]
"""

from ._checks import (
    NORMALIZE_MODES,
    Normalize,
    check_experts_inputs,
    check_matrix,
    check_native_k,
    check_normalize,
    non_finite_error,
)
from ._ops import Array, DType, Ops
from ._policies import entropy_counts, relative_threshold_counts, static_counts, top_p_counts
from ._routing import Routed, Selected, apply_sentinel, combine_weights, keep_counts, route, select
from ._torch import TORCH_OPS, TorchOps

__all__ = [
    "NORMALIZE_MODES",
    "TORCH_OPS",
    "Array",
    "DType",
    "Normalize",
    "Ops",
    "Routed",
    "Selected",
    "TorchOps",
    "apply_sentinel",
    "check_experts_inputs",
    "check_matrix",
    "check_native_k",
    "check_normalize",
    "combine_weights",
    "entropy_counts",
    "keep_counts",
    "non_finite_error",
    "relative_threshold_counts",
    "route",
    "select",
    "static_counts",
    "top_p_counts",
]
