"""BENCHMARKS.md is generated from the committed results, never edited by hand."""

from __future__ import annotations

import importlib.util
import json
import re
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


def test_benchmarks_md_opens_with_the_summary_and_plain_headings():  # type: ignore[no-untyped-def]
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Summary: targets met and missed"
    summary = text.split("## Summary: targets met and missed")[1].split("\n## ")[0]
    assert "| benchmark | target | met | missed | missed on |" in summary and "How to read it" in summary
    assert len(summary.splitlines()) < 40  # one screen
    assert not [h for h in headings if ".json" in h]  # no section headed by a file name
    assert "÷" not in text
    for mark in ("†", "‡"):  # every symbol is explained in the legend
        assert f"{mark} = " in summary


def _json_numbers(value, out):  # type: ignore[no-untyped-def]
    """Every number in a JSON value, including those written inside its strings."""
    if isinstance(value, dict):
        for v in value.values():
            _json_numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            _json_numbers(v, out)
    elif isinstance(value, bool):
        pass
    elif isinstance(value, (int, float)):
        out.add(float(value))
    elif isinstance(value, str):
        out.update(float(x) for x in re.findall(r"\d+(?:\.\d+)?", value))
    return out


def test_issue10_section_numbers_come_from_the_json():  # type: ignore[no-untyped-def]
    results = ROOT / "benchmarks" / "results"
    numbers: set[float] = set()
    for name in ("oracle.json", "learned_probe.json"):
        _json_numbers(json.loads((results / name).read_text(encoding="utf-8")), numbers)
    gen = load_generator()
    text = gen.render(results)
    title = f"## {gen.ISSUE10_TITLE}"
    section = text.split(title)[1].split("\n## ")[0]
    assert "benchmarks/ORACLE_NOTES.md" in section and "NVIDIA H200" in section
    assert "ref-olmoe" in section and "ref-mixtral" in section
    # the summary has one oracle and one learned-probe row for the issue-10 target
    summary = text.split("## Summary: targets met and missed")[1].split("\n## ")[0]
    assert summary.count(gen.ISSUE10_TARGET) == 2
    prose = section.replace("issue 10", "").replace("top-4", "").replace("top-2", "")
    tokens = re.findall(r"(?<![\w.])[-+]?\d+(?:\.\d+)?", prose)
    assert len(tokens) > 100
    for token in tokens:
        places = len(token.split(".")[1]) if "." in token else 0
        x = abs(float(token))
        assert any(
            abs(abs(round(v, places)) - x) < 1e-9 or abs(abs(round(100 * v, places)) - x) < 1e-9
            for v in numbers
        ), f"{token} in the issue-10 section is not a number of the result files"
