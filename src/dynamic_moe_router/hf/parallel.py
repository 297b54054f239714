"""Dynamic routing on models split by transformers' expert parallelism.

transformers (>= 5) loads a MoE model across processes with
``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N, ep_size=N))`` (5.17:
``DistributedConfig(tp_size=N, enable_expert_parallel=True)``; :func:`expert_parallel_config`
builds the right one) under
``torchrun``: each rank keeps ``E / N`` whole experts (a ``Shard(0)`` DTensor per weight), the
router runs replicated, and a dispatch step brings each rank's experts their tokens.
:func:`~dynamic_moe_router.patch` on such a model keeps the sharding and replaces that dispatch
with one that runs the *kept* pairs only, in one of two ways (``dmr.patch(..., dispatch=...)``):

``"all_reduce"`` (the default for ``"auto"``; what transformers runs at inference)
    every rank runs its own experts on its kept pairs of the shared batch, and one all-reduce sums
    the partial outputs. No split size is read back to the host. The all-reduce moves ``T * H``
    values whatever the routing, so dropped pairs save GEMM rows but no communication.

``"all_to_all"`` (opt-in)
    each rank takes a disjoint slice of the shared batch, sends each kept (token, expert) pair of
    its slice to the expert's rank with ``all_to_all_single`` (variable split sizes), runs its
    experts on the rows it received, returns the results the same way, combines them with the
    routing weights and all-gathers the slices. The bytes exchanged fall with the dropped pairs;
    the split sizes are read back to the host once per layer, so this path cannot be captured in
    a CUDA graph.

Supported: expert parallelism over the ranks that share one batch (``ep_size == tp_size``), the
layout transformers uses for inference; every family whose config has a ``base_model_ep_plan``.
Refused with :class:`~dynamic_moe_router.ExpertParallelError`: experts split further by FSDP or
tensor parallelism, ranks holding different batches (``ep_size > tp_size``), DeepGEMM Mega MoE.
Inference only: a call that needs gradients raises :class:`~dynamic_moe_router.UnsupportedModeError`.

Example (CPU, one process: a model that is not split has no shard):
    >>> from dynamic_moe_router.hf.parallel import expert_shard
    >>> from dynamic_moe_router.hf.layers import find_moe_layers, model_family
    >>> from dynamic_moe_router.hf.tiny import tiny_model
    >>> model = tiny_model("olmoe")
    >>> layers, _ = find_moe_layers(model, model_family(model))
    >>> expert_shard(layers[0]) is None
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ExpertParallelError, PolicyError, UnsupportedModeError
from .layers import MoELayer

__all__ = [
    "DISPATCHES",
    "ExchangeCounter",
    "ExpertShard",
    "all_reduce_bytes",
    "check_world_size",
    "expert_parallel_config",
    "expert_shard",
    "gather_pairs",
    "local_weights",
    "shard_forward",
]

#: values of ``dmr.patch(..., dispatch=...)``
DISPATCHES = ("auto", "all_reduce", "all_to_all")


@dataclass(frozen=True)
class ExpertShard:
    """Where one rank's experts sit in an expert-parallel model.

    Attributes:
        group: the process group of the ranks that split the experts (they share one batch).
        rank: this rank's index in ``group``. size: ranks in ``group``.
        num_local: experts held by each rank; this rank holds global experts
            ``[rank * num_local, (rank + 1) * num_local)``.
        device: where this rank's experts live (the collectives of NCCL groups run there).
    """

    group: Any
    rank: int
    size: int
    num_local: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def first(self) -> int:
        """Global id of this rank's first expert."""
        return self.rank * self.num_local

    @property
    def num_experts(self) -> int:
        return self.num_local * self.size

    def local_routes(self, ids: torch.Tensor) -> torch.Tensor:
        """Global ids ``(T, k)`` (sentinel ``E`` = dropped) as this rank's local ids, with every pair
        of another rank's experts (or dropped) set to the local sentinel ``num_local``.

        Example:
            >>> import torch
            >>> shard = ExpertShard(group=None, rank=1, size=2, num_local=2)
            >>> shard.local_routes(torch.tensor([[0, 3], [2, 4]])).tolist()  # 4 = dropped
            [[2, 1], [0, 2]]
        """
        local = ids - self.first
        mine = (local >= 0) & (local < self.num_local)
        return torch.where(mine, local, torch.full_like(local, self.num_local))


