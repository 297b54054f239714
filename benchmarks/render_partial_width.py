"""Markdown section for ``partial_width_probe.json`` (``partial_width_probe.py``: issue 10, does running
part of an expert's width pay for ref-mixtral?).

Used by ``gen_benchmarks_md.py``; every number comes from the result file. Research with no target of
its own: the findings line compares the best allocation at each budget with the headline's perplexity
limit, and states no met/missed verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynamic_moe_router.sweeps.targets import PPL_LIMIT
from render_gpu import _rel

TITLE = "Partial-width slots (issue 10): part of an expert's width per routed slot, evaluated, not kept"
CORPORA = {"gutenberg_test": "Gutenberg test", "wikitext2_test": "WikiText-2 test"}
KINDS = {
    "uniform": "uniform widths per ranked slot",
    "weight": "width by router weight",
    "select": "whole slots by router weight",
}
INTRO = (
    "A routed slot runs only the m most important of its expert's I intermediate neurons; the others are "
    "replaced by their mean activation on Gutenberg train (m = 0 is a dropped slot with mean-output "
    "compensation, m = I the full expert). Neuron order per expert: activation variance times the squared "
    "norm of the down-projection column, tokens weighted by their native slot weight squared. A slot at "
    "width fraction f costs f of an expert's FLOPs. *uniform*: ranked slot j runs at a fixed fraction f_j, "
    "the split chosen on Gutenberg valid; *width by router weight*: the top slot is full, slot j >= 1 runs "
    "at min(1, c·w_j / mean w), c bisected on valid for the budget; *whole slots*: the same budget spent by "
    "keeping or dropping whole non-top slots by weight, with the same compensation. Weights stay native."
)


def _cell(p: dict[str, Any], corpus: str) -> str:
    r = p[corpus]
    return f"{r['change']:+.2%} ± {r['se']:.2%} ({r['reduction']:.1%} fewer)"


def render_partial_width(data: dict[str, Any], path: Path) -> list[str]:
    machine = data.get("machine") or {}
    source = (
        f"Source: `{_rel(path)}`, written by `{data.get('script', '?')}` on CPU "
        f"({machine.get('threads')} threads, torch {machine.get('torch')}); perplexity change against "
        "native ± paired bootstrap SE over windows (the `dmr bench` windows: first 16,384 tokens, 512 per "
        "window); in brackets, the routed-FLOP reduction measured on that text."
    )
    lines = [f"## {TITLE}", "", f"{source} {INTRO}", ""]
    for m in data["models"]:
        minutes = m.get("seconds", 0.0) / 60
        lines += [
            f"### {m['model']} (native k = {m['native_k']}, I = {m['intermediate']})",
            "",
            f"Order fitted on {m['train_tokens']:,} Gutenberg train tokens; full width reproduces native "
            f"(max |dNLL| {m['full_width_max_abs_dnll']:.1e} on valid); {minutes:.1f} min.",
            "",
        ]
        targets = sorted({p["target"] for p in m["points"]})
        for corpus, name in CORPORA.items():
            lines += [
                f"{name}:",
                "",
                "| budget: fewer routed FLOPs | " + " | ".join(KINDS.values()) + " |",
                "|---|" + "---:|" * len(KINDS),
            ]
            for t in targets:
                by_kind = {p["kind"]: p for p in m["points"] if p["target"] == t}
                cells = []
                for kind in KINDS:
                    p = by_kind.get(kind)
                    if p is None:
                        cells.append("-")
                        continue
                    how = f"{p['how'].removeprefix('per-slot widths ')}: " if kind == "uniform" else ""
                    cells.append(how + _cell(p, corpus))
                lines.append(f"| {t:.0%} | " + " | ".join(cells) + " |")
            lines.append("")
        found = []
        for t in targets:
            points = [p for p in m["points"] if p["target"] == t]
            best = min(points, key=lambda p: p["gutenberg_test"]["change"])
            g = best["gutenberg_test"]
            side = "within" if g["change"] <= PPL_LIMIT else "above"
            found.append(
                f"at {t:.0%} the best is {KINDS[best['kind']]} ({g['change']:+.2%}, {side} the "
                f"{PPL_LIMIT:+.0%} limit)"
            )
        lines += [f"Findings (Gutenberg test): {'; '.join(found)}.", ""]
    return lines
