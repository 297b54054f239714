"""CPU benchmark of one dynamic MoE layer across frameworks: static top-k vs a dynamic top-p.

For the scaled-down shapes of ``benchmarks/bench_cpu_experts.py`` (same router-logit model, same
calibrated entropy, the same ``TopP.p`` search for about 30% fewer (token, expert) pairs) it times,
in fp32, one layer = routing (from the router probabilities) + experts, per framework:

* every framework: ``static`` (``StaticTopK()``) and ``dynamic`` (``TopP(p)``) with the
  framework's default experts forward; in JAX both are ``jax.jit``-compiled with static shapes, so
  the pair buffer has ``T * k_max`` rows;
* JAX also: ``dynamic_compact`` (the buffer compacted to exactly the kept pairs, a size read on the
  host and compiled in), and the ``jax.lax.ragged_dot`` implementation on the full buffer
  (``ragged_static``, ``ragged_dynamic``) and compacted (``ragged_dynamic_compact``), to show what
  XLA computes for it on CPU. ``ragged_dot`` is lowered on CPU to a dense masked dot over all ``E``
  groups, so its cells are skipped above ``--ragged-gflop-limit`` (estimated work per call).

Frameworks are entries of :data:`RUNNERS` (name -> runner); a runner receives a :class:`Cell`
(numpy inputs and the torch reference outputs) and returns its timings and correctness checks.
Timing reuses ``bench_cpu_experts.time_variants`` (warm-up calls, then interleaved rounds;
median, p25/p75 and an approximate 95% CI of the median).

Results go to ``benchmarks/results/frameworks_cpu.json`` (``"kind": "frameworks_cpu"``);
``python benchmarks/gen_benchmarks_md.py`` renders them.

Usage::

    python benchmarks/bench_frameworks_cpu.py             # shapes x tokens 16 128 512 (a few minutes)
    python benchmarks/bench_frameworks_cpu.py --quick     # tokens 16 128, shorter timing
    python benchmarks/bench_frameworks_cpu.py --frameworks jax
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_cpu_experts as base  # noqa: E402
import dynamic_moe_router as dmr  # noqa: E402
from dynamic_moe_router.experts import experts_forward  # noqa: E402

DEFAULT_OUT = HERE / "results" / "frameworks_cpu.json"
SCHEMA_VERSION = 1
TOKENS_FULL = (16, 128, 512)
TOKENS_QUICK = (16, 128)


@dataclass(frozen=True)
class Cell:
    """One (shape, token count): inputs and torch reference outputs, all numpy float32."""

    shape: dict[str, Any]
    tokens: int
    hidden: np.ndarray  # (T, H)
    probs: np.ndarray  # (T, E) router softmax
    gate_up: np.ndarray  # (E, 2I, H)
    down: np.ndarray  # (E, H, I)
    top_p: float
    pairs_static: int
    pairs_dynamic: int
    ref_static: np.ndarray  # (T, H) torch output, static routing
    ref_dynamic: np.ndarray  # (T, H) torch output, dynamic routing
    args: argparse.Namespace

    @property
    def native_k(self) -> int:
        return int(self.shape["k"])


Runner = Callable[[Cell], dict[str, Any]]


def _time(fns: dict[str, Callable[[], Any]], cell: Cell) -> dict[str, dict[str, float]]:
    a = cell.args
    return base.time_variants(
        fns,
        warmup=a.warmup,
        budget_s=a.cell_budget,
        min_rounds=a.min_rounds,
        max_rounds=200,
        max_s=a.max_cell_s,
    )


def _max_diff(out: Any, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(out, dtype=np.float32) - ref).max()) if ref.size else 0.0


class _Experts(torch.nn.Module):
    def __init__(self, gate_up: np.ndarray, down: np.ndarray) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.from_numpy(gate_up), requires_grad=False)
        self.down_proj = torch.nn.Parameter(torch.from_numpy(down), requires_grad=False)
        self.act_fn = torch.nn.SiLU()


def torch_layer(cell: Cell, policy: dmr.RoutingPolicy, backend: str = "auto") -> Callable[[], torch.Tensor]:
    experts = _Experts(cell.gate_up, cell.down)
    probs, hidden = torch.from_numpy(cell.probs), torch.from_numpy(cell.hidden)

    def call() -> torch.Tensor:
        with torch.no_grad():
            r = dmr.route(probs, policy, native_k=cell.native_k, normalize="sum")
            return experts_forward(experts, hidden, r.ids, r.weights, backend=backend)

    return call


# -- runners -----------------------------------------------------------------------------------------
def run_torch(cell: Cell) -> dict[str, Any]:
    """PyTorch: ``dmr.route`` + ``experts_forward(backend="auto")`` (eager)."""
    fns = {
        "static": torch_layer(cell, dmr.StaticTopK()),
        "dynamic": torch_layer(cell, dmr.TopP(p=cell.top_p)),
    }
    check = {
        "max_abs_diff_static": _max_diff(fns["static"](), cell.ref_static),
        "max_abs_diff_dynamic": _max_diff(fns["dynamic"](), cell.ref_dynamic),
    }
    return {"timings": _time(fns, cell), "check": check, "notes": ["eager PyTorch, torch.set_num_threads(2)"]}


def run_jax(cell: Cell) -> dict[str, Any]:
    """JAX: ``dynamic_moe_router.jax.route`` + ``moe_forward``, jit-compiled."""
    import jax
    import jax.numpy as jnp

    from dynamic_moe_router import jax as djax

    hidden, probs = jnp.asarray(cell.hidden), jnp.asarray(cell.probs)
    gate_up, down = jnp.asarray(cell.gate_up), jnp.asarray(cell.down)
    shape = cell.shape

    def layer(policy: dmr.RoutingPolicy, impl: str, rows: int | None) -> Callable[[], Any]:
        @jax.jit
        def f(hidden, probs, gate_up, down):  # type: ignore[no-untyped-def]
            r = djax.route(probs, policy, native_k=cell.native_k, normalize="sum", validate=False)
            return djax.moe_forward(hidden, r.ids, r.weights, gate_up, down, backend=impl, rows=rows)

        return lambda: f(hidden, probs, gate_up, down).block_until_ready()

    static, dynamic = dmr.StaticTopK(), dmr.TopP(p=cell.top_p)
    fns: dict[str, Callable[[], Any]] = {
        "static": layer(static, "blocked", None),
        "dynamic": layer(dynamic, "blocked", None),
        "dynamic_compact": layer(dynamic, "blocked", cell.pairs_dynamic),
    }
    full_rows = cell.tokens * cell.native_k
    ragged_gflop = 6 * full_rows * shape["E"] * shape["H"] * shape["I"] / 1e9  # dense-lowered on CPU
    notes = [
        "jax.jit, XLA CPU; blocked = moe_forward(backend='blocked', block=None: 16..64); "
        f"ragged_dot over the full buffer ~ {ragged_gflop:.1f} GFLOP per call (dense over all E groups)"
    ]
    if ragged_gflop <= cell.args.ragged_gflop_limit:
        fns["ragged_static"] = layer(static, "ragged_dot", None)
        fns["ragged_dynamic"] = layer(dynamic, "ragged_dot", None)
        fns["ragged_dynamic_compact"] = layer(dynamic, "ragged_dot", cell.pairs_dynamic)
    else:
        notes.append(f"ragged_dot variants skipped: {ragged_gflop:.1f} > --ragged-gflop-limit")
    compile_s = {}
    check = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out = fn()
        compile_s[name] = time.perf_counter() - t0
        ref = cell.ref_static if "static" in name else cell.ref_dynamic
        check[f"max_abs_diff_{name}"] = _max_diff(out, ref)
    return {"timings": _time(fns, cell), "check": check, "compile_s": compile_s, "notes": notes}


def _keras_child(in_path: str, out_path: str) -> None:
    """Keras side of :func:`run_keras` (runs in a fresh interpreter with ``KERAS_BACKEND`` set)."""
    import json

    import keras

    from dynamic_moe_router import keras as dk

    z = np.load(in_path)
    opts = json.loads(str(z["opts"]))
    native_k = opts["native_k"]
    backend = keras.backend.backend()
    hidden, probs = keras.ops.convert_to_tensor(z["hidden"]), keras.ops.convert_to_tensor(z["probs"])
    bank = dk.SwiGLUBank(
        gate_up=keras.ops.convert_to_tensor(z["gate_up"]),
        down=keras.ops.convert_to_tensor(z["down"]),
        transposed=True,
    )

    def layer_fn(policy: dmr.RoutingPolicy, method: str) -> Callable[[Any, Any], Any]:
        def f(hidden: Any, probs: Any) -> Any:
            r = dk.route(probs, policy, native_k=native_k, normalize="sum", validate=False)
            return dk.experts_forward(hidden, r.ids, r.weights, bank, backend=method)

        return f

    def block(out: Any) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(out))

    static, dynamic = dmr.StaticTopK(), dmr.TopP(p=opts["top_p"])
    variants: dict[str, Callable[[Any, Any], Any]] = {
        "static": layer_fn(static, "auto"),
        "dynamic": layer_fn(dynamic, "auto"),
        "dense": layer_fn(static, "dense"),
    }
    if backend == "tensorflow":
        import tensorflow as tf

        variants["static_graph"] = tf.function(layer_fn(static, "segments"))
        variants["dynamic_graph"] = tf.function(layer_fn(dynamic, "segments"))
    elif backend == "jax":
        import jax

        variants["static_jit"] = jax.jit(layer_fn(static, "ragged_dot"))
        variants["dynamic_jit"] = jax.jit(layer_fn(dynamic, "ragged_dot"))
    fns = {name: (lambda f=f: block(f(hidden, probs))) for name, f in variants.items()}
    check, compile_s = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out = fn()
        compile_s[name] = time.perf_counter() - t0
        ref = z["ref_static"] if name.startswith(("static", "dense")) else z["ref_dynamic"]
        check[f"max_abs_diff_{name}"] = _max_diff(out, ref)
    timings = base.time_variants(
        fns,
        warmup=opts["warmup"],
        budget_s=opts["budget_s"],
        min_rounds=opts["min_rounds"],
        max_rounds=200,
        max_s=opts["max_s"],
    )
    notes = [
        f"Keras {keras.__version__} on {backend}: static/dynamic eager (method 'sorted': kept pairs only); "
        "dense = every expert on every token (the keras-hub computation); "
        + ("*_graph = tf.function, method 'segments'" if backend == "tensorflow" else "")
        + (
            "*_jit = jax.jit, method 'ragged_dot' (dense over all E groups on XLA:CPU)"
            if backend == "jax"
            else ""
        )
    ]
    result = {"timings": timings, "check": check, "compile_s": compile_s, "notes": notes}
    Path(out_path).write_text(json.dumps(result))


def run_keras(cell: Cell, backend: str) -> dict[str, Any]:
    """Keras 3 on ``backend``: ``dynamic_moe_router.keras.route`` + ``experts_forward``.

    Keras fixes its backend at import, so the cell runs in a fresh interpreter (``KERAS_BACKEND``).
    """
    import importlib.util
    import json
    import os
    import subprocess
    import tempfile

    if importlib.util.find_spec("keras") is None or importlib.util.find_spec(backend) is None:
        raise ImportError(f"keras or {backend} is not installed (pip install 'dynamic-moe-router-kit[tf]')")
    a = cell.args
    opts = {
        "native_k": cell.native_k,
        "top_p": cell.top_p,
        "warmup": a.warmup,
        "budget_s": a.cell_budget,
        "min_rounds": a.min_rounds,
        "max_s": a.max_cell_s,
    }
    with tempfile.TemporaryDirectory() as tmp:
        in_path, out_path = os.path.join(tmp, "cell.npz"), os.path.join(tmp, "result.json")
        np.savez(
            in_path,
            hidden=cell.hidden,
            probs=cell.probs,
            gate_up=cell.gate_up,
            down=cell.down,
            ref_static=cell.ref_static,
            ref_dynamic=cell.ref_dynamic,
            opts=np.array(json.dumps(opts)),
        )
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); "
            "import bench_frameworks_cpu as b; b._keras_child(*sys.argv[1:])"
        )
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        proc = subprocess.run(
            [sys.executable, "-c", code, in_path, out_path],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"keras/{backend} runner failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(out_path).read_text())


CHILD_NOTE = "not measured: the runner times in a child process, which the CPU snapshot counts as another"

#: Framework name -> runner.
RUNNERS: dict[str, Runner] = {
    "torch": run_torch,
    "jax": run_jax,
    "keras_tf": lambda cell: run_keras(cell, "tensorflow"),
    "keras_jax": lambda cell: run_keras(cell, "jax"),
}


# -- cells -------------------------------------------------------------------------------------------
def make_cell(
    shape: dict[str, Any], tokens: int, sigma: float, weights: tuple, args: argparse.Namespace
) -> Cell:
    num_experts, k = shape["E"], shape["k"]
    seed = args.seed * 1_000_003 + tokens * 131 + num_experts
    probs = torch.softmax(base.draw_logits(tokens, num_experts, sigma, seed), dim=-1)
    hidden = torch.randn(tokens, shape["H"], generator=torch.Generator().manual_seed(seed + 7))
    p = base.search_top_p(probs, k, args.target_pair_ratio)
    gate_up, down = weights
    partial = Cell(
        shape, tokens, hidden.numpy(), probs.numpy(), gate_up, down, p, 0, 0, np.empty(0), np.empty(0), args
    )
    pairs = [dmr.route(probs, pol, native_k=k).kept_pairs() for pol in (dmr.StaticTopK(), dmr.TopP(p=p))]
    ref_static = torch_layer(partial, dmr.StaticTopK(), "loop")().numpy()
    ref_dynamic = torch_layer(partial, dmr.TopP(p=p), "loop")().numpy()
    return Cell(
        shape,
        tokens,
        hidden.numpy(),
        probs.numpy(),
        gate_up,
        down,
        p,
        pairs[0],
        pairs[1],
        ref_static,
        ref_dynamic,
        args,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tokens 16 128 and shorter timing")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default: {DEFAULT_OUT})")
    ap.add_argument("--tokens", type=int, nargs="+", help="token counts (default: 16 128 512)")
    ap.add_argument("--shapes", nargs="+", choices=[s["name"] for s in base.SHAPES], help="subset of shapes")
    ap.add_argument("--frameworks", nargs="+", help=f"subset of {sorted(RUNNERS)} (default: all that import)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--entropy", type=float, default=0.75, help="target mean normalised router entropy")
    ap.add_argument("--target-pair-ratio", type=float, default=0.70, help="dynamic pairs / static pairs")
    ap.add_argument("--ragged-gflop-limit", type=float, default=16.0, help="skip ragged_dot above this")
    ap.add_argument("--cell-budget", type=float, help="seconds of timed rounds per cell and framework")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-rounds", type=int, default=5)
    ap.add_argument("--max-cell-s", type=float, help="stop a cell's rounds after this many s (min 3 rounds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet-threshold", type=float, default=0.3, help="others' cores counted as quiet")
    ap.add_argument("--wait-per-cell", type=float, default=20.0, help="most s to wait for quiet per runner")
    ap.add_argument("--wait-budget", type=float, default=300.0, help="total s to wait for quiet")
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = list(TOKENS_QUICK if args.quick else TOKENS_FULL)
    if args.cell_budget is None:
        args.cell_budget = 1.5 if args.quick else 4.0
    if args.max_cell_s is None:
        args.max_cell_s = 4.0 if args.quick else 12.0
    return args


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("torch", "numpy", "jax", "jaxlib", "flax", "keras", "tensorflow-cpu", "tensorflow"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.frameworks or list(RUNNERS)
    unknown = sorted(set(names) - set(RUNNERS))
    if unknown:
        raise SystemExit(f"unknown frameworks {unknown}; known: {sorted(RUNNERS)}")
    shapes = [s for s in base.SHAPES if not args.shapes or s["name"] in args.shapes]
    cells: list[dict[str, Any]] = []
    started = time.perf_counter()
    waiter = base.QuietWaiter(args.quiet_threshold, args.wait_budget)
    for si, shape in enumerate(shapes):
        sigma = base.calibrate_sigma(shape["E"], args.entropy, seed=args.seed + 17 * si)
        gen = torch.Generator().manual_seed(args.seed + si)
        e, h, i = shape["E"], shape["H"], shape["I"]
        weights = (
            (torch.randn(e, 2 * i, h, generator=gen) * 0.02).numpy(),
            (torch.randn(e, h, i, generator=gen) * 0.02).numpy(),
        )
        for tokens in args.tokens:
            cell = make_cell(shape, tokens, sigma, weights, args)
            row: dict[str, Any] = {
                "shape": shape["name"],
                "tokens": tokens,
                "E": e,
                "k": shape["k"],
                "H": h,
                "I": i,
                "top_p": cell.top_p,
                "pairs_static": cell.pairs_static,
                "pairs_dynamic": cell.pairs_dynamic,
                "pair_ratio": cell.pairs_dynamic / cell.pairs_static,
                "output_max_abs": float(np.abs(cell.ref_static).max()),
                "frameworks": {},
            }
            for name in names:
                waited, load_before = waiter.wait(args.wait_per_cell)  # a shared machine: wait for quiet
                t0 = time.perf_counter()
                snap = base._cpu_snapshot()
                try:
                    result = RUNNERS[name](cell)
                except (ImportError, dmr.MissingDependencyError) as err:
                    result = {"skipped": f"{type(err).__name__}: {err}"}
                if name.startswith("keras_"):  # timed in a child process, which /proc/stat counts as "other"
                    result["others_cores"] = None
                    result["others_cores_note"] = CHILD_NOTE
                else:
                    result["others_cores"] = base.others_cores(snap)  # CPU other processes used meanwhile
                result["waited_s"], result["others_cores_before"] = waited, load_before
                result["ms"] = {v: t["median_s"] * 1e3 for v, t in result.get("timings", {}).items()}
                row["frameworks"][name] = result
                ms = result["ms"]
                summary = " ".join(f"{v} {m:.2f}" for v, m in ms.items()) or result.get("skipped", "")
                print(
                    f"{shape['name']:>13} T={tokens:<4} pairs {row['pair_ratio']:.3f} {name}: {summary} ms "
                    f"[{time.perf_counter() - t0:.1f}s]",
                    flush=True,
                )
            cells.append(row)
    result = {
        "kind": "frameworks_cpu",
        "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": "python benchmarks/bench_frameworks_cpu.py" + (" --quick" if args.quick else ""),
        "machine": base.machine_info(args.threads),
        "versions": _versions(),
        "config": {
            "entropy": args.entropy,
            "target_pair_ratio": args.target_pair_ratio,
            "ragged_gflop_limit": args.ragged_gflop_limit,
            "threads": args.threads,
            "cell_budget_s": args.cell_budget,
            "warmup": args.warmup,
            "frameworks": names,
        },
        "cells": cells,
        "elapsed_s": time.perf_counter() - started,
    }
    base.write_result(result, args.out, indent=2, suffix=f" ({result['elapsed_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
