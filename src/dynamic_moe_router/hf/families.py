"""The registry of supported transformers MoE families: plain data, one record per family.

A record says where the router and experts live in the family's MoE block, how the router scores
(a key into :data:`~dynamic_moe_router.hf.scoring.SCORERS`), whether the family renormalises the
kept weights, in which dtype it returns them, how its expert weights are laid out, and which
modules are shared experts (run on every token, never routed).

Example:
    >>> import dynamic_moe_router as dmr
    >>> len(dmr.supported_families()), dmr.supported_families()[:3]
    (32, ('afmoe', 'bailing_hybrid', 'cohere2_moe'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..core import WeightRule, weight_rule_doc
from ..experts import GPT_OSS, STANDARD, ExpertsLayout
from .scoring import SCORERS

__all__ = [
    "FAMILIES",
    "MIN_TRANSFORMERS",
    "UNSUPPORTED_FAMILIES",
    "FamilySpec",
    "families_markdown",
    "get_family",
    "supported_families",
]

#: Oldest transformers release the registry was checked against (fused 3-D experts, v5 routers).
MIN_TRANSFORMERS = "5.17.0"


@dataclass(frozen=True)
class FamilySpec:
    """Facts about one transformers MoE family (see the module docstring)."""

    model_type: str
    block_classes: tuple[str, ...]
    router_attr: str
    scoring: str
    #: kept weights renormalised always (``"always"``), if ``router.norm_topk_prob``
    #: (``"config"``), or never (``"never"``)
    renorm: WeightRule
    #: dtype of the returned weights, fp32 as computed (``"fp32"``), the logits'
    #: (``"logits"``) or the hidden states' (``"hidden"``)
    weights_dtype: Literal["fp32", "logits", "hidden"]
    #: router linear in the model dtype (``"model"``), then cast to fp32 (``"cast_fp32"``),
    #: or run in fp32 (``"fp32_inputs"``)
    logits_dtype: Literal["model", "cast_fp32", "fp32_inputs"]
    layout: ExpertsLayout = STANDARD
    experts_attr: str = "experts"
    shared_experts: tuple[str, ...] = ()
    #: the family's real k when it ignores ``num_experts_per_tok`` (phimoe's sparsemixer is top-2)
    native_k_override: int | None = None
    #: a router with this attribute set while training uses randomness we do not reproduce
    training_unsupported: bool = False
    #: dotted path, on the router, of its ``(E, H)`` linear weight (gemma4_text: ``"proj.weight"``)
    router_weight: str = "weight"
    #: dotted path, on the router, of the family's k (gemma4_text: ``"config.top_k_experts"``)
    router_top_k: str = "top_k"
    #: order of the router's outputs, by the first transformers release that uses it
    router_outputs: tuple[tuple[str, tuple[str, str, str]], ...] = (("0", ("logits", "weights", "ids")),)
    notes: str = ""
    #: attributes of the MoE block that the block passes to its router after the hidden states
    #: (minimax_m2: ``gate(h, self.e_score_correction_bias)``); the scorer receives them too
    router_inputs: tuple[str, ...] = ()
    #: the oldest transformers release this record was checked against
    min_transformers: str = MIN_TRANSFORMERS
    #: the keras-hub model family patched by :mod:`dynamic_moe_router.keras.hub` ("" = none)
    keras_hub: str = ""
    #: dotted path, on the experts module (or, where the experts module lacks it, on the MoE
    #: block: longcat_flash from transformers 5.25), of the number ``Z`` of zero-computation
    #: (identity) experts (longcat_flash: ``"zero_expert_num"``; "" = none). The router scores ``E + Z``
    #: experts, ids ``[E, E + Z)`` add ``hidden * weight`` without a GEMM, the sentinel is ``E + Z``;
    #: their pairs are counted apart from the executed ones (``zero_expert_pairs``)
    zero_experts: str = ""

    @property
    def gpu_kernels(self) -> bool:
        """Whether the sync-free GPU kernels (Triton + ``grouped_mm``) cover this family's experts
        layout; other layouts run the host-synchronising ``loop`` / ``grouped`` paths on GPU."""
        layout = self.layout
        return not (
            layout.transposed or layout.interleaved or layout.has_bias or layout.activation != "act_fn"
        )

    def router_output_order(self, transformers_version: str) -> tuple[str, str, str]:
        """The order in which this family's router returns (logits, weights, ids) in a release."""
        from packaging.version import Version

        current = Version(transformers_version)
        order = self.router_outputs[0][1]
        for since, candidate in self.router_outputs:
            if current >= Version(since):
                order = candidate
        return order

    def router_attribute(self, router, path: str):
        """``router``'s attribute at the dotted ``path`` (``router_weight`` / ``router_top_k``)."""
        for name in path.split("."):
            router = getattr(router, name)
        return router

    @property
    def scorer(self):
        return SCORERS[self.scoring]

    def renorm_doc(self) -> str:
        """The weight rule as the families table states it (for every checkpoint of the family)."""
        if self.scoring == "topk_softmax":
            return "softmax over the kept logits (= renormalised)"
        return weight_rule_doc(self.renorm, "norm_topk_prob")


