"""The policy base class, the policy registry and shared validation helpers.

A policy answers one question per token: how many of the family's own ranked expert candidates
to keep. It never re-ranks them (the one exception, ``BatchAware(..., reroute=True)``, goes
through :meth:`RoutingPolicy.rerank_ops`). Policies are frozen dataclasses, so they are safe to
share between layers, threads and saved files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .._atomic import write_text_atomic
from .._version import __version__
from ..errors import PolicyError

if TYPE_CHECKING:
    import torch

    from ..core import Ops

__all__ = [
    "POLICY_FILE",
    "POLICY_REGISTRY",
    "RoutingPolicy",
    "policy_to_dict",
    "register_policy",
    "save_policy",
]

#: the file name of a policy saved with a model (``policy.save_pretrained(model_dir)``)
POLICY_FILE = "dmr_policy.json"


class RoutingPolicy:
    """Base class of every routing policy.

    Subclasses are frozen dataclasses registered with :func:`register_policy`. They implement
    :meth:`k_range` (the bounds of k for a layer) and one counting method, :meth:`keep_counts_ops`
    (k per token, against the framework-neutral :class:`~dynamic_moe_router.core.Ops`), which
    serves every framework; :meth:`keep_counts` is the same count on torch tensors.
    """

    #: Stable name used in policy files and on the command line (``"top_p"``).
    type_name: ClassVar[str] = ""
    #: Version of the policy's file schema; bumped when fields change meaning.
    version: ClassVar[int] = 1
    #: True for policies that read the router input ``h`` and choose a keep mask per ranked slot
    #: (:class:`~dynamic_moe_router.LearnedAllocator`): they implement ``keep_mask(h,
    #: ranked_probs, probs, layer)`` and run through ``dmr.patch`` only.
    reads_router_input: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a policy written against the torch-only API (it overrides keep_counts, not
        # keep_counts_ops) keeps working in torch; with another framework it gets a PolicyError
        if "keep_counts" in cls.__dict__ and "keep_counts_ops" not in cls.__dict__:
            cls.keep_counts_ops = _torch_only_counts(cls.__dict__["keep_counts"])

    # -- the contract -------------------------------------------------------------------------
    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        """Return ``(min_k, max_k)`` for a layer with ``num_experts`` experts and native top-k.

        Raises:
            PolicyError: if the policy's bounds do not fit the layer.
        """
        raise NotImplementedError

    def keep_counts_ops(
        self,
        ops: Ops,
        ranked_probs: Any,  # (T, k_max) float32 array of ops' framework
        probs: Any,  # (T, E) float32
        k_min: int,
        k_max: int,
    ) -> Any:  # (T,) ops' "int" dtype, in [k_min, k_max]
        """Number of leading ranked candidates each token keeps: the policy's one counting method.

        Written against the :class:`~dynamic_moe_router.core.Ops` adapter ``ops`` (see
        :mod:`dynamic_moe_router.core`), so the same code runs in torch, JAX and Keras.
        ``ranked_probs (T, k_max)`` is the policy distribution at the family's ranked candidates,
        ``probs (T, E)`` the whole distribution (either may be ``None`` when a policy does not read
        it).
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement keep_counts_ops")

    def keep_counts(
        self,
        ranked_probs: torch.Tensor,  # (T, k_max): the policy distribution at the ranked candidates
        probs: torch.Tensor,  # (T, E): the full policy distribution
        k_min: int,
        k_max: int,
    ) -> torch.Tensor:  # (T,) int64 in [k_min, k_max]
        """:meth:`keep_counts_ops` on torch tensors (with :data:`~dynamic_moe_router.core.TORCH_OPS`)."""
        from ..core import TORCH_OPS

        return self.keep_counts_ops(TORCH_OPS, ranked_probs, probs, k_min, k_max)

    def rerank_ops(
        self,
        ops: Ops,
        scores: Any,  # (T, E) the family's ranking scores (-inf: excluded)
        ranked_ids: Any,  # (T, k_max) the family's top-k_max
        ranked_probs: Any,  # (T, k_max) float32, probs at the family's top-k_max
        probs: Any,  # (T, E) float32
        native_k: int,
    ) -> tuple[Any, Any] | None:  # ((T, k_max) ids, (T,) counts), or None
        """Candidates of the policy's own, for a policy that keeps slots outside the family's
        top-``k_max`` (``BatchAware(..., reroute=True)``): the ranked ids (each row in the family's
        order) and each token's count, at most its own candidates in the row. ``None`` (the
        default): the family's ranking and :meth:`keep_counts_ops`.

        The routing core caps the counts at the finite candidates and keeps a prefix of each row, as
        for every policy.
        """
        return None

    def overhead_flops(self, hidden_size: int) -> int:
        """Matmul FLOPs the policy itself spends per token and MoE layer (0 for score policies;
        reported apart from the routed-expert FLOPs by :func:`dynamic_moe_router.profile`)."""
        return 0

    def for_layer(self, layer: int | None) -> RoutingPolicy:
        """The policy that applies to MoE layer ``layer`` (itself, except for :class:`PerLayer`)."""
        return self

    def layers(self) -> tuple[int, ...]:
        """Layer indices this policy names explicitly (only :class:`PerLayer` names any)."""
        return ()

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict stamped with the policy type and schema version."""
        return policy_to_dict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the policy as JSON to ``path`` (atomically: no half-written file on failure)."""
        save_policy(self, path)

    def save_pretrained(self, model_dir: str | os.PathLike[str]) -> None:
        """Save the policy with a model: ``model_dir/dmr_policy.json`` (next to the weights, as a
        generation config is), which ``dmr.patch(model, "auto")``, :func:`dynamic_moe_router.from_pretrained`
        and ``dmr eval`` / ``dmr profile`` (without ``--policy``) find. ``model_dir`` must exist."""
        folder = Path(model_dir)
        if not folder.is_dir():
            raise PolicyError(
                f"save_pretrained: {str(folder)!r} is not a directory; pass the model's folder (the one "
                "with config.json)",
                field="model_dir",
            )
        self.save(folder / POLICY_FILE)

    def describe(self) -> str:
        """A short human-readable description, e.g. ``top_p(p=0.6, min_k=1, max_k=native)``."""
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("json", True) is False:
                continue
            value = getattr(self, f.name)
            parts.append(f"{f.name}={'native' if value is None else value}")
        return f"{self.type_name}({', '.join(parts)})"


