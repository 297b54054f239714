"""Finding the MoE layers of a transformers model and reading their facts from the modules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NoMoELayersError, UnsupportedModelError
from .families import FamilySpec, get_family, supported_families

__all__ = ["MoELayer", "experts_inputs", "find_moe_layers", "model_family", "unwrap"]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a model, with the facts read off its modules."""

    index: int  # decoder layer index (model.layers[index])
    path: str  # module path of the block
    block: torch.nn.Module
    router: Any  # torch.nn.Module; its attributes (weight, top_k, ...) are read by name
    experts: Any  # torch.nn.Module with gate_up_proj / down_proj
    num_experts: int  # the experts the router scores (zero-computation ones included)
    native_k: int
    hidden_size: int
    intermediate_size: int
    shared: tuple[torch.nn.Module, ...]
    #: zero-computation (identity) experts among ``num_experts``: ids ``[num_experts - zero_experts,
    #: num_experts)`` (longcat_flash); they run no GEMM and are counted apart
    zero_experts: int = 0

    @property
    def real_experts(self) -> int:
        """The experts with weights (``num_experts - zero_experts``)."""
        return self.num_experts - self.zero_experts

    @property
    def name(self) -> str:
        """Deprecated name of :attr:`path` (the module path of the block)."""
        from .._deprecation import warn_renamed

        warn_renamed("MoELayer.name", "MoELayer.path")
        return self.path

    @property
    def flops_per_pair(self) -> int:
        """Matmul FLOPs of one (token, expert) pair, ``2*H*2I + 2*I*H = 6*H*I``."""
        return 6 * self.hidden_size * self.intermediate_size


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module to patch: the original module under ``torch.compile``'s wrapper."""
    return getattr(model, "_orig_mod", model)


def experts_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden (T, H), ids (T, k))`` of a call to a MoE block's experts module, read from the
    ``args`` / ``kwargs`` of a forward pre-hook (``register_forward_pre_hook(..., with_kwargs=True)``).

    Positional arguments first (``experts(hidden, ids, weights)``); otherwise the ``hidden_states``
    keyword and the keyword whose name holds ``index`` or ``indices`` (``top_k_index``,
    ``router_indices``, ...).

    Example:
        >>> import torch
        >>> from dynamic_moe_router.hf.layers import experts_inputs
        >>> h, ids = torch.zeros(3, 8), torch.zeros(3, 2, dtype=torch.long)
        >>> experts_inputs((h, ids, None), {})[1] is ids
        True
        >>> experts_inputs((), {"hidden_states": h, "router_indices": ids, "routing_weights": None})[0] is h
        True
        >>> experts_inputs((h,), {"top_k_index": ids})[1] is ids
        True
    """
    hidden = args[0] if args else kwargs["hidden_states"]  # (T, H)
    ids = (
        args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "index" in k or "indices" in k)
    )  # (T, k)
    return hidden, ids


def model_family(model: torch.nn.Module) -> FamilySpec:
    """The family record of ``model``; raises ``UnsupportedModelError`` for anything else."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(
            f"expected a transformers model (torch.nn.Module), got {type(model).__name__}; supported "
            f"families: {', '.join(supported_families())}"
        )
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no config.model_type, so its family is unknown; pass a transformers "
            f"model of a supported family: {', '.join(supported_families())}"
        )
    try:
        family = get_family(model_type)
    except UnsupportedModelError as err:
        found = _moe_like_classes(model)
        if not found:
            raise
        raise UnsupportedModelError(
            f"{err} The model has MoE-like blocks {found} (an `experts` module or a router with "
            "`top_k`), but no family record says where their router and experts are, how the router "
            "scores or what it does with the kept weights (see 'Adding a model family' in the docs)"
        ) from None
    import transformers
    from packaging.version import Version

    # release tuples: a dev or rc build of the minimum release counts as that release
    if Version(transformers.__version__).release < Version(family.min_transformers).release:
        raise UnsupportedModelError(
            f"{model_type} needs transformers >= {family.min_transformers} (its MoE blocks differ in older "
            f"releases); this is transformers {transformers.__version__}: pip install -U transformers"
        )
    return family


def _moe_like_classes(model: torch.nn.Module) -> list[str]:
    """Class names of the modules of ``model`` that hold routed experts or a top-k router."""
    names: dict[str, None] = {}
    for module in model.modules():
        experts = getattr(module, "experts", None)
        router_k = any(hasattr(child, "top_k") for child in module.children())
        if (isinstance(experts, torch.nn.Module) and not isinstance(module, torch.nn.ModuleList)) or router_k:
            names[type(module).__name__] = None
    return list(names)


def _looks_like_moe(module: torch.nn.Module) -> bool:
    experts = getattr(module, "experts", None)
    w = getattr(experts, "gate_up_proj", None)
    return isinstance(w, torch.Tensor) and w.dim() == 3


def find_moe_layers(
    model: torch.nn.Module, family: FamilySpec | None = None
) -> tuple[list[MoELayer], list[str]]:
    """MoE layers of ``model`` in order, and the paths of MoE-like blocks the family record does not know.

    Raises:
        NoMoELayersError: when the model has no MoE block of its family.
    """
    model = unwrap(model)
    family = family or model_family(model)
    layers: list[MoELayer] = []
    unknown: list[str] = []
    for position, (name, module) in enumerate(model.named_modules()):
        if type(module).__name__ not in family.block_classes:
            if _looks_like_moe(module):
                unknown.append(name)
            continue
        router = getattr(module, family.router_attr)
        experts = getattr(module, family.experts_attr)
        num_experts, hidden = family.router_attribute(router, family.router_weight).shape
        w1 = experts.gate_up_proj
        inter = (w1.shape[2] if family.layout.transposed else w1.shape[1]) // 2
        native_k = family.native_k_override or int(family.router_attribute(router, family.router_top_k))
        match = _LAYER_RE.search(name)
        shared = tuple(
            getattr(module, a) for a in family.shared_experts if getattr(module, a, None) is not None
        )
        zero = int(family.router_attribute(experts, family.zero_experts) or 0) if family.zero_experts else 0
        if zero and int(experts.down_proj.shape[0]) + zero != int(num_experts):
            raise UnsupportedModelError(
                f"{family.model_type} block {name!r}: its router scores {int(num_experts)} experts, its "
                f"experts module has {int(experts.down_proj.shape[0])} real and {zero} zero-computation ones"
            )
        layers.append(
            MoELayer(
                index=int(match.group(1)) if match else position,
                path=name,
                block=module,
                router=router,
                experts=experts,
                num_experts=int(num_experts),
                native_k=native_k,
                hidden_size=int(hidden),
                intermediate_size=int(inter),
                shared=shared,
                zero_experts=zero,
            )
        )
    if not layers:
        raise NoMoELayersError(
            f"{type(model).__name__} ({family.model_type}) has no {'/'.join(family.block_classes)} block "
            "to patch (is num_experts 0, or are all layers dense?); nothing would change, so nothing was "
            "patched"
        )
    return layers, unknown
