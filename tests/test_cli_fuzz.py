"""Every ``dmr`` subcommand, every argument, bad values: exit 2, one message on stderr, no traceback,
and no model loaded (the checks run before any model or data is touched).

The table is checked against the parser itself: an argument added to ``dmr`` without bad-value
cases here fails ``test_every_argument_has_bad_values``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamic_moe_router import cli
from dynamic_moe_router.cli import build_parser, main
from dynamic_moe_router.policies import TopP

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = str(ROOT / "models" / "ref-mixtral")
OLMOE = str(ROOT / "models" / "ref-olmoe")


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Bad inputs on disk: a directory, a plain file, non-UTF-8 and empty texts, a config-only
    checkpoint without tokenizer, a non-MoE checkpoint, a broken config, a result JSON that is not one."""
    root = tmp_path_factory.mktemp("bad")
    (root / "dir").mkdir()
    (root / "file.txt").write_text("hello world\n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, na\xefve\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "notok").mkdir()
    (root / "notok" / "config.json").write_text(json.dumps({"model_type": "olmoe"}), encoding="utf-8")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    (root / "result.json").write_text('{"models": "no"}', encoding="utf-8")
    TopP(p=0.5).save(root / "policy.json")
    (root / "bench-out").mkdir()
    (root / "bench-out" / "pareto.png").write_bytes(b"\x89PNG")  # an earlier plot
    # partial-results files: one left by an earlier run, and malformed ones (valid JSON, wrong shape)
    for folder, name, text in [
        ("stale", "policy.json.partial.json", '{"measurements": {}}'),
        ("notdict", "policy.json.partial.json", "[1, 2]"),
        ("nomeas", "policy.json.partial.json", '{"kind": "calibration.partial"}'),
        ("badmeas", "policy.json.partial.json", '{"measurements": {"native": "x"}}'),
        ("stale-bench", "quality_flops.partial.json", '{"results": {}, "elapsed_s": 0}'),
        ("notdict-bench", "quality_flops.partial.json", '"text"'),
        ("noresults-bench", "quality_flops.partial.json", '{"elapsed_s": 1.0}'),
        ("noelapsed-bench", "quality_flops.partial.json", '{"results": {}}'),
        ("badrows-bench", "quality_flops.partial.json", '{"results": {"m": {"rows": 3}}, "elapsed_s": 0}'),
    ]:
        (root / folder).mkdir()
        (root / folder / name).write_text(text, encoding="utf-8")
    return root


def T(root: Path, name: str) -> str:
    return str(root / name)


# For each (command, dest): a list of (argv fragment, text the message must contain).
# ``{root}`` is replaced by the fixture folder. ``BASE`` are the valid arguments the fragment joins.
BASE = {
    "families": [],
    "inspect": ["tiny:mixtral"],
    "profile": ["tiny:mixtral"],
    "eval": ["--model", MIXTRAL, "--text", "{root}/file.txt"],
    "calibrate": ["--model", MIXTRAL, "--target-reduction", "0.3", "--out", "{root}/out/policy.json"],
    "bench": ["--out-dir", "{root}/bench-out"],
    "report": ["--model", MIXTRAL, "--text", "{root}/file.txt", "--out", "{root}/out/report.html"],
}
MODEL_BAD = [
    (["{root}/missing"], "neither a model directory"),
    (["{root}/file.txt"], "it is a file"),
    (["{root}/dir"], "no config.json"),
    (["{root}/llama"], "not a supported MoE family"),
    (["{root}/broken"], "not a readable JSON"),
    (["tiny:llama"], "not a supported MoE family"),
    (["tiny:"], "not a supported MoE family"),
]
CHECKPOINT_BAD = [
    ("{root}/missing", "is missing"),
    ("{root}/file.txt", "is a file"),
    ("{root}/dir", "no config.json"),
    ("{root}/notok", "no tokenizer files"),
    ("{root}/llama", "not a supported MoE family"),
    ("tiny:mixtral", "no tokenizer"),
]
POLICY_BAD = [
    ("top_p:p=2", "p must be in"),
    ("nucleus:p=0.5", "unknown policy"),
    ("top_p:p=abc", "not a number"),
    ("top_p:q=0.5", "q"),
    ("", "empty policy"),
    ("{root}/missing.json", "does not exist"),
    ("{root}/file.txt.json", "does not exist"),
]
JSON_BAD = [(["--json=yes"], "--json")]


def ints(flag: str, *values: str) -> list[tuple[list[str], str]]:
    return [([flag, v], flag) for v in values]


CASES: dict[tuple[str, str], list[tuple[list[str], str]]] = {
    ("families", "json"): JSON_BAD,
    ("inspect", "model"): MODEL_BAD,
    ("inspect", "json"): JSON_BAD,
    ("inspect", "policy"): [(["--policy", v], m) for v, m in POLICY_BAD],
    ("profile", "model"): MODEL_BAD,
    ("profile", "policy"): [(["--policy", v], m) for v, m in POLICY_BAD],
    ("profile", "tokens"): ints("--tokens", "0", "-3", "abc", "1.5"),
    ("profile", "batch"): ints("--batch", "0", "-1", "two"),
    ("profile", "seed"): ints("--seed", "-1", "x", str(2**64)),
    ("profile", "text"): [
        (["--text", "{root}/dir"], "is a directory"),
        (["--text", "{root}/missing.txt"], "does not exist"),
        (["--text", "{root}/file.txt"], "has no tokenizer"),  # tiny:mixtral has none
        (["--text", "{root}/file.txt", "{root}/file.txt"], "unrecognized arguments"),
    ],
    ("profile", "encoding"): [
        (["--encoding", "klingon"], "unknown text encoding"),
        (["--encoding", "latin-1"], "--encoding: only applies to --text"),  # random ids: no text
    ],
    ("profile", "backend"): [(["--backend", "gpu"], "invalid choice")],
    ("profile", "json"): JSON_BAD,
    ("eval", "model"): [(["--model", v], m) for v, m in CHECKPOINT_BAD],
    ("eval", "policy"): [(["--policy", v], m) for v, m in POLICY_BAD],
    ("eval", "native"): [
        (["--native", "--policy", "top_p:p=0.5"], "--native: evaluates the native routing only"),
        (["--native=1"], "--native"),
    ],
    ("eval", "no_native"): [
        (["--no-native"], "only meaningful with --policy"),
        (["--no-native=1"], "--no-native"),
    ],
    ("eval", "text"): [
        (["--text", "{root}/dir"], "is a directory"),
        (["--text", "{root}/missing.txt"], "does not exist"),
        (["--text", "{root}/latin1.txt"], "offset 3"),
        (["--text", "{root}/latin1.jsonl"], "offset 28 (line 2)"),
        (["--text", "{root}/empty.txt"], "holds no text"),
        (["--text", "{root}/file.txt", "--corpus", "gutenberg_test"], "not allowed with --text"),
    ],
    ("eval", "encoding"): [(["--encoding", "utf-99"], "unknown text encoding")],
    ("eval", "corpus"): [(["--corpus", "imagenet"], "invalid choice")],
    ("eval", "tasks"): [
        (["--tasks", "mmlu"], "unknown tasks"),
        (["--tasks", ","], "unknown tasks"),
        (["--tasks", "blimp,foo"], "unknown tasks ['foo']"),
    ],
    ("eval", "limit"): [
        *ints("--limit", "0", "-3", "many"),
        (["--limit", "5"], "--limit: only applies to tasks"),  # --text: no task by default
        (["--tasks", "none", "--limit", "5"], "--limit: only applies to tasks"),
    ],
    ("eval", "max_tokens"): ints("--max-tokens", "0", "-1", "1e3"),
    ("eval", "context"): [
        *ints("--context", "0", "-512", "x"),
        (["--context", "100000"], "max_position_embeddings"),
    ],
    ("eval", "stride"): [*ints("--stride", "0", "-1"), (["--stride", "1000"], "larger than --context")],
    ("eval", "batch_size"): ints("--batch-size", "0", "-4", "x"),
    ("eval", "out"): [
        (["--out", "{root}/dir"], "is a directory"),
        (["--out", "{root}/newdir/"], "is a directory"),
        (["--out", "{root}/file.txt/result.json"], "is a file"),
        (["--out", "{root}/file.txt"], "same file as --text"),
        (["--out", "{root}/../{root_name}/file.txt"], "same file as --text"),
        (["--policy", "{root}/policy.json", "--out", "{root}/policy.json"], "same file as --policy"),
        (["--out", MIXTRAL + "/config.json"], "same file as --model"),
    ],
    ("eval", "json"): JSON_BAD,
    ("calibrate", "model"): [(["--model", v], m) for v, m in CHECKPOINT_BAD],
    ("calibrate", "target_reduction"): [
        (["--target-reduction", v], "--target-reduction") for v in ("0", "1", "1.5", "-0.1", "nan", "x")
    ],
    ("calibrate", "family"): [(["--family", "nucleus"], "invalid choice")],
    ("calibrate", "out"): [
        (["--out", "{root}/dir"], "is a directory"),
        (["--out", "{root}/file.txt/p.json"], "is a file"),
        (["--out", MIXTRAL + "/config.json"], "same file as --model"),
    ],
    ("calibrate", "tokens"): ints("--tokens", "0", "100", "-1", "x"),
    ("calibrate", "train_steps"): ints("--train-steps", "0", "-2", "x", "1.5"),
    ("calibrate", "train_windows"): ints("--train-windows", "0", "-1", "x", "2.5"),
    ("calibrate", "budget"): [
        (["--budget", "per-token"], "invalid choice"),
        (["--budget", "quantile", "--no-learned"], "only the learned family has a budget kind"),
    ],
    ("calibrate", "global_only"): [(["--global-only=1"], "--global-only")],
    ("calibrate", "no_learned"): [
        (["--no-learned=1"], "--no-learned"),
        (["--no-learned", "--family", "top_p"], "already names the one family to calibrate"),
    ],
    ("calibrate", "report"): [
        (["--report", "{root}/dir"], "is a directory"),
        (["--report", "{root}/out/policy.json"], "the same file as --out"),
        (["--report", "{root}/out/policy.json.partial.json"], "--report"),
        (["--report", "{root}/out/policy.json.partial.json"], "the partial-results file of --out"),
        (["--report", MIXTRAL + "/config.json"], "same file as --model"),
    ],
    ("calibrate", "resume"): [
        (["--resume"], "no partial calibration"),
        (["--out", "{root}/stale/policy.json"], "pass --resume to continue it, or delete it to start over"),
        (["--out", "{root}/stale/policy.json"], "{root}/stale/policy.json.partial.json"),
        *[
            (["--out", f"{{root}}/{d}/policy.json", "--resume"], "not a dmr calibrate partial-results file")
            for d in ("notdict", "nomeas", "badmeas")
        ],
    ],
    ("calibrate", "json"): JSON_BAD,
    ("bench", "models"): [
        (["--models", "{root}/missing"], "--models"),
        (["--models", "tiny:mixtral"], "no tokenizer"),
        (["--models", "{root}/notok"], "no tokenizer files"),
        (["--models", MIXTRAL, MIXTRAL], "listed twice"),
    ],
    ("bench", "out_dir"): [
        (["--out-dir", "{root}/file.txt"], "is a file"),
        (["--out-dir", "{root}/file.txt/sub"], "is a file"),
        (["--out-dir", ""], "empty path"),
    ],
    ("bench", "quick"): [(["--quick=1"], "--quick")],
    ("bench", "families"): [
        (["--families", "nucleus"], "invalid choice"),
        (["--families"], "expected at least one"),
    ],
    ("bench", "ppl_tokens"): ints("--ppl-tokens", "0", "-1", "x"),
    ("bench", "blimp_limit"): ints("--blimp-limit", "0", "x"),
    ("bench", "lambada_limit"): ints("--lambada-limit", "0", "-150"),
    ("bench", "confirm_blimp_limit"): [
        *ints("--confirm-blimp-limit", "-1", "x"),
        (["--confirm-blimp-limit", "0"], "must both be 0 (no accuracy confirmation) or both positive"),
    ],
    ("bench", "confirm_lambada_limit"): [
        *ints("--confirm-lambada-limit", "-2", "1.5"),
        (["--confirm-lambada-limit", "0"], "got 50 and 0"),
    ],
    ("bench", "calibration_tokens"): ints("--calibration-tokens", "0", "511", "x"),
    ("bench", "resume"): [
        (["--resume"], "no partial results"),
        (["--out-dir", "{root}/stale-bench"], "pass --resume to continue it, or delete it to start over"),
        (["--out-dir", "{root}/stale-bench"], "{root}/stale-bench/quality_flops.partial.json"),
        *[
            (["--out-dir", f"{{root}}/{d}-bench", "--resume"], "not a dmr bench partial-results file")
            for d in ("notdict", "noresults", "noelapsed", "badrows")
        ],
    ],
    ("bench", "replot"): [
        (["--replot", "{root}/missing.json"], "does not exist"),
        (["--replot", "{root}/dir"], "is a directory"),
        (["--replot", "{root}/result.json"], "not a dmr bench result"),
        (["--replot", "{root}/result.json", "--quick"], "only redraws the plot"),
        *[
            (
                ["--replot", "{root}/result.json", *extra],
                f"only redraws the plot, so {extra[0]} would be ignored",
            )
            for extra in (
                ["--families", "top_p"],
                ["--ppl-tokens", "256"],
                ["--blimp-limit", "1"],
                ["--lambada-limit", "2"],
                ["--confirm-blimp-limit", "3"],
                ["--confirm-lambada-limit", "30"],
                ["--calibration-tokens", "512"],
                ["--quick"],
                ["--resume"],
                ["--models", MIXTRAL],
            )
        ],
        (["--replot", "{root}/bench-out/pareto.png"], "same file as --replot"),
    ],
    ("bench", "json"): JSON_BAD,
    ("report", "model"): [(["--model", v], m) for v, m in CHECKPOINT_BAD],
    ("report", "text"): [
        (["--text", "{root}/dir"], "is a directory"),
        (["--text", "{root}/missing.txt"], "does not exist"),
        (["--text", "{root}/latin1.txt"], "offset 3"),
        (["--text", "{root}/empty.txt"], "holds no text"),
    ],
    ("report", "encoding"): [(["--encoding", "utf-99"], "unknown text encoding")],
    ("report", "policy"): [(["--policy", v], m) for v, m in POLICY_BAD],
    ("report", "tokens"): ints("--tokens", "0", "-1", "x"),
    ("report", "bench"): [
        (["--bench", "{root}/missing.json"], "does not exist"),
        (["--bench", "{root}/file.txt"], "is not readable JSON"),
        (["--bench", "{root}/result.json"], "is not a dmr bench result"),
    ],
    ("report", "out"): [
        (["--out", "{root}/dir"], "is a directory"),
        (["--out", "{root}/file.txt"], "same file as --text"),
        (["--out", MIXTRAL + "/config.json"], "same file as --model"),
    ],
    ("report", "json"): JSON_BAD,
}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_argument_has_bad_values():  # type: ignore[no-untyped-def]
    expected = {
        (name, action.dest)
        for name, sub in _subcommands().items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction)
    }
    assert set(BASE) == set(_subcommands())
    assert expected == set(CASES), f"missing: {expected - set(CASES)}; stale: {set(CASES) - expected}"


