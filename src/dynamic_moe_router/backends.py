"""The experts backends of every framework, as one declarative table (importable without torch).

Each :class:`Backend` entry names its framework, a one-line summary, its implementation (the
kernel entry point, as ``"module:function"``, imported only when first used) and, where a backend
cannot always run, its can-run check (``"module:function"``, returning ``None`` or the reason it
cannot run). ``"auto"`` has no implementation: each framework's resolver picks a concrete backend.

Derived from the table: :data:`BACKENDS` (the PyTorch ``backend=`` choices, which ``dmr --backend``
offers), the JAX and Keras ``BACKENDS`` tuples, the dispatch of every experts forward, and the
docs' backend list (:func:`backends_markdown`). A new backend is one entry here plus its kernel.

Example:
    >>> from dynamic_moe_router.backends import BACKENDS, backend_names, get_backend
    >>> BACKENDS
    ('auto', 'loop', 'grouped', 'cuda', 'triton')
    >>> backend_names("jax")
    ('auto', 'ragged_dot', 'blocked')
    >>> get_backend("grouped").check
    'dynamic_moe_router.experts._forward:grouped_reason'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import BackendUnavailableError

__all__ = ["BACKENDS", "BACKEND_TABLE", "Backend", "backend_names", "backends_markdown", "get_backend"]

Framework = Literal["torch", "jax", "keras"]


@dataclass(frozen=True)
class Backend:
    """One experts backend: where it runs, what it is, its kernel and its can-run check."""

    name: str
    framework: Framework
    summary: str
    #: ``"module:function"`` of the kernel entry point; ``None`` for ``"auto"``
    impl: str | None = None
    #: ``"module:function"`` returning ``None`` or why the backend cannot run; ``None``: always runs
    check: str | None = None

    def load(self) -> Callable[..., Any]:
        """The implementation (imports its module)."""
        if self.impl is None:
            raise BackendUnavailableError(
                f"experts backend {self.name!r} chooses another one; it has no kernel"
            )
        return _resolve(self.impl)

    def load_check(self) -> Callable[..., str | None]:
        """The can-run check (a function that always answers ``None`` when the entry has none)."""
        return _always if self.check is None else _resolve(self.check)


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _always(*args: Any, **kwargs: Any) -> None:
    return None


_T = "dynamic_moe_router.experts._forward"
_K = "dynamic_moe_router.keras.experts"
_J = "dynamic_moe_router.jax._experts"

BACKEND_TABLE: tuple[Backend, ...] = (
    # -- PyTorch (dynamic_moe_router.experts, dmr --backend) --------------------------------------
    Backend("auto", "torch", "the fastest backend that can run the layer's device, dtype and shape"),
    Backend("loop", "torch", "one GEMM pair per active expert over its kept rows; any device", f"{_T}:_loop"),
    Backend(
        "grouped", "torch", "kept pairs compacted, two grouped_mm GEMMs (host sync for the pair count)",
        f"{_T}:_grouped", f"{_T}:grouped_reason",
    ),
    Backend(
        "cuda", "torch", "GPU prefill, sync-free: Triton gather/SwiGLU/combine around grouped_mm",
        f"{_T}:_cuda", f"{_T}:cuda_reason",
    ),
    Backend(
        "triton", "torch", "GPU decode, sync-free: Triton grouped GEMMs over a block table",
        f"{_T}:_triton", "dynamic_moe_router.experts._gpu:triton_reason",
    ),
    # -- Keras 3 (dynamic_moe_router.keras) --------------------------------------------------------
    Backend("auto", "keras", "segments on TensorFlow, sorted on concrete JAX arrays, ragged_dot under jit"),
    Backend("sorted", "keras", "eager: kept pairs grouped by expert on the host, keras.ops", f"{_K}:_sorted"),
    Backend("segments", "keras", "TensorFlow (also tf.function): dynamic-shape segments", f"{_K}:_segments"),
    Backend("ragged_dot", "keras", "JAX (also jax.jit): ragged_dot over sorted slots", f"{_K}:_ragged_dot"),
    Backend("dense", "keras", "every expert on every token (the keras-hub computation)", f"{_K}:_dense"),
    # -- JAX / Flax (dynamic_moe_router.jax) -------------------------------------------------------
    Backend("auto", "jax", "blocked on CPU, ragged_dot elsewhere"),
    Backend("ragged_dot", "jax", "jax.lax.ragged_dot over the sorted pair buffer", f"{_J}:_ragged"),
    Backend("blocked", "jax", "fori_loop over non-empty blocks of one expert's rows", f"{_J}:_blocked"),
)  # fmt: skip


def backend_names(framework: Framework = "torch") -> tuple[str, ...]:
    """The backend names of ``framework``, ``"auto"`` first, in table order."""
    return tuple(b.name for b in BACKEND_TABLE if b.framework == framework)


#: The PyTorch experts backends (``dmr.patch(backend=...)``, ``dmr --backend``).
BACKENDS: tuple[str, ...] = backend_names("torch")


def get_backend(name: str, framework: Framework = "torch") -> Backend:
    """The entry of backend ``name``; :class:`~dynamic_moe_router.BackendUnavailableError` if unknown."""
    for b in BACKEND_TABLE:
        if b.name == name and b.framework == framework:
            return b
    raise BackendUnavailableError(
        f"unknown experts backend {name!r}; choose one of {backend_names(framework)}"
    )


def backends_markdown() -> str:
    """The backend table as Markdown (the docs' backend list)."""
    rows = ["| framework | backend | what it does |", "|---|---|---|"]
    rows += [f"| {b.framework} | `{b.name}` | {b.summary} |" for b in BACKEND_TABLE]
    return "\n".join(rows)
