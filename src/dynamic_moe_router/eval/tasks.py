"""Zero-shot tasks scored by log-likelihood, with lm-evaluation-harness prompt conventions.

| task | prompt (context / continuation) | metrics |
|---|---|---|
| ``blimp`` | end-of-text / each whole sentence | ``acc``: P(good) > P(bad); also per paradigm |
| ``lambada`` | passage / ``" " + last word`` | ``acc`` (greedy decoding hits the word), ``ppl`` |
| ``hellaswag`` | ``ctx`` / ``" " + ending`` | ``acc``, ``acc_norm`` |
| ``piqa`` | ``"Question: <goal>\\nAnswer:"`` / ``" " + solution`` | ``acc``, ``acc_norm`` |
| ``arc_easy``, ``arc_challenge`` | ``"Question: <q>\\nAnswer:"`` / ``" " + choice`` | ``acc``, ``acc_norm`` |
| ``winogrande`` | sentence up to the blank, filled with each option / ``" " + rest`` | ``acc`` |

``acc`` ranks choices by the summed log-probability of the continuation; ``acc_norm`` divides it by
the choice's length in characters, without the space that joins it to the context
(lm-evaluation-harness's ``acc_norm``: ``len(choice)``, not ``len(" " + choice)``). Standard errors
are the sample standard deviation of the per-item score over ``sqrt(n)``. ``limit`` takes the first
``limit`` items of a file in file order (BLiMP: the first ``limit`` of each of its 67 paradigms).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import data_file, read_jsonl
from ..errors import DataNotFoundError
from .loglik import score_requests
from .stats import mean_se

__all__ = ["TASKS", "Item", "TaskSpec", "evaluate_task", "load_items"]


@dataclass(frozen=True)
class Item:
    """One scored item: its requests, the gold choice and how to score it."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    group: str = ""  # BLiMP paradigm


@dataclass(frozen=True)
class TaskSpec:
    name: str
    file: str
    kind: str  # "choice", "greedy" or "pair"
    build: Callable[[dict[str, Any]], Item]


def _lambada(r: dict[str, Any]) -> Item:
    return Item(((r["context"], " " + r["continuation"]),), 0)


def _hellaswag(r: dict[str, Any]) -> Item:
    return Item(tuple((r["ctx"], " " + e) for e in r["endings"]), r["label"])


def _piqa(r: dict[str, Any]) -> Item:  # the query already ends with "\n"
    return Item(tuple((r["query"] + "Answer:", " " + c) for c in r["choices"]), r["gold"])


def _arc(r: dict[str, Any]) -> Item:
    return Item(tuple((r["query"] + "\nAnswer:", " " + c) for c in r["choices"]), r["gold"])


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "blimp",
            "eval/blimp/blimp.jsonl.xz",
            "pair",
            lambda r: Item((("", r["sentence_good"]), ("", r["sentence_bad"])), 0, r["UID"]),
        ),
        TaskSpec("lambada", "eval/lambada_openai.jsonl", "greedy", _lambada),
        TaskSpec("hellaswag", "eval/hellaswag.jsonl", "choice", _hellaswag),
        TaskSpec("piqa", "eval/piqa.jsonl", "choice", _piqa),
        TaskSpec("arc_easy", "eval/arc_easy.jsonl", "choice", _arc),
        TaskSpec("arc_challenge", "eval/arc_challenge.jsonl", "choice", _arc),
        TaskSpec(
            "winogrande",
            "eval/winogrande.jsonl",
            "choice",
            lambda r: Item(tuple((c, " " + r["continuation"]) for c in r["context_options"]), r["gold"]),
        ),
    )
}  # fmt: skip


#: parsed items per (task, limit, file, modification time, size): BLiMP's 67,000 records are read once
#: per process, not once per evaluated policy
_ITEMS: dict[tuple[str, int | None, str, float, int], list[Item]] = {}


def load_items(name: str, limit: int | None = None) -> tuple[list[Item], str]:
    """The items of task ``name`` (first ``limit``, per paradigm for BLiMP) and the file read.

    Items are frozen; a file is parsed once per process and limit (again when it changes on disk).
    """
    if name not in TASKS:
        raise DataNotFoundError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    path = data_file(TASKS[name].file)
    stat = path.stat()
    key = (name, limit, str(path), stat.st_mtime, stat.st_size)
    if key not in _ITEMS:
        _ITEMS[key] = _read_items(name, limit, path)
    return list(_ITEMS[key]), str(path)


def _read_items(name: str, limit: int | None, path: Path) -> list[Item]:
    spec = TASKS[name]
    items: list[Item] = []
    per_group: dict[str, int] = {}
    for record in read_jsonl(path):
        item = spec.build(record)
        if limit is not None:
            seen = per_group.get(item.group, 0)
            if seen >= limit:
                if spec.kind != "pair":
                    break
                continue
            per_group[item.group] = seen + 1
        items.append(item)
    if not items:
        raise DataNotFoundError(f"task {name}: {path} holds no items")
    return items


def _choice_length(continuation: str) -> int:
    """The characters ``acc_norm`` divides by: the choice without the target delimiter (one space).

    Example:
        >>> _choice_length(" eat the jar")
        11
    """
    return len(continuation.removeprefix(" "))


def evaluate_task(  # type: ignore[no-untyped-def]
    model, tokenizer, name: str, *, limit: int | None = None, batch_size: int = 16
) -> dict[str, Any]:
    """Score task ``name``; returns metrics with standard errors, the file and the item count."""
    items, path = load_items(name, limit)
    spec = TASKS[name]
    flat = [req for item in items for req in item.requests]
    scored = score_requests(model, tokenizer, flat, batch_size=batch_size)
    out: dict[str, Any] = {"task": name, "file": path, "items": len(items), "requests": len(flat)}
    pos = 0
    acc, acc_norm, lls, groups = [], [], [], {}
    for item in items:
        s = scored[pos : pos + len(item.requests)]
        pos += len(item.requests)
        if spec.kind == "greedy":
            acc.append(float(s[0].greedy))
            lls.append(s[0].logprob)
            continue
        ll = [x.logprob for x in s]
        hit = float(max(range(len(ll)), key=ll.__getitem__) == item.gold)
        acc.append(hit)
        if spec.kind == "pair":
            groups.setdefault(item.group, []).append(hit)
        else:
            norm = [x / max(1, _choice_length(req[1])) for x, req in zip(ll, item.requests, strict=True)]
            acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == item.gold))
    out["acc"], out["acc_stderr"] = mean_se(acc)
    out["item_scores"] = acc  # per-item 0/1, for paired comparisons between policies
    if acc_norm:
        out["acc_norm"], out["acc_norm_stderr"] = mean_se(acc_norm)
    if lls:
        out["ppl"] = math.exp(-statistics.fmean(lls))
    if groups:
        out["paradigms"] = {g: statistics.fmean(v) for g, v in sorted(groups.items())}
    return out
