"""The bundled reference models: loadable, small, non-degenerate, patchable, with up-to-date cards."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import dynamic_moe_router as dmr

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["ref-mixtral", "ref-olmoe"]


def card_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("model_card", ROOT / "training" / "model_card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoints_fit_the_size_budget():  # type: ignore[no-untyped-def]
    total = sum(f.stat().st_size for name in MODELS for f in (ROOT / "models" / name).iterdir())
    assert total <= 40 * 2**20


@pytest.mark.parametrize("name", MODELS)
def test_model_card_is_generated_from_metrics_and_routing_is_balanced(name):  # type: ignore[no-untyped-def]
    folder = ROOT / "models" / name
    metrics = json.loads((folder / "metrics.json").read_text())
    cards = card_module()
    assert (folder / "README.md").read_text() == cards.render(metrics), "run python training/model_card.py"
    ok, problems = cards.routing_verdict(metrics["held_out"]["layers"])
    assert ok, problems


@pytest.mark.parametrize(("name", "family"), [("ref-mixtral", "mixtral"), ("ref-olmoe", "olmoe")])
@torch.no_grad()
def test_loads_and_patches(name, family):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ROOT / "models" / name
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.model_type == family and len(tokenizer) == model.config.vocab_size
    ids = tokenizer(
        "It was a bright cold day in April, and the clocks were striking", return_tensors="pt"
    ).input_ids
    ref = model(ids).logits
    with dmr.patched(model, dmr.StaticTopK()):
        assert (model(ids).logits - ref).abs().max().item() <= 1e-5
    with dmr.patched(model, dmr.TopP(p=0.5)), dmr.profile(model) as report:
        model(ids)
    assert report.to_dict()["routed_flop_reduction"] > 0
    # a trained model predicts real text far better than chance (vocabulary 8192)
    nll = torch.nn.functional.cross_entropy(ref[0, :-1], ids[0, 1:]).item()
    assert nll < 6.0
