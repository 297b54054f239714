"""Markdown sections for the decode result files (issue 11): ``batch_aware.json`` (quality of
``BatchAware`` in batched decoding, CPU), ``gpu_batch_aware.json`` (its GPU layer time) and
``gpu_decode.json`` (``generate()`` end to end on a GPU, eager and compiled) and ``gpu_routing.json``
(the routing's eager cost per layer).

Used by ``gen_benchmarks_md.py``; every number comes from the result file, and each target of the
issue that a file can check is reported met or missed, cell by cell.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from render_gpu import _mark, _ms, _rel

BATCH_AWARE_LAYER = 0.85  # layer time / static at 64-256 tokens
BATCH_AWARE_TOKENS = (64, 128, 256)
COMPILED_SLACK = 1.15  # compiled dynamic step <= 1.15 x pair ratio x static step, batch 1
#: compiled decode: the patched model with every slot kept no slower than the unpatched one (as the
#: layer benchmark's "every slot kept" target, 1.03)
PATCHED_SLACK = 1.03
#: variant suffixes of bench_gpu_decode.py and how a target line names their patch options
EAGER_OPTIONS = {
    "": "",
    "+graphs": " with `cuda_graphs=True`",
    "+fused": " with `fused_routing=True`",
    "+fused+graphs": " with `fused_routing=True` and `cuda_graphs=True`",
}


def render_batch_aware(data: dict[str, Any], path: Path) -> list[str]:
    out = [
        "## Batch-aware routing: quality in batched decoding (reference models, CPU)",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {data['machine']['cpu']}, "
        f"{data['machine']['threads']} threads, torch {data['torch']}). Each batch decodes its sequences "
        f"together, teacher-forced: a {data['prompt']}-token prompt of Gutenberg test text, then "
        f"{data['steps']} steps, each routing one token of every sequence in one MoE call. *ppl ratio*: "
        "decode perplexity against the native top-k on the same batch (± bootstrap standard error over "
        "sequences); *pairs*: routed (token, expert) pairs saved in the decode steps; *distinct*: experts "
        "one decode step touches per layer (what a bandwidth-bound GPU layer pays for). The policy also "
        "routes the prompts, as it would in use.",
        "",
    ]
    for model in data["models"]:
        out += [f"### {model['model']} (top-{model['native_k']} of {model['num_experts']} experts)", ""]
        out += batch_aware_table(model["rows"])
        out.append("")
    return out


def batch_aware_table(rows: list[dict[str, Any]]) -> list[str]:
    """The table of batched-decoding rows (``batch_aware_eval.py``, or ``dmr bench``'s
    ``batched_decoding``)."""
    out = [
        "| batch | policy | ppl ratio | pairs saved | distinct experts per step |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['batch']} | `{r['spec']}` | {r['ppl_ratio']:.4f} ± {r['ppl_ratio_se']:.4f} | "
            f"{r['pair_reduction']:.1%} | {r['distinct_experts_per_call']:.1f} "
            f"({r['distinct_fraction']:.0%}) |"
        )
    return out


def render_gpu_batch_aware(data: dict[str, Any], path: Path) -> list[str]:
    m = data["machine"]
    out = [
        "## GPU: batch-aware routing, one experts layer at decode-batch sizes",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {m['gpu']}, torch {m['torch']}). Layer and routing "
        "times by CUDA-graph replay (median); *layer ratio* = the policy's layer time / static top-k's; "
        "*routing* = softmax + `dmr.route` (native: softmax + top-k).",
        "",
    ]
    cells = data["cells"]
    for shape in dict.fromkeys(c["shape"] for c in cells):
        out += [
            f"### {shape}",
            "",
            "| tokens | policy | pair ratio | distinct experts | layer ms | layer ratio "
            "| routing ms (native) |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for c in (c for c in cells if c["shape"] == shape):
            out.append(
                f"| {c['tokens']} | `{c['spec']}` | {c['pair_ratio']:.3f} | {c['distinct_experts']} | "
                f"{_ms(c['layer_ms'])} | {c['layer_ratio']:.3f} | {_ms(c['route_ms'])} "
                f"({_ms(c['native_route_ms'])}) |"
            )
        out.append("")
    out += ["### Targets", ""]
    quality = _batch_aware_quality(path.parent / "batch_aware.json")
    for shape in dict.fromkeys(c["shape"] for c in cells):
        for tokens in BATCH_AWARE_TOKENS:
            here = [c for c in cells if c["shape"] == shape and c["tokens"] == tokens]
            reroute = [c for c in here if c["policy"].startswith("batch_aware_reroute_")]
            trim = [c for c in here if c["policy"].startswith("batch_aware_") and c not in reroute]
            if trim:
                out.append(_trim_line(shape, tokens, trim))
            if reroute:
                out += _reroute_line(shape, tokens, reroute, quality).split("\n")
    out.append("")
    return out


#: the reference model whose batched-decoding quality stands for a GPU shape (same family and k/E kind)
_SHAPE_MODEL = {"mixtral-8x7b": "ref-mixtral", "olmoe-1b-7b": "ref-olmoe"}


def _batch_aware_quality(path: Path) -> dict[str, Any]:
    """``batch_aware.json``'s rows by reference model, or nothing where the file is absent."""
    import json

    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {m["model"]: m for m in data["models"]}


