"""BENCHMARKS.md is generated from the committed results, never edited by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "gen_benchmarks_md", ROOT / "benchmarks" / "gen_benchmarks_md.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_md_is_up_to_date():  # type: ignore[no-untyped-def]
    gen = load_generator()
    rendered = gen.render(ROOT / "benchmarks" / "results")
    assert rendered == (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"), (
        "BENCHMARKS.md is stale: run python benchmarks/gen_benchmarks_md.py"
    )


def test_generator_skips_missing_results(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()
    text = gen.render(tmp_path)
    assert text.startswith("# Benchmarks") and "cpu_experts" in text
