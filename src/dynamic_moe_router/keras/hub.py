"""keras-hub MoE models: ``patch`` / ``unpatch`` / ``patched`` / ``profile``, per instance and atomic.

The seam is the sparse MoE block's ``call``: keras-hub computes every expert for every token
(``expert_bank`` einsums over ``(E, T, ...)``) and zeroes the unselected ones with a one-hot
routing matrix. Patching sets an instance attribute ``call`` on each block (never on a class):
the block's own router ``Dense``, its shared expert (Qwen-MoE, Qwen3.5-MoE) and its expert
variables are used as they are, the policy chooses the kept experts, and
:func:`~.experts.experts_forward` computes only the kept pairs. Nothing else changes: variables,
weights, the layer tree and saved models are those of the unpatched model; ``unpatch`` deletes
the instance attributes (and restores the model's compiled predict/generate functions), so the
outputs are exactly the original ones again.

Families (block classes of keras-hub 0.32):

=============  ===========================  =============================  ============
family         block                        weights                        shared
=============  ===========================  =============================  ============
mixtral        ``MixtralSparseMoeBlock``    renormalised                   -
qwen_moe       ``QwenSparseMoeBlock``       renormalised if norm_top_k     sigmoid-gated
qwen3_moe      ``Qwen3SparseMoeBlock``      renormalised if norm_top_k     -
qwen3_5_moe    ``Qwen3_5MoeSparseMoeBlock`` renormalised                   sigmoid-gated
=============  ===========================  =============================  ============

keras-hub's other MoE layers (gpt_oss, gemma4) score differently and raise
:class:`~dynamic_moe_router.UnsupportedModelError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from keras import ops as _keras_ops

from .. import core
from .._deprecation import renamed_argument, warn_renamed
from ..errors import NoMoELayersError, PolicyError, UnsupportedModeError, UnsupportedModelError
from ..policies import RoutingPolicy, StaticTopK
from .experts import BACKENDS, ExpertsCounter, SwiGLUBank, experts_forward
from .routing import route

#: ``keras.ops``, typed loosely: its inferred result types are incomplete (some read as None)
ops: Any = _keras_ops

__all__ = [
    "HUB_FAMILIES",
    "HubFamily",
    "HubMoELayer",
    "KerasPatchHandle",
    "get_patch",
    "patch",
    "patched",
    "unpatch",
]

_HANDLE_ATTR = "_dmr_keras_patch_handle"
_COMPILED = ("predict_function", "generate_function", "test_function", "train_function")


@dataclass(frozen=True)
class HubFamily:
    """How to read one keras-hub sparse MoE block."""

    name: str
    block_class: str
    router: str  # attribute of the router Dense (H -> E)
    renorm: core.WeightRule  # "always" or "config" (the block's norm_top_k_prob)
    bank: Callable[[Any], SwiGLUBank]
    shared: Callable[[Any, Any], Any] | None = None  # (block, h (T, H)) -> (T, H)


def _mixtral_bank(block: Any) -> SwiGLUBank:
    bank = block.expert_bank
    return SwiGLUBank(
        gate=bank._expert_feedforward_gate_dense,  # (E, H, I)
        up=bank._expert_feedforward_intermediate_dense,  # (E, H, I)
        down=bank._expert_feedforward_output_dense,  # (E, I, H)
        activation=bank.activation,
        silu_fp32=True,
    )


def _fused_bank(silu_fp32: bool) -> Callable[[Any], SwiGLUBank]:
    def read(block: Any) -> SwiGLUBank:
        bank = block.expert_bank
        return SwiGLUBank(
            gate_up=bank._expert_feedforward_gate_dense,  # (E, H, 2I), gate columns first
            down=bank._expert_feedforward_output_dense,  # (E, I, H)
            activation=getattr(bank, "activation", ops.silu),
            silu_fp32=silu_fp32,
        )

    return read


def _qwen_shared(block: Any, h: Any) -> Any:
    return block.shared_expert_dense(h) * ops.sigmoid(block.shared_expert_gate_dense(h))


def _qwen3_5_shared(block: Any, h: Any) -> Any:
    return ops.sigmoid(block._shared_expert_gate(h)) * block.shared_expert(h)


HUB_FAMILIES: tuple[HubFamily, ...] = (
    HubFamily("mixtral", "MixtralSparseMoeBlock", "_sparse_feedforward_gate_dense", "always", _mixtral_bank),
    HubFamily(
        "qwen_moe",
        "QwenSparseMoeBlock",
        "_sparse_feedforward_gate_dense",
        "config",
        _fused_bank(False),
        _qwen_shared,
    ),
    HubFamily(
        "qwen3_moe", "Qwen3SparseMoeBlock", "_sparse_feedforward_gate_dense", "config", _fused_bank(False)
    ),
    HubFamily(
        "qwen3_5_moe",
        "Qwen3_5MoeSparseMoeBlock",
        "_router_gate",
        "always",
        _fused_bank(True),
        _qwen3_5_shared,
    ),
)
_BY_CLASS = {f.block_class: f for f in HUB_FAMILIES}


@dataclass(frozen=True)
class HubMoELayer:
    """One sparse MoE block of a keras-hub model."""

    index: int  # position in backbone.transformer_layers
    path: str
    block: Any
    family: HubFamily
    num_experts: int
    native_k: int
    hidden_size: int
    intermediate_size: int

    @property
    def flops_per_pair(self) -> int:
        """Matmul FLOPs of one (token, expert) pair: ``6 * H * I``."""
        return 6 * self.hidden_size * self.intermediate_size


def _backbone(model: Any) -> Any:
    return getattr(model, "backbone", model)


def _looks_like_moe(layer: Any) -> bool:
    """A sparse MoE block of some keras-hub family (``GptOssSparseMoeBlock``, ``Gemma4MoEBlock``)."""
    return re.search(r"(?i)moe\w*block$", type(layer).__name__) is not None


def find_moe_layers(model: Any) -> list[HubMoELayer]:
    """The sparse MoE blocks of a keras-hub backbone or task model, in layer order.

    Raises:
        UnsupportedModelError: not a keras-hub transformer, or an MoE block of an unsupported family.
        NoMoELayersError: a keras-hub model without sparse MoE blocks.
    """
    backbone = _backbone(model)
    decoders = getattr(backbone, "transformer_layers", None)
    known = ", ".join(f"{f.name} ({f.block_class})" for f in HUB_FAMILIES)
    if not isinstance(decoders, (list, tuple)) or not hasattr(backbone, "_flatten_layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a keras-hub backbone or task model with transformer_layers; "
            f"dynamic_moe_router.keras.patch supports keras-hub families {known}"
        )
    layers: list[HubMoELayer] = []
    for index, decoder in enumerate(decoders):
        for sub in decoder._flatten_layers(include_self=False, recursive=True):
            family = _BY_CLASS.get(type(sub).__name__)
            if family is None:
                if _looks_like_moe(sub):
                    raise UnsupportedModelError(
                        f"transformer_layers[{index}] holds {type(sub).__name__}, an MoE layer of a "
                        f"keras-hub family dynamic-moe-router does not support; supported: {known}. "
                        "Nothing was patched."
                    )
                continue
            bank = family.bank(sub)
            layers.append(
                HubMoELayer(
                    index=index,
                    path=f"transformer_layers[{index}].{sub.name}",
                    block=sub,
                    family=family,
                    num_experts=int(sub.num_experts),
                    native_k=int(sub.top_k),
                    hidden_size=bank.hidden_size,
                    intermediate_size=bank.intermediate_size,
                )
            )
    if not layers:
        raise NoMoELayersError(
            f"{type(model).__name__} has no sparse MoE block; dynamic_moe_router.keras.patch supports the "
            f"keras-hub families {known}"
        )
    return layers


class DynamicBlockCall:
    """The replacement ``call`` of one keras-hub sparse MoE block."""

    def __init__(self, layer: HubMoELayer, policy: RoutingPolicy, backend: str, validate: bool) -> None:
        self.layer = layer
        self.backend = backend
        self.validate = validate
        self.counter = ExpertsCounter()
        self.policy = policy

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`backend`."""
        warn_renamed(f"{type(self).__name__}.method", f"{type(self).__name__}.backend")
        return self.backend

    @property
    def normalize(self) -> str:
        flag = getattr(self.layer.block, "norm_top_k_prob", None)
        return "sum" if core.renormalises(self.layer.family.renorm, flag) else "none"

    def __call__(self, hidden_states: Any, attention_mask: Any = None, training: Any = None) -> Any:
        layer, block = self.layer, self.layer.block
        if training:
            raise UnsupportedModeError(
                "a keras-hub model patched by dynamic-moe-router runs inference only (the load-balancing "
                "loss is not reproduced); call dynamic_moe_router.keras.unpatch(model) before training"
            )
        shape = ops.shape(hidden_states)
        h = ops.reshape(hidden_states, (-1, layer.hidden_size))  # (T, H)
        logits = getattr(block, layer.family.router)(h)  # (T, E)
        probs = ops.softmax(logits, axis=-1)  # (T, E), as keras-hub: in the logits' dtype
        r = route(
            probs,
            self.policy,
            native_k=layer.native_k,
            normalize=self.normalize,
            layer=layer.index,
            validate=self.validate,
        )
        weights = ops.cast(r.weights, h.dtype)  # (T, k_max)
        out = experts_forward(
            h, r.ids, weights, layer.family.bank(block), backend=self.backend, counter=self.counter
        )
        if layer.family.shared is not None:
            out = out + layer.family.shared(block, h)
        return ops.reshape(out, shape), logits


