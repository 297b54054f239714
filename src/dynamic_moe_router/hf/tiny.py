"""Tiny random configurations of every supported family, for tests, docs and ``tiny:FAMILY``.

They exercise each family's particular features (shared experts, dense layers beside MoE layers,
groups and a selection bias, router bias, interleaved SwiGLU) at a size that runs in milliseconds.

Example:
    >>> from dynamic_moe_router.hf.tiny import tiny_model
    >>> model = tiny_model("olmoe")
    >>> model.config.model_type, model.config.num_experts
    ('olmoe', 8)
"""

from __future__ import annotations

from typing import Any

import torch

from .families import get_family

__all__ = ["TINY_CONFIGS", "tiny_config", "tiny_model"]

_COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 8, "num_experts_per_tok": 2},
    "olmoe": {"intermediate_size": 24, "num_experts": 8, "num_experts_per_tok": 4, "norm_topk_prob": False},
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
        "mlp_only_layers": [1],
        "decoder_sparse_step": 1,
    },
    "qwen3_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 24,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "head_dim": 8,
    },
    "deepseek_v3": {
        "num_hidden_layers": 3,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "q_lora_rank": 16,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
    "gpt_oss": {
        "intermediate_size": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "sliding_window": 16,
        "max_position_embeddings": 131072,  # matches its YaRN rope factor (32 x 4096)
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "granitemoe": {"intermediate_size": 24, "num_local_experts": 8, "num_experts_per_tok": 2},
    "phimoe": {"intermediate_size": 24, "num_local_experts": 8, "num_experts_per_tok": 2},
}


def tiny_config(family: str, **overrides: Any):
    """A tiny transformers config of ``family`` (``overrides`` replace any field)."""
    from transformers import AutoConfig

    get_family(family)  # typed error for unknown families
    kwargs = {**_COMMON, **TINY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny randomly initialised causal LM of ``family`` in eval mode.

    Weights are drawn with a fixed ``seed``; DeepSeek's selection bias is randomised too so that
    it actually changes the ranking.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("bias"):
                p.copy_(
                    torch.randn(p.shape, generator=gen)
                    * (0.5 if "router" in name or "gate." in name else 0.1)
                )
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=gen) * 0.2)
    return model.to(dtype).eval()
