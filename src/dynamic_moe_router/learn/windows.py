"""Token windows spread over the documents of a corpus (training and budget text).

A budget tuned on the first tokens of a split sees one book; on the reference models that missed
the test reduction by about 7 points (``benchmarks/ORACLE_NOTES.md``). These windows take a few
consecutive windows from each document instead, skipping its first ``skip`` tokens (title pages).
:func:`allocator_windows` takes them with the settings of ``dmr calibrate --family learned``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from ..errors import PolicyError

__all__ = ["ALLOCATOR_WINDOWS", "allocator_windows", "spread_windows"]

#: how a learned allocator takes its windows (``dmr calibrate --family learned``), by use:
#: ``(windows per document, at most this many in all)``; each document's first window is skipped
#: (title pages), so a budget document's windows end ``(1 + 2) * context + 1`` tokens in and the
#: calibration's held-out windows start there (``calibrate.SELECT_SKIP_CONTEXTS``)
ALLOCATOR_WINDOWS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {
        "train": (8, 800),  # distillation windows, from the train split
        "budget": (2, 64),  # the windows the budget (offset, quantile shares) is fitted on
    }
)


def spread_windows(
    tokenizer: Any,
    documents: Iterable[str],
    *,
    per_doc: int = 1,
    context: int = 512,
    skip: int = 512,
    max_windows: int | None = None,
    chars: int = 40_000,
) -> torch.Tensor:  # (N, context + 1) int64
    """Up to ``per_doc`` consecutive ``(context + 1)``-token windows from each document.

    Only the first ``chars`` characters of a document are tokenised; a document too short for one
    window after ``skip`` tokens contributes none. Stops after ``max_windows`` windows.

    Example:
        >>> from dynamic_moe_router.learn import spread_windows
        >>> class Tok:  # one token per character
        ...     def __call__(self, text, **kw):
        ...         return {"input_ids": [ord(c) % 50 for c in text]}
        >>> spread_windows(Tok(), ["a" * 40, "b" * 9, "c" * 40], per_doc=2, context=8, skip=4).shape
        torch.Size([4, 9])
    """
    rows: list[torch.Tensor] = []
    for text in documents:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False)["input_ids"]
        for w in range(per_doc):
            start = skip + w * context
            if start + context + 1 > len(ids):
                break
            rows.append(torch.tensor(ids[start : start + context + 1], dtype=torch.long))
            if max_windows is not None and len(rows) >= max_windows:
                return torch.stack(rows)
    if not rows:
        raise PolicyError(
            f"no document has {skip + context + 1} tokens for a {context}-token window after skipping "
            f"{skip}; pass longer text or a smaller context",
            field="documents",
        )
    return torch.stack(rows)


def allocator_windows(
    tokenizer: Any,
    documents: Iterable[str],
    use: str,
    *,
    context: int = 512,
    max_windows: int | None = None,
) -> torch.Tensor:  # (N, context + 1) int64
    """A learned allocator's ``use`` windows (``"train"`` or ``"budget"``, see
    :data:`ALLOCATOR_WINDOWS`) from ``documents``, as ``dmr calibrate --family learned`` takes them;
    ``max_windows`` overrides the table's cap (``None`` keeps it; for no cap call
    :func:`spread_windows`).

    Example:
        >>> from dynamic_moe_router.learn import allocator_windows
        >>> class Tok:  # one token per character
        ...     def __call__(self, text, **kw):
        ...         return {"input_ids": [ord(c) % 50 for c in text]}
        >>> allocator_windows(Tok(), ["a" * 100] * 2, "train", context=8).shape
        torch.Size([16, 9])
        >>> allocator_windows(Tok(), ["b" * 40] * 3, "budget", context=8).shape
        torch.Size([6, 9])
    """
    if not isinstance(use, str) or use not in ALLOCATOR_WINDOWS:
        raise PolicyError(
            f"allocator windows are for one of {', '.join(map(repr, ALLOCATOR_WINDOWS))}, got {use!r}",
            field="use",
        )
    per_doc, cap = ALLOCATOR_WINDOWS[use]
    return spread_windows(
        tokenizer, documents, per_doc=per_doc, context=context, skip=context,
        max_windows=cap if max_windows is None else max_windows,
    )  # fmt: skip