def _torch_only_counts(torch_counts: Callable[..., Any]) -> Callable[..., Any]:
    """``keep_counts_ops`` for a policy that implements only the torch ``keep_counts``."""

    def keep_counts_ops(
        self: RoutingPolicy, ops: Any, ranked_probs: Any, probs: Any, k_min: int, k_max: int
    ) -> Any:
        if getattr(ops, "name", None) == "torch":
            return torch_counts(self, ranked_probs, probs, k_min, k_max)
        raise PolicyError(
            f"{type(self).__name__} implements keep_counts for torch only; implement "
            f"keep_counts_ops(ops, ranked_probs, probs, k_min, k_max) (see dynamic_moe_router.core) "
            f"to use it with {getattr(ops, 'name', ops)!r}"
        )

    return keep_counts_ops


def policy_to_dict(policy: RoutingPolicy) -> dict[str, Any]:
    """Serialise a policy (recursively for ``PerLayer``) to a JSON-ready dict."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(policy):  # type: ignore[arg-type]
        if f.metadata.get("json", True) is False:  # e.g. a learned policy's tensors (own file)
            continue
        value = getattr(policy, f.name)
        if isinstance(value, RoutingPolicy):
            value = policy_to_dict(value)
        elif f.name == "overrides":
            value = {str(k): policy_to_dict(v) for k, v in value.items()}
        data[f.name] = value
    return {"_type": policy.type_name, "_version": policy.version, "_data": data, "dmr_version": __version__}


def save_policy(policy: RoutingPolicy, path: str | os.PathLike[str]) -> None:
    """Write ``policy`` to ``path`` as JSON, atomically (temporary file, then rename)."""
    write_text_atomic(path, json.dumps(policy_to_dict(policy), indent=2, sort_keys=True) + "\n")


POLICY_REGISTRY: dict[str, type[RoutingPolicy]] = {}

P = TypeVar("P", bound=type[RoutingPolicy])


def register_policy(type_name: str, version: int = 1) -> Callable[[P], P]:
    """Class decorator that registers a policy under ``type_name`` for files and the CLI.

    Example:
        >>> from dynamic_moe_router.policies import POLICY_REGISTRY
        >>> sorted(POLICY_REGISTRY)[:3]
        ['batch_aware', 'entropy', 'learned']
    """

    def decorator(cls: P) -> P:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"policy {cls.__name__} must be a frozen dataclass")
        if type_name in POLICY_REGISTRY and POLICY_REGISTRY[type_name] is not cls:
            raise ValueError(f"policy type name {type_name!r} is already registered")
        cls.type_name = type_name
        cls.version = version
        POLICY_REGISTRY[type_name] = cls
        return cls

    return decorator


# -- validation helpers used by the concrete policies -------------------------------------------
def check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{name} must be an integer, got {value!r} ({type(value).__name__})", field=name)
    if value < minimum:
        raise PolicyError(f"{name} must be >= {minimum}, got {value}", field=name)


def check_bounds(min_k: Any, max_k: Any) -> None:
    """``min_k >= 0`` and ``max_k`` either ``None`` (the native k) or ``>= 1``."""
    check_int("min_k", min_k, minimum=0)
    check_int("max_k", max_k, minimum=1, allow_none=True)


def check_float(name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{name} must be a number, got {value!r} ({type(value).__name__})", field=name)
    v = float(value)
    if math.isnan(v) or v > high or v < low or (low_open and v == low):
        bracket = "(" if low_open else "["
        raise PolicyError(f"{name} must be in {bracket}{low}, {high}], got {value}", field=name)


def resolve_bounds(
    policy: RoutingPolicy, min_k: int, max_k: int | None, native_k: int, num_experts: int
) -> tuple[int, int]:
    """Shared ``k_range`` logic: ``max_k=None`` means the native k; ``max_k`` may exceed it up to E."""
    k_max = native_k if max_k is None else max_k
    if k_max > num_experts:
        raise PolicyError(
            f"{policy.type_name}: max_k={k_max} exceeds the layer's number of experts E={num_experts}; "
            f"use max_k <= {num_experts}",
            field="max_k",
        )
    if min_k > k_max:
        what = f"the native k={native_k} (max_k=None)" if max_k is None else f"max_k={max_k}"
        raise PolicyError(
            f"{policy.type_name}: min_k={min_k} is larger than {what}; lower min_k or raise max_k",
            field="min_k",
        )
    return min_k, k_max