def _trim_line(shape: str, tokens: int, aware: list[dict[str, Any]]) -> str:
    best = min(aware, key=lambda c: c["layer_ratio"])
    ok = best["layer_ratio"] <= BATCH_AWARE_LAYER
    why = ""
    if all(c["pair_ratio"] >= 1.0 for c in aware):  # nothing dropped at any setting
        why = (
            f"; no slot was dropped at any `experts` setting (pair ratio 1.000, "
            f"{best['distinct_experts']} experts touched): the experts holding some token's "
            "protected first slot (`min_keep`) stay in the batch's active set, and here they and "
            "the few of largest mass cover every expert the batch touches"
        )
    return (
        f"- Batch-aware layer time, {shape}, {tokens} tokens: best {best['layer_ratio']:.3f} of "
        f"static with `{best['spec']}` (limit {BATCH_AWARE_LAYER}): {_mark(ok)}{why}."
    )


def _reroute_line(shape: str, tokens: int, aware: list[dict[str, Any]], quality: dict[str, Any]) -> str:
    """Each ``reroute=True`` setting's layer ratio with its quality cost in batched decoding on the
    reference model of the same family, at the nearest measured batch."""
    model = quality.get(_SHAPE_MODEL.get(shape, ""))
    parts, costs = [], {}
    for c in sorted(aware, key=lambda c: c["layer_ratio"]):
        cost = "quality not measured"
        if model is not None:
            rows = [r for r in model["rows"] if r["policy"] == c["policy"]]
            if rows:
                r = min(rows, key=lambda r: (abs(r["batch"] - tokens), r["batch"]))
                costs[c["policy"]] = r["ppl_ratio"]
                cost = (
                    f"decode perplexity x{r['ppl_ratio']:.3f} ± {r['ppl_ratio_se']:.3f} on {model['model']} "
                    f"(top-{model['native_k']} of {model['num_experts']}) at batch {r['batch']}"
                )
                only = [
                    d
                    for d in model["rows"]
                    if d["policy"] == c["policy"] + "_decode" and d["batch"] == r["batch"]
                ]
                if only:  # the cap on the decode steps only, prompts routed natively
                    costs[c["policy"]] = min(r["ppl_ratio"], only[0]["ppl_ratio"])
                    cost += (
                        f", x{only[0]['ppl_ratio']:.3f} ± {only[0]['ppl_ratio_se']:.3f} with native prompts"
                    )
        parts.append(
            f"{c['layer_ratio']:.3f} with `{c['spec']}` ({c['distinct_experts']} experts, "
            f"pair ratio {c['pair_ratio']:.3f}; {_mark(c['layer_ratio'] <= BATCH_AWARE_LAYER)}; {cost})"
        )
    context = ""
    usable: list[dict[str, Any]] | None = None
    static_spec = model_name = ""
    if model is not None:
        static = [r for r in model["rows"] if r["policy"].startswith("static_k")]
        if static:
            r = min(static, key=lambda r: (abs(r["batch"] - tokens), r["batch"]))
            native = next(
                (n for n in model["rows"] if n["batch"] == r["batch"] and n["policy"] == "native"), None
            )
            touched = (
                ""
                if native is None
                else (
                    f", {r['distinct_experts_per_call']:.1f} experts per step against native's "
                    f"{native['distinct_experts_per_call']:.1f}"
                )
            )
            context = (
                f" For scale: `{r['spec']}` costs x{r['ppl_ratio']:.3f} there (batch {r['batch']}) for "
                f"{r['pair_reduction']:.0%} fewer pairs{touched}."
            )
            fast = [c for c in aware if c["layer_ratio"] <= BATCH_AWARE_LAYER]
            usable = [c for c in fast if costs.get(c["policy"], math.inf) <= r["ppl_ratio"]]
            static_spec, model_name = r["spec"], model["model"]
            context += (
                f" Within the layer limit at no more perplexity than `{r['spec']}` (either prompt routing): "
                + (", ".join(f"`{c['spec']}`" for c in usable) if usable else "none")
                + "."
            )
    head = f"- Batch-aware layer time with rerouting, {shape}, {tokens} tokens: "
    line = head + "; ".join(parts) + "." + context
    if usable is None:
        return line
    # one summary check per cell: is any setting both fast enough and no worse than static k - 1?
    return (
        f"{line}\n- Batch-aware rerouting usable, {shape}, {tokens} tokens: {len(usable)} of {len(aware)} "
        f"settings within the layer limit at no more decode perplexity than `{static_spec}` on "
        f"{model_name}: {_mark(bool(usable))}."
    )


