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


def _learned_section(gen, text):  # type: ignore[no-untyped-def]
    return text.split(f"## {gen.LEARNED_TITLE}")[1].split("\n## ")[0]


def test_learned_section_renders_from_the_committed_file():  # type: ignore[no-untyped-def]
    gen = load_generator()
    results = ROOT / "benchmarks" / "results"
    payload = json.loads((results / "learned.json").read_text(encoding="utf-8"))
    text = gen.render(results)
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    # right after the issue-10 oracle / probe section
    assert headings[headings.index(f"## {gen.ISSUE10_TITLE}") + 1] == f"## {gen.LEARNED_TITLE}"
    section = _learned_section(gen, text)
    # "GPU runs" only when every merged run was one (ref-olmoe's committed allocator was re-measured on CPU)
    gpu = all(str((r.get("args") or {}).get("device", "")).startswith("cuda") for r in payload["merged_from"])
    assert gen.LEARNED_RUN in section and ("GPU runs" in section) == gpu
    for device in {r["device"] for r in payload["merged_from"]}:
        assert device in section
    summary = text.split("## Summary: targets met and missed")[1].split("\n## ")[0]
    for what in gen.LEARNED_WHAT.values():
        assert f"| {gen.LEARNED_TITLE} | {what} |" in summary
    g, w = "gutenberg_test", "wikitext2_test"
    for model in payload["models"]:
        name = model["model"]
        assert f"### {name} (top-{model['native_k']}" in section
        # (a) recomputed here: a point within 0.5 point of 35% on Gutenberg, +1% or less on both corpora,
        # among the fixed configurations and, per target, the training setting chosen on valid NLL
        fixed = [p for p in model["learned"] if p["tag"] in ("", "committed", "committed-quantile")]
        trials: dict = {}
        for p in model["learned"]:
            if p["tag"].startswith("train: "):
                trials.setdefault((p["comp"], p["target"]), []).append(p)
        chosen = [min(group, key=lambda p: p["valid_nll"]) for group in trials.values()]
        ok = any(
            p["results"][g]["reduction"] >= 0.345
            and max(p["results"][c]["ppl_change"] for c in (g, w)) <= 0.01
            for p in fixed + chosen
        )
        assert f"- **{gen.LEARNED_WHAT['flops']}, {name}: {'met' if ok else 'missed'}**: " in section
        # (b) one comparison per equal-FLOP row, won when learned is lower by more than 2 SE
        rows = model["equal_flops"]
        wins = sum(e["ppl_vs_static"] < 0 and e["ppl_vs_static"] < -2 * e["se"] for e in rows)
        assert f"- **{gen.LEARNED_WHAT['static']}, {name}: {wins} of {len(rows)} comparisons**: " in section
        # (c) points with compensation, WikiText-2 reduction within 2 points of the target: the main run
        # and each fixed variant
        for tag, label in (("", "main run"), ("committed", "variant committed"),
                           ("committed-quantile", "variant committed-quantile")):  # fmt: skip
            pts = [p for p in model["learned"] if p["comp"] and p["tag"] == tag]
            near = sum(abs(p["results"][w]["reduction"] - p["target"]) <= 0.02 for p in pts)
            line = f"- **{gen.LEARNED_WHAT['budget']}, {name}: {near} of {len(pts)} points** ({label}): "
            assert line in section
        # every learned point has its table row (target, valid reduction, Gutenberg reduction)
        for p in model["learned"]:  # variants also show the valid NLL change, where it was measured
            nll = f" {p['valid_nll_change']:+.4f} |" if "valid_nll_change" in p else " - |"
            valid = f"| {p['target']:.0%} | {p['valid_reduction']:.1%} |" + (nll if p["tag"] else "")
            assert f"{valid} {p['results'][g]['reduction']:.1%} |" in section


