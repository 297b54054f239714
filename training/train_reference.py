"""Train a reference MoE language model (fixed top-k routing, load-balancing loss) on Gutenberg.

Usage (on the lent GPU; a CPU smoke run works with ``--smoke``)::

    python training/train_reference.py --config training/configs/ref-mixtral.json \\
        --tokenizer models/tokenizer --out OUT_DIR [--cache /tmp/tokens.pt] [--smoke]

The model is a plain transformers ``MixtralForCausalLM`` / ``OlmoeForCausalLM`` trained exactly
as those families are trained: native top-k routing with the auxiliary load-balancing loss, never
a dynamic policy. Everything is seeded. The output folder holds the bf16 safetensors checkpoint,
its config and tokenizer, ``metrics.json`` (recipe, tokens seen, wall time, device, loss curve,
held-out perplexity, per-layer expert load and router entropy) and the model card ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynamic_moe_router.data import data_file, read_jsonl


def tokenize_split(tokenizer, relative: str, eos: int, limit_chars: int | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    texts, used = [], 0
    for record in read_jsonl(data_file(relative)):
        text = record["text"]
        if limit_chars is not None:
            text = text[: max(0, limit_chars - used)]
            if not text:
                break
        used += len(text)
        texts.append(text)
    ids: list[int] = []
    for chunk in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(chunk)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def load_tokens(tokenizer, cache: Path | None, smoke: bool) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    if cache is not None and cache.is_file():
        return torch.load(cache)
    eos = tokenizer.eos_token_id
    limit = 2_000_000 if smoke else None
    tokens = {
        "train": tokenize_split(tokenizer, "gutenberg/train.jsonl.xz", eos, limit),
        "valid": tokenize_split(tokenizer, "gutenberg/valid.jsonl", eos, 300_000 if smoke else None),
    }
    if cache is not None:
        torch.save(tokens, cache)
    return tokens


def router_losses(router_logits: tuple[torch.Tensor, ...], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer load-balancing loss (Switch Transformer form, summed over layers) and router z-loss.

    For each MoE layer: ``E * sum_i f_i * P_i`` with ``f_i`` the share of the layer's top-k
    assignments that go to expert ``i`` and ``P_i`` its mean router probability (1.0 when
    balanced). transformers' ``load_balancing_loss_func`` pools all layers into one set of
    experts, which balances expert *indices* across layers but lets single layers collapse; the
    original Switch / Mixtral / OLMoE recipes apply the loss per layer, as here. The z-loss (mean
    squared log-sum-exp of the router logits, OLMoE's 0.001) keeps router logits small.
    """
    lb = torch.zeros((), device=router_logits[0].device)
    z = torch.zeros((), device=router_logits[0].device)
    for logits in router_logits:
        logits = logits.float()  # (T, E)
        num_experts = logits.shape[-1]
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices  # (T, k)
        share = F.one_hot(chosen, num_experts).float().sum(1).mean(0) / top_k  # (E,) sums to 1
        lb = lb + num_experts * (share * probs.mean(0)).sum()
        z = z + torch.logsumexp(logits, dim=-1).pow(2).mean()
    return lb, z / len(router_logits)


