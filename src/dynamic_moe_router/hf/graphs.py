"""CUDA graphs of a patched layer's routing and experts, for eager decoding (``cuda_graphs=True``).

In eager mode a decode step runs each MoE layer's routing (scores, policy, weights: about twenty
small kernels) and the experts' sync-free GPU path (four or five Triton launches) one launch at a
time, so a step is bound by the host, not the GPU. Both stages are free of host synchronisation,
so each can be captured once per input shape and replayed: one graph launch instead of dozens of
kernel launches, whatever the routing decides (the graphs read the kept-pair counts on the device).

A :class:`GraphCache` holds the graphs of one call site (one layer's router, or its experts), keyed
by the inputs' shapes and dtypes. A call is *eligible* (:func:`graph_ineligible`) when every input
is a CUDA tensor, nothing that needs gradients is involved, ``torch.compile`` is not tracing, no
capture and no dispatch mode (such as the FLOP counter of ``dmr.profile``) is active, and the number
of tokens is at most ``max_tokens``; other calls (the prefill of a long prompt, CPU tensors,
training) run eagerly. A shape is captured the *second* time it is seen, so that one-off prompt
lengths do not take the slots that decode batch sizes need; at most ``max_graphs`` shapes are held
per site, the least recently used one making room for a new one.

All graphs of one patch share one memory pool and one capture stream per device (a
:class:`GraphPool`). Replay copies the inputs into the graph's static buffers and returns *clones*
of its outputs, so a caller never sees a buffer that the next replay overwrites.

A graph also reads tensors it was not handed as inputs: the layer's weights. Callers pass them as
``state``; a graph holds views of them (their memory stays allocated while the graph exists), and
when any of them lives at another address than at capture (the model was moved or cast, or a
parameter was replaced) the site's graphs are dropped and captured again, so a replay never reads
freed or stale memory. Plain Python attributes the captured code reads (a router's
``norm_topk_prob``, say) are fixed at capture.

A function that synchronises with the host cannot be captured. The last warm-up run executes under
``torch.cuda.set_sync_debug_mode("error")``, so such a function fails there, before any capture
starts; the site then warns once and runs eagerly.

Example (needs a CUDA GPU)::

    >>> cache = GraphCache("demo")  # doctest: +SKIP
    >>> x = torch.ones(8, 16, device="cuda")  # doctest: +SKIP
    >>> # the first call runs eagerly (None), the second captures, the third replays
    >>> [cache(lambda t: (t * 2,), x) is None for _ in range(3)]  # doctest: +SKIP
    [True, False, False]
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["GraphCache", "GraphPool", "graph_ineligible", "module_state", "state_key"]

#: most tokens a graphed call may have by default (decode batches; prefill runs eagerly)
DEFAULT_MAX_TOKENS = 256
#: most distinct input shapes held per call site (batch sizes of a serving loop)
DEFAULT_MAX_GRAPHS = 8

Outputs = tuple[torch.Tensor | None, ...]


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def graph_ineligible(
    inputs: Sequence[torch.Tensor], max_tokens: int, state: Sequence[torch.Tensor] = ()
) -> str | None:
    """Why a call with ``inputs`` (first dimension = tokens) reading ``state`` must run eagerly;
    ``None``: a graph may serve it."""
    if torch.compiler.is_compiling():
        return "inside torch.compile (its own CUDA graphs apply)"
    if not inputs or not all(x.is_cuda for x in inputs):
        return "inputs are not CUDA tensors"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph capture is already running"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *state)):
        return "gradients are enabled and an input or weight requires them (graphs are for inference)"
    if _dispatch_mode_active():
        return "a dispatch mode is active (e.g. a FLOP counter), which must see every operation"
    if inputs[0].shape[0] == 0 or inputs[0].shape[0] > max_tokens:
        return f"the number of tokens is 0 or above max_tokens={max_tokens}"
    return None


def module_state(*modules: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Every parameter and buffer of ``modules``: the ``state`` a graph of their forward reads."""
    return tuple(t for m in modules for t in (*m.parameters(), *m.buffers()))


def state_key(state: Sequence[torch.Tensor]) -> tuple[tuple[int, Any, tuple[int, ...]], ...]:
    """Where each state tensor lives (address, dtype, shape): a graph is valid while this is unchanged."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in state)


class GraphPool:
    """What the graphs of one patch share: a memory pool and one capture stream per device (blocks
    of a pool are reused only on the stream that allocated them)."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.failed: list[Any] = []  # graphs whose capture failed, kept alive with their pool state

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static input buffers
    outputs: Outputs  # static output buffers (None where the function returned None)
    state: tuple[torch.Tensor, ...]  # views of the weights it reads, holding their memory


