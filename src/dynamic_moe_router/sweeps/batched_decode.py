"""Quality of routing policies in batched decoding: many sequences decoded at once, with a KV cache.

:class:`~dynamic_moe_router.BatchAware` decides per routing call, so what it costs depends on the
batch: it is measured the way it runs. For each batch size ``B``:

* ``B`` windows of a corpus (``prompt + steps + 1`` tokens each, the first ones of the corpus, in
  the ``dmr eval`` / ``dmr bench`` tokenisation: documents joined with the end-of-text token);
* the model, patched with each policy, reads the prompts (prefill: the policy routes them too, as
  it would in use) and then decodes ``steps`` steps with its KV cache, teacher-forced: every step
  routes the ``B`` sequences' next true tokens together (``T = B`` tokens per MoE call); the
  negative log-likelihood of the ``steps + 1`` true tokens after each prompt is recorded (the first
  predicted by the prefill);
* per policy: the decode perplexity, its paired ratio to the native policy with a bootstrap
  standard error over sequences, the routed-pair reduction of the decode steps, and the mean
  number of distinct experts one decode step touches per layer (what a bandwidth-bound GPU layer
  pays for).

Policies (:func:`batch_aware_policies`): the native top-k, ``StaticTopK(k - 1)`` (the static point
at fewer pairs), and ``BatchAware(StaticTopK(), experts=f)`` and ``BatchAware(StaticTopK(),
experts=f, reroute=True)`` for each fraction ``f``; each policy routes the prompts too (one call
per batch's prefill), as ``dmr.patch`` does. The rerouting policies are measured once more with the
prompts under the native routing and the cap on the decode steps only (rows ``..._decode``; a
``set_policy`` after the prefill, as a server that prefills apart from its decode batches might).

Example:
    >>> import dynamic_moe_router as dmr
    >>> from dynamic_moe_router.hf.tiny import tiny_model
    >>> from dynamic_moe_router.sweeps.batched_decode import batched_decoding
    >>> import torch
    >>> model = tiny_model("olmoe")
    >>> ids = torch.randint(3, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    >>> result = batched_decoding(model, ids, batches=(4,), fractions=(0.5,), prompt=8, steps=4)
    >>> [r["policy"] for r in result["rows"]]
    ['native', 'static_k3', 'batch_aware_0.5', 'batch_aware_reroute_0.5', 'batch_aware_reroute_0.5_decode']
    >>> result["rows"][0]["ppl_ratio"], result["rows"][0]["pair_reduction"]
    (1.0, 0.0)
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from ..data import data_file
from ..errors import DataNotFoundError, PolicyError, UnsupportedModelError
from ..eval.perplexity import read_text_file, token_ids
from ..eval.stats import paired_ratio
from ..hf.layers import find_moe_layers, watch_routing
from ..hf.patching import patched
from ..policies import BatchAware, RoutingPolicy, StaticTopK

__all__ = [
    "DecodeMeter",
    "batch_aware_policies",
    "batched_decoding",
    "corpus_ids",
    "decode_nll",
    "paired_ratio",
]


def corpus_ids(tokenizer: Any, relative: str, tokens: int) -> torch.Tensor:
    """The first ``tokens + 1`` token ids of a shared corpus (``relative`` to the data folder),
    tokenised document by document and joined with the end-of-text token by
    :func:`dynamic_moe_router.eval.perplexity.token_ids`, as ``dmr eval`` does."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UnsupportedModelError(
            "corpus_ids joins documents with the end-of-text token, and this tokenizer has none; set "
            "tokenizer.eos_token (or pass ids of your own)"
        )
    documents = read_text_file(data_file(relative))
    return torch.tensor(token_ids(tokenizer, documents, tokens), dtype=torch.long)