PARAMS = [
    pytest.param(command, dest, argv, message, id=f"{command}-{dest}-{i}")
    for (command, dest), cases in CASES.items()
    for i, (argv, message) in enumerate(cases)
]


@pytest.fixture
def no_model_loads(monkeypatch):  # type: ignore[no-untyped-def]
    """Any attempt to load a model, a checkpoint or a data file fails the test."""
    import transformers

    import dynamic_moe_router.eval as ev
    import dynamic_moe_router.hf.tiny as tiny

    def forbidden(*_, **__):  # type: ignore[no-untyped-def]
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(ev, "load_checkpoint", forbidden)
    monkeypatch.setattr(tiny, "tiny_model", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)


@pytest.mark.parametrize(("command", "dest", "argv", "message"), PARAMS)
def test_bad_value_exits_2_with_one_message(command, dest, argv, message, files, capsys, no_model_loads):  # type: ignore[no-untyped-def]
    base = [a.replace("{root}", str(files)) for a in BASE[command]]
    bad = [a.replace("{root_name}", files.name).replace("{root}", str(files)) for a in argv]
    message = message.replace("{root}", str(files))
    if dest == "model" and command in ("inspect", "profile"):
        base = []  # the positional is replaced
    if dest == "model" and command in ("eval", "calibrate"):
        base = base[2:]
    code = main([command, *base, *bad])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(("error: ", f"dmr {command}: error: ", "dmr: error: ")), err
    assert message in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", MIXTRAL, "--limit", "0"],
        ["calibrate", "--model", "tiny:mixtral", "--target-reduction", "0.3", "--out", "p.json"],
    ],
)
def test_console_script_prints_no_traceback(argv, tmp_path):  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        [sys.executable, "-m", "dynamic_moe_router.cli", *argv],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"dmr {argv[0]}: error: argument")


