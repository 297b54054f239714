"""dmr bench's accuracy confirmation: the points that reach the smallest target within the perplexity
limit are scored again on more task items, paired with native, and the verdicts read those numbers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

import dynamic_moe_router as dmr
from dynamic_moe_router.cli import main
from dynamic_moe_router.eval import evaluate, load_checkpoint
from dynamic_moe_router.eval.stats import paired_delta
from dynamic_moe_router.sweeps import quality
from dynamic_moe_router.sweeps.quality import (
    BenchSettings,
    _confirm,
    _Model,
    _Point,
    confirmation_candidates,
)

ROOT = Path(__file__).resolve().parents[1]


def _gen():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen", ROOT / "benchmarks" / "gen_benchmarks_md.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def _row(family: str, reduction: float, ppl: float, blimp: float = 0.0, lambada: float = 0.0) -> dict:
    return {
        "family": family,
        "label": f"{family} {reduction}",
        "routed_flop_reduction": reduction,
        "ppl_rel_change": ppl,
        "blimp_delta": blimp,
        "blimp_delta_se": 0.012,
        "lambada_delta": lambada,
        "lambada_delta_se": 0.007,
    }


def test_candidates_are_chosen_by_flops_and_perplexity_only():  # type: ignore[no-untyped-def]
    rows = [
        _row("native", 0.0, 0.0),
        _row("learned", 0.30, 0.01, blimp=-0.05),  # at both limits: a candidate, whatever its accuracy
        _row("learned", 0.2999, 0.0),  # short of the smallest target
        _row("top_p", 0.5, 0.0101),  # over the perplexity limit
        _row("static", 0.5, -0.01),
    ]
    assert confirmation_candidates(rows) == [1, 4]


def test_the_verdict_reads_the_confirmation_where_there_is_one():  # type: ignore[no-untyped-def]
    gen = _gen()
    noisy_low = _row("learned", 0.35, 0.009, blimp=-0.015)  # the small sample says -1.5 points
    assert not gen._meets(noisy_low, 0.35)
    confirmed = {
        **noisy_low,
        "confirm": {
            "blimp": {"items": 3350, "acc": 0.63, "native_acc": 0.634, "delta": -0.004, "delta_se": 0.003},
            "lambada": {"items": 1000, "acc": 0.03, "native_acc": 0.03, "delta": 0.0, "delta_se": 0.002},
        },
    }
    assert gen._meets(confirmed, 0.35) and gen._acc(confirmed, "blimp") == (-0.004, 0.003)
    worse = {**confirmed, "confirm": {**confirmed["confirm"], "lambada": {**confirmed["confirm"]["lambada"],
                                                                          "delta": -0.0101}}}  # fmt: skip
    assert not gen._meets(worse, 0.35)  # the confirmation can also turn a pass into a miss
    lines = gen._confirmation_lines([_row("native", 0.0, 0.0), confirmed])
    assert any("3,350 BLiMP pairs and 1,000 LAMBADA" in line for line in lines)
    assert any(line.startswith("| learned 0.35 | 35.0% | +0.90% | 0.630 | -0.40 ± 0.30 ") for line in lines)
    assert gen._confirmation_lines([noisy_low]) == []


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"confirm_blimp_limit": -1}, "confirm_blimp_limit must be an int >= 0"),
        ({"confirm_lambada_limit": True}, "confirm_lambada_limit must be an int >= 0"),
        ({"confirm_blimp_limit": 0}, "must both be 0 .* or both positive, got 0 and 1000"),
        ({"blimp_limit": 50}, r"confirm_blimp_limit \(50\) must exceed blimp_limit \(50\)"),
        ({"lambada_limit": 2000}, r"confirm_lambada_limit \(1000\) must exceed lambada_limit \(2000\)"),
    ],
)
def test_bad_confirmation_settings_are_refused(changes, match):  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.errors.PolicyError, match=match):
        BenchSettings(**changes)


def test_cli_refuses_bad_confirmation_limits_before_any_work(tmp_path, capsys):  # type: ignore[no-untyped-def]
    assert main(["bench", "--confirm-blimp-limit", "-1", "--out-dir", str(tmp_path)]) == 2
    assert "argument --confirm-blimp-limit: must be >= 0" in capsys.readouterr().err
    assert main(["bench", "--confirm-lambada-limit", "0", "--out-dir", str(tmp_path)]) == 2
    assert "must both be 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_confirm_scores_candidates_paired_with_native_once(monkeypatch):  # type: ignore[no-untyped-def]
    model, tokenizer = load_checkpoint(ROOT / "models" / "ref-olmoe")
    settings = BenchSettings(blimp_limit=1, lambada_limit=2, confirm_blimp_limit=2, confirm_lambada_limit=6)
    state: dict = {}
    saves = []
    sweep = _Model(model, tokenizer, settings, state, lambda: saves.append(1), lambda *_: None, None)
    points = [
        _Point("native", "native top-k", lambda: None),
        _Point("static", "uniform k=2", lambda: dmr.StaticTopK(k=2)),
        _Point("static", "uniform k=3", lambda: dmr.StaticTopK(k=3)),
    ]
    rows = [_row("native", 0.0, 0.0), _row("static", 0.5, 0.005), _row("static", 0.25, 0.002)]
    for row, point in zip(rows, points, strict=True):
        row["label"] = point.label
    calls = []
    real = quality.evaluate

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["policy"])
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "evaluate", counting)
    _confirm(sweep, points, rows, state, sweep.save, sweep.log)
    assert calls[0] is None and calls[1].to_dict() == dmr.StaticTopK(k=2).to_dict() and len(calls) == 2
    assert "confirm" not in rows[0] and "confirm" not in rows[2]  # 25% fewer: not a candidate
    got = rows[1]["confirm"]
    limit = {"blimp": 2, "lambada": 6}
    native = evaluate(model, tokenizer, corpora=[], tasks=["blimp", "lambada"], limit=limit)["tasks"]
    k2 = evaluate(
        model, tokenizer, policy=dmr.StaticTopK(k=2), corpora=[], tasks=["blimp", "lambada"], limit=limit
    )["tasks"]
    for task, items in (("blimp", 134), ("lambada", 6)):
        assert got[task]["items"] == items
        assert got[task]["native_acc"] == native[task]["acc"] and got[task]["acc"] == k2[task]["acc"]
        assert got[task]["delta"] == pytest.approx(k2[task]["acc"] - native[task]["acc"])
        # item by item, in the same order: the paired SE of the per-item differences
        assert got[task]["delta_se"] == paired_delta(k2[task]["item_scores"], native[task]["item_scores"])[1]
    assert len(saves) == 3  # after native, the candidate's policy (kept for a resume), its scores
    _confirm(sweep, points, rows, state, sweep.save, sweep.log)  # a resume: nothing is scored again
    assert len(calls) == 2


def test_confirm_refuses_rows_that_are_not_the_points_of_a_resumed_run():  # type: ignore[no-untyped-def]
    settings = BenchSettings(blimp_limit=1, lambada_limit=2, confirm_blimp_limit=2, confirm_lambada_limit=6)
    sweep = SimpleNamespace(settings=settings)  # refused before any model runs
    points = [
        _Point("native", "native top-k", lambda: None),
        _Point("learned", "learned q30", lambda: None),  # an allocator file added since the partial run
        _Point("learned", "learned q35", lambda: None),
    ]
    rows = [_row("native", 0.0, 0.0), {**_row("learned", 0.35, 0.005), "label": "learned q35"}]
    with pytest.raises(dmr.errors.ResumeError, match="row 1 \\('learned q35'\\) is not the sweep's point 1"):
        _confirm(sweep, points, rows, {}, lambda: None, lambda *_: None)
