"""Locating and reading the shared data folder."""

from __future__ import annotations

import json
import lzma

import pytest

import dynamic_moe_router as dmr
from dynamic_moe_router.data import data_file, data_root, read_jsonl


def test_dmr_data_overrides_the_search(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    (tmp_path / "gutenberg").mkdir()
    records = [{"text": "a"}, {"text": "b"}]
    with lzma.open(tmp_path / "gutenberg" / "train.jsonl.xz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in records) + "\n")
    monkeypatch.setenv("DMR_DATA", str(tmp_path))
    assert data_root() == tmp_path
    assert list(read_jsonl(data_file("gutenberg/train.jsonl.xz"))) == records


def test_missing_data_raises_a_typed_error(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DMR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(dmr.DataNotFoundError, match="DMR_DATA="):
        data_root()
    monkeypatch.setenv("DMR_DATA", str(tmp_path))
    with pytest.raises(dmr.DataNotFoundError, match="is missing"):
        data_file("gutenberg/test.jsonl")


def test_malformed_jsonl(tmp_path):  # type: ignore[no-untyped-def]
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(dmr.DataNotFoundError, match=r"x\.jsonl:2 is not valid JSON"):
        list(read_jsonl(bad))


def test_undecodable_jsonl_names_the_line_and_byte_offset(tmp_path):  # type: ignore[no-untyped-def]
    bad = tmp_path / "x.jsonl.xz"
    with lzma.open(bad, "wb") as fh:
        fh.write(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(dmr.errors.TextDecodeError, match=r"byte 0xe9 at offset 28 \(line 2\)") as info:
        list(read_jsonl(bad))
    assert info.value.offset == 28
    assert list(read_jsonl(bad, encoding="latin-1"))[1] == {"text": "café"}
