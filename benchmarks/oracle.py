"""Oracle ceiling of per-(layer, token, ranked slot) expert selection (issue 10, item 1).

For a fixed text, the oracle chooses in hindsight which ranked slots every token keeps in every MoE
layer, to stay closest to the native model at a routed-FLOP budget; the real perplexity of that fixed
allocation on that text bounds what a selection policy can reach there. Run::

    # the recorded result (an H200 took about 2 minutes per model; see ORACLE_NOTES.md)
    python benchmarks/oracle.py --device cuda --batch 32 --comp --model models/ref-olmoe \
        --model models/ref-mixtral --out benchmarks/results/oracle.json
    # quick, one CPU thread (measured: 14 min wall with --comp on a busy 2-core machine; fewer
    # --targets or no --comp for less)
    python benchmarks/oracle.py --model models/ref-olmoe --tokens 2048 --fisher-samples 4 --chunk 0.1 \
        --check 8 --out /tmp/oracle.json

Method (on the windows ``dmr bench`` scores: the first ``--tokens`` tokens of the Gutenberg test
split, windows of 512, each target scored once):

* **Masking.** Each MoE block's forward is replaced on the instance: the router's softmax, its top
  ``k_max`` ranked experts (``k_max`` = native k + 1, the last slot used only by the grow step), the
  unweighted output of every ranked slot, and a (token, slot) keep mask. The kept weights follow the
  family: Mixtral renormalises over the kept slots (as the library does), OLMoE keeps the raw
  probabilities. With the native mask the output equals the unpatched model's (checked, recorded).
* **Compensation** (``--comp``): a dropped native slot leaves its (native) weight times the expert's
  mean output on the valid split (MoNE-style), and kept weights are not renormalised.
* **Drop cost** of toggling one pair: ``KL_total(native || toggled) - KL_total(native || current)``,
  summed over every later position of the window. The toggle's change of the block output, ``delta``,
  is exact and local; its effect is expanded to second order: ``g . delta + 1/2 delta^T F delta``.
  ``g``, the KL's gradient at the *current* operating point, is zero at the native one, so a
  first-order estimate alone is degenerate there. The Hessian of ``KL(p || softmax(z))`` in the
  logits is ``diag(q) - q q^T`` whatever ``p`` is, i.e. the Fisher matrix of the current model, so
  ``F`` is estimated without bias as ``E_y[(g_y . delta)^2]`` with labels ``y`` sampled from the
  current model at every position (``--fisher-samples`` backward passes; Gauss-Newton through the
  network). The estimator is checked against exact single toggles (one forward each) on a random
  sample, at the native and at a reduced operating point (Spearman), next to the label-NLL
  first-order term and the first-order KL term alone.
* **Greedy.** In chunks of ``--chunk`` of the native pairs: re-estimate every cost, drop the
  cheapest kept pairs (never the dearest kept slot of a (layer, token), so one stays). The ranking
  cost is ``--estimator``: ``clipped`` (default) = second order + positive part of the first-order
  term. The full first-order term (``total``) ranks badly: thousands of simultaneous drops whose
  first-order gains all "repair" the same shift are not additive. The grow step adds slot k + 1 where
  its estimated gain (first + second order) exceeds the cost of the next cheapest drop, which pays
  for it (equal pairs). The allocation is saved at each target.
* **Baselines**, by the same code: static uniform top-k, and static per-layer k chosen greedily on the
  Gutenberg valid split (lower k by one in the layer whose NLL rises least, until the target); with
  ``--comp`` also both with compensation.

One CPU thread (``torch.set_num_threads(1)``) unless ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import platform
import time
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TARGETS = (0.25, 0.30, 0.35, 0.40, 0.50)
CONTEXT = 512


# ----------------------------------------------------------------------------------------------
# data and checkpoints (self-contained on purpose: the library's modules are refactored meanwhile;
# the same lookup as ``dynamic_moe_router.data``: $DMR_DATA, else shared/data beside or above)


def data_file(relative: str) -> Path:
    env = os.environ.get("DMR_DATA")
    roots = [Path(env)] if env else []
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        roots += [folder / "shared" / "data" for folder in (start, *start.parents)]
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    raise FileNotFoundError(f"{relative} not found in $DMR_DATA or any shared/data folder; set DMR_DATA")


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def load_checkpoint(path: Path):  # type: ignore[no-untyped-def]
    """``(model, tokenizer)`` in float32, eval mode (as ``dynamic_moe_router.eval.load_checkpoint``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def corpus_ids(tokenizer, relative: str, tokens: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The first ``tokens + 1`` token ids of a shared corpus, tokenised document by document and joined
    with the end-of-text token, exactly as ``dynamic_moe_router.eval.perplexity`` does."""
    path = data_file(relative)
    if path.suffix in (".jsonl", ".xz"):
        docs: Iterable[str] = (r["text"] for r in read_jsonl(path))
    else:
        docs = [path.read_text(encoding="utf-8").replace("\r\n", "\n")]
    ids: list[int] = []
    for doc in docs:
        if not doc.strip():
            continue
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) > tokens:
            break
    return torch.tensor(ids[: tokens + 1], dtype=torch.long)


def windows_of(ids: torch.Tensor, context: int = CONTEXT) -> torch.Tensor:
    """``(W, context + 1)`` non-overlapping windows (inputs ``[:, :-1]``, targets ``[:, 1:]``); a
    token budget that is a multiple of ``context`` gives exactly the windows of ``dmr eval``."""
    n = (len(ids) - 1) // context
    return torch.stack([ids[i * context : i * context + context + 1] for i in range(n)])


# ----------------------------------------------------------------------------------------------
# instance-level masked MoE forward


@dataclass
class MoEControl:
    """State shared by the replaced MoE forwards of one model.

    ``masks[l]``: ``(N, k_max)`` keep mask of layer ``l`` for the N tokens of the current batch
    (``None``: native top-k). ``capture``: keep each layer's router input, ranked probabilities,
    slot outputs and output for the estimators. ``head``: a callable
    ``(layer, h, probs_ranked, probs_all) -> mask`` (the learned probe) used when set.
    ``comp[l]``: ``(E, H)`` per-expert mean output used for dropped slots (compensation).
    """

    native_k: int
    k_max: int
    renorm: bool
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    capture: bool = False
    captured: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    head: Any = None
    comp: dict[int, torch.Tensor] | None = None
    comp_scale: dict[int, torch.Tensor] | None = None


def slot_outputs(experts, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Unweighted output of expert ``index[n, j]`` on token ``x[n]``: ``(N, k_max, H)``."""
    n, k = index.shape
    flat = index.reshape(-1)  # (N*k,)
    order = torch.argsort(flat, stable=True)
    tok = torch.div(order, k, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=experts.gate_up_proj.shape[0]).tolist()
    xs = x[tok]  # (N*k, H) sorted by expert
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        chunk = xs[start : start + c]
        gate, up = F.linear(chunk, experts.gate_up_proj[e]).chunk(2, dim=-1)
        outs.append(F.linear(experts.act_fn(gate) * up, experts.down_proj[e]))
        start += c
    y = torch.cat(outs)  # (N*k, H) in sorted order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y[inverse].reshape(n, k, -1)


def combine(probs: torch.Tensor, mask: torch.Tensor, renorm: bool) -> torch.Tensor:
    """Slot weights ``(N, k_max)`` from the ranked probabilities and the keep mask."""
    w = probs * mask
    if renorm:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
    return w


def install(model, native_k: int, k_max: int) -> MoEControl:  # type: ignore[no-untyped-def]
    """Replace the forward of every MoE block of ``model`` (instance attribute) by the masked one."""
    renorm = model.config.model_type == "mixtral" or bool(getattr(model.config, "norm_topk_prob", False))
    ctl = MoEControl(native_k=native_k, k_max=k_max, renorm=renorm)
    for index, layer in enumerate(model.model.layers):
        block = layer.mlp

        def forward(self, hidden_states: torch.Tensor, _l: int = index) -> torch.Tensor:
            b, t, h = hidden_states.shape
            x = hidden_states.reshape(-1, h)  # (N, H)
            if ctl.capture and not x.requires_grad:  # start the graph at the first MoE block
                x = x.detach().requires_grad_(True)
            logits = F.linear(x, self.gate.weight)  # (N, E)
            probs_all = torch.softmax(logits.float(), -1)
            top, idx = torch.topk(probs_all, ctl.k_max, dim=-1)  # (N, k_max)
            s = slot_outputs(self.experts, x, idx)  # (N, k_max, H)
            if ctl.head is not None:
                mask = ctl.head(_l, x, top, probs_all)
            else:
                mask = ctl.masks.get(_l)
                if mask is None:
                    mask = torch.zeros_like(top)
                    mask[:, : ctl.native_k] = 1.0
            if ctl.comp is not None and ctl.renorm:
                # compensation replaces renormalisation: weights stay those of the native top-k
                w = top * mask / top[:, : ctl.native_k].sum(-1, keepdim=True)
            else:
                w = combine(top, mask, ctl.renorm)  # (N, k_max)
            if ctl.comp_scale is not None:
                w = w * ctl.comp_scale[_l]
            out = torch.einsum("nj,njh->nh", w.to(s.dtype), s)  # (N, H)
            if ctl.comp is not None:
                # dropped native slots contribute prob * the expert's mean output
                native = torch.zeros_like(top)
                native[:, : ctl.native_k] = 1.0
                dropped = top * native * (1.0 - mask)  # (N, k_max)
                if ctl.renorm:
                    dropped = dropped / top[:, : ctl.native_k].sum(-1, keepdim=True)
                out = out + torch.einsum("nj,njh->nh", dropped, ctl.comp[_l][idx])
            if ctl.capture:
                ctl.captured[_l] = {"x": x, "top": top, "idx": idx, "s": s, "out": out, "mask": mask}
            return out.reshape(b, t, h)

        block.forward = types.MethodType(forward, block)
    return ctl


def native_k_of(model) -> int:  # type: ignore[no-untyped-def]
    return int(model.config.num_experts_per_tok)


# ----------------------------------------------------------------------------------------------
# measurement


@torch.no_grad()
def native_logprobs(model, windows: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.log_softmax(model(windows[:, :-1]).logits.float(), -1)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch: int, set_masks=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Per-window mean NLL ``(W,)``; ``set_masks(b0, b1)`` installs the masks of windows b0..b1."""
    out = []
    for b0 in range(0, len(windows), batch):
        w = windows[b0 : b0 + batch]
        if set_masks is not None:
            set_masks(b0, b0 + len(w))
        logits = model(w[:, :-1]).logits.float()
        nll = F.cross_entropy(logits.transpose(1, 2), w[:, 1:], reduction="none")  # (B, T)
        out.append(nll.mean(1))
    return torch.cat(out)


def ppl_of(nll_per_window: torch.Tensor) -> float:
    return math.exp(float(nll_per_window.mean()))


def paired_se(a: torch.Tensor, b: torch.Tensor, reps: int = 1000, seed: int = 0) -> float:
    """Bootstrap (over windows) standard error of the relative perplexity change ``ppl(b)/ppl(a) - 1``."""
    from dynamic_moe_router.eval.stats import paired_ratio

    return paired_ratio(b, a, seed=seed, draws=reps)[1]


class Masks:
    """Full-text masks ``(L, W, T, k_max)`` with a setter for a batch of windows."""

    def __init__(self, ctl: MoEControl, layers: int, windows: int, t: int, device: torch.device) -> None:
        self.ctl = ctl
        self.m = torch.zeros(layers, windows, t, ctl.k_max, device=device)
        self.m[..., : ctl.native_k] = 1.0

    def set(self, b0: int, b1: int) -> None:
        for layer in range(self.m.shape[0]):
            self.ctl.masks[layer] = self.m[layer, b0:b1].reshape(-1, self.ctl.k_max)

    def reduction(self) -> float:
        pairs = float(self.m.sum())
        native = self.m.shape[0] * self.m.shape[1] * self.m.shape[2] * self.ctl.native_k
        return 1.0 - pairs / native


def toggle_delta(cap: dict[str, torch.Tensor], ctl: MoEControl, layer: int) -> torch.Tensor:
    """Exact change of the block output ``(N, k_max, H)`` when slot j of token n is toggled."""
    top, mask, s = cap["top"].detach(), cap["mask"].detach(), cap["s"].detach()
    renorm, k = ctl.renorm, ctl.native_k
    if ctl.comp is not None:
        # weights of the native top-k, fixed; a dropped native slot leaves prob * mean output behind
        scale = top / top[:, :k].sum(-1, keepdim=True) if renorm else top
        s_eff = s.clone()
        s_eff[:, :k] -= ctl.comp[layer][cap["idx"][:, :k]]
        return ((1.0 - 2.0 * mask) * scale).unsqueeze(-1) * s_eff
    pm = top * mask  # (N, k)
    if not renorm:
        sign = 1.0 - 2.0 * mask  # +1: add the slot, -1: drop it
        return (sign * top).unsqueeze(-1) * s
    d = pm.sum(-1, keepdim=True)  # (N, 1)
    a = torch.einsum("nj,njh->nh", pm, s)  # (N, H)
    out = a / d.clamp_min(1e-9)
    sign = 1.0 - 2.0 * mask
    d2 = (d + sign * top).unsqueeze(-1)  # (N, k, 1)
    a2 = a.unsqueeze(1) + (sign * top).unsqueeze(-1) * s  # (N, k, H)
    out2 = torch.where(d2 > 1e-9, a2 / d2.clamp_min(1e-9), torch.zeros_like(a2))
    return out2 - out.unsqueeze(1)


def estimate_costs(  # type: ignore[no-untyped-def]
    model, ctl: MoEControl, windows: torch.Tensor, ref: torch.Tensor, fisher: int, seed: int, label: bool
) -> dict[str, torch.Tensor]:
    """Estimated toggle costs for one batch of windows: ``(L, B*T, k_max)`` per estimator.

    ``first``: g_KL . delta; ``fisher``: 1/2 E[(g_y . delta)^2]; ``total`` = first + fisher;
    ``nll1``: first-order change of the label NLL (sum over positions)."""
    ctl.capture = True
    ctl.captured.clear()
    with torch.enable_grad():
        logits = model(windows[:, :-1]).logits.float()  # (B, T, V)
        logq = torch.log_softmax(logits, -1)
        p = ref.exp()
        kl = (p * (ref - logq)).sum()
        nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="sum")
        layers = sorted(ctl.captured)
        outs = [ctl.captured[i]["out"] for i in layers]
        deltas = [toggle_delta(ctl.captured[i], ctl, i) for i in layers]
        g_kl = torch.autograd.grad(kl, outs, retain_graph=True)
        g_nll = torch.autograd.grad(nll, outs, retain_graph=True) if label else None
        fis = [torch.zeros(d.shape[:2], device=d.device) for d in deltas]
        gen = torch.Generator(device=logits.device).manual_seed(seed)
        q = logq.detach().exp().reshape(-1, logq.shape[-1])
        for s in range(fisher):
            y = torch.multinomial(q, 1, generator=gen).reshape(logq.shape[:2])
            ly = F.nll_loss(logq.transpose(1, 2), y, reduction="sum")
            gy = torch.autograd.grad(ly, outs, retain_graph=s < fisher - 1)
            for i, (g, d) in enumerate(zip(gy, deltas, strict=True)):
                fis[i] += torch.einsum("nh,njh->nj", g, d) ** 2
    ctl.capture = False
    ctl.captured.clear()
    first = torch.stack([torch.einsum("nh,njh->nj", g, d) for g, d in zip(g_kl, deltas, strict=True)])
    fisher_t = torch.stack(fis) * (0.5 / max(fisher, 1))
    est = {"first": first, "fisher": fisher_t, "total": first + fisher_t}
    if g_nll is not None:
        est["nll1"] = torch.stack(
            [torch.einsum("nh,njh->nj", g, d) for g, d in zip(g_nll, deltas, strict=True)]
        )
    return est


@torch.no_grad()
def exact_toggle_cost(model, masks: Masks, windows: torch.Tensor, ref_w: torch.Tensor, pick) -> float:  # type: ignore[no-untyped-def]
    """Exact change of the window's total KL(native || masked) when pair ``pick`` is toggled."""
    layer, w, t, j = pick

    def total_kl() -> float:
        masks.set(w, w + 1)
        logq = torch.log_softmax(model(windows[w : w + 1, :-1]).logits.float(), -1)
        return float((ref_w.exp() * (ref_w - logq)).sum())

    base = total_kl()
    masks.m[layer, w, t, j] = 1.0 - masks.m[layer, w, t, j]
    after = total_kl()
    masks.m[layer, w, t, j] = 1.0 - masks.m[layer, w, t, j]
    return after - base


def spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().float()
    rb = torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


@torch.no_grad()
def expert_means(model, ctl: MoEControl, windows: torch.Tensor, batch: int) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Per (layer, expert) mean unweighted output ``(E, H)`` over the tokens natively routed to it
    (the compensation values, MoNE-style)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    head, comp, masks = ctl.head, ctl.comp, dict(ctl.masks)
    ctl.head, ctl.comp = None, None
    ctl.masks.clear()
    ctl.capture = True
    for b0 in range(0, len(windows), batch):
        ctl.captured.clear()
        model(windows[b0 : b0 + batch, :-1])
        for layer, cap in ctl.captured.items():
            idx = cap["idx"][:, : ctl.native_k].reshape(-1)
            s = cap["s"][:, : ctl.native_k].reshape(-1, cap["s"].shape[-1]).detach()
            e = model.model.layers[layer].mlp.gate.weight.shape[0]
            sums.setdefault(layer, s.new_zeros(e, s.shape[-1])).index_add_(0, idx, s)
            counts.setdefault(layer, s.new_zeros(e)).index_add_(0, idx, s.new_ones(len(idx)))
    ctl.capture = False
    ctl.captured.clear()
    ctl.head, ctl.comp = head, comp
    ctl.masks.update(masks)
    return {layer: sums[layer] / counts[layer].clamp_min(1).unsqueeze(-1) for layer in sums}


# ----------------------------------------------------------------------------------------------
# the oracle


def all_costs(model, ctl, masks, windows, refs, batch, fisher, seed, label=False) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Estimated toggle costs over all windows ``(L, W, T, k_max)``."""
    parts: dict[str, list[torch.Tensor]] = {}
    for b0 in range(0, len(windows), batch):
        w = windows[b0 : b0 + batch]
        masks.set(b0, b0 + len(w))
        est = estimate_costs(model, ctl, w, refs[b0 : b0 + len(w)], fisher, seed + b0, label)
        for k, v in est.items():
            parts.setdefault(k, []).append(v.reshape(v.shape[0], len(w), -1, v.shape[-1]))
    return {k: torch.cat(v, 1) for k, v in parts.items()}


def estimator_check(model, ctl, masks, windows, refs, batch, fisher, samples, seed) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Spearman correlation of each estimator with exact single-toggle costs on random kept pairs."""
    costs = all_costs(model, ctl, masks, windows, refs, batch, fisher, seed, label=True)
    g = torch.Generator().manual_seed(seed)
    kept = (masks.m[..., : ctl.native_k] > 0).nonzero().cpu()
    picks = kept[torch.randperm(len(kept), generator=g)[:samples]].tolist()
    exact = [exact_toggle_cost(model, masks, windows, refs[p[1]], p) for p in picks]
    row: dict[str, Any] = {"samples": len(picks), "reduction": masks.reduction()}
    for name in ("total", "fisher", "first", "nll1"):
        est = [float(costs[name][tuple(p)]) for p in picks]
        row[f"spearman_{name}"] = spearman(est, exact)
    row["exact_mean"] = sum(exact) / len(exact)
    row["estimate_total_mean"] = sum(float(costs["total"][tuple(p)]) for p in picks) / len(picks)
    return row


def selection_cost(costs: dict[str, torch.Tensor], estimator: str) -> torch.Tensor:
    """The cost the greedy ranks by. ``fisher``: the second-order term alone; ``total``: with the
    first-order term at the current point; ``clipped``: with only its positive part. In a chunk of
    thousands of simultaneous drops the per-pair first-order gains are not additive (they all
    "repair" the same error), which is why ``fisher`` is the default (see ORACLE_NOTES.md)."""
    if estimator == "fisher":
        return costs["fisher"]
    if estimator == "clipped":
        return costs["fisher"] + costs["first"].clamp_min(0.0)
    return costs["total"]


def greedy(model, ctl, masks, windows, refs, args, grow: bool, log) -> dict[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Greedy drops (and swaps when ``grow``) in chunks, re-estimating costs before each chunk."""
    native_pairs = masks.m.shape[0] * masks.m.shape[1] * masks.m.shape[2] * ctl.native_k
    chunk = int(args.chunk * native_pairs)
    saved: dict[float, torch.Tensor] = {}
    targets = sorted(args.targets)
    step = 0
    while targets:
        need = math.ceil(targets[0] * native_pairs - (native_pairs - float(masks.m.sum())))
        if need <= 0:
            saved[targets.pop(0)] = masks.m.clone()
            continue
        t0 = time.time()
        costs = all_costs(model, ctl, masks, windows, refs, args.batch, args.fisher_samples, args.seed + step)
        cost = selection_cost(costs, args.estimator)  # (L, W, T, k_max)
        kept = masks.m > 0
        inf = torch.full_like(cost, float("inf"))
        # drop candidates: every kept slot except the dearest kept slot of each (layer, token)
        cand = torch.where(kept, cost, inf)
        dearest = torch.where(kept, cost, -inf).argmax(-1, keepdim=True)
        cand = cand.scatter(-1, dearest, float("inf")).flatten()
        order = cand.argsort()
        n_drop = min(chunk, need)
        swaps = 0
        if grow:
            # grow candidates: slot k+1 where absent; gain = -(first + second order) cost of adding it
            gc = costs["total"][..., ctl.native_k]
            absent = ~kept[..., ctl.native_k]
            gain = torch.where(absent, -gc, -inf[..., 0]).flatten()
            gorder = gain.argsort(descending=True)
            sorted_cand = cand[order]
            limit = min(chunk, len(gorder), len(order) - n_drop)
            ok = gain[gorder[:limit]] > sorted_cand[n_drop : n_drop + limit]
            swaps = int(ok.long().cumprod(0).sum()) if limit > 0 else 0
            grow_rows = gorder[:swaps]
            masks.m.reshape(-1, ctl.k_max)[grow_rows, ctl.native_k] = 1.0
        picks = order[: n_drop + swaps]
        picks = picks[torch.isfinite(cand[picks])]
        masks.m.view(-1)[picks] = 0.0
        step += 1
        log(
            f"  step {step}: reduction {masks.reduction():.3f} (dropped {len(picks)}, grew {swaps}) "
            f"in {time.time() - t0:.0f} s"
        )
    return saved


@torch.no_grad()
def static_per_layer(
    model, ctl, valid: torch.Tensor, batch: int, layers: int, targets
) -> dict[float, list[int]]:  # type: ignore[no-untyped-def]
    """Per-layer k, chosen greedily on valid text: lower k by one in the layer where the NLL rises
    least, until each target reduction is reached (nested: one greedy path for all targets)."""
    ks = [ctl.native_k] * layers
    out: dict[float, list[int]] = {}

    def nll(kk: list[int]) -> float:
        def setter(b0: int, b1: int) -> None:
            n = (b1 - b0) * (valid.shape[1] - 1)
            for i in range(layers):
                m = torch.zeros(n, ctl.k_max, device=valid.device)
                m[:, : kk[i]] = 1.0
                ctl.masks[i] = m

        return float(window_nll(model, valid, batch, setter).mean())

    for target in sorted(targets):
        while 1.0 - sum(ks) / (layers * ctl.native_k) < target - 1e-9:
            trials = {i: nll([*ks[:i], ks[i] - 1, *ks[i + 1 :]]) for i in range(layers) if ks[i] > 1}
            i = min(trials, key=trials.__getitem__)
            ks[i] -= 1
        out[target] = list(ks)
    return out


def run_model(path: Path, args, log) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    model, tokenizer = load_checkpoint(path)
    device = torch.device(args.device)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    k = native_k_of(model)
    layers = len(model.model.layers)
    test = windows_of(corpus_ids(tokenizer, "gutenberg/test.jsonl", args.tokens)).to(device)
    valid = windows_of(corpus_ids(tokenizer, "gutenberg/valid.jsonl", args.valid_tokens)).to(device)
    t = test.shape[1] - 1
    t_start = time.time()
    base_nll = window_nll(model, test, args.batch)  # unpatched
    refs = torch.cat(
        [native_logprobs(model, test[b : b + args.batch]) for b in range(0, len(test), args.batch)]
    )
    ctl = install(model, k, k + 1)
    masks = Masks(ctl, layers, len(test), t, device)
    native_nll = window_nll(model, test, args.batch, masks.set)
    equiv = float((native_nll - base_nll).abs().max())
    log(f"{path.name}: native ppl {ppl_of(base_nll):.3f}, patched-native max |dNLL| {equiv:.2e}")
    result: dict[str, Any] = {
        "model": path.name,
        "family": model.config.model_type,
        "native_k": k,
        "layers": layers,
        "renormalise_kept": ctl.renorm,
        "test_tokens": len(test) * t,
        "windows": len(test),
        "native_ppl": ppl_of(base_nll),
        "patched_native_max_abs_dnll": equiv,
        "points": [],
    }

    def point(kind: str, name: str, nll: torch.Tensor, reduction: float, **extra: Any) -> None:
        row = {
            "kind": kind,
            "point": name,
            "reduction": reduction,
            "ppl": ppl_of(nll),
            "ppl_change": ppl_of(nll) / ppl_of(base_nll) - 1.0,
            "ppl_change_se": paired_se(base_nll, nll),
            **extra,
        }
        result["points"].append(row)
        log(f"  {kind:>10} {name:<28} red {reduction:.3f} ppl {row['ppl']:.3f} ({row['ppl_change']:+.2%})")

    # compensation values: per-(layer, expert) mean outputs on the valid windows (not the test text)
    means = expert_means(model, ctl, valid, args.batch)
    comps = (False, True) if args.comp else (False,)
    per_layer_ks = static_per_layer(model, ctl, valid, args.batch, layers, args.targets)
    for comp in comps:
        ctl.comp = means if comp else None
        tag = "+comp" if comp else ""
        # static uniform k, and static per-layer k (chosen on valid without compensation)
        for kk in range(k - 1, 0, -1):
            masks.m.zero_()
            masks.m[..., :kk] = 1.0
            nll = window_nll(model, test, args.batch, masks.set)
            point("static" + tag, f"uniform k={kk}{tag}", nll, 1 - kk / k)
        for target, ks in per_layer_ks.items():
            masks.m.zero_()
            for i, kk in enumerate(ks):
                masks.m[i, ..., :kk] = 1.0
            nll = window_nll(model, test, args.batch, masks.set)
            point(
                "per_layer" + tag,
                f"per-layer k {ks}{tag} (target {target:.0%})",
                nll,
                masks.reduction(),
                ks=ks,
            )
    ctl.comp = None
    # estimator check at the native and a reduced operating point
    checks = []
    masks.m.zero_()
    masks.m[..., :k] = 1.0
    checks.append(
        estimator_check(model, ctl, masks, test, refs, args.batch, args.fisher_samples, args.check, args.seed)
        | {"point": "native"}
    )
    log(f"  estimator check (native point): {checks[-1]}")
    # greedy oracle: selection only (k_max = k), with the grow step (k_max = k + 1), with compensation
    variants = [(grow, comp) for comp in comps for grow in ((False,) if args.no_grow else (False, True))]
    for grow, comp in variants:
        ctl.comp = means if comp else None
        masks.m.zero_()
        masks.m[..., :k] = 1.0
        kind = "oracle" + ("+grow" if grow else "") + ("+comp" if comp else "")
        log(f"  greedy {kind}")
        t0 = time.time()
        saved = greedy(model, ctl, masks, test, refs, args, grow, log)
        seconds = time.time() - t0
        for target, m in saved.items():
            masks.m.copy_(m)
            nll = window_nll(model, test, args.batch, masks.set)
            slot_use = [float(x) for x in m.mean((0, 1, 2))]
            per_layer = [float(1 - m[i].sum(-1).mean() / k) for i in range(layers)]
            point(kind, f"{kind} @{target:.0%}", nll, masks.reduction(), target=target,
                  slot_use=slot_use, per_layer_reduction=per_layer, greedy_seconds=seconds)  # fmt: skip
            if not grow and abs(target - 0.30) < 1e-9:
                check = estimator_check(
                    model, ctl, masks, test, refs, args.batch, args.fisher_samples, args.check, args.seed + 1
                )
                checks.append(check | {"point": f"{kind} @30%"})
                log(f"  estimator check ({kind} @30%): {checks[-1]}")
    ctl.comp = None
    result["estimator_check"] = checks
    result["seconds"] = time.time() - t_start
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", type=Path, help="checkpoint folder (repeatable)")
    ap.add_argument("--tokens", type=int, default=16384, help="Gutenberg test tokens (windows of 512)")
    ap.add_argument("--valid-tokens", type=int, default=4096, help="valid tokens for the per-layer baseline")
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--chunk", type=float, default=0.025, help="fraction of native pairs per greedy chunk")
    ap.add_argument(
        "--fisher-samples", type=int, default=32, help="sampled-label backward passes per estimate"
    )
    ap.add_argument("--estimator", choices=("fisher", "clipped", "total"), default="clipped")
    ap.add_argument("--comp", action="store_true", help="also the oracle and baselines with compensation")
    ap.add_argument("--no-grow", action="store_true", help="selection-only greedy (k_max = k) only")
    ap.add_argument("--check", type=int, default=40, help="exact single toggles in the estimator check")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (1 thread) or cuda")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    models = args.model or [Path("models/ref-mixtral"), Path("models/ref-olmoe")]
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.time()
    payload: dict[str, Any] = {
        "script": "benchmarks/oracle.py",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "model"},
        "machine": f"{platform.machine()}, torch {torch.__version__}, "
        + (torch.cuda.get_device_name() if args.device.startswith("cuda") else "1 CPU thread"),
        "models": [],
    }
    for path in models:
        payload["models"].append(run_model(path, args, lambda s: print(s, flush=True)))
    payload["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out} in {payload['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
