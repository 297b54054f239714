"""``DynamicMoE``: a Keras 3 sparse MoE layer (router + SwiGLU experts) with dynamic routing.

Weights use the transformers layout of Mixtral/OLMoE/Qwen3-MoE blocks (``router (E, H)``,
``gate_up (E, 2I, H)`` gate rows first, ``down (E, H, I)``), so a transformers block loads as is
(:meth:`DynamicMoE.from_transformers`). The router is a softmax over ``E`` experts; the policy reads
it and keeps a prefix of the top-``k_max`` ranking; ``normalize="sum"`` renormalises the kept
weights (Mixtral, Qwen3-MoE), ``"none"`` keeps the raw probabilities (OLMoE with
``norm_topk_prob=False``). Only the kept (token, expert) pairs are computed (see :mod:`.experts`).
The policy is saved in ``get_config`` as the library's policy JSON.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops as _keras_ops

from .. import core
from .._deprecation import renamed_argument, warn_renamed
from ..errors import PolicyError, UnsupportedModelError
from ..policies import RoutingPolicy, StaticTopK, policy_from_dict, policy_to_dict
from .experts import BACKENDS, ExpertsCounter, SwiGLUBank, experts_forward
from .routing import route

#: ``keras.ops``, typed loosely: its inferred result types are incomplete (some read as None)
ops: Any = _keras_ops

__all__ = ["DynamicMoE"]

#: transformers sparse MoE blocks :meth:`DynamicMoE.from_transformers` reads, and their weight rule
#: (:func:`dynamic_moe_router.core.renormalises`; "config" reads the router's ``norm_topk_prob``)
_HF_BLOCKS: dict[str, core.WeightRule] = {
    "MixtralSparseMoeBlock": "always",
    "OlmoeSparseMoeBlock": "config",
    "Qwen3MoeSparseMoeBlock": "config",
}


@keras.saving.register_keras_serializable(package="dynamic_moe_router")
class DynamicMoE(keras.layers.Layer):
    """Router and ``num_experts`` SwiGLU experts; each token keeps the experts ``policy`` chooses.

    Args:
        num_experts: ``E``.
        hidden_size: ``H``.
        intermediate_size: ``I`` of each expert.
        native_k: the model's own top-k (``StaticTopK()`` reproduces it).
        policy: a :class:`~dynamic_moe_router.RoutingPolicy` (default ``StaticTopK()``).
        normalize: ``"sum"`` (renormalise the kept weights) or ``"none"``.
        backend: experts backend, see :mod:`dynamic_moe_router.keras.experts` (``method=`` is its
            deprecated name).
        validate: check the router's probabilities for NaN/inf (eager calls only).
        layer: the MoE layer index, for ``PerLayer`` policies and messages (``layer_index=`` is
            its deprecated name).
        method, layer_index: the deprecated names of ``backend`` and ``layer``.

    Call: ``x (..., H) -> (..., H)``. ``layer.counter`` counts tokens and computed pairs.

    Example:
        >>> import numpy as np, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.keras import DynamicMoE
        >>> moe = DynamicMoE(num_experts=4, hidden_size=8, intermediate_size=16, native_k=2,
        ...                  policy=dmr.TopP(p=0.5))
        >>> y = moe(np.ones((2, 3, 8), "float32"))
        >>> tuple(y.shape), moe.counter.tokens, moe.counter.executed_pairs <= 6 * 2
        ((2, 3, 8), 6, True)
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        native_k: int,
        policy: RoutingPolicy | None = None,
        normalize: str = "sum",
        backend: str = "auto",
        validate: bool = True,
        layer: int | None = None,
        method: str | None = None,
        layer_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        # keras reads __init__'s own signature, so the deprecated names are parameters, not a wrapper
        backend_arg = "backend"  # the name the caller used, for the error's field
        if method is not None:
            if backend != "auto":
                raise TypeError("DynamicMoE() got both method= and backend=; pass only backend=")
            warn_renamed("DynamicMoE(method=...)", "backend=...")
            backend, backend_arg = method, "method"
        if layer_index is not None:
            if layer is not None:
                raise TypeError("DynamicMoE() got both layer_index= and layer=; pass only layer=")
            warn_renamed("DynamicMoE(layer_index=...)", "layer=...")
            layer = layer_index
        super().__init__(**kwargs)
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"{name} must be an int >= 1, got {value!r}", field=name)
        if (
            isinstance(intermediate_size, bool)
            or not isinstance(intermediate_size, int)
            or intermediate_size < 1
        ):
            raise PolicyError(
                f"intermediate_size must be an int >= 1, got {intermediate_size!r}", field="intermediate_size"
            )
        if normalize not in ("sum", "none"):
            raise PolicyError(f"normalize must be 'sum' or 'none', got {normalize!r}", field="normalize")
        if backend not in BACKENDS:
            raise PolicyError(
                f"experts backend ({backend_arg}=) must be one of {BACKENDS}, got {backend!r}",
                field=backend_arg,
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.native_k = native_k
        self.normalize = normalize
        self.backend = backend
        self.validate = validate
        self.layer = layer
        self.counter = ExpertsCounter()
        self.set_policy(StaticTopK() if policy is None else policy)

    @property
    def method(self) -> str:
        """Deprecated name of :attr:`backend`."""
        warn_renamed("DynamicMoE.method", "DynamicMoE.backend")
        return self.backend

    @method.setter
    def method(self, value: str) -> None:
        warn_renamed("DynamicMoE.method", "DynamicMoE.backend")
        self.backend = value

    @property
    def layer_index(self) -> int | None:
        """Deprecated name of :attr:`layer`."""
        warn_renamed("DynamicMoE.layer_index", "DynamicMoE.layer")
        return self.layer

    def set_policy(self, policy: RoutingPolicy) -> None:
        """Switch the policy (validated against ``E`` and ``native_k`` first)."""
        if not isinstance(policy, RoutingPolicy):
            raise PolicyError(
                f"policy must be a RoutingPolicy (e.g. dmr.TopP(p=0.6)), got {type(policy).__name__}",
                field="policy",
            )
        policy.for_layer(self.layer).k_range(self.native_k, self.num_experts)
        self.policy = policy

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.router = self.add_weight(shape=(e, h), initializer=init, name="router")  # (E, H)
        self.gate_up = self.add_weight(shape=(e, 2 * i, h), initializer=init, name="gate_up")  # (E, 2I, H)
        self.down = self.add_weight(shape=(e, h, i), initializer=init, name="down")  # (E, H, I)

    @property
    def bank(self) -> SwiGLUBank:
        return SwiGLUBank(gate_up=self.gate_up, down=self.down, transposed=True)

    def call(self, x: Any) -> Any:
        shape = ops.shape(x)
        h = ops.reshape(x, (-1, self.hidden_size))  # (T, H)
        logits = ops.einsum("th,eh->te", h, self.router)  # (T, E)
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)  # (T, E)
        r = route(
            probs,
            self.policy,
            native_k=self.native_k,
            normalize=self.normalize,
            layer=self.layer,
            validate=self.validate,
        )
        weights = ops.cast(r.weights, h.dtype)  # (T, k_max)
        y = experts_forward(h, r.ids, weights, self.bank, backend=self.backend, counter=self.counter)
        return ops.reshape(y, shape)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """The layer's constructor arguments, with the policy as its JSON dictionary."""
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "native_k": self.native_k,
                "policy": policy_to_dict(self.policy),
                "normalize": self.normalize,
                "backend": self.backend,
                "validate": self.validate,
                "layer": self.layer,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DynamicMoE:
        """Rebuild a layer from :meth:`get_config` (the policy is parsed and validated again)."""
        config = dict(config)
        config["policy"] = policy_from_dict(config["policy"], where="DynamicMoE config policy")
        return cls(**config)

    # -- transformers blocks -------------------------------------------------------------------
    @classmethod
    @renamed_argument("layer_index", "layer")
    def from_transformers(
        cls, block: Any, policy: RoutingPolicy | None = None, *, layer: int | None = None, **kwargs: Any
    ) -> DynamicMoE:
        """A layer with the router and expert weights of a transformers sparse MoE block.

        ``block`` is ``model.model.layers[i].mlp`` of a Mixtral, OLMoE or Qwen3-MoE model
        (``gate.weight (E, H)``, ``experts.gate_up_proj (E, 2I, H)``, ``experts.down_proj (E, H, I)``).
        Mixtral always renormalises the kept weights; OLMoE and Qwen3-MoE follow ``norm_topk_prob``.

        Raises:
            UnsupportedModelError: ``block`` is not one of these blocks.
        """
        name = type(block).__name__
        if name not in _HF_BLOCKS:
            raise UnsupportedModelError(
                f"DynamicMoE.from_transformers reads {sorted(_HF_BLOCKS)} (model.model.layers[i].mlp), "
                f"got {name}; for other families use dynamic_moe_router.patch on the PyTorch model"
            )
        gate, experts = block.gate, block.experts
        num_experts, hidden = (int(n) for n in gate.weight.shape)
        renorm = core.renormalises(_HF_BLOCKS[name], getattr(gate, "norm_topk_prob", None))
        moe = cls(
            num_experts=num_experts,
            hidden_size=hidden,
            intermediate_size=int(experts.down_proj.shape[-1]),
            native_k=int(gate.top_k),
            policy=policy,
            normalize="sum" if renorm else "none",
            layer=layer,
            **kwargs,
        )
        moe.load_transformers_weights(block)
        return moe

    def load_transformers_weights(self, block: Any) -> None:
        """Copy ``block``'s router and expert weights (shapes must match this layer)."""
        arrays = {
            "router": block.gate.weight,
            "gate_up": block.experts.gate_up_proj,
            "down": block.experts.down_proj,
        }
        if not self.built:
            self.build((None, self.hidden_size))
        for name, tensor in arrays.items():
            value = tensor.detach().float().cpu().numpy()
            variable = getattr(self, name)
            if tuple(variable.shape) != value.shape:
                raise UnsupportedModelError(
                    f"{name}: the block's shape {value.shape} does not fit this layer's "
                    f"{tuple(variable.shape)}; build the layer with the block's sizes (from_transformers)"
                )
            variable.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(variable.dtype)))
