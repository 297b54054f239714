"""``dmr bench``: the quality / routed-FLOP sweep on the reference models (the main job).

For each model it evaluates, on the same test tokens and task items, the native routing, the
static baselines, a sweep of each dynamic policy family and the calibrated policy:

* ``native``: the model's own top-k;
* ``static``: uniform reduced top-k (every ``k`` below the native one) and a per-layer reduced
  top-k (``k - 1`` in the least sensitive layers, chosen on the valid split, about 35% fewer pairs);
* ``lu_median``: relative threshold with a per-layer ``beta`` = the median ratio of the last native
  candidate's probability to the top one on the valid split (Lu et al. 2024, generalised to any k);
* ``top_p`` (Huang et al. 2024), ``relative_threshold`` and ``entropy`` over fixed operating points;
* ``calibrated``: ``calibrate(target_reduction=0.35)`` on the valid split (all families, per layer).

Quality: perplexity on the first ``ppl_tokens`` tokens of the Gutenberg test split (windows of
512), BLiMP (the first ``blimp_limit`` pairs of each of its 67 paradigms) and LAMBADA (the first
``lambada_limit`` passages). Differences against native come with paired standard errors.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._atomic import write_text_atomic
from ._version import __version__
from .calibrate import calibrate, calibration_windows
from .data import data_file, read_jsonl
from .eval import evaluate, load_checkpoint
from .hf.layers import find_moe_layers
from .hf.patching import patched
from .policies import EntropyAdaptive, PerLayer, RelativeThreshold, RoutingPolicy, StaticTopK, TopP

__all__ = ["BenchSettings", "run_bench"]


@dataclass(frozen=True)
class BenchSettings:
    ppl_tokens: int = 16384
    blimp_limit: int = 5
    lambada_limit: int = 150
    calibration_tokens: int = 4096
    calibration_target: float = 0.35
    batch_size: int = 16


def _valid_documents() -> list[str]:
    return [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]


@torch.no_grad()
def _lu_median_betas(model, windows: torch.Tensor) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """Per layer, the median over tokens of p_(k) / p_(1) under the native routing (softmax routers)."""
    out = model(windows[:, :-1], output_router_logits=True)
    layers = find_moe_layers(model)[0]
    betas = {}
    for layer, logits in zip(layers, out.router_logits, strict=True):
        top = torch.topk(torch.softmax(logits.float(), -1), layer.native_k, dim=-1).values
        betas[layer.index] = float((top[:, -1] / top[:, 0]).median())
    return betas


@torch.no_grad()
def _static_per_layer(model, windows: torch.Tensor, target: float) -> RoutingPolicy:  # type: ignore[no-untyped-def]
    """``k - 1`` in the least sensitive layers (NLL when only that layer drops one expert), until
    the pair reduction reaches ``target``."""
    layers = find_moe_layers(model)[0]

    def nll(policy: RoutingPolicy) -> float:
        with patched(model, policy):
            logits = model(windows[:, :-1]).logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        return float(torch.nn.functional.cross_entropy(flat, windows[:, 1:].reshape(-1)))

    cost = {
        layer.index: nll(PerLayer(StaticTopK(), {layer.index: StaticTopK(k=layer.native_k - 1)}))
        for layer in layers
    }
    native_pairs = sum(layer.native_k for layer in layers)
    chosen: dict[int, RoutingPolicy] = {}
    for index in sorted(cost, key=cost.__getitem__):
        if len(chosen) / native_pairs >= target:  # each chosen layer drops one pair per token
            break
        k = next(layer.native_k for layer in layers if layer.index == index)
        chosen[index] = StaticTopK(k=k - 1)
    return PerLayer(StaticTopK(), chosen)


def _points(model, tokenizer, settings: BenchSettings, log) -> list[tuple[str, str, RoutingPolicy | None]]:  # type: ignore[no-untyped-def]
    layers = find_moe_layers(model)[0]
    native_k = layers[0].native_k
    docs = _valid_documents()
    windows = calibration_windows(tokenizer, docs, settings.calibration_tokens)
    points: list[tuple[str, str, RoutingPolicy | None]] = [("native", "native top-k", None)]
    points += [("static", f"uniform k={k}", StaticTopK(k=k)) for k in range(native_k - 1, 0, -1)]
    log("choosing the per-layer static baseline on the valid split")
    points.append(("static", "per-layer k-1 (least sensitive)", _static_per_layer(model, windows, 0.35)))
    betas = _lu_median_betas(model, windows)
    lu = PerLayer(StaticTopK(), {i: RelativeThreshold(beta=b) for i, b in betas.items()})
    points.append(("lu_median", "per-layer median beta", lu))
    points += [("top_p", f"p={p}", TopP(p=p)) for p in (0.75, 0.6, 0.45, 0.3)]
    points += [("relative_threshold", f"beta={b}", RelativeThreshold(beta=b)) for b in (0.2, 0.4, 0.6, 0.8)]
    points += [
        ("entropy", f"low={c}", EntropyAdaptive(low=c, high=round(min(1.0, c + 0.3), 3)))
        for c in (0.5, 0.65, 0.8)
    ]
    log(f"calibrating to {settings.calibration_target:.0%} fewer routed FLOPs on the valid split")
    cal = calibrate(
        model, tokenizer, settings.calibration_target, documents=docs, tokens=settings.calibration_tokens
    )
    points.append(("calibrated", f"{cal.family}{' per layer' if cal.per_layer else ''} @35%", cal.policy))
    return points


def _track(items: list, description: str):  # type: ignore[no-untyped-def,type-arg]
    """A progress bar (rich) over ``items``; a plain iterator without rich."""
    try:
        from rich.progress import track
    except ImportError:
        return items
    return track(items, description=description)


def _paired_delta(a: list[float], b: list[float]) -> tuple[float, float]:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return mean, se


def _bench_model(path: Path, settings: BenchSettings, log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    model, tokenizer = load_checkpoint(path)
    layers = find_moe_layers(model)[0]
    points = _points(model, tokenizer, settings, log)
    rows: list[dict[str, Any]] = []
    native: dict[str, Any] | None = None
    dense = 0
    for n, (family, label, policy) in enumerate(_track(points, f"{path.name}"), 1):
        start = time.time()
        res = evaluate(
            model,
            tokenizer,
            policy=policy,
            corpora=["gutenberg_test"],
            tasks=["blimp", "lambada"],
            limit={"blimp": settings.blimp_limit, "lambada": settings.lambada_limit},
            max_tokens=settings.ppl_tokens,
            batch_size=settings.batch_size,
            count_dense=policy is None,  # dense FLOPs do not depend on the policy: measured once
        )
        if native is None:
            native = res
            f = res["flops"]
            dense = f["shared_expert_flops"] + f["attention_flops"] + f["other_flops"]
        f = res["flops"]
        ppl = res["perplexity"]["gutenberg_test"]
        blimp, lambada = res["tasks"]["blimp"], res["tasks"]["lambada"]
        d_blimp = _paired_delta(blimp["item_scores"], native["tasks"]["blimp"]["item_scores"])
        d_lambada = _paired_delta(lambada["item_scores"], native["tasks"]["lambada"]["item_scores"])
        native_ppl = native["perplexity"]["gutenberg_test"]["ppl"]
        rows.append(
            {
                "family": family,
                "label": label,
                "policy": None if policy is None else policy.to_dict(),
                "routed_flop_reduction": f["routed_flop_reduction"],
                "total_flop_reduction": (f["native_routed_flops"] - f["routed_flops"])
                / (f["native_routed_flops"] + dense),
                "mean_k": f["mean_k"],
                "ppl": ppl["ppl"],
                "ppl_ci95": ppl["ppl_ci95"],
                "ppl_rel_change": ppl["ppl"] / native_ppl - 1.0,
                "blimp_acc": blimp["acc"],
                "blimp_delta": d_blimp[0],
                "blimp_delta_se": d_blimp[1],
                "lambada_acc": lambada["acc"],
                "lambada_delta": d_lambada[0],
                "lambada_delta_se": d_lambada[1],
                "wall_s": round(time.time() - start, 1),
            }
        )
        r = rows[-1]
        log(
            f"[{n}/{len(points)}] {family:<18} {label:<34} routed -{r['routed_flop_reduction']:6.1%}  "
            f"ppl {r['ppl']:7.3f} ({r['ppl_rel_change']:+.2%})  BLiMP {r['blimp_delta'] * 100:+.1f}  "
            f"LAMBADA {r['lambada_delta'] * 100:+.1f} pts"
        )
    assert native is not None
    return {
        "model": str(path),
        "family": model.config.model_type,
        "moe_layers": len(layers),
        "native_k": layers[0].native_k,
        "data": {
            "perplexity": {
                "file": native["perplexity"]["gutenberg_test"]["file"],
                "tokens": native["perplexity"]["gutenberg_test"]["tokens"],
                "context": 512,
            },
            "blimp": {"file": native["tasks"]["blimp"]["file"], "items": native["tasks"]["blimp"]["items"]},
            "lambada": {
                "file": native["tasks"]["lambada"]["file"],
                "items": native["tasks"]["lambada"]["items"],
            },
            "calibration": {"file": "gutenberg/valid.jsonl", "tokens": settings.calibration_tokens},
        },
        "rows": rows,
    }


def run_bench(models: list[Path], out_dir: Path, settings: BenchSettings, log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Run the sweep on ``models``; write ``quality_flops.json`` and ``pareto.png`` into ``out_dir``."""
    start = time.time()
    torch.manual_seed(0)
    results = []
    for path in models:
        log(f"== {path}")
        results.append(_bench_model(path, settings, log))
    payload = {
        "kind": "quality_flops",
        "created_by": "dmr bench",
        "settings": settings.__dict__,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "dynamic_moe_router": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "wall_s": None,
        "models": results,
    }
    payload["wall_s"] = round(time.time() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "quality_flops.json", json.dumps(payload, indent=1) + "\n")
    _plot(payload, out_dir / "pareto.png")
    return payload


