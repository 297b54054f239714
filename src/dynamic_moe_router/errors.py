"""One typed error hierarchy for the whole library.

Every error names the problem and the fix. Errors about values the user passed are also
``ValueError`` subclasses, errors about models are ``TypeError`` or ``RuntimeError`` subclasses,
so ``except ValueError`` keeps working for callers that do not import this module.

Example:
    >>> import dynamic_moe_router as dmr
    >>> try:
    ...     dmr.TopP(p=1.5)
    ... except dmr.PolicyError as err:
    ...     print(err.field)
    p
"""

from __future__ import annotations

__all__ = [
    "AlreadyPatchedError",
    "BackendUnavailableError",
    "DataNotFoundError",
    "DmrError",
    "ExpertParallelError",
    "MissingDependencyError",
    "NoMoELayersError",
    "NonFiniteRouterScoresError",
    "NotPatchedError",
    "PolicyError",
    "PolicyFileError",
    "PolicyMismatchError",
    "PolicyNotFoundError",
    "ResumeError",
    "RoutingInputError",
    "TargetUnreachableError",
    "TextDecodeError",
    "UnsupportedModeError",
    "UnsupportedModelError",
]


class DmrError(Exception):
    """Base class of every error raised by dynamic-moe-router-kit."""


class PolicyError(DmrError, ValueError):
    """A policy parameter is invalid, or does not fit the layer it is applied to.

    Attributes:
        field: the name of the offending field (``"p"``, ``"max_k"``, ...).
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PolicyFileError(DmrError, ValueError):
    """A policy file is malformed, of an unknown type, or of an unknown version."""


class PolicyNotFoundError(PolicyFileError):
    """A model folder holds no saved policy (``dmr_policy.json``) where one was asked for
    (``dmr.patch(model, "auto")``, ``dmr.from_pretrained``)."""


class PolicyMismatchError(PolicyError):
    """A policy trained for one model (a learned allocator) was applied to a model it does not fit:
    another family, layer count, hidden size, expert count or native k."""


class RoutingInputError(DmrError, ValueError):
    """``route()`` or an experts forward received tensors of the wrong shape, dtype or range."""


class NonFiniteRouterScoresError(DmrError, ValueError):
    """The router produced NaN or infinite scores for some tokens.

    Attributes:
        layer: the MoE layer index (``None`` outside a patched model).
        bad_tokens: how many tokens had a non-finite score.
    """

    def __init__(self, message: str, *, layer: int | None = None, bad_tokens: int = 0) -> None:
        super().__init__(message)
        self.layer = layer
        self.bad_tokens = bad_tokens


class UnsupportedModelError(DmrError, TypeError):
    """The model's family is not supported (the message lists the supported families)."""


class NoMoELayersError(UnsupportedModelError):
    """The model belongs to a supported family but has no MoE layer to patch."""


class ExpertParallelError(UnsupportedModelError):
    """An expert-parallel model cannot be patched as loaded: the experts do not divide over the ranks,
    or transformers' layout is one the expert-parallel patch does not support (the message says which)."""


class AlreadyPatchedError(DmrError, RuntimeError):
    """``patch()`` was called on a model that is already patched."""


class NotPatchedError(DmrError, RuntimeError):
    """``unpatch()`` was called on a model that is not patched."""


class BackendUnavailableError(DmrError, RuntimeError):
    """An explicitly requested experts backend cannot run on this device, dtype or torch build."""


class UnsupportedModeError(DmrError, RuntimeError):
    """The patched model is run in a mode the library does not reproduce (e.g. phimoe in training)."""


class TargetUnreachableError(DmrError, ValueError):
    """No policy family reaches the requested routed-FLOP reduction on this model."""


class DataNotFoundError(DmrError, FileNotFoundError):
    """A data folder or file is missing or unreadable; the message names the path and ``DMR_DATA``."""


class MissingDependencyError(DmrError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class TextDecodeError(DataNotFoundError):
    """A text file is not in the expected encoding; the message names the file, the byte offset and
    ``--encoding`` (``encoding=``) as the fix.

    Attributes:
        path: the file.
        offset: the byte offset of the first byte that does not decode.
    """

    def __init__(self, message: str, *, path: str = "", offset: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class ResumeError(DmrError, ValueError):
    """``--resume`` found no partial results, or results of a run with other settings."""
