"""LSTM: pyattn's backends (auto and each forced one) against nn.LSTM (cuDNN) and nn.LSTMCell, bf16,
sequences and cell steps, forward and forward+backward, over the CLI's default shapes
(``pytest benchmarks/bench_lstm.py --benchmark-only``)."""

import pytest
import torch

from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD
from pyattn.bench.registry import get_suite
from pyattn.bench.session import pyattn_rows

SUITE = get_suite("lstm")
ROWS = pyattn_rows()
CASES = SUITE.cases("default", [torch.bfloat16], [FORWARD, FORWARD_BACKWARD])
RUNS = [
    (case, backend)
    for case in CASES
    for backend in ROWS + [f"torch:{name}" for name in SUITE.baselines(case)]
]
IDS = [f"{case.op}-{case.shape}-{case.mode}-{backend}".replace(" ", "-") for case, backend in RUNS]


@pytest.mark.parametrize("case, backend", RUNS, ids=IDS)
def test_lstm(run_benchmark, case, backend):
    run_benchmark(case, backend)
