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


def test_the_first_command_is_the_main_job():  # type: ignore[no-untyped-def]
    first = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S).group(1)
    assert "pip install" in first and first.strip().endswith("dmr bench")
