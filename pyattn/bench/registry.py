"""The bench's one registry: each op registers its suite; the runner, report, plots and CLI only iterate.

An op's bench module builds one :class:`Suite` and registers it when imported::

    register_suite(Suite(
        name="attention",                    # the CLI's SUITE argument
        ops=("attention",),                  # the ``op`` its cases carry (rows and plots are keyed by it)
        cases=attention_cases,               # (shape set, dtypes, modes) -> [case]
        data=AttentionData,                  # (case, device, seed) -> inputs and float64 reference, shared by backends
        prepare=prepare_attention,           # (case, backend, data) -> Workload, or raise Unsupported(reason)
        baselines=attention_baselines,       # case -> the torch baselines (no "torch:") that run it
        all_baselines=ATTENTION_BASELINES,   # every name ``baselines`` can give (the CLI's choices)
        dropin=sdpa_dropin,                  # case -> DropIn: the pyattn drop-in and the torch call it replaces
        plots=(Plot(...), ...),
    ))

A case is any frozen dataclass with ``op``, ``shape`` (a short label), ``dtype``, ``mode`` and the
methods ``flops()``, ``bytes()`` (None where it is not memory-bound), ``tokens()`` and ``as_dict()``:
its FLOP and byte model travels with it. Built-in suites are imported from :data:`BUILTIN_SUITES`
on first use; a new op adds its module there (and nothing in runner, report, plots or CLI).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

BUILTIN_SUITES = ("pyattn.bench.attention", "pyattn.bench.mha", "pyattn.bench.lstm", "pyattn.bench.decode")
# tiny: structure only (tests, CI; seconds). small: each drop-in at one realistic shape beside PyTorch
# (the CPU set). default: about 5 minutes on an H100. full: the whole grid.
SHAPE_SETS = ("tiny", "small", "default", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
THROUGHPUTS = ("tflops", "tokens_per_s")


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}[dtype]


@dataclass(frozen=True)
class DropIn:
    """What a user changes one import for: ``pyattn`` replaces ``torch``; ``baseline`` is the torch row
    (without "torch:") that runs the replaced call as the user would, so pyattn:auto is compared with it."""

    pyattn: str
    torch: str
    baseline: str


@dataclass(frozen=True)
class Plot:
    """One PNG: the rows ``select`` keeps (of the run's first dtype), one panel per ``panel`` key, one
    line per backend, ``metric`` (a name in :data:`pyattn.bench.plots.METRICS`) against ``x``.
    ``title`` is completed with the dtype and device."""

    file: str
    title: str
    select: Callable[[dict], bool]
    panel: Callable[[dict], tuple[tuple, str]]  # row -> (sort key, panel title)
    x: Callable[[dict], float]
    xlabel: str
    metric: str
    log_x: bool = True
    log_y: bool = False


@dataclass(frozen=True)
class Suite:
    name: str
    ops: tuple[str, ...]
    cases: Callable[[str, list[torch.dtype], list[str]], list[Any]]
    data: Callable[[Any, torch.device, int], Any]
    prepare: Callable[[Any, str, Any], Any]
    baselines: Callable[[Any], tuple[str, ...]]
    all_baselines: tuple[str, ...]
    dropin: Callable[[Any], DropIn] | None = None
    throughput: str = "tflops"  # the table's throughput column: "tflops" or "tokens_per_s"
    plots: tuple[Plot, ...] = ()
    # Baselines that run on a GPU only (name -> why), and those a run includes only when asked or with
    # --shapes full (name -> why: e.g. FlexAttention compiles for minutes).
    gpu_only: dict[str, str] = field(default_factory=dict)
    opt_in: dict[str, str] = field(default_factory=dict)
    # (case, data) -> the backend pyattn's auto choice serves the case with, or None if it cannot tell.
    served_by: Callable[[Any, Any], str | None] | None = None

    def __post_init__(self):
        if self.throughput not in THROUGHPUTS:
            raise ValueError(f"Suite {self.name!r}: throughput must be one of {THROUGHPUTS}, got {self.throughput!r}")


_SUITES: dict[str, Suite] = {}
_loaded = False


def register_suite(suite: Suite) -> Suite:
    """Add ``suite`` to the bench (a name or op already registered by another suite is an error)."""
    other = _SUITES.get(suite.name)
    if other is not None and other is not suite:
        raise ValueError(f"a bench suite named {suite.name!r} is registered already")
    for registered in _SUITES.values():
        shared = set(registered.ops) & set(suite.ops)
        if registered.name != suite.name and shared:
            raise ValueError(f"suite {suite.name!r}: op {sorted(shared)[0]!r} belongs to suite {registered.name!r}")
    _SUITES[suite.name] = suite
    return suite


def unregister_suite(name: str) -> None:
    """Remove a suite (tests add dummy suites and take them out again)."""
    _SUITES.pop(name, None)


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_SUITES:
            importlib.import_module(module)


def suites() -> list[Suite]:
    """Every registered suite, in registration order."""
    _load_builtin()
    return list(_SUITES.values())


def suite_names() -> tuple[str, ...]:
    return tuple(suite.name for suite in suites())


def get_suite(name: str) -> Suite:
    _load_builtin()
    if name not in _SUITES:
        raise ValueError(f"suite: expected one of {suite_names()}, got {name!r}")
    return _SUITES[name]


def suite_for_op(op: str) -> Suite:
    """The suite whose cases carry ``op``."""
    for suite in suites():
        if op in suite.ops:
            return suite
    raise ValueError(f"no bench suite has op {op!r} (ops: {[o for s in suites() for o in s.ops]})")


def all_baselines() -> tuple[str, ...]:
    """Every baseline name of every suite, once each, in registration order."""
    return tuple(dict.fromkeys(name for suite in suites() for name in suite.all_baselines))


def build_cases(suite: str, shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list:
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes: expected one of {SHAPE_SETS}, got {shapes!r}")
    return get_suite(suite).cases(shapes, dtypes, modes)
