"""The README's examples run, and its families table is the registry's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dynamic_moe_router.hf.families import families_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_families_table_matches_the_registry():  # type: ignore[no-untyped-def]
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- families-table")[1].split("-->", 1)[1].split("<!-- /families-table -->")[0]
    assert table.strip() == families_markdown()


BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_examples_run(index, tmp_path, monkeypatch, capsys):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # every example prints something


COMMANDS = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_first_command_is_the_lean_main_job():  # type: ignore[no-untyped-def]
    first = COMMANDS[0].strip()
    assert "pip install" in first and first.endswith("dmr bench")
    extras = set(re.findall(r"\[([a-z,]+)\]", first)[0].split(","))
    assert extras == {"bench"}  # the PyTorch main job only: no JAX, TensorFlow, docs or test tools


def test_ci_runs_the_readme_commands_verbatim():  # type: ignore[no-untyped-def]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    second = COMMANDS[1].strip()
    assert second.endswith("pytest -n auto") and second in ci  # the test command, as a line of CI
    assert "dmr bench" in ci
