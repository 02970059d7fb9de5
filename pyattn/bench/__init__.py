"""Benchmarks of pyattn against PyTorch's own kernels: the ``pyattn-bench`` CLI and the functions it
and ``benchmarks/bench_*.py`` (pytest-benchmark) share.

    from pyattn.bench import case_data, prepare, evaluate, run_case, run_group
    from pyattn.bench.registry import get_suite, register_suite, Suite
    cases = get_suite("attention").cases("default", [torch.bfloat16], ["forward"])

Each op registers its suite in :mod:`pyattn.bench.registry`; see docs/benchmarking.md for the method
(timing, FLOP counts, roofline, checks, the drop-in ratio).
"""

from pyattn.bench.runner import Result, case_data, evaluate, fill_speedups, prepare, run_case, run_group
from pyattn.bench.workload import Unsupported, Workload

__all__ = [
    "Result",
    "Unsupported",
    "Workload",
    "case_data",
    "evaluate",
    "fill_speedups",
    "prepare",
    "run_case",
    "run_group",
]
