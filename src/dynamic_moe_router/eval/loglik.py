"""Log-likelihood scoring of (context, continuation) requests, lm-evaluation-harness style.

Tokenisation follows lm-evaluation-harness (0.4): whitespace at the end of the context is moved
to the front of the continuation; the continuation's tokens are those of
``encode(context + continuation)`` after the tokens of ``encode(context)`` (so merges across the
boundary are handled the same way); an empty context is replaced by the beginning-of-text token
(the end-of-text token where the tokenizer has none), unless the continuation already starts with
it; and requests longer than ``max_length`` are cut from the left. No special tokens are added
(lm-evaluation-harness's ``add_bos_token=False``; with its default it adds those the tokenizer
adds by default, which is the same for the reference models' tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Scored", "encode_request", "score_requests"]


@dataclass(frozen=True)
class Scored:
    """The result of one request."""

    logprob: float  # sum of log-probabilities of the continuation tokens
    tokens: int  # number of continuation tokens
    greedy: bool  # every continuation token is the model's argmax


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """``(context_ids, continuation_ids)`` as lm-evaluation-harness splits them (see the module)."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    if not context:
        cont = encode(continuation)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
    spaces = len(context) - len(context.rstrip())
    if spaces:  # "Answer: " / "yes" is scored as "Answer:" / " yes"
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def score_requests(
    model,  # type: ignore[no-untyped-def]
    tokenizer,
    requests: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> list[Scored]:
    """Score every ``(context, continuation)``; batches are padded on the right with a mask."""
    encoded = [encode_request(tokenizer, c, x) for c, x in requests]
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    results: list[Scored | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs, spans = [], []
        for i in idx:
            ctx, cont = encoded[i]
            full = (ctx + cont)[-(max_length + 1) :]
            n_cont = min(len(cont), len(full) - 1)
            seqs.append(full[:-1])  # inputs; the targets are full[1:]
            spans.append((full, n_cont))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1).cpu()  # (B, L, V)
        for row, (i, (full, n_cont)) in enumerate(zip(idx, spans, strict=True)):
            n_in = len(full) - 1
            targets = torch.tensor(full[1:])[n_in - n_cont :]  # the continuation tokens
            lp = logprobs[row, n_in - n_cont : n_in]  # (n_cont, V)
            token_lp = lp.gather(1, targets.unsqueeze(1)).squeeze(1)
            greedy = bool((lp.argmax(-1) == targets).all())
            results[i] = Scored(logprob=float(token_lp.sum()), tokens=n_cont, greedy=greedy)
    return [r for r in results if r is not None]
