"""Package hygiene: no import-time side effects, a complete public API."""

from __future__ import annotations

import subprocess
import sys

import dynamic_moe_router as dmr


def test_import_has_no_side_effects():  # type: ignore[no-untyped-def]
    code = (
        "import sys, warnings; warnings.simplefilter('error'); import dynamic_moe_router as dmr; "
        "assert 'transformers' not in sys.modules, 'transformers imported eagerly'; print(dmr.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == dmr.__version__


def test_public_api_names_exist():  # type: ignore[no-untyped-def]
    for name in [
        "StaticTopK",
        "TopP",
        "EntropyAdaptive",
        "RelativeThreshold",
        "PerLayer",
        "route",
        "patch",
        "unpatch",
        "patched",
        "supported_families",
        "profile",
        "load_policy",
    ]:
        assert name in dmr.__all__ and hasattr(dmr, name)
    assert all(hasattr(dmr, name) for name in dmr.__all__)


def test_error_hierarchy():  # type: ignore[no-untyped-def]
    assert issubclass(dmr.PolicyError, ValueError) and issubclass(dmr.PolicyError, dmr.DmrError)
    assert issubclass(dmr.PolicyFileError, ValueError)
    assert issubclass(dmr.UnsupportedModelError, TypeError)
    assert issubclass(dmr.MissingDependencyError, ImportError)
