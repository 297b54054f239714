"""``TorchOps``: the :class:`~dynamic_moe_router.core.Ops` adapter for PyTorch (the reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._ops import DType

__all__ = ["TORCH_OPS", "TorchOps"]

_DTYPES = {"int": torch.long, "float32": torch.float32, "bool": torch.bool}


@dataclass(frozen=True)
class TorchOps:
    """PyTorch implementation of :class:`~dynamic_moe_router.core.Ops` (index dtype int64).

    ``stable_ties=False`` (the default, what :func:`dynamic_moe_router.route` and patched models
    use) ranks with ``torch.topk``, exactly like the transformers families, whose order among
    *exactly tied* scores is torch's own (on CPU not the lower index first). ``stable_ties=True``
    ranks with a stable descending sort instead: ties go to the lower index, the rule of the
    other adapters (used to generate the cross-framework test vectors).
    """

    stable_ties: bool = False
    name: str = "torch"

    def top_k(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stable_ties:
            values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
            return values[..., :k], indices[..., :k]
        values, indices = torch.topk(x, k, dim=-1)
        return values, indices

    def take_along_axis(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return x.gather(-1, indices)

    def cumsum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=-1)

    def cumprod(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(x, dim=-1)

    def amax(self, x: torch.Tensor, keepdims: bool = False) -> torch.Tensor:
        return x.amax(dim=-1, keepdim=keepdims)

    def sum(self, x: torch.Tensor, keepdims: bool = False) -> torch.Tensor:
        return x.sum(dim=-1, keepdim=keepdims)

    def where(self, cond: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(cond, x, y)

    def full_like(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full_like(x, value)

    def clip(self, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return x.clamp(low, high)

    def floor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)

    def xlogy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.special.xlogy(x, y)

    def isfinite(self, x: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(x)

    def arange(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n, device=like.device)

    def minimum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, y)

    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1, dtype=x.dtype)

    def astype(self, x: torch.Tensor, dtype: DType) -> torch.Tensor:
        return x.to(_DTYPES[dtype])

    def expand_dims(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        return x.unsqueeze(axis)


#: The adapter :func:`dynamic_moe_router.route` and the policies' ``keep_counts`` use.
TORCH_OPS = TorchOps()
