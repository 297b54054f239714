"""The reversible patch lifecycle, written once for every integration against a small layer protocol.

An integration (transformers in :mod:`dynamic_moe_router.hf`, keras-hub in
:mod:`dynamic_moe_router.keras`) finds its MoE layers (records that satisfy :class:`PatchLayer`),
subclasses :class:`PatchHandleBase` with the attributes it sets on its framework's objects, and
calls the functions here for the rest:

* :func:`validate_policy`: the policy against every layer, before anything changes;
* :meth:`PatchHandleBase._apply` / :meth:`~PatchHandleBase._undo`: all or nothing; every
  instance attribute set is recorded with what was there before, and undone in reverse order,
  also when an error interrupts the apply;
* :func:`refuse_if_patched` and :func:`apply_replacing`: ``replace=True`` undoes the old patch
  and restores it if the new one fails;
* :meth:`~PatchHandleBase.set_policy`: validated for all layers first (all or nothing);
* :func:`undo_on_exit`: the body of ``patched(...)``.

Nothing here imports a framework.

Example:
    >>> from dataclasses import dataclass
    >>> import dynamic_moe_router as dmr
    >>> from dynamic_moe_router.core import PatchHandleBase, validate_policy
    >>> @dataclass(frozen=True)
    ... class Layer:
    ...     index: int
    ...     path: str
    ...     num_experts: int = 8
    ...     native_k: int = 2
    ...     flops_per_pair: int = 6
    >>> class Block:
    ...     def call(self, x):
    ...         return x
    >>> class Handle(PatchHandleBase):
    ...     handle_attr = "_demo_handle"
    ...     def _install(self):
    ...         self._set(self._model, "call", lambda x: -x)
    >>> model, layers = Block(), [Layer(0, "layers.0.moe")]
    >>> validate_policy(dmr.TopP(p=0.5), layers)
    >>> handle = Handle(model, layers, dmr.StaticTopK(), family="demo")
    >>> handle._apply(); model.call(3), model._demo_handle is handle
    (-3, True)
    >>> handle.unpatch(); model.call(3), hasattr(model, "_demo_handle")
    (3, False)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Protocol, TypeVar

from ..errors import AlreadyPatchedError, NotPatchedError, PolicyError

__all__ = [
    "PatchHandleBase",
    "PatchLayer",
    "apply_replacing",
    "refuse_if_patched",
    "require_handle",
    "set_attribute",
    "undo_on_exit",
    "validate_policy",
]

_MISSING = object()


class PatchLayer(Protocol):
    """What the lifecycle needs to know about one MoE layer of any framework."""

    @property
    def index(self) -> int:
        """The decoder layer index (``PerLayer`` overrides and reports use it)."""
        ...

    @property
    def path(self) -> str:
        """Where the block lives in the model (a module or layer path), for messages."""
        ...

    @property
    def num_experts(self) -> int: ...

    @property
    def native_k(self) -> int: ...

    @property
    def flops_per_pair(self) -> int:
        """Matmul FLOPs of one (token, expert) pair."""
        ...


def validate_policy(
    policy: Any, layers: Sequence[PatchLayer], *, family: str | None = None, router_input: bool = False
) -> None:
    """Check ``policy`` against every layer; raise :class:`~dynamic_moe_router.PolicyError` naming the
    first layer it does not fit (or override indices that name no MoE layer).

    ``router_input``: whether the patch hands policies the router input ``h`` (the torch patch
    does); a policy that reads it (a learned allocator) is refused elsewhere, and checked against
    the model (``policy.check_model(family, layers)``) where it runs.
    """
    from ..policies import RoutingPolicy

    if not isinstance(policy, RoutingPolicy):
        raise PolicyError(
            f"policy must be a RoutingPolicy (e.g. dmr.TopP(p=0.6)), got {type(policy).__name__}",
            field="policy",
        )
    if policy.reads_router_input:
        if not router_input:
            raise PolicyError(
                f"{policy.type_name}: this policy reads the router input h, which only dmr.patch on a "
                "transformers (torch) model provides; use a score policy here",
                field="policy",
            )
        policy.check_model(family, layers)  # type: ignore[attr-defined]
    indices = sorted({layer.index for layer in layers})
    stray = sorted(set(policy.layers()) - set(indices))
    if stray:
        raise PolicyError(
            f"per_layer overrides name layers {stray} that have no MoE block; the MoE layers are {indices}",
            field="overrides",
        )
    for layer in layers:
        try:
            policy.for_layer(layer.index).k_range(layer.native_k, layer.num_experts)
        except PolicyError as err:
            raise PolicyError(
                f"MoE layer {layer.index} (E={layer.num_experts}, native k={layer.native_k}): {err}",
                field=err.field,
            ) from err


def set_attribute(obj: Any, name: str, value: Any) -> tuple[Any, str, Any]:
    """Set the instance attribute ``obj.name = value`` (bypassing any ``__setattr__`` of the
    framework) and return the record :meth:`PatchHandleBase._undo` restores it from."""
    record = (obj, name, obj.__dict__.get(name, _MISSING))
    object.__setattr__(obj, name, value)
    return record


class Counter(Protocol):
    """A per-layer counter of the (token, expert) pairs the experts computed."""

    @property
    def executed_pairs(self) -> int: ...

    def reset(self) -> None: ...


class PatchHandleBase:
    """The state of one patch: its layers, policy and every instance attribute it set.

    Subclasses set :attr:`handle_attr` and implement :meth:`_install` (set attributes with
    :meth:`_set` only); they may override :meth:`_handle_owner`, :meth:`_policy_changed` and
    :meth:`counters`.

    Attributes:
        family: the model's family name.
        layers: the patched layer records.
        policy: the current policy.
        active: True until the patch is undone.
    """

    #: the instance attribute of the model (or :meth:`_handle_owner`) that holds the handle
    handle_attr: ClassVar[str] = "_dmr_patch_handle"
    #: how messages name the patched thing (``"keras-hub "`` for keras-hub models)
    kind: ClassVar[str] = ""
    #: whether the patched routers hand policies the router input (see :func:`validate_policy`)
    router_input: ClassVar[bool] = False

    def __init__(self, model: Any, layers: Sequence[Any], policy: Any, *, family: str) -> None:
        self._model = model
        self.layers: list[Any] = list(layers)
        self.family = family
        self.policy = policy
        self._saved: list[tuple[Any, str, Any]] = []
        self.active = False

    # -- what a subclass provides -----------------------------------------------------------------
    def _install(self) -> None:
        """Set the patch's attributes, each with :meth:`_set`."""
        raise NotImplementedError

    def _handle_owner(self) -> Any:
        """The object that carries the handle attribute (the model by default)."""
        return self._model

    def _policy_changed(self, policy: Any) -> None:
        """Hand a (validated) new policy to the replacement calls."""

    def counters(self) -> Sequence[Counter]:
        """The per-layer pair counters of the patch."""
        return ()

    # -- the lifecycle ------------------------------------------------------------------------------
    def _set(self, obj: Any, name: str, value: Any) -> None:
        """Set the instance attribute ``obj.name = value``, remembering what was there."""
        self._saved.append(set_attribute(obj, name, value))

    def _apply(self) -> None:
        """Install everything or nothing: an error undoes what was set and propagates."""
        try:
            self._install()
            self._set(self._handle_owner(), self.handle_attr, self)
        except BaseException:
            self._undo()
            raise
        self.active = True

    def _undo(self) -> None:
        """Restore every recorded attribute, newest first."""
        while self._saved:
            obj, name, old = self._saved.pop()
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                object.__setattr__(obj, name, old)
        self.active = False

    def unpatch(self) -> None:
        """Restore the model exactly as it was before the patch."""
        if not self.active:
            raise NotPatchedError(f"this {self.kind}patch was already undone; nothing to unpatch")
        self._undo()

    def set_policy(self, policy: Any) -> None:
        """Switch every layer to ``policy``, validated for all layers first (all or nothing)."""
        if not self.active:
            raise NotPatchedError(
                f"this {self.kind}patch was already undone; patch the model again instead of set_policy"
            )
        validate_policy(policy, self.layers, family=self.family, router_input=self.router_input)
        self._policy_changed(policy)
        self.policy = policy

    # -- statistics ---------------------------------------------------------------------------------
    def executed_pairs(self) -> int:
        """(token, expert) pairs the patched experts computed since patching (or the last reset)."""
        return sum(c.executed_pairs for c in self.counters())

    def reset_counters(self) -> None:
        """Zero every layer's pair counter."""
        for c in self.counters():
            c.reset()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return (
            f"{type(self).__name__}(family={self.family!r}, layers={[layer.index for layer in self.layers]}, "
            f"policy={self.policy!r}, {state})"
        )


