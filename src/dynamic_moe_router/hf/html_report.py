"""``dmr report``: one self-contained HTML page showing where the experts go.

The page holds, with no network fetch (inline CSS and SVG, no scripts from anywhere):

* the text, each token shaded by its number of kept experts (mean over the MoE layers), with the
  per-layer k of a token in its tooltip (hover) and under the text (click);
* per MoE layer, a histogram of k and the load of every expert (pairs routed to it);
* the FLOP summary of :func:`dynamic_moe_router.profile`;
* the Pareto plot of a ``dmr bench`` result (routed-FLOP reduction against perplexity change),
  when one is given.

Example:
    >>> import dynamic_moe_router as dmr
    >>> from dynamic_moe_router.hf.html_report import routing_trace, render_html
    >>> from dynamic_moe_router.hf.tiny import tiny_model
    >>> model = tiny_model("olmoe")
    >>> trace = routing_trace(model, [5, 6, 7, 8], dmr.TopP(p=0.5))
    >>> len(trace.k), len(trace.k[0])  # layers x tokens
    (2, 4)
    >>> page = render_html(trace, ["a", "b", "c", "d"])
    >>> page.startswith("<!DOCTYPE html>") and "http" not in page.split("<body>")[1]
    True
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RoutingTrace", "render_html", "routing_trace"]


@dataclass
class RoutingTrace:
    """Where one text's tokens went: per MoE layer, each token's kept k and each expert's load.

    Attributes:
        layers: MoE layer indices. native_k / num_experts: per layer. k: ``[layer][token]`` kept
            experts. load: ``[layer][expert]`` pairs routed to the expert. profile: the
            :meth:`ProfileReport.to_dict <dynamic_moe_router.ProfileReport.to_dict>` of the run.
    """

    policy: str
    family: str
    layers: list[int]
    native_k: list[int]
    num_experts: list[int]
    k: list[list[int]]
    load: list[list[int]]
    profile: dict[str, Any] = field(default_factory=dict)

    def mean_k(self) -> list[float]:
        """Each token's kept experts, averaged over the MoE layers."""
        return [sum(col) / len(col) for col in zip(*self.k, strict=True)] if self.k else []


@torch.no_grad()
def routing_trace(model: torch.nn.Module, ids: Sequence[int], policy: Any = None) -> RoutingTrace:
    """Run ``ids`` (one sequence) through ``model`` patched with ``policy`` (``None``: the native
    routing, unpatched) and record every MoE layer's routing."""
    from ..profiling import profile
    from .layers import find_moe_layers, model_family, watch_routing
    from .patching import get_patch, patched

    family = model_family(model)
    layers, _ = find_moe_layers(model, family)
    if policy is not None and get_patch(model) is not None:
        from ..errors import PolicyError

        raise PolicyError(
            "routing_trace: the model is already patched, so it would run its own policy, not the one "
            "passed; unpatch it first, or pass policy=None to trace the current patch",
            field="policy",
        )
    seen: dict[int, torch.Tensor] = {}

    def hook(index: int):  # type: ignore[no-untyped-def]
        def record(hidden: torch.Tensor, ids: torch.Tensor) -> None:
            seen[index] = ids.detach().cpu()  # (T, k)

        return record

    handles = [watch_routing(layer, hook(i)) for i, layer in enumerate(layers)]
    x = torch.tensor([list(ids)], dtype=torch.long, device=next(model.parameters()).device)
    try:
        if policy is None:
            with profile(model, count_dense=False) as report:
                model(x)
        else:
            with patched(model, policy), profile(model, count_dense=False) as report:
                model(x)
    finally:
        for h in handles:
            h.remove()
    k_rows, loads = [], []
    for i, layer in enumerate(layers):
        routes = seen[i]  # (T, k) global ids, sentinel = E
        kept = routes < layer.num_experts
        k_rows.append([int(v) for v in kept.sum(-1).tolist()])
        loads.append([int(v) for v in torch.bincount(routes[kept], minlength=layer.num_experts).tolist()])
    d = report.to_dict()
    return RoutingTrace(
        policy=d["policy"],
        family=family.model_type,
        layers=[layer.index for layer in layers],
        native_k=[layer.native_k for layer in layers],
        num_experts=[layer.num_experts for layer in layers],
        k=k_rows,
        load=loads,
        profile=d,
    )


