"""A dynamic MoE experts forward in JAX over the routing contract (standard SwiGLU layout).

Weights as in transformers 5 ``MixtralExperts``: ``gate_up (E, 2I, H)`` and ``down (E, H, I)``;
one expert computes ``down @ (act(gate) * up)`` with ``gate, up = split(gate_up @ x)``.

The kept (token, expert) pairs are sorted by expert. Under ``jax.jit`` shapes are static, so the
sorted buffer has ``rows = T * k_max`` rows (or the ``rows`` the caller passes, e.g. the kept
count known on the host) whose tail holds the dropped (sentinel) slots. Two experts backends
(``backend=``; ``impl=`` before 0.2):

* ``"ragged_dot"``: ``jax.lax.ragged_dot`` with the per-expert group sizes. On GPU/TPU XLA lowers
  it to a grouped GEMM that skips the rows past the last group. **On CPU, XLA (jax 0.10) lowers it
  to a dense, masked dot over all E groups**: every buffer row is multiplied by every expert, tail
  or not (``E x`` the FLOPs of the buffer's rows, i.e. ``k x`` those of running every expert on
  every token).
* ``"blocked"``: the sorted rows are laid out in blocks of ``block`` rows (16 to 64), each belonging to
  one expert (groups padded to a multiple of ``block``), and a ``jax.lax.fori_loop`` with a
  *traced* trip count (a while loop) runs only the non-empty blocks: one ``(block, H)`` GEMM pair
  per block. It computes the kept pairs plus at most ``block - 1`` padding rows per active expert,
  also under jit; the loop is sequential and not reverse-differentiable (inference only).
* ``"auto"``: ``"blocked"`` on CPU, ``"ragged_dot"`` elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from .. import core
from .._deprecation import warn_renamed
from ..backends import BACKEND_TABLE, backend_names
from ..errors import BackendUnavailableError, RoutingInputError

__all__ = ["BACKENDS", "IMPLS", "moe_forward"]

Backend = Literal["auto", "ragged_dot", "blocked"]
#: the experts backends of :func:`moe_forward` (``backend=``), from the backend table
#: :data:`dynamic_moe_router.backends.BACKEND_TABLE`
BACKENDS: tuple[str, ...] = backend_names("jax")
#: the earlier name of :data:`BACKENDS`
IMPLS = BACKENDS
Impl = Backend


def _sorted_pairs(ids: jax.Array, num_experts: int, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first ``rows`` flat slots sorted by expert (kept first, sentinels last), and group sizes."""
    k_max = ids.shape[1]
    flat = ids.reshape(-1).astype(jnp.int32)  # (N,) N = T * k_max
    order = jnp.argsort(flat, stable=True)[:rows]  # (rows,)
    group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)  # (E,)
    return order, order // k_max, group_sizes