H = TypeVar("H", bound=PatchHandleBase)


def refuse_if_patched(existing: PatchHandleBase | None, replace: bool, *, unpatch_call: str) -> None:
    """Raise :class:`~dynamic_moe_router.AlreadyPatchedError` when a patch exists and ``replace`` is
    False; ``unpatch_call`` is the function the message tells the user to call."""
    if existing is not None and not replace:
        raise AlreadyPatchedError(
            f"this {existing.kind}{existing.family} model is already patched with {existing.policy!r}; call "
            f"{unpatch_call} first, use handle.set_policy(policy), or pass replace=True"
        )


def apply_replacing(handle: H, existing: PatchHandleBase | None) -> H:
    """Undo ``existing`` (if any), apply ``handle``; if that fails, re-apply ``existing`` and re-raise."""
    if existing is not None:
        existing.unpatch()
    try:
        handle._apply()
    except BaseException:
        if existing is not None:
            existing._apply()
        raise
    return handle


def require_handle(handle: H | None, model: Any) -> H:
    """``handle``, or :class:`~dynamic_moe_router.NotPatchedError` naming ``model`` when it is None."""
    if handle is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched by dynamic-moe-router; nothing to undo")
    return handle


@contextmanager
def undo_on_exit(handle: H) -> Iterator[H]:
    """Yield ``handle``; on exit (also on error) undo it if it is still active."""
    try:
        yield handle
    finally:
        if handle.active:
            handle.unpatch()
