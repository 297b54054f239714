"""The Pareto plot of a ``dmr bench`` result, drawn from its JSON (no model is run).

One panel per model: routed-expert FLOP reduction (x) against the perplexity change from the native
routing (y). Lower right is better. The guide lines sit at the bench's targets: +1% perplexity, and
30% and the calibration target (35%) fewer routed FLOPs. Each static baseline has its own marker.

Redraw the committed plot from the committed results::

    dmr bench --replot benchmarks/results/quality_flops.json --out-dir benchmarks/results
    python -m dynamic_moe_router.sweeps.plot RESULT.json OUT.png

matplotlib (the ``bench`` extra) is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import DataNotFoundError, MissingDependencyError

__all__ = ["FAMILY_NAMES", "plot_pareto", "replot"]

#: plain names for the legend
FAMILY_NAMES = {
    "native": "native top-k",
    "top_p": "top-p (cumulative probability)",
    "relative_threshold": "relative threshold",
    "entropy": "entropy-adaptive",
    "lu_median": "relative threshold, per-layer median (Lu et al.)",
    "calibrated": "calibrated to the target (dmr calibrate)",
    "learned": "learned allocator (per-layer heads; committed, budget fitted on valid)",
}
#: the accuracy targets of the bench: routed-FLOP reductions and the perplexity budget (percent)
ROUTED_TARGETS = (30.0,)
PPL_BUDGET = 1.0


def _static_name(label: str) -> str:
    if label.startswith("uniform"):
        return f"static top-k, {label.replace('uniform ', '')} in every layer"
    return "static top-k, k-1 in the least sensitive layers"


def plot_pareto(payload: dict[str, Any], path: str | Path) -> None:
    """Draw the Pareto plot of a bench result (``quality_flops.json`` contents) to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError(
            "the Pareto plot needs matplotlib: pip install 'dynamic-moe-router-kit[bench]'"
        ) from None
    path = Path(path)
    models = payload["models"]
    calibration_target = 100 * payload["settings"].get("calibration_target", 0.35)
    targets = sorted({*ROUTED_TARGETS, round(calibration_target, 1)})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 6.2), squeeze=False)
    static_markers = iter(["s", "D", "v", "^", "P", "X"])
    marker_of: dict[str, str] = {}
    for ax, result in zip(axes[0], models, strict=True):
        families: dict[str, list[dict[str, Any]]] = {}
        for row in result["rows"]:
            families.setdefault(row["family"], []).append(row)
        for family, rows in families.items():
            if family == "static":  # different baselines: one marker each, never joined by a line
                for row in rows:
                    name = _static_name(row["label"])
                    marker = marker_of.setdefault(name, next(static_markers, "o"))
                    ax.plot(
                        100 * row["routed_flop_reduction"], 100 * row["ppl_rel_change"],
                        marker=marker, color="black", linestyle="none", markersize=7, label=name,
                    )  # fmt: skip
                continue
            rows = sorted(rows, key=lambda r: r["routed_flop_reduction"])
            xs = [100 * r["routed_flop_reduction"] for r in rows]
            ys = [100 * r["ppl_rel_change"] for r in rows]
            style = {"marker": "o"}
            if family in ("calibrated", "learned"):
                style = {"marker": "*" if family == "calibrated" else "P", "markersize": 11}
            ax.plot(
                xs, ys, label=FAMILY_NAMES.get(family, family),
                linestyle="-" if len(rows) > 1 else "none", **style,
            )  # fmt: skip
        ceiling = payload.get("ceiling", {}).get(Path(result["model"]).name)
        if ceiling:
            xs, ys = zip(*((100 * r, 100 * c) for r, c in ceiling["points"]), strict=True)
            ax.plot(
                xs, ys, color="grey", linestyle="--", marker=".", linewidth=1.2,
                label="oracle ceiling (hindsight allocation on the test text, selection only)",
            )  # fmt: skip
        ax.axhline(PPL_BUDGET, color="grey", linewidth=0.9, linestyle="--")
        ax.annotate(
            f"+{PPL_BUDGET:g}% perplexity budget", xy=(0.01, PPL_BUDGET), xycoords=("axes fraction", "data"),
            ha="left", va="bottom", fontsize=8, color="dimgrey",
        )  # fmt: skip
        for target in targets:
            ax.axvline(target, color="grey", linewidth=0.9, linestyle=":")
            what = "calibration target" if target == round(calibration_target, 1) else "target"
            ax.annotate(
                f"{what}: {target:g}% fewer", xy=(target, 0.98), xycoords=("data", "axes fraction"),
                rotation=90, ha="right", va="top", fontsize=8, color="dimgrey",
            )  # fmt: skip
        ax.annotate(
            "better", xy=(0.97, 0.06), xytext=(0.78, 0.22), xycoords="axes fraction",
            textcoords="axes fraction", ha="center", fontsize=9, color="green",
            arrowprops={"arrowstyle": "->", "color": "green", "linewidth": 1.5},
        )  # fmt: skip
        ax.set_xlabel("routed-expert FLOPs saved vs native top-k (%)")
        ax.set_ylabel("perplexity change vs native top-k (%)")
        ax.set_title(f"{Path(result['model']).name} ({result['family']}, top-{result['native_k']} routing)")
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8, frameon=False)
    rows = (len(handles) + 2) // 3
    fig.tight_layout(rect=(0, 0.035 * rows + 0.01, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written temporary file is left behind
        raise
    finally:
        plt.close(fig)


def replot(result_json: str | Path, out: str | Path) -> None:
    """Redraw the Pareto plot of a saved ``quality_flops.json`` without running anything."""
    path = Path(result_json)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataNotFoundError(
            f"{path} is not a readable JSON file ({err}); pass a quality_flops.json"
        ) from None
    models = payload.get("models") if isinstance(payload, dict) else None
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, dict) and isinstance(m.get("rows"), list) for m in models)
    ):
        raise DataNotFoundError(
            f"{path} is not a dmr bench result (no 'models' with 'rows'); pass the quality_flops.json "
            "that dmr bench wrote"
        )
    plot_pareto(payload, out)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 3:
        sys.exit("usage: python -m dynamic_moe_router.sweeps.plot RESULT.json OUT.png")
    replot(sys.argv[1], sys.argv[2])
