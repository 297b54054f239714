"""Markdown section for ``lowrank_comp_probe.json`` (``lowrank_comp_probe.py``: issue 10, item 3, does a
token-dependent compensation pay?).

Used by ``gen_benchmarks_md.py``; every number comes from the result file. Research with no target of
its own: no met/missed lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from render_gpu import _rel

TITLE = "Token-dependent compensation (issue 10, item 3): a rank-r linear term, evaluated, not kept"
CORPORA = {"gutenberg_test": "Gutenberg test", "wikitext2_test": "WikiText-2 test"}
INTRO = (
    "A dropped slot of expert e is compensated by its native weight times m_e + (h - x̄_e) A_e B_e: m_e is "
    "the committed allocator's trained vector, A_e B_e the rank-r ridge fit of expert e's output on its "
    "input over the train tokens that route to e at a ranked slot >= 1, weighted by the slot's native "
    "weight squared. It costs 4·H·r FLOPs per dropped slot."
)
TABLE_INTRO = (
    "The committed `learned-q35` allocator (quantile budget, 35% fewer routed FLOPs) with the term added "
    "(perplexity change against native; *vs trained vectors*: paired change against the same allocator "
    "without the term, in points ± bootstrap SE):"
)


def _row(row: dict[str, Any], pair_flops: int) -> str:
    rank = row["rank"]
    flops = row.get("flops_per_dropped_slot", 0)
    cells = [str(rank) if rank else "0 (trained vectors only)"]
    cells.append(f"{flops:,} ({flops / pair_flops:.1%} of a pair)" if rank else "0")
    for c in CORPORA:
        r = row[c]
        cells.append(f"{r['ppl_change']:+.2%}")
        cells.append(f"{100 * r['vs_means_only']:+.2f} ± {100 * r['se']:.2f}" if "se" in r else "-")
    return "| " + " | ".join(cells) + " |"


def render_lowrank_comp(data: dict[str, Any], path: Path) -> list[str]:
    args = data.get("args") or {}
    source = (
        f"Source: `{_rel(path)}`, written by `{data.get('script', '?')}` on {data.get('device')} "
        f"({args.get('train_windows')} Gutenberg train windows for the fits, {args.get('tokens')} "
        "test tokens per corpus)."
    )
    lines = [f"## {TITLE}", "", f"{source} {INTRO}", ""]
    for m in data["models"]:
        ex = m["explained"]
        ranks = [k for k in ex if k.startswith("r") and k != "r0"]
        errors = ", ".join(f"rank {k[1:]} {ex[k]:.3f}" for k in ranks)
        lines += [
            f"### {m['model']} (H = {m['hidden_size']}, {m['flops_per_pair']:,} FLOPs per routed pair)",
            "",
            "Held-out weighted squared error of the dropped slots' outputs, relative to no compensation: "
            f"mean output {ex['mean']:.3f}; {errors}; full rank {ex['r0']:.3f}.",
            "",
            TABLE_INTRO,
            "",
            "| rank | FLOPs per dropped slot | "
            + " | ".join(f"{n} change | {n} vs trained vectors" for n in CORPORA.values())
            + " |",
            "|---:|---:|" + "---:|---:|" * len(CORPORA),
        ]
        lines += [_row(row, m["flops_per_pair"]) for row in m["perplexity"]]
        with_term = [row for row in m["perplexity"] if row["rank"]]
        spans = []
        for c, name in CORPORA.items():
            d = [100 * row[c]["vs_means_only"] for row in with_term]
            spans.append(f"{name} by {min(d):+.2f} to {max(d):+.2f} points")
        best = min(ex[k] for k in ranks)
        lines += [
            "",
            f"Findings: the term cuts the held-out output error from {ex['mean']:.3f} (mean) to as low as "
            f"{best:.3f}, yet moves perplexity against the trained vectors alone {' and '.join(spans)}.",
        ]
        lines.append("")
    return lines
