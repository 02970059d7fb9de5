"""Timing and peak memory of one callable, on a GPU or a CPU, and the device's roofline.

GPU: CUDA events through ``triton.testing.do_bench``, which runs the warm-up outside the figures and
flushes L2 before every timed call, so each call starts with cold caches as it would inside a model.
Short calls (an LSTM cell step, a few microseconds) are timed inside a CUDA graph
(``do_bench_cudagraph``), where launch overhead does not swamp them; the graph does not flush L2,
so the caller rotates through enough input copies to overflow it (:func:`rotation_copies`).
Min / median / max come from the same samples (quantiles 0, ½, 1).

CPU: ``time.perf_counter`` around each call; memory is not measured (null). A CPU figure is as steady
as the machine: min / median / max are all kept, and the backends of one case are timed interleaved
(:func:`time_interleaved`: round r calls each backend once, in an order that changes every round so that
each backend follows each other equally often, :func:`round_order`), so load that comes and goes hits
them alike and their ratio is taken round by round. A short call (under
CPU_REWARM_BELOW_MS: an LSTM cell step, ~0.5 ms on 1 MiB of weights) is called once, untimed, right
before each timed sample, and a sample is the mean of a batch of back-to-back calls filling about that
long (at most CPU_MAX_BATCH), so it is timed with its own caches warm, as in a loop: otherwise it is timed
after whichever backend ran just before it, which showed
as a 0.86-0.91x "gap" between pyattn and the very same torch kernel. (Flushing the caches instead
times every short call cold: then the Python around a kernel costs ten times what it costs in a loop.)
A CPU run also keeps glibc's heap (:func:`keep_cpu_heap`): a training step that sets its gradients to
None frees ~2 MB a call, which glibc hands back to the OS and faults in again next call (~470 page
faults, ~1 ms in a VM, on a ~1 ms LSTM cell step), so whichever backend a fault storm hit lost a round:
torch's own step against itself ranged 0.64-1.5x round by round.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

GPU_WARMUP_MS = 25
GPU_REPEAT_MS = 100
CPU_WARMUP_CALLS = 1
CPU_MIN_REPEATS = 5
CPU_MAX_REPEATS = 200  # for calls of microseconds: enough of them to fill CPU_MIN_SECONDS
CPU_MIN_SECONDS = 0.25  # per backend, at least: a sub-millisecond call gets >= 100 paired rounds, not ~15
CPU_MAX_GROUP_SECONDS = 20.0
CPU_ROOFLINE_REPEATS = 20  # one case's interleaved timing stops adding rounds after this long
CPU_REWARM_BELOW_MS = 5.0  # a call shorter than this is called once more, untimed, before each timed batch
CPU_MAX_BATCH = 32  # a short call's sample is the mean of up to this many back-to-back calls
GPU_ROUNDS = 3  # do_bench runs per backend, interleaved across a case's backends
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, for a device whose properties do not report it


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call; ``method`` says how they were taken. ``samples``: one figure per round of
    an interleaved timing (a CPU call; a GPU do_bench median), in round order, for pairing."""

    min_ms: float
    median_ms: float
    max_ms: float
    method: str
    samples: tuple[float, ...] = ()

    def as_dict(self) -> dict:
        return {
            "min": self.min_ms,
            "median": self.median_ms,
            "max": self.max_ms,
            "method": self.method,
            "samples": len(self.samples) or None,
        }


# glibc's mallopt parameters (malloc.h): above the threshold a block is mmap'ed (and unmapped on free);
# the top of the heap is returned to the OS once this much of it is free.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
CPU_HEAP_MMAP_BYTES = 32 * 2**20
CPU_HEAP_TRIM_BYTES = 2**30


