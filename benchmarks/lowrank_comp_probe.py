"""Probe (issue 10, compensation): a rank-r linear term on top of the learned allocator's compensation.

Today a dropped slot of expert ``e`` is replaced by its native weight times one trained vector ``m_e``.
This probe asks whether a token-dependent estimate pays: ``m_e + (h - xbar_e) A_e B_e``, with
``A_e B_e`` the rank-r ridge fit of expert ``e``'s output on its input ``h`` (weighted by the slot's
native weight squared), over Gutenberg train tokens that route to ``e`` at a ranked slot >= 1 (the
slots a budget drops). It costs ``4 * H * r`` FLOPs per dropped slot.

Two measurements per reference model:

* ``explained``: on a held-out fifth of those tokens, the weighted squared error of each estimate
  relative to no compensation (``mean``: the plain mean output; ``rN``: mean + rank-N map; ``r0``:
  full rank);
* ``perplexity``: the committed ``learned-q35`` allocator (quantile budget, 35% fewer routed FLOPs)
  on Gutenberg test and WikiText-2 test (the ``dmr bench`` windows), with its trained vectors only
  and with the rank-r term added (paired change against the trained vectors only, bootstrap SE).

The term is added by wrapping the patched router's private ``_compensated`` (a probe, not an API).

Run (the recorded result: ``benchmarks/results/lowrank_comp_probe.json``)::

    python benchmarks/lowrank_comp_probe.py --model models/ref-mixtral --model models/ref-olmoe \\
        --out benchmarks/results/lowrank_comp_probe.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.data import data_file, read_jsonl
from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.hf import patching
from dynamic_moe_router.learn import allocator_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_experts import write_result  # sibling scripts: one result writer
from learned_eval import CORPORA, paired, window_nll
from oracle import corpus_ids, windows_of

#: layer index -> (xbar (E, H), A (E, H, r), B (E, r, H)) of the model being measured
LOWRANK: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_ORIGINAL = patching.DynamicRouter._compensated


def _with_lowrank(self, sc, ranked, finite, mask, means, h):  # type: ignore[no-untyped-def]
    """The router's compensation plus the rank-r term of each dropped slot."""
    logits, ids, weights, comp = _ORIGINAL(self, sc, ranked, finite, mask, means, h)
    fitted = LOWRANK.get(self.layer.index)
    if fitted is None:
        return logits, ids, weights, comp
    xbar, a, b = fitted
    num_experts = sc.select.shape[-1]
    sel = patching.Selected(ranked_ids=ranked, keep=finite, counts=finite.sum(-1), num_experts=num_experts)
    native = self.family.scorer.weights(
        self.layer.router, sc, sel, self.renormalize, h.dtype, self.family.weights_dtype
    )  # (T, k)
    dropped = native.float() * (~mask if mask.dtype == torch.bool else 1.0 - mask) * finite  # (T, k)
    per_expert = torch.zeros(h.shape[0], num_experts, device=h.device).scatter_add_(1, ranked, dropped)
    z = torch.einsum("th,ehr->ter", h.float(), a) - torch.einsum("eh,ehr->er", xbar, a)[None]  # (T, E, r)
    extra = (per_expert[:, :, None] * z).reshape(h.shape[0], -1) @ b.reshape(-1, b.shape[-1])  # (T, H)
    return logits, ids, weights, comp + extra.to(comp.dtype)


