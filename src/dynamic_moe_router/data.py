"""Where the shared data lives, and readers for its files (read in place, never copied).

The data folder is ``$DMR_DATA`` when set, else the first ``shared/data`` folder found beside or
above the current directory or this repository (``../shared/data`` for a checkout next to
``shared/``). A missing folder or file raises :class:`~dynamic_moe_router.errors.DataNotFoundError`
naming the path and the fix.
"""

from __future__ import annotations

import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataNotFoundError

__all__ = ["data_file", "data_root", "read_jsonl"]


def _candidates() -> Iterator[Path]:
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            yield folder / "shared" / "data"


def data_root() -> Path:
    """The data folder (``$DMR_DATA`` first)."""
    env = os.environ.get("DMR_DATA")
    if env:
        root = Path(env)
        if not root.is_dir():
            raise DataNotFoundError(f"DMR_DATA={env!r} is not a folder; point it at the shared data folder")
        return root
    for candidate in _candidates():
        if (candidate / "README.md").is_file():
            return candidate
    raise DataNotFoundError(
        "no shared/data folder found beside or above the current directory; set DMR_DATA to the folder "
        "that holds gutenberg/, wikitext2/ and eval/"
    )


def data_file(relative: str) -> Path:
    """A file of the data folder, e.g. ``data_file("gutenberg/valid.jsonl")``."""
    path = data_root() / relative
    if not path.is_file():
        raise DataNotFoundError(
            f"data file {str(path)!r} is missing; check DMR_DATA or the shared data folder"
        )
    return path


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file (``.xz`` compressed or plain), streamed."""
    p = Path(path)
    opener = lzma.open if p.suffix == ".xz" else open
    with opener(p, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataNotFoundError(f"{p}:{number} is not valid JSON: {err}") from err