_DS3 = "sigmoid + selection bias, group-limited top-k, routed_scaling_factor, shared experts"

_GRANITE_ORDER = (("0", ("ids", "weights", "logits")), ("5.21.0", ("logits", "weights", "ids")))


FAMILIES: dict[str, FamilySpec] = {
    family.model_type: family
    for family in (
        FamilySpec(
            "mixtral", ("MixtralSparseMoeBlock",), "gate", "softmax", "always", "fp32", "model",
            notes="softmax -> top-k -> renormalise", keras_hub="mixtral",
        ),
        FamilySpec(
            "olmoe", ("OlmoeSparseMoeBlock",), "gate", "softmax", "config", "logits", "model",
            notes="softmax -> top-k; norm_topk_prob (default False)",
        ),
        FamilySpec(
            "qwen2_moe", ("Qwen2MoeSparseMoeBlock",), "gate", "softmax", "config", "logits", "model",
            shared_experts=("shared_expert", "shared_expert_gate"),
            notes="softmax -> top-k; sigmoid-gated shared expert", keras_hub="qwen_moe",
        ),
        FamilySpec(
            "qwen3_moe", ("Qwen3MoeSparseMoeBlock",), "gate", "softmax", "config", "logits", "model",
            notes="softmax -> top-k; norm_topk_prob", keras_hub="qwen3_moe",
        ),
        FamilySpec(
            "deepseek_v3", ("DeepseekV3MoE",), "gate", "sigmoid_group", "config", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",),
            notes="sigmoid + selection bias, group-limited top-k, routed_scaling_factor, shared experts",
        ),
        FamilySpec(
            "gpt_oss", ("GptOssMLP",), "router", "topk_softmax", "always", "logits", "model",
            layout=GPT_OSS,
            notes="top-k over logits (router bias) -> softmax; clamped SwiGLU with biases",
        ),
        FamilySpec(
            "granitemoe", ("GraniteMoeMoE",), "router", "topk_softmax", "always", "hidden", "cast_fp32",
            router_outputs=(("0", ("ids", "weights", "logits")), ("5.21.0", ("logits", "weights", "ids"))),
            notes="top-k over logits -> softmax",
        ),
        FamilySpec(
            "phimoe", ("PhimoeSparseMoeBlock",), "router", "sparsemixer", "never", "logits", "model",
            native_k_override=2, training_unsupported=True,
            notes="sparsemixer (always top-2 at inference)",
        ),
        FamilySpec(
            "deepseek_v2", ("DeepseekV2Moe",), "gate", "softmax_group", "never", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",),
            notes="softmax -> top-k (greedy or group-limited greedy) x routed_scaling_factor, shared experts",
        ),
        FamilySpec(
            "deepseek_v32", ("DeepseekV32MoE",), "gate", "sigmoid_group", "config", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",), notes=_DS3 + " (DeepSeek-V3 router)",
        ),
        FamilySpec(
            "glm4_moe", ("Glm4MoeMoE",), "gate", "sigmoid_group", "config", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",), notes=_DS3 + " (DeepSeek-V3 router)",
        ),
        FamilySpec(
            "glm4_moe_lite", ("Glm4MoeLiteMoE",), "gate", "sigmoid_group", "config", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",), notes=_DS3 + " (DeepSeek-V3 router)",
        ),
        FamilySpec(
            "dots1", ("Dots1MoE",), "gate", "sigmoid_group", "config", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",), notes=_DS3 + " (DeepSeek-V3 router)",
        ),
        FamilySpec(
            "kimi_linear", ("KimiLinearMoE",), "gate", "sigmoid_group", "config", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",), notes=_DS3 + " (DeepSeek-V3 router)",
        ),
        FamilySpec(
            "granitemoeshared", ("GraniteMoeSharedMoE",), "router", "topk_softmax", "always", "hidden",
            "cast_fp32",
            router_outputs=_GRANITE_ORDER,
            notes="top-k over logits -> softmax; dense shared MLP beside the block (the layer's shared_mlp)",
        ),
        FamilySpec(
            "granitemoehybrid", ("GraniteMoeHybridMoE",), "router", "topk_softmax", "always", "hidden",
            "cast_fp32",
            router_outputs=_GRANITE_ORDER,
            notes="top-k over logits -> softmax; Mamba2/attention hybrid, dense shared MLP beside the block",
        ),
        FamilySpec(
            "bailing_hybrid", ("BailingHybridMoE",), "gate", "sigmoid_group", "config", "fp32", "fp32_inputs",
            shared_experts=("shared_experts",),
            notes="sigmoid + selection bias, group-limited top-k, routed_scaling_factor, shared experts "
            "(Ling hybrid: linear/MLA attention)",
            min_transformers="5.24.0",
        ),
        FamilySpec(
            "cohere2_moe", ("Cohere2MoeSparseMoeBlock",), "gate", "topk_gate", "config", "hidden", "model",
            shared_experts=("shared_experts",),
            notes="top-k over logits -> softmax (or sigmoid, renormalised if norm_topk_prob); "
            "shared experts summed or averaged",
        ),
        FamilySpec(
            "gemma4_text", ("Gemma4TextDecoderLayer",), "router", "softmax_expert_scale", "always", "fp32",
            "model",
            shared_experts=("mlp",),
            router_weight="proj.weight", router_top_k="config.top_k_experts",
            notes="normed router input, softmax -> top-k -> renormalise -> per-expert scale; dense MLP "
            "beside the experts in every layer (the decoder layer is the MoE block)",
        ),
        FamilySpec(
            "flex_olmo", ("FlexOlmoSparseMoeBlock",), "gate", "softmax", "config", "logits", "model",
            notes="softmax -> top-k; norm_topk_prob (default False)",
        ),
        FamilySpec(
            "jamba", ("JambaSparseMoeBlock",), "router", "softmax", "never", "hidden", "model",
            notes="softmax -> top-k, raw probabilities; MoE every expert_layer_period layers beside Mamba",
            min_transformers="5.24.0",
        ),
        FamilySpec(
            "qwen3_next", ("Qwen3NextSparseMoeBlock",), "gate", "softmax", "config", "logits", "model",
            shared_experts=("shared_expert", "shared_expert_gate"),
            notes="softmax -> top-k; norm_topk_prob; sigmoid-gated shared expert",
        ),
        FamilySpec(
            "qwen3_5_moe", ("Qwen3_5MoeSparseMoeBlock",), "gate", "softmax", "always", "logits", "model",
            shared_experts=("shared_expert", "shared_expert_gate"), keras_hub="qwen3_5_moe",
            notes="softmax -> top-k -> renormalise; sigmoid-gated shared expert; gated-delta-net layers",
        ),
        FamilySpec(
            "qwen3_5_moe_text", ("Qwen3_5MoeSparseMoeBlock",), "gate", "softmax", "always", "logits", "model",
            shared_experts=("shared_expert", "shared_expert_gate"), keras_hub="qwen3_5_moe",
            notes="softmax -> top-k -> renormalise; sigmoid-gated shared expert; gated-delta-net layers",
        ),
        FamilySpec(
            "minimax", ("MiniMaxSparseMoeBlock",), "gate", "softmax", "always", "fp32", "model",
            notes="softmax -> top-k -> renormalise (fp32 weights); lightning-attention layers",
        ),
        FamilySpec(
            "exaone_moe", ("ExaoneMoeSparseMoEBlock",), "gate", "sigmoid_group", "config", "fp32",
            "fp32_inputs",
            shared_experts=("shared_experts",),
            notes="sigmoid + selection bias, group-limited top-k, routed_scaling_factor, shared experts",
        ),
        FamilySpec(
            "ernie4_5_moe", ("Ernie4_5_MoeSparseMoeBlock",), "gate", "softmax_bias", "always", "hidden",
            "fp32_inputs",
            shared_experts=("shared_experts",),
            notes="fp32 softmax -> top-k by softmax + selection bias -> renormalise (clamp moe_norm_min)",
        ),
        FamilySpec(
            "hunyuan_v1_moe", ("HunYuanMoEV1Moe",), "gate", "softmax_wg", "always", "logits", "fp32_inputs",
            shared_experts=("shared_mlp",), router_weight="wg.weight",
            notes="softmax -> top-k -> renormalise (router linear `wg`, fp32 when `wg` is); shared MLP",
        ),
        FamilySpec(
            "minimax_m2", ("MiniMaxM2SparseMoeBlock",), "gate", "sigmoid_bias", "always", "fp32", "model",
            router_inputs=("e_score_correction_bias",),
            notes="sigmoid + block-owned selection bias -> top-k -> renormalise",
        ),
        FamilySpec(
            "lfm2_moe", ("Lfm2MoeSparseMoeBlock",), "gate", "sigmoid_expert_bias", "config", "logits",
            "model",
            router_inputs=("expert_bias",),
            notes="sigmoid + block's expert_bias for selection -> top-k; norm_topk_prob (+1e-6), "
            "routed_scaling_factor",
        ),
        FamilySpec(
            "afmoe", ("AfmoeSparseMoeBlock",), "router", "afmoe_sigmoid", "always", "fp32", "cast_fp32",
            shared_experts=("shared_experts",), router_weight="gate.weight", router_inputs=("expert_bias",),
            notes="sigmoid + block's expert_bias for selection -> top-k -> renormalise (+1e-20), "
            "route_scale; shared experts",
        ),
        FamilySpec(
            "longcat_flash", ("LongcatFlashMoE",), "router", "softmax_zero", "never", "fp32", "fp32_inputs",
            router_weight="classifier.weight", zero_experts="zero_expert_num",
            notes="fp32 softmax over routed + zero-computation (identity) experts -> top-k by softmax + "
            "selection bias, x routed_scaling_factor; zero experts add hidden x weight (no GEMM, counted "
            "apart); two dense MLPs beside the block",
            min_transformers="5.24.0",
        ),
    )
}  # fmt: skip