def _cell_key(c: dict[str, Any]) -> tuple[Any, ...]:
    return (c.get("shape"), c.get("mode"), c.get("prompt"), c.get("batch"))


def render_gpu_decode(data: dict[str, Any], path: Path) -> list[str]:
    m = data["machine"]
    cells = [c for c in data["cells"] if c.get("mode") in ("eager", "compiled") or "error" in c]
    out = [
        "## GPU: generate() end to end, eager and compiled static cache",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {m['gpu']}, torch {m['torch']}, transformers "
        f"{m['transformers']}). Random-weight bf16 models of real layer width; *compiled* = "
        '`generate(..., cache_implementation="static")`, which compiles the forward with '
        '`torch.compile(mode="reduce-overhead")`. *step* = median decode step (GPU synchronised), '
        "*tok/s* = batch / step; *agreement* = greedy tokens equal to the unpatched model's (bf16 kernels "
        "that sum in another order may flip near-ties of random weights); *dynamic* = `TopP` bisected for "
        "about 30% fewer routed pairs on the prompt; *+graphs*: patched with `cuda_graphs=True` (eager "
        "mode only); *+fused*: patched with `fused_routing=True` (one Triton kernel per layer's routing).",
        "",
    ]
    interleaved = {c.get("mode") for c in data["cells"] if "interleaved_rounds" in c}
    if "eager" in interleaved:
        out[-1:-1] = [
            "",
            "Interleaved run: every variant of a shape in one process on one model, alternating in rounds "
            "(patch, generate, unpatch), so that the host's speed, which drifts on a shared machine, "
            "biases no variant; the first round only warms up (graph capture, Triton compilation).",
        ]
    if "compiled" in interleaved:
        out[-1:-1] = [
            "",
            "Interleaved run: every variant of a shape in one process, alternating in rounds, so that the "
            "host's speed, which drifts between processes, biases no variant; each variant has its own "
            "model object (all sharing one set of weight tensors, patched once) and so its own compiled "
            "graphs; the first round only warms up (compilation, CUDA-graph capture).",
        ]
    gpu_time = any("gpu_step_ms" in c for c in cells)
    if gpu_time:
        out[-1:-1] = [
            "",
            "*GPU ms*: the GPU's summed kernel time per decode step, from the profiler (the difference "
            "between a `generate()` of 8 + N tokens and one of 8, over N); *step ms* minus *GPU ms* is "
            "the time the GPU waits each step: `generate()`'s own host work between steps (it "
            "synchronises once per step to check for finished sequences), and launches in eager mode.",
        ]
    for shape in dict.fromkeys(c["shape"] for c in data["cells"]):
        layers = next((c["layers"] for c in data["cells"] if c["shape"] == shape and "layers" in c), "?")
        gpu_head, gpu_rule = (" GPU ms |", "---:|") if gpu_time else ("", "")
        blank = " |" if gpu_time else ""
        out += [
            f"### {shape} shape, {layers} layers",
            "",
            f"| mode | prompt | batch | variant | prefill ms | step ms |{gpu_head} tok/s | agreement "
            "| graphs | error |",
            f"|---|---:|---:|---|---:|---:|{gpu_rule}---:|---:|---:|---|",
        ]
        for c in (c for c in cells if c["shape"] == shape):
            if "mode" not in c:
                out.append(f"| - | - | - | {c['variant']} | | |{blank} | | | {c['error'][:160]} |")
                continue
            agree = f"{c['token_agreement']:.2f}" if "token_agreement" in c else "-"
            err = c.get("error", "")[:160]
            if err:
                head = f"| {c['mode']} | {c['prompt']} | {c['batch']} | {c['variant']} |"
                out.append(f"{head} | |{blank} | | | {err} |")
                continue
            gpu = (f" {_ms(c['gpu_step_ms'])} |" if "gpu_step_ms" in c else " - |") if gpu_time else ""
            out.append(
                f"| {c['mode']} | {c['prompt']} | {c['batch']} | {c['variant']} | {_ms(c['prefill_ms'])} | "
                f"{_ms(c['step_ms'])} |{gpu} {c['decode_tok_s']:.0f} | {agree} | "
                f"{c.get('compiled_graphs', '-')} |  |"
            )
        out.append("")
    if data.get("note"):  # what a later check of this run found, recorded in the result file
        out += [f"Note: {data['note']}", ""]
    out += ["### Targets", "", *_decode_targets(cells), ""]
    return out


