"""lm-evaluation-harness integration (``--model dmr``, ``dmr-lm-eval``), offline on local tasks.

A multiple-choice task defined in a local YAML file reads the same JSONL file that ``dmr eval``'s
``piqa`` task reads from ``$DMR_DATA``, so the two harnesses score exactly the same requests.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed: pip install 'dynamic-moe-router-kit[lm-eval]'"
)

import dynamic_moe_router as dmr
from dynamic_moe_router.cli import main as dmr_main
from dynamic_moe_router.eval import encode_request, load_checkpoint, score_requests
from dynamic_moe_router.eval import lm_eval_harness as harness
from dynamic_moe_router.hf.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
REF_OLMOE = ROOT / "models" / "ref-olmoe"
TASK = "dmr_piqa_local"
#: piqa-shaped items (context "<query>Answer:", continuation " " + choice); golds and choice counts vary
ITEMS = [
    {"query": "Question: How do you open a jar?\n", "choices": ["twist the lid", "eat the jar"], "gold": 0},
    {"query": "Question: How do you dry wet hair?\n", "choices": ["use sand", "use a towel", "use water"],
     "gold": 1},
    {"query": "Question: Where does the sun rise?\n", "choices": ["in the west", "in the east"], "gold": 1},
    {"query": "Question: What keeps soup warm?\n", "choices": ["an open window", "a cold plate", "a lid"],
     "gold": 2},
]  # fmt: skip


@pytest.fixture(scope="module")
def offline():  # type: ignore[no-untyped-def]
    """No hub or dataset downloads (datasets reads HF_DATASETS_OFFLINE when it is imported)."""
    import datasets

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory, offline):  # type: ignore[no-untyped-def]
    """``root/eval/piqa.jsonl`` (``DMR_DATA=root``) and ``root/tasks/<TASK>.yaml`` over the same file."""
    root = tmp_path_factory.mktemp("lm_eval_data")
    (root / "eval").mkdir()
    jsonl = root / "eval" / "piqa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    (root / "README.md").write_text("test data\n")
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {json.dumps(str(jsonl))}}}\n"
        f"  cache_dir: {json.dumps(str(root / 'hf_datasets_cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}Answer:"\n'  # target_delimiter " " (the default) joins the choice
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny olmoe checkpoint with the reference tokenizer (float32 weights)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny_olmoe")
    tokenizer = AutoTokenizer.from_pretrained(REF_OLMOE)
    tiny_model("olmoe", vocab_size=len(tokenizer), max_position_embeddings=512,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


def task_manager(data: Path):  # type: ignore[no-untyped-def]
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(data / "tasks"), include_defaults=False)


@pytest.fixture
def lm_eval_cli(monkeypatch):  # type: ignore[no-untyped-def]
    """lm-eval's command line as a test runs it: the tasks of --include_path only (it would index its
    ~15,000 bundled tasks first, a minute here), and its log records left to pytest (its own handler
    would keep writing to the first test's captured stderr)."""
    import logging

    import lm_eval.tasks
    import lm_eval.utils

    class LocalTaskManager(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTaskManager)
    monkeypatch.setattr(lm_eval.utils, "_LOGGING_CONFIGURED", True)  # no handler of its own
    logger = logging.getLogger("lm_eval")
    level = logger.level
    yield
    logger.setLevel(level)


def run_lm_eval(model, data: Path, **model_args):  # type: ignore[no-untyped-def]
    import lm_eval

    kwargs = {"model": "dmr", "model_args": model_args} if model is None else {"model": model}
    return lm_eval.simple_evaluate(
        **kwargs, tasks=[TASK], task_manager=task_manager(data), log_samples=True, batch_size=4
    )


def test_dmr_is_registered_beside_lm_evals_own_models():  # type: ignore[no-untyped-def]
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    assert get_model("dmr") is harness.DMRLM and issubclass(harness.DMRLM, HFLM)
    assert get_model("hf") is HFLM  # lm-eval's own models are still found


@pytest.mark.parametrize("which", ["tiny", pytest.param("ref-olmoe", marks=pytest.mark.slow)])
def test_native_accuracy_equals_dmr_eval(which, tiny_dir, data, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    folder = tiny_dir if which == "tiny" else REF_OLMOE
    monkeypatch.setenv("DMR_DATA", str(data))
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times.\n")
    code = dmr_main(["eval", "--model", str(folder), "--text", str(text), "--tasks", "piqa", "--native",
                     "--json"])  # fmt: skip
    assert code == 0
    ours = json.loads(capsys.readouterr().out)["tasks"]["piqa"]
    res = run_lm_eval(None, data, pretrained=str(folder), policy="native")
    theirs = res["results"][TASK]
    assert ours["items"] == theirs["sample_len"] == len(ITEMS)
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    samples = sorted(res["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in samples] == ours["item_scores"]  # item by item
    # the log-likelihoods themselves agree, request by request
    model, tokenizer = load_checkpoint(folder)
    for s, item in zip(samples, ITEMS, strict=True):
        requests = [(item["query"] + "Answer:", " " + c) for c in item["choices"]]
        assert [tuple(a) for a in s["arguments"]] == requests
        expected = [r.logprob for r in score_requests(model, tokenizer, requests)]
        assert [r[0][0] for r in s["resps"]] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    config = res["config"]
    assert config["dmr_policy"] is None and config["dmr_policy_source"] == "native routing (policy=native)"
    profile = config["dmr_profile"]  # the native routing is profiled too
    assert profile["tokens"] > 0 and profile["routed_flop_reduction"] == 0.0


def test_cli_runs_a_dynamic_policy_and_prints_the_flop_line(tiny_dir, data, tmp_path, lm_eval_cli, capsys):  # type: ignore[no-untyped-def]
    policy = tmp_path / "policy.json"
    dmr.TopP(p=0.5).save(policy)
    out = tmp_path / "results"
    code = harness.main(["--model", "dmr", "--model_args", f"pretrained={tiny_dir},policy={policy}",
                         "--tasks", TASK, "--include_path", str(data / "tasks"), "--batch_size", "4",
                         "--output_path", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert re.search(rf"\|\s*{TASK}\s*\|.*\|\s*acc\s*\|", printed)  # lm-eval's table
    assert f"dmr: policy {dmr.TopP(p=0.5).describe()} (from {policy})" in printed
    match = re.search(
        r"dmr: routed-expert FLOPs: ([\d.]+)% fewer than native; .*\(mean k ([\d.]+), ", printed
    )
    assert match, printed
    reduction, mean_k = float(match[1]), float(match[2])
    assert 0 < reduction < 100 and 1 <= mean_k < 4  # tiny olmoe: native k = 4
    (saved,) = out.rglob("results_*.json")  # lm-eval's results carry the profile
    profile = json.loads(saved.read_text())["config"]["dmr_profile"]
    assert (
        round(100 * profile["routed_flop_reduction"], 1) == reduction
        and profile["policy"] == dmr.TopP(p=0.5).describe()
    )


def test_the_saved_policy_runs_by_default_and_the_model_ends_unpatched(tiny_dir, data, tmp_path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "with_policy"
    shutil.copytree(tiny_dir, folder)
    dmr.TopP(p=0.5).save_pretrained(folder)
    lm = harness.DMRLM(pretrained=str(folder), batch_size=4)  # no policy=: the folder's dmr_policy.json
    assert lm.dmr_policy == dmr.TopP(p=0.5) and lm.dmr_policy_source == str(folder / "dmr_policy.json")
    res = run_lm_eval(lm, data)
    assert res["config"]["dmr_profile"]["routed_flop_reduction"] > 0  # it ran patched
    assert lm.dmr_report is not None and lm.dmr_report.to_dict()["tokens"] > 0
    assert dmr.get_patch(lm.model) is None  # and was unpatched at the end
    fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([[41, 518, 80, 987, 12, 7, 300]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, fresh(ids).logits)
    without = harness.resolve_policy(None, tiny_dir)
    assert without[0] is None and without[1].startswith("native routing (no policy=")


def test_request_encoding_matches_lm_eval(tiny_dir, monkeypatch):  # type: ignore[no-untyped-def]
    from lm_eval.api.instance import Instance

    lm = harness.DMRLM(pretrained=str(tiny_dir), policy="native")
    seen = []
    monkeypatch.setattr(
        lm, "_loglikelihood_tokens", lambda reqs, **kw: seen.extend(reqs) or [(0.0, True)] * len(reqs)
    )
    pairs = [
        ("Question: How?\nAnswer:", " twist the lid"),
        ("Answer: ", "yes"),  # trailing whitespace moves to the continuation
        ("She said  \n", "hello"),
        ("", "Hello there."),  # empty context: the beginning-of-text token
        ("", "<|endoftext|>Hi"),  # ... unless the continuation starts with it
        ("don'", "t"),  # a merge across the boundary
    ]
    lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    assert [(ctx, cont) for _, ctx, cont in seen] == [encode_request(lm.tokenizer, *p) for p in pairs]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("top_q", dmr.PolicyFileError, "unknown policy 'top_q'"),
        ("top_p:p=2", dmr.PolicyError, "p must be in"),
        ("missing.json", dmr.PolicyFileError, "does not exist"),
        ("EMPTY_DIR", dmr.PolicyNotFoundError, "no dmr_policy.json"),
        ("auto", dmr.PolicyNotFoundError, "no dmr_policy.json"),
        (3, dmr.PolicyFileError, "expected a policy JSON file"),
    ],
)
def test_bad_policy_typed_error_before_loading(value, error, message, tiny_dir, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    from lm_eval.models.huggingface import HFLM

    def load(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model was loaded before the policy was checked")

    monkeypatch.setattr(HFLM, "__init__", load)
    value = str(tmp_path) if value == "EMPTY_DIR" else value
    with pytest.raises(error, match=re.escape(message)):
        harness.DMRLM(pretrained=str(tiny_dir), policy=value)


def test_cli_bad_policy_exits_2_with_one_line(tiny_dir, data, lm_eval_cli, capsys):  # type: ignore[no-untyped-def]
    code = harness.main(["--model", "dmr", "--model_args", f"pretrained={tiny_dir},policy=top_q",
                         "--tasks", TASK, "--include_path", str(data / "tasks")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "error: policy='top_q' in --model_args: " in err and "Traceback" not in err


def test_missing_lm_eval_names_the_extra(monkeypatch, capsys):  # type: ignore[no-untyped-def]
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(dmr.MissingDependencyError, match=re.escape("dynamic-moe-router-kit[lm-eval]")):
        harness._require_lm_eval()
    assert harness.main(["--model", "dmr"]) == 2
    assert "[lm-eval]" in capsys.readouterr().err
