"""Tiny random keras-hub MoE models built from constructor arguments (no presets, no downloads).

For tests, docs and the benchmark: every keras-hub family :func:`~.hub.patch` supports, at a size
that runs in milliseconds, plus keras-hub's GPT-OSS (an MoE family that is not supported) and
Qwen3 (a model without MoE layers) for the error paths.
"""

from __future__ import annotations

from typing import Any

from ._deps import require

__all__ = ["TINY_HUB_FAMILIES", "tiny_hub_backbone"]

_COMMON: dict[str, Any] = {"vocabulary_size": 64, "num_layers": 2, "hidden_dim": 32, "dtype": "float32"}

TINY_HUB_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralBackbone",
        {
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_dim": 48,
            "num_experts": 8,
            "top_k": 2,
            "sliding_window": None,
        },
    ),
    "qwen_moe": (
        "QwenMoeBackbone",
        {
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_dim": 64,
            "moe_intermediate_dim": 24,
            "shared_expert_intermediate_dim": 40,
            "num_experts": 8,
            "top_k": 4,
            "norm_top_k_prob": False,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeBackbone",
        {
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_dim": 64,
            "moe_intermediate_dim": 24,
            "num_experts": 8,
            "top_k": 2,
            "norm_top_k_prob": True,
        },
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeBackbone",
        {
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "moe_intermediate_dim": 24,
            "shared_expert_intermediate_size": 40,
            "num_experts": 8,
            "top_k": 2,
            "layer_types": ["full_attention", "full_attention"],
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
        },
    ),
    # not supported by dynamic_moe_router.keras.patch (error paths):
    "gpt_oss": (
        "GptOssBackbone",
        {
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_dim": 48,
            "num_experts": 4,
            "top_k": 2,
        },
    ),
    "qwen3": (
        "Qwen3Backbone",
        {"num_query_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_dim": 48},
    ),
}


def tiny_hub_backbone(family: str, seed: int = 0) -> Any:
    """A randomly initialised tiny keras-hub backbone of ``family`` (a key of :data:`TINY_HUB_FAMILIES`)."""
    keras = require("keras")
    keras_hub = require("keras_hub")
    if family not in TINY_HUB_FAMILIES:
        raise ValueError(f"unknown tiny keras-hub family {family!r}; known: {sorted(TINY_HUB_FAMILIES)}")
    cls_name, kwargs = TINY_HUB_FAMILIES[family]
    keras.utils.set_random_seed(seed)
    return getattr(keras_hub.models, cls_name)(**_COMMON, **kwargs)
