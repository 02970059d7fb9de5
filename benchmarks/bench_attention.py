"""Attention: pyattn's backends (auto and each forced one) against torch's SDPA, as a user calls it and
under each of its kernels, bf16, forward and forward+backward, over the CLI's default shapes
(``pytest benchmarks/bench_attention.py --benchmark-only``)."""

import pytest
import torch

from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD
from pyattn.bench.registry import get_suite
from pyattn.bench.session import pyattn_rows

SUITE = get_suite("attention")
CASES = SUITE.cases("default", [torch.bfloat16], [FORWARD, FORWARD_BACKWARD])
# FlexAttention compiles per shape (minutes over this grid): the CLI runs it with --shapes full.
BACKENDS = pyattn_rows() + [f"torch:{name}" for name in SUITE.all_baselines if name not in SUITE.opt_in]


# ``backend`` varies fastest, so each case's inputs and reference are made once.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.shape}-{case.mode}".replace(" ", "-"))
def test_attention(run_benchmark, case, backend):
    run_benchmark(case, backend)
