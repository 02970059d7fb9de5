"""LSTM: pyattn's backends against nn.LSTM (cuDNN) and nn.LSTMCell, bf16, sequences and cell steps,
forward and forward+backward, over the CLI's default shapes
(``pytest benchmarks/bench_lstm.py --benchmark-only``)."""

import pytest
import torch

from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD
from pyattn.bench.suites import PYATTN_BACKENDS, baselines_for, lstm_cases

CASES = lstm_cases("default", [torch.bfloat16], [FORWARD, FORWARD_BACKWARD])
RUNS = [
    (case, backend)
    for case in CASES
    for backend in [f"pyattn:{name}" for name in PYATTN_BACKENDS] + [f"torch:{name}" for name in baselines_for(case)]
]


IDS = [f"{case.op}-{case.shape}-{case.mode}-{backend}".replace(" ", "-") for case, backend in RUNS]


@pytest.mark.parametrize("case, backend", RUNS, ids=IDS)
def test_lstm(run_benchmark, case, backend):
    run_benchmark(case, backend)
