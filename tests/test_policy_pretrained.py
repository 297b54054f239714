"""Policies that travel with a model: ``policy.save_pretrained(dir)``, ``dmr.from_pretrained(dir)``,
``dmr.patch(model, "auto")`` and the CLI picking the saved policy up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.tiny import tiny_model

REF = Path(__file__).parents[1] / "models" / "ref-olmoe"


def _saved_tiny(folder: Path, policy: dmr.RoutingPolicy | None):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    tiny_model("olmoe").save_pretrained(folder)
    if policy is not None:
        policy.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "policy",
    [dmr.TopP(p=0.6), dmr.PerLayer(default=dmr.TopP(p=0.5), overrides={1: dmr.StaticTopK(k=2)})],
)
def test_save_pretrained_round_trips_through_from_pretrained(tmp_path: Path, policy) -> None:  # type: ignore[no-untyped-def]
    policy.save_pretrained(tmp_path)
    assert (tmp_path / "dmr_policy.json").is_file()
    assert dmr.from_pretrained(tmp_path) == policy


def test_patch_auto_uses_the_policy_saved_with_the_model(tmp_path: Path) -> None:
    policy = dmr.TopP(p=0.55)
    model = _saved_tiny(tmp_path, policy)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), dmr.patched(model, policy) as explicit:
        expected = model(ids).logits
    with torch.no_grad(), dmr.patched(model, "auto") as handle:
        got = model(ids).logits
        assert handle.policy == policy
    assert torch.equal(got, expected) and explicit.executed_pairs() == handle.executed_pairs()


def test_patch_auto_without_a_saved_policy_is_a_typed_error(tmp_path: Path) -> None:
    model = _saved_tiny(tmp_path, None)
    with pytest.raises(dmr.PolicyNotFoundError, match=r"no dmr_policy\.json in .*save_pretrained"):
        dmr.patch(model, "auto")
    assert dmr.get_patch(model) is None
    in_memory = tiny_model("olmoe")  # not loaded from a folder
    with pytest.raises(dmr.PolicyNotFoundError, match=r"not loaded from one|not a local directory"):
        dmr.patch(in_memory, "auto")
    with pytest.raises(dmr.PolicyError, match=r"parse a spec with dmr\.parse_policy"):
        dmr.patch(in_memory, "top_p:p=0.5")  # type: ignore[arg-type]
    assert dmr.get_patch(in_memory) is None


def test_save_pretrained_needs_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(dmr.PolicyError, match="is not a directory"):
        dmr.TopP(p=0.6).save_pretrained(tmp_path / "missing")
    with pytest.raises(dmr.PolicyNotFoundError, match="is not a model folder"):
        dmr.from_pretrained(tmp_path / "missing")


def test_a_malformed_saved_policy_is_a_policy_file_error(tmp_path: Path) -> None:
    (tmp_path / "dmr_policy.json").write_text('{"_type": "top_p"')
    with pytest.raises(dmr.PolicyFileError, match="not valid JSON"):
        dmr.from_pretrained(tmp_path)


def _dmr(*args: str) -> dict:  # type: ignore[type-arg]
    done = subprocess.run(
        [sys.executable, "-m", "dynamic_moe_router.cli", *args, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_dmr_profile_picks_up_the_saved_policy_and_says_so(tmp_path: Path) -> None:
    _saved_tiny(tmp_path, dmr.TopP(p=0.45))
    out = _dmr("profile", str(tmp_path), "--tokens", "8", "--batch", "1")
    assert out["policy"] == dmr.TopP(p=0.45).describe()
    assert out["policy_source"] == str(tmp_path / "dmr_policy.json")
    explicit = _dmr("profile", str(tmp_path), "--tokens", "8", "--batch", "1", "--policy", "static_top_k")
    assert explicit["policy"] == dmr.StaticTopK().describe() and explicit["policy_source"].startswith(
        "--policy"
    )


@pytest.mark.skipif(not (REF / "config.json").is_file(), reason="the reference model is not in this checkout")
def test_dmr_eval_picks_up_the_saved_policy_and_native_overrides_it(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for item in REF.iterdir():  # the reference model's files, without copying them
        (folder / item.name).symlink_to(item)
    dmr.TopP(p=0.5).save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    base = ["eval", "--model", str(folder), "--text", str(text), "--max-tokens", "64"]
    saved = _dmr(*base, "--no-native")
    assert saved["policy_source"] == str(folder / "dmr_policy.json")
    assert saved["flops"]["policy"] == dmr.TopP(p=0.5).describe()
    assert saved["flops"]["routed_flop_reduction"] > 0
    native = _dmr(*base, "--native")
    assert native["policy_source"].startswith("native") and native["flops"]["routed_flop_reduction"] == 0
