"""MultiheadAttention: pyattn.nn.MultiheadAttention per backend (auto and each forced one) against
torch.nn.MultiheadAttention with the same weights, need_weights True and False, bf16, forward and
forward+backward, over the CLI's default shapes (``pytest benchmarks/bench_mha.py --benchmark-only``)."""

import pytest
import torch

from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD
from pyattn.bench.registry import get_suite
from pyattn.bench.session import pyattn_rows

SUITE = get_suite("mha")
CASES = SUITE.cases("default", [torch.bfloat16], [FORWARD, FORWARD_BACKWARD])
BACKENDS = pyattn_rows() + [f"torch:{name}" for name in SUITE.all_baselines]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.shape}-{case.mode}".replace(" ", "-"))
def test_mha(run_benchmark, case, backend):
    run_benchmark(case, backend)
