"""Import order guard: Triton must be loaded before TensorFlow in one process.

Both bundle LLVM. Importing Triton after TensorFlow aborts the whole process ("LLVM ERROR: Option
... registered more than once"); the other order works. PyTorch imports Triton lazily
(``torch.compile``, ``torch._dynamo``, the GPU experts backends), so a program that imports
Keras/TensorFlow and later patches a PyTorch model would crash. When both are installed and
TensorFlow is not loaded yet, :func:`load_triton_before_tensorflow` imports Triton (about 0.2 s,
without PyTorch); ``import dynamic_moe_router`` and ``dynamic_moe_router.keras`` call it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys

__all__ = ["load_triton_before_tensorflow"]


def load_triton_before_tensorflow() -> None:
    """Import Triton now if both Triton and TensorFlow are installed and neither is loaded yet."""
    if "triton" in sys.modules or "tensorflow" in sys.modules:
        return
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("tensorflow") is None:
        return
    with contextlib.suppress(Exception):  # a broken Triton install must not break this package's import
        importlib.import_module("triton")
