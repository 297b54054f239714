"""Experts forwards that compute only the kept (token, expert) pairs."""

from ._forward import (
    BACKENDS,
    GPT_OSS,
    STANDARD,
    ExpertsCounter,
    ExpertsLayout,
    choose_cpu_backend,
    choose_cuda_backend,
    experts_forward,
    graph_safe_backend,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "GPT_OSS",
    "STANDARD",
    "ExpertsCounter",
    "ExpertsLayout",
    "choose_cpu_backend",
    "choose_cuda_backend",
    "experts_forward",
    "graph_safe_backend",
    "resolve_backend",
]
