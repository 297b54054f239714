"""``LearnedAllocator``: a small trained head per MoE layer decides which ranked slots each token keeps.

Per MoE layer a linear head reads the router input ``h (T, H)``, the router's probabilities at the
``k_max`` ranked candidates and the router's normalised entropy, and gives one keep-logit per
ranked slot::

    features = [h, ranked_probs, entropy / log(E)]           # (T, H + k_max + 1)
    z = features @ weight[l].T + bias[l] + offset             # (T, k_max)
    keep slot j  <=>  z[:, j] > 0    (the top slot when no logit is positive)

With ``budget="quantile"`` the threshold is not fixed: in every forward call of at least
``quantile_min_tokens`` tokens, each layer keeps the ``keep_fraction * T * native_k`` highest
keep-logits of the call (each token's top-ranked slot first), so the routed-FLOP
reduction of a prefill or an evaluation batch is ``1 - keep_fraction`` on any text, where a fixed
threshold tuned on one corpus drifts on another. ``keep_fraction`` is one number for every layer or
one per MoE layer; :func:`dynamic_moe_router.learn.fit_quantile_budget` takes the per-layer shares
that the threshold budget gives on calibration text. The price: a token's experts then depend on
the other tokens of its call (deterministic for a given batch, as with ``BatchAware``). Shorter
calls (decoding) use the threshold.

Unlike the count policies, the kept slots need not be a prefix of the ranking (a token may keep
its second expert and drop its first); the patched router packs the kept slots to the front, so
the routing contract (kept slots first, then sentinels) holds. ``offset`` is the budget knob: it is
tuned after training so that the routed-FLOP reduction lands on a target (see
:func:`dynamic_moe_router.train_allocator`).

The heads are trained for one model (family, MoE layers, hidden size, experts, native k); patching
any other model raises :class:`~dynamic_moe_router.PolicyMismatchError`. The policy needs the
router input, so it runs through :func:`dynamic_moe_router.patch` on transformers models (torch);
``dmr.route`` and the JAX / Keras routers, which see router scores only, refuse it.

Files: :meth:`LearnedAllocator.save` writes ``NAME.json`` (the config, as every policy) and
``NAME.safetensors`` beside it (the head weights and the training record); the JSON names the
weights file and its SHA-256, and :func:`dynamic_moe_router.load_policy` checks both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .._atomic import write_bytes_atomic, write_text_atomic
from ..errors import PolicyError, PolicyFileError, PolicyMismatchError, TargetUnreachableError
from ._base import RoutingPolicy, check_int, policy_to_dict, register_policy

if TYPE_CHECKING:
    import torch

__all__ = [
    "FEATURES",
    "LearnedAllocator",
    "allocator_logits",
    "check_reachable",
    "feature_size",
    "spread_keep",
]

#: the feature set of the heads (stored in the file, so that a later release can add others)
FEATURES = "hidden+ranked_probs+entropy"
#: how the kept slots are budgeted: a fixed logit threshold (the offset), or a per-call quantile
BUDGETS = ("threshold", "quantile")


def feature_size(hidden_size: int, k_max: int) -> int:
    """Input width ``D`` of a head: ``H + k_max + 1``."""
    return hidden_size + k_max + 1


def allocator_logits(
    weight: torch.Tensor,  # (k_max, D) fp32
    bias: torch.Tensor,  # (k_max,) fp32
    h: torch.Tensor,  # (T, H) router input, any float dtype
    ranked_probs: torch.Tensor,  # (T, k_max) fp32
    probs: torch.Tensor,  # (T, E) fp32
    offset: float = 0.0,
) -> torch.Tensor:  # (T, k_max) fp32
    """Keep-logits of one layer's head (shared by the policy and the trainer)."""
    import torch

    num_experts = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1, keepdim=True)  # (T, 1)
    entropy = entropy / math.log(num_experts) if num_experts > 1 else entropy
    feats = torch.cat([h.float(), ranked_probs.float(), entropy.float()], dim=-1)  # (T, D)
    return torch.nn.functional.linear(feats, weight, bias) + offset


