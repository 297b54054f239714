"""dynamic-moe-router-kit: per-token dynamic expert routing for MoE language models.

Import it as ``dmr``::

    import dynamic_moe_router as dmr

    handle = dmr.patch(model, dmr.TopP(p=0.6))   # every MoE layer, in place, per instance
    with dmr.profile(model) as report:
        model.generate(...)
    print(report.summary())
    dmr.unpatch(model)                            # exactly the original model again

Importing the package imports neither PyTorch nor transformers: the public names below are loaded
on first use (PEP 562), so ``import dynamic_moe_router`` and ``dmr --version`` stay fast, and
``dir(dmr)`` and ``dmr.__all__`` list every public name. Its one side effect: where both Triton and
TensorFlow are installed, it imports Triton first, since their bundled LLVMs abort the process in
the other order (see ``_preload.py``).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import TYPE_CHECKING, Any

from ._preload import load_triton_before_tensorflow
from ._version import __version__
from .errors import (
    AlreadyPatchedError,
    BackendUnavailableError,
    DataNotFoundError,
    DmrError,
    ExpertParallelError,
    MissingDependencyError,
    NoMoELayersError,
    NonFiniteRouterScoresError,
    NotPatchedError,
    PolicyError,
    PolicyFileError,
    PolicyMismatchError,
    PolicyNotFoundError,
    ResumeError,
    RoutingInputError,
    TargetUnreachableError,
    TextDecodeError,
    UnsupportedModeError,
    UnsupportedModelError,
)

if TYPE_CHECKING:  # the lazy names, for type checkers and IDEs
    from .experts import ExpertsCounter, ExpertsLayout, experts_forward
    from .hf import PatchHandle, get_patch, patch, patched, supported_families, unpatch
    from .learn import AllocatorTraining, train_allocator
    from .policies import (
        BatchAware,
        EntropyAdaptive,
        LearnedAllocator,
        PerLayer,
        RelativeThreshold,
        RoutingPolicy,
        StaticTopK,
        TileAware,
        TopP,
        from_pretrained,
        load_policy,
        parse_policy,
        register_policy,
    )
    from .profiling import ProfileReport, profile
    from .routing import Routing, route

load_triton_before_tensorflow()  # see _preload: TensorFlow loaded first would make Triton abort

#: public name -> the submodule that defines it (imported on first access)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("ExpertsCounter", "ExpertsLayout", "experts_forward"), ".experts"),
    **dict.fromkeys(("PatchHandle", "get_patch", "patch", "patched", "supported_families", "unpatch"), ".hf"),
    **dict.fromkeys(
        (
            "BatchAware",
            "EntropyAdaptive",
            "LearnedAllocator",
            "PerLayer",
            "RelativeThreshold",
            "RoutingPolicy",
            "StaticTopK",
            "TileAware",
            "TopP",
            "from_pretrained",
            "load_policy",
            "parse_policy",
            "register_policy",
        ),
        ".policies",
    ),
    **dict.fromkeys(("AllocatorTraining", "train_allocator"), ".learn"),
    "ProfileReport": ".report",
    "profile": ".hf.profiling",
    "Routing": ".core",
    "route": ".routing",
}
#: submodules reachable as attributes (``dmr.core``); ``spec`` is the deprecated name of ``core``.
#: The optional ``jax`` and ``keras`` subpackages are imported explicitly (they need their extras).
_SUBMODULES = frozenset(
    ("backends", "core", "errors", "experts", "hf", "learn", "policies", "profiling", "report", "routing",
     "spec")
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name == "spec" and f"{__name__}.spec" not in sys.modules:
        # the module's own warning would point into importlib; point this one at the caller
        from ._deprecation import warn_renamed

        warn_renamed("dynamic_moe_router.spec", "dynamic_moe_router.core (same names)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(f".{name}", __name__)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AllocatorTraining",
    "AlreadyPatchedError",
    "BackendUnavailableError",
    "BatchAware",
    "DataNotFoundError",
    "DmrError",
    "EntropyAdaptive",
    "ExpertParallelError",
    "ExpertsCounter",
    "ExpertsLayout",
    "LearnedAllocator",
    "MissingDependencyError",
    "NoMoELayersError",
    "NonFiniteRouterScoresError",
    "NotPatchedError",
    "PatchHandle",
    "PerLayer",
    "PolicyError",
    "PolicyFileError",
    "PolicyMismatchError",
    "PolicyNotFoundError",
    "ProfileReport",
    "RelativeThreshold",
    "ResumeError",
    "Routing",
    "RoutingInputError",
    "RoutingPolicy",
    "StaticTopK",
    "TargetUnreachableError",
    "TextDecodeError",
    "TileAware",
    "TopP",
    "UnsupportedModeError",
    "UnsupportedModelError",
    "__version__",
    "experts_forward",
    "from_pretrained",
    "get_patch",
    "load_policy",
    "parse_policy",
    "patch",
    "patched",
    "profile",
    "register_policy",
    "route",
    "supported_families",
    "train_allocator",
    "unpatch",
]