def _decode_targets(cells: list[dict[str, Any]]) -> list[str]:
    by = {(*_cell_key(c), c["variant"]): c for c in cells if "step_ms" in c}
    pair_ratio = {
        c["shape"]: 1 - c["routed_pair_reduction_on_prompt"]
        for c in cells
        if str(c.get("variant")).split("+")[0] == "dynamic" and "routed_pair_reduction_on_prompt" in c
    }
    out = []
    for shape, mode, prompt, batch in dict.fromkeys(_cell_key(c) for c in cells if "mode" in c):
        un = by.get((shape, mode, prompt, batch, "unpatched"))
        where = f"{shape}, {mode}, batch {batch}, prompt {prompt}"
        for suffix, label in EAGER_OPTIONS.items():  # dynamic against static with the same options
            dyn_o = by.get((shape, mode, prompt, batch, f"dynamic{suffix}"))
            st_o = by.get((shape, mode, prompt, batch, f"static{suffix}"))
            if mode == "eager" and batch in (1, 32) and dyn_o and un and st_o:
                tok = dyn_o["decode_tok_s"]
                ok = tok >= un["decode_tok_s"] and tok >= st_o["decode_tok_s"]
                out.append(
                    f"- Eager decode tokens/s{label}, {where}: dynamic{suffix} {tok:.0f} against unpatched "
                    f"{un['decode_tok_s']:.0f} and static{suffix} {st_o['decode_tok_s']:.0f} "
                    f"(at least both): {_mark(ok)}."
                )
        for suffix in ("", "+fused"):  # dynamic against static with the same options
            dyn_o = by.get((shape, mode, prompt, batch, f"dynamic{suffix}"))
            st_o = by.get((shape, mode, prompt, batch, f"static{suffix}"))
            ratio = 1 - dyn_o["routed_pair_reduction_on_prompt"] if dyn_o else pair_ratio.get(shape)
            if mode == "compiled" and batch == 1 and dyn_o and st_o and ratio is not None:
                lim = COMPILED_SLACK * ratio
                r = dyn_o["step_ms"] / st_o["step_ms"]
                out.append(
                    f"- Compiled decode step ratio{EAGER_OPTIONS[suffix]}, {where}: "
                    f"dynamic{suffix}/static{suffix} {r:.3f} for a pair ratio of {ratio:.3f} "
                    f"(limit {lim:.3f}): {_mark(r <= lim)}."
                )
                if "gpu_step_ms" in dyn_o and "gpu_step_ms" in st_o:
                    g = dyn_o["gpu_step_ms"] / st_o["gpu_step_ms"]
                    ours = ""
                    if dyn_o.get("dmr_kernels_step_ms") and st_o.get("dmr_kernels_step_ms"):
                        k = dyn_o["dmr_kernels_step_ms"] / st_o["dmr_kernels_step_ms"]
                        ours = (
                            f"; this project's kernels (experts, fused routing) alone {k:.3f}, "
                            f"{_ms(dyn_o['dmr_kernels_step_ms'])} / {_ms(st_o['dmr_kernels_step_ms'])} ms"
                        )
                    out.append(
                        f"- Compiled decode GPU time ratio{EAGER_OPTIONS[suffix]}, {where}: "
                        f"dynamic{suffix}/static{suffix} {g:.3f} ({_ms(dyn_o['gpu_step_ms'])} / "
                        f"{_ms(st_o['gpu_step_ms'])} ms of steps of {_ms(dyn_o['step_ms'])} / "
                        f"{_ms(st_o['step_ms'])} ms{ours}) for a pair ratio of {ratio:.3f}, against "
                        f"{lim:.3f} for the step ratio above (information: the step's kernels only; the "
                        f"step ratio is the issue's target)."
                    )
            if mode == "compiled" and batch == 1 and st_o and un and suffix == "":
                r = st_o["step_ms"] / un["step_ms"]
                out.append(
                    f"- Compiled decode step of patched static against unpatched, {where}: "
                    f"{_ms(st_o['step_ms'])} / {_ms(un['step_ms'])} ms = {r:.3f} (at most {PATCHED_SLACK}): "
                    f"{_mark(r <= PATCHED_SLACK)}."
                )
        key = (shape, mode, prompt, batch)
        for variant in dict.fromkeys(c["variant"] for c in cells if _cell_key(c) == key and "error" in c):
            if variant != "unpatched":
                out.append(f"- Runs without error, {where}, {variant}: it failed: **missed**.")
    return out