_NOT_IN_JSON = {"json": False}  # dataclass field metadata: kept out of the policy JSON


def _digest(*tensors: torch.Tensor) -> str:
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return sha.hexdigest()


@register_policy("learned")
@dataclass(frozen=True)
class LearnedAllocator(RoutingPolicy):
    """Trained per-layer keep-heads (see the module docstring).

    Build one with :func:`dynamic_moe_router.train_allocator` (or ``dmr calibrate --family
    learned``), read one with :func:`dynamic_moe_router.load_policy`. ``params`` holds the fp32
    tensors ``weight (L, k_max, D)`` and ``bias (L, k_max)``, one row per MoE layer of ``moe_layers``;
    ``sha256`` is their digest (computed when empty, checked otherwise). ``record`` is the training
    record (a JSON-ready dict, kept in the weights file).

    Example:
        >>> import torch, dynamic_moe_router as dmr
        >>> from dynamic_moe_router.hf.tiny import tiny_model
        >>> model = tiny_model("mixtral")  # 2 MoE layers, H=32, E=8, native k=2
        >>> pol = dmr.LearnedAllocator.keep_native(model)  # heads that keep every native slot
        >>> ids = torch.tensor([[5, 6, 7, 8]])
        >>> before = model(ids).logits
        >>> with dmr.patched(model, pol) as handle:
        ...     torch.allclose(model(ids).logits, before, atol=1e-5), handle.executed_pairs()
        (True, 16)
    """

    family: str
    moe_layers: tuple[int, ...]
    hidden_size: int
    num_experts: int
    native_k: int
    k_max: int
    offset: float = 0.0
    features: str = FEATURES
    compensation: bool = False
    budget: str = "threshold"
    keep_fraction: float | tuple[float, ...] | None = None
    quantile_min_tokens: int = 64
    sha256: str = ""
    params: Mapping[str, Any] | None = field(default=None, compare=False, repr=False, metadata=_NOT_IN_JSON)
    record: Mapping[str, Any] | None = field(default=None, compare=False, repr=False, metadata=_NOT_IN_JSON)

    reads_router_input: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or not self.family:
            raise PolicyError(
                f"learned: family must be a model_type string, got {self.family!r}", field="family"
            )
        layers = self.moe_layers
        if not isinstance(layers, (tuple, list)) or not layers:
            raise PolicyError(
                f"learned: moe_layers must be a non-empty list of layer indices, got {layers!r}",
                field="moe_layers",
            )
        for i in layers:
            check_int("moe_layers[]", i, minimum=0)
        if len(set(layers)) != len(layers):
            raise PolicyError(f"learned: moe_layers has duplicates: {list(layers)}", field="moe_layers")
        object.__setattr__(self, "moe_layers", tuple(layers))
        check_int("hidden_size", self.hidden_size, minimum=1)
        check_int("num_experts", self.num_experts, minimum=1)
        check_int("native_k", self.native_k, minimum=1)
        check_int("k_max", self.k_max, minimum=1)
        if self.native_k > self.num_experts or self.k_max > self.num_experts:
            raise PolicyError(
                f"learned: native_k={self.native_k} and k_max={self.k_max} must be <= "
                f"num_experts={self.num_experts}",
                field="k_max",
            )
        if (
            isinstance(self.offset, bool)
            or not isinstance(self.offset, (int, float))
            or not math.isfinite(self.offset)
        ):
            raise PolicyError(f"learned: offset must be a finite number, got {self.offset!r}", field="offset")
        object.__setattr__(self, "offset", float(self.offset))
        if self.features != FEATURES:
            raise PolicyError(
                f"learned: unknown feature set {self.features!r}; this release reads {FEATURES!r}",
                field="features",
            )
        if not isinstance(self.compensation, bool):
            raise PolicyError(
                f"learned: compensation must be True or False, got {self.compensation!r}",
                field="compensation",
            )
        if self.compensation and self.k_max != self.native_k:
            raise PolicyError(
                f"learned: compensation replaces dropped native slots, so k_max must equal native_k "
                f"({self.native_k}), got k_max={self.k_max}",
                field="k_max",
            )
        self._check_budget()
        if self.params is None:
            raise PolicyError(
                "learned: a LearnedAllocator needs its head weights (params); read a saved one with "
                "dmr.load_policy(path) or train one with dmr.train_allocator(model, ...)",
                field="params",
            )
        self._check_params()

    def _check_budget(self) -> None:
        if self.budget not in BUDGETS:
            raise PolicyError(
                f"learned: budget must be one of {list(BUDGETS)}, got {self.budget!r}", field="budget"
            )
        q = self.keep_fraction
        if self.budget == "threshold" and q is not None:
            raise PolicyError(
                f"learned: keep_fraction={q!r} only applies to budget='quantile' (the threshold budget "
                "is the offset); use with_quantile_budget(target_reduction)",
                field="keep_fraction",
            )
        if self.budget == "quantile":
            values: list[Any] = list(q) if isinstance(q, (tuple, list)) else [q]
            if isinstance(q, (tuple, list)) and len(values) != len(self.moe_layers):
                raise PolicyError(
                    f"learned: keep_fraction has {len(values)} per-layer values for "
                    f"{len(self.moe_layers)} MoE layers; give one number or one per MoE layer",
                    field="keep_fraction",
                )
            fractions: list[float] = []
            floor = 1.0 / self.native_k  # every token keeps at least one slot per layer
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0:
                    raise PolicyError(
                        "learned: budget='quantile' needs keep_fraction in (0, 1] (1 - target reduction), "
                        f"one number or one per MoE layer, got {q!r}",
                        field="keep_fraction",
                    )
                if v < floor - 1e-9:
                    raise PolicyError(
                        f"learned: keep_fraction {v!r} is below 1/native_k = {floor:.4g}: every token keeps "
                        f"at least one of its {self.native_k} slots, so at most {1 - floor:.1%} fewer "
                        "pairs; lower the target reduction",
                        field="keep_fraction",
                    )
                fractions.append(float(v))
            object.__setattr__(
                self, "keep_fraction", tuple(fractions) if isinstance(q, (tuple, list)) else fractions[0]
            )
        check_int("quantile_min_tokens", self.quantile_min_tokens, minimum=1)

    def _check_params(self) -> None:
        import torch

        params = self.params
        assert params is not None
        expected = {"weight", "bias", "means"} if self.compensation else {"weight", "bias"}
        if set(params) != expected:
            raise PolicyError(
                f"learned: params hold {sorted(params)}, expected {sorted(expected)} "
                f"(compensation={self.compensation})",
                field="params",
            )
        n, d = len(self.moe_layers), feature_size(self.hidden_size, self.k_max)
        weight = torch.as_tensor(params["weight"]).detach().to("cpu", torch.float32)
        bias = torch.as_tensor(params["bias"]).detach().to("cpu", torch.float32)
        if tuple(weight.shape) != (n, self.k_max, d) or tuple(bias.shape) != (n, self.k_max):
            raise PolicyError(
                f"learned: head shapes weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not "
                f"match the config (expected ({n}, {self.k_max}, {d}) / ({n}, {self.k_max}) for {n} MoE "
                "layers, "
                f"k_max={self.k_max}, hidden_size={self.hidden_size})",
                field="params",
            )
        tensors = {"weight": weight, "bias": bias}
        if self.compensation:
            means = torch.as_tensor(params["means"]).detach().to("cpu", torch.float32)
            if tuple(means.shape) != (n, self.num_experts, self.hidden_size):
                raise PolicyError(
                    f"learned: compensation means have shape {tuple(means.shape)}, expected "
                    f"({n}, {self.num_experts}, {self.hidden_size}) (MoE layers, experts, hidden size)",
                    field="params",
                )
            tensors["means"] = means
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise PolicyError("learned: head weights hold NaN or infinite values", field="params")
        digest = _digest(*tensors.values())
        if self.sha256 and self.sha256 != digest:
            raise PolicyFileError(
                f"learned: head weights do not match their recorded SHA-256 ({self.sha256[:12]}... != "
                f"{digest[:12]}...): the weights file is corrupt or belongs to another policy file"
            )
        object.__setattr__(self, "sha256", digest)
        object.__setattr__(self, "params", tensors)
        object.__setattr__(self, "_devices", {})  # device -> {name: tensor} copies of params (see _on)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def keep_native(cls, model: Any, k_max: int | None = None, means: Any = None) -> LearnedAllocator:
        """Heads that keep exactly the native top-k slots of ``model`` (zero weights; bias +4 on the
        native slots, -4 on the others): the trainer's starting point, and the equivalence check.
        ``means (L, E, H)`` (see :func:`dynamic_moe_router.learn.expert_means`) turns compensation on."""
        from ..hf.layers import find_moe_layers, model_family, unwrap

        root = unwrap(model)
        layers = find_moe_layers(root, model_family(root))[0]
        return cls.fixed(model, [layer.native_k for layer in layers], k_max=k_max, means=means)

    @classmethod
    def fixed(cls, model: Any, keep: Any, *, k_max: int | None = None, means: Any = None) -> LearnedAllocator:
        """Heads with zero weights that keep the first ``keep[i]`` ranked slots in the ``i``-th MoE
        layer: static per-layer top-k, with compensation when ``means`` is given (the baseline a
        compensated learned allocator is compared with at equal routed FLOPs)."""
        import torch

        from ..hf.layers import find_moe_layers, model_family, unwrap

        root = unwrap(model)
        family = model_family(root)
        layers = find_moe_layers(root, family)[0]
        first = layers[0]
        k_max = first.native_k if k_max is None else k_max
        keep = list(keep)
        if len(keep) != len(layers) or not all(isinstance(k, int) and 1 <= k <= k_max for k in keep):
            raise PolicyError(
                f"learned: keep must list one count in [1, {k_max}] per MoE layer ({len(layers)} layers), "
                f"got {keep}",
                field="keep",
            )
        d = feature_size(first.hidden_size, k_max)
        bias = torch.full((len(layers), k_max), -4.0)
        for row, k in enumerate(keep):
            bias[row, :k] = 4.0
        params = {"weight": torch.zeros(len(layers), k_max, d), "bias": bias}
        if means is not None:
            params["means"] = means
        return cls(
            family=family.model_type,
            moe_layers=tuple(layer.index for layer in layers),
            hidden_size=first.hidden_size,
            num_experts=first.num_experts,
            native_k=first.native_k,
            k_max=k_max,
            compensation=means is not None,
            params=params,
        )

    def with_means(self, means: Any) -> LearnedAllocator:
        """The same heads with compensation by ``means (L, E, H)`` (``None``: without)."""
        assert self.params is not None
        params = {"weight": self.params["weight"], "bias": self.params["bias"]}
        if means is not None:
            params["means"] = means
        return dataclasses.replace(self, compensation=means is not None, params=params, sha256="")

    def with_offset(self, offset: float) -> LearnedAllocator:
        """The same heads with another budget offset (larger keeps more slots)."""
        return dataclasses.replace(self, offset=offset)

    def with_quantile_budget(
        self, target_reduction: float, min_tokens: int = 64, layer_keep: Any = None
    ) -> LearnedAllocator:
        """The same heads with the quantile budget: every forward call of at least ``min_tokens``
        tokens keeps ``1 - target_reduction`` of its native pairs, the highest keep-logits of the
        call in each layer (see the module docstring); shorter calls keep the threshold.

        ``layer_keep`` (one value per MoE layer, for example each layer's kept share of native pairs
        under the threshold budget on calibration text) spreads the kept pairs over the layers in
        those proportions, scaled so that their mean is ``1 - target_reduction`` (a layer that would
        exceed all of its native pairs is capped and the rest rescaled); without it every layer keeps
        the same share. :func:`dynamic_moe_router.learn.fit_quantile_budget` measures it.

        Example:
            >>> import torch, dynamic_moe_router as dmr
            >>> from dynamic_moe_router.hf.tiny import tiny_model
            >>> model = tiny_model("olmoe")  # native k 4, 2 MoE layers
            >>> pol = dmr.LearnedAllocator.keep_native(model).with_quantile_budget(0.5, min_tokens=8)
            >>> with dmr.patched(model, pol) as handle:
            ...     _ = model(torch.randint(0, 64, (2, 16)))
            ...     handle.executed_pairs()  # 2 layers x 32 tokens x 4 slots x 0.5
            128
            >>> pol.with_quantile_budget(0.5, layer_keep=[0.2, 0.6]).keep_fraction
            (0.25, 0.75)
        """
        if (
            isinstance(target_reduction, bool)
            or not isinstance(target_reduction, (int, float))
            or not 0.0 <= target_reduction < 1.0
        ):
            raise PolicyError(
                f"learned: target_reduction must be a number in [0, 1), got {target_reduction!r}",
                field="keep_fraction",
            )
        check_reachable(self.native_k, float(target_reduction))
        keep: float | tuple[float, ...] = 1.0 - float(target_reduction)
        if layer_keep is not None:
            keep = spread_keep(keep, layer_keep, len(self.moe_layers), floor=1.0 / self.native_k)
        return dataclasses.replace(
            self,
            budget="quantile",
            keep_fraction=keep,
            quantile_min_tokens=min_tokens,
        )

    def layer_keep_fraction(self, layer: int) -> float:
        """The quantile budget's kept share of native pairs in MoE layer ``layer``."""
        q = self.keep_fraction
        assert q is not None
        return q[self.moe_layers.index(layer)] if isinstance(q, tuple) else q

    def with_threshold_budget(self) -> LearnedAllocator:
        """The same heads with the fixed-threshold budget (the offset) in every call."""
        return dataclasses.replace(self, budget="threshold", keep_fraction=None)

    @property
    def compensated(self) -> bool:
        """Whether dropped native slots are replaced by their expert's mean output."""
        return self.compensation

    def layer_means(self, layer: int, device: Any) -> torch.Tensor:  # (E, H) fp32
        """The compensation values of MoE layer ``layer`` (requires ``compensation``)."""
        assert self.compensation
        return self._on(device)["means"][self.moe_layers.index(layer)]

    def _on(self, device: Any) -> dict[str, torch.Tensor]:
        """Every tensor of ``params`` (``weight``, ``bias``, and ``means`` with compensation) on
        ``device``, copied once per device (the cache lives outside the frozen fields)."""
        devices: dict[Any, dict[str, torch.Tensor]] = self.__dict__["_devices"]
        cached = devices.get(device)
        if cached is None:
            assert self.params is not None
            cached = devices[device] = {name: t.to(device) for name, t in self.params.items()}
        return cached

    # -- the policy contract ---------------------------------------------------------------------
    def k_range(self, native_k: int, num_experts: int) -> tuple[int, int]:
        if native_k != self.native_k or num_experts != self.num_experts:
            raise PolicyMismatchError(
                f"learned: trained for layers with E={self.num_experts} experts and native "
                f"k={self.native_k}, applied to a layer with E={num_experts}, k={native_k}; train an "
                "allocator for this model "
                "(dmr calibrate --family learned)",
                field="params",
            )
        return 1, self.k_max

    def keep_counts_ops(self, ops: Any, ranked_probs: Any, probs: Any, k_min: int, k_max: int) -> Any:
        raise PolicyError(
            "learned: a LearnedAllocator reads the router input h, which dmr.route and the JAX / Keras "
            "routers do not see; use it through dmr.patch(model, policy) on a transformers model (torch)"
        )

    def check_model(self, family: str, layers: Any) -> None:
        """Raise :class:`~dynamic_moe_router.PolicyMismatchError` unless ``layers`` (the model's
        MoE layers, with ``index``, ``hidden_size``, ``num_experts``, ``native_k``) are the ones the
        heads were trained for."""
        fix = "train an allocator for this model (dmr calibrate --family learned) or load the right file"
        if family != self.family:
            raise PolicyMismatchError(
                f"learned: the heads were trained for a {self.family!r} model, not {family!r}; {fix}",
                field="family",
            )
        indices = tuple(layer.index for layer in layers)
        if indices != self.moe_layers:
            raise PolicyMismatchError(
                f"learned: the heads cover MoE layers {list(self.moe_layers)} ({len(self.moe_layers)} "
                f"layers), the model has MoE layers {list(indices)} ({len(indices)} layers); {fix}",
                field="moe_layers",
            )
        for layer in layers:
            if layer.hidden_size != self.hidden_size:
                raise PolicyMismatchError(
                    f"learned: the heads read hidden size {self.hidden_size}, MoE layer {layer.index} has "
                    f"{layer.hidden_size}; {fix}",
                    field="hidden_size",
                )
            self.k_range(layer.native_k, layer.num_experts)
            self.refuse_zero_experts(layer)

    def refuse_zero_experts(self, layer: Any) -> None:
        """Raise :class:`~dynamic_moe_router.PolicyError` when MoE ``layer`` has zero-computation
        experts and the policy uses compensation or the quantile budget (neither fits such layers)."""
        if not getattr(layer, "zero_experts", 0):
            return
        if self.compensation:
            raise PolicyError(
                f"MoE layer {layer.index}: a learned allocator with compensation (per-expert mean outputs) "
                "is not supported on a layer with zero-computation experts; use one trained without "
                "compensation",
                field="policy",
            )
        if self.budget == "quantile":  # it would count zero-expert slots as routed pairs
            raise PolicyError(
                f"MoE layer {layer.index}: the quantile budget keeps a share of the ranked slots, and on a "
                "layer with zero-computation experts those are not the routed pairs it is meant to "
                "budget; use the threshold budget (policy.with_threshold_budget())",
                field="budget",
            )

    def keep_logits(
        self,
        h: torch.Tensor,  # (T, H)
        ranked_probs: torch.Tensor,  # (T, k_max) fp32
        probs: torch.Tensor,  # (T, E) fp32
        layer: int,
    ) -> torch.Tensor:  # (T, k_max) fp32
        """The keep-logits of MoE layer ``layer`` (offset included)."""
        tensors = self._on(h.device)
        row = self.moe_layers.index(layer)
        return allocator_logits(
            tensors["weight"][row], tensors["bias"][row], h, ranked_probs, probs, self.offset
        )

    def keep_mask(
        self,
        h: torch.Tensor,  # (T, H)
        ranked_probs: torch.Tensor,  # (T, k_max) fp32
        probs: torch.Tensor,  # (T, E) fp32
        layer: int,
    ) -> torch.Tensor:  # (T, k_max) bool, at least one slot per token
        """Which ranked slots each token keeps (the top slot when the head keeps none)."""
        import torch

        z = self.keep_logits(h, ranked_probs, probs, layer)  # (T, k_max)
        tokens = z.shape[0]
        if self.budget == "quantile" and tokens >= self.quantile_min_tokens:
            fraction = self.layer_keep_fraction(layer)
            n = min(z.numel(), max(tokens, round(fraction * tokens * self.native_k)))
            # each token's top-ranked slot first (at least one per token, within the count, as the
            # threshold budget's fallback), then the call's highest other keep-logits
            first = torch.zeros_like(z)
            first[:, 0] = float("inf")
            top = torch.topk((z + first).reshape(-1), n).indices  # (n,)
            keep = torch.zeros(z.numel(), dtype=torch.bool, device=z.device).index_fill_(0, top, True)
            keep = keep.view_as(z)
        else:
            keep = z > 0
        none = ~keep.any(dim=-1, keepdim=True)  # (T, 1)
        first = torch.zeros_like(keep)
        first[:, 0] = True
        return keep | (none & first)

    def overhead_flops(self, hidden_size: int) -> int:
        """Matmul FLOPs of one layer's head per token, ``2 * (H + k_max + 1) * k_max``, plus
        ``2 * k_max * H`` with compensation (the weighted mean outputs of the ranked slots)."""
        head = 2 * feature_size(hidden_size, self.k_max) * self.k_max
        return head + (2 * self.k_max * hidden_size if self.compensation else 0)

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return policy_to_dict(self)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path`` (JSON config) and ``path`` with suffix ``.safetensors`` (weights and training
        record), each atomically; the weights are written first."""
        from safetensors.torch import save

        target = Path(path)
        weights_path = target.with_suffix(".safetensors")
        if weights_path == target:
            raise PolicyError(
                f"learned: the policy path {str(target)!r} must not end in .safetensors (the weights go "
                "there); use a .json path",
                field="path",
            )
        assert self.params is not None
        metadata = {"sha256": self.sha256, "record": json.dumps(dict(self.record or {}), sort_keys=True)}
        blob = save({name: t.contiguous() for name, t in self.params.items()}, metadata)
        write_bytes_atomic(weights_path, blob)
        data = self.to_dict()
        data["_data"]["weights"] = weights_path.name
        write_text_atomic(target, json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_file_data(
        cls, data: Mapping[str, Any], *, where: str, base_dir: Path | None
    ) -> LearnedAllocator:
        """Build the policy from a file's ``_data`` (config fields plus ``weights``, the weights file
        name relative to the JSON file); every problem raises :class:`~dynamic_moe_router.PolicyFileError`."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load

        fields = [f for f in dataclasses.fields(cls) if f.name not in ("params", "record")]
        names = {f.name for f in fields} | {"weights"}
        # fields added later have defaults, so files written before them still load
        required = {f.name for f in fields if f.default is dataclasses.MISSING} | {"weights", "sha256"}
        unknown, missing = set(data) - names, required - set(data)
        if unknown or missing:
            raise PolicyFileError(
                f"{where}: learned policy fields {sorted(unknown)} are unknown and {sorted(missing)} are "
                f"missing; expected {sorted(names)}"
            )
        digest = data["sha256"]
        if not isinstance(digest, str) or not re.fullmatch("[0-9a-f]{64}", digest):
            raise PolicyFileError(
                f"{where}: 'sha256' must be 64 hex digits, got {digest!r}; re-save the policy"
            )
        name = data["weights"]
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise PolicyFileError(
                f"{where}: 'weights' must be a file name beside the policy file, got {name!r}"
            )
        if base_dir is None:
            raise PolicyFileError(
                f"{where}: a learned policy's weights live in a file beside it; read it with "
                "dmr.load_policy(path)"
            )
        weights_path = base_dir / name
        if not weights_path.is_file():
            raise PolicyFileError(
                f"{where}: the weights file {str(weights_path)!r} is missing; keep NAME.json and "
                "NAME.safetensors together (policy.save(path) writes both)"
            )
        try:
            with safe_open(weights_path, framework="pt") as weights:
                metadata = weights.metadata() or {}
            tensors = load(weights_path.read_bytes())  # in memory: the file stays free to be replaced
            record = json.loads(metadata.get("record", "{}"))
            if metadata.get("sha256") != digest:
                recorded = str(metadata.get("sha256"))[:12]
                raise ValueError(f"its recorded SHA-256 {recorded}... is not the policy's {digest[:12]}...")
        except (SafetensorError, ValueError, OSError) as err:
            raise PolicyFileError(
                f"{where}: the weights file {str(weights_path)!r} is corrupt: {err}"
            ) from err
        kwargs = {k: v for k, v in data.items() if k != "weights"}
        for key in ("moe_layers", "keep_fraction"):  # JSON lists back to the tuples the config holds
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        try:
            return cls(**kwargs, params=tensors, record=record)
        except PolicyFileError as err:
            raise PolicyFileError(f"{where}: {err}") from err
        except PolicyError as err:
            raise PolicyFileError(f"{where}: invalid learned policy: {err}") from err

    def describe(self) -> str:
        q = self.keep_fraction
        keep = (
            f"{sum(q) / len(q):.4g} (per layer {', '.join(f'{v:.3g}' for v in q)})"
            if isinstance(q, tuple)
            else f"{q:.4g}"
            if q is not None
            else ""
        )
        budget = (
            f"budget=quantile(keep {keep} of native pairs per call of >= {self.quantile_min_tokens} tokens), "
            if self.budget == "quantile"
            else ""
        )
        return (
            f"learned(family={self.family}, layers={len(self.moe_layers)}, k_max={self.k_max}, "
            f"offset={self.offset:.4g}, {budget}compensation={self.compensation}, sha256={self.sha256[:12]})"
        )


