"""The family registry as users meet it: how many families, the reasons given for the others, and
the version gate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.families import FAMILIES, UNSUPPORTED_FAMILIES


def test_dmr_families_json_lists_at_least_30_families() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dynamic_moe_router.cli", "families", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["families"]
    assert len(rows) >= 30 and {row["family"] for row in rows} == set(FAMILIES)
    assert all(row["min_transformers"] and isinstance(row["gpu_kernels"], bool) for row in rows)


class _Model(torch.nn.Module):
    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": model_type})()


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED_FAMILIES))
def test_known_unsupported_moe_families_say_why(model_type: str) -> None:
    with pytest.raises(dmr.UnsupportedModelError, match=rf"'{model_type}': its MoE layers cannot be patched"):
        dmr.patch(_Model(model_type))


def test_an_unsupported_moe_model_and_a_dense_model_get_the_typed_error() -> None:
    from transformers import DbrxConfig, DbrxForCausalLM, LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(dmr.UnsupportedModelError, match="'llama': it is not a supported MoE family"):
        dmr.patch(dense)
    moe = DbrxForCausalLM(
        DbrxConfig(
            vocab_size=64,
            d_model=16,
            n_heads=2,
            n_layers=1,
            max_seq_len=32,
            attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
        )
    )
    forwards = [m.forward for m in moe.modules()]
    with pytest.raises(
        dmr.UnsupportedModelError, match="'dbrx': its MoE layers cannot be patched: DbrxFFN"
    ) as info:
        dmr.patch(moe)
    assert "MoE-like blocks" in str(info.value) and "'DbrxFFN'" in str(info.value)
    assert "no family record" in str(info.value)
    assert dmr.get_patch(moe) is None and [m.forward for m in moe.modules()] == forwards


def test_a_family_newer_than_the_installed_transformers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from dynamic_moe_router.hf.tiny import tiny_model

    newer = [f for f in FAMILIES.values() if f.min_transformers != "5.17.0"]
    assert newer, "no family with a newer minimum to test"
    model = tiny_model(newer[0].model_type)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(
        dmr.UnsupportedModelError, match=rf"needs transformers >= {newer[0].min_transformers}"
    ):
        dmr.patch(model)
    assert dmr.get_patch(model) is None


@pytest.mark.parametrize("family", ["afmoe", "gemma4_text", "hunyuan_v1_moe", "mixtral"])
def test_inspect_says_how_each_layer_was_recognised(family: str) -> None:
    from dynamic_moe_router.hf.inspect import inspect_model
    from dynamic_moe_router.hf.tiny import tiny_model

    record = FAMILIES[family]
    info = inspect_model(tiny_model(family))
    for row in info["layers"]:
        how = row["recognised_by"]
        assert how.startswith(f"family record '{family}': block {record.block_classes[0]}")
        assert f"scoring '{record.scoring}'" in how


def test_the_families_table_states_version_kernels_and_keras_hub() -> None:
    from dynamic_moe_router.hf.families import families_markdown

    table = families_markdown()
    assert "| transformers | GPU kernels | keras-hub |" in table
    rows = {line.split("|")[1].strip(" `"): line for line in table.splitlines()[2:]}
    assert set(rows) == set(FAMILIES)
    assert rows["gpt_oss"].rstrip().endswith("| >= 5.17.0 | no | - |")  # its layout runs the loop paths
    assert rows["mixtral"].rstrip().endswith("| >= 5.17.0 | yes | `mixtral` |")
    assert "| >= 5.24.0 |" in rows["jamba"]