ROUTING_OVER_NATIVE = 1.5  # routing + policy <= 1.5 x native softmax + top-k, eager
ROUTING_SHARE_4096 = 0.03  # routing <= 3% of the layer at 4096 tokens
#: timed modes of bench_gpu_routing.py and their column names (a result may lack the fused ones)
ROUTING_MODES = {"patched": "patched", "graphs": "graphs", "fused": "fused", "fused_graphs": "fused + graphs"}


def render_gpu_routing(data: dict[str, Any], path: Path) -> list[str]:
    m = data["machine"]
    out = [
        "## GPU: routing cost per layer in eager mode",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {m['gpu']}, torch {m['torch']}, transformers "
        f"{m['transformers']}). One layer of real width, bf16; each router (and each whole MoE block) "
        "called back to back in eager mode, wall time per call with one synchronisation per loop (what a "
        "host-bound decode step pays). *native*: the unpatched router (linear, softmax, top-k); "
        "*patched*: `dmr.patch(..., validate=False)`, op by op; *graphs*: with `cuda_graphs=True` (a "
        "graph replay up to 256 tokens; above that the call runs as *patched*); *fused*: with "
        "`fused_routing=True` (the router's linear, then one Triton kernel for softmax, ranking, policy "
        "and weights), *fused + graphs*: both. *x native*: the routing's time over native; *share*: the "
        "routing's time over its patched block's time.",
        "",
    ]
    cells = data["cells"]
    modes = [m for m in ROUTING_MODES if f"static_{m}_us" in cells[0]]
    has_in_layer = "static_patched_in_layer_share" in cells[0]
    if has_in_layer:
        out[-2] += (
            " *in layer*: the block's time minus the time of its experts module alone on the same inputs, "
            "over the block's time: what the routing adds inside the layer, where its host work overlaps the "
            "GPU's work on the layer."
        )
    in_layer = ", in layer" if has_in_layer else ""
    for shape in dict.fromkeys(c["shape"] for c in cells):
        out += [
            f"### {shape} shape",
            "",
            "| tokens | native µs | policy | "
            + " | ".join(f"{ROUTING_MODES[m]} µs (x native, share{in_layer})" for m in modes)
            + " |",
            "|---:|---:|---|" + "---:|" * len(modes),
        ]
        for c in (c for c in cells if c["shape"] == shape):
            for p, label in (("static", "StaticTopK"), ("top_p", "TopP")):
                cols = [
                    f"{c[f'{p}_{mode}_us']:.0f} ({c[f'{p}_{mode}_over_native']:.2f}, "
                    f"{c[f'{p}_{mode}_share_of_block']:.1%}"
                    + (f", {c[f'{p}_{mode}_in_layer_share']:.1%}" if in_layer else "")
                    + ")"
                    for mode in modes
                ]
                out.append(f"| {c['tokens']} | {c['native_us']:.0f} | {label} | " + " | ".join(cols) + " |")
        out.append("")
    out += ["### Targets", ""]
    for c in cells:
        where = f"{c['shape']}, {c['tokens']} tokens"
        for p, label in (("static", "StaticTopK"), ("top_p", "TopP")):
            if "fused" in modes:  # the limit holds in eager mode: the fused kernel, no graphs
                r = c[f"{p}_fused_over_native"]
                others = ", ".join(f"{c[f'{p}_{m}_over_native']:.2f} {ROUTING_MODES[m]}" for m in modes)
                out.append(
                    f"- Routing cost over native in eager mode, {where}, {label}: {r:.2f} with "
                    f"`fused_routing=True` ({others}; limit {ROUTING_OVER_NATIVE}): "
                    f"{_mark(r <= ROUTING_OVER_NATIVE)}."
                )
            elif c["tokens"] <= 256 or c["tokens"] == 4096:  # graphs serve up to 256 tokens only
                r, g = c[f"{p}_patched_over_native"], c[f"{p}_graphs_over_native"]
                out.append(
                    f"- Routing cost over native, {where}, {label}: {r:.2f} patched, {g:.2f} with "
                    f"`cuda_graphs=True` (limit {ROUTING_OVER_NATIVE}): {_mark(g <= ROUTING_OVER_NATIVE)}."
                )
            if c["tokens"] == 4096:
                share = min(c[f"{p}_{m}_share_of_block"] for m in modes)
                if f"{p}_patched_in_layer_share" in c:  # the block minus its experts alone
                    # judged in one mode fixed in advance: the fused kernel (eager), else op by op
                    judged = "fused" if "fused" in modes else "patched"
                    inner = c[f"{p}_{judged}_in_layer_share"]
                    ok = _mark(inner <= ROUTING_SHARE_4096)
                    out.append(
                        f"- Routing share of the layer, {where}, {label}: {inner:.2%} inside the layer "
                        f"with {ROUTING_MODES[judged]} routing (the block's time minus its experts' time "
                        f"alone; {share:.1%} when the routing is called alone in a loop and its host time "
                        f"is not hidden; limit {ROUTING_SHARE_4096:.0%}): {ok}."
                    )
                    continue
                out.append(
                    f"- Routing share of the layer, {where}, {label}: {share:.1%} "
                    f"(limit {ROUTING_SHARE_4096:.0%}): {_mark(share <= ROUTING_SHARE_4096)}."
                )
    out.append("")
    return out


