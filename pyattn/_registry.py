"""The registry every op declares against: what a call needs, what each kernel variant serves.

The bottom of the package (it imports only torch and the two availability probes): ``pyattn.ops``
registers *variants* here, ``pyattn._dispatch`` chooses among them, and nothing here imports either.

* :class:`Request` — what one call needs: op, device, dtype, head dim, the optional features it
  uses, the sizes a kernel's reach depends on, and the operand tensors (metadata only: strides and
  alignment; nothing reads their data, so meta tensors work).
* :class:`Target` — the device the call would run on: the real one, or one *assumed* by
  ``pyattn.explain(..., assume="sm_90")`` to ask what would run there from a machine without it.
* :class:`Support` — what one variant serves: devices, dtypes, features, head dim, compute
  capability, and ``checks`` (predicates on the request and target: "16-byte aligned strides",
  "W_hh fits on chip", "grid co-resident on the SMs").
* :class:`Variant` — one implementation of one op on one backend, named ``backend/variant``
  (``triton/tma``, ``cuda/persistent``) or just ``backend`` when it is the backend's only one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from pyattn import _extension, _triton

# Automatic priority, fastest first. "torch" serves a call with PyTorch's own kernels wherever they
# compute exactly what pyattn promises; "reference" is the float64-capable ground truth.
BACKENDS = ("cuda", "triton", "torch", "reference")
AUTO = "auto"


class BackendUnavailableError(RuntimeError):
    """A backend or variant was asked for by name but cannot serve the call; the message says why."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------- target


@dataclass(frozen=True)
class Target:
    """The device a request runs on. ``assumed``: described by name, not queried (explain's ``assume``)."""

    device_type: str  # "cuda", "cpu", "meta"
    capability: tuple[int, int] | None = None
    sm_count: int | None = None
    shared_memory_per_block: int | None = None  # opt-in maximum, bytes
    shared_memory_per_sm: int | None = None
    assumed: bool = False
    interpreter: bool = False  # TRITON_INTERPRET=1: Triton kernels run on CPU tensors

    @property
    def name(self) -> str:
        if self.capability is None:
            return self.device_type
        return f"sm_{self.capability[0]}{self.capability[1]}"


# GPUs explain can assume (NVIDIA's published figures: SMs, opt-in shared memory per block, per SM).
ASSUMABLE_TARGETS = {
    "sm_90": Target("cuda", (9, 0), 132, 232448, 233472, assumed=True),  # H100 SXM
    "sm_80": Target("cuda", (8, 0), 108, 166912, 167936, assumed=True),  # A100
}
ASSUMABLE_TARGETS["sm_90a"] = ASSUMABLE_TARGETS["sm_90"]


# ---------------------------------------------------------------------------------------------- request


@dataclass(frozen=True)
class Request:
    """What one call needs from a backend: built by the functional layer after validation.

    ``sizes``: the named sizes a variant's reach depends on (``batch``, ``hidden_size``,
    ``seqlen_q``, ...). ``operands``: the call's tensors by name, for checks on strides and
    alignment. Neither takes part in equality: two calls of one op with the same dtype, device and
    features are the same request to a cache.
    """

    op: str  # "attention", "attention_varlen", "attention_weights", "lstm_cell", "lstm", ...
    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    features: frozenset[str] = frozenset()  # optional features the call uses: "dropout", "mask", ...
    sizes: Mapping[str, int] = field(default_factory=dict, compare=False, hash=False)
    operands: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def size(self, name: str, default: int | None = None) -> int | None:
        return self.sizes.get(name, default)

    def describe(self) -> str:
        parts = [f"op={self.op}", f"device={self.device.type}", f"dtype={_dtype_name(self.dtype)}"]
        if self.head_dim is not None:
            parts.append(f"head_dim={self.head_dim}")
        if self.features:
            parts.append("features=" + ",".join(sorted(self.features)))
        parts += [f"{name}={value}" for name, value in self.sizes.items()]
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------- support

# A check returns why the variant cannot serve the request on the target, or None when it can.
Check = Callable[[Request, Target], "str | None"]


@dataclass(frozen=True)
class Support:
    """What one variant of one op can serve."""

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    features: frozenset[str] = frozenset()
    max_head_dim: int | None = None
    min_compute_capability: tuple[int, int] | None = None
    # Devices served only when this backend is forced by name and TRITON_INTERPRET=1 (a testing tool:
    # the Triton interpreter runs kernels on CPU tensors, far slower than PyTorch's own CPU kernels).
    interpreter_devices: frozenset[str] = frozenset()
    checks: tuple[Check, ...] = ()
    # Set (to the reason) for a variant that serves a call only when forced by name: ``auto`` passes it over.
    forced_only: str | None = None

    def not_supported_reasons(self, request: Request, target: Target, *, forced: bool) -> list[str]:
        reasons = []
        device = target.device_type
        if device not in self.devices:
            if device in self.interpreter_devices and target.interpreter and forced:
                pass
            elif device in self.interpreter_devices and target.interpreter:
                reasons.append(f"device {device}: the Triton interpreter is a testing tool, served only when this "
                               "backend is forced (use_backend)")
            else:
                hint = (" (TRITON_INTERPRET=1 with a forced backend runs the Triton kernels on CPU, for testing)"
                        if device in self.interpreter_devices else "")
                reasons.append(f"device {device} not in {sorted(self.devices)}{hint}")
        if request.dtype not in self.dtypes:
            names = sorted(_dtype_name(d) for d in self.dtypes)
            reasons.append(f"dtype {_dtype_name(request.dtype)} not in {names}")
        if self.max_head_dim is not None and request.head_dim is not None and request.head_dim > self.max_head_dim:
            reasons.append(f"head dim {request.head_dim} > {self.max_head_dim}")
        missing = request.features - self.features
        if missing:
            reasons.append("unsupported features: " + ", ".join(sorted(missing)))
        if self.min_compute_capability is not None and device == "cuda" and target.capability is not None:
            if target.capability < self.min_compute_capability:
                want = ".".join(map(str, self.min_compute_capability))
                have = ".".join(map(str, target.capability))
                reasons.append(f"compute capability {have} < {want}")
        if not reasons:  # checks may assume the basic facts above hold
            for check in self.checks:
                reason = check(request, target)
                if reason is not None:
                    reasons.append(reason)
        if self.forced_only is not None and not forced:
            reasons.append(f"served only when forced by name: {self.forced_only}")
        return reasons


