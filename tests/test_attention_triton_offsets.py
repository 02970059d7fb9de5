"""Offsets inside one (batch, head) slice past 2³¹ elements: a mask plane of 46k × 46k, K/V rows of seqlen · H · D.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -m interpreter tests/test_attention_triton_offsets.py``.
On CPU the kernels run through views whose row (or column) stride puts their last rows past 2³¹ elements of
one lazily allocated storage: ``torch.empty`` reserves the address range and only the pages the view touches
are ever committed, so a few MB of memory hold a "46k-row" plane. With int32 offsets those rows would wrap
to addresses before the tensor and the results would differ from the reference (or the process would fault).
The GPU tests at the end allocate real > 2³¹-element planes.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import INTERPRET, RTOL, random_tensor

pytest.importorskip("triton", reason="triton is not installed")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from pyattn.kernels import attention as kernels  # noqa: E402
from pyattn.kernels.attention.common import element_offsets  # noqa: E402
from tests.test_attention_kernels import check_against_reference, make_inputs  # noqa: E402

INT32_LIMIT = 2**31


@triton.jit
def _element_offsets_kernel(Out, first_row, stride_rows, first_col, stride_cols, BLOCK: tl.constexpr):
    rows = first_row + tl.arange(0, BLOCK)
    cols = first_col + tl.arange(0, BLOCK)
    local = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(Out + local, element_offsets(rows[:, None], stride_rows, cols[None, :], stride_cols))


@pytest.mark.interpreter
@pytest.mark.parametrize("first_row, stride_rows, first_col, stride_cols", [
    (46_330, 46_341, 46_325, 1),  # the last rows of a 46341 × 46341 mask plane: row · S passes 2³¹
    (46_325, 1, 46_330, 46_341),  # the same plane transposed (a mask.mT view): col · L passes 2³¹
    (1_048_570, 2048, 0, 1),  # bshd rows: the last of 1M + 16 tokens × H · D = 16 · 128
    (0, 1, 250, 2**23 + 2**16),  # a head-dim stride that makes even d · stride_d pass 2³¹
], ids=["mask-rows", "mask-cols", "bshd-rows", "feature-stride"])
def test_element_offsets_are_exact_past_2_31(first_row, stride_rows, first_col, stride_cols):
    block = 16
    out = torch.empty(block, block, dtype=torch.int64)
    _element_offsets_kernel[(1,)](out, first_row, stride_rows, first_col, stride_cols, BLOCK=block)
    expected = torch.tensor([[(first_row + i) * stride_rows + (first_col + j) * stride_cols for j in range(block)]
                             for i in range(block)], dtype=torch.int64)
    assert expected.max() >= INT32_LIMIT  # the case is one where int32 would wrap
    assert torch.equal(out, expected)


def _view_past_2_31(rows, cols, row_stride, col_stride, dtype, storage_offset=0):
    """A (rows, cols) view of a lazily allocated storage whose last element sits past 2³¹ elements."""
    extent = storage_offset + (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    assert extent > INT32_LIMIT
    return torch.empty(extent, dtype=dtype).as_strided((rows, cols), (row_stride, col_stride), storage_offset)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_mask_plane_read_past_2_31_elements(layout):
    seqlen_q, seqlen_k = 40, 47
    # Rows (keys) 2²⁶ + 1 elements apart: from row 32 (column 32) on, the offset passes 2³¹.
    wide = 2**26 + 1
    row_stride, col_stride = (wide, 1) if layout == "rows" else (1, wide)
    plane = _view_past_2_31(seqlen_q, seqlen_k, row_stride, col_stride, torch.bool)
    pattern = torch.rand(seqlen_q, seqlen_k) > 0.3
    pattern[:, 0] = True  # every row sees a key
    plane.copy_(pattern)  # writes only the view's elements: a few pages of the storage
    q, k, v = make_inputs(1, 2, 1, seqlen_q, seqlen_k, 16, 16, torch.float32)
    mask = plane.expand(1, 2, seqlen_q, seqlen_k)  # the launcher passes its strides: (0, 0, row, column)
    for deterministic in (False, True):
        check_against_reference(q, k, v, scale=0.25, mask=mask, deterministic=deterministic)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_key_value_rows_past_2_31_elements(dtype):
    # K and V rows 2²⁵ + 1 elements apart (odd: no divisibility hint), as bshd rows of a huge H · D would be;
    # rows 64.. pass 2³¹. K and V share one storage: V's features sit just after K's in each row.
    seqlen_k, head_dim, row_stride = 72, 16, 2**25 + 1
    storage = torch.empty(2 * head_dim + (seqlen_k - 1) * row_stride, dtype=dtype)
    assert storage.numel() > INT32_LIMIT
    k = storage.as_strided((1, 1, seqlen_k, head_dim), (0, 0, row_stride, 1), 0)
    v = storage.as_strided((1, 1, seqlen_k, head_dim), (0, 0, row_stride, 1), head_dim)
    k.copy_(random_tensor(1, 1, seqlen_k, head_dim, dtype=dtype))
    v.copy_(random_tensor(1, 1, seqlen_k, head_dim, dtype=dtype))
    q = random_tensor(1, 2, 33, head_dim, dtype=dtype)
    for deterministic in (False, True):
        check_against_reference(q, k, v, scale=0.25, window_left=50, deterministic=deterministic)


# ----------------------------------------------------------------------------- on a GPU, real planes


@pytest.mark.requires_cuda
@pytest.mark.skipif(INTERPRET, reason="GPU test: run it in the plain process, without TRITON_INTERPRET")
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_gpu_mask_plane_past_2_31_elements(kind):
    """A 48000 × 48000 mask (2.3·10⁹ elements, rows ≥ 44740 past 2³¹): the last 128 query rows against the
    float64 reference on those rows. dO is zero elsewhere, so dK and dV are those rows' alone."""
    seqlen, rows, device = 48_000, 128, "cuda"
    torch.manual_seed(0)
    q, k, v = (random_tensor(1, 1, seqlen, 64, dtype=torch.float16, device=device) for _ in range(3))
    mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    mask[-rows:] = torch.rand(rows, seqlen, device=device) > 0.3
    if kind == "additive":
        mask = torch.where(mask, 0.0, float("-inf")).to(torch.float16)
    assert mask.numel() > INT32_LIMIT
    mask = mask.view(1, 1, seqlen, seqlen)
    out, lse = kernels.attention_forward(q, k, v, scale=0.125, mask=mask)
    grad_out = torch.zeros_like(out)
    grad_out[..., -rows:, :] = random_tensor(1, 1, rows, 64, dtype=torch.float16, device=device)
    dq, dk, dv = kernels.attention_backward(grad_out, q, k, v, out, lse, scale=0.125, mask=mask, deterministic=True)

    from pyattn.reference.attention import attention as reference_attention

    leaves = [x.double().requires_grad_() for x in (q[..., -rows:, :], k, v)]
    ref_out, _ = reference_attention(*leaves, scale=0.125, mask=mask[..., -rows:, :].double()
                                     if kind == "additive" else mask[..., -rows:, :])
    ref_out.backward(grad_out[..., -rows:, :].double())
    rtol = RTOL[torch.float16]
    for name, ours, ref in (("out", out[..., -rows:, :], ref_out), ("dq", dq[..., -rows:, :], leaves[0].grad),
                            ("dk", dk, leaves[1].grad), ("dv", dv, leaves[2].grad)):
        error = ((ours.double() - ref).norm() / ref.norm()).item()
        assert error <= rtol, f"{name}: relative error {error:.2e} > {rtol}"


@pytest.mark.requires_cuda
@pytest.mark.skipif(INTERPRET, reason="GPU test: run it in the plain process, without TRITON_INTERPRET")
def test_gpu_keep_mask_plane_past_2_31_elements():
    """The dropout keep mask of a 48000 × 48000 plane (2.3·10⁹ elements): its last rows, past 2³¹, hold the
    documented bits."""
    from tests.test_attention_triton_dropout import documented_keep

    seqlen = 48_000
    keep = kernels.attention_dropout_keep_mask(1, 2, seqlen, seqlen, dropout_p=0.2, seed=99, device="cuda")
    corner = keep[0, :, -16:, -24:].cpu()
    assert torch.equal(corner, documented_keep(range(2), range(seqlen - 16, seqlen), range(seqlen - 24, seqlen),
                                               dropout_p=0.2, seed=99))