def collect(model: Any, windows: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per MoE layer: the experts' inputs ``(N, H)``, native ids ``(N, k)`` and weights ``(N, k)``."""
    rec: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):

        def hook(mod, args, kwargs, i=i):  # type: ignore[no-untyped-def]
            rec.setdefault(i, []).append(
                (args[0].detach().float(), args[1].detach(), args[2].detach().float())
            )

        hooks.append(layer.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for b in range(0, len(windows), 16):
            model(windows[b : b + 16, :-1])
    for h in hooks:
        h.remove()
    return {i: tuple(torch.cat([p[j] for p in parts]) for j in range(3)) for i, parts in rec.items()}  # type: ignore[misc]


def expert_out(experts: Any, e: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        g, u = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, -1)
        return torch.nn.functional.linear(experts.act_fn(g) * u, experts.down_proj[e])


def fit(model: Any, data: dict, ranks: list[int], min_tokens: int = 200) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """Rank-r maps per (layer, expert) for each rank, fitted on 80% of the tokens, and the held-out
    weighted error of each estimate relative to no compensation."""
    maps: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {r: {} for r in ranks}
    err = {key: 0.0 for key in ["none", "mean", *(f"r{r}" for r in ranks), "r0"]}
    for i, (hs, ids, ws) in data.items():
        experts = model.model.layers[i].mlp.experts
        num_experts, hid = experts.gate_up_proj.shape[0], hs.shape[1]
        for r in ranks:
            maps[r][i] = (
                torch.zeros(num_experts, hid, device=hs.device),
                torch.zeros(num_experts, hid, r, device=hs.device),
                torch.zeros(num_experts, r, hid, device=hs.device),
            )
        k = ids.shape[1]
        for e in range(num_experts):
            tok, slot = torch.where((ids == e) & (torch.arange(k, device=ids.device) >= 1))
            n = tok.numel()
            if n < min_tokens:
                continue
            x, w2 = hs[tok], ws[tok, slot] ** 2
            y = expert_out(experts, e, x)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(e)).to(x.device)
            for part, rows in (("fit", perm[: int(0.8 * n)]), ("held", perm[int(0.8 * n) :]), ("all", perm)):
                sw = w2[rows] / w2[rows].sum()
                xm, ym = (sw[:, None] * x[rows]).sum(0), (sw[:, None] * y[rows]).sum(0)
                xw, yw = (x[rows] - xm) * sw[:, None].sqrt(), (y[rows] - ym) * sw[:, None].sqrt()
                lam = 1e-2 * xw.pow(2).sum(0).mean()
                full = torch.linalg.solve(
                    xw.T @ xw + lam * torch.eye(hid, device=x.device), xw.T @ yw
                )  # (H, H)
                _, _, vh = torch.linalg.svd(xw @ full, full_matrices=False)
                if part == "fit":
                    held = perm[int(0.8 * n) :]
                    xt, yt, wt = x[held] - xm, y[held], w2[held]

                    def e2(pred: torch.Tensor, yt=yt, wt=wt) -> float:  # type: ignore[no-untyped-def]
                        return float((wt[:, None] * (yt - pred) ** 2).sum())

                    err["none"] += e2(torch.zeros_like(yt))
                    err["mean"] += e2(ym.expand_as(yt))
                    err["r0"] += e2(ym + xt @ full)
                    for r in ranks:
                        err[f"r{r}"] += e2(ym + xt @ full @ vh[:r].T @ vh[:r])
                elif part == "all":  # the maps the perplexity measurement uses: fitted on every token
                    for r in ranks:
                        maps[r][i][0][e], maps[r][i][1][e], maps[r][i][2][e] = xm, full @ vh[:r].T, vh[:r]
    return maps, {key: v / err["none"] for key, v in err.items()}


def run_model(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    model, tokenizer = load_checkpoint(str(path))
    model.to(args.device)
    policy = dmr.load_policy(path / "allocators" / "learned-q35.json")
    docs = (r["text"] for r in read_jsonl(data_file("gutenberg/train.jsonl.xz")))
    train = allocator_windows(tokenizer, docs, "train", max_windows=args.train_windows).to(args.device)
    maps, explained = fit(model, collect(model, train), args.ranks)
    print(f"{path.name}: held-out error relative to none {explained}", flush=True)
    test = {
        c: windows_of(corpus_ids(tokenizer, rel, args.tokens)).to(args.device) for c, rel in CORPORA.items()
    }
    native = {c: window_nll(model, dmr.StaticTopK(), w, 16)[0] for c, w in test.items()}
    LOWRANK.clear()
    base = {c: window_nll(model, policy, w, 16) for c, w in test.items()}
    rows = [
        {
            "rank": 0,
            **{
                c: {"reduction": red, "ppl_change": paired(native[c], nll)[0]}
                for c, (nll, red) in base.items()
            },
        }
    ]
    for r in args.ranks:
        LOWRANK.clear()
        LOWRANK.update(maps[r])
        row: dict[str, Any] = {"rank": r, "flops_per_dropped_slot": 4 * model.config.hidden_size * r}
        for c, w in test.items():
            nll, red = window_nll(model, policy, w, 16)
            d, se = paired(base[c][0], nll)
            row[c] = {"reduction": red, "ppl_change": paired(native[c], nll)[0], "vs_means_only": d, "se": se}
        rows.append(row)
        print(f"  rank {r}: {row}", flush=True)
    LOWRANK.clear()
    pair_flops = 6 * model.config.hidden_size * model.config.intermediate_size
    return {
        "model": path.name,
        "hidden_size": model.config.hidden_size,
        "flops_per_pair": pair_flops,
        "explained": explained,
        "perplexity": rows,
        "seconds": time.time() - t0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--train-windows", type=int, default=128)
    p.add_argument("--tokens", type=int, default=16384)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    patching.DynamicRouter._compensated = _with_lowrank  # type: ignore[method-assign]
    machine = (
        torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"CPU ({platform.machine()}, {args.threads} threads)"
    )
    models = [run_model(Path(m), args) for m in args.model]
    payload = {
        "kind": "lowrank_comp_probe",
        "script": "benchmarks/lowrank_comp_probe.py",
        "device": machine,
        "args": vars(args),
        "torch": torch.__version__,
        "models": models,
    }
    write_result(payload, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
