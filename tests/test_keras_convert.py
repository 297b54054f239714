"""The reference checkpoint models/ref-mixtral as a keras-hub MixtralCausalLM: logits and the
perplexity change of a dynamic policy against PyTorch (this process's Keras backend;
tests/test_keras_backends.py reruns this module on the others)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.data import data_file, read_jsonl
from dynamic_moe_router.hf.tiny import tiny_model

keras = pytest.importorskip("keras")
pytest.importorskip("keras_hub")
dk = pytest.importorskip("dynamic_moe_router.keras")
from dynamic_moe_router.keras.convert import (  # noqa: E402
    load_transformers_mixtral,
    mixtral_backbone_config,
    mixtral_from_transformers,
    token_nll,
)

REF = Path(__file__).resolve().parents[1] / "models" / "ref-mixtral"
WINDOWS, LENGTH = 2, 192  # 382 scored tokens of the Gutenberg test split
LOGIT_ATOL = 1e-4  # fp32; the reference model's logits reach about 20 in magnitude
PPL_RTOL = 1e-3  # 0.1% relative


@pytest.fixture(scope="module")
def models():  # type: ignore[no-untyped-def]
    hf = load_transformers_mixtral(REF)
    return hf, mixtral_from_transformers(hf)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    import transformers

    try:
        path = data_file("gutenberg/test.jsonl")
    except dmr.DataNotFoundError as err:
        pytest.skip(f"shared data not found: {err}")
    tok = transformers.AutoTokenizer.from_pretrained(REF)
    ids: list[int] = []
    for record in read_jsonl(path):
        ids += tok(record["text"], add_special_tokens=False, verbose=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= WINDOWS * LENGTH:
            break
    return np.asarray(ids[: WINDOWS * LENGTH]).reshape(WINDOWS, LENGTH)


def torch_nll(model, windows: np.ndarray, policy: dmr.RoutingPolicy) -> np.ndarray:  # type: ignore[no-untyped-def]
    x = torch.from_numpy(windows)
    with torch.no_grad(), dmr.patched(model, policy):
        logp = torch.log_softmax(model(x).logits[:, :-1].float(), -1)
    return -logp.gather(-1, x[:, 1:, None]).squeeze(-1).numpy()


def test_logits_match_pytorch(models):  # type: ignore[no-untyped-def]
    hf, lm = models
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    out = np.asarray(
        keras.ops.convert_to_numpy(lm({"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids)}))
    )
    assert np.abs(expected).max() > 5  # a trained model, not near-zero logits
    np.testing.assert_allclose(out, expected, rtol=0, atol=LOGIT_ATOL)


def test_dynamic_policy_perplexity_change_matches_pytorch(models, windows):  # type: ignore[no-untyped-def]
    hf, lm = models
    policy = dmr.TopP(p=0.6)
    t_native, t_dyn = (float(np.exp(torch_nll(hf, windows, p).mean())) for p in (dmr.StaticTopK(), policy))
    with dk.patched(lm, dmr.StaticTopK()):
        k_native = float(np.exp(token_nll(lm, windows).mean()))
    with dk.patched(lm, policy) as handle, dk.profile(lm) as report:
        k_dyn = float(np.exp(token_nll(lm, windows).mean()))
    assert abs(k_native / t_native - 1) <= PPL_RTOL and abs(k_dyn / t_dyn - 1) <= PPL_RTOL
    t_change, k_change = t_dyn / t_native - 1, k_dyn / k_native - 1
    assert t_change > 0  # the policy drops experts and costs some perplexity
    assert abs(k_change / t_change - 1) <= PPL_RTOL, (t_change, k_change)
    d = report.to_dict()
    assert d["executed_pairs"] < d["native_pairs"] and handle.executed_pairs() == d["executed_pairs"]


def test_unsupported_checkpoints_are_refused():  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.UnsupportedModelError, match="model_type"):
        mixtral_from_transformers(tiny_model("olmoe"))
    config = copy.deepcopy(tiny_model("mixtral").config)
    config.hidden_act = "gelu"
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(dmr.UnsupportedModelError, match=r"rope parameters .*yarn.*hidden_act='gelu'"):
        mixtral_backbone_config(config)