def keep_cpu_heap() -> str:
    """Ask glibc to keep freed memory in the process (blocks up to CPU_HEAP_MMAP_BYTES from the heap,
    no trim below CPU_HEAP_TRIM_BYTES free) so CPU timings do not include page faults that depend on
    which call freed last. Applies to every backend of the run alike; returns what was done, for the
    run's environment record (a C library without mallopt is left as it is)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return "unchanged (no glibc mallopt)"
    if not (mallopt(_M_MMAP_THRESHOLD, CPU_HEAP_MMAP_BYTES) and mallopt(_M_TRIM_THRESHOLD, CPU_HEAP_TRIM_BYTES)):
        return "unchanged (mallopt refused)"
    return (f"kept: glibc M_MMAP_THRESHOLD {CPU_HEAP_MMAP_BYTES >> 20} MiB, "
            f"M_TRIM_THRESHOLD {CPU_HEAP_TRIM_BYTES >> 20} MiB")


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.grad = None


def time_gpu(
    fn: Callable[[], object],
    grad_to_none: Sequence[torch.Tensor] = (),
    cuda_graph: bool = False,
    rep_ms: float = GPU_REPEAT_MS,
) -> Timing:
    """CUDA-event timing of ``fn`` over about ``rep_ms`` (see the module docstring)."""
    import triton.testing

    quantiles = [0.0, 0.5, 1.0]
    if cuda_graph:
        low, median, high = triton.testing.do_bench_cudagraph(
            fn, rep=rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=quantiles
        )
        return Timing(low, median, high, "cuda-events, cuda-graph replay")
    low, median, high = triton.testing.do_bench(
        fn, warmup=GPU_WARMUP_MS, rep=rep_ms, grad_to_none=list(grad_to_none) or None, quantiles=quantiles
    )
    return Timing(low, median, high, "cuda-events, L2 flushed per call")


def time_cpu(
    fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (), min_repeats: int = CPU_MIN_REPEATS
) -> Timing:
    """Wall-clock timing of ``fn`` on the CPU: at least ``min_repeats`` calls and CPU_MIN_SECONDS."""
    for _ in range(CPU_WARMUP_CALLS):
        _clear_grads(grad_to_none)
        fn()
    samples: list[float] = []
    while len(samples) < CPU_MAX_REPEATS and (len(samples) < min_repeats or sum(samples) < CPU_MIN_SECONDS):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    milliseconds = [s * 1e3 for s in samples]
    return Timing(min(milliseconds), statistics.median(milliseconds), max(milliseconds), "perf_counter (CPU)")


def time_interleaved(
    calls: Sequence[tuple[Callable[[], object], Sequence[torch.Tensor], bool]], device: torch.device
) -> list[Timing]:
    """Time several calls (``(fn, grad_to_none, cuda_graph)`` each) in alternating rounds.

    CPU: one warm-up call each, then rounds of one call each (the order rotated every round; a call
    shorter than CPU_REWARM_BELOW_MS is called once, untimed, right before each timed call) until every
    call has CPU_MIN_REPEATS samples and CPU_MIN_SECONDS of them, or CPU_MAX_REPEATS rounds, or
    CPU_MAX_GROUP_SECONDS in all. GPU: GPU_ROUNDS rounds of one ``do_bench`` each (of GPU_REPEAT_MS / GPU_ROUNDS);
    min and max over all of a call's samples, median of its round medians.
    """
    if not calls:
        return []
    if device.type == "cuda":
        rep_ms = GPU_REPEAT_MS / GPU_ROUNDS  # the rounds share one call's time budget
        rounds = [
            [time_gpu(fn, grads, graph, rep_ms) for fn, grads, graph in _rotated(calls, r)] for r in range(GPU_ROUNDS)
        ]
        per_call = [[None] * GPU_ROUNDS for _ in calls]
        for r, timings in enumerate(rounds):
            for index, timing in zip(_rotated(range(len(calls)), r), timings):
                per_call[index][r] = timing
        return [
            Timing(
                min(t.min_ms for t in timings),
                statistics.median(t.median_ms for t in timings),
                max(t.max_ms for t in timings),
                timings[0].method + f", median of {GPU_ROUNDS} interleaved rounds",
                tuple(t.median_ms for t in timings),
            )
            for timings in per_call
        ]
    warmup_ms = []
    for fn, grads, _ in calls:
        for _ in range(CPU_WARMUP_CALLS):
            _clear_grads(grads)
            begin = time.perf_counter()
            fn()
            warmup_ms.append((time.perf_counter() - begin) * 1e3)
    samples: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    for r in range(CPU_MAX_REPEATS):
        enough = r >= CPU_MIN_REPEATS and all(sum(s) >= CPU_MIN_SECONDS * 1e3 for s in samples)  # s in ms
        if enough or (r >= CPU_MIN_REPEATS and time.perf_counter() - start > CPU_MAX_GROUP_SECONDS):
            break
        for index in _rotated(range(len(calls)), r):
            fn, grads, _ = calls[index]
            last_ms = samples[index][-1] if samples[index] else warmup_ms[index]
            if last_ms < CPU_REWARM_BELOW_MS:  # its own caches warm, not its predecessor's
                _clear_grads(grads)
                fn()
            # A short call is timed in a batch that fills about CPU_REWARM_BELOW_MS (the sample: the batch's mean),
            # so one preemption or timer tick does not decide a sub-millisecond figure.
            batch = 1 if last_ms >= CPU_REWARM_BELOW_MS else min(CPU_MAX_BATCH, max(1, int(CPU_REWARM_BELOW_MS / max(last_ms, 1e-3))))
            begin = time.perf_counter()
            for _ in range(batch):
                _clear_grads(grads)
                fn()
            samples[index].append((time.perf_counter() - begin) * 1e3 / batch)
    return [
        Timing(min(s), statistics.median(s), max(s), f"perf_counter (CPU), {len(s)} calls interleaved", tuple(s))
        for s in samples
    ]


def round_order(count: int, round_index: int) -> list[int]:
    """The order of ``count`` calls in round ``round_index``: a Williams design, balanced for carryover.

    A call is timed after whatever ran before it (its caches and the heap as that call left them): with the
    order merely rotated every round, each call always follows the same one, so with three backends the
    first was always timed after the third (a cell step after a whole nn.LSTM: 7-9% slower than the very
    same torch kernel timed after the cell). Here every call follows every other equally often over each
    ``count`` rounds (``2 · count`` for an odd count), and each position is held equally often too."""
    first, low, high = [0], 1, count - 1
    while low <= high:  # 0, 1, n-1, 2, n-2, ...: the successive differences take every value once
        first.append(low)
        low += 1
        if low <= high:
            first.append(high)
            high -= 1
    cycle = count if count % 2 == 0 else 2 * count
    row = round_index % cycle
    order = [(index + row) % count for index in first[:count]]
    return order[::-1] if row >= count else order  # odd count: the mirrored square balances the rest


def _rotated(items: Sequence, round_index: int) -> list:
    items = list(items)
    return [items[index] for index in round_order(len(items), round_index)]


def time_call(
    fn: Callable[[], object], device: torch.device, grad_to_none: Sequence[torch.Tensor] = (), cuda_graph: bool = False
) -> Timing:
    if device.type == "cuda":
        return time_gpu(fn, grad_to_none, cuda_graph)
    return time_cpu(fn, grad_to_none)


def peak_memory_bytes(
    fn: Callable[[], object], device: torch.device, grad_to_none: Sequence[torch.Tensor] = ()
) -> int | None:
    """Peak bytes ``fn`` allocates above what was allocated before it (None on a CPU: not measured)."""
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def l2_cache_bytes(device: torch.device) -> int:
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES


def rotation_copies(bytes_per_call: int, device: torch.device) -> int:
    """How many input copies a CUDA-graph loop must cycle through so no call finds its inputs in L2."""
    if device.type != "cuda":
        return 1
    return min(64, max(1, math.ceil(2 * l2_cache_bytes(device) / max(bytes_per_call, 1))))


def _cpu_matmuls(a: torch.Tensor, b: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The CPU's fp32 matmul paths: torch.mm (MKL or OpenBLAS) and oneDNN's, which torch's own CPU
    kernels (nn.LSTM, linear layers under mkldnn) use. On AMD CPUs MKL takes a slow path: oneDNN has
    run twice as fast, so a ceiling from torch.mm alone put nn.LSTM at 200% of it."""
    paths: dict[str, Callable[[], object]] = {"torch.mm": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        try:
            with warnings.catch_warnings():  # torch.utils.mkldnn still uses torch.jit.script_method
                warnings.simplefilter("ignore", FutureWarning)
                from torch.utils import mkldnn as mkldnn_utils

                linear = torch.nn.Linear(b.shape[0], b.shape[1], bias=False)
                with torch.no_grad():
                    linear.weight.copy_(b.t())
                module, x = mkldnn_utils.to_mkldnn(linear), a.to_mkldnn()
                with torch.no_grad():
                    module(x)
            paths["oneDNN linear"] = lambda: module(x)
        except Exception:  # noqa: BLE001  (oneDNN absent or refusing: torch.mm is the ceiling)
            pass
    return paths


def measure_roofline(device: torch.device) -> dict:
    """The device's limits, measured once: a large matmul (TFLOP/s) and a device-to-device copy (GB/s).

    GPU: bf16 8192² matmul and a 1 GiB copy. CPU: fp32 1024² matmul, the faster of torch.mm and oneDNN
    (:func:`_cpu_matmuls`), and a 64 MiB copy. A limit is the best the device did, so each takes its
    fastest call. A copy moves its bytes twice (read + write), which is what GB/s counts elsewhere too.
    """
    if device.type == "cuda":
        size, dtype, copy_bytes = 8192, torch.bfloat16, 2**30
    else:
        size, dtype, copy_bytes = 1024, torch.float32, 64 * 2**20
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    paths = _cpu_matmuls(a, b) if device.type == "cpu" else {"torch.mm": lambda: torch.mm(a, b)}
    # A ceiling is the best call, so a CPU (whose calls the machine's load slows) samples more of them.
    with torch.no_grad():
        if device.type == "cpu":
            timings = {name: time_cpu(fn, min_repeats=CPU_ROOFLINE_REPEATS) for name, fn in paths.items()}
        else:
            timings = {name: time_call(fn, device) for name, fn in paths.items()}
    tflops = {name: 2.0 * size**3 / (timing.min_ms * 1e-3) / 1e12 for name, timing in timings.items()}
    fastest = max(tflops, key=tflops.get)
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    if device.type == "cpu":
        copy = time_cpu(lambda: target.copy_(source), min_repeats=CPU_ROOFLINE_REPEATS)
    else:
        copy = time_call(lambda: target.copy_(source), device)
    dtype_name = str(dtype).removeprefix("torch.")
    others = ", ".join(f"{name} {value:.3g}" for name, value in tflops.items() if name != fastest)
    roofline = {
        "matmul_tflops": tflops[fastest],
        "matmul": f"{dtype_name} {size}x{size}x{size} {fastest}" + (f"; {others} TFLOP/s" if others else ""),
        "matmul_paths_tflops": tflops,
        "copy_gbps": 2.0 * copy_bytes / (copy.min_ms * 1e-3) / 1e9,
        "copy": f"{copy_bytes / 2**20:.0f} MiB device-to-device copy (read + write counted)",
        "method": timings[fastest].method + ", fastest call",
    }
    if device.type == "cpu":
        threads = torch.get_num_threads()
        roofline["label"] = f"CPU, {threads} torch thread{'s' if threads != 1 else ''}: fp32, not a GPU's limits"
    return roofline


def attainable_fraction(
    flops: float | None, bytes_moved: float | None, seconds: float, roofline: dict | None
) -> float | None:
    """Achieved / attainable, where attainable = min(peak FLOP/s, intensity × peak bandwidth)."""
    if roofline is None or not flops or seconds <= 0:
        return None
    peak = roofline["matmul_tflops"] * 1e12
    if bytes_moved:
        peak = min(peak, flops / bytes_moved * roofline["copy_gbps"] * 1e9)
    return flops / seconds / peak
