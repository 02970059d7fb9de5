"""Whether Triton can run here: installed, and either a CUDA device or the CPU interpreter."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return None


def unavailable_reason() -> str | None:
    error = _import_error()
    if error is not None:
        return error
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU)"
    return None
