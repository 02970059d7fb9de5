"""A benchmark is a function that returns figures: :func:`run_group` (the CLI's: every backend of one
case, timed interleaved), :func:`run_case` (one backend), or :func:`prepare` then :func:`evaluate`
(pytest-benchmark's, which also times ``workload.synchronized_call`` itself).

    data = case_data(case, device)                  # inputs + float64 reference, shared by backends
    workload = prepare(case, "pyattn:triton", data)  # raises Unsupported(reason)
    result = evaluate(workload, check=True, roofline=roofline)

Nothing here knows an op: the case's suite (:mod:`pyattn.bench.registry`) makes its data and
workloads, and the case carries its FLOP and byte counts.
"""

from __future__ import annotations

import statistics
import traceback
from dataclasses import dataclass, field

import torch

import pyattn
from pyattn.bench.measure import Timing, attainable_fraction, peak_memory_bytes, time_call, time_interleaved
from pyattn.bench.registry import dtype_name, suite_for_op
from pyattn.bench.workload import Unsupported, Workload

OK, CORRECTNESS_ONLY, SKIPPED, ERROR = "ok", "correctness-only", "skipped", "error"
INTERPRETER_NOTE = "Triton interpreter on CPU: a correctness run, not a speed figure"
AUTO = "pyattn:auto"
ABOVE_CEILING_NOTE = "above the measured ceiling: noise (a loaded machine) or a wrong work model, not a fraction"


@dataclass
class Result:
    """One row: a backend on a case. Times in ms; null where not measured (the reason says why)."""

    suite: str
    op: str
    shape: str
    dtype: str
    mode: str
    backend: str
    case: dict
    status: str = OK
    reason: str | None = None
    served_by: str | None = None  # for pyattn:auto, the backend (variant) its choice serves the case with
    check: dict | None = None  # {"passed", "finite", "errors": {tensor: error}, "bounds": {tensor: bound}}
    time_ms: dict | None = None  # {"min", "median", "max", "method", "samples"}
    flops: float | None = None
    tflops: float | None = None
    tokens_per_s: float | None = None
    bytes: float | None = None
    gbps: float | None = None
    peak_memory_bytes: int | None = None
    roofline_fraction: float | None = None
    above_ceiling: bool = False  # roofline_fraction > 1: the figure is noise or its model is wrong
    # The drop-in comparison: the torch row the drop-in replaces, and this row's speed relative to it
    # (its time / this time), the median over the interleaved rounds with their quartiles.
    dropin: dict | None = None  # {"pyattn": the drop-in, "torch": the call it replaces}
    dropin_baseline: str | None = None
    dropin_ratio: float | None = None
    dropin_ratio_quartiles: list[float] | None = None
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


def case_data(case, device: torch.device, seed: int = 0):
    return suite_for_op(case.op).data(case, device, seed)


def _is_interpreted(backend: str, interpret: bool) -> bool:
    # Under --interpret, auto may pick the interpreter too: neither is a speed figure.
    return interpret and (backend == AUTO or backend.split("/", 1)[0] == "pyattn:triton")


def prepare(case, backend: str, data, interpret: bool = False) -> Workload:
    """The workload of ``backend`` on ``case`` over ``data``; raises :class:`Unsupported` with the reason."""
    workload = suite_for_op(case.op).prepare(case, backend, data)
    if _is_interpreted(backend, interpret):
        workload.correctness_only = INTERPRETER_NOTE
    return workload


def empty_result(case, backend: str) -> Result:
    suite = suite_for_op(case.op)
    result = Result(suite.name, case.op, case.shape, dtype_name(case.dtype), case.mode, backend, case.as_dict())
    if suite.dropin is not None:
        dropin = suite.dropin(case)
        result.dropin = {"pyattn": dropin.pyattn, "torch": dropin.torch}
        result.dropin_baseline = "torch:" + dropin.baseline
    return result


def _checked(workload: Workload, check: bool) -> Result:
    """The row of ``workload`` with its check done (unless ``check`` is False), not yet timed."""
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


def _record_timing(result: Result, workload: Workload, timing: Timing, roofline: dict | None) -> None:
    case = workload.case
    result.time_ms = timing.as_dict()
    seconds = timing.median_ms * 1e-3
    result.tflops = result.flops / seconds / 1e12
    result.tokens_per_s = case.tokens() / seconds
    result.gbps = None if result.bytes is None else result.bytes / seconds / 1e9
    result.roofline_fraction = attainable_fraction(result.flops, result.bytes, seconds, roofline)
    if result.roofline_fraction is not None and result.roofline_fraction > 1.0:
        result.above_ceiling = True
        result.notes.append(f"{100 * result.roofline_fraction:.0f}% of the roofline: {ABOVE_CEILING_NOTE}")
    result.peak_memory_bytes = peak_memory_bytes(workload.call, workload.device, workload.grad_to_none)


def _time_single(workload: Workload, result: Result) -> Timing:
    if workload.cuda_graph:
        try:
            return time_call(workload.call, workload.device, workload.grad_to_none, cuda_graph=True)
        except RuntimeError as error:  # e.g. a backend that synchronises: not capturable
            result.notes.append(f"CUDA graph capture failed ({first_line(error)}): timed without a graph")
    return time_call(workload.call, workload.device, workload.grad_to_none)


