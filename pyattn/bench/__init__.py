"""Benchmarks of pyattn against PyTorch's own kernels: the ``pyattn-bench`` CLI and the functions it
and ``benchmarks/bench_*.py`` (pytest-benchmark) share.

    from pyattn.bench import case_data, prepare, evaluate, run_case
    from pyattn.bench.suites import attention_cases, lstm_cases
    from pyattn.bench.flops import attention_flops, lstm_flops, lstm_cell_bytes

See docs/benchmarking.md for the method (timing, FLOP counts, roofline, checks).
"""

from pyattn.bench.runner import Result, case_data, evaluate, fill_speedups, prepare, run_case
from pyattn.bench.workload import Unsupported, Workload

__all__ = ["Result", "Unsupported", "Workload", "case_data", "evaluate", "fill_speedups", "prepare", "run_case"]
