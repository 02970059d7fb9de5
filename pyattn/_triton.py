"""Whether Triton can run here: installed, and either a CUDA device or the CPU interpreter."""

from __future__ import annotations

import os

# Filled on first call; a plain global (not functools.lru_cache) so torch.compile traces it quietly.
_import_error_cache: list[str | None] = []


def _import_error() -> str | None:
    if not _import_error_cache:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except ImportError as error:
            _import_error_cache.append(f"triton is not installed ({error})")
        else:
            _import_error_cache.append(None)
    return _import_error_cache[0]


def import_reason() -> str | None:
    """Why Triton cannot be imported, or None."""
    return _import_error()


# Read once: Triton itself reads TRITON_INTERPRET when it is imported, so a later change would not
# take effect anyway (tests that need the other setting patch this value).
_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_cuda_available: list[bool] = []


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 at start-up: Triton runs kernels on CPU tensors (a testing tool)."""
    return _INTERPRETER


def cuda_available() -> bool:
    """torch.cuda.is_available(), asked once (dispatch asks on every call)."""
    if not _cuda_available:
        import torch

        _cuda_available.append(torch.cuda.is_available())
    return _cuda_available[0]


def unavailable_reason() -> str | None:
    """Why Triton kernels cannot run in this process: not importable, or neither a GPU nor the interpreter."""
    error = _import_error()
    if error is not None:
        return error
    if interpreter_enabled():
        return None
    if not cuda_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU)"
    return None
