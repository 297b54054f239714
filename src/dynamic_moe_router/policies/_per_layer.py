"""``PerLayer``: a default policy with per-layer overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import PolicyError
from ._base import RoutingPolicy, register_policy

__all__ = ["PerLayer"]


@register_policy("per_layer")
@dataclass(frozen=True)
class PerLayer(RoutingPolicy):
    """Use ``overrides[i]`` for MoE layer ``i`` and ``default`` everywhere else.

    With ``default=None`` the overrides must cover every MoE layer of the model: patching a model
    with a layer that has no override then raises a :class:`~dynamic_moe_router.PolicyError`
    naming it. Calibrated per-layer policies are written this way, so their files carry no
    default that is never used.

    Layer indices are the decoder-layer indices of the model (``model.layers[i]``), the same
    numbers ``dmr inspect`` and profiling reports print. Patching a model with an override for a
    layer that has no MoE block raises a :class:`~dynamic_moe_router.PolicyError` listing the MoE
    layers; it is never ignored. Overrides cannot nest another ``PerLayer``.

    Example:
        >>> import dynamic_moe_router as dmr
        >>> pol = dmr.PerLayer(dmr.StaticTopK(), {3: dmr.TopP(p=0.5)})
        >>> pol.for_layer(3), pol.for_layer(0)
        (TopP(p=0.5, min_k=1, max_k=None), StaticTopK(k=None))
        >>> only = dmr.PerLayer(None, {0: dmr.TopP(p=0.5)})
        >>> try:
        ...     only.for_layer(1)
        ... except dmr.PolicyError as err:
        ...     print(str(err).split(";")[0])
        per_layer: layer 1 has no override and the policy has no default

    """

    default: RoutingPolicy | None = field(default_factory=lambda: _static())
    overrides: Mapping[int, RoutingPolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default is not None and (
            not isinstance(self.default, RoutingPolicy)
            or isinstance(self.default, PerLayer)
            or self.default.reads_router_input
        ):
            raise PolicyError(
                f"per_layer: default must be a non-PerLayer policy or None, got {self.default!r}",
                field="default",
            )
        if not isinstance(self.overrides, Mapping):
            raise PolicyError(
                f"per_layer: overrides must be a mapping {{layer_index: policy}}, got {self.overrides!r}",
                field="overrides",
            )
        clean: dict[int, RoutingPolicy] = {}
        for key, pol in self.overrides.items():
            if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                raise PolicyError(
                    f"per_layer: override keys must be layer indices (int >= 0), got {key!r}",
                    field="overrides",
                )
            if not isinstance(pol, RoutingPolicy) or isinstance(pol, PerLayer) or pol.reads_router_input:
                raise PolicyError(
                    f"per_layer: override for layer {key} must be a score policy (not PerLayer or a learned "
                    f"allocator, which already has one head per layer), got {type(pol).__name__}",
                    field="overrides",
                )
            clean[key] = pol
        if self.default is None and not clean:
            raise PolicyError(
                "per_layer: without a default policy the overrides must name at least one layer",
                field="overrides",
            )
        object.__setattr__(self, "overrides", MappingProxyType(dict(sorted(clean.items()))))

    def __hash__(self) -> int:
        return hash((self.default, tuple(self.overrides.items())))

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, PerLayer):
            return NotImplemented
        return self.default == other.default and dict(self.overrides) == dict(other.overrides)

    def __repr__(self) -> str:
        return f"PerLayer(default={self.default!r}, overrides={dict(self.overrides)!r})"

    def for_layer(self, layer: int | None) -> RoutingPolicy:
        if layer is not None and layer in self.overrides:
            return self.overrides[layer]
        if self.default is None:
            raise PolicyError(
                f"per_layer: layer {layer} has no override and the policy has no default; add an override "
                f"for layer {layer} or give a default policy",
                field="overrides",
            )
        return self.default

    def layers(self) -> tuple[int, ...]:
        return tuple(self.overrides)

    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        raise PolicyError(
            "per_layer: resolve the layer first with policy.for_layer(layer); route() does this when "
            "given layer=...",
            field="overrides",
        )

    def keep_counts_ops(self, ops: Any, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any:
        raise PolicyError(
            "per_layer: resolve the layer first with policy.for_layer(layer)", field="overrides"
        )

    def describe(self) -> str:
        inner = ", ".join(f"{k}: {v.describe()}" for k, v in self.overrides.items())
        default = "none" if self.default is None else self.default.describe()
        return f"per_layer(default={default}, overrides={{{inner}}})"


def _static() -> RoutingPolicy:
    from ._builtin import StaticTopK

    return StaticTopK()
