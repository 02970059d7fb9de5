"""Backend dispatch: each backend declares what it supports; ``auto`` walks a priority list.

Modelled on xformers' fmha dispatch: a backend answers ``not_supported_reasons(request)``, the
automatic choice takes the first backend with no reasons, and a forced backend that has reasons
raises :class:`BackendUnavailableError` listing them. Nothing here reads tensor data, so it runs
unchanged on ``meta`` tensors and under ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

BACKENDS = ("cuda", "triton", "reference")  # automatic priority order, fastest first
AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot serve the call; the message says why."""


@dataclass(frozen=True)
class Request:
    """What one call needs from a backend: built by the functional layer after validation."""

    op: str  # "attention", "lstm_cell", "lstm_layer", ...
    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    features: frozenset[str] = frozenset()  # optional features the call uses: "dropout", "mask", ...

    def describe(self) -> str:
        parts = [f"op={self.op}", f"device={self.device.type}", f"dtype={str(self.dtype).removeprefix('torch.')}"]
        if self.head_dim is not None:
            parts.append(f"head_dim={self.head_dim}")
        if self.features:
            parts.append("features=" + ",".join(sorted(self.features)))
        return " ".join(parts)


@dataclass(frozen=True)
class Support:
    """What one backend's implementation of one op can serve."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    features: frozenset[str] = frozenset()
    max_head_dim: int | None = None
    min_compute_capability: tuple[int, int] | None = None
    # Devices added only while the Triton interpreter is on (TRITON_INTERPRET=1 runs kernels on CPU).
    interpreter_devices: frozenset[str] = frozenset()


@dataclass
class Backend:
    name: str
    # Returns why the whole backend cannot run in this process (not installed, not built), or None.
    availability: Callable[[], str | None]
    implementations: dict[str, tuple[Support, Callable]] = field(default_factory=dict)

    def unavailable_reason(self) -> str | None:
        return self.availability()

    def not_supported_reasons(self, request: Request) -> list[str]:
        reason = self.availability()
        if reason is not None:
            return [reason]
        if request.op not in self.implementations:
            return [f"has no implementation of {request.op}"]
        support, _ = self.implementations[request.op]
        reasons = []
        devices = support.devices | (support.interpreter_devices if triton_interpreter_enabled() else frozenset())
        if request.device.type not in devices:
            hint = " (set TRITON_INTERPRET=1 to run Triton kernels on CPU)" if support.interpreter_devices else ""
            reasons.append(f"device {request.device.type} not in {sorted(devices)}{hint}")
        if request.dtype not in support.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in support.dtypes)
            reasons.append(f"dtype {str(request.dtype).removeprefix('torch.')} not in {names}")
        if support.max_head_dim is not None and request.head_dim is not None and request.head_dim > support.max_head_dim:
            reasons.append(f"head dim {request.head_dim} > {support.max_head_dim}")
        missing = request.features - support.features
        if missing:
            reasons.append("unsupported features: " + ", ".join(sorted(missing)))
        if support.min_compute_capability is not None and request.device.type == "cuda":
            capability = torch.cuda.get_device_capability(request.device)
            if capability < support.min_compute_capability:
                want = ".".join(map(str, support.min_compute_capability))
                reasons.append(f"compute capability {capability[0]}.{capability[1]} < {want}")
        return reasons


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _extension_unavailable() -> str | None:
    from pyattn import _extension

    return _extension.unavailable_reason()


def _triton_unavailable() -> str | None:
    from pyattn import _triton

    return _triton.unavailable_reason()


_REGISTRY: dict[str, Backend] = {
    "cuda": Backend("cuda", _extension_unavailable),
    "triton": Backend("triton", _triton_unavailable),
    "reference": Backend("reference", lambda: None),
}


def register(backend: str, op: str, support: Support) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` serves ``op`` on ``backend`` for calls within ``support``."""

    def decorator(fn: Callable) -> Callable:
        _REGISTRY[backend].implementations[op] = (support, fn)
        return fn

    return decorator


def _validated_backend_name(name: str, source: str) -> str:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {[AUTO, *BACKENDS]}")
    return name


# A plain list (not a contextvar) so torch.compile traces through ``use_backend`` without a break.
_forced_stack: list[str] = []


def default_backend() -> str:
    if _forced_stack:
        return _forced_stack[-1]
    return _validated_backend_name(os.environ.get("PYATTN_BACKEND", AUTO), "PYATTN_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every pyattn call in the block onto ``name`` ("auto" restores the automatic choice)."""
    _forced_stack.append(_validated_backend_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced_stack.pop()


def available_backends() -> list[str]:
    """Backends that can run in this process (before asking whether they serve a given call)."""
    _load_implementations()
    return [name for name in BACKENDS if _REGISTRY[name].unavailable_reason() is None]


def backend_status() -> dict[str, str]:
    """Each backend's name mapped to "available" or the reason it is not."""
    _load_implementations()
    return {name: _REGISTRY[name].unavailable_reason() or "available" for name in BACKENDS}


def choose(request: Request, backend: str | None = None) -> tuple[str, Callable]:
    """The backend name and implementation that serves ``request``.

    ``backend`` (or, when None, the forced/default backend) of "auto" takes the first backend in
    priority order that supports the call; a named backend that does not raises.
    """
    _load_implementations()
    name = _validated_backend_name(backend if backend is not None else default_backend(), "backend")
    if name != AUTO:
        reasons = _REGISTRY[name].not_supported_reasons(request)
        if reasons:
            raise BackendUnavailableError(
                f"pyattn backend {name!r} cannot serve {request.describe()}: " + "; ".join(reasons)
            )
        return name, _REGISTRY[name].implementations[request.op][1]
    for candidate in BACKENDS:
        if not _REGISTRY[candidate].not_supported_reasons(request):
            return candidate, _REGISTRY[candidate].implementations[request.op][1]
    raise BackendUnavailableError(f"no pyattn backend serves {request.describe()}:\n" + explain_request(request))


def explain_request(request: Request) -> str:
    """One line per backend: whether it would serve ``request`` and, if not, why."""
    _load_implementations()
    lines = [f"{request.describe()}"]
    chosen = None
    for name in BACKENDS:
        reasons = _REGISTRY[name].not_supported_reasons(request)
        if not reasons and chosen is None:
            chosen = name
        verdict = "serves" if not reasons else "no: " + "; ".join(reasons)
        lines.append(f"  {name:<9} {verdict}")
    lines.append(f"  auto picks: {chosen}")
    return "\n".join(lines)


_loaded = False


def _load_implementations() -> None:
    """Import the op modules, whose ``register`` calls fill the registry (once, lazily)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pyattn.ops  # noqa: F401  (registers every backend's implementations)
