"""A benchmark is a function that returns figures: :func:`run_case` (the CLI's), or :func:`prepare`
then :func:`evaluate` (pytest-benchmark's, which also times ``workload.synchronized_call`` itself).

    data = case_data(case, device)                  # inputs + float64 reference, shared by backends
    workload = prepare(case, "pyattn:triton", data)  # raises Unsupported(reason)
    result = evaluate(workload, check=True, roofline=roofline)
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch

import pyattn
from pyattn.bench.attention import AttentionData, prepare_attention
from pyattn.bench.lstm import LSTMData, prepare_lstm
from pyattn.bench.measure import attainable_fraction, peak_memory_bytes, time_call
from pyattn.bench.suites import AttentionCase, Case, dtype_name
from pyattn.bench.workload import Unsupported, Workload

OK, CORRECTNESS_ONLY, SKIPPED, ERROR = "ok", "correctness-only", "skipped", "error"
INTERPRETER_NOTE = "Triton interpreter on CPU: a correctness run, not a speed figure"


@dataclass
class Result:
    """One row: a backend on a case. Times in ms; null where not measured (the reason says why)."""

    op: str
    shape: str
    dtype: str
    mode: str
    backend: str
    case: dict
    status: str = OK
    reason: str | None = None
    check: dict | None = None  # {"passed", "finite", "errors": {tensor: error}, "bounds": {tensor: bound}}
    time_ms: dict | None = None  # {"min", "median", "max", "method"}
    flops: float | None = None
    tflops: float | None = None
    tokens_per_s: float | None = None
    bytes: float | None = None
    gbps: float | None = None
    peak_memory_bytes: int | None = None
    roofline_fraction: float | None = None
    speedup: float | None = None  # over the fastest PyTorch baseline of the same op, shape, dtype, mode
    notes: list[str] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return self.backend.startswith("torch:")

    @property
    def median_ms(self) -> float | None:
        return None if self.time_ms is None else self.time_ms["median"]

    @property
    def group(self) -> tuple:
        return (self.op, self.shape, self.dtype, self.mode)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def case_data(case: Case, device: torch.device, seed: int = 0):
    return (AttentionData if isinstance(case, AttentionCase) else LSTMData)(case, device, seed)


def prepare(case: Case, backend: str, data, interpret: bool = False) -> Workload:
    """The workload of ``backend`` on ``case`` over ``data``; raises :class:`Unsupported` with the reason."""
    if isinstance(case, AttentionCase):
        workload = prepare_attention(case, backend, data)
    else:
        workload = prepare_lstm(case, backend, data)
    if interpret and backend == "pyattn:triton":
        workload.correctness_only = INTERPRETER_NOTE
    return workload


def empty_result(case: Case, backend: str) -> Result:
    return Result(case.op, case.shape, dtype_name(case.dtype), case.mode, backend, case.as_dict())


def evaluate(workload: Workload, check: bool = True, roofline: dict | None = None) -> Result:
    """Check (unless ``check`` is False), then time and measure ``workload`` (unless correctness-only)."""
    case = workload.case
    result = empty_result(case, workload.backend)
    result.flops, result.bytes = case.flops(), case.bytes()
    if check:
        errors, finite = workload.check()
        bounds = workload.bounds()
        passed = finite and all(errors[name] <= bounds[name] for name in errors)
        result.check = {"passed": passed, "finite": finite, "errors": errors, "bounds": bounds}
    if workload.correctness_only:
        result.status, result.reason = CORRECTNESS_ONLY, workload.correctness_only
        return result
    timing = None
    if workload.cuda_graph:
        try:
            timing = time_call(workload.call, workload.device, workload.grad_to_none, cuda_graph=True)
        except RuntimeError as error:  # e.g. a backend that synchronises: not capturable
            result.notes.append(f"CUDA graph capture failed ({first_line(error)}): timed without a graph")
    if timing is None:
        timing = time_call(workload.call, workload.device, workload.grad_to_none)
    result.time_ms = timing.as_dict()
    seconds = timing.median_ms * 1e-3
    result.tflops = result.flops / seconds / 1e12
    result.tokens_per_s = case.tokens() / seconds
    result.gbps = None if result.bytes is None else result.bytes / seconds / 1e9
    result.roofline_fraction = attainable_fraction(result.flops, result.bytes, seconds, roofline)
    result.peak_memory_bytes = peak_memory_bytes(workload.call, workload.device, workload.grad_to_none)
    return result


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def run_case(
    case: Case,
    backend: str,
    device: torch.device,
    *,
    data=None,
    check: bool = True,
    roofline: dict | None = None,
    interpret: bool = False,
) -> Result:
    """One result row, whatever happens: an unsupported case is a skipped row with the reason, and any
    failure is an error row with its message, so one bad backend never stops a run."""
    try:
        data = case_data(case, device) if data is None else data
        return evaluate(prepare(case, backend, data, interpret), check, roofline)
    except (Unsupported, pyattn.BackendUnavailableError) as reason:
        result = empty_result(case, backend)
        result.status, result.reason = SKIPPED, str(reason)
        return result
    except Exception as error:  # noqa: BLE001  (recorded in the row; the run goes on)
        result = empty_result(case, backend)
        result.status, result.reason = ERROR, first_line(error)
        result.notes.append(traceback.format_exc(limit=-3))
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return result


def fill_speedups(results: list[Result]) -> None:
    """Each timed row's speed-up over the fastest timed PyTorch baseline of its op, shape, dtype, mode."""
    fastest: dict[tuple, float] = {}
    for result in results:
        if result.is_baseline and result.median_ms is not None:
            fastest[result.group] = min(fastest.get(result.group, float("inf")), result.median_ms)
    for result in results:
        if result.median_ms is not None and result.group in fastest:
            result.speedup = fastest[result.group] / result.median_ms
