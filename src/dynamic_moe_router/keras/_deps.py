"""Optional-dependency checks of the Keras integration (no import-time side effects elsewhere)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .._preload import load_triton_before_tensorflow
from ..errors import MissingDependencyError

__all__ = ["INSTALL_HINT", "backend", "require"]

INSTALL_HINT = 'pip install "dynamic-moe-router-kit[tf]"'


def require(name: str) -> ModuleType:
    """Import ``name`` (``"keras"``, ``"keras_hub"``, ...) or raise :class:`MissingDependencyError`."""
    load_triton_before_tensorflow()
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingDependencyError(
            f"dynamic_moe_router.keras needs {name!r}, which is not importable ({err}); install the Keras "
            f"extra: {INSTALL_HINT}"
        ) from err


def backend() -> str:
    """The Keras backend in use (``"tensorflow"``, ``"jax"``, ``"torch"``, ``"numpy"``)."""
    return str(require("keras").backend.backend())
