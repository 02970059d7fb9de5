"""Decode: pyattn.flash_attention_with_kvcache per backend (auto and each forced one) against torch's SDPA over the
same KV cache (a paged cache gathered), bf16, one decode step, over the CLI's default shapes
(``pytest benchmarks/bench_decode.py --benchmark-only``)."""

import pytest
import torch

from pyattn.bench.flops import FORWARD
from pyattn.bench.registry import get_suite
from pyattn.bench.session import pyattn_rows

SUITE = get_suite("decode")
CASES = SUITE.cases("default", [torch.bfloat16], [FORWARD])
# FlexAttention compiles per shape: the CLI runs it with --shapes full or --baselines ...,flex.
BACKENDS = pyattn_rows() + [f"torch:{name}" for name in SUITE.all_baselines if name not in SUITE.opt_in]


# ``backend`` varies fastest, so each case's cache and reference are made once.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.shape.replace(" ", "-"))
def test_decode(run_benchmark, case, backend):
    run_benchmark(case, backend)