@dataclass
class ExchangeCounter:
    """What one layer's dispatch moved between ranks (bytes this rank sent to the others).

    Attributes:
        calls: forward calls. pairs_sent / pairs_received: kept pairs this rank sent to / received
            from other ranks' experts (``all_to_all`` only). dispatch_bytes: rows sent for the
            experts, and the per-expert counts; combine_bytes: results sent back (``all_to_all``);
            gather_bytes: this rank's (padded) slice of the output sent to the others
            (``all_to_all``); reduce_bytes: what a ring
            all-reduce of the output sends per rank, ``2 (N - 1) / N * T * H`` elements
            (``all_reduce``).
    """

    calls: int = 0
    pairs_sent: int = 0
    pairs_received: int = 0
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    gather_bytes: int = 0
    reduce_bytes: int = 0

    @property
    def bytes_sent(self) -> int:
        """Every byte this rank sent to other ranks in the layer's collectives."""
        return self.dispatch_bytes + self.combine_bytes + self.gather_bytes + self.reduce_bytes

    def reset(self) -> None:
        self.calls = self.pairs_sent = self.pairs_received = 0
        self.dispatch_bytes = self.combine_bytes = self.gather_bytes = self.reduce_bytes = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "pairs_sent": self.pairs_sent,
            "pairs_received": self.pairs_received,
            "dispatch_bytes": self.dispatch_bytes,
            "combine_bytes": self.combine_bytes,
            "gather_bytes": self.gather_bytes,
            "reduce_bytes": self.reduce_bytes,
            "bytes_sent": self.bytes_sent,
        }


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without distributed support has no sharded tensors
        return None
    return DTensor


def _ep_implementation(experts: torch.nn.Module) -> Any:
    """transformers' ``EPImplementation`` behind an ``ep_dispatch_experts`` forward (>= 5.2x), or
    ``None`` (older releases mask the routes in the router and all-reduce over the TP group)."""
    forward = experts.__dict__.get("forward")
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if hasattr(value, "ep_mesh") and hasattr(value, "experts_forward"):
            return value
    return None


