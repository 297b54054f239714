"""Probe (issue 10, a lever for ref-mixtral): run a routed slot at part of its expert's width.

Selection (keep or drop a whole ranked slot) cannot take ref-mixtral to 35% fewer routed FLOPs within
+1% perplexity: the oracle ceiling with compensation is +1.83% (``ORACLE_NOTES.md``). This probe asks
whether a finer unit pays: a slot that runs only the ``m`` most important of its expert's ``I``
intermediate neurons, the others replaced by their mean activation on training text (so ``m = 0``
is exactly the mean-output compensation of a dropped slot, and ``m = I`` the full expert). A slot at
width fraction ``f`` costs ``f`` of an expert's FLOPs; the compensation costs one ``(H,)`` vector per
(expert, width), precomputed.

Neuron order per expert (fitted on Gutenberg train tokens, native routing): the variance of the
neuron's activation times the squared norm of its down-projection column, each token weighted by
its native slot weight squared; that is the first-order error of replacing the neuron by its mean.

Allocations probed (weights stay the native ones; nothing is renormalised):

* ``uniform``: every token runs ranked slot ``j`` at width ``f_j`` (per-slot fractions whose mean
  over the native ``k`` slots is ``1 - target``): a static, batch-independent cost;
* ``weight``: slot ``j`` of token ``t`` runs at ``min(1, c * w_tj / mean_t w_tj)`` of the width for
  ``j >= 1`` (the top slot is full), ``c`` bisected on valid for the target: width follows the
  router's weight;
* ``select``: the same budget spent by whole slots (keep the highest-weight non-top slots, width 1
  or 0, with the same mean compensation): the selection baseline on the same footing.

The uniform split is chosen on Gutenberg valid (lowest NLL), then reported with the others on
Gutenberg test and WikiText-2 test (the ``dmr bench`` windows: the first 16,384 tokens, windows of
512), as paired changes against native with a bootstrap SE over windows. FLOPs are counted, not
saved: the probe computes every neuron and masks (it measures quality, not speed).

Run (the recorded result: ``benchmarks/results/partial_width_probe.json``, discussed in
``benchmarks/ORACLE_NOTES.md``, section 5)::

    python benchmarks/partial_width_probe.py --model models/ref-mixtral --targets 0.30 0.35 0.40 \\
        --out benchmarks/results/partial_width_probe.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.experts import STANDARD
from dynamic_moe_router.experts._forward import _expert_hidden

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_experts import write_result  # sibling scripts: one result writer
from learned_eval import CORPORA, paired
from oracle import corpus_ids, windows_of

TOKENS = 16384


class Widths:
    """Shared state of the replaced experts forwards: how many neurons each (token, slot) runs."""

    def __init__(self, native_k: int, inter: int) -> None:
        self.native_k, self.inter = native_k, inter
        self.rule: Any = None  # (layer, weights (T, k)) -> neurons (T, k) int; None: every neuron
        self.stats: dict[int, dict[str, torch.Tensor]] = {}  # per layer: order, rank, mean_act
        self.collect: dict[int, dict[str, torch.Tensor]] | None = None  # filled while fitting
        self.used = 0.0  # neuron-slots run (for the FLOP count)
        self.slots = 0  # native slots seen


def install(model: Any, ctl: Widths) -> None:
    """Replace every MoE layer's experts forward (instance attribute) by the partial-width one."""
    for layer_index, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts

        def forward(self, hidden, top_k_index, top_k_weights, _l=layer_index):  # type: ignore[no-untyped-def]
            t = top_k_index.shape[0]
            out = torch.zeros(t, hidden.shape[1], dtype=torch.float32)
            neurons = None if ctl.rule is None else ctl.rule(_l, top_k_weights.float())  # (T, k)
            if neurons is not None:
                ctl.used += float(neurons.sum()) / ctl.inter
                ctl.slots += t * ctl.native_k
            for e in torch.unique(top_k_index).tolist():
                rows, slots = torch.nonzero(top_k_index == e, as_tuple=True)
                w = top_k_weights[rows, slots].float()  # (n,)
                a = _expert_hidden(self, e, hidden[rows], STANDARD).float()  # (n, I)
                if ctl.collect is not None:
                    c = ctl.collect.setdefault(_l, {})
                    shape = (self.gate_up_proj.shape[0], ctl.inter)
                    for name in ("w2", "w2a", "w2a2"):
                        c.setdefault(name, torch.zeros(shape))
                    c["w2"][e] += (w**2).sum()
                    c["w2a"][e] += (w[:, None] ** 2 * a).sum(0)
                    c["w2a2"][e] += (w[:, None] ** 2 * a**2).sum(0)
                if neurons is not None:
                    st = ctl.stats[_l]
                    keep = st["rank"][e][None, :] < neurons[rows, slots][:, None]  # (n, I)
                    a = torch.where(keep, a, st["mean_act"][e][None, :])
                y = F.linear(a, self.down_proj[e].float())  # (n, H)
                out.index_add_(0, rows, y * w[:, None])
            return out.to(hidden.dtype)

        experts.forward = types.MethodType(forward, experts)


