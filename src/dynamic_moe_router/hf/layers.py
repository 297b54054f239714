"""Finding the MoE layers of a transformers model and reading their facts from the modules."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NoMoELayersError, UnsupportedModelError
from .families import FamilySpec, get_family, supported_families

__all__ = ["MoELayer", "experts_inputs", "find_moe_layers", "model_family", "unwrap", "watch_routing"]

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
    #: whether the MoE block, not its experts module, adds the zero experts' identity output
    #: (longcat_flash from transformers 5.25: the block hands its experts remapped ids, each
    #: zero-expert slot turned into a real expert at weight 0)
    zero_in_block: bool = False

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


def watch_routing(
    layer: MoELayer, fn: Callable[[torch.Tensor, torch.Tensor], None]
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(hidden (T, H), ids (T, k))`` on every routing of ``layer``, patched or not; returns
    the hook's handle (``.remove()`` it when done).

    The ids are read at the experts module's inputs, except where the block rewrites them first
    (zero experts owned by the block, :attr:`MoELayer.zero_in_block`: its experts see each
    zero-expert slot as a real expert at weight 0): there they are read at the router's output.

    Example:
        >>> import torch
        >>> from dynamic_moe_router.hf.layers import find_moe_layers, watch_routing
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> model = tiny_model("mixtral")
        >>> seen = []
        >>> handle = watch_routing(find_moe_layers(model)[0][0], lambda h, ids: seen.append(ids.shape))
        >>> _ = model(torch.tensor([[5, 6, 7]]))
        >>> handle.remove()
        >>> seen
        [torch.Size([3, 2])]
    """
    if not layer.zero_in_block:

        def at_experts(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(*experts_inputs(args, kwargs))

        return layer.experts.register_forward_pre_hook(at_experts, with_kwargs=True)

    def at_router(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        ids = next(o for o in output if isinstance(o, torch.Tensor) and not o.is_floating_point())
        fn(hidden.reshape(-1, hidden.shape[-1]), ids)  # (T, H), (T, k)

    return layer.router.register_forward_hook(at_router, with_kwargs=True)


def _zero_experts(
    family: FamilySpec, path: str, block: torch.nn.Module, experts: torch.nn.Module
) -> tuple[int, bool]:
    """The number ``Z`` of zero-computation experts of a block, and whether the block (not its
    experts module) owns them: transformers 5.24 keeps ``zero_expert_num`` on longcat_flash's experts
    module, which adds their identity output itself; 5.25 moved it to the MoE block."""
    if not family.zero_experts:
        return 0, False
    owners: tuple[tuple[Any, bool], ...] = ((experts, False), (block, True))
    for owner, in_block in owners:
        try:
            value: Any = family.router_attribute(owner, family.zero_experts)
        except AttributeError:
            continue
        zero = int(value or 0)
        return zero, in_block and zero > 0
    raise UnsupportedModelError(
        f"{family.model_type} block {path!r}: neither its experts module nor the block has "
        f"{family.zero_experts!r} (its number of zero-computation experts); this transformers release "
        "changed the family's layout, which dynamic-moe-router-kit does not know yet"
    )


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
        zero, zero_in_block = _zero_experts(family, name, module, experts)
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
                zero_in_block=zero_in_block,
            )
        )
    if not layers:
        raise NoMoELayersError(
            f"{type(model).__name__} ({family.model_type}) has no {'/'.join(family.block_classes)} block "
            "to patch (is num_experts 0, or are all layers dense?); nothing would change, so nothing was "
            "patched"
        )
    return layers, unknown
