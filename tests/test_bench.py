"""dmr bench on a data slice: the JSON schema, the plot and the BENCHMARKS.md section."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

import dynamic_moe_router as dmr
from dynamic_moe_router.sweeps.quality import (
    BenchSettings,
    confirmation_candidates,
    run_bench,
    summary_table,
)

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "family", "label", "policy", "routed_flop_reduction", "total_flop_reduction", "mean_k", "ppl", "ppl_ci95",
    "ppl_rel_change", "blimp_acc", "blimp_delta", "blimp_delta_se", "lambada_acc", "lambada_delta",
    "lambada_delta_se", "wall_s",
}  # fmt: skip


def test_bench_on_a_slice(tmp_path):  # type: ignore[no-untyped-def]
    settings = BenchSettings(
        ppl_tokens=512,
        blimp_limit=1,
        lambada_limit=4,
        calibration_tokens=1024,
        decode_batches=(4, 8),
        decode_prompt=16,
        decode_steps=4,
        batch_aware_fractions=(0.25,),
        confirm_blimp_limit=2,
        confirm_lambada_limit=8,
    )
    payload = run_bench([ROOT / "models" / "ref-olmoe"], tmp_path, settings, log=lambda *_: None)
    saved = json.loads((tmp_path / "quality_flops.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    (model,) = saved["models"]
    rows = model["rows"]
    assert rows[0]["family"] == "native" and rows[0]["routed_flop_reduction"] == 0.0
    families = {r["family"] for r in rows}
    assert families == {
        "native",
        "static",
        "lu_median",
        "top_p",
        "relative_threshold",
        "entropy",
        "calibrated",
        "learned",
    }
    decoding = model["batched_decoding"]  # the batch_aware family: a batched-decoding measurement
    assert [(r["batch"], r["policy"]) for r in decoding["rows"]] == [
        (b, p)
        for b in (4, 8)
        for p in (
            "native",
            "static_k3",
            "batch_aware_0.25",
            "batch_aware_reroute_0.25",
            "batch_aware_reroute_0.25_decode",
        )
    ]
    for r in decoding["rows"]:
        assert r["decode_tokens"] == r["batch"] * 5 and r["decode_ppl"] > 1  # the prefill's + 4 steps
        if r["policy"] == "native":
            assert (r["ppl_ratio"], r["pair_reduction"]) == (1.0, 0.0)
        if r["policy"] == "static_k3":
            assert r["pair_reduction"] == pytest.approx(0.25)  # 3 of 4 slots, exactly
        if r["policy"] == "batch_aware_0.25":  # fewer distinct experts than native, at the same batch
            native = next(n for n in decoding["rows"] if n["batch"] == r["batch"] and n["policy"] == "native")
            assert r["distinct_experts_per_call"] < native["distinct_experts_per_call"]
        if r["policy"].startswith("batch_aware_reroute_0.25"):  # a hard cap on the distinct experts
            assert r["distinct_experts_per_call"] <= math.ceil(0.25 * decoding["num_experts"])
            assert r["pair_reduction"] == 0.0
    committed = {
        f"learned {f.stem.removeprefix('learned-')}": dmr.load_policy(f)
        for f in (ROOT / "models" / "ref-olmoe" / "allocators").glob("learned-*.json")
    }
    assert sorted(r["label"] for r in rows if r["family"] == "learned") == sorted(committed)
    candidates = confirmation_candidates(rows)
    assert [i for i, r in enumerate(rows) if "confirm" in r] == candidates
    for r in rows:
        assert set(r) == ROW_KEYS | ({"confirm"} if "confirm" in r else set())
        if "confirm" in r:
            assert (r["confirm"]["blimp"]["items"], r["confirm"]["lambada"]["items"]) == (134, 8)
        if r["family"] == "learned":  # weights live in the committed file: the row names its digest
            assert r["policy"] == json.loads(json.dumps(committed[r["label"]].to_dict()))
        elif r["policy"] is not None:
            assert dmr.policies.policy_from_dict(r["policy"])  # every point is a loadable policy
    uniform = {r["label"]: r for r in rows if r["label"].startswith("uniform")}
    assert uniform["uniform k=2"]["routed_flop_reduction"] == 0.5  # exact for static top-k
    calibrated = next(r for r in rows if r["family"] == "calibrated")
    assert calibrated["routed_flop_reduction"] > 0
    assert model["data"]["blimp"]["items"] == 67 and model["data"]["lambada"]["items"] == 4
    assert "native top-k" in summary_table(payload)
    spec = importlib.util.spec_from_file_location("gen", ROOT / "benchmarks" / "gen_benchmarks_md.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    section = "\n".join(gen.render_quality_flops(saved, tmp_path / "quality_flops.json"))
    assert "30% target" in section and "35% target" in section and "ref-olmoe" in section
    assert "Batched decoding" in section
    assert "`batch_aware(inner=static_top_k(k=native), experts=0.25" in section
    assert model["model"] == "models/ref-olmoe"  # paths relative to the repository
    assert all(not entry["file"].startswith("/") for entry in model["data"].values())


def test_replot_from_the_committed_results(tmp_path):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.cli import main

    assert main(["bench", "--replot", str(ROOT / "benchmarks" / "results" / "quality_flops.json"),
                 "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_committed_results_record_no_machine_paths():  # type: ignore[no-untyped-def]
    text = (ROOT / "benchmarks" / "results" / "quality_flops.json").read_text()
    data = json.loads(text)
    for model in data["models"]:
        assert model["model"].startswith("models/")
        assert all(e["file"].startswith("../shared/data/") for e in model["data"].values())


def test_the_sweep_and_the_library_do_not_import_matplotlib():  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    code = "import sys, dynamic_moe_router.sweeps.quality; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_failed_savefig_leaves_no_temporary_plot(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import matplotlib.figure
    import pytest

    from dynamic_moe_router.sweeps.plot import replot

    def broken(self, fname, *args, **kwargs):  # type: ignore[no-untyped-def]
        Path(fname).write_bytes(b"half a png")  # a partly written file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        replot(ROOT / "benchmarks" / "results" / "quality_flops.json", tmp_path / "pareto.png")
    assert list(tmp_path.iterdir()) == []


def test_run_bench_refuses_to_overwrite_an_earlier_partial_file(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import pytest

    import dynamic_moe_router.sweeps.quality as quality

    monkeypatch.setattr(quality, "load_checkpoint", lambda *_: pytest.fail("a model was loaded"))
    partial = tmp_path / "quality_flops.partial.json"
    partial.write_text('{"results": {"m": {"rows": [1]}}, "elapsed_s": 5}', encoding="utf-8")
    with pytest.raises(
        dmr.errors.ResumeError, match="pass --resume to continue it, or delete it to start over"
    ):
        run_bench([ROOT / "models" / "ref-olmoe"], tmp_path, BenchSettings(), log=lambda *_: None)
    assert json.loads(partial.read_text())["elapsed_s"] == 5  # untouched


def test_run_bench_resume_names_a_malformed_partial_file(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import pytest

    import dynamic_moe_router.sweeps.quality as quality

    monkeypatch.setattr(quality, "load_checkpoint", lambda *_: pytest.fail("a model was loaded"))
    partial = tmp_path / "quality_flops.partial.json"
    for text in ("[]", "{}", '{"results": []}', '{"results": {}}', '{"results": {}, "elapsed_s": "x"}'):
        partial.write_text(text, encoding="utf-8")
        with pytest.raises(dmr.errors.ResumeError, match="not a dmr bench partial-results file") as info:
            run_bench([ROOT / "models" / "ref-olmoe"], tmp_path, BenchSettings(), resume=True)
        assert str(partial) in str(info.value)


def test_old_bench_module_is_a_deprecated_alias(monkeypatch):  # type: ignore[no-untyped-def]
    import importlib
    import sys

    import pytest

    from dynamic_moe_router.sweeps import quality

    monkeypatch.delitem(sys.modules, "dynamic_moe_router.bench", raising=False)
    with pytest.warns(DeprecationWarning, match="dynamic_moe_router.sweeps.quality"):
        old = importlib.import_module("dynamic_moe_router.bench")
    assert old.run_bench is quality.run_bench and old.BenchSettings is quality.BenchSettings
