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

from .errors import DataNotFoundError, TextDecodeError

__all__ = ["data_file", "data_root", "decode_error", "read_jsonl"]


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


def read_jsonl(path: str | os.PathLike[str], encoding: str = "utf-8") -> Iterator[dict[str, Any]]:
    """Records of a JSONL file (``.xz`` compressed or plain), streamed.

    A line that does not decode raises :class:`~dynamic_moe_router.errors.TextDecodeError` naming the
    file, the line and the byte offset (of the decompressed stream for ``.xz``).
    """
    p = Path(path)
    opener = lzma.open if p.suffix == ".xz" else open
    offset = 0
    with opener(p, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise decode_error(p, offset + err.start, err, encoding, f" (line {number})") from None
            offset += len(raw)
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataNotFoundError(f"{p}:{number} is not valid JSON: {err}") from err


def decode_error(
    path: Path, offset: int, err: UnicodeDecodeError, encoding: str, where: str = ""
) -> TextDecodeError:
    """The typed error of a file that does not decode: file, byte offset, and the fix."""
    bad = err.object[err.start : err.start + 1].hex()
    return TextDecodeError(
        f"{path} is not valid {encoding} text: byte 0x{bad} at offset {offset}{where} ({err.reason}); "
        f"pass its encoding, e.g. --encoding latin-1 (encoding='latin-1'), or convert it to UTF-8",
        path=str(path),
        offset=offset,
    )
