"""An experts forward whose cost follows the kept (token, expert) pairs.

It consumes the routing contract (``ids (T, k_max)`` with sentinel ``E``, ``weights (T, k_max)``)
and the fused 3-D expert weights of a transformers experts module:

* standard layout: ``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``, ``act_fn(gate) * up``
  with ``gate, up = chunk(2)`` (mixtral, olmoe, qwen, deepseek, granitemoe, phimoe);
* gpt_oss layout: ``gate_up_proj (E, H, 2I)`` with gate/up interleaved, biases, and the clamped
  SwiGLU ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=l)``.

Backends:

* ``"loop"``: one pair of GEMMs per active expert, only over that expert's kept rows. Any device;
  it reads the per-expert counts on the host.
* ``"grouped"``: compacts the kept pairs, then ``torch.nn.functional.grouped_mm`` over them
  (two grouped GEMMs for all experts). Host sync for the number of kept pairs.
* ``"cuda"`` (GPU prefill): sync-free; Triton gather, SwiGLU and combine kernels bounded by the
  device-side count of kept pairs around two ``grouped_mm`` calls with device-side offsets (see
  :mod:`dynamic_moe_router.experts._gpu`). Layers the Triton kernels do not cover (gpt_oss layout,
  activations other than SiLU) or machines without Triton run the same GEMMs over a fixed
  ``T * k_max`` buffer whose sentinel tail the GEMMs skip but gather and activation do not.
* ``"triton"`` (GPU decode and small batches): sync-free Triton grouped GEMMs over a block table,
  with the gather fused into the first GEMM and SwiGLU into its epilogue; each touched expert's
  weights are streamed once per block of rows.
* zero-computation experts (``zero_experts=Z``, longcat_flash): ids ``[E, E + Z)`` after the ``E``
  real experts (``E = down_proj.shape[0]``) add ``hidden * weight`` (the identity, no GEMM); the
  sentinel is then ``E + Z``, the number of experts the router scores. Their pairs are not executed
  pairs (they cost no expert FLOPs): :class:`ExpertsCounter` counts them apart
  (``zero_expert_pairs``).
* ``"auto"``: on a capable GPU in bf16/fp16, ``"triton"`` for few rows per expert and ``"cuda"``
  otherwise (see :func:`choose_cuda_backend`); on CPU the faster of ``"loop"`` and ``"grouped"``
  for the shape (see :func:`choose_cpu_backend`); ``"loop"`` when nothing else can run (fp32 on
  CUDA uses ``"loop"``, whose per-expert cuBLAS GEMMs reproduce transformers' eager path). An
  explicitly requested backend that cannot run raises ``BackendUnavailableError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .. import core
from ..backends import BACKEND_TABLE, BACKENDS, get_backend
from ..errors import BackendUnavailableError
from . import _gpu

__all__ = [
    "BACKENDS",
    "ExpertsCounter",
    "ExpertsLayout",
    "choose_cpu_backend",
    "choose_cuda_backend",
    "experts_forward",
    "graph_safe_backend",
    "resolve_backend",
]

#: ``auto`` on CUDA uses the fused Triton path up to this many kept-pair slots per expert
#: (``T * k_max / E``), the grouped_mm path above it (crossover measured by
#: ``benchmarks/bench_gpu_experts.py``; see BENCHMARKS.md).
CUDA_TRITON_MAX_ROWS_PER_EXPERT = 16


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores its weights and which activation it applies."""

    transposed: bool = False  # gate_up_proj (E, H, 2I) and down_proj (E, I, H)
    interleaved: bool = False  # gate and up interleaved along 2I (gate = [..., ::2])
    has_bias: bool = False  # gate_up_proj_bias (E, 2I), down_proj_bias (E, H)
    activation: Literal["act_fn", "gpt_oss"] = "act_fn"


#: a transformers experts module: a ``torch.nn.Module`` with ``gate_up_proj``, ``down_proj`` (and
#: ``act_fn`` or the gpt_oss ``limit``/``alpha``) read by attribute (typed loosely: its attributes
#: are parameters, modules or numbers depending on the family)
ExpertsModule = Any

STANDARD = ExpertsLayout()
GPT_OSS = ExpertsLayout(transposed=True, interleaved=True, has_bias=True, activation="gpt_oss")


