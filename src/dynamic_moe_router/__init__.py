"""dynamic-moe-router-kit: per-token dynamic expert routing for MoE language models.

Import it as ``dmr``::

    import dynamic_moe_router as dmr

    handle = dmr.patch(model, dmr.TopP(p=0.6))   # every MoE layer, in place, per instance
    with dmr.profile(model) as report:
        model.generate(...)
    print(report.summary())
    dmr.unpatch(model)                            # exactly the original model again

Importing the package has no side effects and does not import transformers.
"""

from ._version import __version__
from .errors import (
    AlreadyPatchedError,
    BackendUnavailableError,
    DataNotFoundError,
    DmrError,
    MissingDependencyError,
    NoMoELayersError,
    NonFiniteRouterScoresError,
    NotPatchedError,
    PolicyError,
    PolicyFileError,
    RoutingInputError,
    TargetUnreachableError,
    UnsupportedModeError,
    UnsupportedModelError,
)
from .experts import ExpertsCounter, ExpertsLayout, experts_forward
from .hf import PatchHandle, get_patch, patch, patched, supported_families, unpatch
from .policies import (
    EntropyAdaptive,
    PerLayer,
    RelativeThreshold,
    RoutingPolicy,
    StaticTopK,
    TopP,
    load_policy,
    parse_policy,
    register_policy,
)
from .profiling import ProfileReport, profile
from .routing import Routing, route

__all__ = [
    "AlreadyPatchedError",
    "BackendUnavailableError",
    "DataNotFoundError",
    "DmrError",
    "EntropyAdaptive",
    "ExpertsCounter",
    "ExpertsLayout",
    "MissingDependencyError",
    "NoMoELayersError",
    "NonFiniteRouterScoresError",
    "NotPatchedError",
    "PatchHandle",
    "PerLayer",
    "PolicyError",
    "PolicyFileError",
    "ProfileReport",
    "RelativeThreshold",
    "Routing",
    "RoutingInputError",
    "RoutingPolicy",
    "StaticTopK",
    "TargetUnreachableError",
    "TopP",
    "UnsupportedModeError",
    "UnsupportedModelError",
    "__version__",
    "experts_forward",
    "get_patch",
    "load_policy",
    "parse_policy",
    "patch",
    "patched",
    "profile",
    "register_policy",
    "route",
    "supported_families",
    "unpatch",
]
