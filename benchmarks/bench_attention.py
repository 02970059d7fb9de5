"""Attention: pyattn's backends against torch's SDPA kernels, bf16, forward and forward+backward,
over the CLI's default shapes (``pytest benchmarks/bench_attention.py --benchmark-only``)."""

import pytest
import torch

from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD
from pyattn.bench.suites import PYATTN_BACKENDS, SDPA_BASELINES, attention_cases

CASES = attention_cases("default", [torch.bfloat16], [FORWARD, FORWARD_BACKWARD])
# FlexAttention compiles per shape (minutes over this grid): the CLI runs it with --shapes full.
BACKENDS = [f"pyattn:{name}" for name in PYATTN_BACKENDS] + [f"torch:{name}" for name in SDPA_BASELINES]


# ``backend`` varies fastest, so each case's inputs and reference are made once.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.shape}-{case.mode}".replace(" ", "-"))
def test_attention(run_benchmark, case, backend):
    run_benchmark(case, backend)
