"""Worker of tests/test_expert_parallel.py, run under ``torchrun --nproc_per_node 2`` (gloo, CPU).

Each rank loads a tiny model saved by the test with transformers' expert parallelism
(``DistributedConfig(tp_size=2, ep_size=2)``), runs the checks' computations and writes its
measurements to ``<out>/rank<r>.json``; the test asserts on them (nothing is asserted here).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import dynamic_moe_router as dmr
from dynamic_moe_router.hf.layers import find_moe_layers, model_family, watch_routing
from dynamic_moe_router.hf.parallel import expert_parallel_config


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def pairs_leaving(routes: torch.Tensor, rank: int, local: int) -> int:
    """Kept pairs of ``rank``'s slice of the batch (``routes (T, k)``) whose expert another rank
    holds: what the all_to_all dispatcher must send (2 ranks, ``local`` experts each)."""
    tokens = routes.shape[0]
    rows = -(-tokens // 2)
    mine = routes[rank * rows : (rank + 1) * rows]
    kept = mine < 2 * local
    return int((kept & (mine // local != rank)).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", required=True, help="a saved model folder (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--p", type=float, default=0.4, help="TopP threshold of the dynamic policy")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    for model in args.model:
        res = check(model, args.p)
        out = Path(args.out) / Path(model).name
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{res['rank']}.json").write_text(json.dumps(res, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def check(path: str, p: float) -> dict:
    """The measurements of one model (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    args = argparse.Namespace(model=path, p=p)
    torch.manual_seed(0)
    rank = dist.get_rank()
    config = AutoConfig.from_pretrained(args.model)
    single = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ep = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, distributed_config=expert_parallel_config(config)
    ).eval()
    ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    gen = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    res: dict = {"rank": rank, "world": dist.get_world_size()}

    # 1. transformers really split the experts: each rank holds its own experts' weights only
    s_layers, _ = find_moe_layers(single, model_family(single))
    e_layers, _ = find_moe_layers(ep, model_family(ep))
    local = e_layers[0].experts.gate_up_proj.to_local()
    n = local.shape[0]
    res["local_experts"], res["num_experts"] = int(n), int(s_layers[0].real_experts)
    installed = [layer.experts.__dict__.get("forward") for layer in e_layers]  # transformers' dispatch
    mine = s_layers[0].experts.gate_up_proj[rank * n : (rank + 1) * n]
    res["own_weights_equal"] = bool(torch.equal(local, mine))

    with torch.no_grad():
        ref = single(ids, attention_mask=mask).logits
        ref_tokens = single.generate(ids, attention_mask=mask, **gen)
        native = ep(ids, attention_mask=mask).logits
        res["unpatched_vs_single"] = _max_diff(native, ref)
        for dispatch in ("all_reduce", "all_to_all"):
            with dmr.patched(ep, dmr.StaticTopK(), dispatch=dispatch) as handle, dmr.profile(ep) as report:
                logits = ep(ids, attention_mask=mask).logits
            tokens_static = None
            with dmr.patched(ep, dmr.StaticTopK(), dispatch=dispatch):
                tokens_static = ep.generate(ids, attention_mask=mask, **gen)
            static_exchange = [e.exchange.to_dict() for e in handle.experts]
            res[f"{dispatch}/static_vs_unpatched"] = _max_diff(logits, native)
            res[f"{dispatch}/static_vs_single"] = _max_diff(logits, ref)
            res[f"{dispatch}/static_tokens_equal"] = bool(torch.equal(tokens_static, ref_tokens))
            res[f"{dispatch}/static_profile"] = report.to_dict()
            res[f"{dispatch}/static_exchange"] = static_exchange
            policy = dmr.TopP(p=args.p)
            with dmr.patched(ep, policy, dispatch=dispatch) as handle, dmr.profile(ep) as report:
                logits = ep(ids, attention_mask=mask).logits
            dyn_exchange = [e.exchange.to_dict() for e in handle.experts]
            with dmr.patched(ep, policy, dispatch=dispatch):
                tokens = ep.generate(ids, attention_mask=mask, **gen)
            routes: list[torch.Tensor] = []  # each layer's (T, k) global ids, single process
            hooks = [  # the router's ids (zero experts included, never sent: pairs_leaving keeps < E)
                watch_routing(layer, lambda h, ids, routes=routes: routes.append(ids.clone()))
                for layer in s_layers
            ]
            with dmr.patched(single, policy) as sh, dmr.profile(single) as single_report:
                single_logits = single(ids, attention_mask=mask).logits
            for hook in hooks:
                hook.remove()
            res[f"{dispatch}/expected_pairs_sent"] = [pairs_leaving(r, rank, n) for r in routes]
            small = {}  # token counts with uneven or empty slices: (1, 1), (1, 3), (3, 5)
            for shape in ((1, 1), (1, 3), (3, 5)):
                x = ids[: shape[0], : shape[1]]
                with dmr.patched(ep, policy, dispatch=dispatch):
                    got = ep(x).logits
                with dmr.patched(single, policy):
                    small[str(shape)] = _max_diff(got, single(x).logits)
            res[f"{dispatch}/small_batches_vs_single"] = small
            with dmr.patched(single, policy):
                single_tokens = single.generate(ids, attention_mask=mask, **gen)
            res[f"{dispatch}/dynamic_vs_single"] = _max_diff(logits, single_logits)
            res[f"{dispatch}/dynamic_tokens_equal"] = bool(torch.equal(tokens, single_tokens))
            res[f"{dispatch}/dynamic_profile"] = report.to_dict()
            res[f"{dispatch}/single_dynamic_profile"] = single_report.to_dict()
            res[f"{dispatch}/dynamic_exchange"] = dyn_exchange
            del sh
        after = ep(ids, attention_mask=mask).logits
    res["unpatch_bit_exact"] = bool(torch.equal(after, native))
    restored = [layer.experts.__dict__.get("forward") for layer in e_layers]
    res["forward_restored"] = all(a is b is not None for a, b in zip(restored, installed, strict=True))
    try:  # gradients through a patched expert-parallel model are refused with a typed error
        with dmr.patched(ep, dmr.StaticTopK()):
            ep(ids).logits.sum().backward()
        res["grad_error"] = None
    except dmr.UnsupportedModeError as err:
        res["grad_error"] = str(err)
    return res


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
