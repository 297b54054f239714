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

_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8}

_QWEN3_5 = dict(
    shared_experts=("shared_expert", "shared_expert_gate"),
    notes="softmax -> top-k -> renormalise; sigmoid-gated shared expert; gated-delta-net layers",
)

_QWEN3_5_TINY = {
    "num_hidden_layers": 3,
    "moe_intermediate_size": 24,
    "shared_expert_intermediate_size": 40,
    "num_experts": 6,
    "num_experts_per_tok": 3,
    "head_dim": 8,
    "linear_conv_kernel_dim": 3,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention"],
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
    "deepseek_v2": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 24,
        "n_routed_experts": 10,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 5,
        "topk_group": 3,
        "routed_scaling_factor": 1.5,
        "first_k_dense_replace": 1,
        "num_key_value_heads": 4,
        **_MLA,
    },
    "deepseek_v32": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 16,
        "n_routed_experts": 12,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 3,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "num_key_value_heads": 4,
        # more than the suites' sequence lengths: the indexer keeps every key (with fewer, bf16
        # near-ties flip the indexer's key choice and greedy generation diverges from native bf16)
        "index_topk": 32,
        "index_head_dim": 8,
        "index_n_heads": 2,
        **_MLA,
    },
    "glm4_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 24,
        "n_routed_experts": 10,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 1.8,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "use_qk_norm": True,
        "head_dim": 8,
    },
    "glm4_moe_lite": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 16,
        "n_routed_experts": 6,
        "num_experts_per_tok": 3,
        "n_shared_experts": 2,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.8,
        "norm_topk_prob": False,
        "num_key_value_heads": 4,
        **_MLA,
    },
    "dots1": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 24,
        "n_routed_experts": 6,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "sliding_window": 8,
        "max_window_layers": 1,
        "head_dim": 8,
    },
    "kimi_linear": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 24,
        "num_local_experts": 10,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "routed_scaling_factor": 2.446,
        "norm_topk_prob": True,
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        "num_key_value_heads": 4,
        "linear_head_dim": 8,
        "linear_num_heads": 4,
        "linear_conv_kernel_dim": 3,
        **_MLA,
    },
    "granitemoeshared": {
        "num_hidden_layers": 3,
        "intermediate_size": 24,
        "num_local_experts": 6,
        "num_experts_per_tok": 3,
        "shared_intermediate_size": 40,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.25,
        "logits_scaling": 3.0,
    },
    "granitemoehybrid": {
        "num_hidden_layers": 3,
        "intermediate_size": 24,
        "num_local_experts": 10,
        "num_experts_per_tok": 3,
        "shared_intermediate_size": 40,
        "layer_types": ["linear_attention", "attention", "linear_attention"],
        "mamba_n_heads": 4,
        "mamba_n_groups": 1,
        "mamba_d_state": 8,
        "mamba_d_conv": 4,
        "mamba_expand": 2,
        "mamba_chunk_size": 8,
        "embedding_multiplier": 2.0,
        "residual_multiplier": 0.5,
        "logits_scaling": 3.0,
    },
    "bailing_hybrid": {
        "num_hidden_layers": 3,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "num_local_experts": 10,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "n_group": 5,
        "topk_group": 3,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "first_k_dense_replace": 1,
        "layer_group_size": 3,  # linear, linear, full attention
        "head_dim": 8,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
        "num_mtp_layers": 0,
    },
    "cohere2_moe": {
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "prefix_dense_intermediate_size": 48,
        "intermediate_size": 24,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "num_shared_experts": 1,
        "shared_expert_combination_strategy": "average",
        "expert_selection_fn": "softmax",
        "norm_topk_prob": True,
        "head_dim": 8,
        "sliding_window": 16,
        "sliding_window_pattern": 2,
        "logit_scale": 0.5,
    },
    "gemma4_text": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "sliding_window": 16,
        "head_dim": 8,
        "global_head_dim": 16,
        "intermediate_size": 48,
        "enable_moe_block": True,
        "num_experts": 6,
        "top_k_experts": 3,
        "moe_intermediate_size": 24,
        "hidden_size_per_layer_input": 8,
        "vocab_size_per_layer_input": 96,
        "final_logit_softcapping": 30.0,
    },
    "flex_olmo": {
        "intermediate_size": 40,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
    },
    "jamba": {
        "num_hidden_layers": 4,  # attention 0, 2; mamba 1, 3; MoE 1, 3 (dense MLP beside)
        "intermediate_size": 56,
        "num_experts": 10,
        "num_experts_per_tok": 3,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 2,
        "attn_layer_offset": 0,
        "use_mamba_kernels": False,
        "mamba_d_state": 4,
        "mamba_d_conv": 3,
        "mamba_expand": 2,
        "mamba_dt_rank": 4,
    },
    "qwen3_next": {
        "num_hidden_layers": 4,
        "intermediate_size": 56,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 40,
        "num_experts": 10,
        "num_experts_per_tok": 3,
        "norm_topk_prob": True,
        "mlp_only_layers": [2],  # a dense layer between MoE layers
        "head_dim": 8,
        "linear_conv_kernel_dim": 3,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    },
    "qwen3_5_moe_text": dict(_QWEN3_5_TINY),
    "qwen3_5_moe": {"text_config": {**_COMMON, **_QWEN3_5_TINY}},
    "minimax": {
        "num_hidden_layers": 3,
        "intermediate_size": 24,
        "num_local_experts": 6,
        "num_experts_per_tok": 3,
        "head_dim": 8,
        "block_size": 4,
        "layer_types": ["linear_attention", "full_attention", "linear_attention"],
    },
    "exaone_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 16,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "num_shared_experts": 1,
        "n_group": 3,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "head_dim": 8,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "mlp_layer_types": ["dense", "sparse", "sparse"],
    },
    "ernie4_5_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 56,
        "moe_intermediate_size": 16,
        "moe_num_experts": 10,
        "moe_k": 3,
        "moe_num_shared_experts": 1,
        "moe_layer_start_index": 1,
        "moe_layer_end_index": -1,
        "moe_layer_interval": 1,
    },
    "hunyuan_v1_moe": {
        "intermediate_size": 24,
        "num_experts": 6,
        "moe_topk": 3,
        "head_dim": 8,
    },
    "minimax_m2": {
        "intermediate_size": 24,
        # 10 experts also routes exactly in fp32, but in bf16 a 1-ulp experts difference flips a
        # near-tie of the sigmoid+bias scores in layer 1 (tiny random weights): 6 has no such tie
        "num_local_experts": 6,
        "num_experts_per_tok": 3,
        "head_dim": 8,
    },
    "lfm2_moe": {
        "num_hidden_layers": 3,  # layer 0 dense; 1, 2 MoE; conv and attention layers
        "intermediate_size": 72,
        "moe_intermediate_size": 40,
        "num_dense_layers": 1,
        "num_experts": 6,
        "num_experts_per_tok": 3,
        "use_expert_bias": True,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.7,
        "layer_types": ["conv", "full_attention", "conv"],
    },
    "afmoe": {
        "num_hidden_layers": 3,  # layer 0 dense; 1, 2 MoE with a shared expert
        "intermediate_size": 72,
        "moe_intermediate_size": 24,
        "num_dense_layers": 1,
        "num_experts": 10,
        "num_experts_per_tok": 3,
        "num_shared_experts": 1,
        "route_scale": 2.5,
        "head_dim": 8,
        "sliding_window": 4,
        "global_attn_every_n_layers": 2,
    },
    "longcat_flash": {
        "num_hidden_layers": 4,  # 2 decoder layers, each two attention sublayers, one MoE block
        "ffn_hidden_size": 40,
        "expert_ffn_hidden_size": 24,
        "n_routed_experts": 6,
        "zero_expert_num": 3,  # zero-computation (identity) experts: ids 6, 7, 8
        "moe_topk": 3,
        "routed_scaling_factor": 1.5,
        "num_key_value_heads": 4,
        "head_dim": 4,  # the rotary dimension (= qk_rope_head_dim)
        **_MLA,
    },
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
            if name.endswith("per_expert_scale"):  # gemma4_text: a per-expert factor on the weights
                p.copy_(0.75 + 0.5 * torch.rand(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):  # selection-only biases
                b.copy_(torch.rand(b.shape, generator=gen) * 0.2)
    return model.to(dtype).eval()
