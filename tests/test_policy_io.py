"""Policy files: JSON round trips, versioning and every malformed input."""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
from hypothesis import given

import dynamic_moe_router as dmr
from dynamic_moe_router.policies import parse_policy, policy_from_dict
from strategies import policies_for

EXAMPLES = [
    dmr.StaticTopK(),
    dmr.StaticTopK(k=1),
    dmr.TopP(p=0.6, min_k=0, max_k=3),
    dmr.RelativeThreshold(beta=0.25, max_k=4),
    dmr.EntropyAdaptive(min_k=1, max_k=4, low=0.2, high=0.8),
    dmr.PerLayer(dmr.TopP(p=0.5), {0: dmr.StaticTopK(), 7: dmr.RelativeThreshold(beta=0.3)}),
    dmr.PerLayer(None, {0: dmr.TopP(p=0.5), 2: dmr.StaticTopK(k=1)}),
]


def test_per_layer_without_default_writes_null(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.json"
    dmr.PerLayer(None, {1: dmr.TopP(p=0.5)}).save(str(path))
    assert json.loads(path.read_text())["_data"]["default"] is None


@pytest.mark.parametrize("policy", EXAMPLES, ids=lambda p: p.type_name)
def test_round_trip(policy, tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.json"
    policy.save(str(path))
    obj = json.loads(path.read_text())
    assert obj["_type"] == policy.type_name and obj["_version"] == policy.version and "dmr_version" in obj
    loaded = dmr.load_policy(path)
    assert loaded == policy and type(loaded) is type(policy)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file left behind"


@given(st.integers(1, 16).flatmap(lambda e: policies_for(e, 1)))
def test_round_trip_any_policy(policy):  # type: ignore[no-untyped-def]
    assert policy_from_dict(json.loads(json.dumps(policy.to_dict()))) == policy


def write(tmp_path, obj):  # type: ignore[no-untyped-def]
    path = tmp_path / "p.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


GOOD = dmr.TopP(p=0.5).to_dict()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({**GOOD, "_type": "top_q"}, "unknown policy type 'top_q'"),
        ({**GOOD, "_version": 99}, "version 99 is not supported"),
        ({"_type": "top_p", "_data": {}}, "missing key '_version'"),
        ({**GOOD, "_data": {"p": 0.5, "temperature": 2}}, r"unknown fields \['temperature'\]"),
        ({**GOOD, "_data": {"p": 7, "min_k": 1, "max_k": None}}, "p must be in"),
        ({**GOOD, "_data": []}, "'_data' must be an object"),
        ({**GOOD, "_data": {"p": 0.5}}, r"missing fields \['max_k', 'min_k'\]"),
        ({**GOOD, "extra": 1}, "unknown top-level keys"),
        (
            {
                **dmr.PerLayer(dmr.TopP(p=0.5), {1: dmr.StaticTopK()}).to_dict(),
                "_data": {"default": GOOD, "overrides": {"one": GOOD}},
            },
            "key 'one' is not a layer index",
        ),
    ],
)
def test_malformed_files_raise_policy_file_error(tmp_path, content, match):  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyFileError, match=match):
        dmr.load_policy(write(tmp_path, content))


def test_missing_file(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(dmr.PolicyFileError, match="does not exist"):
        dmr.load_policy(tmp_path / "nope.json")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.policies._io as io

    target = tmp_path / "p.json"
    target.write_text("previous content")

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(OSError):
        dmr.TopP(p=0.5).save(str(target))
    assert target.read_text() == "previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_parse_policy_specs(tmp_path):  # type: ignore[no-untyped-def]
    assert parse_policy("top_p:p=0.6,max_k=3") == dmr.TopP(p=0.6, max_k=3)
    assert parse_policy("relative_threshold:beta=0.4") == dmr.RelativeThreshold(beta=0.4)
    assert parse_policy("entropy:min_k=1,max_k=null") == dmr.EntropyAdaptive()
    path = tmp_path / "x.json"
    dmr.StaticTopK(k=1).save(str(path))
    assert parse_policy(str(path)) == dmr.StaticTopK(k=1)
    with pytest.raises(dmr.PolicyFileError, match="unknown policy 'nucleus'"):
        parse_policy("nucleus:p=0.5")
    with pytest.raises(dmr.PolicyFileError, match="expected key=value"):
        parse_policy("top_p:0.5")
    with pytest.raises(dmr.PolicyFileError, match="unknown fields"):
        parse_policy("top_p:q=0.5")
    with pytest.raises(dmr.PolicyError, match="p must be in"):
        parse_policy("top_p:p=3")
