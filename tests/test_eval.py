"""Evaluation harness: scoring checked against hand-computed log-likelihoods on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.cli import main
from dynamic_moe_router.eval import encode_request, evaluate, evaluate_task, perplexity, score_requests
from dynamic_moe_router.hf.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "models" / "ref-mixtral")


@pytest.fixture(scope="module")
def model(tokenizer):  # type: ignore[no-untyped-def]
    return tiny_model("mixtral", vocab_size=len(tokenizer), max_position_embeddings=512)


def manual_logprob(model, ids: list[int], n_cont: int) -> tuple[float, bool]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[1:])
    rows = torch.arange(len(ids) - 1 - n_cont, len(ids) - 1)
    chosen = lp[rows, targets[rows]]
    return float(chosen.sum()), bool((lp[rows].argmax(-1) == targets[rows]).all())


def test_loglikelihoods_match_hand_computation(model, tokenizer):  # type: ignore[no-untyped-def]
    requests = [
        ("The cat sat on the", " mat"),
        ("Question: Which is a fruit?\nAnswer:", " an apple"),
        ("", "Colorless green ideas sleep furiously."),
        ("A much longer context that goes on for a while, with commas, and more words", " end."),
    ]
    for batch_size in (1, 3, 8):
        scored = score_requests(model, tokenizer, requests, batch_size=batch_size)
        for (context, continuation), s in zip(requests, scored, strict=True):
            ctx, cont = encode_request(tokenizer, context, continuation)
            expected, greedy = manual_logprob(model, ctx + cont, len(cont))
            assert s.tokens == len(cont) > 0
            assert s.logprob == pytest.approx(expected, abs=1e-4)
            assert s.greedy == greedy


def test_request_encoding_conventions(tokenizer):  # type: ignore[no-untyped-def]
    ctx, cont = encode_request(tokenizer, "", "Hello there.")
    assert ctx == [tokenizer.bos_token_id]  # the beginning-of-text token (here also end-of-text)
    assert tokenizer.decode(cont) == "Hello there."
    ctx, cont = encode_request(tokenizer, "Hello", " there")
    assert ctx + cont == tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    # trailing whitespace of the context moves to the continuation, as lm-evaluation-harness does
    assert encode_request(tokenizer, "Hello ", "there") == (ctx, cont)
    # an empty context before a continuation that starts with that token: the token is the context
    hi = tokenizer("Hi", add_special_tokens=False)["input_ids"]
    assert encode_request(tokenizer, "", tokenizer.bos_token + "Hi") == ([tokenizer.bos_token_id], hi)


@pytest.mark.parametrize(("context", "stride"), [(16, 16), (16, 5), (64, 64)])
def test_perplexity_scores_every_token_once(model, tokenizer, context, stride):  # type: ignore[no-untyped-def]
    docs = [
        "It was the best of times, it was the worst of times, it was the age of wisdom.",
        "Call me Ishmael.",
    ]
    res = perplexity(model, tokenizer, docs, context=context, stride=stride, batch_size=2)
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert res["tokens"] == len(ids) - 1
    if stride == context:  # non-overlapping windows: the hand computation is one pass per window
        total = 0.0
        for s in range(0, len(ids) - 1, context):
            window = ids[s : s + context + 1]
            total += -manual_logprob(model, window, len(window) - 1)[0]
        assert res["nll"] == pytest.approx(total / (len(ids) - 1), abs=1e-5)
        assert res["ppl"] == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-5)
    lo, hi = res["ppl_ci95"]
    assert lo <= res["ppl"] <= hi


def write_eval_data(root: Path) -> None:
    (root / "eval" / "blimp").mkdir(parents=True)
    import lzma

    blimp = [
        {"sentence_good": "The dogs bark.", "sentence_bad": "The dogs barks.", "UID": "agreement"},
        {"sentence_good": "She is here.", "sentence_bad": "She are here.", "UID": "agreement"},
        {"sentence_good": "Who left?", "sentence_bad": "Who left what?", "UID": "islands"},
    ]
    with lzma.open(root / "eval" / "blimp" / "blimp.jsonl.xz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in blimp))
    piqa = [
        {
            "query": "Question: How do you open a jar?\n",
            "choices": ["twist the lid", "eat the jar"],
            "gold": 0,
        },
        {"query": "Question: How do you dry hair?\n", "choices": ["use a towel", "use water"], "gold": 0},
    ]
    (root / "eval" / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))


def test_task_metrics_follow_the_scores(model, tokenizer, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    write_eval_data(tmp_path)
    monkeypatch.setenv("DMR_DATA", str(tmp_path))
    res = evaluate_task(model, tokenizer, "piqa")
    hits, norm_hits = [], []
    for r in [json.loads(line) for line in (tmp_path / "eval" / "piqa.jsonl").read_text().splitlines()]:
        reqs = [(r["query"] + "Answer:", " " + c) for c in r["choices"]]
        ll = [s.logprob for s in score_requests(model, tokenizer, reqs)]
        hits.append(float(ll.index(max(ll)) == r["gold"]))
        norm = [v / len(c) for v, c in zip(ll, r["choices"], strict=True)]  # lm-eval: len(choice)
        norm_hits.append(float(norm.index(max(norm)) == r["gold"]))
    assert res["items"] == 2 and res["acc"] == sum(hits) / 2 and res["acc_norm"] == sum(norm_hits) / 2
    blimp = evaluate_task(model, tokenizer, "blimp", limit=1)  # first item of each paradigm
    assert blimp["items"] == 2 and set(blimp["paradigms"]) == {"agreement", "islands"}


def test_missing_task_data(tmp_path, monkeypatch, model, tokenizer):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DMR_DATA", str(tmp_path))
    with pytest.raises(dmr.DataNotFoundError, match=r"hellaswag\.jsonl' is missing"):
        evaluate_task(model, tokenizer, "hellaswag")


def test_evaluate_reports_flops_and_data(model, tokenizer, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    write_eval_data(tmp_path)
    text = tmp_path / "corpus.jsonl"
    text.write_text(json.dumps({"text": "It was a dark and stormy night; the rain fell in torrents."}) + "\n")
    res = evaluate(model, tokenizer, policy=dmr.StaticTopK(k=1), corpora=[str(text)], tasks=["piqa"])
    assert res["perplexity"][str(text)]["documents"] == 1 and res["perplexity"][str(text)]["file"] == str(
        text
    )
    assert res["tasks"]["piqa"]["file"].endswith("piqa.jsonl")
    assert res["flops"]["routed_flop_reduction"] == 0.5 and res["policy"]["_type"] == "static_top_k"


def test_cli_eval_round_trips_a_policy_file(tmp_path, capsys):  # type: ignore[no-untyped-def]
    policy = tmp_path / "policy.json"
    dmr.RelativeThreshold(beta=0.5).save(str(policy))
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times.\n")
    out = tmp_path / "result.json"
    code = main(["eval", "--model", str(ROOT / "models" / "ref-mixtral"), "--text", str(text),
                 "--policy", str(policy), "--out", str(out), "--json"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and json.loads(out.read_text()) == printed
    assert dmr.policies.policy_from_dict(printed["policy"]) == dmr.RelativeThreshold(beta=0.5)
    assert printed["tasks"] == {} and printed["perplexity"][str(text)]["tokens"] > 0


def test_cli_eval_errors(tmp_path, capsys):  # type: ignore[no-untyped-def]
    assert main(["eval", "--model", str(tmp_path), "--text", "x.txt"]) == 2
    assert "no config.json" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert main(["eval", "--model", str(ROOT / "models" / "ref-olmoe"), "--text", str(empty)]) == 2
    assert "holds no text" in capsys.readouterr().err
    tiny_model("olmoe").save_pretrained(tmp_path / "no_tokenizer")
    assert main(["eval", "--model", str(tmp_path / "no_tokenizer"), "--text", str(empty)]) == 2
    assert "no tokenizer files" in capsys.readouterr().err


def test_cli_eval_policy_reports_the_change_against_native(tmp_path, capsys):  # type: ignore[no-untyped-def]
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 20)
    model = str(ROOT / "models" / "ref-mixtral")
    base = ["eval", "--model", model, "--text", str(text), "--context", "64", "--json"]
    assert main([*base, "--policy", "static_top_k:k=1"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no progress bar under --json
    res = json.loads(out)
    (name,) = res["perplexity"]
    delta = res["delta_vs_native"]["perplexity"][name]
    native_ppl = res["native"]["perplexity"][name]["ppl"]
    assert delta["native_ppl"] == native_ppl and res["native"]["flops"]["routed_flop_reduction"] == 0.0
    assert delta["rel_change"] == pytest.approx(res["perplexity"][name]["ppl"] / native_ppl - 1.0)
    assert res["flops"]["routed_flop_reduction"] == 0.5 and delta["rel_change"] > 0
    # the native policy reproduces native: no change
    assert main([*base, "--policy", "static_top_k"]) == 0
    same = json.loads(capsys.readouterr().out)["delta_vs_native"]["perplexity"][name]
    assert same["rel_change"] == pytest.approx(0.0, abs=1e-5)
    assert main([*base, "--policy", "static_top_k", "--no-native"]) == 0
    assert "delta_vs_native" not in json.loads(capsys.readouterr().out)


def test_native_is_evaluated_once_per_model_and_data(model, tokenizer, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.eval.runner as runner

    text = tmp_path / "t.txt"
    text.write_text("Colorless green ideas sleep furiously. " * 40)
    calls = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    settings = {"corpora": [str(text)], "tasks": [], "context": 32}
    first = runner.evaluate_native(model, tokenizer, **settings)
    assert runner.evaluate_native(model, tokenizer, **settings) is first and len(calls) == 1
    runner.evaluate_native(model, tokenizer, **{**settings, "context": 16})  # other settings: new run
    text.write_text("Another text entirely, which changes the file. " * 40)  # same path, new content
    runner.evaluate_native(model, tokenizer, **settings)
    assert len(calls) == 3


def test_text_files_in_other_encodings(tmp_path):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.eval import read_text_file

    path = tmp_path / "latin1.txt"
    path.write_bytes("na\xefve caf\xe9\r\nline".encode("latin-1"))
    with pytest.raises(dmr.errors.TextDecodeError, match=r"byte 0xef at offset 2.*--encoding") as info:
        read_text_file(path)
    assert info.value.offset == 2 and info.value.path == str(path)
    assert read_text_file(path, encoding="latin-1") == ["naïve café\nline"]
    with pytest.raises(dmr.DataNotFoundError, match="is a directory"):
        read_text_file(tmp_path)


def test_cli_profile_on_text(tmp_path, capsys):  # type: ignore[no-untyped-def]
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 10)
    model = str(ROOT / "models" / "ref-mixtral")
    assert main(["profile", model, "--text", str(text), "--tokens", "16", "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 32 and report["routed_flop_reduction"] > 0
    assert main(["profile", model, "--text", str(text), "--tokens", "512", "--batch", "4"]) == 2
    err = capsys.readouterr().err
    assert "fewer than --batch x --tokens = 2048" in err and "Traceback" not in err


def test_task_items_are_parsed_once_per_file_version(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import os

    import dynamic_moe_router.eval.tasks as tasks

    write_eval_data(tmp_path)
    monkeypatch.setenv("DMR_DATA", str(tmp_path))
    first, _ = tasks.load_items("blimp", 1)
    monkeypatch.setattr(tasks, "read_jsonl", lambda *_: pytest.fail("the file was parsed again"))
    assert tasks.load_items("blimp", 1)[0] == first and len(first) == 2
    monkeypatch.undo()
    monkeypatch.setenv("DMR_DATA", str(tmp_path))
    path = tmp_path / "eval" / "piqa.jsonl"
    assert len(tasks.load_items("piqa")[0]) == 2
    path.write_text(path.read_text().splitlines()[0] + "\n")  # the file changes: read again
    os.utime(path, (1, 1))
    assert len(tasks.load_items("piqa")[0]) == 1
