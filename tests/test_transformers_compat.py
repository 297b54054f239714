"""The compatibility check against the installed transformers release (run in CI on every push).

It fails when a family the kit claims to support lost its config, modeling module or MoE block
classes in this release, and it reports (a warning, never a failure) the MoE families of this
release that the kit does not support yet.
"""

from __future__ import annotations

import importlib
import warnings

import pytest

from dynamic_moe_router.hf.families import FAMILIES

#: config attributes whose value > 1 marks a model type as MoE
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _modeling(model_type: str):  # type: ignore[no-untyped-def]
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def moe_model_types() -> list[str]:
    """The model types of the installed transformers whose config class declares routed experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    found = []
    for model_type, class_name in CONFIG_MAPPING_NAMES.items():
        module = model_type_to_module_name(model_type)
        try:
            config_module = importlib.import_module(f"transformers.models.{module}.configuration_{module}")
            config_class = getattr(config_module, class_name)
        except Exception:  # an optional dependency of that model is missing: not ours to judge
            continue
        if any(
            isinstance(getattr(config_class, k, None), int) and getattr(config_class, k) > 1
            for k in _EXPERT_KEYS
        ):
            found.append(model_type)
    return found


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_supported_family_still_has_its_moe_blocks(family: str) -> None:
    import transformers
    from packaging.version import Version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    record = FAMILIES[family]
    release = transformers.__version__
    if Version(release) < Version(record.min_transformers):
        pytest.skip(f"{family} is supported from transformers {record.min_transformers} (this is {release})")
    assert family in CONFIG_MAPPING_NAMES, f"transformers {release} has no model type {family!r}"
    assert family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, f"transformers {release}: {family} has no causal LM"
    modeling = _modeling(family)
    missing = [c for c in record.block_classes if not hasattr(modeling, c)]
    assert not missing, (
        f"transformers {release} changed {family}: its modeling module has no {missing}; the family record "
        "in dynamic_moe_router/hf/families.py must be updated"
    )


def test_unsupported_moe_families_of_this_release_are_reported() -> None:
    import transformers

    found = moe_model_types()
    # the scan itself works: it finds the long-standing MoE families
    assert {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"} <= set(found), found
    unsupported = sorted(set(found) - set(FAMILIES))
    if unsupported:
        warnings.warn(
            f"transformers {transformers.__version__} has {len(unsupported)} MoE model types that "
            f"dynamic-moe-router-kit does not support yet: {', '.join(unsupported)}",
            UserWarning,
            stacklevel=1,
        )
