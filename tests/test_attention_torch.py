"""Attention on the torch backend (PyTorch's own SDPA) against the float64 reference, and what it refuses.

The torch backend is what `auto` runs where no pyattn kernel serves (a CPU): it must give pyattn's
semantics exactly (masks, windows as masks, GQA, 0 for a query that sees no key) or refuse the call
with the reason, so that dispatch hands it to the reference.
"""

from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn import _dispatch
from pyattn.functional import attention_with_weights, flash_attention, scaled_dot_product_attention
from pyattn.ops.attention_torch import WINDOW_MASK_LIMIT
from tests.conftest import RTOL, assert_close, random_tensor

F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64, torch.bfloat16]


def _qkv(batch=2, heads_q=4, heads_k=4, seqlen_q=9, seqlen_k=13, head_dim=16, dtype=F32, requires_grad=False):
    make = lambda heads, length: random_tensor(batch, heads, length, head_dim, dtype=dtype,  # noqa: E731
                                               requires_grad=requires_grad)
    return make(heads_q, seqlen_q), make(heads_k, seqlen_k), make(heads_k, seqlen_k)


def _both(fn, *tensors):
    """fn on the torch backend, and on the reference in float64."""
    with pyattn.use_backend("torch"):
        ours = fn(*tensors)
    with pyattn.use_backend("reference"):
        reference = fn(*(t.detach().double().requires_grad_(t.requires_grad) for t in tensors))
    return ours, reference


def _rtol(dtype):
    return {F32: 1e-5, F64: 1e-12}.get(dtype, RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "causal", "bool-mask", "float-mask", "gqa"])
def test_sdpa_on_torch_equals_reference(case, dtype):
    heads_k = 2 if case == "gqa" else 4
    q, k, v = _qkv(heads_k=heads_k, seqlen_q=13, dtype=dtype)
    options = {}
    if case == "causal":
        options["is_causal"] = True
    elif case == "bool-mask":
        mask = torch.rand(2, 1, 13, 13) > 0.3
        mask[0, 0, 3] = False  # a query that sees no key: 0 on both
        options["attn_mask"] = mask
    elif case == "gqa":
        options["enable_gqa"] = True
    if case == "float-mask":  # the mask is in q's dtype: it travels with the tensors
        mask = random_tensor(13, 13, dtype=dtype)
        ours, reference = _both(lambda q, k, v, m: scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)
    else:
        ours, reference = _both(lambda q, k, v: scaled_dot_product_attention(q, k, v, **options), q, k, v)
    assert_close(ours, reference, _rtol(dtype))
    if case == "bool-mask":
        assert (ours[0, :, 3] == 0).all()


@pytest.mark.parametrize("case", ["causal-bottom-right", "window", "window-causal", "gqa-window"])
def test_flash_attention_windows_become_masks_on_torch(case):
    heads_k = 2 if case.startswith("gqa") else 4
    q, k, v = _qkv(heads_k=heads_k, seqlen_q=7, seqlen_k=12)
    options = {"causal-bottom-right": dict(causal=True), "window": dict(window=(3, 2)),
               "window-causal": dict(window=(4, -1), causal=True), "gqa-window": dict(window=(2, 2))}[case]
    ours, reference = _both(lambda q, k, v: flash_attention(q, k, v, **options, layout="bhsd"), q, k, v)
    assert_close(ours, reference, 1e-5)


def test_gradients_on_torch_equal_reference():
    q, k, v = _qkv(requires_grad=True, seqlen_q=13, seqlen_k=13)
    mask = random_tensor(13, 13, requires_grad=True)
    ours, reference = _both(lambda q, k, v, m: scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)
    upstream = random_tensor(*ours.shape)
    grads = torch.autograd.grad(ours, (q, k, v, mask), upstream)
    del reference
    q64, k64, v64, m64 = (t.detach().double().requires_grad_() for t in (q, k, v, mask))
    with pyattn.use_backend("reference"):
        out64 = scaled_dot_product_attention(q64, k64, v64, attn_mask=m64)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64, m64), upstream.double())
    for name, got, want in zip(("dq", "dk", "dv", "dmask"), grads, grads64):
        assert_close(got, want, 1e-5, name)


