"""Root pytest configuration: skip collecting the modules of optional backends that are not installed.

``pytest`` collects the docstring examples of every module under ``src/dynamic_moe_router``
(``--doctest-modules``); a backend package raises ``MissingDependencyError`` on import when its
framework is missing, so its modules are only collected when the framework is installed.
"""

from __future__ import annotations

import importlib.util

collect_ignore_glob: list[str] = []

if importlib.util.find_spec("jax") is None or importlib.util.find_spec("flax") is None:
    collect_ignore_glob.append("src/dynamic_moe_router/jax/*.py")
if importlib.util.find_spec("keras") is None or importlib.util.find_spec("keras_hub") is None:
    collect_ignore_glob.append("src/dynamic_moe_router/keras/*.py")
if importlib.util.find_spec("triton") is None:  # the GPU kernels' module imports triton
    collect_ignore_glob.append("src/dynamic_moe_router/experts/_triton_kernels.py")
