"""Input rules and error messages shared by every framework, on plain Python values (no arrays)."""

from __future__ import annotations

from typing import Any, Literal

from ..errors import NonFiniteRouterScoresError, RoutingInputError

__all__ = [
    "NORMALIZE_MODES",
    "Normalize",
    "check_experts_inputs",
    "check_matrix",
    "check_native_k",
    "check_normalize",
    "non_finite_error",
]

Normalize = Literal["none", "sum", "softmax"]
NORMALIZE_MODES: tuple[str, ...] = ("none", "sum", "softmax")


def check_matrix(
    name: str,
    shape: tuple[int, ...],
    *,
    floating: bool,
    dtype: Any,
    scores_shape: tuple[int, ...] | None = None,
) -> None:
    """``name`` must be a 2-D ``(tokens, experts)`` floating-point array (of ``scores_shape`` if given).

    Raises:
        RoutingInputError: naming the array and what is wrong with it.
    """
    if len(shape) != 2:
        raise RoutingInputError(f"{name} must be 2-D (tokens, experts), got shape {shape}")
    if scores_shape is not None and shape != scores_shape:
        raise RoutingInputError(f"{name} must have the shape of scores {scores_shape}, got {shape}")
    if not floating:
        raise RoutingInputError(f"{name} must be a floating-point tensor, got {dtype}")


def check_native_k(native_k: Any, num_experts: int) -> None:
    """``native_k`` must be an int in ``[1, num_experts]``."""
    if isinstance(native_k, bool) or not isinstance(native_k, int) or not 1 <= native_k <= num_experts:
        raise RoutingInputError(f"native_k must be an int in [1, {num_experts}], got {native_k!r}")


def check_normalize(normalize: Any) -> None:
    """``normalize`` must be one of :data:`NORMALIZE_MODES`."""
    if normalize not in NORMALIZE_MODES:
        raise RoutingInputError(f"normalize must be 'none', 'sum' or 'softmax', got {normalize!r}")


def non_finite_error(
    name: str, layer: int | None, bad_tokens: int, num_tokens: int
) -> NonFiniteRouterScoresError:
    """The error to raise when ``bad_tokens`` of ``num_tokens`` tokens have a non-finite ``name``."""
    where = f" in MoE layer {layer}" if layer is not None else ""
    return NonFiniteRouterScoresError(
        f"router {name}{where} contain NaN or infinite values for {bad_tokens} of {num_tokens} tokens; "
        "the model's activations overflowed or its inputs are corrupt (try fp32 or bf16 instead of "
        "fp16, and check the inputs). Pass validate=False to skip this check (such tokens then get "
        "unspecified experts, without touching other tokens).",
        layer=layer,
        bad_tokens=bad_tokens,
    )


def check_experts_inputs(
    hidden_shape: tuple[int, ...], ids_shape: tuple[int, ...], weights_shape: tuple[int, ...]
) -> None:
    """An experts forward needs ``hidden (T, H)``, ``ids (T, k)`` and ``weights (T, k)``."""
    if (
        len(hidden_shape) != 2
        or len(ids_shape) != 2
        or ids_shape[0] != hidden_shape[0]
        or weights_shape != ids_shape
    ):
        raise RoutingInputError(
            f"experts_forward expects hidden (T, H), ids (T, k) and weights (T, k); got "
            f"{hidden_shape}, {ids_shape}, {weights_shape}"
        )