def _forced_reasons(fn, *args, **kwargs) -> str:
    with pyattn.use_backend("torch"), pytest.raises(pyattn.BackendUnavailableError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_torch_refuses_what_it_cannot_compute_exactly_and_auto_falls_to_the_reference():
    q, k, v = _qkv()
    assert "softcap" in _forced_reasons(flash_attention, q, k, v, softcap=5.0, layout="bhsd")
    assert "alibi" in _forced_reasons(flash_attention, q, k, v, alibi_slopes=torch.rand(4), layout="bhsd")
    assert "lse" in _forced_reasons(flash_attention, q, k, v, return_lse=True, layout="bhsd")
    packed = torch.randn(10, 4, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    reasons = _forced_reasons(pyattn.flash_attention_varlen, packed, packed, packed, cu, cu, 6, 6)
    assert "has no implementation of attention_varlen" in reasons
    request = pyattn.functional.REQUEST_BUILDERS["flash_attention"](q, k, v, softcap=5.0, layout="bhsd")
    assert _dispatch.choose(request).qualified_name == "reference"


def test_a_window_too_large_for_a_mask_is_refused():
    side = int(WINDOW_MASK_LIMIT**0.5) + 1
    q = torch.empty(1, 1, side, 16, device="meta")
    text = pyattn.explain("flash_attention", q, q, q, window=(128, 0), layout="bhsd")
    assert f"over the {WINDOW_MASK_LIMIT} this variant builds" in text
    assert text.endswith("auto picks: reference")


def test_on_cuda_the_torch_variant_refuses_masks():
    """torch's CUDA kernels do not all give 0 for a fully masked row: the variant must not serve masks there."""
    q = torch.empty(2, 4, 64, 64, device="meta", dtype=torch.float16)
    mask = torch.empty(64, 64, device="meta", dtype=torch.bool)
    text = pyattn.explain("scaled_dot_product_attention", q, q, q, attn_mask=mask, assume="sm_80")
    torch_line = next(line for line in text.splitlines() if line.strip().startswith("torch "))
    assert "masks and windows" in torch_line
    causal = pyattn.explain("scaled_dot_product_attention", q, q, q, is_causal=True, assume="sm_80")
    assert next(line for line in causal.splitlines() if line.strip().startswith("torch ")).endswith("serves")


@pytest.mark.parametrize("masked", [False, True])
def test_weights_on_torch_equal_reference(masked):
    q, k, v = _qkv(seqlen_q=6, seqlen_k=8, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(6, 8) > 0.4
        mask[2] = False
    (out, weights), (out64, weights64) = _both(lambda q, k, v: attention_with_weights(q, k, v, attn_mask=mask), q, k, v)
    assert_close(out, out64, 1e-5, "out")
    assert_close(weights, weights64, 1e-5, "weights")
    assert torch.isfinite(weights).all()
    if masked:
        assert (weights[:, :, 2] == 0).all() and (out[:, :, 2] == 0).all()


def test_auto_on_cpu_runs_the_torch_backend():
    q, k, v = _qkv()
    request = pyattn.functional.REQUEST_BUILDERS["scaled_dot_product_attention"](q, k, v, is_causal=True)
    assert _dispatch.choose(request).qualified_name == "torch"


def test_torchs_own_cpu_sdpa_gives_zero_for_a_fully_masked_row_as_the_docstring_says():
    """pyattn's SDPA docstring: torch >= 2.5 gives 0 on CPU for a query that sees no key (safe softmax);
    the torch variant relies on it for masked calls. If a torch release changes this, this test says so."""
    if not torch.torch_version.TorchVersion(torch.__version__) >= "2.5":
        pytest.skip(f"torch {torch.__version__} < 2.5: the torch variant refuses masks there")
    q, k, v = _qkv(seqlen_q=4, seqlen_k=5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (out[:, :, 1] == 0).all() and torch.isfinite(out).all()
