"""Markdown sections for the expert-parallel result files (issues 12 and 16):
``gpu_ep_local.json`` (one rank's local work on one GPU, ``bench_gpu_ep_local.py``) and
``ep_2gpu.json`` (two GPUs under torchrun, ``bench_ep.py``).

Used by ``gen_benchmarks_md.py``; every number comes from the result file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from render_gpu import _mark, _ms, _rel

STATIC_LIMIT = 1.03  # patched static / transformers' expert-parallel layer (issue 16's limit)
BYTES_CUT = 0.25  # all_to_all dynamic: bytes exchanged at least 25% below static
PREFILL_LIMIT = 0.85  # all_to_all dynamic prefill of 16384 tokens / patched static


def render_gpu_ep_local(data: dict[str, Any], path: Path) -> list[str]:
    m = data["machine"]
    cells = data["cells"]
    ranks = cells[0]["ranks"] if cells else 2
    out = [
        "## GPU: one expert-parallel rank's local work (no collectives)",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {m['gpu']}, torch {m['torch']}, transformers "
        f"{m.get('transformers', '?')}). The experts of each layer are split over {ranks} ranks; this is "
        "rank 0's computation on the batch every rank holds, median ms (`triton.testing.do_bench`). "
        "*transformers*: its expert-parallel layer at inference (`AllReduceEP`: the rank's experts module, "
        "default `grouped_mm`, on every token with off-rank routes masked); *all_reduce*: this project's "
        "`all_reduce` dispatch (kept pairs of the rank's experts only); *all_to_all*: the kept-pairs "
        "dispatcher's local stages (pack: sort, count and gather the slice's kept pairs; experts: the "
        "rows the rank receives; unpack: weighted sum per token). *pairs*: kept pairs / native pairs of "
        "the whole batch. The collectives are not timed here (one GPU); `bench_ep.py` times them on two.",
        "",
    ]
    for shape in dict.fromkeys(c["shape"] for c in cells):
        out += [
            f"### {shape} ({cells[0]['ranks']} ranks)",
            "",
            "| tokens | routing | pairs | transformers ms | all_reduce ms (ratio) | all_to_all ms (ratio) "
            "| pack / experts / unpack ms |",
            "|---:|---|---:|---:|---:|---:|---|",
        ]
        for c in (c for c in cells if c["shape"] == shape):
            a = c["all_to_all"]
            out.append(
                f"| {c['tokens']} | {c['routing']} | {c['pair_ratio']:.3f} | {_ms(c['hf_ms'])} | "
                f"{_ms(c['all_reduce_ms'])} ({c['all_reduce_vs_hf']:.2f}) | {_ms(a['total_ms'])} "
                f"({c['all_to_all_vs_hf']:.2f}) | {_ms(a['pack_ms'])} / {_ms(a['experts_ms'])} / "
                f"{_ms(a['unpack_ms'])} |"
            )
        out.append("")
    out += ["### Targets", ""]
    for c in cells:
        if c["routing"] != "static":
            continue
        ok = c["all_reduce_vs_hf"] <= STATIC_LIMIT
        out.append(
            f"- Local static layer vs transformers' expert-parallel layer, {c['shape']}, "
            f"{c['tokens']} tokens: "
            f"{c['all_reduce_vs_hf']:.2f} (limit {STATIC_LIMIT}, the two-GPU issue's limit applied to the "
            f"local work): {_mark(ok)}."
        )
    out.append("")
    return out


def render_ep(data: dict[str, Any], path: Path) -> list[str]:
    m = data["machine"]
    cells = data["cells"]
    where = f"{m['ranks']} × {m['device']}" if m["device"] != "cpu" else f"{m['ranks']} CPU processes (gloo)"
    out = [
        f"## Expert parallelism on {where}",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; torch {m['torch']}, transformers {m['transformers']}). "
        "Median ms of the slowest rank (decode: per step); *bytes*: what each rank sent in the MoE layers' "
        "collectives per forward (mean over ranks); *imbalance*: max / mean executed pairs per rank.",
        "",
        "| shape | workload | variant | ms | vs unpatched | bytes sent | pairs | imbalance |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]

    def key(c: dict[str, Any]) -> tuple[Any, ...]:
        return (c["shape"], c["workload"], c.get("tokens"), c.get("batch"))

    base = {key(c): c for c in cells if c["variant"] == "unpatched"}
    for c in cells:
        where = f"{c['workload']} {c.get('tokens') or c.get('batch')}"
        sent = sum(c["bytes_sent_per_rank"]) / len(c["bytes_sent_per_rank"])
        pairs = c["executed_pairs"] / c["native_pairs"] if c.get("native_pairs") else 1.0
        imbalance = f"{c['load_imbalance']:.3f}" if "load_imbalance" in c else "n/a"
        out.append(
            f"| {c['shape']} | {where} | {c['variant']} | {_ms(c['ms'])} | "
            f"{c['ms'] / base[key(c)]['ms']:.3f} | {sent / 1e6:.2f} MB | {pairs:.3f} | {imbalance} |"
        )
    cpu = data["benchmark"] == "ep_cpu"
    out += ["", "### Targets", ""]
    if cpu:
        out += [
            "A CPU run with a tiny model checks the script and the bytes; its times say nothing about "
            "GPUs, so "
            "only the bytes target is checked here.",
            "",
        ]
    by = {(key(c), c["variant"]): c for c in cells}
    for k, un in base.items():
        static, a2s, a2d = (by.get((k, v)) for v in ("static", "a2a_static", "a2a_dynamic"))
        where = f"{k[0]}, {k[1]} {k[2] or k[3]}"
        if static and not cpu:
            r = static["ms"] / un["ms"]
            out.append(
                f"- Patched static vs unpatched, {where}: {r:.3f} (limit {STATIC_LIMIT}): "
                f"{_mark(r <= STATIC_LIMIT)}."
            )
        if a2s and a2d:
            cut = 1 - sum(a2d["pair_bytes_per_rank"]) / max(sum(a2s["pair_bytes_per_rank"]), 1)
            out.append(
                f"- all_to_all bytes cut, {where}: {cut:.1%} at "
                f"{1 - a2d['executed_pairs'] / a2d['native_pairs']:.0%} fewer pairs (at least "
                f"{BYTES_CUT:.0%}): {_mark(cut >= BYTES_CUT)}."
            )
        if static and a2d and k[1] == "prefill" and k[2] == 16384 and not cpu:
            r = a2d["ms"] / static["ms"]
            out.append(
                f"- all_to_all dynamic prefill vs patched static, {where}: {r:.3f} (limit {PREFILL_LIMIT}): "
                f"{_mark(r <= PREFILL_LIMIT)}."
            )
    out.append("")
    return out