def _accumulate(total: torch.Tensor | None, n: torch.Tensor) -> torch.Tensor:
    """``total += n`` in place, in a long tensor allocated on the first call only.

    Counting allocates nothing after the first call, so the caching allocator's state repeats from
    one ``generate()`` to the next. Transformers' static cache relies on that: it builds a new cache
    each call, and ``torch.compile(mode="reduce-overhead")`` replays its CUDA graphs only when the
    cache lands at the addresses they were recorded with (else it records them again, every call).
    The accumulator is a normal tensor even when created under ``torch.inference_mode``, so that a
    later call outside that mode can still add to it.
    """
    n = n.detach()
    n = n.reshape(()) if n.numel() == 1 else n  # a count as (1,) adds to a () total, as before
    total = _total_on(total, n.shape, n.device)
    total.add_(n)
    return total


def _total_on(total: torch.Tensor | None, shape: Any, device: torch.device) -> torch.Tensor:
    """``total`` on ``device``: a zero long tensor of ``shape`` on the first call, a copy on another
    device after the model moved (one allocation, no temporary); else ``total`` itself."""
    if total is None or total.device != device:
        with torch.inference_mode(False):
            fresh = torch.zeros(shape, dtype=torch.long, device=device)
            total = fresh if total is None else fresh.add_(total.to(device))
    return total