def test_learned_verdict_reads_no_ablation_and_picks_training_settings_on_valid(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()
    payload = json.loads((ROOT / "benchmarks" / "results" / "learned.json").read_text(encoding="utf-8"))
    model = payload["models"][1]  # ref-mixtral: missed on the committed data
    assert model["model"] == "ref-mixtral"
    base = next(p for p in model["learned"] if p["tag"] == "train: 800 steps")

    def point(tag: str, valid_nll: float, ppl: float) -> dict:  # type: ignore[type-arg]
        p = json.loads(json.dumps(base))
        p.update(tag=tag, valid_nll=valid_nll)
        for res in p["results"].values():
            res.update(reduction=0.35, ppl_change=ppl)
        return p

    def verdict(points: list) -> str:  # type: ignore[type-arg]
        data = json.loads(json.dumps(payload))
        data["models"][1]["learned"] = [p for p in model["learned"] if not p["tag"].startswith("train: ")]
        data["models"][1]["learned"] += points
        (tmp_path / "learned.json").write_text(json.dumps(data), encoding="utf-8")
        section = _learned_section(gen, gen.render(tmp_path))
        head = f"- **{gen.LEARNED_WHAT['flops']}, ref-mixtral: "
        return next(line for line in section.splitlines() if line.startswith(head))[len(head) :]

    # an ablation that meets the target on test does not count
    assert verdict([point("ablation: x", 0.0, 0.005)]).startswith("missed**")
    # of two training settings, the one with the lower valid NLL counts, whatever its test result
    assert verdict([point("train: a", 1.0, 0.005), point("train: b", 0.5, 0.02)]).startswith("missed**")
    assert verdict([point("train: a", 0.5, 0.005), point("train: b", 1.0, 0.02)]).startswith("met**")


def test_learned_section_table_numbers_come_from_the_json():  # type: ignore[no-untyped-def]
    gen = load_generator()
    results = ROOT / "benchmarks" / "results"
    numbers = _json_numbers(json.loads((results / "learned.json").read_text(encoding="utf-8")), set())
    section = _learned_section(gen, gen.render(results))
    tables = "\n".join(line for line in section.splitlines() if line.startswith("| "))
    tokens = re.findall(r"(?<![\w.])[-+]?\d+\.\d+", tables)
    assert len(tokens) > 200
    for token in tokens:
        places = len(token.split(".")[1])
        x = abs(float(token))
        assert any(
            abs(abs(round(v, places)) - x) < 1e-9 or abs(abs(round(100 * v, places)) - x) < 1e-9
            for v in numbers
        ), f"{token} in the learned-allocator tables is not a number of learned.json"


def test_learned_verdict_follows_the_data(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()
    payload = json.loads((ROOT / "benchmarks" / "results" / "learned.json").read_text(encoding="utf-8"))
    model = payload["models"][0]
    point = model["learned"][0]
    for res in point["results"].values():  # one point that reaches the target on both corpora
        res.update(reduction=0.36, ppl_change=0.004)
    (tmp_path / "learned.json").write_text(json.dumps(payload), encoding="utf-8")
    text = gen.render(tmp_path)
    section = _learned_section(gen, text)
    assert f"- **{gen.LEARNED_WHAT['flops']}, {model['model']}: met**: " in section
    assert "36.0% fewer at +0.40%" in section
    summary = text.split("## Summary: targets met and missed")[1].split("\n## ")[0]
    row = next(line for line in summary.splitlines() if gen.LEARNED_WHAT["flops"] in line)
    assert row.split(" | ")[2:4] == ["1", str(len(payload["models"]) - 1)]


def test_decode_section_reads_gpu_time_and_judges_the_step_ratio(tmp_path):  # type: ignore[no-untyped-def]
    """With ``--gpu-time`` the decode table gets a GPU column and the compiled cells a GPU-time line,
    while the step ratio stays the target: a step missed on wall time stays missed."""
    gen = load_generator()  # puts benchmarks/ on sys.path (render_decode's sibling imports)
    import render_decode

    def cell(variant: str, step: float, gpu: float) -> dict:  # type: ignore[type-arg]
        return {
            "shape": "olmoe", "layers": 16, "variant": variant, "mode": "compiled", "prompt": 128,
            "batch": 1, "prefill_ms": 50.0, "step_ms": step, "gpu_step_ms": gpu, "decode_tok_s": 1e3 / step,
            **({"routed_pair_reduction_on_prompt": 0.3} if variant == "dynamic" else {}),
        }  # fmt: skip

    data = {
        "command": "python benchmarks/bench_gpu_decode.py --gpu-time",
        "machine": {"gpu": "NVIDIA H200", "torch": "2.11", "transformers": "5.17"},
        "cells": [cell("unpatched", 4.0, 2.0), cell("static", 3.0, 1.5), cell("dynamic", 2.7, 1.0)],
    }
    text = "\n".join(render_decode.render_gpu_decode(data, tmp_path / "gpu_decode.json"))
    assert "| step ms | GPU ms | tok/s |" in text and "| 3.000 | 1.500 |" in text
    assert "dynamic/static 0.900 for a pair ratio of 0.700 (limit 0.805): **missed**" in text
    assert "dynamic/static 0.667 (1.000 / 1.500 ms of steps of 2.700 / 3.000 ms) for a pair ratio" in text
    assert "against 0.805 for the step ratio above (information: the step's kernels only" in text
    assert "3.000 / 4.000 ms = 0.750 (at most 1.03): met" in text
    assert gen is not None


def test_decode_interleaved_paragraph_follows_the_mode(tmp_path):  # type: ignore[no-untyped-def]
    """An interleaved compiled run is described as one (one model object per variant, shared
    weights), not with the eager run's patch-generate-unpatch rounds, and its verdicts stay."""
    load_generator()
    import render_decode

    def cell(variant: str, mode: str, step: float) -> dict:  # type: ignore[type-arg]
        return {
            "shape": "olmoe", "layers": 16, "variant": variant, "mode": mode, "prompt": 128, "batch": 1,
            "prefill_ms": 50.0, "step_ms": step, "decode_tok_s": 1e3 / step, "interleaved_rounds": 4,
            **({"routed_pair_reduction_on_prompt": 0.3} if variant == "dynamic" else {}),
        }  # fmt: skip

    machine = {"gpu": "NVIDIA H100", "torch": "2.11", "transformers": "5.17"}
    for mode, says, not_says in (
        ("compiled", "its own model object", "(patch, generate, unpatch)"),
        ("eager", "(patch, generate, unpatch)", "its own model object"),
    ):
        cells = [cell("unpatched", mode, 4.0), cell("static", mode, 3.0), cell("dynamic", mode, 2.4)]
        data = {"command": "x --interleave", "machine": machine, "cells": cells}
        text = "\n".join(render_decode.render_gpu_decode(data, tmp_path / "gpu_decode.json"))
        assert says in text and not_says not in text
        if mode == "compiled":
            assert "dynamic/static 0.800 for a pair ratio of 0.700 (limit 0.805): met" in text


def test_quality_equal_flop_bullets_count_the_learned_allocator_per_budget(tmp_path):  # type: ignore[no-untyped-def]
    """The equal-FLOP comparison under each reference model's table takes every dynamic curve,
    the learned allocator's threshold and quantile budgets as two curves, and its verdict follows
    the numbers."""
    gen = load_generator()
    payload = json.loads((ROOT / "benchmarks" / "results" / "quality_flops.json").read_text(encoding="utf-8"))
    model = next(m for m in payload["models"] if any(r["label"] == "uniform k=3" for r in m["rows"]))
    rows = model["rows"]
    static = next(r for r in rows if r["label"] == "uniform k=3")
    learned = [r for r in rows if r["family"] == "learned" and r["policy"]["_data"]["budget"] == "quantile"]
    at = next(r for r in learned if abs(r["routed_flop_reduction"] - static["routed_flop_reduction"]) <= 0.01)
    for change, verdict in ((static["ppl_rel_change"] - 0.005, "better than"), (0.5, "no better than")):
        at["ppl_rel_change"] = change
        for r in rows:  # the other curves far worse: the learned quantile point decides, or none does
            if r["family"] not in ("native", "static") and r is not at:
                r["ppl_rel_change"] = 0.4
        (tmp_path / "quality_flops.json").write_text(json.dumps(payload), encoding="utf-8")
        text = gen.render(tmp_path)
        head = "- At equal routed FLOPs with static uniform k=3"
        bullet = next(line for line in text.splitlines() if line.startswith(head))
        assert f"{verdict} the static baseline" in bullet, bullet
        if verdict == "better than":
            assert f"learned, quantile budget at perplexity {change:+.2%}" in bullet, bullet
        else:  # the best curve is now another one, at its +40%
            assert "learned, quantile budget" not in bullet and "at perplexity +40.00%" in bullet, bullet


def test_rerouting_lines_follow_the_committed_gpu_and_quality_data():  # type: ignore[no-untyped-def]
    """Every rerouting setting's layer ratio and verdict come from gpu_batch_aware.json; the 'usable'
    check counts the settings both within the layer limit and no worse than static k - 1 in
    batch_aware.json's decode perplexity (the smaller of the two prompt routings)."""
    gen = load_generator()
    import render_decode

    results = ROOT / "benchmarks" / "results"
    gpu = json.loads((results / "gpu_batch_aware.json").read_text())
    quality = json.loads((results / "batch_aware.json").read_text())
    text = "\n".join(render_decode.render_gpu_batch_aware(gpu, results / "gpu_batch_aware.json"))
    models = {"mixtral-8x7b": "ref-mixtral", "olmoe-1b-7b": "ref-olmoe"}
    checked = 0
    for shape, ref in models.items():
        model = next(m for m in quality["models"] if m["model"] == ref)
        for tokens in (64, 128, 256):
            cells = [
                c for c in gpu["cells"]
                if c["shape"] == shape and c["tokens"] == tokens and "reroute=True" in c["spec"]
            ]  # fmt: skip
            assert cells, (shape, tokens)
            usable = 0
            static = min(
                (r for r in model["rows"] if r["policy"].startswith("static_k")),
                key=lambda r: (abs(r["batch"] - tokens), r["batch"]),
            )
            for c in cells:
                fast = c["layer_ratio"] <= 0.85
                verdict = "met" if fast else "**missed**"
                assert f"{c['layer_ratio']:.3f} with `{c['spec']}` ({c['distinct_experts']} experts" in text
                head = f"`{c['spec']}` ({c['distinct_experts']} experts, pair ratio {c['pair_ratio']:.3f}"
                assert f"{head}; {verdict};" in text
                costs = [
                    r["ppl_ratio"]
                    for r in model["rows"]
                    if r["batch"] == static["batch"] and r["policy"] in (c["policy"], c["policy"] + "_decode")
                ]
                usable += fast and min(costs) <= static["ppl_ratio"]
                checked += 1
            mark = "met" if usable else "**missed**"
            assert (
                f"- Batch-aware rerouting usable, {shape}, {tokens} tokens: {usable} of {len(cells)} "
                f"settings within the layer limit at no more decode perplexity than `{static['spec']}` on "
                f"{ref}: {mark}."
            ) in text
    assert checked == 18 and gen is not None


def test_eager_host_diagnostic_verdict_follows_the_data(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()
    import render_decode

    def variant(step: float, moe: float, gpu: float, memcpy: int = 0) -> dict:  # type: ignore[type-arg]
        syncs = {"cudaMemcpy": memcpy} if memcpy else {}
        profile = {"gpu_ms": gpu, "kernel_launches": 10, "aten_ops": 20, "syncs": syncs}
        return {"step_ms": step, "moe_host_ms": moe, "router_host_ms": 1.0, "experts_host_ms": moe - 1.0,
                "profile": profile}  # fmt: skip

    data = {
        "command": "python benchmarks/diag_eager_host.py --out x.json",
        "machine": {"gpu": "NVIDIA H200"},
        "versions": {"torch": "2.11", "transformers": "5.17"},
        "results": [
            {
                "shape": "olmoe",
                "layers": 4,
                "variants": {
                    "unpatched": variant(10.0, 5.0, 2.0, memcpy=20),
                    "static+fused": variant(8.0, 3.0, 1.5),
                    "dynamic+fused": variant(7.9, 3.0, 1.2),
                },
            },
        ],
    }
    text = "\n".join(render_decode.render_diag_eager_host(data, tmp_path / "diag.json"))
    assert (
        "`dynamic+fused`: 126.6 against unpatched 100.0 and `static+fused` 125.0 (at least both): met."
        in text
    )
    assert "5 blocking `cudaMemcpy` per layer" in text and "takes 4.90 and 5.00 ms" in text
    data["results"][0]["variants"]["dynamic+fused"]["step_ms"] = 8.1  # slower than static: missed
    text = "\n".join(render_decode.render_diag_eager_host(data, tmp_path / "diag.json"))
    assert "`static+fused` 125.0 (at least both): **missed**." in text
    assert gen is not None


def _partial_width_payload(changes: dict[tuple[float, str], float]) -> dict:  # type: ignore[type-arg]
    points = []
    for (target, kind), change in changes.items():
        res = {"reduction": target, "change": change, "se": 0.002}
        how = "per-slot widths [1.0, 0.4]" if kind == "uniform" else "c=1.0000"
        points.append(
            {"target": target, "kind": kind, "how": how, "gutenberg_test": res, "wikitext2_test": res}
        )
    model = {
        "model": "ref-test", "native_k": 2, "intermediate": 160, "train_tokens": 1024,
        "full_width_max_abs_dnll": 0.0, "points": points, "seconds": 60.0,
    }  # fmt: skip
    return {"script": "benchmarks/partial_width_probe.py", "machine": {"threads": 2}, "models": [model]}


def test_partial_width_section_findings_follow_the_data(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()
    changes = {
        (0.3, "uniform"): 0.031, (0.3, "weight"): 0.0087, (0.3, "select"): 0.012,
        (0.35, "uniform"): 0.05, (0.35, "weight"): 0.04, (0.35, "select"): 0.0375,
    }  # fmt: skip
    (tmp_path / "partial_width_probe.json").write_text(json.dumps(_partial_width_payload(changes)))
    text = gen.render(tmp_path)
    section = text.split(f"## {gen.PARTIAL_WIDTH_TITLE}")[1].split("\n## ")[0]
    assert "### ref-test (native k = 2, I = 160)" in section
    assert "| 30% | [1.0, 0.4]: +3.10% ± 0.20% (30.0% fewer) | +0.87% ± 0.20% (30.0% fewer) |" in section
    assert (
        "at 30% the best is width by router weight (+0.87%, within the +1% limit); "
        "at 35% the best is whole slots by router weight (+3.75%, above the +1% limit)." in section
    )
    assert "skipped" not in text.split("## Summary")[0]


def test_lr_schedule_section_rows_and_finding_follow_the_data(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()

    def row(schedule: str, lr: float, change: float) -> dict:  # type: ignore[type-arg]
        return {
            "config": {"lr": lr, "steps": 400, "batch_windows": 4, "lr_schedule": schedule},
            "train_seconds": 300.4, "final_kl": 0.01234, "ppl_change": change, "ppl_change_se": 0.0012,
            "reduction": 0.35,
        }  # fmt: skip

    payload = {
        "benchmark": "lr_schedule_probe",
        "commands": ["python benchmarks/lr_schedule_probe.py --out x.json"],
        "machine": {"cpu": "x86_64", "threads": 2},
        "versions": {"torch": "2.13.0"},
        "model": "ref-test",
        "windows": {"train": 800, "budget": 64, "scored": 64},
        "target": 0.35,
        "context": 512,
        "held_skip": 1537,
        "rows": [row("constant", 0.003, 0.0129), row("linear", 0.003, 0.0146)],
    }
    path = tmp_path / "lr_schedule_probe.json"
    path.write_text(json.dumps(payload))
    section = gen.render(tmp_path).split(f"## {gen.LR_SCHEDULE_TITLE}")[1].split("\n## ")[0]
    assert "| linear | 0.003 | 400 x 4 | 300 | 0.0123 | +1.46% ± 0.12 | 35.0% |" in section
    assert "none of the other rows beats the first (constant at lr 0.003, +1.29%)" in section
    assert "The rows' training configs differ only in: lr_schedule." in section
    assert "64 other valid windows of 512 tokens, starting 1537 tokens into their documents" in section
    payload["rows"].append(row("constant", 0.006, 0.0101))
    path.write_text(json.dumps(payload))
    section = gen.render(tmp_path).split(f"## {gen.LR_SCHEDULE_TITLE}")[1].split("\n## ")[0]
    assert "the lowest is constant at lr 0.006 (+1.01%, against +1.29% for constant at lr 0.003)" in section
    assert "differ only in: lr, lr_schedule." in section and "one training per row" in section


def test_routing_share_is_judged_inside_the_layer_when_measured(tmp_path):  # type: ignore[no-untyped-def]
    """With the experts timed alone, the 4096-token share verdict reads block minus experts (the
    routing's cost inside the layer) and still prints the share of the routing called alone."""
    gen = load_generator()
    payload = json.loads((ROOT / "benchmarks" / "results" / "gpu_routing.json").read_text(encoding="utf-8"))
    cell = next(c for c in payload["cells"] if c["tokens"] == 4096)
    payload["cells"] = [cell]
    modes = [m for m in ("patched", "graphs", "fused", "fused_graphs") if f"static_{m}_us" in cell]
    for p in ("static", "top_p"):
        for i, m in enumerate(modes):
            block = cell[f"{p}_{m}_block_us"]
            cell[f"{p}_{m}_experts_us"] = block * (0.99 if p == "static" and m == "fused" else 0.9 - 0.01 * i)
            cell[f"{p}_{m}_in_layer_share"] = 1 - cell[f"{p}_{m}_experts_us"] / block
    (tmp_path / "gpu_routing.json").write_text(json.dumps(payload), encoding="utf-8")
    section = gen.render(tmp_path).split("## GPU: routing cost per layer in eager mode")[1].split("\n## ")[0]
    where = f"{cell['shape']}, 4096 tokens"
    isolated = min(cell[f"static_{m}_share_of_block"] for m in modes)
    assert (
        f"- Routing share of the layer, {where}, StaticTopK: 1.00% inside the layer with fused routing"
        in section
    )
    assert f"{isolated:.1%} when the routing is called alone" in section
    static_line = next(line for line in section.splitlines() if f"{where}, StaticTopK: 1.00% inside" in line)
    assert static_line.endswith("limit 3%): met.")
    top_p_line = next(line for line in section.splitlines() if f"{where}, TopP: 12.00% inside" in line)
    assert top_p_line.endswith("limit 3%): **missed**.")
    assert "share, in layer)" in section


def test_compiled_step_diagnostic_verdict_and_ceiling_follow_the_data(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()
    import render_decode

    def variant(step: float, gpu: float, ours: float, first: int = 32) -> dict:  # type: ignore[type-arg]
        return {
            "generate_step_ms": step, "generate_step_ms_rounds": [step], "gpu_ms_per_step": gpu,
            "dmr_kernels_ms_per_step": ours, "graph_launches_per_step": 1.0, "kernel_launches_per_step": 49.0,
            "syncs_per_step": 1.0, "cudagraph_skips": 0, "first_divergence": first,
        }  # fmt: skip

    data = {
        "command": "python benchmarks/diag_compiled_step.py --out x.json",
        "machine": {"gpu": "NVIDIA H200"},
        "versions": {"torch": "2.11", "transformers": "5.17"},
        "results": [
            {
                "shape": "mixtral",
                "layers": 8,
                "routed_pair_reduction_on_prompt": 0.3,
                "first_token": {
                    "tokens": {"unpatched": 5, "static": 5, "dynamic": 6},
                    "unpatched_top2_margin": 0.09,
                    "max_abs_logit_diff": {"static": 0.4, "dynamic": 6.0},
                },
                "variants": {
                    "unpatched": variant(6.0, 4.9, 0.0),
                    "static": variant(4.0, 3.0, 2.0, first=7),
                    "dynamic": variant(3.5, 2.5, 1.5, first=0),
                },
            },
        ],
    }
    text = "\n".join(render_decode.render_diag_compiled_step(data, tmp_path / "diag.json"))
    # 3.5 / 4.0 = 0.875 against 1.15 x 0.7 = 0.805; experts 50% of the step: ceiling 1 - 0.3 x 0.5 = 0.85
    assert "dynamic/static 0.875 for the prompt's pair ratio 0.700 (limit 0.805): **missed**." in text
    assert "Those kernels are 50.0% of static's step" in text and "would be 0.850, above the limit" in text
    assert "| static | 4.000 | 3.000 | 2.000 | 1.000 | 1.000 | 1.0 | 49.0 | 1.0 | 0 | 8 |" in text  # 1-based
    assert "| dynamic | 3.500 | 2.500 | 1.500 | 1.000 | 1.000 | 1.0 | 49.0 | 1.0 | 0 | 1 |" in text
    assert "margin 0.09, static's largest logit difference from unpatched 0.4" in text
    assert "so a near-tie can flip the token" in text
    # experts 90% of a faster dynamic step: the ceiling is within the limit and the step meets it
    data["results"][0]["variants"]["static"] = variant(4.0, 3.9, 3.6)
    data["results"][0]["variants"]["dynamic"] = variant(3.0, 2.9, 2.5)
    text = "\n".join(render_decode.render_diag_compiled_step(data, tmp_path / "diag.json"))
    assert "dynamic/static 0.750 for the prompt's pair ratio 0.700 (limit 0.805): met." in text
    assert "would be 0.730, within the limit, as the measured step is." in text
    # the ceiling within the limit but the measured step above it: the kernels' scaling misses
    data["results"][0]["variants"]["dynamic"] = variant(3.4, 3.3, 3.0)
    text = "\n".join(render_decode.render_diag_compiled_step(data, tmp_path / "diag.json"))
    assert "(limit 0.805): **missed**." in text and "the experts kernels' own scaling is what misses" in text
    # the decode steps' own pair count, where recorded, sets the limit: 1.15 x 0.8 = 0.92
    data["results"][0]["routed_pair_reduction_on_decode"] = 0.2
    data["results"][0]["variants"]["dynamic"] = variant(3.4, 3.3, 3.0)
    text = "\n".join(render_decode.render_diag_compiled_step(data, tmp_path / "diag.json"))
    assert "0.850 for the decode steps' pair ratio 0.800 (the prompt's 0.700; limit 0.920): met." in text
    assert "(pair ratio 0.800, from the decode steps)" in text
    assert "would be 0.820" in text  # 1 - (1 - 0.8) x 3.6 / 4.0: the ceiling uses the decode pairs too
    assert gen is not None


def test_tile_aware_section_rows_and_findings_follow_the_data(tmp_path):  # type: ignore[no-untyped-def]
    gen = load_generator()

    def corpus(reduction, vs_native, tiles, vs_top=None, equal=None, between="0.300..0.350"):  # type: ignore[no-untyped-def]
        c = {
            "reduction": reduction, "ppl": 60.0, "tiles": {"64": 4 * tiles, "128": 2 * tiles, "256": tiles},
            "tile_ratio_native": {"64": tiles / 200, "128": tiles / 200, "256": tiles / 200},
            "vs_native": {"change": vs_native, "se": 0.0015},
        }  # fmt: skip
        if vs_top is not None:
            c["tile_ratio_top_p"] = {t: tiles / 150 for t in ("64", "128", "256")}
            c["vs_top_p_same_p"] = {"change": vs_top, "se": 0.001}
        if equal is not None:
            c["vs_top_p_equal_flops"] = {"change": equal, "se": 0.001, "between": between}
        return c

    points = [
        {
            "target": 0.3, "top_p": 0.48, "policy": "top_p",
            "corpora": {"gutenberg_test": corpus(0.304, 0.0394, 150)},
        },
        {
            "target": 0.3, "top_p": 0.48, "policy": "round",
            "corpora": {"gutenberg_test": corpus(0.311, 0.032, 105, vs_top=-0.0071, equal=-0.0085)},
        },
        {
            "target": 0.35, "top_p": 0.45, "policy": "round",
            "corpora": {"gutenberg_test": corpus(0.364, 0.041, 99, vs_top=-0.0075, equal=0.0005)},
        },
        {
            "target": 0.3, "top_p": 0.48, "policy": "refill",
            "corpora": {
                "gutenberg_test": corpus(0.1, 0.004, 150, vs_top=-0.03, equal=-0.007, between="0.000..0.250")
            },
        },
    ]  # fmt: skip
    payload = {
        "benchmark": "tile_aware_eval",
        "command": "python benchmarks/tile_aware_eval.py --out x.json",
        "machine": {"cpu": "x86_64", "threads": 2},
        "torch": "2.13.0",
        "rows": 256,
        "batch_windows": 8,
        "models": [
            {
                "model": "ref-test", "num_experts": 32, "native_k": 4, "tokens_per_call": 4096,
                "native": {"gutenberg_test": {"ppl": 62.0, "tiles": {"256": 200}, "calls": 6}},
                "points": points,
            }
        ],
    }  # fmt: skip
    (tmp_path / "tile_aware.json").write_text(json.dumps(payload))
    section = gen.render(tmp_path).split(f"## {gen.TILE_AWARE_TITLE}")[1].split("\n## ")[0]
    assert "| 30% | 0.4800 | top_p | gutenberg_test | 30.4% | +3.94% ± 0.15 | - | - | - | 0.750 |" in section
    assert (
        "| 30% | 0.4800 | round | gutenberg_test | 31.1% | +3.20% ± 0.15 | -0.71% ± 0.10 | -0.85% ± 0.10 "
        "(0.300..0.350) | 0.700 | 0.525 |" in section
    )
    # a chord across a wide bracket of TopP reductions is not a comparison
    assert "| 30% | 0.4800 | refill | gutenberg_test | 10.0% | +0.40% ± 0.15 | -3.00% ± 0.10 | - |" in section
    assert (
        "`refill` against `TopP` at equal routed FLOPs: not compared (no `TopP` points within 0.06 on"
        in section
    )
    assert (
        "ref-test, gutenberg_test, `round` against `TopP` at equal routed FLOPs: -0.85% to +0.05% over 2 of "
        "2 targets (1 lower by more than 2 SE, 0 higher by more than 2 SE), on 0.660-0.700 of `TopP`'s "
        "row tiles." in section
    )
    assert "skipped" not in gen.render(tmp_path).split("## Summary")[0]