@dataclass
class GraphCache:
    """CUDA graphs of ``fn(*inputs) -> tuple of tensors (or None)``, one per input signature.

    ``fn`` must be free of host synchronisation and host-side state changes: it runs twice
    eagerly (on the pool's capture stream, to compile kernels and settle the allocator; the second
    time with synchronisation reported as an error), then once under capture; after that only the
    captured kernels run.

    Attributes:
        name: the call site, for messages (e.g. ``"MoE layer 3 router"``).
        replays: calls served by a graph. eager_calls: eligible calls that ran eagerly (a shape
            seen for the first time). recaptures: times the graphs were dropped because the state
            moved. evictions: graphs dropped to make room for a new shape. disabled: why
            capturing was given up (``None`` while it works).
    """

    name: str
    pool: GraphPool = field(default_factory=GraphPool)
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_graphs: int = DEFAULT_MAX_GRAPHS
    replays: int = 0
    eager_calls: int = 0
    recaptures: int = 0
    evictions: int = 0
    disabled: str | None = None
    _graphs: OrderedDict[tuple[Any, ...], _Graph] = field(default_factory=OrderedDict, repr=False)
    _seen: set[tuple[Any, ...]] = field(default_factory=set, repr=False)
    _state: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def captured(self) -> int:
        """Number of graphs held (one per input signature)."""
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph (e.g. after the policy changed); shapes are captured again when seen."""
        self._graphs.clear()
        self._seen.clear()
        self.disabled = None

    def __call__(
        self, fn: Callable[..., Outputs], *inputs: torch.Tensor, state: Sequence[torch.Tensor] = ()
    ) -> Outputs | None:
        """``fn(*inputs)`` replayed from a graph, or ``None`` when this call must run eagerly.

        ``state``: the tensors ``fn`` reads besides ``inputs`` (the layer's weights); graphs
        captured while they lived elsewhere are dropped first.
        """
        if self.disabled is not None or graph_ineligible(inputs, self.max_tokens, state) is not None:
            return None
        where = state_key(state)
        if where != self._state:
            if self._graphs:
                self.recaptures += 1
                self._graphs.clear()
            self._state = where
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:  # first sighting: eager (one-off prompt lengths stay eager)
                self._seen.add(key)
                self.eager_calls += 1
                return None
            if len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)  # the least recently used shape
                self.evictions += 1
            entry = self._capture(fn, inputs, tuple(state))
            if entry is None:
                return None
            self._graphs[key] = entry
        self._graphs.move_to_end(key)
        for static, x in zip(entry.inputs, inputs, strict=True):
            static.copy_(x)
        entry.graph.replay()
        self.replays += 1
        return tuple(None if o is None else o.clone() for o in entry.outputs)

    def _capture(
        self, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor], state: tuple[torch.Tensor, ...]
    ) -> _Graph | None:
        device = inputs[0].device
        with torch.cuda.device(device):
            main = torch.cuda.current_stream(device)
            with torch.inference_mode(False):  # plain tensors: copy_ into them works in any mode
                static = [x.detach().clone() for x in inputs]
            side = self.pool.stream(device)
            side.wait_stream(main)
            try:
                with torch.cuda.stream(side), torch.no_grad():
                    fn(*static)  # compile Triton kernels, create cuBLAS handles, warm the allocator
                    previous = torch.cuda.get_sync_debug_mode()
                    torch.cuda.set_sync_debug_mode("error")  # a host sync fails here, not in a capture
                    try:
                        fn(*static)
                    finally:
                        torch.cuda.set_sync_debug_mode(previous)
            except Exception as exc:  # nothing was captured: the allocator and streams are intact
                main.wait_stream(side)
                self._disable(exc)
                return None
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.stream(side), torch.no_grad():
                    graph.capture_begin(pool=self.pool.handle())
                    try:
                        outputs = fn(*static)
                    finally:
                        graph.capture_end()
            except Exception as exc:
                main.wait_stream(side)
                self.pool.failed.append(graph)  # never freed while the pool may refer to it
                self._disable(exc)
                return None
            main.wait_stream(side)
        held = tuple(t.detach() for t in state)  # views: the captured weights' memory stays allocated
        return _Graph(graph=graph, inputs=static, outputs=tuple(outputs), state=held)

    def _disable(self, exc: BaseException) -> None:
        first = str(exc).splitlines()[0] if str(exc) else ""
        self.disabled = f"{type(exc).__name__}: {first}"
        warnings.warn(
            f"dynamic-moe-router: cuda_graphs: the {self.name} cannot be captured ({self.disabled}); "
            "it runs eagerly (its results are unaffected). A custom policy that reads values on the "
            "host (.item(), .tolist(), boolean indexing) causes this; patch without cuda_graphs=True "
            "to silence it.",
            RuntimeWarning,
            stacklevel=4,
        )
