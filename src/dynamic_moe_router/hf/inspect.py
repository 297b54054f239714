"""``inspect_model``: what dynamic-moe-router sees in a model (MoE layers, E, native k, scoring)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .families import get_family
from .layers import find_moe_layers

__all__ = ["inspect_model", "load_model_skeleton"]


def load_model_skeleton(source: str) -> torch.nn.Module:
    """A model to inspect: ``tiny:FAMILY`` builds a tiny one; a directory is read as a checkpoint's
    config and built on the ``meta`` device (no weights are loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if source.startswith("tiny:"):
        from .tiny import tiny_model

        return tiny_model(source.split(":", 1)[1])
    if not os.path.isdir(source):
        raise UnsupportedModelError(
            f"{source!r} is neither a model directory nor tiny:FAMILY (e.g. tiny:mixtral)"
        )
    if not os.path.isfile(os.path.join(source, "config.json")):
        raise UnsupportedModelError(f"{source!r} has no config.json, so it is not a transformers checkpoint")
    config = AutoConfig.from_pretrained(source)
    get_family(getattr(config, "model_type", ""))  # typed error before building anything
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def inspect_model(model: torch.nn.Module) -> dict[str, Any]:
    """A JSON-ready description of the MoE layers of ``model``.

    Example:
        >>> from dynamic_moe_router.hf.inspect import inspect_model
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> info = inspect_model(tiny_model("qwen2_moe"))
        >>> info["family"], [layer["layer"] for layer in info["layers"]], info["layers"][0]["shared_experts"]
        ('qwen2_moe', [0, 2], ['shared_expert', 'shared_expert_gate'])
    """
    layers, unknown = find_moe_layers(model)
    spec = get_family(model.config.model_type)
    renorm = spec.renorm_doc()
    rows = []
    for layer in layers:
        norm = getattr(layer.router, "norm_topk_prob", None)
        rows.append(
            {
                "layer": layer.index,
                "module": layer.name,
                "num_experts": layer.num_experts,
                "native_k": layer.native_k,
                "hidden_size": layer.hidden_size,
                "expert_intermediate_size": layer.intermediate_size,
                "flops_per_pair": layer.flops_per_pair,
                "renormalises": (spec.renorm == "always" or bool(norm)) if spec.renorm != "never" else False,
                "shared_experts": [
                    a for a in spec.shared_experts if getattr(layer.block, a, None) is not None
                ],
            }
        )
    return {
        "family": spec.model_type,
        "model_class": type(model).__name__,
        "scoring": spec.notes,
        "policy_distribution": spec.scorer.distribution,
        "weights": renorm,
        "moe_layers": len(rows),
        "unknown_moe_like_blocks": unknown,
        "layers": rows,
    }
