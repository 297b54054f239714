"""Routing policies: frozen, validated dataclasses with a versioned JSON form."""

from ._base import POLICY_REGISTRY, RoutingPolicy, register_policy
from ._batch import BatchAware
from ._builtin import EntropyAdaptive, RelativeThreshold, StaticTopK, TopP
from ._io import (
    POLICY_FILE,
    from_pretrained,
    load_policy,
    parse_policy,
    policy_from_dict,
    policy_to_dict,
    save_policy,
)
from ._per_layer import PerLayer
from ._tile import TileAware
from .learned import LearnedAllocator

__all__ = [
    "POLICY_FILE",
    "POLICY_REGISTRY",
    "BatchAware",
    "EntropyAdaptive",
    "LearnedAllocator",
    "PerLayer",
    "RelativeThreshold",
    "RoutingPolicy",
    "StaticTopK",
    "TileAware",
    "TopP",
    "from_pretrained",
    "load_policy",
    "parse_policy",
    "policy_from_dict",
    "policy_to_dict",
    "register_policy",
    "save_policy",
]
