"""Markdown section for ``router_tuning.json`` (``router_tuning.py``: issue 10, item 4, does fine-tuning the
routers' gate weights together with the learned allocator move the frontier?).

Used by ``gen_benchmarks_md.py``; every number comes from the result file. The section is research with
no target of its own, so it writes no met/missed lines (the summary table does not count it); its
findings are computed from the file. The write-up is ``benchmarks/ROUTER_TUNING_NOTES.md``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from render_gpu import _rel

TITLE = "Router tuning (issue 10, item 4): evaluated, not kept"
CORPORA = {"gutenberg_test": "Gutenberg test", "wikitext2_test": "WikiText-2 test"}
Z = 2.0  # a paired difference is shown in bold beyond this many SE
_JOINT = re.compile(r"joint rlr=(?P<lr>[^ ]+)(?P<rest>.*)")


# -- formatting --------------------------------------------------------------------------------------
def _chg(x: float, se: float | None = None) -> str:
    """A relative perplexity change in percent, with its paired SE in points."""
    return f"{x:+.2%}" + ("" if se is None else f" ± {100 * se:.2f}")


def _pts(d: float, se: float, z: float | None = None) -> str:
    """A paired difference in points ± SE; bold beyond ``Z`` SE."""
    txt = f"{100 * d:+.2f} ± {100 * se:.2f}"
    z = d / se if z is None and se > 0 else z
    return f"**{txt}**" if z is not None and abs(z) >= Z else txt


def _span(xs: list[float], fmt: str = "{:+.2f}") -> str:
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)} to {fmt.format(hi)}"


def _label(tag: str) -> str:
    m = _JOINT.fullmatch(tag)
    if tag == "frozen":
        return "frozen router"
    if m is None:
        return tag
    rest = m["rest"].strip()
    if rest == "heads, original gates":
        return f"joint heads (gate lr {m['lr']}), original gates"
    if rest == "gates, native top-k":
        return f"joint gates (gate lr {m['lr']}), native top-k"
    return f"joint, gate lr {m['lr']}" + (f", {rest}" if rest else "")


def _is_joint(tag: str) -> bool:
    """A joint allocator itself (not one of its ablations)."""
    m = _JOINT.fullmatch(tag)
    return m is not None and not m["rest"].strip()


# -- lookups -----------------------------------------------------------------------------------------
def _index(model: dict[str, Any]) -> tuple[dict[Any, Any], dict[Any, Any], dict[Any, Any]]:
    learned = {(p["tag"], p["target"]): p for p in model["learned"]}
    eq = {(e["tag"], e["target"], e["corpus"]): e for e in model["equal_flops"]}
    pairs = {(p["tag"], p["target"], p["corpus"]): p for p in model["pairs"]}
    return learned, eq, pairs


def _main_target(data: dict[str, Any]) -> float:
    """The target the allocators were trained at (the other targets are offset refits)."""
    for m in data["models"]:
        for p in m["learned"]:
            if p["tag"] == "frozen" and "source" not in p:
                return float(p["target"])
    return float(data["merged_from"][0]["args"]["target"])


def _cells(
    point: dict[str, Any], eq: dict[Any, Any], pairs: dict[Any, Any], static_too: bool = True
) -> list[str]:
    out = []
    for c in CORPORA:
        res = point["results"][c]
        pr = pairs.get((point["tag"], point["target"], c))
        e = eq.get((point["tag"], point["target"], c)) if static_too else None
        out += [
            f"{res['reduction']:.1%}",
            _chg(res["ppl_change"], res["ppl_change_se"]),
            _pts(pr["ppl_ratio_change"], pr["se"], pr["z"]) if pr else "–",
            _pts(e["ppl_vs_static"], e["se"], e["z"]) if e else "–",
        ]
    return out


# -- the section -------------------------------------------------------------------------------------
def _source(data: dict[str, Any], path: Path) -> list[str]:
    runs = data["merged_from"]
    args = [r["args"] for r in runs]
    devices = ", ".join(dict.fromkeys(str(r["device"]) for r in runs))
    threads = ", ".join(dict.fromkeys(str(a["threads"]) for a in args))
    secs = [r["seconds"] for r in runs if r.get("seconds") is not None]
    files = " ".join(r["file"] for r in runs)
    same = {k: v for k, v in args[0].items() if all(a.get(k) == v for a in args)}
    partial = [r["file"] for r in runs if r.get("partial")]
    rows = []
    for r in runs:
        a = r["args"]
        uses_lr = {"joint", "static_tuned"} & set(a["parts"])
        lrs = " / ".join(f"{x:g}" for x in a["router_lr"]) if uses_lr else "–"
        tuned = (
            ", ".join(f"{t:.0%}" for t in a["static_tuned_targets"]) if "static_tuned" in a["parts"] else "–"
        )
        rows.append(
            f"| `{r['file']}` | {', '.join(Path(m).name for m in a['model'])} | {' '.join(a['parts'])} | "
            f"{lrs} | {'no' if a['no_static'] else 'yes'} | {tuned} | {r['seconds']:.0f} |"
        )
    first = data["models"][0]
    n_win = {c: len(first["native_nll_per_window"][c]) for c in CORPORA}
    return [
        f"Source: `{_rel(path)}`, written by `{data['script']}` (`python {data['script']} --merge {files} "
        f"--out {_rel(path)}`) from {len(runs)} runs on **{devices}** (`--device "
        f"{', '.join(dict.fromkeys(str(a['device']) for a in args))} --threads {threads}`), torch "
        f"{data['torch']}, dynamic-moe-router {data['dmr_version']}; each run took "
        f"{min(secs):.0f}–{max(secs):.0f} s"
        + (f"; partial checkpoints: {', '.join(partial)}" if partial else "")
        + ". Write-up: `benchmarks/ROUTER_TUNING_NOTES.md`.",
        "",
        "| run | model | parts | gate lr | static frontier | static k tuned at | seconds |",
        "|---|---|---|---:|---|---|---:|",
        *rows,
        "",
        f"Common settings: allocator target {same['target']:.0%} (offsets refit on valid to "
        f"{', '.join(f'{t:.0%}' for t in same['refit_targets'])}), {same['steps']} steps of "
        f"{same['batch_windows']} windows at head lr {same['lr']:g}, seed {same['seed']}, "
        f"{same['train_windows']} Gutenberg train windows, router-only tuning {same['router_steps']} steps; "
        f"test: the first {same['tokens']:,} tokens of Gutenberg test and WikiText-2 test. *joint*: the "
        "allocator's heads and every MoE layer's gate weight trained together (the teacher keeps the "
        "original gates); *frozen router*: the same training with the gates fixed (same seed, batches and "
        "noise), the paired baseline. Changes are vs native top-k in percent ± the paired bootstrap SE over "
        f"{' / '.join(str(n) for n in dict.fromkeys(n_win.values()))} windows, in points; *Δ paired*: the "
        "tuned point minus its original-gate counterpart on the same windows (joint − frozen; tuned − "
        "original gates), in points; *vs static*: against static top-k of the same compensation "
        "interpolated to the same routed FLOPs, in points; **bold**: beyond "
        f"{Z:.0f} SE. All joint and frozen points use compensation; TopP does not.",
        "",
    ]


def _joint_table(model: dict[str, Any], main: float) -> list[str]:
    _, eq, pairs = _index(model)
    head = " | ".join(f"{n} reduction | {n} change | Δ paired | vs static" for n in CORPORA.values())
    out = [
        f"| target | allocator | {head} |",
        "|---:|---|" + "---:|---:|---:|---:|" * len(CORPORA),
    ]
    comp = [p for p in model["learned"] if p["comp"] and (p["tag"] == "frozen" or _is_joint(p["tag"]))]
    targets = sorted({p["target"] for p in comp}, key=lambda t: (t != main, t))
    for t in targets:
        for p in (p for p in comp if p["target"] == t):
            out.append("| " + " | ".join([f"{t:.0%}", _label(p["tag"]), *_cells(p, eq, pairs)]) + " |")
    ablations = [p for p in model["learned"] if _JOINT.fullmatch(p["tag"]) and not _is_joint(p["tag"])]
    ablations.sort(key=lambda p: p["target"] == 0)  # heads with the original gates first, then native k
    for p in ablations:
        t = "native" if p["target"] == 0 else f"{p['target']:.0%}"
        out.append("| " + " | ".join([t, _label(p["tag"]), *_cells(p, eq, pairs)]) + " |")
    return out


def _router_only_table(model: dict[str, Any]) -> list[str]:
    _, eq, pairs = _index(model)
    head = " | ".join(f"{n} reduction | {n} change | Δ paired | vs static" for n in CORPORA.values())
    out = [f"| policy | gates | {head} |", "|---|---|" + "---:|---:|---:|---:|" * len(CORPORA)]
    for p in (p for p in model["learned"] if p["tag"].startswith("topp")):
        gates = "original" if p["router"] == "original" else p["tag"].removeprefix("topp, gates of ")
        gates = _label(gates) if gates != "original" else gates
        out.append("| " + " | ".join([f"TopP (p={p['p']:.3f})", gates, *_cells(p, eq, pairs)]) + " |")
    statics = {tuple(s["ks"]): s for s in model["static"] if s["comp"]}
    for p in (p for p in model["learned"] if p["tag"].startswith("static") and p.get("ks")):
        rec = model["training"].get(p["tag"], {})
        base = statics.get(tuple(p["ks"]))
        name = f"k = {p['ks']}, compensation"
        if base is not None:
            cells = []
            for c in CORPORA:
                res = base["results"][c]
                cells += [f"{res['reduction']:.1%}", _chg(res["ppl_change"], res["ppl_change_se"]), "–", "–"]
            out.append("| " + " | ".join([name, "original", *cells]) + " |")
        how = f"tuned for this k (lr {rec['router_lr']:g}, {rec['steps']} steps)" if rec else "tuned"
        out.append("| " + " | ".join([name, how, *_cells(p, eq, pairs, static_too=False)]) + " |")
    return out


def _beyond(rows: list[dict[str, Any]]) -> str:
    """How many of the paired differences lie beyond ``Z`` SE, by sign."""
    worse = sum(p["ppl_ratio_change"] > 0 and abs(p["z"]) >= Z for p in rows)
    better = sum(p["ppl_ratio_change"] < 0 and abs(p["z"]) >= Z for p in rows)
    bits = [f"{n} of {len(rows)} {what}" for n, what in ((better, "better"), (worse, "worse")) if n]
    return f"beyond {Z:.0f} SE: {' and '.join(bits) if bits else f'none of {len(rows)}'}"


def _findings(data: dict[str, Any], main: float) -> list[str]:
    g, w = "gutenberg_test", "wikitext2_test"
    at_main: list[str] = []
    top: list[str] = []
    wiki: list[str] = []
    router_only: dict[str, list[str]] = {}
    wiki_rows: list[dict[str, Any]] = []
    for m in data["models"]:
        name = m["model"]
        learned, eq, _ = _index(m)
        joint = [p for p in m["pairs"] if _is_joint(p["tag"]) and p["against"] == "frozen"]
        # (1) the training target, Gutenberg test: joint - frozen, and the best joint point
        jm = [p for p in joint if p["target"] == main and p["corpus"] == g]
        if jm:
            best = min((learned[(p["tag"], main)] for p in jm), key=lambda q: q["results"][g]["ppl_change"])
            fr = learned[("frozen", main)]["results"][g]
            at_main.append(
                f"{name} {_span([100 * p['ppl_ratio_change'] for p in jm])} points ({_beyond(jm)}); the "
                f"best ({_label(best['tag'])}) gives {best['results'][g]['reduction']:.1%} fewer routed "
                f"FLOPs at {_chg(best['results'][g]['ppl_change'])} against the frozen router's "
                f"{fr['reduction']:.1%} at {_chg(fr['ppl_change'])}"
            )
        # (2) the largest refit target against the training target, best gate lr of each
        hi = max((p["target"] for p in joint), default=main)
        if jm and hi != main:
            bh = min(
                (p for p in joint if p["target"] == hi and p["corpus"] == g),
                key=lambda p: p["ppl_ratio_change"],
            )
            bm = min(jm, key=lambda p: p["ppl_ratio_change"])
            fr = learned[("frozen", hi)]["results"][g]["ppl_change"]
            to = learned[(bh["tag"], hi)]["results"][g]["ppl_change"]
            top.append(
                f"{name} {_pts(bh['ppl_ratio_change'], bh['se'], bh['z'])} at {hi:.0%} "
                f"({_chg(fr)} → {_chg(to)}, {_label(bh['tag'])}) against "
                f"{_pts(bm['ppl_ratio_change'], bm['se'], bm['z'])} at {main:.0%}"
            )
        # (3) WikiText-2: every joint point against frozen, and against static at the training target
        wiki_rows += [p for p in joint if p["corpus"] == w]
        fe = eq.get(("frozen", main, w))
        je = [e for (tag, t, c), e in eq.items() if t == main and c == w and _is_joint(tag)]
        if fe and je:
            wiki.append(
                f"{name} {_pts(fe['ppl_vs_static'], fe['se'], fe['z'])} → "
                + " / ".join(_pts(e["ppl_vs_static"], e["se"], e["z"]) for e in je)
            )
        # (4) router-only policies with tuned gates against the same policy with the original gates
        for what, rows in (
            ("topp", [p for p in m["pairs"] if p["against"] == "topp"]),
            ("static", [p for p in m["pairs"] if p["tag"].startswith("static")]),
        ):
            per = []
            for c, cname in CORPORA.items():
                ds = [p for p in rows if p["corpus"] == c]
                if ds:
                    per.append(f"{cname} {_span([100 * p['ppl_ratio_change'] for p in ds])} ({_beyond(ds)})")
            if per:
                router_only.setdefault(what, []).append(f"{name} {', '.join(per)}")
    out = []
    if at_main:
        out.append(
            f"- At the {main:.0%} training target, joint − frozen on Gutenberg test over the gate lrs is "
            + "; ".join(at_main)
            + "."
        )
    if top:
        out.append(
            "- At the largest refit target, joint − frozen on Gutenberg test (best gate lr, paired) is "
            + "; ".join(top)
            + "."
        )
    if wiki_rows:
        out.append(
            f"- On WikiText-2 test, joint − frozen over every target and gate lr is "
            f"{_span([100 * p['ppl_ratio_change'] for p in wiki_rows])} points ({_beyond(wiki_rows)}); "
            f"against static top-k at equal FLOPs at {main:.0%} (frozen → joint, per gate lr): "
            + "; ".join(wiki)
            + "."
        )
    if router_only:
        out.append(
            "- Router-only use of the tuned gates (tuned − original gates, points). TopP with the gates "
            "of the joint runs: "
            + "; ".join(router_only.get("topp", ["not run"]))
            + ". Static per-layer k with gates tuned for it alone: "
            + "; ".join(router_only.get("static", ["not run"]))
            + "."
        )
    return out


def render_router_tuning(data: dict[str, Any], path: Path) -> list[str]:
    main = _main_target(data)
    lines = [f"## {TITLE}", "", *_source(data, path)]
    for m in data["models"]:
        native = m["native_ppl"]
        drift = [
            f"{min(r['gate_relative_change']):.2f}–{max(r['gate_relative_change']):.2f} ({_label(tag)})"
            for tag, r in m["training"].items()
            if "gate_relative_change" in r
        ]
        exact = m.get("restored_bit_exact") or []
        exact = exact if isinstance(exact, list) else [exact]
        ok = sum(bool(r.get("router_objects_are_original") and r.get("all_parameters_equal")) for r in exact)
        checked = ", ".join(dict.fromkeys(str(r.get("parameters_checked")) for r in exact))
        lines += [
            f"### {m['model']} (top-{m['native_k']} of {m['num_experts']}, {m['moe_layers']} MoE layers)",
            "",
            "Native perplexity "
            + ", ".join(f"{native[c]:.2f} on {n}" for c, n in CORPORA.items())
            + f". Gate weights moved ‖ΔW‖/‖W‖ = {'; '.join(drift) or 'n/a'} per layer. The model's "
            f"parameters were restored bit-exactly at the end of {ok} of {len(exact)} runs "
            f"({checked} parameters checked).",
            "",
            f"**(a) Joint router tuning against the frozen router** (*Δ paired*: joint − frozen at the same "
            f"target; the {main:.0%} rows are the trained allocators, the others offset refits; the "
            "ablations pair against the frozen router at its target):",
            "",
            *_joint_table(m, main),
            "",
            "**(b) Router-only: TopP and static per-layer k with tuned gates** (*Δ paired*: against the "
            "original gates, same policy; for static k that is at exactly equal FLOPs; TopP's *vs static* "
            "is against the frontier without compensation):",
            "",
            *_router_only_table(m),
            "",
        ]
    lines += ["### Findings", "", *_findings(data, main), ""]
    return lines
