"""Compare two ``bench_gpu_batch_aware.py`` runs of different code on one machine (an A/B).

Run from the repository root (no GPU needed)::

    python benchmarks/compare_batch_aware_ab.py benchmarks/diagnostics/batch_aware_ab_h100

The folder holds ``callN_new.json`` and ``callN_old.json`` pairs, each pair from one device call
(one machine). Per call it checks that both runs kept the same pairs and touched the same experts
in every cell, and prints the new/old ratio of the routing time: the trimming policies
(``batch_aware_<f>``, the code that changed), and as controls native softmax + top-k and the
``reroute`` policies (code that did not change).

``benchmarks/diagnostics/batch_aware_ab_h100`` holds the A/B of the ``BatchAware`` trimming
rewrite (2026-12-07, two device calls on H100s): the same benchmark script, with ``src/`` at
f0734a3 (old, from a scratch copy) and at main (new: ed7a51a's policies), new then old in call 1,
old then new in call 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _cells(path: Path) -> dict[tuple[str, int, str], dict[str, Any]]:
    return {(c["shape"], c["tokens"], c["policy"]): c for c in json.loads(path.read_text())["cells"]}


def compare(new: Path, old: Path) -> dict[str, Any]:
    """Same-routing check and routing-time ratios (new / old) of one call's pair of runs."""
    a, b = _cells(new), _cells(old)
    if a.keys() != b.keys():
        raise SystemExit(f"{new} and {old} do not hold the same cells")
    same = all(
        a[k]["pair_ratio"] == b[k]["pair_ratio"] and a[k]["distinct_experts"] == b[k]["distinct_experts"]
        for k in a
    )

    def ratios(pick, field: str = "route_ms") -> list[float]:  # type: ignore[no-untyped-def]
        return [a[k][field] / b[k][field] for k in a if pick(k[2])]

    trim = ratios(lambda p: p.startswith("batch_aware_") and "reroute" not in p)
    control = ratios(lambda p: p == "static", "native_route_ms") + ratios(lambda p: "reroute" in p)
    new_ms = [a[k]["route_ms"] for k in a if k[2].startswith("batch_aware_") and "reroute" not in k[2]]
    return {
        "cells": len(a),
        "same_pairs_and_experts": same,
        "trim_ratio": {"median": statistics.median(trim), "min": min(trim), "max": max(trim)},
        "trim_new_ms": {"min": min(new_ms), "max": max(new_ms)},
        "control_ratio": {"min": min(control), "max": max(control)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    calls = sorted(p.name.split("_")[0] for p in args.folder.glob("call*_new.json"))
    if not calls:
        raise SystemExit(f"no callN_new.json files in {args.folder}")
    for call in calls:
        result = compare(args.folder / f"{call}_new.json", args.folder / f"{call}_old.json")
        print(call, json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
