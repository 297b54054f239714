"""The Keras experts forward: SwiGLU experts computed on the kept (token, expert) pairs only.

Input: ``hidden (T, H)``, ``ids (T, k)`` with sentinel ``E`` and ``weights (T, k)`` (zero at
sentinels), the routing contract. Experts backends (``backend=``; ``method=`` before 0.2):

* ``"sorted"`` (eager, every backend, through ``keras.ops``): the kept pairs are found on the host
  (one sync, as the PyTorch ``loop`` backend) and grouped by expert; each expert with rows gathers
  them, runs its two GEMMs on exactly those rows, and ``keras.ops.segment_sum`` adds the weighted
  rows back to their tokens. Experts without rows cost nothing. On JAX, which compiles every new
  shape even eagerly, each expert's rows are padded with zero-weight rows to one of a few sizes
  (a multiple of ``max(8, 2**(bit_length(n) - 3))``, at most +25%; ``counter.padded_rows``).
* ``"segments"`` (TensorFlow, also inside ``tf.function``): the same with TensorFlow ops on
  dynamic shapes: ``tf.where`` over the kept slots, ``tf.split`` by expert row counts, one GEMM pair
  per expert, ``tf.math.unsorted_segment_sum``.
* ``"ragged_dot"`` (JAX, also inside ``jax.jit``): static shapes: all ``T * k`` slots sorted by
  expert (sentinels last), ``jax.lax.ragged_dot`` over the ``E`` groups (rows past the kept ones
  belong to no group and give 0), ``jax.ops.segment_sum``. On XLA:CPU ``ragged_dot`` is lowered to
  a dense per-group product (it costs as much as computing every expert); on GPU/TPU it is a
  grouped GEMM.
* ``"dense"``: every expert on every token, weighted by the routing (the keras-hub computation);
  the reference, and the static baseline of the benchmark.

``"auto"`` takes ``"segments"`` on TensorFlow (eager and ``tf.function``; eagerly it is faster than
``"sorted"``, with no host round trip), ``"sorted"`` on concrete JAX arrays and ``"ragged_dot"``
under ``jax.jit`` (other backends: ``"sorted"`` eagerly, ``"dense"`` while tracing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
from keras import ops as _keras_ops

from .. import core
from .._deprecation import renamed_argument, warn_renamed
from ..backends import BACKEND_TABLE, backend_names
from ..errors import BackendUnavailableError, RoutingInputError
from ._tensors import is_concrete, to_numpy

#: ``keras.ops``, typed loosely: its inferred result types are incomplete (some read as None)
ops: Any = _keras_ops

__all__ = ["BACKENDS", "ExpertsCounter", "SwiGLUBank", "experts_forward", "resolve_backend"]

#: the experts backends of the Keras integration (``backend=``; ``method=`` before 0.2), from the
#: backend table :data:`dynamic_moe_router.backends.BACKEND_TABLE`
BACKENDS: tuple[str, ...] = backend_names("keras")


@dataclass(frozen=True)
class SwiGLUBank:
    """The weights of ``E`` SwiGLU experts, ``down(silu(gate(x)) * up(x))`` (tensors or variables).

    Either fused ``gate_up`` (gate rows/columns first, then up) or separate ``gate`` and ``up``.
    ``transposed=True``: the PyTorch ``nn.Linear`` layout of transformers, ``gate_up (E, 2I, H)``
    and ``down (E, H, I)``; ``transposed=False``: the ``x @ W`` layout of keras-hub,
    ``gate_up (E, H, 2I)`` (or ``gate``/``up (E, H, I)``) and ``down (E, I, H)``.
    ``silu_fp32``: apply the activation in float32 and cast back (as PyTorch and keras-hub do).
    """

    down: Any
    gate_up: Any = None
    gate: Any = None
    up: Any = None
    transposed: bool = False
    activation: Callable[[Any], Any] = ops.silu
    silu_fp32: bool = True

    def __post_init__(self) -> None:
        fused = self.gate_up is not None
        if fused == (self.gate is not None or self.up is not None) or (
            not fused and (self.gate is None or self.up is None)
        ):
            raise RoutingInputError("SwiGLUBank needs either gate_up, or both gate and up")
        if not fused and self.transposed:
            raise RoutingInputError(
                "SwiGLUBank: separate gate/up weights are supported in the x @ W layout only"
            )

    @property
    def num_experts(self) -> int:
        return int(self.down.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.down.shape[1] if self.transposed else self.down.shape[2])

    @property
    def intermediate_size(self) -> int:
        return int(self.down.shape[2] if self.transposed else self.down.shape[1])


@dataclass
class ExpertsCounter:
    """Counts of one MoE layer: calls, tokens, kept pairs computed, and the k histogram.

    Updated from host values in eager mode, through ``jax.debug.callback`` under ``jax.jit`` and
    ``tf.numpy_function`` inside ``tf.function`` (not under XLA's ``jit_compile``).
    """

    calls: int = 0
    tokens: int = 0
    executed_pairs: int = 0
    padded_rows: int = 0  # zero-weight rows the JAX eager path adds to bound recompilation
    k_histogram: list[int] = field(default_factory=list)  # k_histogram[k] = tokens that kept k experts

    def add(self, counts: np.ndarray, executed: int | None = None) -> None:
        """Record the per-token keep counts ``counts (T,)`` of one forward and the pairs it computed
        (``executed``, default ``counts.sum()``; the dense method computes ``T * E``)."""
        counts = np.asarray(counts).reshape(-1)
        self.calls += 1
        self.tokens += int(counts.size)
        self.executed_pairs += int(counts.sum()) if executed is None else int(executed)
        hist = np.bincount(counts, minlength=len(self.k_histogram)).tolist() if counts.size else []
        if len(hist) > len(self.k_histogram):
            self.k_histogram += [0] * (len(hist) - len(self.k_histogram))
        for k, n in enumerate(hist):
            self.k_histogram[k] += int(n)

    def reset(self) -> None:
        self.calls = self.tokens = self.executed_pairs = self.padded_rows = 0
        self.k_histogram = []


def _value(v: Any) -> Any:
    return v.value if isinstance(v, keras.Variable) else v


def _activate(bank: SwiGLUBank, gate: Any) -> Any:
    if bank.silu_fp32:
        dtype = keras.backend.standardize_dtype(gate.dtype)
        return ops.cast(bank.activation(ops.cast(gate, "float32")), dtype)
    return bank.activation(gate)


def _mm(x: Any, w: Any, transposed: bool) -> Any:
    return ops.einsum("nh,oh->no", x, w) if transposed else ops.matmul(x, w)


def _one_expert(bank: SwiGLUBank, weights: dict[str, Any], e: int, x: Any) -> Any:  # (n, H) -> (n, H)
    if bank.gate_up is not None:
        h = _mm(x, weights["gate_up"][e], bank.transposed)  # (n, 2I)
        gate, up = ops.split(h, 2, axis=-1)
    else:
        gate, up = ops.matmul(x, weights["gate"][e]), ops.matmul(x, weights["up"][e])  # (n, I)
    return _mm(_activate(bank, gate) * up, weights["down"][e], bank.transposed)


def _weights(bank: SwiGLUBank) -> dict[str, Any]:
    names = ("gate_up", "gate", "up", "down")
    return {n: _value(getattr(bank, n)) for n in names if getattr(bank, n) is not None}


def resolve_backend(backend: str, hidden: Any) -> str:
    """The experts backend ``"auto"`` stands for, or ``backend`` itself if it can run here.

    Raises:
        RoutingInputError: an unknown ``backend``.
        BackendUnavailableError: ``backend`` cannot run on this Keras backend or in this (traced) context.
    """
    if backend not in BACKENDS:
        raise RoutingInputError(f"experts backend (method=) must be one of {BACKENDS}, got {backend!r}")
    keras_backend = keras.backend.backend()
    concrete = is_concrete(hidden)
    if backend == "auto":
        if keras_backend == "tensorflow":
            return "segments"
        if concrete:
            return "sorted"
        return "ragged_dot" if keras_backend == "jax" else "dense"
    if backend == "sorted" and not concrete:
        raise BackendUnavailableError(
            "experts backend 'sorted' reads the routing on the host and cannot run while tracing (jax.jit / "
            "tf.function); use backend='auto'"
        )
    if backend == "segments" and keras_backend != "tensorflow":
        raise BackendUnavailableError(
            f"experts backend 'segments' needs the TensorFlow backend, not {keras_backend!r}"
        )
    if backend == "ragged_dot" and keras_backend != "jax":
        raise BackendUnavailableError(
            f"experts backend 'ragged_dot' needs the JAX backend, not {keras_backend!r}"
        )
    return backend


@renamed_argument("method", "backend")
def experts_forward(
    hidden: Any,  # (T, H)
    ids: Any,  # (T, k) int, sentinel E
    weights: Any,  # (T, k), 0 at sentinels
    bank: SwiGLUBank,
    *,
    backend: str = "auto",
    counter: ExpertsCounter | None = None,
) -> Any:  # (T, H)
    """Weighted sum of the kept experts' outputs for every token, computing only the kept pairs.

    ``backend`` is one of :data:`BACKENDS` (see the module docstring; ``method=`` is its deprecated
    name).

    Raises:
        RoutingInputError: shapes that do not fit, or an unknown ``backend``.
        BackendUnavailableError: ``backend`` cannot run on this Keras backend / in this context.
    """
    core.check_experts_inputs(tuple(hidden.shape), tuple(ids.shape), tuple(weights.shape))
    if hidden.shape[-1] is not None and int(hidden.shape[-1]) != bank.hidden_size:
        raise RoutingInputError(
            f"experts_forward: hidden size {hidden.shape[-1]} does not match the experts' {bank.hidden_size}"
        )
    chosen = resolve_backend(backend, hidden)
    return _IMPLS[chosen](hidden, ids, weights, bank, counter)


_RENAMED = {"METHODS": "BACKENDS", "PairCounter": "ExpertsCounter", "resolve_method": "resolve_backend"}


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        warn_renamed(f"dynamic_moe_router.keras.experts.{name}", _RENAMED[name])
        return globals()[_RENAMED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bucket(n: int) -> int:
    """``n`` rounded up to a multiple of ``max(8, 2**(bit_length(n) - 3))`` (at most +25%)."""
    step = max(8, 1 << max(n.bit_length() - 3, 0))
    return -(-n // step) * step


def _sorted(hidden, ids, weights, bank, counter):
    num_experts, k = bank.num_experts, int(ids.shape[1])
    flat = to_numpy(ids).reshape(-1).astype(np.int64)  # (T*k,) host copy of the routing
    if flat.size and (flat.min() < 0 or flat.max() > num_experts):
        raise RoutingInputError(f"expert ids must be in [0, {num_experts}] ({num_experts} = sentinel)")
    kept = np.flatnonzero(flat < num_experts)  # (N,) kept slots
    slots = kept[np.argsort(flat[kept], kind="stable")]  # (N,) sorted by expert
    sizes = np.bincount(flat[slots], minlength=num_experts)  # (E,)
    # JAX compiles every new shape: pad each expert's rows to a few bucket sizes (weight 0)
    pad = keras.backend.backend() == "jax"
    padded = 0
    num_tokens = int(hidden.shape[0])
    flat_w = ops.concatenate([ops.reshape(weights, (-1,)), ops.zeros((1,), dtype=weights.dtype)])  # pad -> 0
    params = _weights(bank)
    out, start = None, 0
    for e in np.flatnonzero(sizes):
        rows = slots[start : start + int(sizes[e])]  # (n_e,) slots of expert e
        start += int(sizes[e])
        if pad:
            extra = _bucket(rows.size) - rows.size
            padded += extra
            rows = np.concatenate([rows, np.full(extra, flat.size, dtype=rows.dtype)])
        tokens = np.where(rows < flat.size, rows // k, 0).astype("int32")  # (n_e,)
        x = ops.take(hidden, ops.convert_to_tensor(tokens), axis=0)  # (n_e, H)
        w = ops.take(flat_w, ops.convert_to_tensor(rows.astype("int32")), axis=0)  # (n_e,)
        y = _one_expert(bank, params, int(e), x) * ops.cast(w, hidden.dtype)[:, None]  # (n_e, H)
        part = ops.segment_sum(y, ops.convert_to_tensor(tokens), num_segments=num_tokens)  # (T, H)
        out = part if out is None else out + part
    if counter is not None:
        counter.add((flat < num_experts).reshape(-1, k).sum(axis=1))
        counter.padded_rows += padded
    return ops.zeros_like(hidden) if out is None else out


def _segments(hidden, ids, weights, bank, counter):
    import tensorflow as tf

    num_experts = bank.num_experts
    k = tf.shape(ids)[1]
    flat = tf.reshape(tf.cast(ids, tf.int32), [-1])  # (T*k,)
    kept = tf.reshape(tf.where(flat < num_experts), [-1])  # (N,) int64 kept slots
    expert = tf.gather(flat, kept)  # (N,)
    order = tf.argsort(expert, stable=True)
    slots = tf.cast(tf.gather(kept, order), tf.int32)  # (N,) sorted by expert
    sizes = tf.math.bincount(expert, minlength=num_experts, maxlength=num_experts)  # (E,)
    tokens = slots // k
    x = tf.gather(hidden, tokens)  # (N, H)
    w = tf.gather(tf.reshape(weights, [-1]), slots)  # (N,)
    if counter is not None:
        counts = tf.reduce_sum(
            tf.cast(tf.reshape(flat, tf.shape(ids)) < num_experts, tf.int32), axis=1
        )  # (T,)
        if tf.executing_eagerly():
            counter.add(counts.numpy())
        else:  # a stateful host callback: runs on every call of the tf.function (not under XLA)
            tf.numpy_function(lambda c: (counter.add(c), np.int32(0))[1], [counts], tf.int32, stateful=True)
    params = _weights(bank)
    pieces = tf.split(x, sizes, num=num_experts)
    y = tf.concat([_one_expert(bank, params, e, pieces[e]) for e in range(num_experts)], axis=0)  # (N, H)
    y = y * tf.cast(w, y.dtype)[:, None]
    return tf.math.unsorted_segment_sum(y, tokens, tf.shape(hidden)[0])


def _ragged_dot(hidden, ids, weights, bank, counter):
    import jax
    import jax.numpy as jnp

    num_experts = bank.num_experts
    num_tokens, k = hidden.shape[0], ids.shape[1]
    flat = jnp.reshape(ids, (-1,)).astype(jnp.int32)  # (T*k,)
    order = jnp.argsort(flat, stable=True)  # sentinels (E) last
    tokens = order // k  # (T*k,)
    sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)  # (E,)
    x = hidden[tokens]  # (T*k, H), rows past sum(sizes) are in no group
    w = jnp.reshape(weights, (-1,))[order]
    if counter is not None:
        counts = jnp.sum(jnp.reshape(flat, (num_tokens, k)) < num_experts, axis=1)
        jax.debug.callback(counter.add, counts)
    p = _weights(bank)

    def rhs(name: str) -> Any:
        return jnp.swapaxes(p[name], 1, 2) if bank.transposed else p[name]

    if bank.gate_up is not None:
        gate, up = jnp.split(jax.lax.ragged_dot(x, rhs("gate_up"), sizes), 2, axis=-1)  # (T*k, I)
    else:
        gate, up = jax.lax.ragged_dot(x, p["gate"], sizes), jax.lax.ragged_dot(x, p["up"], sizes)
    y = jax.lax.ragged_dot(_activate(bank, gate) * up, rhs("down"), sizes)  # (T*k, H)
    y = y * w[:, None].astype(y.dtype)
    return jax.ops.segment_sum(y, tokens, num_segments=num_tokens)


def _dense(hidden, ids, weights, bank, counter):
    num_experts = bank.num_experts
    full = ops.sum(
        ops.one_hot(ids, num_experts + 1, dtype=weights.dtype)[..., :num_experts] * weights[..., None], axis=1
    )  # (T, E)
    p = _weights(bank)
    if bank.gate_up is not None:
        eq = "th,eoh->eto" if bank.transposed else "th,eho->eto"
        gate, up = ops.split(ops.einsum(eq, hidden, p["gate_up"]), 2, axis=-1)  # (E, T, I)
    else:
        gate, up = ops.einsum("th,ehi->eti", hidden, p["gate"]), ops.einsum("th,ehi->eti", hidden, p["up"])
    eq = "eti,ehi->eth" if bank.transposed else "eti,eih->eth"
    y = ops.einsum(eq, _activate(bank, gate) * up, p["down"])  # (E, T, H)
    if counter is not None and is_concrete(ids):
        counts = to_numpy(ops.sum(ops.cast(ids < num_experts, "int32"), axis=1))
        counter.add(counts, executed=counts.size * num_experts)
    return ops.sum(y * ops.cast(ops.transpose(full), y.dtype)[:, :, None], axis=0)


# the kernels of the Keras entries of the backend table, looked up once
_IMPLS: dict[str, Callable[..., Any]] = {
    b.name: b.load() for b in BACKEND_TABLE if b.framework == "keras" and b.impl is not None
}