# -- rendering ---------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:72em;color:#1d1d1f}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
.text{line-height:2.1;font-family:ui-monospace,monospace;white-space:pre-wrap;border:1px solid #ddd;
padding:.8em;border-radius:6px}
.tok{border-radius:3px;padding:.1em 0;cursor:pointer}
.tok:target,.tok:focus{outline:2px solid #c60}
table{border-collapse:collapse}td,th{padding:.2em .7em;border-bottom:1px solid #eee;text-align:right}
th{text-align:left}.legend span{display:inline-block;width:2.2em;text-align:center;border-radius:3px}
.grid{display:flex;flex-wrap:wrap;gap:1.5em}.grid figure{margin:0}
figcaption{font-size:.85em;color:#555}
#detail{font-family:ui-monospace,monospace;min-height:1.5em;margin:.5em 0}
"""

_SCRIPT = """
document.querySelectorAll('.tok').forEach(function(t){t.addEventListener('click',function(){
document.getElementById('detail').textContent=t.getAttribute('title');});});
"""


def _shade(value: float, top: float) -> str:
    """Background for a token kept ``value`` experts (``top``: the most a layer keeps natively)."""
    frac = 0.0 if top <= 0 else max(0.0, min(1.0, value / top))
    return f"rgba(214,96,0,{0.08 + 0.72 * frac:.3f})"


def _bars(values: Sequence[float], labels: Sequence[str], width: int = 260, height: int = 110) -> str:
    """A small inline SVG bar chart."""
    n = max(len(values), 1)
    top = max(max(values, default=0), 1)
    bar = width / n
    parts = [f'<svg width="{width}" height="{height + 18}" role="img">']
    for i, (v, label) in enumerate(zip(values, labels, strict=True)):
        h = height * v / top
        x = i * bar
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{height - h:.1f}" width="{max(bar - 2, 1):.1f}" height="{h:.1f}" '
            f'fill="#d66000"><title>{html.escape(label)}: {v:g}</title></rect>'
        )
        if n <= 17:
            parts.append(
                f'<text x="{x + bar / 2:.1f}" y="{height + 13}" font-size="10" text-anchor="middle">'
                f"{html.escape(label)}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)


def _pareto(bench: dict[str, Any], width: int = 520, height: int = 300) -> str:
    """Routed-FLOP reduction (x) against perplexity change (y) of every ``dmr bench`` row."""
    rows = [  # dmr bench: {"models": [{"model", "rows": [...]}]}; one model's rows also work
        {"model": m.get("model", ""), **r}
        for m in bench.get("models", [bench])
        for r in m.get("rows", [])
        if "routed_flop_reduction" in r and "ppl_rel_change" in r
    ]
    if not rows:
        return "<p>The bench result has no rows with a routed-FLOP reduction and a perplexity change.</p>"
    xs = [float(r["routed_flop_reduction"]) for r in rows]
    ys = [float(r["ppl_rel_change"]) for r in rows]
    x_hi, y_lo, y_hi = max(max(xs), 0.01), min(min(ys), 0.0), max(max(ys), 0.01)
    pad = 40

    def px(x: float) -> float:
        return pad + (width - 2 * pad) * x / x_hi

    def py(y: float) -> float:
        return height - pad - (height - 2 * pad) * (y - y_lo) / (y_hi - y_lo)

    out = [f'<svg width="{width}" height="{height}" role="img">']
    out.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>')
    out.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>')
    axis = "routed-FLOP reduction"
    out.append(f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">{axis}</text>')
    out.append(f'<text x="10" y="{pad - 12}" font-size="11">perplexity change</text>')
    for r, x, y in zip(rows, xs, ys, strict=True):
        label = html.escape(f"{r.get('model', '')} {r.get('label') or r.get('policy') or ''}".strip())
        out.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="#1f5fbf" fill-opacity="0.75">'
            f"<title>{label}: {x:.1%} fewer routed FLOPs, perplexity {y:+.2%}</title></circle>"
        )
    out.append("</svg>")
    return "".join(out)


def render_html(
    trace: RoutingTrace,
    tokens: Sequence[str],
    *,
    title: str = "Routing report",
    source: str = "",
    bench: dict[str, Any] | None = None,
) -> str:
    """The report page for ``trace`` over ``tokens`` (the decoded text of each token)."""
    if trace.k and len(tokens) != len(trace.k[0]):
        raise ValueError(f"{len(tokens)} token strings for a trace of {len(trace.k[0])} tokens")
    top = max([*trace.native_k, *(k for row in trace.k for k in row)], default=1)
    means = trace.mean_k()
    spans = []
    for t, (text, mean) in enumerate(zip(tokens, means, strict=True)):
        per_layer = ", ".join(f"L{layer}: {row[t]}" for layer, row in zip(trace.layers, trace.k, strict=True))
        tip = f"token {t} {text!r}: mean k {mean:.2f} ({per_layer})"
        spans.append(
            f'<span class="tok" id="t{t}" tabindex="0" style="background:{_shade(mean, top)}" '
            f'title="{html.escape(tip)}">{html.escape(text)}</span>'
        )
    p = trace.profile
    legend = "".join(f'<span style="background:{_shade(k, top)}">{k}</span>' for k in range(0, top + 1))
    summary = [
        ("policy", trace.policy),
        ("family", trace.family),
        ("tokens", f"{p.get('tokens', len(tokens)):,}"),
        ("mean k", f"{p.get('mean_k', 0.0):.3f} (native {', '.join(map(str, sorted(set(trace.native_k))))})"),
        ("executed pairs", f"{p.get('executed_pairs', 0):,} of {p.get('native_pairs', 0):,} native"),
        ("routed-expert FLOPs", f"{p.get('routed_flop_reduction', 0.0):.1%} fewer than native"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(source)}</p>" if source else "",
        "<table>"
        + "".join(f"<tr><th>{a}</th><td>{html.escape(b)}</td></tr>" for a, b in summary)
        + "</table>",
        "<h2>Kept experts per token</h2>",
        f'<p class="legend">mean k over {len(trace.layers)} MoE layers: {legend} '
        "(hover a token for its per-layer k; click to pin it below)</p>",
        '<div id="detail"></div>',
        '<div class="text">' + "".join(spans) + "</div>",
        "<h2>Per layer</h2>",
        '<div class="grid">',
    ]
    for layer, row, load, k_native, e in zip(
        trace.layers, trace.k, trace.load, trace.native_k, trace.num_experts, strict=True
    ):
        k_top = max(k_native, max(row, default=0))  # a policy may keep more than the native k
        hist = [row.count(k) for k in range(k_top + 1)]
        parts.append(
            f"<figure>{_bars(hist, [str(k) for k in range(k_top + 1)])}"
            f"<figcaption>layer {layer}: tokens by kept k (mean {sum(row) / max(len(row), 1):.2f} of "
            f"{k_native})</figcaption></figure>"
            f"<figure>{_bars(load, [str(i) for i in range(e)])}"
            f"<figcaption>layer {layer}: pairs per expert ({e} experts)</figcaption></figure>"
        )
    parts.append("</div>")
    if bench is not None:
        parts += ["<h2>Quality against routed FLOPs (dmr bench)</h2>", _pareto(bench)]
    parts += [f"<script>{_SCRIPT}</script>", "</body></html>"]
    return "\n".join(x for x in parts if x)
