"""The dmr command line."""

from __future__ import annotations

import json

import pytest

import dynamic_moe_router as dmr
from dynamic_moe_router.cli import main
from dynamic_moe_router.hf.tiny import tiny_model


def run(capsys, *argv):  # type: ignore[no-untyped-def]
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_families_json(capsys):  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "families", "--json")
    data = json.loads(out)
    assert code == 0 and [r["family"] for r in data["families"]] == list(dmr.supported_families())
    code, out, _ = run(capsys, "families")
    assert code == 0 and "deepseek_v3" in out


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_inspect_tiny(capsys, family):  # type: ignore[no-untyped-def]
    code, out, _ = run(capsys, "inspect", f"tiny:{family}", "--json")
    data = json.loads(out)
    assert code == 0 and data["family"] == family and data["moe_layers"] >= 1
    row = data["layers"][0]
    assert row["num_experts"] == 8 and row["native_k"] >= 1 and "flops_per_pair" in row


def test_inspect_checkpoint_directory_without_loading_weights(capsys, tmp_path):  # type: ignore[no-untyped-def]
    tiny_model("deepseek_v3").config.save_pretrained(tmp_path)  # config only, no weights
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--json")
    data = json.loads(out)
    assert code == 0 and [r["layer"] for r in data["layers"]] == [1, 2]
    assert data["layers"][0]["shared_experts"] == ["shared_experts"]


def test_inspect_checks_the_folder_saved_policy_unless_one_is_given(capsys, tmp_path):  # type: ignore[no-untyped-def]
    tiny_model("mixtral").config.save_pretrained(tmp_path)
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--json")
    data = json.loads(out)
    assert code == 0 and data["policy"].startswith("static_top_k") and "native" in data["policy_source"]
    dmr.BatchAware(dmr.TopP(p=0.5)).save_pretrained(tmp_path)  # not covered by the fused kernel
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--json")
    data = json.loads(out)
    assert code == 0 and data["policy"].startswith("batch_aware")
    assert "dmr_policy.json" in data["policy_source"]
    assert all("not covered" in row["fused_routing"] for row in data["layers"])
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--policy", "top_p:p=0.5")
    assert code == 0 and "from --policy spec" in out and "covered (MoE layers [0, 1])" in out


def test_inspect_names_a_saved_policy_that_does_not_fit(capsys, tmp_path):  # type: ignore[no-untyped-def]
    tiny_model("mixtral").config.save_pretrained(tmp_path)  # two MoE layers: 0 and 1
    dmr.PerLayer(dmr.StaticTopK(), {7: dmr.TopP(p=0.5)}).save_pretrained(tmp_path)
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "dmr_policy.json" in err and "--policy static_top_k" in err
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--policy", "static_top_k")
    assert code == 0 and "covered" in out


def test_inspect_errors(capsys, tmp_path):  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing"))
    assert code == 2 and "neither a model directory nor tiny:FAMILY" in err
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "has no config.json" in err
    code, _, err = run(capsys, "inspect", "tiny:llama")
    assert code == 2 and "not a supported MoE family" in err


def test_profile_json_with_policy_file(capsys, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.json"
    dmr.StaticTopK(k=1).save(str(path))
    code, out, _ = run(capsys, "profile", "tiny:mixtral", "--policy", str(path), "--tokens", "8", "--json")
    data = json.loads(out)
    assert code == 0 and data["routed_flop_reduction"] == 0.5 and data["tokens"] == 16


def test_profile_checkpoint_directory(capsys, tmp_path):  # type: ignore[no-untyped-def]
    tiny_model("olmoe").save_pretrained(tmp_path)
    code, out, _ = run(capsys, "profile", str(tmp_path), "--policy", "top_p:p=0.5", "--tokens", "8")
    assert code == 0 and "routed-expert FLOPs" in out


def test_profile_bad_policy(capsys):  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "profile", "tiny:mixtral", "--policy", "top_p:p=2")
    assert code == 2 and "p must be in" in err


def test_generated_cli_reference_lists_every_command_and_argument():  # type: ignore[no-untyped-def]
    import argparse
    import importlib.util
    from pathlib import Path

    from dynamic_moe_router.cli import build_parser

    path = Path(__file__).resolve().parents[1] / "docs" / "gen_cli.py"
    spec = importlib.util.spec_from_file_location("gen_cli", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"### `dmr {name}`" in text
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings or [action.dest]:
                assert f"`{flag}`" in text, (name, flag)