#: MoE families of transformers that cannot be patched, and why (their error message says it)
UNSUPPORTED_FAMILIES: dict[str, str] = {
    "llama4_text": "Llama4TextMoe scales each expert's input by sigmoid(top-k logit) and runs every expert "
    "on every token (the experts take no expert ids), so there is no sparse experts call to replace",
    "dbrx": "DbrxFFN routes inside the block (the router returns logits only) and its experts are "
    "w1/v1/w2 (E*I, H) matrices, not fused gate_up_proj/down_proj experts",
    "jetmoe": "JetMoeMoE runs JetMoeParallelExperts (input_linear/output_linear split by per-expert token "
    "counts) behind a five-output router, and its attention is a mixture of experts too",
    "nemotron_h": "NemotronHExperts are not gated (up_proj + relu2, no gate_up_proj) and may run in a "
    "latent space smaller than the router's (moe_latent_size)",
}


def supported_families() -> tuple[str, ...]:
    """The ``model_type`` names that :func:`dynamic_moe_router.patch` supports, sorted."""
    return tuple(sorted(FAMILIES))


def get_family(model_type: str) -> FamilySpec:
    """The :class:`FamilySpec` of ``model_type``; raises ``UnsupportedModelError`` listing the families."""
    from ..errors import UnsupportedModelError

    try:
        return FAMILIES[model_type]
    except KeyError:
        why = UNSUPPORTED_FAMILIES.get(model_type)
        reason = f"its MoE layers cannot be patched: {why}" if why else "it is not a supported MoE family"
        raise UnsupportedModelError(
            f"model_type {model_type!r}: {reason}; supported: {', '.join(supported_families())}. Open an "
            "issue to request it."
        ) from None


def families_markdown() -> str:
    """The supported-families table as Markdown, generated from :data:`FAMILIES` (README and docs)."""
    rows = [
        "| family | MoE block | scoring | policies read | kept weights | shared experts | transformers "
        "| GPU kernels | keras-hub |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in supported_families():
        family = FAMILIES[name]
        shared = ", ".join(f"`{s}`" for s in family.shared_experts) or "-"
        hub = f"`{family.keras_hub}`" if family.keras_hub else "-"
        rows.append(
            f"| `{name}` | `{'/'.join(family.block_classes)}` | `{family.scoring}`: {family.notes} | "
            f"{family.scorer.distribution} | {family.renorm_doc()} | {shared} | "
            f">= {family.min_transformers} | {'yes' if family.gpu_kernels else 'no'} | {hub} |"
        )
    return "\n".join(rows)
