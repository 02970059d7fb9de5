"""The ``attention_backward`` op on the reference backend: FlashAttention-2's formulas from the given out and lse.

Checked against autograd of the reference forward in float64 (the op must be the forward's exact
gradient), for the block split ring attention relies on (each key block's share, computed with the
rows' final statistics, sums to the whole), for the argument checks, and for what dispatch picks.
"""

from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn._dispatch import explain_request
from pyattn.functional.attention_backward import REQUEST_BUILDERS, flash_attention_backward
from tests.conftest import RTOL, assert_close, random_tensor

# name -> (seqlen_q, seqlen_k, heads_q, heads_k, head_dim, head_dim_v, options)
CASES = {
    "plain": (17, 17, 2, 2, 8, 8, {}),
    "causal L<S": (9, 14, 2, 2, 8, 8, {"causal": True}),
    "causal L>S (empty rows)": (14, 9, 2, 2, 8, 8, {"causal": True}),
    "window (3, 2)": (16, 16, 2, 2, 8, 8, {"window": (3, 2)}),
    "causal + window left 4": (15, 15, 2, 2, 8, 8, {"causal": True, "window": (4, -1)}),
    "softcap": (11, 13, 2, 2, 8, 8, {"softcap": 1.5}),
    "gqa 4:1, Dv != D": (12, 10, 4, 1, 8, 5, {"causal": True}),
    "odd: D 7, window (0, 1)": (13, 13, 3, 3, 7, 7, {"window": (0, 1)}),
}


def _inputs(seqlen_q, seqlen_k, heads_q, heads_k, head_dim, head_dim_v, dtype=torch.float64):
    return (random_tensor(2, heads_q, seqlen_q, head_dim, dtype=dtype, requires_grad=True),
            random_tensor(2, heads_k, seqlen_k, head_dim, dtype=dtype, requires_grad=True),
            random_tensor(2, heads_k, seqlen_k, head_dim_v, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_autograd_of_the_forward(case, layout):
    *sizes, options = CASES[case]
    q, k, v = _inputs(*sizes)
    if layout == "bshd":
        q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    with pyattn.use_backend("reference"):
        out, lse = pyattn.flash_attention(q, k, v, return_lse=True, layout=layout, **options)
        grad_out = random_tensor(*out.shape, dtype=torch.float64)
        expected = torch.autograd.grad(out, (q, k, v), grad_out)
        got = flash_attention_backward(grad_out, q, k, v, out.detach(), lse, layout=layout, **options)
    for name, grad, reference in zip(("dq", "dk", "dv"), got, expected):
        assert_close(grad, reference, RTOL[torch.float64], name=f"{case} {layout}: {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lower_precision_against_float64(dtype):
    q, k, v = _inputs(16, 16, 4, 2, 8, 8)
    with pyattn.use_backend("reference"):
        out, lse = pyattn.flash_attention(q, k, v, return_lse=True, causal=True, layout="bhsd")
        grad_out = random_tensor(*out.shape, dtype=torch.float64)
        expected = flash_attention_backward(grad_out, q, k, v, out.detach(), lse, causal=True, layout="bhsd")
        got = flash_attention_backward(*(x.detach().to(dtype) for x in (grad_out, q, k, v, out)), lse.float(),
                                       causal=True, layout="bhsd")
    for name, grad, reference in zip(("dq", "dk", "dv"), got, expected):
        assert grad.dtype == dtype
        assert_close(grad, reference, RTOL[dtype], name=name)


def test_key_blocks_with_final_statistics_sum_to_the_whole():
    """Ring attention's premise: the backward of each key block, given the rows' final out and lse, is
    that block's share: dq sums over blocks, dk/dv of each block are the whole's rows for those keys."""
    q, k, v = _inputs(12, 18, 4, 2, 8, 8)
    with pyattn.use_backend("reference"):
        out, lse = pyattn.flash_attention(q, k, v, return_lse=True, softcap=2.0, layout="bhsd")
        grad_out = random_tensor(*out.shape, dtype=torch.float64)
        whole = torch.autograd.grad(out, (q, k, v), grad_out)
        shares = [flash_attention_backward(grad_out, q, k[:, :, keys], v[:, :, keys], out.detach(), lse, softcap=2.0, layout="bhsd")
                  for keys in (slice(0, 7), slice(7, 18))]
    tolerance = RTOL[torch.float64]
    assert_close(shares[0][0] + shares[1][0], whole[0], tolerance, name="dq (sum of shares)")
    assert_close(torch.cat([shares[0][1], shares[1][1]], dim=2), whole[1], tolerance, name="dk")
    assert_close(torch.cat([shares[0][2], shares[1][2]], dim=2), whole[2], tolerance, name="dv")


def test_arguments_are_named_in_errors():
    q, k, v = (x.detach() for x in _inputs(8, 8, 2, 2, 4, 4, dtype=torch.float32))
    out, grad_out, lse = torch.randn_like(q), torch.randn_like(q), torch.zeros(2, 2, 8)
    with pytest.raises(TypeError, match="lse must be float32"):
        flash_attention_backward(grad_out, q, k, v, out, lse.double(), layout="bhsd")
    with pytest.raises(ValueError, match=r"lse must have shape \(batch, nheads, seqlen_q\)"):
        flash_attention_backward(grad_out, q, k, v, out, lse[:, :, :4], layout="bhsd")
    with pytest.raises(ValueError, match="out must have the forward output's shape"):
        flash_attention_backward(grad_out, q, k, v, out[:, :, :4], lse, layout="bhsd")
    with pytest.raises(TypeError, match="grad_out has dtype"):
        flash_attention_backward(grad_out.double(), q, k, v, out, lse, layout="bhsd")
    with pytest.raises(ValueError, match="layout must be one of"):
        flash_attention_backward(grad_out, q, k, v, out, lse, layout="sbhd")
    with pytest.raises(ValueError, match="window must be a pair"):
        flash_attention_backward(grad_out, q, k, v, out, lse, window=(-2, 0), layout="bhsd")


def test_dispatch_serves_it_on_the_reference_without_the_interpreter():
    q, k, v = (torch.empty(1, 2, 8, 16, device="meta") for _ in range(3))
    lse = torch.empty(1, 2, 8, device="meta")
    request = REQUEST_BUILDERS["flash_attention_backward"](q, q, k, v, q, lse, causal=True, layout="bhsd")
    assert request.op == "attention_backward" and "causal" in request.features
    text = explain_request(request)
    assert "auto picks: reference" in text
    assert "triton" in text and "torch" in text  # every backend's verdict, with reasons
