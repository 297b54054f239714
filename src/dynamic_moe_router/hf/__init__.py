"""Hugging Face transformers integration: the family registry and per-instance patching."""

from .families import FAMILIES, MIN_TRANSFORMERS, FamilySpec, get_family, supported_families
from .layers import MoELayer, find_moe_layers
from .patching import PatchHandle, PatchOptions, get_patch, patch, patched, unpatch

__all__ = [
    "FAMILIES",
    "MIN_TRANSFORMERS",
    "FamilySpec",
    "MoELayer",
    "PatchHandle",
    "PatchOptions",
    "find_moe_layers",
    "get_family",
    "get_patch",
    "patch",
    "patched",
    "supported_families",
    "unpatch",
]