class DecodeMeter:
    """Hooks on each MoE layer's routing (:func:`~dynamic_moe_router.hf.layers.watch_routing`):
    kept pairs and distinct experts per call, while ``on``.

    Call :meth:`remove` when done (the hooks stay on the model until then).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.on = False
        self.pairs = 0
        self.calls = 0
        self.distinct = 0
        self.tokens = 0
        self._handles = [
            watch_routing(layer, self._hook(layer.num_experts)) for layer in find_moe_layers(model)[0]
        ]

    def _hook(self, num_experts: int) -> Callable[..., None]:
        def hook(hidden: torch.Tensor, ids: torch.Tensor) -> None:  # (T, H), (T, k)
            if not self.on:
                return
            kept = ids[ids < num_experts]
            self.pairs += int(kept.numel())
            self.distinct += int(torch.unique(kept).numel())
            self.calls += 1
            self.tokens += int(hidden.shape[0])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def decode_nll(
    model: Any,
    windows: torch.Tensor,
    prompt: int,
    meter: DecodeMeter,
    before_decode: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``(B, steps + 1)`` NLL of the true tokens after the prompt in ``windows (B, prompt + steps + 1)``:
    the first from the prefill's logits, then one per decode step with the cache, all sequences per
    step (the meter counts the decode steps only). ``before_decode`` runs between the prefill and
    the first step (a ``set_policy`` there routes the prompts and the steps differently)."""
    out = model(windows[:, :prompt], use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]  # (B, V)
    if before_decode is not None:
        before_decode()
    nll = []
    meter.on = True
    try:
        for s in range(prompt, windows.shape[1]):
            target = windows[:, s]  # (B,)
            nll.append(F.cross_entropy(logits.float(), target, reduction="none"))
            if s + 1 == windows.shape[1]:
                break
            out = model(target[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    finally:
        meter.on = False
    return torch.stack(nll, dim=1)


def batch_aware_policies(native_k: int, fractions: Iterable[float]) -> dict[str, RoutingPolicy]:
    """Named policies of the measurement: native, static ``k - 1`` (when ``k > 1``), and per fraction
    ``BatchAware(StaticTopK(), experts=f)`` and its ``reroute=True`` form (a :class:`PolicyError` for
    a bad fraction)."""
    out: dict[str, RoutingPolicy] = {"native": StaticTopK()}
    if native_k > 1:
        out[f"static_k{native_k - 1}"] = StaticTopK(k=native_k - 1)
    for f in fractions:
        out[f"batch_aware_{f}"] = BatchAware(StaticTopK(), experts=f)
    for f in fractions:
        out[f"batch_aware_reroute_{f}"] = BatchAware(StaticTopK(), experts=f, reroute=True)
    return out


def batched_decoding(
    model: Any,
    ids: torch.Tensor,  # (N,) token ids, N >= max(batches) * (prompt + steps + 1)
    batches: Iterable[int],
    fractions: Iterable[float],
    prompt: int,
    steps: int,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Decode-quality rows of :func:`batch_aware_policies` at each batch size (see the module)."""
    batches, fractions = tuple(int(b) for b in batches), tuple(float(f) for f in fractions)
    layers = find_moe_layers(model)[0]
    native_k, num_experts = layers[0].native_k, layers[0].num_experts
    named = batch_aware_policies(native_k, fractions)  # bad fractions fail before any decoding
    length = prompt + steps + 1
    if prompt < 1 or steps < 1 or not batches or min(batches) < 1:
        raise PolicyError(
            f"batched decoding needs prompt >= 1, steps >= 1 and batch sizes >= 1; got prompt={prompt}, "
            f"steps={steps}, batches={list(batches)}",
            field="batches",
        )
    if ids.numel() < max(batches) * length:
        raise DataNotFoundError(
            f"batched decoding needs {max(batches) * length} token ids (batch {max(batches)} x "
            f"{length} = prompt + steps + 1), got {ids.numel()}; pass a longer text, or smaller batches, "
            "prompt or steps"
        )
    # (row name, policy, prompts under the native routing): the rerouting policies once more with
    # their cap on the decode steps only (prompts routed natively, as a server might run them)
    runs = [(name, policy, False) for name, policy in named.items()]
    runs += [(f"{n}_decode", p, True) for n, p in named.items() if n.startswith("batch_aware_reroute_")]
    rows: list[dict[str, Any]] = []
    for batch in batches:
        windows = ids[: batch * length].reshape(batch, length)  # (B, prompt + steps + 1)
        base, base_pairs = None, 0
        for name, policy, native_prompts in runs:
            t0 = time.perf_counter()
            meter = DecodeMeter(model)
            try:
                with patched(model, StaticTopK() if native_prompts else policy, validate=False) as handle:
                    switch = functools.partial(handle.set_policy, policy) if native_prompts else None
                    nll = decode_nll(model, windows, prompt, meter, before_decode=switch)
            finally:
                meter.remove()
            if base is None:
                base, base_pairs = nll, meter.pairs
            ratio, se = paired_ratio(nll, base)
            row = {
                "batch": batch,
                "policy": name,
                "spec": policy.describe() + (" (decode steps only)" if native_prompts else ""),
                "decode_ppl": math.exp(float(nll.mean())),
                "ppl_ratio": ratio,
                "ppl_ratio_se": se,
                "pair_reduction": 1 - meter.pairs / base_pairs,
                "distinct_experts_per_call": meter.distinct / meter.calls,
                "distinct_fraction": meter.distinct / meter.calls / num_experts,
                "decode_tokens": int(nll.numel()),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            if log is not None:
                log(
                    f"batched decoding B={batch:4d} {name:27s} ppl x{ratio:.4f} (se {se:.4f}) "
                    f"pairs -{row['pair_reduction']:.3f} "
                    f"distinct {row['distinct_experts_per_call']:.1f}/{num_experts}"
                )
    return {"native_k": native_k, "num_experts": num_experts, "prompt": prompt, "steps": steps, "rows": rows}