@torch.no_grad()
def fit_order(model: Any, ctl: Widths, windows: torch.Tensor, batch: int) -> None:
    ctl.collect, ctl.rule = {}, None
    for b0 in range(0, len(windows), batch):
        model(windows[b0 : b0 + batch, :-1])
    for layer_index, c in ctl.collect.items():
        mean = c["w2a"] / c["w2"].clamp_min(1e-12)  # (E, I)
        var = (c["w2a2"] / c["w2"].clamp_min(1e-12) - mean**2).clamp_min(0)
        down = model.model.layers[layer_index].mlp.experts.down_proj.float()  # (E, H, I)
        score = var * (down**2).sum(1)  # (E, I)
        order = torch.argsort(score, dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
        ctl.stats[layer_index] = {"rank": rank, "mean_act": mean}
    ctl.collect = None


@torch.no_grad()
def nll_of(
    model: Any, ctl: Widths, windows: torch.Tensor, batch: int, rule: Any
) -> tuple[torch.Tensor, float]:
    """Per-window mean NLL and the routed-FLOP reduction under ``rule``."""
    ctl.rule, ctl.used, ctl.slots = rule, 0.0, 0
    out = []
    for b0 in range(0, len(windows), batch):
        w = windows[b0 : b0 + batch]
        logits = model(w[:, :-1]).logits.float()
        out.append(F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none").mean(1))
    reduction = 0.0 if rule is None else 1.0 - ctl.used / max(ctl.slots, 1)
    ctl.rule = None
    return torch.cat(out), reduction


def uniform_rule(ctl: Widths, fractions: list[float]) -> Any:
    counts = torch.tensor([round(f * ctl.inter) for f in fractions])

    def rule(layer: int, w: torch.Tensor) -> torch.Tensor:
        return counts[None, :].expand(w.shape[0], -1)

    return rule


def weight_rule(ctl: Widths, c: float) -> Any:
    def rule(layer: int, w: torch.Tensor) -> torch.Tensor:
        rel = w / w.mean(-1, keepdim=True).clamp_min(1e-12)
        f = (c * rel).clamp(max=1.0)
        f[:, 0] = 1.0
        return torch.round(f * ctl.inter)

    return rule


def select_rule(ctl: Widths, c: float) -> Any:
    def rule(layer: int, w: torch.Tensor) -> torch.Tensor:
        rel = w / w.mean(-1, keepdim=True).clamp_min(1e-12)
        keep = (rel >= c).float()
        keep[:, 0] = 1.0
        return keep * ctl.inter

    return rule


def bisect(
    model: Any, ctl: Widths, windows: torch.Tensor, batch: int, make: Any, target: float,
    lo: float, hi: float, more_is_wider: bool, iters: int = 12,
) -> tuple[float, torch.Tensor, float]:  # fmt: skip
    """The knob value whose reduction on ``windows`` lands on ``target`` (closest probed)."""
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        nll, red = nll_of(model, ctl, windows, batch, make(ctl, mid))
        if best is None or abs(red - target) < abs(best[2] - target):
            best = (mid, nll, red)
        short = red < target  # not enough saved: the next probe must run fewer neurons
        if short == more_is_wider:
            hi = mid
        else:
            lo = mid
    assert best is not None
    return best


def splits(native_k: int, keep: float, step: float = 0.05) -> list[list[float]]:
    """Per-slot width fractions, non-increasing over the ranked slots, mean ``keep`` (grid ``step``)."""
    total = keep * native_k
    out: list[list[float]] = []

    def rec(prefix: list[float], left: float, slots: int) -> None:
        if slots == 1:
            if 0.0 <= left <= (prefix[-1] if prefix else 1.0) + 1e-9:
                out.append([*prefix, round(left, 4)])
            return
        top = prefix[-1] if prefix else 1.0
        f = top
        while f >= -1e-9:
            if left - f <= top * (slots - 1) + 1e-9 and left - f >= -1e-9:
                rec([*prefix, round(f, 4)], left - f, slots - 1)
            f -= step

    rec([], total, native_k)
    return out


def run_model(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model, tok = load_checkpoint(str(path))
    native_k = int(model.config.num_experts_per_tok)
    inter = int(model.model.layers[0].mlp.experts.down_proj.shape[2])
    ctl = Widths(native_k, inter)
    install(model, ctl)
    start = time.perf_counter()
    train = windows_of(corpus_ids(tok, "gutenberg/train.jsonl.xz", args.train_tokens))
    valid = windows_of(corpus_ids(tok, "gutenberg/valid.jsonl", TOKENS))
    tests = {name: windows_of(corpus_ids(tok, rel, TOKENS)) for name, rel in CORPORA.items()}
    fit_order(model, ctl, train, args.batch)
    native_valid, _ = nll_of(model, ctl, valid, args.batch, None)
    full, _ = nll_of(model, ctl, valid, args.batch, uniform_rule(ctl, [1.0] * native_k))
    check = float((full - native_valid).abs().max())
    native_test = {n: nll_of(model, ctl, w, args.batch, None)[0] for n, w in tests.items()}
    out: dict[str, Any] = {
        "model": path.name, "native_k": native_k, "intermediate": inter, "train_tokens": args.train_tokens,
        "full_width_max_abs_dnll": check, "points": [],
    }  # fmt: skip
    for target in args.targets:
        keep = 1.0 - target
        # uniform: grid over per-slot splits, chosen on valid
        grid = []
        for fr in splits(native_k, keep, args.grid_step):
            nll, red = nll_of(model, ctl, valid, args.batch, uniform_rule(ctl, fr))
            grid.append((float(nll.mean() - native_valid.mean()), fr, red))
        grid.sort(key=lambda g: g[0])
        candidates: dict[str, tuple[Any, float, str]] = {
            "uniform": (uniform_rule(ctl, grid[0][1]), grid[0][2], f"per-slot widths {grid[0][1]}"),
        }
        c, _, red = bisect(model, ctl, valid, args.batch, weight_rule, target, 0.0, 4.0, True)
        candidates["weight"] = (weight_rule(ctl, c), red, f"c={c:.4f}")
        c, _, red = bisect(model, ctl, valid, args.batch, select_rule, target, 0.0, 4.0, False)
        candidates["select"] = (select_rule(ctl, c), red, f"threshold={c:.4f}")
        for kind, (rule, valid_red, how) in candidates.items():
            vn, _ = nll_of(model, ctl, valid, args.batch, rule)
            point: dict[str, Any] = {
                "target": target, "kind": kind, "how": how, "valid_reduction": valid_red,
                "valid_dnll": float(vn.mean() - native_valid.mean()),
            }  # fmt: skip
            if kind == "uniform":
                point["grid"] = [{"widths": fr, "valid_dnll": d} for d, fr, _ in grid[: args.keep_grid]]
            for name, w in tests.items():
                nll, red = nll_of(model, ctl, w, args.batch, rule)
                change, se = paired(native_test[name], nll)
                point[name] = {"reduction": red, "change": change, "se": se}
            out["points"].append(point)
            g = point["gutenberg_test"]
            print(
                f"{path.name} {target:.0%} {kind:8s} {how}: test {g['reduction']:.1%} fewer, "
                f"{g['change']:+.2%} ± {g['se']:.2%}", flush=True,
            )  # fmt: skip
    out["seconds"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", type=Path, required=True, help="reference model folder")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.30, 0.35, 0.40])
    ap.add_argument("--train-tokens", type=int, default=65536, help="Gutenberg train tokens for the order")
    ap.add_argument("--grid-step", type=float, default=0.05)
    ap.add_argument("--keep-grid", type=int, default=5, help="best uniform splits kept in the result")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/partial_width_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "script": "benchmarks/partial_width_probe.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "models": [run_model(p, args) for p in args.model],
    }  # fmt: skip
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