def test_backend_and_calibration_choices_match_the_library():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.calibrate import FAMILIES as CALIBRATION_FAMILIES
    from dynamic_moe_router.eval import CORPORA
    from dynamic_moe_router.sweeps.quality import FAMILIES

    assert tuple(CALIBRATION_FAMILIES) == cli.CLI_CALIBRATION_FAMILIES
    assert tuple(CORPORA) == cli.CLI_CORPORA
    assert FAMILIES == cli.CLI_SWEEP_FAMILIES


def test_broken_pipe_exits_quietly():  # type: ignore[no-untyped-def]
    proc = subprocess.run(
        f"{sys.executable} -m dynamic_moe_router.cli families --json | head -1",
        shell=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.stdout == "{\n" and proc.stderr == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--model", MIXTRAL, "--encoding", "latin-1"], "--encoding: only applies to --text files"),
        (["eval", "--model", MIXTRAL, "--tasks", "none", "--limit", "3"], "--limit: only applies to tasks"),
        (["profile", MIXTRAL, "--encoding", "cp1252"], "--encoding: only applies to --text"),
    ],
)
def test_options_that_would_be_ignored_are_refused(argv, message, capsys, no_model_loads):  # type: ignore[no-untyped-def]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and message in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", MIXTRAL, "--encoding", "utf-8", "--tasks", "none"],  # the default, harmless
        ["eval", "--model", MIXTRAL, "--text", "{root}/file.txt", "--tasks", "blimp", "--limit", "1"],
        ["bench", "--replot", "{root}/result.json", "--out-dir", "{root}/bench-out"],
    ],
)
def test_cross_checks_pass_valid_combinations(argv, files):  # type: ignore[no-untyped-def]
    parser = build_parser()
    args = parser.parse_args([a.replace("{root}", str(files)) for a in argv])
    assert args._check(args) is None


def test_symlinked_output_is_the_same_file_as_the_input(files, capsys, no_model_loads, tmp_path):  # type: ignore[no-untyped-def]
    link = tmp_path / "link.txt"
    link.symlink_to(files / "file.txt")
    code = main(["eval", "--model", MIXTRAL, "--text", str(files / "file.txt"), "--out", str(link)])
    assert code == 2 and "same file as --text" in capsys.readouterr().err