def lr_at(step: int, train: dict[str, Any], total: int) -> float:
    if step < train["warmup_steps"]:
        return train["lr"] * (step + 1) / train["warmup_steps"]
    progress = min(1.0, (step - train["warmup_steps"]) / max(1, total - train["warmup_steps"]))
    floor = train["min_lr_ratio"]
    return train["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, seq_len: int, device: str, autocast: bool) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Held-out NLL over non-overlapping windows, and per-layer expert load and router entropy."""
    model.eval()
    n_windows = (len(tokens) - 1) // seq_len
    nll, count = 0.0, 0
    num_experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else None
    num_experts = num_experts or model.config.num_experts
    top_k = model.config.num_experts_per_tok
    loads: list[torch.Tensor] = []
    entropy: list[float] = []
    batch = 16
    for start in range(0, n_windows, batch):
        idx = torch.arange(start, min(n_windows, start + batch))
        x = (
            torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in idx.tolist()])
            .long()
            .to(device)
        )
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(x[:, :-1], output_router_logits=True)
        logits = out.logits.float()
        nll += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += x[:, 1:].numel()
        for layer, router_logits in enumerate(out.router_logits):
            probs = torch.softmax(router_logits.float(), dim=-1)  # (T, E)
            chosen = torch.topk(probs, top_k, dim=-1).indices
            counts = torch.bincount(chosen.reshape(-1), minlength=num_experts).double().cpu()
            h = -(torch.special.xlogy(probs, probs)).sum(-1) / math.log(num_experts)
            if len(loads) <= layer:
                loads.append(torch.zeros(num_experts, dtype=torch.float64))
                entropy.append(0.0)
            loads[layer] += counts
            entropy[layer] += h.sum().item()
    tokens_seen = count
    per_layer = []
    for layer, counts in enumerate(loads):
        share = counts / counts.sum()
        per_layer.append(
            {
                "layer": layer,
                "load": [round(v, 5) for v in share.tolist()],
                "min_load_x_uniform": round(share.min().item() * num_experts, 4),
                "max_load_x_uniform": round(share.max().item() * num_experts, 4),
                "mean_normalised_entropy": round(entropy[layer] / tokens_seen, 4),
            }
        )
    model.train()
    return {
        "valid_tokens": count,
        "valid_nll": nll / count,
        "valid_ppl": math.exp(nll / count),
        "layers": per_layer,
    }


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, help="token cache file shared between runs")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run: 2 MB of text, a few steps")
    ap.add_argument("--steps", type=int, help="train exactly this many steps (ignores the time budget)")
    ap.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    args = ap.parse_args()

    recipe = json.loads(args.config.read_text())
    train = dict(recipe["train"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast = device == "cuda"
    if args.smoke:
        train.update(batch_size=4, seq_len=64, time_budget_s=20, max_steps=12, warmup_steps=3)
    if args.batch_size:
        train.update(batch_size=args.batch_size)
    if args.steps:
        train.update(max_steps=args.steps, time_budget_s=1e9)
    torch.manual_seed(train["seed"])
    gen = torch.Generator().manual_seed(train["seed"])

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.time()
    tokens = load_tokens(tokenizer, args.cache, args.smoke)
    tokenize_s = time.time() - t0
    print(
        f"tokens: train {len(tokens['train']):,} valid {len(tokens['valid']):,} ({tokenize_s:.0f}s)",
        flush=True,
    )

    config = AutoConfig.for_model(
        recipe["model_type"],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **recipe["config"],
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    implementation = "eager"
    if device == "cuda":
        try:
            model.set_experts_implementation("grouped_mm")
            implementation = "grouped_mm"
        except Exception as err:  # older releases: keep eager, say so in the metrics
            print(f"grouped_mm experts unavailable ({err}); training with eager experts", flush=True)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train["lr"],
        betas=(0.9, 0.95),
        fused=device == "cuda",
    )
    seq, bsz = train["seq_len"], train["batch_size"]
    data = tokens["train"]
    # the number of steps the time budget allows is unknown up front: the cosine schedule runs over
    # max_steps, estimated after 50 steps from the measured step time
    total_steps = train["max_steps"]
    curve: list[dict[str, float]] = []
    model.train()
    start = time.time()
    step = 0
    tokens_seen = 0
    while step < total_steps:
        offsets = torch.randint(0, len(data) - seq - 1, (bsz,), generator=gen)
        batch = (
            torch.stack([data[o : o + seq + 1] for o in offsets.tolist()])
            .long()
            .to(device, non_blocking=True)
        )
        for group in optim.param_groups:
            group["lr"] = lr_at(step, train, total_steps)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(batch[:, :-1], output_router_logits=True)
            lm_loss = F.cross_entropy(
                out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
        lb_loss, z_loss = router_losses(out.router_logits, config.num_experts_per_tok)
        loss = lm_loss + train["lb_coef"] * lb_loss + train["z_coef"] * z_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        optim.step()
        step += 1
        tokens_seen += bsz * seq
        if step == 20:
            mark = time.time()
        if step == 70 and not args.smoke:  # steady-state step time, after the warm-up steps
            per_step = (time.time() - mark) / 50
            total_steps = min(
                train["max_steps"], 70 + int((train["time_budget_s"] - (time.time() - start)) / per_step)
            )
            print(f"{per_step * 1000:.0f} ms/step -> {total_steps} steps in the time budget", flush=True)
        if step % 50 == 0 or step == total_steps:
            point = {
                "step": step,
                "tokens": tokens_seen,
                "loss": round(lm_loss.item(), 4),
                "lb_loss_per_layer": round(lb_loss.item() / len(out.router_logits), 4),
                "z_loss": round(z_loss.item(), 4),
                "lr": lr_at(step - 1, train, total_steps),
                "grad_norm": round(float(grad_norm), 3),
                "elapsed_s": round(time.time() - start, 1),
            }
            curve.append(point)
            print(json.dumps(point), flush=True)
    train_s = time.time() - start

    metrics = evaluate(model, tokens["valid"], seq, device, autocast)
    print(f"valid ppl {metrics['valid_ppl']:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    record = {
        "name": recipe["name"],
        "recipe": recipe,
        "effective_train": train,
        "parameters": params,
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_tokens_available": len(data),
        "epochs": tokens_seen / len(data),
        "train_wall_s": round(train_s, 1),
        "tokenize_wall_s": round(tokenize_s, 1),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "experts_implementation": implementation,
        "autocast": "bf16" if autocast else "fp32",
        "loss_curve": curve,
        "held_out": metrics,
    }
    (args.out / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
