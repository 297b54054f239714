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


#: the widest bracket of TopP reductions an equal-FLOP comparison may interpolate across (files written
#: before tile_aware_eval.py recorded ``max_bracket`` are held to the same limit)
MAX_BRACKET = 0.06


def _pm(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['change']:+.2%} ± {100 * r['se']:.2f}"


def _width(between: str) -> float:
    lo, _, hi = between.partition("..")
    return float(hi) - float(lo) if hi else 0.0


def _equal(c: dict[str, Any], limit: float) -> dict[str, Any] | None:
    """The equal-FLOP comparison of a row, if its TopP bracket is narrow enough."""
    eq = c.get("vs_top_p_equal_flops")
    return eq if eq is not None and _width(eq["between"]) <= limit + 1e-9 else None


def _eq_cell(c: dict[str, Any], limit: float) -> str:
    eq = _equal(c, limit)
    return "-" if eq is None else f"{_pm(eq)} ({eq['between']})"


def render_tile_aware(data: dict[str, Any], path: Path) -> list[str]:
    machine = data.get("machine") or {}
    rows = data["rows"]
    limit = float(data.get("max_bracket", MAX_BRACKET))
    lines = [
        f"## {TITLE}",
        "",
        f"Source: `{_rel(path)}` (`{data.get('command', '?')}`; CPU {machine.get('cpu', '?')}, "
        f"{machine.get('threads')} threads, torch {data.get('torch', '?')}). Each forward routes "
        f"{data['batch_windows']} windows of 512 tokens at once (one routing call per MoE layer, as in "
        f"prefill). `TopP(p)` with `p` bisected on Gutenberg valid for each target; `TileAware(TopP(p), "
        f"rows={rows}, mode)` at the same `p`. *reduction*: routed-FLOP reduction on the corpus (pair "
        "counters); *vs native*, *vs TopP same p*, *vs TopP equal FLOPs*: perplexity change ± paired "
        "bootstrap SE over windows, the last against `TopP`'s points (native"
        + (
            " and the curve-only points"
            if data.get("curve") or any(m.get("curve") for m in data["models"])
            else ""
        )
        + " included) interpolated per window to this row's reduction between the two `TopP` reductions "
        f"in brackets, only where they are at most {limit:.2f} apart (a wider chord can overstate "
        "`TopP`'s perplexity where it bends upward); *tiles*: row tiles of "
        f"{rows} rows (sum over calls and experts of ceil(rows / {rows})) over `TopP`'s at the same `p` and "
        "over native top-k's.",
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
                    f"| {_eq_cell(c, limit)} "
                    f"| {'-' if over_top is None else f'{over_top:.3f}'} "
                    f"| {c['tile_ratio_native'][str(rows)]:.3f} |"
                )
        lines.append("")
        for corpus in native:
            for mode in ("round", "refill"):
                lines += _finding(model, corpus, mode, limit, rows)
        lines.append("")
    return lines


def _finding(model: dict[str, Any], corpus: str, mode: str, limit: float, tile: int) -> list[str]:
    """One line: ``mode`` against TopP at equal routed FLOPs on ``corpus``, over the comparable rows."""
    rows = [p["corpora"][corpus] for p in model["points"] if p["policy"] == mode]
    if not rows:
        return []
    head = f"- {model['model']}, {corpus}, `{mode}` against `TopP` at equal routed FLOPs"
    eq = [(c, _equal(c, limit)) for c in rows]
    eq = [(c, e) for c, e in eq if e is not None]
    if not eq:
        return [
            f"{head}: not compared (no `TopP` points within {limit:.2f} on both sides of its reductions)."
        ]
    changes = [e for _, e in eq]
    better = sum(e["change"] < -2 * e["se"] for e in changes)
    worse = sum(e["change"] > 2 * e["se"] for e in changes)
    tiles = [c["tile_ratio_top_p"][str(tile)] for c, _ in eq]
    low, high = min(e["change"] for e in changes), max(e["change"] for e in changes)
    fmt = lambda v: f"{v:+.2%}".replace("-0.00%", "+0.00%")  # noqa: E731
    span = fmt(low) if low == high else f"{fmt(low)} to {fmt(high)}"
    missing = len(rows) - len(eq)
    rest = (
        "" if not missing else f"; {missing} not compared: no `TopP` points within {limit:.2f} on both sides"
    )
    tile_span = f"{min(tiles):.3f}" if min(tiles) == max(tiles) else f"{min(tiles):.3f}-{max(tiles):.3f}"
    return [
        f"{head}: {span} over {len(eq)} of {len(rows)} targets ({better} lower by more than 2 SE, {worse} "
        f"higher by more than 2 SE{rest}), on {tile_span} of `TopP`'s row tiles."
    ]