def check_reachable(native_k: int, target_reduction: float) -> None:
    """Raise :class:`~dynamic_moe_router.TargetUnreachableError` when a learned allocator cannot cut
    ``target_reduction`` of a native top-``native_k`` model's routed pairs: every token keeps at
    least one slot per layer, so at most ``1 - 1 / native_k`` fewer.

    Example:
        >>> from dynamic_moe_router.policies.learned import check_reachable
        >>> check_reachable(4, 0.75)  # 1 of 4 slots per token: reachable
        >>> try:
        ...     check_reachable(2, 0.6)
        ... except Exception as err:
        ...     print(type(err).__name__)
        TargetUnreachableError
    """
    most = 1.0 - 1.0 / native_k
    if target_reduction > most + 1e-9:
        raise TargetUnreachableError(
            f"learned: a {target_reduction:.1%} reduction is out of reach of a native top-{native_k} model "
            f"(every token keeps at least one expert per layer: at most {most:.1%}); lower the target"
        )


def spread_keep(mean: float, layer_keep: Any, layers: int, floor: float = 0.0) -> tuple[float, ...]:
    """Per-layer kept shares in the proportions of ``layer_keep``, with mean ``mean``, each within
    ``[floor, 1]`` (``floor``: one slot per token, ``1 / native_k``): ``clip(scale * layer_keep, floor, 1)``
    with the scale that gives the mean.

    Example:
        >>> spread_keep(0.5, [0.2, 0.6], 2)
        (0.25, 0.75)
        >>> spread_keep(0.8, [0.5, 1.0], 2)  # the second layer is capped at 1, the first takes the rest
        (0.6, 1.0)
        >>> spread_keep(0.5, [0.4, 0.6], 2, floor=0.5)  # top-2: at least one of two slots per token
        (0.5, 0.5)
    """
    values = [float(v) for v in layer_keep]
    if len(values) != layers or not all(math.isfinite(v) and v > 0 for v in values):
        raise PolicyError(
            f"learned: layer_keep must hold {layers} positive numbers (one per MoE layer), "
            f"got {layer_keep!r}",
            field="keep_fraction",
        )
    mean = min(max(float(mean), floor), 1.0)

    def shares(scale: float) -> list[float]:
        return [min(max(v * scale, floor), 1.0) for v in values]

    # the mean of the clipped shares rises with the scale: bisect it (on a log scale) to the target
    lo, hi = 0.0, 1.0 / min(values)  # all at the floor / all at 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(shares(mid)) / layers < mean:
            lo = mid
        else:
            hi = mid
    return tuple(round(v, 12) for v in shares(hi))
