"""The framework-neutral core: the routing math, the routing contract, the patch lifecycle.

(Formerly ``dynamic_moe_router.spec``; that name still imports, with a ``DeprecationWarning``.)

The math of every built-in policy (``keep_counts``) and of routing (``select``,
``combine_weights``, the sentinel) is written against a small array-ops adapter, :class:`Ops`.
PyTorch uses :class:`TorchOps` (the reference; :func:`dynamic_moe_router.route` and patched
models run through it), JAX uses ``dynamic_moe_router.jax.JaxOps``, Keras 3 uses
``dynamic_moe_router.keras.KerasOps``. A new framework needs only an adapter:

.. code-block:: python

    from dynamic_moe_router import core

    routed = core.route(MyOps(), scores, policy, native_k=2, probs=probs, normalize="sum")
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

**Policies.** A policy counts with one method, ``keep_counts_ops(ops, ranked_probs, probs, k_min,
k_max) -> counts (T,)``, written against this adapter (each built-in policy holds its math in that
method, in :mod:`dynamic_moe_router.policies`); ``policy.keep_counts(ranked_probs, probs, k_min,
k_max)`` is the same count on torch tensors. A user policy written before this core existed, which
overrides only the torch ``keep_counts``, keeps working with torch and raises a ``PolicyError`` with
another adapter.

**Checks** share their rules and messages: :func:`check_finite` (NaN/inf router scores, written
once against the adapter; it reads a count on the host), :func:`check_matrix` (2-D, floating,
same shape as scores), :func:`check_native_k`, :func:`check_normalize`,
:func:`non_finite_error` (the typed error for NaN/inf scores) and :func:`check_experts_inputs`.

Example:
    >>> import torch, dynamic_moe_router as dmr
    >>> from dynamic_moe_router import core
    >>> probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]])
    >>> r = core.route(core.TORCH_OPS, probs, dmr.TopP(p=0.7), native_k=2, normalize="sum")
    >>> r.ids.tolist(), r.counts.tolist()
    ([[0, 1], [0, 4]], [2, 1])
    >>> tied = torch.ones(1, 8)
    >>> core.TorchOps(stable_ties=True).top_k(tied, 3)[1].tolist()
    [[0, 1, 2]]

**Weights and patching.** :func:`renormalises` / :func:`weight_rule_text` are the families'
kept-weight rule; :class:`PatchHandleBase`, :func:`validate_policy` and friends are the patch
lifecycle the transformers and keras-hub integrations share (:mod:`._patch`).

PyTorch is imported only when :data:`TORCH_OPS` or :class:`TorchOps` is first used.
"""

from typing import TYPE_CHECKING, Any

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
from ._patch import (
    PatchHandleBase,
    PatchLayer,
    apply_replacing,
    refuse_if_patched,
    require_handle,
    set_attribute,
    undo_on_exit,
    validate_policy,
)
from ._routing import (
    Routed,
    Routing,
    Selected,
    apply_sentinel,
    check_finite,
    combine_weights,
    host_int,
    keep_counts,
    route,
    select,
)

if TYPE_CHECKING:
    from ._torch import TORCH_OPS, TorchOps
from ._rules import WEIGHT_RULES, WeightRule, renormalises, weight_rule_doc, weight_rule_text

__all__ = [
    "NORMALIZE_MODES",
    "TORCH_OPS",
    "WEIGHT_RULES",
    "Array",
    "DType",
    "Normalize",
    "Ops",
    "PatchHandleBase",
    "PatchLayer",
    "Routed",
    "Routing",
    "Selected",
    "TorchOps",
    "WeightRule",
    "apply_replacing",
    "apply_sentinel",
    "check_experts_inputs",
    "check_finite",
    "check_matrix",
    "check_native_k",
    "check_normalize",
    "combine_weights",
    "host_int",
    "keep_counts",
    "non_finite_error",
    "refuse_if_patched",
    "renormalises",
    "require_handle",
    "route",
    "select",
    "set_attribute",
    "undo_on_exit",
    "validate_policy",
    "weight_rule_doc",
    "weight_rule_text",
]


def __getattr__(name: str) -> Any:
    if name in ("TORCH_OPS", "TorchOps"):  # imports torch only when asked for
        from . import _torch

        return getattr(_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
