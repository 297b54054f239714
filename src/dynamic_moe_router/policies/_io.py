"""Policy files: versioned JSON with an allow-list of types.

Format (one object)::

    {"_type": "top_p", "_version": 1, "_data": {"p": 0.6, "min_k": 1, "max_k": null},
     "dmr_version": "0.1.0"}

``PerLayer`` nests policies in the same format; its override keys are layer indices written as
strings (JSON object keys). Unknown types, unknown versions, unknown or missing fields and malformed
JSON raise :class:`~dynamic_moe_router.PolicyFileError`; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import PolicyError, PolicyFileError, PolicyNotFoundError
from ._base import POLICY_FILE, POLICY_REGISTRY, RoutingPolicy, policy_to_dict, save_policy

__all__ = [
    "POLICY_FILE",
    "from_pretrained",
    "load_policy",
    "parse_policy",
    "policy_from_dict",
    "policy_to_dict",
    "save_policy",
]


def policy_from_dict(obj: Any, *, where: str = "policy", base_dir: Path | None = None) -> RoutingPolicy:
    """Build a policy from :func:`policy_to_dict` output; every problem raises ``PolicyFileError``."""
    if not isinstance(obj, dict):
        raise PolicyFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    extra = set(obj) - {"_type", "_version", "_data", "dmr_version"}
    if extra:
        raise PolicyFileError(f"{where}: unknown top-level keys {sorted(extra)}")
    for key in ("_type", "_version", "_data"):
        if key not in obj:
            raise PolicyFileError(f"{where}: missing key {key!r}; is this a dynamic-moe-router policy file?")
    type_name = obj["_type"]
    cls = POLICY_REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise PolicyFileError(
            f"{where}: unknown policy type {type_name!r}; known types: {', '.join(sorted(POLICY_REGISTRY))}"
        )
    if obj["_version"] != cls.version:
        raise PolicyFileError(
            f"{where}: {type_name} policy file version {obj['_version']!r} is not supported by this "
            f"release (it reads version {cls.version}); upgrade dynamic-moe-router-kit or re-save the policy"
        )
    data = obj["_data"]
    if not isinstance(data, dict):
        raise PolicyFileError(f"{where}: '_data' must be an object, got {type(data).__name__}")
    from_file_data = getattr(cls, "from_file_data", None)
    if from_file_data is not None:  # a policy with its own file layout (LearnedAllocator's weights)
        return from_file_data(data, where=where, base_dir=base_dir)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise PolicyFileError(
            f"{where}: unknown fields {sorted(unknown)} for {type_name}; known: {sorted(names)}"
        )
    missing = names - set(data)
    if missing:
        raise PolicyFileError(
            f"{where}: missing fields {sorted(missing)} for {type_name} (policy files list every field; "
            "re-save the policy with policy.save(path))"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "default":
            value = None if value is None else policy_from_dict(value, where=f"{where}.default")
        elif name == "inner":  # a wrapper policy's wrapped policy (BatchAware)
            value = policy_from_dict(value, where=f"{where}.inner")
        elif name == "overrides":
            if not isinstance(value, dict):
                raise PolicyFileError(f"{where}.overrides: expected an object of layer -> policy")
            parsed = {}
            for key, sub in value.items():
                try:
                    layer = int(key)
                except (TypeError, ValueError):
                    raise PolicyFileError(f"{where}.overrides: key {key!r} is not a layer index") from None
                parsed[layer] = policy_from_dict(sub, where=f"{where}.overrides[{key}]")
            value = parsed
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except PolicyError as err:
        raise PolicyFileError(f"{where}: invalid {type_name} policy: {err}") from err


def load_policy(path: str | os.PathLike[str]) -> RoutingPolicy:
    """Read a policy written by :meth:`RoutingPolicy.save`.

    Example:
        >>> import tempfile, os, dynamic_moe_router as dmr
        >>> path = os.path.join(tempfile.mkdtemp(), "policy.json")
        >>> dmr.TopP(p=0.6).save(path)
        >>> dmr.load_policy(path)
        TopP(p=0.6, min_k=1, max_k=None)
    """
    p = Path(path)
    if not p.is_file():
        raise PolicyFileError(f"policy file {str(p)!r} does not exist or is not a file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PolicyFileError(f"policy file {str(p)!r} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise PolicyFileError(f"policy file {str(p)!r} is not UTF-8 text: {err}") from err
    return policy_from_dict(obj, where=str(p), base_dir=p.parent)


def from_pretrained(model_dir: str | os.PathLike[str]) -> RoutingPolicy:
    """The policy saved with a model: ``model_dir/dmr_policy.json`` (written by
    :meth:`RoutingPolicy.save_pretrained <dynamic_moe_router.RoutingPolicy.save_pretrained>`).

    Raises:
        PolicyNotFoundError: ``model_dir`` is not a directory, or holds no ``dmr_policy.json``.
        PolicyFileError: the file is malformed.

    Example:
        >>> import tempfile, dynamic_moe_router as dmr
        >>> folder = tempfile.mkdtemp()
        >>> dmr.TopP(p=0.6).save_pretrained(folder)
        >>> dmr.from_pretrained(folder)
        TopP(p=0.6, min_k=1, max_k=None)
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise PolicyNotFoundError(
            f"{str(folder)!r} is not a model folder (no such directory); a saved policy lives in the "
            f"model's folder as {POLICY_FILE}"
        )
    path = folder / POLICY_FILE
    if not path.is_file():
        raise PolicyNotFoundError(
            f"no {POLICY_FILE} in {str(folder)!r}: save one with policy.save_pretrained({str(folder)!r}), "
            "or pass a policy"
        )
    return load_policy(path)


def parse_policy(text: str) -> RoutingPolicy:
    """A policy from a file path or a short spec ``NAME[:key=value,...]`` (values are JSON literals).

    Example:
        >>> from dynamic_moe_router.policies import parse_policy
        >>> parse_policy("top_p:p=0.6,max_k=3")
        TopP(p=0.6, min_k=1, max_k=3)
        >>> parse_policy("static_top_k")
        StaticTopK(k=None)
    """
    if text.endswith(".json") or Path(text).is_file():
        return load_policy(text)
    name, _, rest = text.partition(":")
    cls = POLICY_REGISTRY.get(name.strip())
    if cls is None or name.strip() == "per_layer":
        raise PolicyFileError(
            f"policy spec {text!r}: unknown policy {name!r}; use one of "
            f"{', '.join(sorted(k for k in POLICY_REGISTRY if k != 'per_layer'))} or a policy JSON file"
        )
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq:
            raise PolicyFileError(f"policy spec {text!r}: expected key=value, got {item!r}")
        raw = raw.strip()
        raw = {"True": "true", "False": "false", "None": "null"}.get(raw, raw)  # describe()'s spelling
        try:
            kwargs[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            hint = (
                f' (a string is double-quoted: {key.strip()}="{raw}")'
                if isinstance(defaults.get(key.strip()), str)
                else ""
            )
            raise PolicyFileError(
                f"policy spec {text!r}: value {raw!r} of {key!r} is not a number, true/false or null{hint}"
            ) from None
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(kwargs) - names
    if unknown:
        raise PolicyFileError(
            f"policy spec {text!r}: unknown fields {sorted(unknown)}; known: {sorted(names)}"
        )
    return cls(**kwargs)
