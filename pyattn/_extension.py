"""The compiled extension ``pyattn._C``: loaded once, its absence reported rather than raised."""

from __future__ import annotations

# Filled on first call; a plain global (not functools.lru_cache) so torch.compile traces it quietly.
_load_cache: list[tuple[object | None, str | None]] = []


def _load() -> tuple[object | None, str | None]:
    if not _load_cache:
        _load_cache.append(_import_extension())
    return _load_cache[0]


def _import_extension() -> tuple[object | None, str | None]:
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from pyattn import _C  # type: ignore[attr-defined]
    except ImportError as error:
        return None, f"extension pyattn._C is not built ({error}); reinstall with CUDA and nvcc present"
    if not getattr(_C, "built_with_cuda", False):
        return _C, "extension pyattn._C was built without CUDA kernels"
    return _C, None


def build_reason() -> str | None:
    """Why the extension holds no CUDA kernels (not built, or built without CUDA), or None."""
    return _load()[1]


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process: :func:`build_reason`, or no GPU visible."""
    reason = build_reason()
    if reason is not None:
        return reason
    from pyattn._triton import cuda_available

    if not cuda_available():
        return "no CUDA device is visible to torch"
    return None


def extension_module():
    """The loaded ``pyattn._C`` (raises ImportError with the reason when it is not built)."""
    module, reason = _load()
    if module is None:
        raise ImportError(reason)
    return module
