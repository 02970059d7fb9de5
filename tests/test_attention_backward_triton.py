"""The ``attention_backward`` op on the triton backend (``pyattn::triton_attention_bwd``) vs the reference.

The inputs (out, lse) come from the reference forward in float64, so both backends differentiate
the same statistics; the Triton kernels get them in the test's dtype. Marked ``interpreter`` for
CPU (TRITON_INTERPRET=1, its own pytest process; the interpreter's fp32 dot gets ``RTOL_TF32``)
and ``requires_cuda`` on a GPU.
"""

from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn.functional.attention_backward import flash_attention_backward
from tests.conftest import RTOL, RTOL_TF32, assert_close, random_tensor

DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, marks=pytest.mark.interpreter, id="cpu-fp32"),
    *(pytest.param("cuda", dtype, marks=pytest.mark.requires_cuda, id=f"cuda-{name}")
      for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))),
]
TOLERANCE = {**RTOL, torch.float32: RTOL_TF32}

# name -> (seqlen_q, seqlen_k, heads_q, heads_k, head_dim, options): small, with ragged edges.
CASES = {
    "plain": (17, 17, 2, 2, 16, {}),
    "causal L<S": (9, 21, 2, 2, 16, {"causal": True}),
    "causal L>S (empty rows)": (21, 9, 2, 2, 16, {"causal": True}),
    "window (5, 3) + softcap": (19, 19, 2, 2, 16, {"window": (5, 3), "softcap": 2.0}),
    "gqa 4:2, causal window": (16, 16, 4, 2, 32, {"causal": True, "window": (6, -1)}),
}


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(case, device, dtype):
    seqlen_q, seqlen_k, heads_q, heads_k, head_dim, options = CASES[case]
    q = random_tensor(2, heads_q, seqlen_q, head_dim, dtype=torch.float64)
    k = random_tensor(2, heads_k, seqlen_k, head_dim, dtype=torch.float64)
    v = random_tensor(2, heads_k, seqlen_k, head_dim, dtype=torch.float64)
    with pyattn.use_backend("reference"):
        out, lse = pyattn.flash_attention(q, k, v, return_lse=True, **options, layout="bhsd")
        grad_out = random_tensor(*out.shape, dtype=torch.float64)
        expected = flash_attention_backward(grad_out, q, k, v, out, lse, **options, layout="bhsd")
    with pyattn.use_backend("triton"):
        got = flash_attention_backward(*(x.to(device, dtype) for x in (grad_out, q, k, v, out)),
                                       lse.to(device, torch.float32), **options, layout="bhsd")
    for name, grad, reference in zip(("dq", "dk", "dv"), got, expected):
        assert grad.dtype == dtype and grad.device.type == device
        assert_close(grad.cpu(), reference, TOLERANCE[dtype], name=f"{case}: {name}")


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_bshd_layout(device, dtype):
    q, k, v = (random_tensor(1, 12, 2, 16, dtype=torch.float64) for _ in range(3))  # (B, L, H, D)
    with pyattn.use_backend("reference"):
        out, lse = pyattn.flash_attention(q, k, v, return_lse=True, causal=True, layout="bshd")
        grad_out = random_tensor(*out.shape, dtype=torch.float64)
        expected = flash_attention_backward(grad_out, q, k, v, out, lse, causal=True, layout="bshd")
    with pyattn.use_backend("triton"):
        got = flash_attention_backward(*(x.to(device, dtype) for x in (grad_out, q, k, v, out)),
                                       lse.to(device, torch.float32), causal=True, layout="bshd")
    for name, grad, reference in zip(("dq", "dk", "dv"), got, expected):
        assert_close(grad.cpu(), reference, TOLERANCE[dtype], name=f"bshd: {name}")