def _ragged(hidden, ids, weights, gate_up, down, act, rows, block):
    del block  # the blocked backend's knob
    num_experts, two_i, _ = gate_up.shape
    order, tokens, group_sizes = _sorted_pairs(ids, num_experts, rows)
    x = hidden[tokens]  # (rows, H); tail rows are past the last group
    h = jax.lax.ragged_dot(x, jnp.swapaxes(gate_up, 1, 2), group_sizes)  # (rows, 2I)
    gate, up = h[:, : two_i // 2], h[:, two_i // 2 :]
    y = jax.lax.ragged_dot(act(gate) * up, jnp.swapaxes(down, 1, 2), group_sizes)  # (rows, H)
    w = weights.reshape(-1)[order].astype(y.dtype)  # (rows,), 0 at sentinels
    kept = jnp.arange(rows) < group_sizes.sum()
    y = jnp.where(kept[:, None], y * w[:, None], 0)
    return jnp.zeros_like(hidden).at[tokens].add(y.astype(hidden.dtype))


def _blocked(hidden, ids, weights, gate_up, down, act, rows, block):
    num_tokens, hidden_size = hidden.shape
    num_experts, two_i, _ = gate_up.shape
    order, tokens, group_sizes = _sorted_pairs(ids, num_experts, rows)
    padded = (group_sizes + block - 1) // block * block  # (E,) rows per expert, padded
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(group_sizes) - group_sizes  # (E,) first sorted row of each expert
    num_blocks = rows // block + num_experts  # static bound on sum(ceil(group / block))
    size = num_blocks * block
    experts = ids.reshape(-1).astype(jnp.int32)[order]  # (rows,)
    valid = experts < num_experts
    e = jnp.minimum(experts, num_experts - 1)
    dest = jnp.where(valid, padded_start[e] + jnp.arange(rows) - start[e], size)  # (rows,) slot or dump
    slot_token = jnp.full((size + 1,), num_tokens, jnp.int32).at[dest].set(tokens.astype(jnp.int32))
    slot_weight = (
        jnp.zeros((size + 1,), hidden.dtype).at[dest].set(weights.reshape(-1)[order].astype(hidden.dtype))
    )
    block_starts = jnp.arange(num_blocks) * block
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_starts, side="right"), num_experts - 1)
    active_blocks = padded_end[-1] // block  # traced trip count: only the non-empty blocks run
    padded_hidden = jnp.concatenate([hidden, jnp.zeros((1, hidden_size), hidden.dtype)])  # row T = 0

    def body(b, out):
        tok = jax.lax.dynamic_slice(slot_token, (b * block,), (block,))  # (block,)
        w = jax.lax.dynamic_slice(slot_weight, (b * block,), (block,))
        ex = block_expert[b]
        h = padded_hidden[tok] @ gate_up[ex].T  # (block, 2I)
        a = act(h[:, : two_i // 2]) * h[:, two_i // 2 :]
        y = (a @ down[ex].T) * w[:, None]  # (block, H)
        return out.at[tok].add(y)

    out = jax.lax.fori_loop(0, active_blocks, body, jnp.zeros((num_tokens + 1, hidden_size), hidden.dtype))
    return out[:num_tokens]


def _auto_block(rows: int, num_experts: int) -> int:
    """The power of two nearest to the mean rows per expert, clipped to ``[16, 64]``."""
    mean = max(rows / max(num_experts, 1), 1.0)
    return int(min(max(2 ** round(math.log2(mean)), 16), 64))


def moe_forward(
    hidden: jax.Array,  # (T, H)
    ids: jax.Array,  # (T, k_max) int, sentinel = E
    weights: jax.Array,  # (T, k_max), 0 at sentinels
    gate_up: jax.Array,  # (E, 2I, H)
    down: jax.Array,  # (E, H, I)
    *,
    act: Callable[[jax.Array], jax.Array] = jax.nn.silu,
    backend: Backend = "auto",
    rows: int | None = None,
    block: int | None = None,
    impl: Backend | None = None,
) -> jax.Array:  # (T, H)
    """Compute the experts on the kept pairs of a routing and combine them per token (jit-able).

    Args:
        hidden, ids, weights: the tokens and their routing (e.g. from
            :func:`dynamic_moe_router.jax.route`).
        gate_up, down: the fused expert weights, ``(E, 2I, H)`` and ``(E, H, I)``.
        act: the gate activation (SiLU: SwiGLU).
        backend: ``"auto"``, ``"ragged_dot"`` or ``"blocked"`` (see the module docstring for what
            XLA computes with each); static under ``jax.jit``.
        rows: the static size of the sorted pair buffer, at least the number of kept pairs;
            ``None`` means ``T * k_max`` (always enough). Passing the kept count read on the host
            compacts the buffer to exactly the kept pairs (one compilation per value).
        block: rows per block of the ``"blocked"`` implementation; ``None`` picks the power of two
            nearest to the mean rows per expert, within ``[16, 64]`` (measured on CPU: larger blocks
            amortise the loop, smaller ones pad less when the groups are small).
        impl: the deprecated name of ``backend``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from dynamic_moe_router.jax import moe_forward
        >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        >>> gate_up = jax.random.normal(k1, (4, 64, 16)); down = jax.random.normal(k2, (4, 16, 32))
        >>> ids = jnp.array([[0, 2], [1, 4], [4, 4]])  # 4 = sentinel: 3 kept pairs
        >>> w = jnp.array([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0]])
        >>> x = jax.random.normal(k3, (3, 16))
        >>> fwd = jax.jit(moe_forward, static_argnames="backend")
        >>> out = fwd(x, ids, w, gate_up, down, backend="blocked")
        >>> out.shape, bool((out[2] == 0).all())
        ((3, 16), True)
        >>> ragged = fwd(x, ids, w, gate_up, down, backend="ragged_dot")
        >>> bool(jnp.allclose(out, ragged, rtol=1e-4, atol=1e-3))
        True
    """
    if impl is not None:
        if backend != "auto":
            raise TypeError("moe_forward() got both impl= and backend=; pass only backend=")
        warn_renamed("moe_forward(impl=...)", "backend=...")
        backend = impl
    core.check_experts_inputs(tuple(hidden.shape), tuple(ids.shape), tuple(weights.shape))
    if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[0] != down.shape[0]:
        raise RoutingInputError(
            f"moe_forward expects gate_up (E, 2I, H) and down (E, H, I); got {tuple(gate_up.shape)}, "
            f"{tuple(down.shape)}"
        )
    _, two_i, hidden_size = gate_up.shape
    if hidden.shape[1] != hidden_size or down.shape[1:] != (hidden_size, two_i // 2) or two_i % 2:
        raise RoutingInputError(
            f"moe_forward: weights gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not fit "
            f"hidden {tuple(hidden.shape)}; expected gate_up (E, 2I, {hidden.shape[1]}) and down "
            f"(E, {hidden.shape[1]}, I)"
        )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise RoutingInputError(f"ids must be an integer array, got {ids.dtype}")
    if backend not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown moe_forward impl (experts backend) {backend!r}; choose one of {BACKENDS}"
        )
    total = ids.shape[0] * ids.shape[1]
    rows = total if rows is None else rows
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= total:
        raise RoutingInputError(f"rows must be an int in [0, T * k_max = {total}], got {rows!r}")
    if block is None:
        block = _auto_block(rows, gate_up.shape[0])
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise RoutingInputError(f"block must be a positive int or None, got {block!r}")
    if rows == 0:
        return jnp.zeros_like(hidden)
    if backend == "auto":
        backend = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    return _IMPLS[backend](hidden, ids, weights, gate_up, down, act, rows, block)


# the kernels of the JAX entries of the backend table, looked up once
_IMPLS: dict[str, Callable[..., jax.Array]] = {
    b.name: b.load() for b in BACKEND_TABLE if b.framework == "jax" and b.impl is not None
}
