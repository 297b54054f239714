"""A transformers Mixtral checkpoint as a keras-hub ``MixtralCausalLM`` (weights copied, fp32 by default).

keras-hub's Mixtral expresses the reference checkpoints exactly: RMSNorm with ``rms_norm_eps``,
RoPE (``rope_type="default"``) with ``rope_theta``, grouped-query attention with
``head_dim = hidden_size / num_attention_heads``, no sliding window (``sliding_window=None``),
softmax -> top-k -> renormalised routing, SwiGLU experts. Tied embeddings
(``tie_word_embeddings=True``) are copied into keras-hub's separate ``reverse_embeddings``.
Anything keras-hub cannot express raises :class:`~dynamic_moe_router.UnsupportedModelError`.
keras-hub's own transformers converter reads ``lm_head.weight``, which a tied checkpoint lacks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import UnsupportedModelError
from ._deps import require

__all__ = ["load_transformers_mixtral", "mixtral_backbone_config", "mixtral_from_transformers", "token_nll"]


def mixtral_backbone_config(config: Any) -> dict[str, Any]:
    """``MixtralBackbone`` arguments for a transformers ``MixtralConfig``.

    Raises:
        UnsupportedModelError: a feature keras-hub's Mixtral does not have.
    """
    problems = []
    if getattr(config, "model_type", None) != "mixtral":
        problems.append(f"model_type is {getattr(config, 'model_type', None)!r}, not 'mixtral'")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim={head_dim} x heads != hidden_size={config.hidden_size}")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope.get("rope_type", "default") != "default" or theta is None:
        problems.append(f"rope parameters {rope} (keras-hub: default RoPE with a theta)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (keras-hub: silu)")
    if problems:
        raise UnsupportedModelError(
            "keras-hub's MixtralBackbone cannot express this checkpoint: " + "; ".join(problems)
        )
    return {
        "vocabulary_size": config.vocab_size,
        "num_layers": config.num_hidden_layers,
        "num_query_heads": config.num_attention_heads,
        "hidden_dim": config.hidden_size,
        "intermediate_dim": config.intermediate_size,
        "num_key_value_heads": config.num_key_value_heads,
        "num_experts": config.num_local_experts,
        "top_k": config.num_experts_per_tok,
        "rope_max_wavelength": float(theta),  # pyright: ignore[reportArgumentType] (None raised above)
        "layer_norm_epsilon": config.rms_norm_eps,
        "sliding_window": config.sliding_window,
        "router_jitter_noise": 0.0,
    }


def load_transformers_mixtral(path: str | os.PathLike[str]) -> Any:
    """A transformers ``MixtralForCausalLM`` from a local folder, in fp32 and eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def mixtral_from_transformers(model: Any, *, dtype: str = "float32") -> Any:
    """A keras-hub ``MixtralCausalLM`` (no preprocessor) with the weights of a transformers Mixtral.

    ``model`` is a ``MixtralForCausalLM`` or the path of a local checkpoint folder.

    Raises:
        UnsupportedModelError: not a Mixtral, or a feature keras-hub cannot express.
    """
    keras_hub = require("keras_hub")
    if isinstance(model, (str, os.PathLike)):
        model = load_transformers_mixtral(model)
    config = model.config
    backbone = keras_hub.models.MixtralBackbone(**mixtral_backbone_config(config), dtype=dtype)
    hf = model.model
    heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    head_dim = hidden // heads
    embed = _np(hf.embed_tokens.weight)  # (V, H)
    backbone.token_embedding.embeddings.assign(embed)
    backbone.token_embedding.reverse_embeddings.assign(_np(model.lm_head.weight).T)  # (H, V), tied or not
    for i, layer in enumerate(hf.layers):
        dec = backbone.transformer_layers[i]
        att, moe = dec._self_attention_layer, dec._sparse_moe_block
        dec._self_attention_layernorm.scale.assign(_np(layer.input_layernorm.weight))
        dec._feedforward_layernorm.scale.assign(_np(layer.post_attention_layernorm.weight))
        att.query_dense.kernel.assign(_np(layer.self_attn.q_proj.weight).T.reshape(hidden, heads, head_dim))
        att.key_dense.kernel.assign(_np(layer.self_attn.k_proj.weight).T.reshape(hidden, kv_heads, head_dim))
        att.value_dense.kernel.assign(
            _np(layer.self_attn.v_proj.weight).T.reshape(hidden, kv_heads, head_dim)
        )
        att.output_dense.kernel.assign(_np(layer.self_attn.o_proj.weight).T.reshape(heads, head_dim, hidden))
        moe._sparse_feedforward_gate_dense.kernel.assign(_np(layer.mlp.gate.weight).T)  # (H, E)
        gate_up = _np(layer.mlp.experts.gate_up_proj)  # (E, 2I, H)
        inter = gate_up.shape[1] // 2
        bank = moe.expert_bank
        bank._expert_feedforward_gate_dense.assign(gate_up[:, :inter].transpose(0, 2, 1))  # (E, H, I)
        bank._expert_feedforward_intermediate_dense.assign(gate_up[:, inter:].transpose(0, 2, 1))
        bank._expert_feedforward_output_dense.assign(_np(layer.mlp.experts.down_proj).transpose(0, 2, 1))
    backbone.layer_norm.scale.assign(_np(hf.norm.weight))
    return keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)


def token_nll(causal_lm: Any, windows: np.ndarray) -> np.ndarray:
    """Next-token negative log-likelihoods ``(B, S-1)`` of token windows ``(B, S)`` (full attention)."""
    from keras import ops

    windows = np.asarray(windows, dtype="int32")
    logits = causal_lm({"token_ids": windows, "padding_mask": np.ones_like(windows)})  # (B, S, V)
    logp = ops.log_softmax(ops.cast(logits[:, :-1], "float32"), axis=-1)
    target = ops.convert_to_tensor(windows[:, 1:, None])
    return -np.asarray(ops.convert_to_numpy(ops.take_along_axis(logp, target, axis=-1)))[..., 0]
