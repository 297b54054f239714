"""Markdown section for ``calibrate.json`` (``bench_calibrate.py``: how long ``dmr calibrate`` takes on
the reference models, issue 14 item 4). Used by ``gen_benchmarks_md.py``; every number comes from
the result file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from render_gpu import _mark, _rel

BUSY_CORES = 0.5  # other processes' CPU use (cores) above which a timing is marked unreliable


def _policy(run: dict[str, Any]) -> str:
    return f"{run['family'].replace('_', ' ')}{' per layer' if run['per_layer'] else ''}"


def _held(held: dict[str, Any] | None) -> str:
    if not held:
        return "-"
    before = held.get("before_relative_ppl_change")
    return f"{held['relative_ppl_change']:+.2%}" + (f" ({before:+.2%})" if before is not None else "")


def render_calibrate(data: dict[str, Any], path: Path) -> list[str]:
    m = data["machine"]
    limit = data["limit_s"]
    cpu = m.get("cpu_model") or m.get("processor") or m.get("machine")
    out = [
        "## CPU: calibration time of the router-score families",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {cpu}, {m['torch_threads']} torch threads, torch "
        f"{m['torch']}, transformers {m.get('transformers', '?')}). `dmr calibrate --no-learned` at its "
        "default settings (top-p, relative threshold and entropy-adaptive, 8,192 Gutenberg valid tokens, "
        "per-layer refinement), timed from the loaded model to the chosen policy. *passes*: the time in "
        "plain forward passes over the calibration windows, measured in the same run; *runs*: model "
        "runs made (a sensitivity probe that replays the native prefix counts as one). *valid change*: "
        "the chosen policy's perplexity change on the calibration windows; *held-out change*: the same "
        "on the valid windows that follow them (never seen by the calibration), with the previous "
        "release's chosen policy on the same windows in brackets. † = other processes kept more "
        f"than {BUSY_CORES} cores busy meanwhile (the time is not reliable).",
        "",
        "| model | target | seconds | passes | runs | chosen | reduction | valid change | held-out change |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    verdicts = []
    for model in data["models"]:
        name = Path(model["model"]).name
        for run in model["runs"]:
            busy = run.get("others_cores")
            mark = "†" if busy is not None and busy > BUSY_CORES else ""
            out.append(
                f"| {name} | {run['target']:.0%} | {run['seconds']:.1f}{mark} | {run['passes']:.1f} | "
                f"{run['model_runs']} | {_policy(run)} | {run['reduction']:.2%} | "
                f"{run['relative_ppl_change']:+.2%} | {_held(run.get('held_out'))} |"
            )
            verdicts.append(
                f"- Router-score calibration time, {name} @{run['target']:.0%}: {run['seconds']:.1f} s "
                f"(limit {limit:.0f} s){' (measured on a busy machine)' if mark else ''}: "
                f"{_mark(run['seconds'] <= limit)}."
            )
            held = run.get("held_out") or {}
            for before in data.get("before", []):
                if Path(before["model"]).name != name or abs(before["target"] - run["target"]) > 1e-9:
                    continue
                if "nll_diff_vs_before" not in held:
                    continue
                diff, se = held["nll_diff_vs_before"], held["nll_diff_se"]
                verdicts.append(
                    f"- Chosen policy no worse on held-out valid text than the previous release's, {name} "
                    f"@{run['target']:.0%}: {held['relative_ppl_change']:+.2%} against "
                    f"{held['before_relative_ppl_change']:+.2%} ({_policy(before)}), mean NLL difference "
                    f"{diff:+.4f} ± {se:.4f} paired SE (at most 2 SE worse): "
                    f"{_mark(diff <= 2 * se)}."
                )
    before = data.get("before", [])
    if before:
        out += [
            "",
            "The previous release (plain bisection, 8 steps per search, every probe a full pass), on the "
            "same windows: "
            + "; ".join(
                f"{Path(b['model']).name} @{b['target']:.0%}: {b['model_runs']} runs"
                + (f", {b['seconds']:.0f} s" if b.get("seconds") else "")
                + (f" ({b['note']})" if b.get("note") else "")
                for b in before
            )
            + ".",
        ]
    out += ["", "### Targets", "", *verdicts, ""]
    return out