def _plot(payload: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError(
            "the Pareto plot needs matplotlib: pip install 'dynamic-moe-router-kit[bench]'"
        ) from None
    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, result in zip(axes[0], models, strict=True):
        families: dict[str, list[dict[str, Any]]] = {}
        for row in result["rows"]:
            families.setdefault(row["family"], []).append(row)
        for family, rows in families.items():
            rows = sorted(rows, key=lambda r: r["routed_flop_reduction"])
            xs = [100 * r["routed_flop_reduction"] for r in rows]
            ys = [100 * r["ppl_rel_change"] for r in rows]
            ax.plot(xs, ys, marker="o", label=family, linestyle="-" if len(rows) > 1 else "none")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(30.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("routed-expert FLOP reduction (%)")
        ax.set_ylabel("perplexity change vs native (%)")
        ax.set_title(f"{Path(result['model']).name} ({result['family']}, top-{result['native_k']})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def summary_table(payload: dict[str, Any]) -> str:
    """The printable table of a bench run."""
    lines = []
    for result in payload["models"]:
        lines.append(f"{Path(result['model']).name} ({result['family']}, top-{result['native_k']})")
        lines.append(
            f"  {'family':<18} {'point':<34} {'routed':>7} {'whole':>7} {'ppl':>8} {'dppl':>7} "
            f"{'BLiMP':>6} {'dBLiMP':>7} {'LAMB.':>6} {'dLAMB.':>7}"
        )
        for r in result["rows"]:
            lines.append(
                f"  {r['family']:<18} {r['label']:<34} {r['routed_flop_reduction']:>7.1%} "
                f"{r['total_flop_reduction']:>7.1%} {r['ppl']:>8.3f} {r['ppl_rel_change']:>+7.2%} "
                f"{r['blimp_acc']:>6.3f} {100 * r['blimp_delta']:>+7.1f} {r['lambada_acc']:>6.3f} "
                f"{100 * r['lambada_delta']:>+7.1f}"
            )
    return "\n".join(lines)
