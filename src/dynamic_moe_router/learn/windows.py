"""Token windows spread over the documents of a corpus (training and budget text).

A budget tuned on the first tokens of a split sees one book; on the reference models that missed
the test reduction by about 7 points (``benchmarks/ORACLE_NOTES.md``). These windows take a few
consecutive windows from each document instead, skipping its first ``skip`` tokens (title pages).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import PolicyError

__all__ = ["spread_windows"]


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