def render_diag_eager_host(data: dict[str, Any], path: Path) -> list[str]:
    """Where an eager decode step's host time goes (``benchmarks/diag_eager_host.py``)."""
    m = data["machine"]
    out = [
        "## GPU: eager decode step, host time split (diagnostic)",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {m['gpu']}, torch {data['versions']['torch']}, "
        f"transformers {data['versions']['transformers']}). Batch 1, one model forward per decode step "
        "after a 128-token prompt, KV cache, no `generate()` around it, GPU synchronised after each step; "
        "every variant in one process, interleaved in rounds (medians over rounds of the median step). "
        "*host in MoE*: time the host spends issuing the MoE blocks per step (forward hooks, no "
        "synchronisation inside the step), split into the router and the experts module; *GPU ms*, "
        "*launches* (CUDA and Triton kernel launches), *aten ops* and *host syncs* come from one profiled "
        "step. *dynamic* = `TopP` bisected for about 30% fewer routed pairs on the prompt; *+fused* = "
        "`fused_routing=True`; all patched variants `validate=False`.",
        "",
    ]
    checks = []
    for res in data["results"]:
        v = res["variants"]
        out += [
            f"### {res['shape']} shape, {res['layers']} layers",
            "",
            "| variant | step ms | tok/s | host in MoE ms | router ms | experts ms | GPU ms | launches "
            "| aten ops | host syncs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, d in v.items():
            p = d["profile"]
            syncs = ", ".join(f"{k} {n}" for k, n in p["syncs"].items()) or "-"
            out.append(
                f"| {name} | {d['step_ms']:.2f} | {1e3 / d['step_ms']:.1f} | {d['moe_host_ms']:.2f} "
                f"| {d['router_host_ms']:.2f} | {d['experts_host_ms']:.2f} | {p['gpu_ms']:.2f} "
                f"| {p['kernel_launches']} | {p['aten_ops']} | {syncs} |"
            )
        out.append("")
        for base in ("dynamic", "dynamic+fused"):
            static = "static" + base.removeprefix("dynamic")
            if not {base, static, "unpatched"} <= set(v):
                continue
            dyn, st, un = (1e3 / v[k]["step_ms"] for k in (base, static, "unpatched"))
            checks.append(
                f"- Eager decode forward tokens/s outside generate, {res['shape']}, `{base}`: "
                f"{dyn:.1f} against unpatched {un:.1f} and `{static}` {st:.1f} (at least both): "
                f"{_mark(dyn >= un and dyn >= st)}."
            )
    if checks:
        out += ["### Targets", "", *checks, ""]
    out += _diag_reading(data["results"])
    return out


def _diag_reading(results: list[dict[str, Any]]) -> list[str]:
    """What the host-time split says, from the numbers (per shape)."""
    lines = []
    for res in results:
        v = res["variants"]
        steps = [d["step_ms"] for d in v.values()]
        gpus = [d["profile"]["gpu_ms"] for d in v.values()]
        text = (
            f"- {res['shape']}: the GPU works {min(gpus):.2f}-{max(gpus):.2f} ms of "
            f"{min(steps):.2f}-{max(steps):.2f} ms steps, so the step follows the host."
        )
        un = v.get("unpatched")
        if un:
            copies = un["profile"]["syncs"].get("cudaMemcpy", 0)
            text += (
                f" Unpatched, the MoE blocks take {un['moe_host_ms']:.2f} ms of host time per step and "
                f"{copies / res['layers']:g} blocking `cudaMemcpy` per layer."
            )
        dyn, st = v.get("dynamic+fused"), v.get("static+fused")
        if dyn and st:
            rest_d, rest_s = dyn["step_ms"] - dyn["moe_host_ms"], st["step_ms"] - st["moe_host_ms"]
            text += (
                f" With `fused_routing=True` dynamic and static spend {dyn['moe_host_ms']:.2f} and "
                f"{st['moe_host_ms']:.2f} ms in the MoE blocks and {dyn['profile']['gpu_ms']:.2f} and "
                f"{st['profile']['gpu_ms']:.2f} ms of GPU time; the rest of the step (attention, norms, "
                f"head, and the wait for the GPU) takes {rest_d:.2f} and {rest_s:.2f} ms."
            )
        lines.append(text)
    return ["Reading:", "", *lines, ""]


def render_diag_compiled_step(data: dict[str, Any], path: Path) -> list[str]:
    """Where a compiled decode step's time goes (``benchmarks/diag_compiled_step.py``)."""
    m = data["machine"]
    new = data.get("new_tokens", 32)  # the script's default where the file does not say
    prompt = data["results"][0].get("prompt", 128) if data["results"] else 128
    out = [
        "## GPU: compiled decode step, where the time goes (diagnostic)",
        "",
        f"From `{_rel(path)}` (`{data['command']}`; {m['gpu']}, torch {data['versions']['torch']}, "
        f"transformers {data['versions']['transformers']}). `generate(..., "
        'cache_implementation="static")` (transformers compiles the decode forward with '
        f'`torch.compile(mode="reduce-overhead")`), batch 1, a {prompt}-token prompt; every variant in '
        "one process with its own model object over shared weights, interleaved in rounds. Per decode "
        f"step, from the difference between `generate()` runs of {8 + new} and 8 new tokens: *step* = "
        "wall time with no clock in the loop (median over rounds); *GPU* = kernel time under the "
        "profiler, *experts* = this project's kernels in it, *other GPU* = the rest (attention, "
        "projections, norms, router, head); *GPU idle* = step - GPU: the GPU waiting for host work "
        "(`generate()`'s, and the compiled graph's input copies) plus gaps between kernels; *graphs* / "
        "*launches* / *syncs* = CUDA-graph launches, kernel launches outside graphs and host "
        "synchronisations per step; *skips* = inductor's `cudagraph_skips`; *first different token* = "
        f"the 1-based position of the first greedy token that differs from unpatched's (of {new}).",
        "",
    ]
    checks, lines = [], []
    for res in data["results"]:
        v = res["variants"]
        out += [
            f"### {res['shape']} shape, {res['layers']} layers",
            "",
            "| variant | step ms | GPU ms | experts ms | other GPU ms | GPU idle ms | graphs | launches "
            "| syncs | skips | first different token |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, d in v.items():
            gpu, ours = d["gpu_ms_per_step"], d["dmr_kernels_ms_per_step"]
            div = d["first_divergence"]
            first = "none" if name == "unpatched" or div >= new else div + 1
            out.append(
                f"| {name} | {d['generate_step_ms']:.3f} | {gpu:.3f} | {ours:.3f} | {gpu - ours:.3f} "
                f"| {d['generate_step_ms'] - gpu:.3f} | {d['graph_launches_per_step']:.1f} "
                f"| {d['kernel_launches_per_step']:.1f} | {d['syncs_per_step']:.1f} | {d['cudagraph_skips']} "
                f"| {first} |"
            )
        out.append("")
        if not {"static", "dynamic"} <= set(v):
            continue
        st, dy = v["static"], v["dynamic"]
        prompt_pairs = 1.0 - res["routed_pair_reduction_on_prompt"]
        on_decode = "routed_pair_reduction_on_decode" in res
        pairs = 1.0 - res["routed_pair_reduction_on_decode"] if on_decode else prompt_pairs
        limit = COMPILED_SLACK * pairs
        where = (
            f"the decode steps' pair ratio {pairs:.3f} (the prompt's {prompt_pairs:.3f}; limit {limit:.3f})"
            if on_decode
            else f"the prompt's pair ratio {pairs:.3f} (limit {limit:.3f})"
        )
        step_ratio = dy["generate_step_ms"] / st["generate_step_ms"]
        checks.append(
            f"- Compiled decode step ratio, {res['shape']}, batch 1, no clock in the loop: dynamic/static "
            f"{step_ratio:.3f} for {where}: {_mark(step_ratio <= limit)}."
        )
        gpu_ratio = dy["gpu_ms_per_step"] / st["gpu_ms_per_step"]
        ours_ratio = dy["dmr_kernels_ms_per_step"] / st["dmr_kernels_ms_per_step"]
        share = st["dmr_kernels_ms_per_step"] / st["generate_step_ms"]
        best = 1.0 - (1.0 - pairs) * share  # the step ratio if only the experts kernels shrank, exactly
        if best > limit:
            verdict = "above the limit: out of reach of the experts kernels alone here."
        elif step_ratio > limit:
            verdict = "within the limit: the experts kernels' own scaling is what misses."
        else:
            verdict = "within the limit, as the measured step is."
        text = (
            f"- {res['shape']}: GPU time ratio {gpu_ratio:.3f}, the experts kernels alone {ours_ratio:.3f} "
            f"(pair ratio {pairs:.3f}, from the {'decode steps' if on_decode else 'prompt'}). "
            f"Those kernels are {share:.1%} of static's step; if they "
            f"shrank exactly with the pairs and nothing else changed, the step ratio would be {best:.3f}, "
            + verdict
        )
        ft = res.get("first_token")
        if ft and "static" in ft.get("max_abs_logit_diff", {}):
            same = ft["tokens"]["static"] == ft["tokens"]["unpatched"]
            diff = ft["max_abs_logit_diff"]["static"]
            flip = "can" if ft["unpatched_top2_margin"] < 2 * diff else "cannot"
            text += (
                f" First greedy token after the prompt: unpatched top-1 / top-2 logit margin "
                f"{ft['unpatched_top2_margin']:.3g}, static's largest logit difference from unpatched "
                f"{diff:.3g} (bf16, another summation order), so a near-tie {flip} flip the token (a flip "
                "needs a margin below twice the difference); the tokens "
                + ("are equal." if same else "differ.")
            )
        lines.append(text)
    if checks:
        out += ["### Targets", "", *checks, ""]
    if lines:
        out += ["Reading:", "", *lines, ""]
    return out
