"""``evaluate``: perplexity and zero-shot accuracy of a (patched) model, with FLOP accounting."""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .._progress import Progress
from .._progress import task as _task
from ..errors import UnsupportedModelError
from ..hf.patching import patched
from ..policies import RoutingPolicy
from ..profiling import profile
from .perplexity import corpus_documents, perplexity
from .stats import paired_delta
from .tasks import TASKS, evaluate_task

__all__ = ["compare_to_native", "evaluate", "evaluate_native", "load_checkpoint"]


def load_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    """``(model, tokenizer)`` of a local transformers checkpoint, in eval mode; typed errors otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hf.families import get_family
    from ..hf.inspect import load_model_skeleton

    folder = Path(path)
    load_model_skeleton(str(folder))  # not a dir / no config.json / unsupported family: typed errors
    if not any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise UnsupportedModelError(
            f"{str(folder)!r} has no tokenizer files; save the tokenizer with the model"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    get_family(model.config.model_type)
    return model, AutoTokenizer.from_pretrained(folder)


def evaluate(
    model,  # type: ignore[no-untyped-def]
    tokenizer,
    *,
    policy: RoutingPolicy | None = None,
    corpora: Sequence[str] = ("gutenberg_test", "wikitext2_test"),
    tasks: Sequence[str] = tuple(TASKS),
    limit: int | Mapping[str, int] | None = None,
    max_tokens: int | None = None,
    context: int = 512,
    stride: int | None = None,
    batch_size: int = 16,
    count_dense: bool = True,
    encoding: str = "utf-8",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` under ``policy`` (``None``: the model as it is, e.g. native routing).

    Returns perplexity per corpus, metrics per task, the FLOP accounting of the whole run
    (:func:`dynamic_moe_router.profile`) and the data files and counts used. ``limit`` is one item
    limit for every task, or a mapping from task name to its limit (tasks not in it: no limit).
    ``encoding`` is that of text files passed in ``corpora``; ``progress`` draws a bar with an ETA
    (one step per corpus and per task).
    """
    bar = _task(progress, "evaluating" if policy is None else f"evaluating {policy.describe()}",
                len(corpora) + len(tasks))  # fmt: skip
    start = time.time()
    result: dict[str, Any] = {
        "policy": policy.to_dict() if policy is not None else None,
        "perplexity": {},
        "tasks": {},
        "settings": {
            "limit": dict(limit) if isinstance(limit, Mapping) else limit,
            "max_tokens": max_tokens,
            "context": context,
            "stride": stride or context,
        },
    }
    ctx = patched(model, policy) if policy is not None else nullcontext()
    with torch.no_grad(), ctx, profile(model, count_dense=count_dense) as report:
        for corpus in corpora:
            docs, path = corpus_documents(corpus, encoding)
            res = perplexity(
                model,
                tokenizer,
                docs,
                context=context,
                stride=stride,
                max_tokens=max_tokens,
                batch_size=batch_size,
            )
            res.update(file=path, documents=len(docs))
            result["perplexity"][corpus] = res
            bar.advance()
        for task in tasks:
            task_limit = limit.get(task) if isinstance(limit, Mapping) else limit
            result["tasks"][task] = evaluate_task(
                model, tokenizer, task, limit=task_limit, batch_size=batch_size
            )
            bar.advance()
    flops = report.to_dict()
    per_layer = flops.pop("layers")
    result["flops"] = flops
    result["flops_per_layer"] = per_layer
    result["wall_s"] = round(time.time() - start, 1)
    return result


#: native results per model (weakly keyed: dropped with the model) and per evaluation settings
_NATIVE: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


def _file_stamp(corpus: str) -> tuple[str, float, int] | str:
    path = Path(corpus)
    if path.is_file():
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime, stat.st_size)
    return corpus


def evaluate_native(model, tokenizer, **settings: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """:func:`evaluate` of the native routing, computed once per model and settings in this process.

    The cache is keyed by the model object and the settings (text files by path, size and
    modification time), so a second policy compared against native on the same data does not pay
    for the native run again. ``progress`` is not part of the key.

    Example:
        >>> from dynamic_moe_router.eval.runner import _NATIVE
        >>> len(_NATIVE) >= 0
        True
    """
    progress = settings.pop("progress", None)
    key = json.dumps(
        {**settings, "corpora": [_file_stamp(c) for c in settings.get("corpora", ())]},
        sort_keys=True,
        default=str,
    )
    per_model = _NATIVE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = evaluate(model, tokenizer, policy=None, progress=progress, **settings)
    return per_model[key]


def compare_to_native(result: dict[str, Any], native: dict[str, Any]) -> dict[str, Any]:
    """Changes of ``result`` against ``native`` (both :func:`evaluate` outputs on the same data).

    Perplexity: the relative change; tasks: the accuracy change with its paired standard error
    (the same items scored under both routings); FLOPs: the routed-FLOP reduction of ``result``.

    Example:
        >>> from dynamic_moe_router.eval.runner import compare_to_native
        >>> run = {"perplexity": {"t": {"ppl": 11.0}}, "flops": {"routed_flop_reduction": 0.3},
        ...        "tasks": {"x": {"acc": 0.5, "item_scores": [1.0, 0.0]}}}
        >>> base = {"perplexity": {"t": {"ppl": 10.0}},
        ...         "tasks": {"x": {"acc": 1.0, "item_scores": [1.0, 1.0]}}}
        >>> d = compare_to_native(run, base)
        >>> round(d["perplexity"]["t"]["rel_change"], 6), d["tasks"]["x"]["acc_delta"]
        (0.1, -0.5)
    """
    out: dict[str, Any] = {"perplexity": {}, "tasks": {}}
    for name, res in result["perplexity"].items():
        base = native["perplexity"][name]["ppl"]
        out["perplexity"][name] = {"native_ppl": base, "rel_change": res["ppl"] / base - 1.0}
    for name, res in result["tasks"].items():
        mean, se = paired_delta(res["item_scores"], native["tasks"][name]["item_scores"])
        out["tasks"][name] = {
            "native_acc": native["tasks"][name]["acc"],
            "acc_delta": mean,
            "acc_delta_se": se,
        }
    out["routed_flop_reduction"] = result["flops"]["routed_flop_reduction"]
    return out
