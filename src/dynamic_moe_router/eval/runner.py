"""``evaluate``: perplexity and zero-shot accuracy of a (patched) model, with FLOP accounting."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..hf.patching import patched
from ..policies import RoutingPolicy
from ..profiling import profile
from .perplexity import corpus_documents, perplexity
from .tasks import TASKS, evaluate_task

__all__ = ["evaluate", "load_checkpoint"]


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
) -> dict[str, Any]:
    """Evaluate ``model`` under ``policy`` (``None``: the model as it is, e.g. native routing).

    Returns perplexity per corpus, metrics per task, the FLOP accounting of the whole run
    (:func:`dynamic_moe_router.profile`) and the data files and counts used. ``limit`` is one item
    limit for every task, or a mapping from task name to its limit (tasks not in it: no limit).
    """
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
            docs, path = corpus_documents(corpus)
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
        for task in tasks:
            task_limit = limit.get(task) if isinstance(limit, Mapping) else limit
            result["tasks"][task] = evaluate_task(
                model, tokenizer, task, limit=task_limit, batch_size=batch_size
            )
    flops = report.to_dict()
    per_layer = flops.pop("layers")
    result["flops"] = flops
    result["flops_per_layer"] = per_layer
    result["wall_s"] = round(time.time() - start, 1)
    return result