@dataclass
class ExpertsCounter:
    """Counts the (token, expert) rows actually fed to the expert GEMMs.

    ``executed_pairs`` is exact: it is summed from the row counts of the GEMM inputs. On the
    sync-free CUDA backend it is accumulated as a device tensor and read on access.
    ``zero_expert_pairs`` counts, apart, the pairs routed to zero-computation (identity) experts:
    they add ``hidden * weight`` and feed no GEMM, so they are never executed pairs.
    """

    calls: int = 0
    _host: int = 0
    _device: torch.Tensor | None = field(default=None, repr=False)
    _zero_device: torch.Tensor | None = field(default=None, repr=False)

    def add(self, n: int | torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            # inside torch.compile the count would be a graph output kept across calls (CUDA
            # graphs overwrite it on replay) and a Python-side mutation: not counted there
            return
        if isinstance(n, torch.Tensor):
            self._device = _accumulate(self._device, n)
        else:
            self._host += int(n)

    def device_total(self, device: torch.device) -> torch.Tensor:
        """The int64 device tensor that ``executed_pairs`` reads, for kernels that add their kept
        pairs to it themselves (the GPU paths' combine kernel: no launch of its own per call)."""
        self._device = _total_on(self._device, (), device)
        return self._device

    def add_zero_experts(self, n: torch.Tensor) -> None:
        """Count ``n`` (a device tensor: no host sync) pairs routed to zero-computation experts."""
        if torch.compiler.is_compiling():
            return
        self._zero_device = _accumulate(self._zero_device, n)

    @property
    def executed_pairs(self) -> int:
        return self._host + (int(self._device) if self._device is not None else 0)

    @property
    def zero_expert_pairs(self) -> int:
        """Pairs routed to zero-computation (identity) experts (not in ``executed_pairs``)."""
        return int(self._zero_device) if self._zero_device is not None else 0

    def reset(self) -> None:
        self.calls, self._host = 0, 0
        for total in (self._device, self._zero_device):  # zeroed in place: no new allocation
            if total is not None:
                total.zero_()


# -- weight access ---------------------------------------------------------------------------------
def _dims(module: ExpertsModule, layout: ExpertsLayout) -> tuple[int, int, int]:
    """``(E, H, I)`` of an experts module."""
    e, a, b = module.gate_up_proj.shape
    return (e, a, b // 2) if layout.transposed else (e, b, a // 2)


def _w1(module: ExpertsModule, layout: ExpertsLayout) -> torch.Tensor:  # (E, H, 2I) for x @ w
    w = module.gate_up_proj
    return w if layout.transposed else w.transpose(1, 2)


def _w2(module: ExpertsModule, layout: ExpertsLayout) -> torch.Tensor:  # (E, I, H) for a @ w
    w = module.down_proj
    return w if layout.transposed else w.transpose(1, 2)


def _activate(module: ExpertsModule, h: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    if layout.interleaved:
        gate, up = h[..., ::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    if layout.activation == "gpt_oss":
        limit, alpha = module.limit, module.alpha
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    return module.act_fn(gate) * up


def _expert_hidden(module: ExpertsModule, e: int, x: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """One expert's activated hidden units on its rows ``x (n, H) -> (n, I)`` (before ``down_proj``)."""
    if layout.transposed:
        h = x @ module.gate_up_proj[e]
    else:
        h = F.linear(x, module.gate_up_proj[e])
    if layout.has_bias:
        h = h + module.gate_up_proj_bias[e]
    return _activate(module, h, layout)


def _expert_mlp(module: ExpertsModule, e: int, x: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """One expert on its rows ``x (n, H) -> (n, H)``, with the same ops as transformers' eager path."""
    a = _expert_hidden(module, e, x, layout)
    y = a @ module.down_proj[e] if layout.transposed else F.linear(a, module.down_proj[e])
    if layout.has_bias:
        y = y + module.down_proj_bias[e]
    return y


# -- backends --------------------------------------------------------------------------------------
def _kept_pairs_sorted(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of the kept pairs sorted by expert, and their experts (host-synced sizes)."""
    flat = ids.reshape(-1)  # (T*k_max,)
    pos = torch.nonzero(flat < num_experts).squeeze(1)  # (P,)
    experts = flat[pos]
    order = torch.argsort(experts, stable=True)
    return pos[order], experts[order]


def _accumulator(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # (T, H)
    """Where the weighted expert outputs are summed: in the dtype of ``output * weight`` (fp32 when a
    family returns fp32 weights to bf16 experts), cast to the hidden dtype once at the end, as
    transformers' grouped_mm experts path sums them (rounding each pair to bf16 first can flip a
    later layer's near-tied routing)."""
    return torch.zeros(
        hidden.shape, dtype=torch.promote_types(hidden.dtype, weights.dtype), device=hidden.device
    )


def _loop(module, hidden, ids, weights, layout, counter):
    num_experts = _dims(module, layout)[0]
    k_max = ids.shape[1]
    out = _accumulator(hidden, weights)
    pos, experts = _kept_pairs_sorted(ids, num_experts)
    if pos.numel() == 0:
        return out.to(hidden.dtype)
    per_expert = torch.bincount(experts, minlength=num_experts).tolist()
    tokens = pos // k_max
    w = weights.reshape(-1)[pos]
    start = 0
    for e, n in enumerate(per_expert):
        if n == 0:
            continue
        tok = tokens[start : start + n]
        y = _expert_mlp(module, e, hidden[tok], layout)
        y = y * w[start : start + n, None]
        out.index_add_(0, tok, y.to(out.dtype))
        if counter is not None:
            counter.add(n)
        start += n
    return out.to(hidden.dtype)


def _grouped_gemms(module, x, experts, offs, layout):
    h = F.grouped_mm(x, _w1(module, layout), offs=offs)  # (N, 2I)
    if layout.has_bias:
        h = h + module.gate_up_proj_bias[experts]
    a = _activate(module, h, layout)
    y = F.grouped_mm(a, _w2(module, layout), offs=offs)  # (N, H)
    if layout.has_bias:
        y = y + module.down_proj_bias[experts]
    return y


def _grouped(module, hidden, ids, weights, layout, counter):
    num_experts = _dims(module, layout)[0]
    k_max = ids.shape[1]
    out = _accumulator(hidden, weights)
    pos, experts = _kept_pairs_sorted(ids, num_experts)
    n = pos.numel()
    if n == 0:
        return out.to(hidden.dtype)
    offs = torch.cumsum(torch.bincount(experts, minlength=num_experts), 0).to(torch.int32)
    tokens = pos // k_max
    y = _grouped_gemms(module, hidden[tokens], experts, offs, layout)
    y = y * weights.reshape(-1)[pos, None]
    out.index_add_(0, tokens, y.to(out.dtype))
    if counter is not None:
        counter.add(n)
    return out.to(hidden.dtype)


def _cuda(module, hidden, ids, weights, layout, counter):
    if _gpu.triton_reason(module, hidden, layout) is None:
        return _gpu.grouped_path(module, hidden, ids, weights, counter)
    return _cuda_full_buffer(module, hidden, ids, weights, layout, counter)


def _triton(module, hidden, ids, weights, layout, counter):
    return _gpu.fused_path(module, hidden, ids, weights, counter)


def _cuda_full_buffer(module, hidden, ids, weights, layout, counter):
    """Sync-free fallback without Triton: GEMMs skip the sentinel tail, the other stages do not."""
    num_experts = _dims(module, layout)[0]
    k_max = ids.shape[1]
    out = _accumulator(hidden, weights)
    flat = ids.reshape(-1)  # (N,) N = T * k_max
    if flat.numel() == 0:
        return out.to(hidden.dtype)
    order = torch.argsort(flat, stable=True)  # sentinels (== E) sort to the tail
    experts = flat[order]
    bounds = torch.arange(num_experts, device=flat.device, dtype=experts.dtype)
    offs = torch.searchsorted(experts, bounds, right=True).to(torch.int32)  # (E,) device-side, no sync
    tokens = order // k_max
    safe_experts = experts.clamp(max=num_experts - 1)
    y = _grouped_gemms(module, hidden[tokens], safe_experts, offs, layout)
    valid = (experts < num_experts).unsqueeze(1)
    w = weights.reshape(-1)[order].unsqueeze(1)
    y = torch.where(valid, y * w, torch.zeros((), dtype=y.dtype, device=y.device))  # tail rows are garbage
    out.index_add_(0, tokens, y.to(out.dtype))
    if counter is not None:
        counter.add(offs[-1])
    return out.to(hidden.dtype)


@torch.compiler.assume_constant_result  # a host fact: a constant while torch.compile traces
def _capability(index: int | None) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _grouped_mm_can_run(module: ExpertsModule, hidden: torch.Tensor, layout: ExpertsLayout) -> str | None:
    """``None`` if grouped GEMM can run on these tensors, else the reason it cannot."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (needs torch >= 2.10)"
    dtypes = (torch.bfloat16,) if hidden.is_cuda else (torch.float32, torch.bfloat16)
    if hidden.dtype not in dtypes or module.gate_up_proj.dtype != hidden.dtype:
        names = ", ".join(str(d) for d in dtypes)
        return f"grouped_mm on {hidden.device.type} supports {names}; got {hidden.dtype}"
    if torch.compiler.is_compiling() and hidden.dtype != torch.bfloat16:
        return f"grouped_mm under torch.compile supports bf16 only (its meta kernel); got {hidden.dtype}"
    size = hidden.element_size()
    # data pointers are not known while torch.compile traces (grouped_mm itself then checks them)
    tensors = () if torch.compiler.is_compiling() else (module.gate_up_proj, module.down_proj, hidden)
    if any(t.data_ptr() % 16 for t in tensors):
        return "grouped_mm needs 16-byte aligned data pointers (e.g. weights memory-mapped at an odd offset)"
    _, h, i = _dims(module, layout)
    if (h * size) % 16 or (2 * i * size) % 16 or (i * size) % 16:
        return f"grouped_mm needs 16-byte aligned rows; H={h}, I={i} in {hidden.dtype} are not"
    if hidden.is_cuda and _capability(hidden.device.index) < 80:
        return "grouped_mm on CUDA needs compute capability >= 8.0"
    return None


def choose_cpu_backend(num_pairs: int, num_experts: int, intermediate: int) -> str:
    """The faster CPU backend for a layer shape, from ``benchmarks/bench_cpu_experts.py``.

    On the 2-core CI machine (see BENCHMARKS.md) grouped GEMM won or tied up to 64-128 rows per
    expert (512 tokens at the measured shapes), and the per-expert loop won from 256-512 rows per
    expert (2048 tokens) by up to about 20%. Hence: grouped below 256 rows per expert, loop from
    there. ``intermediate`` is not used by the rule (no crossover depended on it in the data).
    """
    del intermediate
    rows_per_expert = num_pairs / max(num_experts, 1)
    return "loop" if rows_per_expert >= 256 else "grouped"


def choose_cuda_backend(num_pairs: int, num_experts: int) -> str:
    """The faster GPU path for ``num_pairs = T * k_max`` slots over ``num_experts`` experts.

    The fused Triton path streams each expert's weights once per block of rows and has no
    ``grouped_mm`` fixed cost; the grouped_mm path wins once experts get many rows. The crossover
    (:data:`CUDA_TRITON_MAX_ROWS_PER_EXPERT`) comes from ``benchmarks/bench_gpu_experts.py``.
    """
    return "triton" if num_pairs / max(num_experts, 1) <= CUDA_TRITON_MAX_ROWS_PER_EXPERT else "cuda"


def grouped_reason(module: ExpertsModule, hidden: torch.Tensor, layout: ExpertsLayout) -> str | None:
    """Why the ``"grouped"`` backend cannot run here (``None``: it can)."""
    return _grouped_mm_can_run(module, hidden, layout)


def cuda_reason(module: ExpertsModule, hidden: torch.Tensor, layout: ExpertsLayout) -> str | None:
    """Why the ``"cuda"`` backend cannot run here (``None``: it can)."""
    if not hidden.is_cuda:
        return f"the 'cuda' backend needs CUDA tensors; got {hidden.device}"
    return _grouped_mm_can_run(module, hidden, layout)


def resolve_backend(
    backend: str, module: ExpertsModule, hidden: torch.Tensor, ids: torch.Tensor, layout: ExpertsLayout
) -> str:
    """The concrete backend to run; raises ``BackendUnavailableError`` for an impossible explicit one.

    An explicit backend runs if its can-run check (in :data:`dynamic_moe_router.backends.BACKEND_TABLE`)
    finds no reason against it; ``"auto"`` chooses as the module docstring says.
    """
    if backend not in _CHECKS:
        get_backend(backend)  # raises BackendUnavailableError naming the choices
    if backend != "auto":
        reason = _CHECKS[backend](module, hidden, layout)
        if reason is not None:
            raise BackendUnavailableError(
                f"experts backend {backend!r} cannot run: {reason}; use 'auto' or 'loop'"
            )
        return backend
    reason = _grouped_mm_can_run(module, hidden, layout)
    e, _, i = _dims(module, layout)
    if hidden.is_cuda:
        if hidden.dtype == torch.float32:
            return "loop"  # per-expert cuBLAS: the same GEMMs as transformers' eager path
        triton_ok = _gpu.triton_reason(module, hidden, layout) is None
        if triton_ok and (reason is not None or choose_cuda_backend(ids.numel(), e) == "triton"):
            return "triton"
        return "cuda" if reason is None else "loop"
    if reason is not None:
        return "loop"
    return choose_cpu_backend(ids.numel(), e, i)


def experts_forward(
    module: ExpertsModule,
    hidden: torch.Tensor,  # (T, H)
    ids: torch.Tensor,  # (T, k_max) int, sentinel = E
    weights: torch.Tensor,  # (T, k_max)
    *,
    layout: ExpertsLayout = STANDARD,
    backend: str = "auto",
    counter: ExpertsCounter | None = None,
    zero_experts: int = 0,
) -> torch.Tensor:  # (T, H)
    """Compute the experts of ``module`` on the kept pairs only and combine them per token.

    ``zero_experts``: the number ``Z`` of zero-computation (identity) experts whose ids follow the
    ``E = down_proj.shape[0]`` real ones (the sentinel is then ``E + Z``); see the module docstring.

    Example:
        >>> import torch
        >>> from transformers import MixtralConfig
        >>> from transformers.models.mixtral.modeling_mixtral import MixtralExperts
        >>> from dynamic_moe_router.experts import ExpertsCounter, experts_forward
        >>> cfg = MixtralConfig(hidden_size=16, intermediate_size=32, num_local_experts=4)
        >>> experts = MixtralExperts(cfg)
        >>> _ = torch.nn.init.normal_(experts.gate_up_proj); _ = torch.nn.init.normal_(experts.down_proj)
        >>> ids = torch.tensor([[0, 2], [1, 4], [4, 4]])  # 4 = sentinel: 3 kept pairs
        >>> w = torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 0.0]])
        >>> counter = ExpertsCounter()
        >>> out = experts_forward(experts, torch.randn(3, 16), ids, w, counter=counter)
        >>> out.shape, counter.executed_pairs, bool(out[2].abs().sum() == 0)
        (torch.Size([3, 16]), 3, True)
    """
    core.check_experts_inputs(tuple(hidden.shape), tuple(ids.shape), tuple(weights.shape))
    if zero_experts:
        return _with_zero_experts(module, hidden, ids, weights, zero_experts, layout, backend, counter)
    chosen = resolve_backend(backend, module, hidden, ids, layout)
    if torch.compiler.is_compiling():
        # no Python-side state changes inside a compiled graph (they would re-specialise it on
        # every call); the sync-free GPU paths run as one opaque custom op (see _gpu.experts_op)
        if graph_safe_backend(chosen, module, hidden, layout):
            return _gpu.experts_op()(hidden, ids, weights, module.gate_up_proj, module.down_proj, chosen)
        return _eager_only(_IMPLS[chosen], module, hidden, ids, weights, layout)  # type: ignore[call-arg]  (torch.compiler.disable hides the signature)
    if counter is not None:
        counter.calls += 1
    return _IMPLS[chosen](module, hidden, ids, weights, layout, counter)


class _RealExperts:
    """The ``num_real`` real experts of a module whose ``gate_up_proj`` also holds (unused) rows
    for its zero experts (longcat_flash: ``(E + Z, 2I, H)`` beside ``down_proj (E, H, I)``): a
    view, every other attribute read from the module."""

    def __init__(self, module: ExpertsModule, num_real: int) -> None:
        self._module = module
        self.gate_up_proj = module.gate_up_proj[:num_real]
        self.down_proj = module.down_proj[:num_real]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def split_zero_experts(
    ids: torch.Tensor, num_real: int, zero_experts: int, counter: ExpertsCounter | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split routed ``ids (T, k)`` at the ``num_real`` real experts: return the ids with every other
    slot made the dropped sentinel ``num_real``, and the mask of the slots on the ``zero_experts``
    zero-computation experts (ids ``[num_real, num_real + zero_experts)``), which ``counter`` counts
    apart (a device tensor: no host sync).

    >>> ids = torch.tensor([[0, 3], [4, 1]])  # 3 real experts, 2 zero experts (ids 3 and 4)
    >>> real, zero = split_zero_experts(ids, 3, 2, None)
    >>> real.tolist(), zero.tolist()
    ([[0, 3], [3, 1]], [[False, True], [True, False]])
    """
    zero = (ids >= num_real) & (ids < num_real + zero_experts)  # (T, k)
    if counter is not None:
        counter.add_zero_experts(zero.sum())
    return torch.where(ids < num_real, ids, torch.full_like(ids, num_real)), zero


def _with_zero_experts(module, hidden, ids, weights, zero_experts, layout, backend, counter):
    """:func:`experts_forward` with ``zero_experts`` identity experts after the real ones: the real
    experts run on their pairs (every other slot becomes their sentinel ``E``); each zero-expert
    pair adds ``hidden * weight``, as transformers' longcat_flash experts do, in the promoted
    dtype of ``hidden * weight`` (summed with the real experts' output, then cast once)."""
    num_real = int(module.down_proj.shape[0])
    real_ids, zero = split_zero_experts(ids, num_real, zero_experts, counter)
    if module.gate_up_proj.shape[0] != num_real:
        module = _RealExperts(module, num_real)
    out = experts_forward(
        module, hidden, real_ids, weights, layout=layout, backend=backend, counter=counter
    )  # (T, H)
    identity = torch.where(zero, weights, torch.zeros_like(weights)).sum(-1, keepdim=True)  # (T, 1)
    return (out + hidden * identity).to(hidden.dtype)


_GPU_PATHS = frozenset({"cuda", "triton"})


def graph_safe_backend(
    chosen: str, module: ExpertsModule, hidden: torch.Tensor, layout: ExpertsLayout
) -> bool:
    """Whether the resolved backend ``chosen`` runs free of host synchronisation on this layer (the
    Triton kernels of ``"cuda"`` / ``"triton"``), so that a CUDA graph or a compiled graph can hold it."""
    return chosen in _GPU_PATHS and _gpu.triton_reason(module, hidden, layout) is None


@torch.compiler.disable  # host-synchronising backends (loop, grouped): one graph break, no recompiles
def _eager_only(impl: Callable[..., Any], module, hidden, ids, weights, layout):  # type: ignore[no-untyped-def]
    return impl(module, hidden, ids, weights, layout, None)


# the kernels and can-run checks of the PyTorch entries of the backend table, looked up once
_TORCH_ENTRIES = [b for b in BACKEND_TABLE if b.framework == "torch"]
_IMPLS: dict[str, Callable[..., Any]] = {b.name: b.load() for b in _TORCH_ENTRIES if b.impl is not None}
_CHECKS: dict[str, Callable[..., str | None]] = {b.name: b.load_check() for b in _TORCH_ENTRIES}