def expert_shard(layer: MoELayer) -> ExpertShard | None:
    """This rank's :class:`ExpertShard` of ``layer``, or ``None`` when its experts are not split.

    Raises:
        ExpertParallelError: the experts are split in a way the patch does not support (by tensor
            parallelism or FSDP, over ranks that hold different batches, or DeepGEMM Mega MoE).
    """
    experts, where = layer.experts, f"MoE layer {layer.index} ({layer.path})"
    dtensor = _dtensor_type()
    weights = {n: getattr(experts, n, None) for n in ("gate_up_proj", "down_proj")}
    sharded: dict[str, Any] = {
        n: w for n, w in weights.items() if dtensor is not None and isinstance(w, dtensor)
    }
    if not sharded:
        if getattr(experts, "_is_expert_parallel", False):
            raise ExpertParallelError(
                f"{where}: transformers marked the experts expert-parallel but their weights are not "
                "sharded tensors; this layout is not supported. Load the model with "
                "distributed_config=dmr.hf.parallel.expert_parallel_config(config) under torchrun; nothing "
                "was patched."
            )
        return None
    if layer.zero_experts and not layer.zero_in_block:
        raise ExpertParallelError(
            f"{where}: split experts whose module adds the zero-computation experts' output itself "
            "(longcat_flash before transformers 5.25) are not supported; upgrade transformers to 5.25 or "
            "newer, where the block adds it. Nothing was patched."
        )
    from torch.distributed.tensor import Shard

    for name, w in sharded.items():
        if w.device_mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
            raise ExpertParallelError(
                f"{where}: {name} is split as {tuple(w.placements)} over the mesh "
                f"{w.device_mesh.mesh_dim_names}; dmr.patch supports experts split whole by expert "
                "parallelism only (Shard(0) over one mesh dimension), not tensor-parallel or FSDP-sharded "
                "experts. Load with distributed_config=dmr.hf.parallel.expert_parallel_config(config) "
                "(tp_size = ep_size, fsdp_size=1); nothing was patched."
            )
    impl = _ep_implementation(experts)
    if impl is not None and not getattr(impl, "shares_batch", True):
        raise ExpertParallelError(
            f"{where}: the expert-parallel ranks hold different batches (ep_size > tp_size); dmr.patch "
            "supports expert parallelism over ranks that share one batch. Load with "
            "distributed_config=dmr.hf.parallel.expert_parallel_config(config); nothing was patched."
        )
    config = getattr(experts, "config", None)
    if getattr(config, "_experts_implementation", None) == "deepgemm_megamoe":
        raise ExpertParallelError(
            f"{where}: DeepGEMM Mega MoE experts exchange tokens inside their kernel; dmr.patch cannot "
            "choose their pairs. Load with another experts_implementation; nothing was patched."
        )
    w = next(iter(sharded.values()))
    mesh = w.device_mesh
    size = int(mesh.size())
    total = int(w.shape[0])  # a DTensor reports the global shape
    if total != layer.real_experts or total % size:
        raise ExpertParallelError(
            f"{where}: {total} experts over {size} ranks (router: {layer.real_experts} experts with "
            "weights); each rank must hold the same number of whole experts"
        )
    rank, device = int(mesh.get_local_rank()), w.to_local().device
    return ExpertShard(group=mesh.get_group(), rank=rank, size=size, num_local=total // size, device=device)


@contextmanager
def local_weights(experts: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``experts``' sharded parameters are this rank's local tensors (the kernels
    take plain tensors); the sharded parameters are put back on exit."""
    dtensor = _dtensor_type()
    params = experts.named_parameters(recurse=False)
    originals: dict[str, Any] = {n: p for n, p in params if dtensor is not None and isinstance(p, dtensor)}
    for name, p in originals.items():
        experts._parameters[name] = torch.nn.Parameter(p.to_local(), requires_grad=False)
    try:
        yield
    finally:
        for name, p in originals.items():
            experts._parameters[name] = p


Experts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(shard, run_local, hidden, ids, weights, exchange) -> output``, as :func:`shard_forward` calls it
Dispatcher = Callable[
    [ExpertShard, Experts, torch.Tensor, torch.Tensor, torch.Tensor, ExchangeCounter], torch.Tensor
]


@torch.compiler.disable  # collectives and host-read split sizes: one graph break per layer
def shard_forward(
    shard: ExpertShard,
    dispatch: str,
    run_local: Experts,
    hidden: torch.Tensor,  # (T, H), the batch every rank of the group holds
    ids: torch.Tensor,  # (T, k) global expert ids, sentinel E = dropped
    weights: torch.Tensor,  # (T, k)
    exchange: ExchangeCounter,
) -> torch.Tensor:  # (T, H), the same on every rank
    """The layer's experts output with the experts split over ``shard.group``.

    ``run_local(rows (N, H), local_ids (N, k'), weights (N, k'))`` computes this rank's experts on
    the kept pairs (local sentinel ``shard.num_local``) and combines them per row.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weights.requires_grad):
        raise UnsupportedModeError(
            "dynamic routing on an expert-parallel model runs at inference only; wrap the call in "
            "torch.no_grad() (or torch.inference_mode())"
        )
    if dispatch not in _DISPATCHERS:
        check_dispatch(dispatch)  # the PolicyError of an unknown name, as dmr.patch raises it
    exchange.calls += 1
    return _DISPATCHERS[dispatch](shard, run_local, hidden, ids, weights, exchange)


def all_reduce_bytes(size: int, numel: int, element_size: int) -> int:
    """Bytes each rank sends in a ring all-reduce of ``numel`` elements of ``element_size`` bytes over
    ``size`` ranks: ``2 (N - 1) / N`` of the tensor (rounded down).

    Example:
        >>> all_reduce_bytes(2, 256 * 32, 4)  # a (256, 32) fp32 output over two ranks
        32768
        >>> all_reduce_bytes(1, 256 * 32, 4)  # one rank sends nothing
        0
    """
    return 2 * (size - 1) * numel * element_size // size


def _all_reduce(
    shard: ExpertShard,
    run_local: Experts,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    exchange: ExchangeCounter,
) -> torch.Tensor:
    import torch.distributed as dist

    out = run_local(hidden, shard.local_routes(ids), weights)  # (T, H): this rank's experts' share
    dist.all_reduce(out, group=shard.group)
    exchange.reduce_bytes += all_reduce_bytes(shard.size, out.numel(), out.element_size())
    return out


def pack_pairs(shard: ExpertShard, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept pairs of a slice's routes ``ids (t, k)`` (global ids, sentinel ``E`` = dropped),
    grouped by expert, hence by owning rank (each owns a contiguous range of experts).

    Returns:
        ``order (t * k,)``: positions in the flattened ``(t, k)`` slots sorted by expert (stable,
        sentinels last), and ``sent (N, E_local)``: the kept pairs for each rank's experts.

    Example:
        >>> import torch
        >>> shard = ExpertShard(group=None, rank=0, size=2, num_local=2)
        >>> order, sent = pack_pairs(shard, torch.tensor([[3, 0], [4, 1]]))  # 4 = dropped
        >>> order.tolist(), sent.tolist()
        ([1, 3, 0, 2], [[1, 1], [0, 1]])
    """
    flat = ids.reshape(-1)  # (t * k,)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=shard.num_experts + 1)[: shard.num_experts]  # (E,)
    return order, per_expert.view(shard.size, shard.num_local)


def run_received(
    shard: ExpertShard, run_local: Experts, rows: torch.Tensor, received: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """This rank's experts on the rows it received, ``rows (R, H)``: one (row, local expert) pair
    each, in (source rank, expert) order, ``received (N, E_local)`` of them from each rank for each
    local expert; unit weights of ``dtype``. Returns the unweighted results ``(R, H)``."""
    count = rows.shape[0]
    local_ids = torch.arange(shard.num_local, device=rows.device).repeat(shard.size)
    local_ids = local_ids.repeat_interleave(received.reshape(-1), output_size=count)
    ones = torch.ones(count, 1, dtype=dtype, device=rows.device)
    return run_local(rows, local_ids.unsqueeze(1), ones)


def combine_pairs(
    back: torch.Tensor, pairs: torch.Tensor, weights: torch.Tensor, rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """The weighted sum per token of a slice, ``(rows, H)`` of ``dtype``: ``back (P, H)`` holds the
    results of the kept pairs at positions ``pairs (P,)`` of the flattened ``weights (t, k)``
    (summed in fp32, as the experts kernels combine; ``rows`` may pad past ``t``)."""
    k = weights.shape[-1]
    pair_w = weights.reshape(-1)[pairs].unsqueeze(1).float()  # (P, 1)
    acc = torch.zeros(rows, back.shape[-1], dtype=torch.float32, device=back.device)
    acc.index_add_(0, pairs // k, back.float() * pair_w)
    return acc.to(dtype)


def _all_to_all(
    shard: ExpertShard,
    run_local: Experts,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    exchange: ExchangeCounter,
) -> torch.Tensor:
    import torch.distributed as dist

    tokens, width = hidden.shape
    n, k = shard.size, ids.shape[-1]
    rows = -(-tokens // n)  # each rank's slice of the shared batch (the last ones may be short)
    lo, hi = min(shard.rank * rows, tokens), min((shard.rank + 1) * rows, tokens)
    mine_h, mine_ids, mine_w = hidden[lo:hi], ids[lo:hi], weights[lo:hi]  # (t, H), (t, k), (t, k)

    order, sent = pack_pairs(shard, mine_ids)  # sent (N, E_local): pairs for each rank's experts
    received = torch.empty_like(sent)
    dist.all_to_all_single(received, sent, group=shard.group)
    send_sizes, recv_sizes = torch.stack([sent.sum(1), received.sum(1)]).tolist()  # the host sync
    kept = sum(send_sizes)
    pairs = order[:kept]  # (P,) positions in the flattened (t, k) slots, sentinels sorted last
    send_rows = mine_h[pairs // k]  # (P, H)
    recv_rows = send_rows.new_empty(sum(recv_sizes), width)
    dist.all_to_all_single(recv_rows, send_rows, recv_sizes, send_sizes, group=shard.group)

    results = run_received(shard, run_local, recv_rows, received, weights.dtype)  # (R, H), unweighted
    back = results.new_empty(kept, width)
    dist.all_to_all_single(back, results, send_sizes, recv_sizes, group=shard.group)

    # the slice's tokens (padded slice height), then every slice to every rank
    out = combine_pairs(back, pairs, mine_w, rows, hidden.dtype)
    slices = [torch.empty_like(out) for _ in range(n)]
    dist.all_gather(slices, out, group=shard.group)

    row_bytes = width * hidden.element_size()
    own = shard.rank
    exchange.pairs_sent += kept - send_sizes[own]
    exchange.pairs_received += sum(recv_sizes) - recv_sizes[own]
    counts_bytes = (n - 1) * shard.num_local * sent.element_size()  # the split sizes
    exchange.dispatch_bytes += (kept - send_sizes[own]) * row_bytes + counts_bytes
    exchange.combine_bytes += (sum(recv_sizes) - recv_sizes[own]) * results.element_size() * width
    exchange.gather_bytes += (n - 1) * rows * row_bytes  # the padded slice goes to every other rank
    return torch.cat(slices)[:tokens]


#: the function behind each value of ``dispatch`` (``"auto"`` is the all-reduce)
_DISPATCHERS: dict[str, Dispatcher] = {
    "auto": _all_reduce,
    "all_reduce": _all_reduce,
    "all_to_all": _all_to_all,
}  # the keys are DISPATCHES, in order


def check_dispatch(dispatch: str) -> None:
    if dispatch not in DISPATCHES:
        raise PolicyError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}", field="dispatch")


def check_world_size(num_experts: int, world_size: int, *, what: str = "the model") -> None:
    """Raise :class:`~dynamic_moe_router.ExpertParallelError` unless ``num_experts`` experts split
    evenly over ``world_size`` ranks.

    Example:
        >>> check_world_size(8, 2)
        >>> try:
        ...     check_world_size(8, 3)
        ... except ExpertParallelError as err:
        ...     print(str(err).split(";")[1])
         run on a number of processes that divides 8 (1, 2, 4, 8)
    """
    if world_size < 1 or num_experts % world_size:
        divisors = ", ".join(str(d) for d in range(1, num_experts + 1) if num_experts % d == 0)
        raise ExpertParallelError(
            f"{what} has {num_experts} experts per MoE layer, which do not split evenly over {world_size} "
            f"ranks; run on a number of processes that divides {num_experts} ({divisors})"
        )


def expert_parallel_config(config: Any, world_size: int | None = None) -> Any:
    """The ``DistributedConfig`` that splits ``config``'s experts over ``world_size`` ranks sharing
    one batch (``tp_size = ep_size = world_size``; on releases without ``ep_size``, such as 5.17,
    ``tp_size=world_size, enable_expert_parallel=True``; default world size: ``WORLD_SIZE`` of
    ``torchrun``), checked before anything is loaded.

    Raises:
        UnsupportedModelError: the family is not supported, or its transformers config has no
            expert-parallel plan.
        ExpertParallelError: the experts do not split evenly over the ranks.

    Example (under ``torchrun --nproc_per_node 2``)::

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, distributed_config=dmr.hf.parallel.expert_parallel_config(config))
    """
    from transformers.distributed.configuration_utils import DistributedConfig

    from ..errors import UnsupportedModelError
    from .families import FAMILIES

    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type) if model_type is not None else None
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported family ({', '.join(sorted(FAMILIES))}); "
            "it cannot be patched, split across processes or not"
        )
    if not getattr(config, "base_model_ep_plan", None):
        raise UnsupportedModelError(
            f"{model_type}: this transformers release defines no expert-parallel plan "
            "(base_model_ep_plan) for the family; upgrade transformers or run it on one process"
        )
    size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else int(world_size)
    experts = _config_experts(config)
    check_world_size(experts, size, what=f"{model_type} ({experts} experts)")
    if "ep_size" in DistributedConfig.__dataclass_fields__:  # transformers >= 5.2x
        return DistributedConfig(tp_size=size, ep_size=size)
    # older releases (5.17): no ep_size; the flag swaps the TP plan for base_model_ep_plan over tp_size
    return DistributedConfig(tp_size=size, enable_expert_parallel=True)


def _config_experts(config: Any) -> int:
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ExpertParallelError(f"{getattr(config, 'model_type', '?')}: the config names no number of experts")


def gather_pairs(shard: ExpertShard, executed: list[int]) -> list[list[int]]:
    """Every rank's per-layer ``executed`` counts, ``[rank][layer]``, in one collective (every rank
    of ``shard.group`` must call it)."""
    import torch.distributed as dist

    nccl = dist.get_backend(shard.group) == "nccl"  # NCCL collectives take CUDA tensors only
    device = shard.device if nccl else torch.device("cpu")
    mine = torch.tensor(executed, dtype=torch.long, device=device)  # (L,)
    every = [torch.empty_like(mine) for _ in range(shard.size)]
    dist.all_gather(every, mine, group=shard.group)
    return [[int(v) for v in t.tolist()] for t in every]
