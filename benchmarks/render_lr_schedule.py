"""Markdown section for ``lr_schedule_probe.json`` (``lr_schedule_probe.py``: issue 10, does a
learning-rate schedule let the default allocator training do what 4x the work does?).

Used by ``gen_benchmarks_md.py``; every number comes from the result file. A tuning probe on the
valid split with no target of its own: the findings line names the best row and compares it with the
first (the library's default), and states no met/missed verdict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from render_gpu import _rel

TITLE = "Learning-rate schedule of the allocator training (issue 10 probe, valid split)"


def render_lr_schedule(data: dict[str, Any], path: Path) -> list[str]:
    rows = data["rows"]
    machine = data.get("machine") or {}
    cmds = "; ".join(f"`{c}`" for c in data.get("commands") or [data.get("command", "?")])
    w = data["windows"]
    varying = sorted(k for k in rows[0]["config"] if len({json.dumps(r["config"].get(k)) for r in rows}) > 1)
    lines = [
        f"## {TITLE}",
        "",
        f"Source: `{_rel(path)}` ({cmds}; CPU {machine.get('cpu', '?')}, {machine.get('threads')} threads, "
        f"torch {data['versions']['torch']}). {data['model']}: the learned allocator of `dmr calibrate "
        f"--family learned` ({w['train']} train windows, {w['budget']} valid budget windows, quantile budget "
        f"for {data['target']:.0%} fewer routed FLOPs), scored on {w['scored']} other valid windows"
        + (f" of {data['context']} tokens" if "context" in data else "")
        + (f", starting {data['held_skip']} tokens into their documents" if "held_skip" in data else "")
        + ": perplexity change against native ± paired bootstrap SE over windows (one training per row; "
        "the SE is against native, not between rows), and the routed-FLOP reduction reached there. *lr* is "
        "the heads' rate; the schedule also moves the compensation means' rate; *linear* falls to 1/steps of "
        "the rate at the last step, *cosine* to almost 0. The rows' training configs differ only in: "
        f"{', '.join(varying) or 'nothing'}." + (f" Note: {data['note']}" if data.get("note") else ""),
        "",
        "| schedule | lr | steps x windows | train s | final KL | perplexity change | reduction |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["config"]
        lines.append(
            f"| {c['lr_schedule']} | {c['lr']:g} | {c['steps']} x {c['batch_windows']} "
            f"| {r['train_seconds']:.0f} | {r['final_kl']:.4f} "
            f"| {r['ppl_change']:+.2%} ± {100 * r['ppl_change_se']:.2f} "
            f"| {r['reduction']:.1%} |"
        )
    if len(rows) > 1:
        base, best = rows[0], min(rows, key=lambda r: r["ppl_change"])
        name = f"{best['config']['lr_schedule']} at lr {best['config']['lr']:g}"
        if best is base:
            finding = f"none of the other rows beats the first ({name}, {base['ppl_change']:+.2%})"
        else:
            finding = (
                f"the lowest is {name} ({best['ppl_change']:+.2%}, against {base['ppl_change']:+.2%} for "
                f"{base['config']['lr_schedule']} at lr {base['config']['lr']:g})"
            )
        lines += ["", f"Finding (valid split, tuning only): {finding}."]
    return [*lines, ""]