def evaluate(workload: Workload, check: bool = True, roofline: dict | None = None) -> Result:
    """Check (unless ``check`` is False), then time and measure ``workload`` (unless correctness-only)."""
    result = _checked(workload, check)
    if result.status == OK:
        _record_timing(result, workload, _time_single(workload, result), roofline)
    return result


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _failure(case, backend: str, error: BaseException) -> Result:
    """A skipped row (the backend cannot run the case: the reason) or an error row (its message)."""
    result = empty_result(case, backend)
    if isinstance(error, (Unsupported, pyattn.BackendUnavailableError)):
        result.status, result.reason = SKIPPED, str(error)
    else:
        result.status, result.reason = ERROR, first_line(error)
        result.notes.append("".join(traceback.format_exception(error, limit=-3)))
        if isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
    return result


def run_case(
    case,
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
    except Exception as error:  # noqa: BLE001  (recorded in the row; the run goes on)
        return _failure(case, backend, error)


def _served_by(case, data) -> str | None:
    hook = suite_for_op(case.op).served_by
    if hook is None:
        return None
    try:
        return hook(case, data)
    except Exception:  # noqa: BLE001  (a label only: a dispatch that cannot explain leaves it empty)
        return None


def run_group(
    case,
    backends: list[str],
    device: torch.device,
    *,
    data=None,
    check: bool = True,
    roofline: dict | None = None,
    interpret: bool = False,
) -> list[Result]:
    """Every backend of one case on the same inputs: each prepared and checked, then all the timed ones
    timed together, interleaved (:func:`pyattn.bench.measure.time_interleaved`), so machine load hits
    them alike; then the drop-in ratios, paired round by round. One row per backend, whatever happens."""
    if data is None:
        try:
            data = case_data(case, device)
        except Exception as error:  # noqa: BLE001  (no inputs, no runs: one error row per backend)
            rows = [_failure(case, backend, error) for backend in backends]
            for row in rows:
                row.reason = f"making the inputs failed: {row.reason}"
            return rows
    rows: list[Result] = []
    timed: list[tuple[Result, Workload]] = []
    for backend in backends:
        try:
            workload = prepare(case, backend, data, interpret)
            result = _checked(workload, check)
        except Exception as error:  # noqa: BLE001
            rows.append(_failure(case, backend, error))
            continue
        if backend == AUTO:
            result.served_by = _served_by(case, data)
        rows.append(result)
        if result.status == OK:
            timed.append((result, workload))
    try:
        timings = time_interleaved([(w.call, w.grad_to_none, w.cuda_graph) for _, w in timed], device)
    except Exception as error:  # noqa: BLE001  (e.g. a CUDA graph capture failed: time each alone)
        timings = [_time_alone(case, result, workload, rows, first_line(error)) for result, workload in timed]
    for (result, workload), timing in zip(timed, timings):
        if timing is not None:
            _record_timing(result, workload, timing, roofline)
    fill_dropin_ratios(rows, dict(zip((r.backend for r, _ in timed), timings)))
    return rows


def _time_alone(case, result: Result, workload: Workload, rows: list[Result], why: str) -> Timing | None:
    """Time one workload by itself after interleaved timing failed; an error row replaces it if it fails."""
    try:
        timing = _time_single(workload, result)
    except Exception as error:  # noqa: BLE001
        failed = _failure(case, workload.backend, error)
        rows[rows.index(result)] = failed
        return None
    result.notes.append(f"timed alone, not interleaved with the case's other backends ({why})")
    return timing


def _paired(base: Timing | None, row: Timing | None) -> tuple[float, list[float]] | None:
    """Median and quartiles of base / row over rounds they shared, else the ratio of their medians."""
    if base is None or row is None:
        return None
    if base.samples and len(base.samples) == len(row.samples):
        ratios = [b / r for b, r in zip(base.samples, row.samples)]
        quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
        return statistics.median(ratios), [quartiles[0], quartiles[2]]
    ratio = base.median_ms / row.median_ms
    return ratio, [ratio, ratio]


def fill_dropin_ratios(rows: list[Result], timings: dict[str, Timing | None]) -> None:
    """Each timed row's speed relative to its drop-in baseline, from the same interleaved rounds."""
    for row in rows:
        if row.dropin_baseline is None or row.time_ms is None or row.dropin_baseline not in timings:
            continue
        paired = _paired(timings[row.dropin_baseline], timings.get(row.backend))
        if paired is not None:
            row.dropin_ratio, row.dropin_ratio_quartiles = paired


def fill_speedups(results: list[Result]) -> None:
    """Each timed row's speed-up over the fastest timed PyTorch baseline of its op, shape, dtype, mode."""
    fastest: dict[tuple, float] = {}
    for result in results:
        if result.is_baseline and result.median_ms is not None:
            fastest[result.group] = min(fastest.get(result.group, float("inf")), result.median_ms)
    for result in results:
        if result.median_ms is not None and result.group in fastest:
            result.speedup = fastest[result.group] / result.median_ms
