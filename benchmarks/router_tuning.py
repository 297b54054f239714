"""Router tuning, evaluated (issue 10, item 4): does fine-tuning the router's gate weights move the frontier?

Research script, not library code. It reuses ``learned_eval.py`` (windows, baselines, paired bootstrap,
equal-FLOP interpolation) and the library's trainer (``dmr.train_allocator``); the one thing the library
lacks, trainable router weights, is added here by monkeypatching (see ``train_joint``), never by editing
the library. The parts, per reference model:

* ``frozen``: the learned allocator as ``learned_eval.py`` trains it (target, compensation, steps, seed);
  the paired baseline of the next part (same seed, steps, batches and mask noise);
* ``joint`` (a): the same training with each MoE layer's gate weight trainable too (initialised from
  the model's, Adam at ``--router-lr``); the teacher is always the original model;
* ``static_tuned`` (b): static per-layer k (valid-chosen) with compensation, the router tuned for that
  fixed allocation alone (KL to native, no budget term: the allocation fixes the FLOPs);
* ``topp`` (b): TopP, ``p`` bisected on valid to the target, with the original router and with the
  router tuned in (a): do router-score policies get sharper scores?
* ``tuned_native``: the tuned routers with native top-k (what the tuning alone does to the model).

Tuned gate weights never overwrite the model's: ``GateSwap`` swaps each router's ``weight`` Parameter
object for a tuned one and puts the original object back (its storage is never written). At the end
every parameter of the model is compared with a copy taken after loading (``torch.equal``), and the
router Parameter objects with the originals (``is``): recorded as ``restored_bit_exact``.

Text and protocol are those of ``learned_eval.py``: train on Gutenberg train windows (8 per book, 800),
fit budgets on Gutenberg valid (2 per book), report on the first ``--tokens`` tokens of Gutenberg test
and WikiText-2 test, paired bootstrap SE over windows vs native and vs the static frontier.

Run (the recorded result: ``benchmarks/results/router_tuning.json``; see ROUTER_TUNING_NOTES.md)::

    python benchmarks/router_tuning.py --device cuda --model models/ref-olmoe --out /tmp/olmoe.json
    python benchmarks/router_tuning.py --merge /tmp/olmoe.json /tmp/mixtral.json \
        --out benchmarks/results/router_tuning.json
    # CPU smoke run
    python benchmarks/router_tuning.py --model models/ref-olmoe --tokens 1024 --steps 2 --router-steps 2 \\
        --train-windows 16 --budget-windows 8 --offset-iterations 3 --out /tmp/rt.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.data import data_file, read_jsonl
from dynamic_moe_router.eval import load_checkpoint
from dynamic_moe_router.hf.layers import find_moe_layers, model_family
from dynamic_moe_router.learn import allocator_windows, expert_means, fit_budget, measure_reduction
from dynamic_moe_router.learn import trainer as trainer_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learned_eval import CORPORA, TARGETS, compare, paired, ppl_of, run_models, static_path, window_nll
from oracle import corpus_ids, windows_of

#: the training record's entries kept in the output
RECORD_KEYS = ("train_seconds", "total_seconds", "history", "final_lambda", "budget_reduction", "offset")


class GateSwap:
    """Swap the ``weight`` Parameter object of every MoE router for another one, and back.

    The original Parameters are kept as objects and never written, so restoring is bit-exact by
    construction (checked at the end of the run anyway)."""

    def __init__(self, layers: list[Any]) -> None:
        self.routers = [layer.router for layer in layers]
        self.original = [r._parameters["weight"] for r in self.routers]

    def fresh(self) -> list[torch.nn.Parameter]:
        """Trainable copies of the original gate weights (fp32 masters when the model is lower)."""
        return [torch.nn.Parameter(p.detach().clone()) for p in self.original]

    def use(self, weights: list[torch.Tensor]) -> None:
        for r, w, o in zip(self.routers, weights, self.original, strict=True):
            assert w.shape == o.shape and w.dtype == o.dtype and w.device == o.device
            r._parameters["weight"] = (
                w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w, requires_grad=False)
            )

    def restore(self) -> None:
        for r, o in zip(self.routers, self.original, strict=True):
            r._parameters["weight"] = o

    @contextlib.contextmanager
    def applied(self, weights: list[torch.Tensor] | None):  # type: ignore[no-untyped-def]
        if weights is None:
            yield
            return
        self.use(weights)
        try:
            yield
        finally:
            self.restore()


def train_joint(
    model: Any, train: torch.Tensor, budget: torch.Tensor, cfg: dmr.AllocatorTraining, swap: GateSwap,
    router_lr: float,
) -> tuple[dmr.LearnedAllocator, list[torch.Tensor]]:  # fmt: skip
    """``dmr.train_allocator`` with the gate weights trainable too (two monkeypatches, the hook the
    library would need):

    * the heads' ``native`` flag, which the trainer sets before the teacher pass (True) and the student
      pass (False), swaps the original gate weights in for the teacher and the tuned ones for the
      student (the trainer froze the model's own parameters; the tuned copies are not among them);
    * ``torch.optim.Adam`` gets the tuned gate weights as a second parameter group (``router_lr``).

    The offset is fitted (inside ``train_allocator``) with the tuned gates in place. Returns the
    allocator and the tuned gate weights (detached copies); the model's own gates are back in place.
    """
    tuned = swap.fresh()

    class JointHeads(trainer_mod._TrainableHeads):
        _armed = False  # the trainer lists and freezes the model's parameters after building the heads

        @property
        def native(self) -> bool:
            return self._native

        @native.setter
        def native(self, value: bool) -> None:
            self._native = value
            if value:
                self._armed = True
                swap.restore()  # the teacher: the original model
            elif self._armed:
                swap.use(tuned)  # the student: tuned gates (left in place for fit_budget)

    real_adam = torch.optim.Adam

    def adam(params: Any, lr: float) -> torch.optim.Optimizer:
        return real_adam([{"params": list(params), "lr": lr}, {"params": tuned, "lr": router_lr}])

    try:
        with (
            mock.patch.object(trainer_mod, "_TrainableHeads", JointHeads),
            mock.patch.object(torch.optim, "Adam", adam),
        ):
            pol = dmr.train_allocator(model, train, budget, cfg)
    finally:
        swap.restore()
    return pol, [t.detach().clone() for t in tuned]


def tune_router_fixed(
    model: Any, policy: Any, train: torch.Tensor, swap: GateSwap, *, steps: int, batch_windows: int,
    lr: float, seed: int,
) -> tuple[list[torch.Tensor], list[dict[str, float]], float]:  # fmt: skip
    """Tune only the gate weights for a fixed (training-free) ``policy``: KL(native || patched), the
    teacher being the unpatched original model. Same batch order as the trainer's (seeded)."""
    tuned = swap.fresh()
    root = model
    params = list(root.parameters())
    flags = [p.requires_grad for p in params]
    was_training = root.training
    opt = torch.optim.Adam(tuned, lr=lr)
    order = torch.Generator().manual_seed(seed)
    device = next(root.parameters()).device
    history = []
    t0 = time.perf_counter()
    try:
        for p in params:
            p.requires_grad_(False)
        root.eval()
        for step in range(steps):
            pick = torch.randint(0, len(train), (batch_windows,), generator=order)
            batch = train[pick].to(device)
            swap.restore()
            with torch.no_grad():
                teacher = torch.log_softmax(model(batch[:, :-1]).logits.float(), -1)
            with swap.applied(tuned), dmr.patched(model, policy, validate=False):
                student = torch.log_softmax(model(batch[:, :-1]).logits.float(), -1)
            kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
            opt.zero_grad()
            kl.backward()
            opt.step()
            if step % 10 == 0 or step == steps - 1:
                history.append({"step": step, "kl": float(kl.detach())})
    finally:
        swap.restore()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        root.train(was_training)
    return [t.detach().clone() for t in tuned], history, time.perf_counter() - t0


def fit_topp(model: Any, budget: torch.Tensor, target: float, iterations: int) -> tuple[float, float]:
    """Bisect TopP's ``p`` on the budget windows: the least reduction probed that reaches the target
    (the largest one when none does), as ``fit_budget`` does for the allocator's offset."""
    lo, hi = 0.0, 1.0  # larger p keeps more
    best: tuple[float, float] | None = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        red = measure_reduction(model, dmr.TopP(p=mid), budget)
        reaches, best_reaches = red >= target, best is not None and best[1] >= target
        if (
            best is None
            or (reaches and (not best_reaches or red < best[1]))
            or (not best_reaches and red > best[1])
        ):
            best = (mid, red)
        if red > target:
            lo = mid
        else:
            hi = mid
    assert best is not None
    return best


def run_model(path: Path, args: argparse.Namespace, log, checkpoint) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    t_model = time.time()
    model, tokenizer = load_checkpoint(str(path))
    device = torch.device(args.device)
    model.to(device)
    model.eval()
    layers = find_moe_layers(model, model_family(model))[0]
    native_k = layers[0].native_k
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    swap = GateSwap(layers)
    test = {
        name: windows_of(corpus_ids(tokenizer, rel, args.tokens)).to(device) for name, rel in CORPORA.items()
    }
    valid_docs = [r["text"] for r in read_jsonl(data_file("gutenberg/valid.jsonl"))]
    budget = allocator_windows(tokenizer, valid_docs, "budget", max_windows=args.budget_windows).to(device)
    train_docs = (r["text"] for r in read_jsonl(data_file("gutenberg/train.jsonl.xz")))
    train = allocator_windows(tokenizer, train_docs, "train", max_windows=args.train_windows).to(device)
    native = {n: window_nll(model, dmr.StaticTopK(), w, args.batch)[0] for n, w in test.items()}
    native_valid = window_nll(model, dmr.StaticTopK(), budget, args.batch)[0]
    log(f"{path.name}: native ppl " + ", ".join(f"{n} {ppl_of(v):.3f}" for n, v in native.items()))
    means = expert_means(model, train[: args.means_windows])
    out: dict[str, Any] = {
        "model": path.name,
        "native_k": native_k,
        "num_experts": layers[0].num_experts,
        "moe_layers": len(layers),
        "gate_shape": list(swap.original[0].shape),
        "gate_dtype": str(swap.original[0].dtype),
        "native_ppl": {n: ppl_of(v) for n, v in native.items()},
        "native_valid_ppl": ppl_of(native_valid),
        "native_nll_per_window": {n: [round(float(x), 5) for x in v] for n, v in native.items()},
        "test_tokens": {n: int(w[:, :-1].numel()) for n, w in test.items()},
        "budget_windows": int(budget.shape[0]),
        "train_windows": int(train.shape[0]),
        "static": [],
        "learned": [],  # every non-static point (the name is what learned_eval.compare reads)
        "training": {},
    }

    def evaluate(policy: Any, gates: list[torch.Tensor] | None) -> tuple[dict[str, Any], dict[str, float]]:
        res = {}
        with swap.applied(gates):
            for name, w in test.items():
                nll, red = window_nll(model, policy, w, args.batch)
                change, se = paired(native[name], nll)
                res[name] = {
                    "reduction": red,
                    "ppl": ppl_of(nll),
                    "ppl_change": change,
                    "ppl_change_se": se,
                    "nll_per_window": [round(float(x), 5) for x in nll],
                }
            vnll, vred = window_nll(model, policy, budget, args.batch)
        return res, {"reduction": vred, "ppl_change": paired(native_valid, vnll)[0]}

    def fmt(res: dict[str, Any]) -> str:
        return "; ".join(
            f"{n}: red {r['reduction']:.3f} ppl {r['ppl_change']:+.2%}±{r['ppl_change_se']:.2%}"
            for n, r in res.items()
        )

    def add(tag: str, comp: bool, target: float, policy: Any, gates: Any, **extra: Any) -> dict[str, Any]:
        res, valid = evaluate(policy, gates)
        row = {"tag": tag, "comp": comp, "target": target, "router": "tuned" if gates else "original",
               **extra, "valid_eval": valid, "results": res}  # fmt: skip
        out["learned"].append(row)
        log(f"  {tag:<28} target {target:.0%} comp={comp!s:<5} {fmt(res)}")
        checkpoint(out)
        return row

    # -- static frontier (as learned_eval.py: uniform k and valid-chosen per-layer k) -------------------
    t0 = time.time()
    statics: list[tuple[str, list[int]]] = [
        (f"uniform k={k}", [k] * len(layers)) for k in range(native_k - 1, 0, -1)
    ]
    path_ks = {}
    if not args.no_static or "static_tuned" in args.parts:
        path_ks = static_path(model, budget, native_k, len(layers), args.static_targets, args.batch)
    for target, ks in path_ks.items():
        if ks not in [s[1] for s in statics]:
            statics.append((f"per-layer {ks} (target {target:.0%})", ks))
    for name, ks in [] if args.no_static else statics:
        for comp in (False, True):
            pol = dmr.LearnedAllocator.fixed(model, ks, means=means if comp else None)
            res, valid = evaluate(pol, None)
            out["static"].append({"point": name, "ks": ks, "comp": comp, "valid_eval": valid, "results": res})
    out["static_seconds"] = time.time() - t0
    log(f"  static frontier: {len(out['static'])} points in {out['static_seconds']:.0f} s")
    checkpoint(out)

    cfg = dmr.AllocatorTraining(
        target_reduction=args.target, steps=args.steps, batch_windows=args.batch_windows, lr=args.lr,
        seed=args.seed, compensation=True, means_windows=args.means_windows,
        offset_iterations=args.offset_iterations, noise_final=args.noise_final,
    )  # fmt: skip
    trained: dict[str, tuple[Any, Any]] = {}

    # -- frozen router (the paired baseline) -------------------------------------------------------------
    if "frozen" in args.parts:
        pol = dmr.train_allocator(model, train, budget, cfg)
        rec = dict(pol.record or {})
        out["training"]["frozen"] = {k: rec[k] for k in RECORD_KEYS}
        trained["frozen"] = (pol, None)
        add("frozen", True, args.target, pol, None, valid_reduction=rec["budget_reduction"],
            train_seconds=rec["train_seconds"], sha256=pol.sha256)  # fmt: skip

    # -- (a) joint: heads + gate weights ----------------------------------------------------------------
    for rlr in args.router_lr if "joint" in args.parts else []:
        tag = f"joint rlr={rlr:g}"
        pol, gates = train_joint(model, train, budget, cfg, swap, rlr)
        rec = dict(pol.record or {})
        drift = [
            float((g - o.detach()).norm() / o.detach().norm())
            for g, o in zip(gates, swap.original, strict=True)
        ]
        out["training"][tag] = {k: rec[k] for k in RECORD_KEYS}
        out["training"][tag]["gate_relative_change"] = drift
        trained[tag] = (pol, gates)
        # the artifact round trip: tuned gates saved apart from the model and read back
        if args.artifacts:
            from safetensors.torch import load_file, save_file

            f = Path(args.artifacts) / f"{path.name}-router-rlr{rlr:g}.safetensors"
            f.parent.mkdir(parents=True, exist_ok=True)
            pairs = zip(layers, gates, strict=True)
            named = {f"layers.{layer.index}.gate": g.cpu().contiguous() for layer, g in pairs}
            save_file(named, str(f))
            back = load_file(str(f))
            assert all(torch.equal(back[name], g) for name, g in named.items())
        add(tag, True, args.target, pol, gates, valid_reduction=rec["budget_reduction"],
            train_seconds=rec["train_seconds"], router_lr=rlr, sha256=pol.sha256)  # fmt: skip
        # with the original gates: do the heads alone carry the gain? (offset as fitted with tuned gates)
        add(f"{tag} heads, original gates", True, args.target, pol, None)
        add(f"{tag} gates, native top-k", False, 0.0, dmr.StaticTopK(), gates)

    # -- offsets refit to the other targets (one trained allocator each) --------------------------------
    for tag, (pol, gates) in trained.items():
        for target in args.refit_targets:
            with swap.applied(gates):
                fitted, vred = fit_budget(model, pol, budget, target, iterations=args.offset_iterations)
            add(tag, True, target, fitted, gates, valid_reduction=vred, source="offset refit")

    # -- (b) static per-layer k with the router tuned for it --------------------------------------------
    if "static_tuned" in args.parts:
        for target in args.static_tuned_targets:
            ks = path_ks[target]
            pol = dmr.LearnedAllocator.fixed(model, ks, means=means)
            gates, hist, secs = tune_router_fixed(
                model, pol, train, swap, steps=args.router_steps, batch_windows=args.batch_windows,
                lr=args.router_lr[0], seed=args.seed,
            )  # fmt: skip
            tag = f"static {ks} tuned"
            out["training"][tag] = {"train_seconds": secs, "history": hist, "router_lr": args.router_lr[0],
                                    "steps": args.router_steps}  # fmt: skip
            add(tag, True, target, pol, gates, ks=ks, train_seconds=secs)

    # -- (b) TopP, original gates and the joint-tuned ones ---------------------------------------------
    if "topp" in args.parts:
        variants: list[tuple[str, Any]] = [("topp", None)]
        variants += [(f"topp, gates of {t}", g) for t, (_, g) in trained.items() if g is not None]
        for tag, gates in variants:
            with swap.applied(gates):
                p, vred = fit_topp(model, budget, args.target, args.offset_iterations + 2)
            add(tag, False, args.target, dmr.TopP(p=p), gates, p=p, valid_reduction=vred)

    # -- bit-exact restoration ------------------------------------------------------------------------
    same_objects = all(r._parameters["weight"] is o for r, o in zip(swap.routers, swap.original, strict=True))
    equal = all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    out["restored_bit_exact"] = {"router_objects_are_original": same_objects, "all_parameters_equal": equal,
                                 "parameters_checked": len(snapshot)}  # fmt: skip
    assert same_objects and equal, "the model was changed"
    out["equal_flops"] = compare(out)
    out["pairs"] = pairwise(out)
    out["seconds"] = time.time() - t_model
    log(f"  restored bit-exact: {same_objects and equal}; {out['seconds']:.0f} s")
    return out


def pairwise(model_out: dict[str, Any]) -> list[dict[str, Any]]:
    """Direct paired comparisons on the same windows: each tuned-router point against its original-router
    counterpart (the same target and compensation; the reductions are given, they differ slightly)."""
    rows = []
    by = {(p["tag"], p["target"]): p for p in model_out["learned"]}
    statics = {tuple(s["ks"]): s for s in model_out["static"] if s["comp"]}
    for p in model_out["learned"]:
        if p["tag"].startswith("joint") and "native top-k" not in p["tag"]:
            ref = by.get(("frozen", p["target"]))
        elif p["tag"].startswith("topp") and p["router"] == "tuned":
            ref = by.get(("topp", p["target"]))
        elif p["tag"].startswith("static") and p["router"] == "tuned":
            ref = statics.get(tuple(p["ks"]))
        else:
            ref = None
        if ref is None:
            continue
        for corpus in CORPORA:
            a = torch.tensor(ref["results"][corpus]["nll_per_window"])
            b = torch.tensor(p["results"][corpus]["nll_per_window"])
            d, se = paired(a, b)
            rows.append({
                "tag": p["tag"], "against": ref.get("tag", ref.get("point")), "target": p["target"],
                "corpus": corpus, "reduction": p["results"][corpus]["reduction"],
                "against_reduction": ref["results"][corpus]["reduction"], "ppl_ratio_change": d, "se": se,
                "z": d / se if se > 0 else float("nan"),
            })  # fmt: skip
    return rows


def merge(files: list[str], out: str) -> None:
    """Join result files (partial ones too) of parallel runs: per model, the static frontier of the first
    file that has one, every other point (deduplicated by tag and target), the training records, and
    the comparisons recomputed over the merged rows."""
    merged: dict[str, dict[str, Any]] = {}
    sources = []
    for f in files:
        payload = json.loads(Path(f).read_text())
        sources.append(
            {k: payload.get(k) for k in ("device", "args", "seconds", "partial")} | {"file": Path(f).name}
        )
        for m in payload["models"]:
            cur = merged.setdefault(m["model"], {**m, "static": [], "learned": [], "training": {},
                                                  "restored_bit_exact": []})  # fmt: skip
            if not cur["static"]:
                cur["static"] = m["static"]
            seen = {(p["tag"], p["target"]) for p in cur["learned"]}
            cur["learned"] += [p for p in m["learned"] if (p["tag"], p["target"]) not in seen]
            cur["training"].update(m.get("training", {}))
            cur["restored_bit_exact"].append({"file": Path(f).name, **(m.get("restored_bit_exact") or {})})
    for m in merged.values():
        m.pop("equal_flops", None), m.pop("pairs", None), m.pop("seconds", None)
        m["equal_flops"] = compare(m)
        m["pairs"] = pairwise(m)
    payload = {"script": "benchmarks/router_tuning.py", "merged_from": sources, "torch": torch.__version__,
               "dmr_version": dmr.__version__, "models": list(merged.values())}  # fmt: skip
    Path(out).write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--merge":
        *files, flag, out = argv[1:]
        assert flag == "--out", "usage: router_tuning.py --merge FILE... --out OUT"
        merge(files, out)
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--target", type=float, default=0.35)
    p.add_argument("--refit-targets", type=float, nargs="*", default=[0.30, 0.40])
    p.add_argument("--static-targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--static-tuned-targets", type=float, nargs="*", default=[0.35])
    p.add_argument("--parts", nargs="+", default=["frozen", "joint", "static_tuned", "topp"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--router-steps", type=int, default=200, help="steps of the router-only tuning (b)")
    p.add_argument("--batch-windows", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--router-lr", type=float, nargs="+", default=[1e-3])
    p.add_argument("--noise-final", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-windows", type=int, default=800)
    p.add_argument("--budget-windows", type=int, default=64)
    p.add_argument("--means-windows", type=int, default=64)
    p.add_argument("--offset-iterations", type=int, default=12)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--no-static", action="store_true", help="no static frontier (merged from another run)")
    p.add_argument(
        "--artifacts", help="folder for the tuned gate weights (safetensors), written and read back"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        print(msg, flush=True)

    run_models(args, "benchmarks/router_tuning.py", argv, run_model, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
