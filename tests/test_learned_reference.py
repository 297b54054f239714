"""The learned allocators committed beside the reference models: budget adherence and reproducibility.

They were written by ``python training/allocators.py models/ref-olmoe models/ref-mixtral`` (the
training of ``dmr calibrate --family learned``, on 2 CPU threads; the quantile budgets ``learned-q*``
by ``--quantile-only --device cuda`` on an H200). The budget text is the
Gutenberg valid split, spread over its books, as in training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.calibrate import _calibrate_learned
from dynamic_moe_router.data import data_file, read_jsonl
from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.learn import allocator_windows, measure_reduction, score_windows

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["ref-olmoe", "ref-mixtral"]
#: the stated tolerance of a retrain: valid perplexity within 0.3% of the committed allocator's
RETRAIN_PPL_TOLERANCE = 0.003
#: (steps, windows per step) of each committed allocator's training: ref-olmoe's heads had 4x the
#: default work (the setting chosen on valid NLL; 2463 s of training on 2 CPU threads), ref-mixtral's the
#: default (its 35% target is out of reach of selection either way: see BENCHMARKS.md's oracle)
COMMITTED_TRAINING = {"ref-olmoe": (800, 8), "ref-mixtral": (400, 4)}


def _valid() -> list[str]:
    return [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]


def _budget(tokenizer) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return allocator_windows(tokenizer, _valid(), "budget")


@pytest.mark.parametrize("name", MODELS)
def test_committed_allocators_load_fit_their_model_and_hold_the_budget_on_valid(name, two_threads):  # type: ignore[no-untyped-def]
    model, tokenizer = load_checkpoint(str(ROOT / "models" / name))
    files = sorted((ROOT / "models" / name / "allocators").glob("learned-*.json"))
    targets = ("25", "30", "35", "40", "50")
    assert [f.stem for f in files] == [f"learned-{b}{t}" for b in "qt" for t in targets]
    budget = _budget(tokenizer)
    for f in files:
        policy = dmr.load_policy(f)
        assert isinstance(policy, dmr.LearnedAllocator) and policy.compensation
        assert policy.sha256 == dmr.load_policy(files[-3]).sha256  # one set of heads: learned-t35's
        target = int(f.stem[len("learned-q") :]) / 100
        reached = measure_reduction(model, policy, budget)
        # the threshold budget lands within a point on valid; the quantile budget is exact per call
        # (up to one pair of the rounding in each layer)
        tolerance = 0.01 if f.stem.startswith("learned-t") else 1e-3
        assert policy.budget == ("threshold" if f.stem.startswith("learned-t") else "quantile")
        assert abs(reached - target) <= tolerance, f"{f.name}: {reached:.4f} for a {target:.0%} target"
    record = dmr.load_policy(files[-3]).record or {}
    config = record["config"]
    assert (config["steps"], config["batch_windows"]) == COMMITTED_TRAINING[name] and record["threads"] == 2


def _valid_nll(model, policy, windows: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    return score_windows(model, policy, windows, batch_size=16).mean_nll


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    """The committed allocators were trained on 2 threads; restore the process's count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_retrain_reproduces_the_committed_ref_olmoe_allocator(two_threads):  # type: ignore[no-untyped-def]
    """A short retrain, the default training (a quarter of the committed heads' work, about 5 minutes
    on 2 threads), lands within the stated tolerance of the committed allocator on valid."""
    path = ROOT / "models" / "ref-olmoe"
    model, tokenizer = load_checkpoint(str(path))
    committed = dmr.load_policy(path / "allocators" / "learned-t35.json")
    retrained = _calibrate_learned(model, tokenizer, 0.35, _valid(), None, None, 512, None)
    budget = _budget(tokenizer)
    assert abs(measure_reduction(model, retrained, budget) - 0.35) <= 0.01
    a, b = _valid_nll(model, committed, budget), _valid_nll(model, retrained, budget)
    assert abs(math.exp(b - a) - 1.0) <= RETRAIN_PPL_TOLERANCE, (a, b)
    print(json.dumps({"committed_sha": committed.sha256, "retrained_sha": retrained.sha256, "nll": [a, b]}))