# --------------------------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One implementation of one op on one backend."""

    backend: str
    name: str | None  # None: the backend's only variant of this op
    op: str
    support: Support
    implementation: Callable = field(compare=False)
    summary: str = ""  # one line for explain: what this variant is
    # What ``auto`` runs when it picks this variant, where that differs from a forced call: the same kernel, but a
    # refusal only the launch can know (the compiled kernel's own figures, checked before launching) hands the call
    # to the next variant with a note (:func:`record_note`) instead of raising. None: ``implementation``.
    auto_implementation: Callable | None = field(default=None, compare=False)

    @property
    def qualified_name(self) -> str:
        return self.backend if self.name is None else f"{self.backend}/{self.name}"


# op -> its variants, in priority order: backends as in BACKENDS, within a backend as registered.
_VARIANTS: dict[str, list[Variant]] = {}


def register(backend: str, op: str, support: Support, *, variant: str | None = None,
             summary: str = "", auto_implementation: Callable | None = None) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` serves ``op`` on ``backend`` (as ``backend/variant``) for calls within ``support``.

    A backend's variants of one op are tried in the order they are registered: register the fastest first.
    ``auto_implementation``: what runs instead of ``fn`` when ``auto`` picked the variant (see Variant).
    """
    if backend not in BACKENDS:
        raise ValueError(f"register: unknown backend {backend!r}; expected one of {list(BACKENDS)}")

    def decorator(fn: Callable) -> Callable:
        entry = Variant(backend, variant, op, support, fn, summary, auto_implementation)
        if auto_implementation is None:
            _AUTO_FORMS.pop((op, entry.qualified_name), None)
        else:
            _AUTO_FORMS[(op, entry.qualified_name)] = Variant(backend, variant, op, support, auto_implementation,
                                                              summary)
        variants = [v for v in _VARIANTS.get(op, []) if v.qualified_name != entry.qualified_name]
        variants.append(entry)
        _VARIANTS[op] = sorted(variants, key=lambda v: BACKENDS.index(v.backend))  # stable within a backend
        return fn

    return decorator


# (op, qualified name) -> the Variant auto returns, for variants registered with an auto_implementation.
_AUTO_FORMS: dict[tuple[str, str], Variant] = {}


def auto_form(variant: Variant) -> Variant:
    """The variant as ``auto`` runs it: its auto_implementation in place of its implementation, where it has one."""
    return _AUTO_FORMS.get((variant.op, variant.qualified_name), variant)


def variants(op: str) -> list[Variant]:
    """Every registered variant of ``op``, in automatic priority order."""
    return list(_VARIANTS.get(op, ()))


def all_variant_names() -> list[str]:
    return sorted({v.qualified_name for entries in _VARIANTS.values() for v in entries})


def registered_ops() -> list[str]:
    return sorted(_VARIANTS)


# --------------------------------------------------------------------------------- backend availability


def backend_unavailable_reason(backend: str, *, assumed: bool = False) -> str | None:
    """Why ``backend`` cannot run in this process, or None. ``assumed``: only what is installed or built
    counts (the device is described, not present), so "no GPU visible" is no reason."""
    if backend == "cuda":
        return _extension.build_reason() if assumed else _extension.unavailable_reason()
    if backend == "triton":
        return _triton.import_reason() if assumed else _triton.unavailable_reason()
    return None


# ------------------------------------------------------------------------------------------------ notes

# What ran differently from what dispatch chose, decided at call time from facts dispatch cannot see (a compiled
# kernel's figures, a CUDA-graph capture): per topic (an op's name, or "graphs"), each text with how often it
# happened, the most recent last; bounded, so a long process never grows them. ``pyattn.explain`` prints them.
_NOTES: dict[str, dict[str, int]] = {}
_NOTES_PER_TOPIC = 16


def record_note(topic: str, text: str) -> None:
    entries = _NOTES.setdefault(topic, {})
    entries[text] = entries.pop(text, 0) + 1
    while len(entries) > _NOTES_PER_TOPIC:
        del entries[next(iter(entries))]


def notes(topic: str) -> list[str]:
    """The notes recorded under ``topic``, oldest first, each with its count when it happened more than once."""
    return [text if count == 1 else f"{text} (recorded {count} times)" for text, count in _NOTES.get(topic, {}).items()]


def clear_notes() -> None:
    _NOTES.clear()
