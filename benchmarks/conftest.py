"""pytest-benchmark microbenchmarks of pyattn against PyTorch: ``pytest benchmarks/ --benchmark-only``.

Each test times one backend on one case with the functions the CLI uses (pyattn.bench): the check
against float64 and the CUDA-event figures (``evaluate``) go into the benchmark's ``extra_info``,
and pytest-benchmark times the same prepared call, synchronised, for its own table. Without a GPU
every test skips with the reason.
"""

from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn.bench import Unsupported, case_data, evaluate, prepare
from pyattn.bench.measure import measure_roofline

REASON_NO_GPU = (
    "pyattn's benchmarks time GPU kernels; torch sees no CUDA device (CPU figures: pyattn-bench --shapes small)"
)
FIGURES = ("time_ms", "tflops", "tokens_per_s", "gbps", "peak_memory_bytes", "roofline_fraction", "check")
PEDANTIC_SECONDS = 0.2  # pytest-benchmark's own timing of one test, on top of the CUDA-event figures


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pyproject's pytest settings look for ``test_*.py`` under tests/)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip(REASON_NO_GPU)
    return torch.device("cuda")


@pytest.fixture(scope="session")
def roofline(device) -> dict:
    return measure_roofline(device)


_last_case_data: dict = {}  # one case's inputs and reference, reused while its backends run in turn


def _shared_case_data(case, device):
    if case not in _last_case_data:
        _last_case_data.clear()
        torch.cuda.empty_cache()
        _last_case_data[case] = case_data(case, device)
    return _last_case_data[case]


@pytest.fixture
def run_benchmark(benchmark, device, roofline):
    """``run_benchmark(case, backend)``: check, measure, record, and assert the check passed."""

    def run(case, backend):
        try:
            workload = prepare(case, backend, _shared_case_data(case, device))
        except (Unsupported, pyattn.BackendUnavailableError) as reason:
            pytest.skip(f"{backend}: {reason}")
        result = evaluate(workload, check=True, roofline=roofline)
        benchmark.group = f"{case.op} {case.shape} {case.mode}"
        benchmark.extra_info.update({name: getattr(result, name) for name in FIGURES})
        rounds = max(5, min(200, int(PEDANTIC_SECONDS / (result.median_ms * 1e-3))))
        benchmark.pedantic(workload.synchronized_call, rounds=rounds, warmup_rounds=2)
        assert result.check["passed"], f"{backend} on {case.shape}: {result.check}"
        return result

    return run
