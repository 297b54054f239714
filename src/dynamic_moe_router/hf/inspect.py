"""``inspect_model``: what dynamic-moe-router sees in a model (MoE layers, E, native k, scoring)."""

from __future__ import annotations

import os
from typing import Any

import torch

from .. import core
from ..errors import UnsupportedModelError
from ..policies import RoutingPolicy, StaticTopK
from .families import get_family
from .fused_routing import layer_reason
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


def inspect_model(model: torch.nn.Module, policy: RoutingPolicy | None = None) -> dict[str, Any]:
    """A JSON-ready description of the MoE layers of ``model``.

    Each layer's ``fused_routing`` says whether ``dmr.patch(..., fused_routing=True)`` routes it
    with the fused kernel under ``policy`` (default: the native ``StaticTopK()``): ``"covered"``,
    or why it runs the ordinary routing.

    Example:
        >>> from dynamic_moe_router.hf.inspect import inspect_model
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> info = inspect_model(tiny_model("qwen2_moe"))
        >>> info["family"], [layer["layer"] for layer in info["layers"]], info["layers"][0]["shared_experts"]
        ('qwen2_moe', [0, 2], ['shared_expert', 'shared_expert_gate'])
        >>> info["weights"]  # this checkpoint's weight rule, with its config's value
        'raw: norm_topk_prob=False in this config'

    """
    layers, unknown = find_moe_layers(model)
    config: Any = model.config
    family = get_family(config.model_type)
    policy = StaticTopK() if policy is None else policy
    core.validate_policy(policy, layers, family=family.model_type, router_input=True)  # as patch() would
    rows = []
    rules = []
    for layer in layers:
        flag = getattr(layer.router, "norm_topk_prob", None)
        if family.scoring == "topk_softmax":
            rule = family.renorm_doc()
        else:
            rule = core.weight_rule_text(family.renorm, flag, "norm_topk_prob")
        rules.append(rule)
        rows.append(
            {
                "layer": layer.index,
                "module": layer.path,
                "num_experts": layer.num_experts,
                "native_k": layer.native_k,
                "hidden_size": layer.hidden_size,
                "expert_intermediate_size": layer.intermediate_size,
                "flops_per_pair": layer.flops_per_pair,
                "renormalises": family.scorer.native_renormalize(layer.router, family.renorm),
                "weights": rule,
                "shared_experts": [
                    a for a in family.shared_experts if getattr(layer.block, a, None) is not None
                ],
                "fused_routing": layer_reason(family.scorer, layer, policy) or "covered",
                # how the layer was recognised: the family record's block class, router and scorer
                "recognised_by": (
                    f"family record {family.model_type!r}: block {type(layer.block).__name__}, router "
                    f"{family.router_attr} ({type(layer.router).__name__}, scoring {family.scoring!r}), "
                    f"experts {family.experts_attr} ({type(layer.experts).__name__})"
                ),
            }
        )
    distinct = sorted(set(rules))
    return {
        "family": family.model_type,
        "model_class": type(model).__name__,
        "policy": policy.describe(),
        "scoring": family.notes,
        "policy_distribution": family.scorer.distribution,
        "weights": distinct[0] if len(distinct) == 1 else "; ".join(distinct),
        "moe_layers": len(rows),
        "unknown_moe_like_blocks": unknown,
        "layers": rows,
    }
