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
from keras import ops

from ..errors import PolicyError, UnsupportedModelError
from ..policies import RoutingPolicy, StaticTopK, policy_from_dict, policy_to_dict
from .experts import METHODS, PairCounter, SwiGLUBank, experts_forward
from .routing import route

__all__ = ["DynamicMoE"]

#: transformers sparse MoE blocks :meth:`DynamicMoE.from_transformers` reads, and their weight rule
_HF_BLOCKS = {"MixtralSparseMoeBlock", "OlmoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock"}


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
        method: experts method, see :mod:`dynamic_moe_router.keras.experts`.
        validate: check the router's probabilities for NaN/inf (eager calls only).
        layer_index: the MoE layer index, for ``PerLayer`` policies and messages.

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
        method: str = "auto",
        validate: bool = True,
        layer_index: int | None = None,
        **kwargs: Any,
    ) -> None:
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
        if method not in METHODS:
            raise PolicyError(f"method must be one of {METHODS}, got {method!r}", field="method")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.native_k = native_k
        self.normalize = normalize
        self.method = method
        self.validate = validate
        self.layer_index = layer_index
        self.counter = PairCounter()
        self.set_policy(StaticTopK() if policy is None else policy)

    def set_policy(self, policy: RoutingPolicy) -> None:
        """Switch the policy (validated against ``E`` and ``native_k`` first)."""
        if not isinstance(policy, RoutingPolicy):
            raise PolicyError(
                f"policy must be a RoutingPolicy (e.g. dmr.TopP(p=0.6)), got {type(policy).__name__}",
                field="policy",
            )
        policy.for_layer(self.layer_index).k_range(self.native_k, self.num_experts)
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
            layer=self.layer_index,
            validate=self.validate,
        )
        weights = ops.cast(r.weights, h.dtype)  # (T, k_max)
        y = experts_forward(h, r.ids, weights, self.bank, method=self.method, counter=self.counter)
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
                "method": self.method,
                "validate": self.validate,
                "layer_index": self.layer_index,
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
    def from_transformers(
        cls, block: Any, policy: RoutingPolicy | None = None, *, layer_index: int | None = None, **kwargs: Any
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
        renorm = True if name == "MixtralSparseMoeBlock" else bool(getattr(gate, "norm_topk_prob", False))
        layer = cls(
            num_experts=num_experts,
            hidden_size=hidden,
            intermediate_size=int(experts.down_proj.shape[-1]),
            native_k=int(gate.top_k),
            policy=policy,
            normalize="sum" if renorm else "none",
            layer_index=layer_index,
            **kwargs,
        )
        layer.load_transformers_weights(block)
        return layer

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
