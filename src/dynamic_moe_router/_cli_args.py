"""Argument checks of the ``dmr`` command line, run while argparse parses (before any model loads).

Each checker is an argparse ``type=`` callable: it returns the parsed value or raises
:class:`argparse.ArgumentTypeError` with a message that says what is wrong and what to pass instead;
argparse then prints ``dmr CMD: error: argument --flag: <message>`` after the usage line and exits
with status 2. Nothing here imports torch or transformers at module level.

Example:
    >>> from dynamic_moe_router._cli_args import int_at_least
    >>> int_at_least(1, "a positive item count")("3")
    3
    >>> int_at_least(1, "a positive item count")("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be >= 1, got 0; pass a positive item count
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "TOKENIZER_FILES",
    "checkpoint_dir",
    "encoding",
    "fraction",
    "input_file",
    "int_at_least",
    "model_or_tiny",
    "output_dir",
    "output_file",
    "policy",
    "task_list",
]

#: files one of which marks a checkpoint directory that carries its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

_TINY_HINT = (
    "tiny:FAMILY models are random and have no tokenizer: they work with dmr inspect and dmr profile "
    "(without --text); pass a checkpoint directory saved with its tokenizer, e.g. models/ref-mixtral"
)


def _fail(message: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(message)


def int_at_least(low: int, fix: str, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``[low, high]``; ``fix`` says what to pass instead (e.g. "a positive count")."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _fail(f"{text!r} is not an integer; pass {fix}") from None
        if value < low:
            raise _fail(f"must be >= {low}, got {value}; pass {fix}")
        if high is not None and value > high:
            raise _fail(f"must be <= {high}, got {value}; pass {fix}")
        return value

    check.__name__ = "integer"
    return check


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a reduction such as ``0.35``)."""
    try:
        value = float(text)
    except ValueError:
        raise _fail(f"{text!r} is not a number; pass a fraction between 0 and 1, e.g. 0.35") from None
    if not 0.0 < value < 1.0:  # also rejects nan
        raise _fail(f"must be strictly between 0 and 1, got {text}; pass a fraction such as 0.35")
    return value


def encoding(text: str) -> str:
    """A text encoding Python knows (``utf-8``, ``latin-1``, ...)."""
    try:
        return codecs.lookup(text).name
    except LookupError:
        raise _fail(f"unknown text encoding {text!r}; pass one such as utf-8, latin-1 or cp1252") from None


def _nearest_existing(path: Path) -> Path:
    for folder in (path, *path.parents):
        if folder.exists():
            return folder
    return Path.cwd()


def output_file(text: str) -> str:
    """A file the command may (over)write: not a directory, inside a folder that is or can be made."""
    path = Path(text)
    if not text or text.endswith(("/", os.sep)) or path.is_dir():
        raise _fail(f"{text!r} is a directory; pass a file path such as {Path(text or '.') / 'out.json'}")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise _fail(f"{str(existing)!r} is a file, so {text!r} cannot be created; pass a path in a folder")
    if not os.access(existing, os.W_OK):
        raise _fail(f"the folder {str(existing)!r} is not writable; pass a path you can write")
    return text


def output_dir(text: str) -> str:
    """A folder the command may create or write into (not an existing file)."""
    path = Path(text)
    if not text:
        raise _fail("empty path; pass a folder such as dmr-bench")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise _fail(
            f"{str(existing)!r} is a file, not a folder; pass a folder path (it is created if missing)"
        )
    if not os.access(existing, os.W_OK):
        raise _fail(f"{str(existing)!r} is not writable; pass a folder you can write")
    return text


def input_file(text: str) -> str:
    """An existing, readable file (the encoding is checked later, with ``--encoding``)."""
    path = Path(text)
    if path.is_dir():
        raise _fail(f"{text!r} is a directory; pass a text or JSONL file")
    if not path.exists():
        raise _fail(f"{text!r} does not exist; pass a text or JSONL file")
    if not os.access(path, os.R_OK):
        raise _fail(f"{text!r} is not readable; check its permissions")
    return text


def _read_config(folder: Path) -> dict[str, Any]:
    config = folder / "config.json"
    if not config.is_file():
        raise _fail(f"{str(folder)!r} has no config.json, so it is not a transformers checkpoint")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(f"{str(config)!r} is not a readable JSON file ({err}); re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise _fail(f"{str(config)!r} is not a JSON object; re-save the checkpoint")
    return data


def _check_family(model_type: object, where: str) -> None:
    from .errors import UnsupportedModelError
    from .hf.families import get_family

    try:
        get_family(str(model_type))
    except UnsupportedModelError as err:  # the reason, and the supported families
        raise _fail(f"{where}: {err} (dmr families lists them)") from None


def model_or_tiny(text: str) -> str:
    """``tiny:FAMILY`` or a checkpoint directory (config.json of a supported family)."""
    if text.startswith("tiny:"):
        _check_family(text.split(":", 1)[1], text)
        return text
    folder = Path(text)
    if not folder.is_dir():
        raise _fail(
            f"{text!r} is neither a model directory nor tiny:FAMILY (e.g. tiny:mixtral)"
            + ("; it is a file" if folder.exists() else "")
        )
    _check_family(_read_config(folder).get("model_type"), text)
    return text


def checkpoint_dir(text: str) -> str:
    """A checkpoint directory of a supported family that carries its tokenizer."""
    if text.startswith("tiny:"):
        raise _fail(_TINY_HINT)
    folder = Path(text)
    if not folder.is_dir():
        kind = "a file" if folder.exists() else "missing"
        raise _fail(f"{text!r} is {kind}; pass a checkpoint directory (config.json, weights, tokenizer)")
    _check_family(_read_config(folder).get("model_type"), text)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise _fail(
            f"{text!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer with the model"
        )
    return text


def policy(text: str) -> Any:
    """A routing policy: a policy JSON file or ``NAME:key=value,...``."""
    from .errors import DmrError
    from .policies import parse_policy

    if not text.strip():
        raise _fail("empty policy; pass NAME:key=value,... (e.g. top_p:p=0.6) or a policy JSON file")
    try:
        return parse_policy(text)
    except DmrError as err:
        raise _fail(str(err)) from None
    except OSError as err:
        raise _fail(f"cannot read the policy file {text!r}: {err.strerror or err}") from None


def task_list(text: str) -> list[str]:
    """Comma-separated task names, ``all`` or ``none``."""
    from .eval.tasks import TASKS

    names = [t.strip() for t in text.split(",") if t.strip()]
    if names in (["all"], []) and text.strip() == "all":
        return list(TASKS)
    if names == ["none"]:
        return []
    unknown = sorted(set(names) - set(TASKS))
    if unknown or not names:
        raise _fail(f"unknown tasks {unknown or [text]}; choose from {', '.join(TASKS)}, or all or none")
    return names
