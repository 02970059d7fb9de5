"""Dispatch: the one place that chooses which kernel serves a call.

Modelled on xformers' fmha dispatch. Ops register *variants* in :mod:`pyattn._registry`, each with
a :class:`~pyattn._registry.Support`; ``auto`` takes the first variant, in priority order
(cuda → triton → torch → reference, and within a backend as registered), whose support has no
reason to refuse the request. A forced name — a backend (``"triton"``: the first of its variants
that serves) or one variant (``"triton/grid"``) — serves the call or raises
:class:`BackendUnavailableError` with every reason. Nothing here reads tensor data, so it runs
unchanged on ``meta`` tensors and under ``torch.compile`` (its state lives in plain module globals).

Imports point one way: functional → dispatch → registry ← ops → kernels. Dispatch does not import
the ops; the package does (``pyattn/__init__.py``), which fills the registry.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from pyattn import _registry, _triton
from pyattn._registry import (  # noqa: F401  (re-exported: the names ops and tests use)
    ASSUMABLE_TARGETS,
    AUTO,
    BACKENDS,
    BackendUnavailableError,
    Request,
    Support,
    Target,
    Variant,
    all_variant_names,
    backend_unavailable_reason,
    variants,
)

BACKEND_ENVIRONMENT_VARIABLE = "PYATTN_BACKEND"


def triton_interpreter_enabled() -> bool:
    return _triton.interpreter_enabled()


# ------------------------------------------------------------------------------------------ the choice


def _validated_name(name: str, source: str) -> str:
    if name == AUTO or name in BACKENDS:
        return name
    if "/" in name and name.split("/", 1)[0] in BACKENDS:
        known = all_variant_names()
        if name in known:
            return name
        raise ValueError(f"{source}: unknown variant {name!r}; the variants are {known}")
    raise ValueError(f"{source}: unknown backend {name!r}; expected {AUTO!r}, a backend of {list(BACKENDS)} "
                     f"or a variant such as 'triton/pointer' (pyattn.explain lists them per call)")


# A plain list (not a contextvar) so torch.compile traces through ``use_backend`` without a break.
_forced_stack: list[str] = []


# PYATTN_BACKEND, read once (on the first call: the ops must be registered to validate a variant name).
_environment_backend: list[str] = []


def default_backend() -> str:
    """The forced name in effect: the innermost ``use_backend``, else PYATTN_BACKEND, else "auto"."""
    if _forced_stack:
        return _forced_stack[-1]
    if not _environment_backend:
        name = os.environ.get(BACKEND_ENVIRONMENT_VARIABLE, AUTO)
        _environment_backend.append(_validated_name(name, BACKEND_ENVIRONMENT_VARIABLE))
    return _environment_backend[0]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force every pyattn call in the block onto ``name``: "auto", a backend ("triton") or a variant
    ("triton/grid"). A call the forced name cannot serve raises :class:`BackendUnavailableError`."""
    _forced_stack.append(_validated_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced_stack.pop()


# Real devices' facts, queried once per device (plain dict: torch.compile traces a dict lookup quietly).
_device_targets: dict[tuple[str, int | None, bool], Target] = {}


def target_for(request: Request, assume: str | None = None) -> Target:
    """The device ``request`` runs on, or the GPU named by ``assume`` ("sm_90", "sm_80")."""
    interpreter = _triton._INTERPRETER
    if assume is not None:
        if assume not in ASSUMABLE_TARGETS:
            raise ValueError(f"assume must be one of {sorted(ASSUMABLE_TARGETS)} (or None for the real device), "
                             f"got {assume!r}")
        return ASSUMABLE_TARGETS[assume]
    device = request.device
    key = (device.type, device.index, interpreter)
    target = _device_targets.get(key)
    if target is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            properties = torch.cuda.get_device_properties(index)
            target = Target(
                "cuda", (properties.major, properties.minor), properties.multi_processor_count,
                getattr(properties, "shared_memory_per_block_optin", None),
                getattr(properties, "shared_memory_per_multiprocessor", None),
            )
        else:
            target = Target(device.type, interpreter=interpreter and device.type == "cpu")
        _device_targets[key] = target
    return target


def _reasons(variant: Variant, request: Request, target: Target, forced: bool) -> list[str]:
    unavailable = backend_unavailable_reason(variant.backend, assumed=target.assumed)
    if unavailable is not None:
        return [unavailable]
    return variant.support.not_supported_reasons(request, target, forced=forced)


def _candidates(request: Request, name: str) -> list[Variant]:
    if name == AUTO:
        return variants(request.op)
    backend = name.split("/", 1)[0]
    if "/" in name:
        exact = [v for v in variants(request.op) if v.qualified_name == name]
        if exact:
            return exact
        # An op with no variant of that name ("triton/grid" names an LSTM kernel; this is attention): the
        # backend's variants serve it, so one forced name covers a model with several ops.
    return [v for v in variants(request.op) if v.backend == backend]


class RequestCaptured(Exception):
    """Raised by :func:`choose` inside :func:`capture_request`: the call stops at its first dispatch."""

    def __init__(self, request: Request):
        super().__init__(request.describe())
        self.request = request


# Non-empty inside capture_request: choose() records the request and stops the call there.
_capturing: list[bool] = []


def capturing() -> bool:
    """Inside :func:`capture_request` (a caller that memoises its choice must ask dispatch then)."""
    return bool(_capturing)


@contextlib.contextmanager
def capture_request() -> Iterator[None]:
    """Within the block, the first pyattn call to reach dispatch raises :class:`RequestCaptured` with its
    request instead of running (how ``pyattn.explain`` sees what a module's forward would dispatch)."""
    _capturing.append(True)
    try:
        yield
    finally:
        _capturing.pop()


def choose(request: Request, backend: str | None = None, *, assume: str | None = None) -> Variant:
    """The variant that serves ``request``.

    ``backend`` (or, when None, the forced/default name) "auto" takes the first variant in priority
    order that serves the call; a backend name takes the first of that backend's variants that does;
    a variant name takes that variant. A forced name that cannot serve raises with every reason.
    """
    if _capturing:
        raise RequestCaptured(request)
    name = _validated_name(backend if backend is not None else default_backend(), "backend")
    target = target_for(request, assume)
    forced = name != AUTO
    candidates = _candidates(request, name)
    for variant in candidates:
        if not _reasons(variant, request, target, forced):
            return variant if forced else _registry.auto_form(variant)
    if not forced:
        raise BackendUnavailableError(f"no pyattn backend serves {request.describe()}:\n"
                                      + explain_request(request, assume=assume))
    if not candidates:
        raise BackendUnavailableError(f"pyattn backend {name!r} cannot serve {request.describe()}: "
                                      f"it has no implementation of {request.op}")
    details = "; ".join(f"{v.qualified_name}: " + "; ".join(_reasons(v, request, target, forced))
                        for v in candidates)
    raise BackendUnavailableError(f"pyattn backend {name!r} cannot serve {request.describe()}: {details}")


def explain_request(request: Request, *, assume: str | None = None, backend: str | None = None) -> str:
    """One line per variant: whether it would serve ``request`` and, if not, why; then which one runs."""
    name = _validated_name(backend if backend is not None else default_backend(), "backend")
    target = target_for(request, assume)
    header = request.describe() + (f"  [assuming {assume}: {target.sm_count} SMs]" if assume else "")
    lines = [header]
    entries = variants(request.op)
    if not entries:
        lines.append(f"  no backend has an implementation of {request.op}")
    present = {v.backend for v in entries}
    for backend_name in BACKENDS:
        if backend_name not in present:
            lines.append(f"  {backend_name:<18} no: has no implementation of {request.op}")
            continue
        for variant in (v for v in entries if v.backend == backend_name):
            reasons = _reasons(variant, request, target, forced=name != AUTO)
            verdict = "serves" if not reasons else "no: " + "; ".join(reasons)
            lines.append(f"  {variant.qualified_name:<18} {verdict}")
    forced = name != AUTO
    picked = next((v.qualified_name for v in _candidates(request, name) if not _reasons(v, request, target, forced)),
                  "nothing (every variant has a reason above)")
    label = "auto picks" if name == AUTO else f"{name!r} (forced) runs"
    lines.append(f"  {label}: {picked}")
    # What earlier calls of this process ran differently, decided at launch (a compiled kernel's figures, a graph
    # capture): facts dispatch cannot see from the request.
    lines += [f"  note: {text}" for topic in (request.op, "graphs") for text in _registry.notes(topic)]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- status queries


def available_backends() -> list[str]:
    """Backends that can run in this process (before asking whether they serve a given call)."""
    return [name for name in BACKENDS if backend_unavailable_reason(name) is None]


def backend_status() -> dict[str, str]:
    """Each backend's name mapped to "available" or the reason it is not."""
    return {name: backend_unavailable_reason(name) or "available" for name in BACKENDS}
