"""``dmr report``: the HTML routing report, its data, and the page as a real browser renders it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.html_report import render_html, routing_trace
from dynamic_moe_router.hf.tiny import tiny_model

REF = Path(__file__).parents[1] / "models" / "ref-olmoe"
BENCH = Path(__file__).parents[1] / "benchmarks" / "results" / "quality_flops.json"


class _Tokens(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.titles: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        if a.get("class") == "tok":
            self.titles.append(a.get("title") or "")
        for key in ("src", "href"):
            if a.get(key):
                self.external.append(f"{tag} {key}={a[key]}")


def test_the_trace_counts_agree_with_the_profile() -> None:
    model = tiny_model("olmoe")
    trace = routing_trace(model, list(range(5, 17)), dmr.TopP(p=0.5))
    assert dmr.get_patch(model) is None  # patched for the run only
    assert len(trace.k) == len(trace.layers) == trace.profile["moe_layers"]
    for row, load, stats in zip(trace.k, trace.load, trace.profile["layers"], strict=True):
        assert len(row) == 12 and sum(row) == sum(load) == stats["kept_pairs"]
        assert all(k >= 1 for k in row)  # TopP keeps at least one expert
    assert trace.profile["routed_flop_reduction"] > 0
    native = routing_trace(model, list(range(5, 17)))
    assert all(k == n for row, n in zip(native.k, native.native_k, strict=True) for k in row)


def test_the_page_is_self_contained_and_shows_every_token() -> None:
    model = tiny_model("mixtral")
    trace = routing_trace(model, [5, 6, 7, 8, 9], dmr.TopP(p=0.5))
    page = render_html(trace, ["<a>", "b", "c & d", "e", "f"], bench=json.loads(BENCH.read_text()))
    parser = _Tokens()
    parser.feed(page)
    assert len(parser.titles) == 5 and not parser.external
    assert not re.search(r"https?://|url\(|@import", page)  # no network fetch of any kind
    assert "&lt;a&gt;" in page and "c &amp; d" in page  # token text escaped
    for t, title in enumerate(parser.titles):
        per_layer = [int(v) for v in re.findall(r"L\d+: (\d+)", title)]
        assert per_layer == [row[t] for row in trace.k]
    assert page.count("<circle") >= 10  # the bench result's points


def test_the_page_refuses_a_mismatched_token_list() -> None:
    trace = routing_trace(tiny_model("olmoe"), [5, 6, 7])
    with pytest.raises(ValueError, match="2 token strings for a trace of 3 tokens"):
        render_html(trace, ["a", "b"])


def _dmr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynamic_moe_router.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_a_bad_bench_file_fails_before_the_model_loads(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some text")
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    done = _dmr(
        "report",
        "--model",
        str(REF),
        "--text",
        str(text),
        "--bench",
        str(bad),
        "--out",
        str(tmp_path / "r.html"),
    )
    assert done.returncode == 2 and "argument --bench" in done.stderr and not (tmp_path / "r.html").exists()


@pytest.mark.skipif(not (REF / "config.json").is_file(), reason="the reference model is not in this checkout")
def test_dmr_report_writes_a_page_a_headless_browser_renders(tmp_path: Path) -> None:
    text = tmp_path / "story.txt"
    text.write_text(
        "The old lighthouse keeper walked along the shore every evening, counting the ships. " * 4
    )
    out = tmp_path / "report.html"
    done = _dmr(
        "report", "--model", str(REF), "--text", str(text), "--policy", "top_p:p=0.5",
        "--tokens", "64", "--bench", str(BENCH), "--out", str(out), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tokens"] == 64 and summary["policy_source"].startswith("--policy")
    page = out.read_text()
    assert page.count('class="tok"') == 64
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip(
            "no headless Chromium on this machine (apt-get install chromium); the page was checked as HTML"
        )
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,900", f"--screenshot={shot}", out.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 900)
    pixels = [image.getpixel((x, y)) for x in range(0, 1200, 2) for y in range(0, 900, 2)]
    # the token shading: orange of varying strength (rgba(214, 96, 0, a) over white)
    shaded = sum(1 for r, g, b in pixels if r > 200 and 100 < g < 240 and b < 0.8 * g and r - b > 60)
    assert shaded > 500, f"only {shaded} shaded pixels (of a 1-in-4 sample): the tokens were not drawn"


def test_a_policy_that_keeps_more_than_the_native_k_is_drawn_whole() -> None:
    model = tiny_model("olmoe")  # native k 4
    trace = routing_trace(model, list(range(5, 45)), dmr.EntropyAdaptive(low=0.0, high=0.5, max_k=8))
    assert max(max(row) for row in trace.k) > 4  # the case this test is about
    page = render_html(trace, [str(i) for i in range(40)])
    for row in trace.k:
        assert sum(row.count(k) for k in range(max(row) + 1)) == 40  # every token is in a histogram bar
    assert page.count("<figure>") == 2 * len(trace.layers)


def test_tracing_a_patched_model_with_another_policy_is_refused() -> None:
    model = tiny_model("olmoe")
    with dmr.patched(model, dmr.StaticTopK()), pytest.raises(dmr.PolicyError, match="already patched"):
        routing_trace(model, [5, 6, 7], dmr.TopP(p=0.5))