class KerasPatchHandle(core.PatchHandleBase):
    """What :func:`patch` returns: the patch's layers, policy, counters and undo
    (the lifecycle of :class:`dynamic_moe_router.core.PatchHandleBase`)."""

    handle_attr = _HANDLE_ATTR
    kind = "keras-hub "

    def __init__(
        self, model: Any, layers: list[HubMoELayer], policy: RoutingPolicy, backend: str, validate: bool
    ) -> None:
        super().__init__(model, layers, policy, family=layers[0].family.name)
        self.backend = backend
        self.calls = [DynamicBlockCall(layer, policy, backend, validate) for layer in layers]

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`backend`."""
        warn_renamed(f"{type(self).__name__}.method", f"{type(self).__name__}.backend")
        return self.backend

    def _install(self) -> None:
        for layer, call in zip(self.layers, self.calls, strict=True):
            self._set(layer.block, "call", call)
        for owner in self._owners():
            for name in _COMPILED:  # compiled functions captured the original calls
                if name in owner.__dict__:
                    self._set(owner, name, None)

    def _handle_owner(self) -> Any:
        return _backbone(self._model)

    def _owners(self) -> list[Any]:
        """The model and, for a task model, its backbone (both may hold compiled functions)."""
        backbone = _backbone(self._model)
        return [self._model] if backbone is self._model else [self._model, backbone]

    def _policy_changed(self, policy: Any) -> None:
        for call in self.calls:
            call.policy = policy
        for owner in self._owners():
            for name in _COMPILED:  # traced functions captured the old policy
                if owner.__dict__.get(name) is not None:
                    object.__setattr__(owner, name, None)

    def counters(self) -> list[ExpertsCounter]:
        return [c.counter for c in self.calls]


def get_patch(model: Any) -> KerasPatchHandle | None:
    """The active :class:`KerasPatchHandle` of ``model`` (or of its backbone), or ``None``."""
    return _backbone(model).__dict__.get(_HANDLE_ATTR)


@renamed_argument("method", "backend")
def patch(
    model: Any,
    policy: RoutingPolicy | None = None,
    *,
    replace: bool = False,
    backend: str = "auto",
    validate: bool = True,
) -> KerasPatchHandle:
    """Give every sparse MoE block of a keras-hub model dynamic routing with ``policy`` (in place).

    Args:
        model: a keras-hub backbone (``MixtralBackbone``, ``QwenMoeBackbone``, ``Qwen3MoeBackbone``,
            ``Qwen3_5MoeBackbone``) or a task model holding one (``MixtralCausalLM``, ...).
        policy: the routing policy; default ``StaticTopK()`` (the model's own routing).
        replace: allow patching an already patched model (its patch is undone first).
        backend: experts backend (see :mod:`dynamic_moe_router.keras.experts`); ``"auto"`` by
            default. (``method=`` is its deprecated name.)
        validate: check router probabilities for NaN/inf in eager calls (a host sync per layer).

    Raises:
        UnsupportedModelError: not a keras-hub transformer, or an MoE layer of an unsupported family.
        NoMoELayersError: no sparse MoE block.
        PolicyError: the policy does not fit a layer, or an unknown ``backend``.
        AlreadyPatchedError: already patched and ``replace`` is False.

    Nothing is changed when any of them is raised.
    """
    policy = StaticTopK() if policy is None else policy
    if backend not in BACKENDS:
        raise PolicyError(
            f"experts backend (method=) must be one of {BACKENDS}, got {backend!r}", field="backend"
        )
    if not isinstance(validate, bool):
        raise PolicyError(f"validate must be True or False, got {validate!r}", field="validate")
    layers = find_moe_layers(model)
    existing = get_patch(model)
    core.refuse_if_patched(existing, replace, unpatch_call="dynamic_moe_router.keras.unpatch(model)")
    core.validate_policy(policy, layers)
    return core.apply_replacing(KerasPatchHandle(model, layers, policy, backend, validate), existing)


def unpatch(model: Any) -> None:
    """Undo :func:`patch`: the model's outputs are exactly those of the unpatched model."""
    core.require_handle(get_patch(model), model).unpatch()


@contextmanager
def patched(model: Any, policy: RoutingPolicy | None = None, **kwargs: Any) -> Iterator[KerasPatchHandle]:
    """:func:`patch` on entry, :func:`unpatch` on exit (also on error)."""
    with core.undo_on_exit(patch(model, policy, **kwargs)) as handle:
        yield handle
