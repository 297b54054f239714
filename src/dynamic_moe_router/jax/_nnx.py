"""``DynamicMoE``: a Flax NNX sparse MoE block (router + SwiGLU experts) with a dynamic policy."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import core
from .._deprecation import renamed_argument, warn_renamed
from ..errors import MissingDependencyError, UnsupportedModelError
from ..policies import RoutingPolicy
from ._experts import Backend, moe_forward
from ._routing import route

try:
    from flax import nnx
except ImportError as err:  # pragma: no cover - exercised only without flax
    raise MissingDependencyError(
        'dynamic_moe_router.jax.DynamicMoE needs Flax: pip install "dynamic-moe-router-kit[jax]"'
    ) from err

__all__ = ["DynamicMoE"]


class DynamicMoE(nnx.Module):
    """A Mixtral/OLMoE-style sparse MoE block whose router keeps a per-token number of experts.

    ``router (E, H)`` gives logits, their float32 softmax is ranked and read by ``policy``
    (:func:`dynamic_moe_router.jax.route`), the kept weights are renormalised over the kept experts
    when ``renormalize`` (Mixtral; OLMoE's ``norm_topk_prob``), and
    :func:`~dynamic_moe_router.jax.moe_forward` runs the SwiGLU experts ``gate_up (E, 2I, H)``,
    ``down (E, H, I)`` on the kept pairs only. ``validate`` (default ``False``, so the block runs
    under ``nnx.jit``) checks the router logits on the host.

    Example:
        >>> import jax.numpy as jnp, dynamic_moe_router as dmr
        >>> from flax import nnx
        >>> from dynamic_moe_router.jax import DynamicMoE
        >>> moe = DynamicMoE(16, 32, 4, native_k=2, policy=dmr.TopP(p=0.5), rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 3, 16))
        >>> out, routing = nnx.jit(lambda m, x: m(x, return_routing=True))(moe, x)
        >>> out.shape, routing.ids.shape
        ((2, 3, 16), (6, 2))
    """

    @renamed_argument("impl", "backend")
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        *,
        native_k: int,
        policy: RoutingPolicy,
        renormalize: bool = True,
        layer: int | None = None,
        backend: Backend = "auto",
        validate: bool = False,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        init = jax.nn.initializers.normal(0.02)
        self.router = nnx.Param(init(rngs.params(), (num_experts, hidden_size), dtype))
        self.gate_up = nnx.Param(
            init(rngs.params(), (num_experts, 2 * intermediate_size, hidden_size), dtype)
        )
        self.down = nnx.Param(init(rngs.params(), (num_experts, hidden_size, intermediate_size), dtype))
        self.native_k = native_k
        self.policy = policy
        self.renormalize = renormalize
        self.layer = layer
        self.backend: Backend = backend
        self.validate = validate
        policy.for_layer(layer).k_range(native_k, num_experts)  # a PolicyError now, not at the first call

    @property
    def impl(self) -> str:
        """Deprecated name of :attr:`backend`."""
        warn_renamed("DynamicMoE.impl", "DynamicMoE.backend")
        return self.backend

    def __call__(self, x: jax.Array, *, return_routing: bool = False) -> Any:
        """``x (..., H) -> (..., H)``; with ``return_routing`` also the :class:`Routing` of the tokens."""
        hidden_size = x.shape[-1]
        flat = x.reshape(-1, hidden_size)  # (T, H)
        logits = flat @ self.router[...].T  # (T, E)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        routing = route(
            probs,
            self.policy,
            native_k=self.native_k,
            normalize="sum" if self.renormalize else "none",
            layer=self.layer,
            validate=self.validate,
        )
        out = moe_forward(
            flat,
            routing.ids,
            routing.weights.astype(x.dtype),
            self.gate_up[...],
            self.down[...],
            backend=self.backend,
        )
        out = out.reshape(x.shape)
        return (out, routing) if return_routing else out

    @classmethod
    @renamed_argument("impl", "backend")
    def from_transformers(
        cls,
        block: Any,
        policy: RoutingPolicy,
        *,
        layer: int | None = None,
        renormalize: bool | None = None,
        backend: Backend = "auto",
        validate: bool = False,
        dtype: Any = jnp.float32,
    ) -> DynamicMoE:
        """Copy the router and expert weights of a transformers sparse MoE block.

        ``block`` is ``model.model.layers[i].mlp`` of a Mixtral- or OLMoE-style model (also
        Qwen3-MoE): ``block.gate.weight (E, H)``, ``block.experts.gate_up_proj (E, 2I, H)``,
        ``block.experts.down_proj (E, H, I)``, SiLU, no shared experts. ``renormalize=None``
        follows the model: ``block.gate.norm_topk_prob`` where it exists (OLMoE, Qwen), else
        ``True`` (Mixtral). Pass ``layer=i`` for a ``PerLayer`` policy.
        """
        gate = getattr(block, "gate", None)
        experts = getattr(block, "experts", None)
        names = ("gate_up_proj", "down_proj")
        if (
            gate is None
            or not hasattr(gate, "weight")
            or experts is None
            or not all(hasattr(experts, n) for n in names)
        ):
            raise UnsupportedModelError(
                f"{type(block).__name__} is not a Mixtral/OLMoE-style sparse MoE block (needs gate.weight, "
                "experts.gate_up_proj and experts.down_proj); pass model.model.layers[i].mlp of such a model"
            )
        if any(hasattr(block, n) for n in ("shared_expert", "shared_experts")):
            raise UnsupportedModelError(
                f"{type(block).__name__} has shared experts, which DynamicMoE does not "
                "model; use a Mixtral- or OLMoE-style block"
            )
        act = getattr(experts, "act_fn", None)
        if type(act).__name__ not in ("SiLU", "SiLUActivation"):
            raise UnsupportedModelError(
                f"{type(block).__name__} uses the activation {type(act).__name__}; "
                "DynamicMoE implements SwiGLU (SiLU) experts only"
            )
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise UnsupportedModelError(
                f"{type(block).__name__}: biased or transposed expert weights are not supported"
            )

        def arr(t: Any) -> jax.Array:
            return jnp.asarray(np.asarray(t.detach().float().cpu()), dtype=dtype)

        router, gate_up, down = arr(gate.weight), arr(experts.gate_up_proj), arr(experts.down_proj)
        num_experts, two_i, hidden_size = gate_up.shape
        native_k = int(getattr(gate, "top_k", getattr(block, "top_k", 0)))
        if renormalize is None:  # Mixtral has no flag and always renormalises
            rule = "config" if hasattr(gate, "norm_topk_prob") else "always"
            renormalize = core.renormalises(rule, getattr(gate, "norm_topk_prob", None))
        moe = cls(
            hidden_size,
            two_i // 2,
            num_experts,
            native_k=native_k,
            policy=policy,
            renormalize=renormalize,
            layer=layer,
            backend=backend,
            validate=validate,
            rngs=nnx.Rngs(0),
            dtype=dtype,
        )
        moe.router[...] = router
        moe.gate_up[...] = gate_up
        moe.down[...] = down
        return moe
