"""The kept-weight rule of a family (renormalise or not), written once for every integration.

A family record says ``"always"`` (the kept weights are divided by their sum), ``"never"`` (the
raw probabilities are kept) or ``"config"`` (it depends on a flag of the checkpoint's config, such
as transformers' ``norm_topk_prob`` or keras-hub's ``norm_top_k_prob``). The transformers
patch, ``dmr inspect`` and the keras-hub patch all read the rule through these functions.

Example:
    >>> from dynamic_moe_router.core import renormalises, weight_rule_text
    >>> renormalises("config", True), renormalises("config", None), renormalises("always", False)
    (True, False, True)
    >>> weight_rule_text("config", True, "norm_topk_prob")
    'renormalised: norm_topk_prob=True in this config'
    >>> weight_rule_text("config", None, "norm_topk_prob")
    'raw: norm_topk_prob=False in this config'
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["WEIGHT_RULES", "WeightRule", "renormalises", "weight_rule_doc", "weight_rule_text"]

WeightRule = Literal["always", "config", "never"]
WEIGHT_RULES: tuple[str, ...] = ("always", "config", "never")


def renormalises(rule: str, flag: Any = None) -> bool:
    """Whether the kept weights are renormalised under ``rule``; ``flag`` is the config's value
    (read only when ``rule == "config"``; a missing flag counts as False)."""
    if rule not in WEIGHT_RULES:
        raise ValueError(f"weight rule must be one of {WEIGHT_RULES}, got {rule!r}")
    return bool(flag) if rule == "config" else rule == "always"


def weight_rule_doc(rule: str, flag_name: str) -> str:
    """The rule as a family table states it, e.g. ``"renormalised if norm_topk_prob"``."""
    if rule == "config":
        return f"renormalised if {flag_name}"
    return "renormalised" if renormalises(rule) else "raw"


def weight_rule_text(rule: str, flag: Any, flag_name: str) -> str:
    """The rule as it applies to one checkpoint, e.g. ``"renormalised: norm_topk_prob=True in this
    config"`` (for ``"config"`` rules the config's actual value is named)."""
    kind = "renormalised" if renormalises(rule, flag) else "raw"
    if rule == "config":
        return f"{kind}: {flag_name}={bool(flag)} in this config"
    return kind
