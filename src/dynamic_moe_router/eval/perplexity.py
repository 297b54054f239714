"""Perplexity of a causal LM on a corpus: the shared test sets, or any text or JSONL file.

The corpus is tokenised document by document and joined with the end-of-text token. It is cut into
windows of ``context`` tokens advanced by ``stride``; each window scores only the tokens no earlier
window scored (all of the first window's), so every token is predicted once, with between
``context - stride`` and ``context - 1`` tokens before it. With ``stride == context`` (the default,
512) the windows do not overlap. The standard error is that of the mean token NLL (tokens treated as
independent), and the perplexity interval is ``exp(mean +- 1.96 se)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..data import data_file, decode_error, read_jsonl
from ..errors import DataNotFoundError

__all__ = ["CORPORA", "corpus_documents", "perplexity", "read_text_file", "token_ids"]

#: the shared corpora ``dmr eval`` knows by name, and their files in the data folder
CORPORA = {"gutenberg_test": "gutenberg/test.jsonl", "wikitext2_test": "wikitext2/test.txt"}


def read_text_file(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """Documents of a plain text file (one document) or a JSONL file (its ``text`` fields).

    Files that do not decode in ``encoding`` raise
    :class:`~dynamic_moe_router.errors.TextDecodeError` with the byte offset of the first bad byte.

    Example:
        >>> import os, tempfile
        >>> from dynamic_moe_router.errors import TextDecodeError
        >>> from dynamic_moe_router.eval import read_text_file
        >>> path = os.path.join(tempfile.mkdtemp(), "latin1.txt")
        >>> _ = open(path, "wb").write("caf\xe9 au lait".encode("latin-1"))
        >>> read_text_file(path, encoding="latin-1")
        ['café au lait']
        >>> try:
        ...     read_text_file(path)
        ... except TextDecodeError as err:
        ...     print(err.offset)
        3
    """
    p = Path(path)
    if p.is_dir():
        raise DataNotFoundError(f"{str(p)!r} is a directory; pass a text or JSONL file")
    if not p.is_file():
        raise DataNotFoundError(f"text file {str(p)!r} does not exist")
    if p.suffix in (".jsonl", ".xz"):
        docs = []
        for n, record in enumerate(read_jsonl(p, encoding), 1):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataNotFoundError(f"{p}: record {n} has no string field 'text'")
            docs.append(record["text"])
    else:
        raw = p.read_bytes()
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as err:
            raise decode_error(p, err.start, err, encoding) from None
        docs = [text.replace("\r\n", "\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataNotFoundError(f"{p} holds no text")
    return docs


def corpus_documents(name_or_path: str, encoding: str = "utf-8") -> tuple[list[str], str]:
    """Documents of a named shared corpus (see :data:`CORPORA`) or of a file; and the file read."""
    if name_or_path in CORPORA:
        path = data_file(CORPORA[name_or_path])
    else:
        path = Path(name_or_path)
    return read_text_file(path, encoding), str(path)


def token_ids(tokenizer: Any, documents: Iterable[str], max_tokens: int | None = None) -> list[int]:
    """``documents`` tokenised one by one and joined with the end-of-text token (each document ends
    with it); with ``max_tokens``, the first ``max_tokens + 1`` ids (inputs and targets of
    ``max_tokens`` predictions), the tokenising stopped as soon as they are there."""
    ids: list[int] = []
    for doc in documents:  # one by one, so a token budget stops the tokenising early
        ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if max_tokens is not None and len(ids) > max_tokens:
            break
    return ids if max_tokens is None else ids[: max_tokens + 1]


@torch.no_grad()
def perplexity(
    model,  # type: ignore[no-untyped-def]
    tokenizer,
    documents: list[str],
    *,
    context: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Token-level perplexity of ``documents`` (see the module docstring for the windowing)."""
    stride = context if stride is None else stride
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in (0, context={context}], got {stride}")
    tokens = torch.tensor(token_ids(tokenizer, documents, max_tokens), dtype=torch.long)
    # windows: (start of inputs, first scored target index within the window)
    windows = []
    scored_until = 0  # targets tokens[1 .. scored_until] are already scored
    start = 0
    if len(tokens) < 2:
        raise DataNotFoundError("the text has fewer than 2 tokens; nothing to score")
    while scored_until < len(tokens) - 1:
        end = min(start + context, len(tokens) - 1)
        first = scored_until - start  # inputs before this position were scored by earlier windows
        windows.append((start, end, first))
        scored_until = end
        start += stride
    device = next(model.parameters()).device
    nll = []
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        width = max(e - s for s, e, _ in group)
        x = torch.full((len(group), width), tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for row, (s, e, _) in enumerate(group):
            x[row, : e - s] = tokens[s:e]
            mask[row, : e - s] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), -1)
        for row, (s, e, first) in enumerate(group):
            targets = tokens[s + 1 : e + 1][first:].to(device)
            lp = logprobs[row, first : e - s].gather(1, targets.unsqueeze(1)).squeeze(1)
            nll.extend((-lp).tolist())
    n = len(nll)
    mean = sum(nll) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in nll) / (n - 1) / n) if n > 1 else 0.0
    return {
        "tokens": n,
        "nll": mean,
        "nll_stderr": se,
        "ppl": math.exp(mean),
        "ppl_ci95": [math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)],
        "context": context,
        "stride": stride,
        "windows": len(windows),
    }
