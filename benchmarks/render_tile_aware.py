"""Markdown section for ``tile_aware.json`` (``tile_aware_eval.py``: ``dmr.TileAware`` on the reference
models; quality, routed FLOPs and GEMM row tiles in prefill-sized routing calls).

Used by ``gen_benchmarks_md.py``; every number comes from the result file. The layer-time effect of the
tiles is measured on a GPU by ``diag_prefill_stages.py``; this section states no met/missed verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from render_gpu import _rel

TITLE = "Tile-aware routing: quality and GEMM row tiles on the reference models (prefill)"


def _pm(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['change']:+.2%} ± {100 * r['se']:.2f}"


def render_tile_aware(data: dict[str, Any], path: Path) -> list[str]:
    machine = data.get("machine") or {}
    rows = data["rows"]
    lines = [
        f"## {TITLE}",
        "",
        f"Source: `{_rel(path)}` (`{data.get('command', '?')}`; CPU {machine.get('cpu', '?')}, "
        f"{machine.get('threads')} threads, torch {data.get('torch', '?')}). Each forward routes "
        f"{data['batch_windows']} windows of 512 tokens at once (one routing call per MoE layer, as in "
        f"prefill). `TopP(p)` with `p` bisected on Gutenberg valid for each target; `TileAware(TopP(p), "
        f"rows={rows}, mode)` at the same `p`. *reduction*: routed-FLOP reduction on the corpus (pair "
        "counters); *vs native*, *vs TopP same p*, *vs TopP equal FLOPs*: perplexity change ± paired "
        "bootstrap SE over windows, the last against `TopP`'s points (native included) interpolated per "
        f"window to this row's reduction; *tiles*: row tiles of {rows} rows (sum over calls and experts of "
        f"ceil(rows / {rows})) over `TopP`'s at the same `p` and over native top-k's.",
        "",
    ]
    for model in data["models"]:
        native = model["native"]
        lines += [
            f"### {model['model']} ({model['num_experts']} experts, top-{model['native_k']}, "
            f"{model['tokens_per_call']} tokens per call)",
            "",
            "Native perplexity: " + ", ".join(f"{n} {v['ppl']:.3f}" for n, v in native.items()) + ".",
            "",
            "| target | p | policy | corpus | reduction | vs native | vs TopP same p | vs TopP equal FLOPs "
            "| tiles / TopP | tiles / native |",
            "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for point in model["points"]:
            for corpus, c in point["corpora"].items():
                over_top = c.get("tile_ratio_top_p", {}).get(str(rows))
                lines.append(
                    f"| {point['target']:.0%} | {point['top_p']:.4f} | {point['policy']} | {corpus} "
                    f"| {c['reduction']:.1%} | {_pm(c['vs_native'])} | {_pm(c.get('vs_top_p_same_p'))} "
                    f"| {_pm(c.get('vs_top_p_equal_flops'))} "
                    f"| {'-' if over_top is None else f'{over_top:.3f}'} "
                    f"| {c['tile_ratio_native'][str(rows)]:.3f} |"
                )
        lines.append("")
        for corpus in native:
            eq = [
                p["corpora"][corpus]
                for p in model["points"]
                if p["policy"] == "round" and "vs_top_p_equal_flops" in p["corpora"][corpus]
            ]
            if not eq:
                continue
            changes = [c["vs_top_p_equal_flops"] for c in eq]
            better = sum(c["change"] < -2 * c["se"] for c in changes)
            worse = sum(c["change"] > 2 * c["se"] for c in changes)
            tiles = [c["tile_ratio_top_p"][str(rows)] for c in eq]
            lines.append(
                f"- {model['model']}, {corpus}, `round` against `TopP` at equal routed FLOPs: "
                f"{min(c['change'] for c in changes):+.2%} to {max(c['change'] for c in changes):+.2%} over "
                f"{len(changes)} targets ({better} lower by more than 2 SE, {worse} higher by more than "
                f"2 SE), on {min(tiles):.3f}-{max(tiles):.3f} of `TopP`'s row tiles."
            )
        lines.append("")
    return lines
