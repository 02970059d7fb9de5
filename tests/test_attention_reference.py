"""The attention reference backend (float64, CPU) through the functionals: torch's SDPA semantics,
flash-attn's options, varlen, fully masked rows, gradients.

Forced onto the "reference" backend: what is tested is the definition every kernel is held to, and
the functional layer's layouts, mask broadcasting and alignment on the way to it. Validation,
requests and explain are in test_attention_api.py; the kernels have their own files.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.functional import attention as functional
from pyattn.functional import flash_attention, flash_attention_varlen, scaled_dot_product_attention
from pyattn.reference.attention import attention as reference_attention
from tests.conftest import RTOL, assert_close, random_tensor

F64 = torch.float64
RTOL64 = RTOL[F64]


@pytest.fixture(autouse=True)
def _reference_backend():
    with pyattn.use_backend("reference"):
        yield


def _qkv(q_shape, k_shape, v_shape, dtype=F64, requires_grad=False):
    return tuple(random_tensor(*shape, dtype=dtype, requires_grad=requires_grad)
                 for shape in (q_shape, k_shape, v_shape))


def _torch_sdpa(*args, **kwargs):
    """torch's result, with its NaN rows (no key takes part) replaced by pyattn's documented 0."""
    return torch.nan_to_num(F.scaled_dot_product_attention(*args, **kwargs), nan=0.0)


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention against torch's


@pytest.mark.parametrize("leading", [(), (3,), (2, 3), (2, 1, 3)], ids=str)
def test_sdpa_leading_dims(leading):
    q, k, v = _qkv((*leading, 5, 8), (*leading, 7, 8), (*leading, 7, 6))
    out = scaled_dot_product_attention(q, k, v)
    assert out.shape == (*leading, 5, 6)
    assert_close(out, F.scaled_dot_product_attention(q, k, v), RTOL64)


def _every_broadcast_shape(full):
    return [tuple(size if keep else 1 for size, keep in zip(full, keeps))
            for keeps in itertools.product((False, True), repeat=len(full))]


_MASK_SHAPES = (_every_broadcast_shape((2, 3, 5, 7)) + _every_broadcast_shape((3, 5, 7))[:-1]  # 3-D, not (3,5,7) twice
                + [(5, 7), (1, 7), (5, 1), (7,)])


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", sorted(set(_MASK_SHAPES)), ids=str)
def test_sdpa_mask_broadcast(mask_shape, kind):
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
    else:
        mask = random_tensor(*mask_shape, dtype=F64)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch_mask = mask if mask.dim() >= 2 else mask.expand(5, 7)  # torch's own SDPA rejects 1-dim masks
    assert_close(out, _torch_sdpa(q, k, v, attn_mask=torch_mask), RTOL64)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 1, 7), (1, 4, 1, 5, 7), (2, 4, 3, 5, 7), (4, 1, 1, 7)], ids=str)
def test_sdpa_mask_with_several_batch_dims(mask_shape):
    q, k, v = _qkv((2, 4, 3, 5, 8), (2, 4, 3, 7, 8), (2, 4, 3, 7, 8))
    mask = torch.rand(mask_shape) > 0.3
    assert_close(scaled_dot_product_attention(q, k, v, attn_mask=mask), _torch_sdpa(q, k, v, attn_mask=mask), RTOL64)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 7), (1, 3, 5, 7), (5, 7), (7,)], ids=str)
def test_sdpa_mask_reaches_the_backend_unmaterialised(mask_shape):
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8))
    mask = torch.rand(mask_shape) > 0.3
    plan = functional._plan_sdpa(q, k, v, attn_mask=mask)
    passed = plan.options["mask"]
    assert passed.dim() == 4
    assert all(size in (1, full) for size, full in zip(passed.shape, (2, 3, 5, 7)))
    assert passed.untyped_storage().data_ptr() == mask.untyped_storage().data_ptr()
    assert passed.numel() == mask.numel()


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 5), (3, 7), (7, 3)])
def test_sdpa_causal_is_top_left(seqlen_q, seqlen_k):
    q, k, v = _qkv((2, 3, seqlen_q, 8), (2, 3, seqlen_k, 8), (2, 3, seqlen_k, 8))
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), RTOL64)


@pytest.mark.parametrize("heads_k", [1, 2])
def test_sdpa_gqa(heads_k):
    q, k, v = _qkv((2, 4, 5, 8), (2, heads_k, 7, 8), (2, heads_k, 7, 6))
    out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), RTOL64)


def test_sdpa_value_dim_and_scale():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 13))
    mask = random_tensor(5, 7, dtype=F64)
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3), RTOL64)


def test_sdpa_gradients_match_torch():
    q, k, v = _qkv((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6), requires_grad=True)
    mask = random_tensor(1, 3, 5, 7, dtype=F64, requires_grad=True)
    grad_out = random_tensor(2, 3, 5, 6, dtype=F64)
    ours = torch.autograd.grad(scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v, mask), grad_out)
    theirs = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v, mask), grad_out)
    for name, ours_grad, their_grad in zip(("q", "k", "v", "mask"), ours, theirs):
        assert_close(ours_grad, their_grad, RTOL64, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# dropout


def _dropout_probe(dropout_p, seqlen=64):
    """v = identity, so the output is the dropped-out probability matrix itself."""
    q, k, _ = _qkv((2, 2, seqlen, 8), (2, 2, seqlen, 8), (1,))
    v = torch.eye(seqlen, dtype=F64).expand(2, 2, seqlen, seqlen)
    return q, k, v


@pytest.mark.parametrize("dropout_p", [0.2, 0.5])
def test_sdpa_dropout_statistics(dropout_p):
    q, k, v = _dropout_probe(dropout_p)
    probabilities = scaled_dot_product_attention(q, k, v)
    dropped = scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    kept = dropped != 0
    samples = kept.numel()
    tolerance = 5 * (dropout_p * (1 - dropout_p) / samples) ** 0.5
    assert abs((1 - kept.double().mean().item()) - dropout_p) < tolerance
    # Kept probabilities are scaled by 1 / (1 - p), so the expectation is preserved.
    assert_close(dropped[kept], probabilities[kept] / (1 - dropout_p), RTOL64, name="kept probabilities")
    assert abs(dropped.sum().item() / probabilities.sum().item() - 1) < 10 * tolerance


def test_sdpa_dropout_is_reproducible_with_manual_seed():
    q, k, v = _dropout_probe(0.3, seqlen=16)
    torch.manual_seed(1234)
    first = scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(1234)
    second = scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    third = scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(first, second)
    assert not torch.equal(second, third)


def test_sdpa_without_dropout_draws_no_random_numbers():
    q, k, v = _qkv((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8))
    state = torch.get_rng_state()
    scaled_dot_product_attention(q, k, v)
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------
# flash_attention: every option against a direct reference call


def _band_mask(seqlen_q, seqlen_k, left, right):
    """Independent of the reference: flash-attn's bottom-right aligned band as a bool (L, S) mask."""
    rows = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    cols = torch.arange(seqlen_k)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0:
        visible &= cols >= rows - left
    if right >= 0:
        visible &= cols <= rows + right
    return visible


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 5), (3, 8), (8, 3)])
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (2, 1)), (True, (2, -1)), (False, (-1, 0))])
def test_flash_causal_and_window_are_bottom_right(seqlen_q, seqlen_k, causal, window):
    q, k, v = _qkv((2, 2, seqlen_q, 8), (2, 2, seqlen_k, 8), (2, 2, seqlen_k, 8))
    out = flash_attention(q, k, v, causal=causal, window=window, layout="bhsd")
    band = _band_mask(seqlen_q, seqlen_k, window[0], 0 if causal else window[1])
    assert_close(out, _torch_sdpa(q, k, v, attn_mask=band), RTOL64)


def test_flash_causal_documented_example():
    """The docstring's seqlen_q=2, seqlen_k=5 example: row 0 sees keys 0..3."""
    assert _band_mask(2, 5, -1, 0).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    q, k, v = _qkv((1, 1, 2, 4), (1, 1, 5, 4), (1, 1, 5, 4))
    out = flash_attention(q, k, v, causal=True, layout="bhsd")
    assert_close(out[:, :, :1], F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :4], v[:, :, :4]), RTOL64)


@pytest.mark.parametrize(
    "options",
    [
        dict(softcap=2.0),
        dict(alibi="heads"),
        dict(alibi="batch_heads", causal=True),
        dict(scale=0.7, window=(3, 2), softcap=1.5),
        dict(causal=True, alibi="heads", softcap=3.0),
    ],
    ids=lambda options: ",".join(options),
)
@pytest.mark.parametrize("heads_k", [4, 2])
def test_flash_options_match_reference(options, heads_k):
    options = dict(options)
    batch, heads, seqlen_q, seqlen_k = 2, 4, 5, 9
    q, k, v = _qkv((batch, heads, seqlen_q, 8), (batch, heads_k, seqlen_k, 8), (batch, heads_k, seqlen_k, 6))
    alibi = options.pop("alibi", None)
    if alibi is not None:
        shape = (heads,) if alibi == "heads" else (batch, heads)
        options["alibi_slopes"] = torch.rand(shape, dtype=torch.float32) + 0.1
    out, lse = flash_attention(q, k, v, return_lse=True, **options, layout="bhsd")
    window = options.get("window", (-1, -1))
    expected, expected_lse = reference_attention(
        q, k, v, scale=options.get("scale", 8 ** -0.5), window_left=window[0],
        window_right=0 if options.get("causal") else window[1], diagonal_offset=seqlen_k - seqlen_q,
        softcap=options.get("softcap", 0.0), alibi_slopes=options.get("alibi_slopes"))
    assert_close(out, expected, RTOL64)
    assert lse.shape == (batch, heads, seqlen_q) and not lse.requires_grad
    _assert_lse_close(lse, expected_lse)


def test_flash_bshd_layout_is_a_transposed_view():
    q, k, v = _qkv((2, 5, 4, 8), (2, 9, 2, 8), (2, 9, 2, 6))  # (B, S, H, D)
    out = flash_attention(q, k, v, causal=True, layout="bshd")
    assert out.shape == (2, 5, 4, 6)
    expected = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, layout="bhsd")
    assert_close(out, expected.transpose(1, 2), RTOL64)
    plan = functional._plan_flash(q, k, v, layout="bshd")
    assert plan.q.data_ptr() == q.data_ptr() and plan.q.shape == (2, 4, 5, 8)


# ---------------------------------------------------------------------------------------------
# flash_attention_varlen against per-sequence dense calls


def _packed(lengths_q, lengths_k, heads=4, heads_k=2, head_dim=8, head_dim_v=6, requires_grad=False):
    q = random_tensor(sum(lengths_q), heads, head_dim, dtype=F64, requires_grad=requires_grad)
    k = random_tensor(sum(lengths_k), heads_k, head_dim, dtype=F64, requires_grad=requires_grad)
    v = random_tensor(sum(lengths_k), heads_k, head_dim_v, dtype=F64, requires_grad=requires_grad)
    cu_q = torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


# seqlen_k - seqlen_q differs between sequences (2, -5, 5, 0, 3): each is aligned at its own bottom-right
# corner, and under causal rows 0..4 of sequence 1 (7 queries, 2 keys) see no key; sequence 3 has no queries.
_ALIGNED_Q, _ALIGNED_K = [3, 7, 1, 6, 0], [5, 2, 6, 6, 3]


@pytest.mark.parametrize(
    "lengths_q,lengths_k,options",
    [
        ([3, 7, 1], [5, 2, 6], dict()),
        ([3, 7, 1], [3, 7, 1], dict(causal=True)),
        ([3, 7, 1], [5, 9, 3], dict(causal=True, window=(2, -1))),  # seqlen_k - seqlen_q = 2 everywhere
        ([4, 2], [4, 2], dict(alibi_slopes="batch_heads", softcap=2.0)),
        (_ALIGNED_Q, _ALIGNED_K, dict(causal=True)),
        (_ALIGNED_Q, _ALIGNED_K, dict(window=(2, 1))),
        (_ALIGNED_Q, _ALIGNED_K, dict(causal=True, window=(3, -1), softcap=2.0)),
        (_ALIGNED_Q, _ALIGNED_K, dict(alibi_slopes="heads")),
        (_ALIGNED_Q, _ALIGNED_K, dict(alibi_slopes="batch_heads", causal=True)),
    ],
)
def test_varlen_matches_dense_per_sequence(lengths_q, lengths_k, options):
    """Output, lse and gradients of one varlen call vs a dense flash_attention call per sequence."""
    q, k, v, cu_q, cu_k = _packed(lengths_q, lengths_k, requires_grad=True)
    options = dict(options)
    slopes = None
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = torch.rand(4, dtype=torch.float32) + 0.1
    elif options.get("alibi_slopes") == "batch_heads":
        slopes = options["alibi_slopes"] = torch.rand(len(lengths_q), 4, dtype=torch.float32) + 0.1
    out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True, **options)
    assert out.shape == (sum(lengths_q), 4, 6) and lse.shape == (4, sum(lengths_q))
    grad_out = random_tensor(*out.shape, dtype=F64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for b in range(len(lengths_q)):
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        dense_options = dict(options)
        if slopes is not None:
            dense_options["alibi_slopes"] = slopes[b]
        dense_inputs = (q[rows][None], k[cols][None], v[cols][None])
        expected, expected_lse = flash_attention(*dense_inputs, layout="bshd", return_lse=True, **dense_options)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out[rows][None])
        assert_close(out[rows], expected[0], RTOL64, name=f"sequence {b}")
        _assert_lse_close(lse[:, rows], expected_lse[0])
        for name, grad, expected_grad, span in zip("qkv", grads, expected_grads, (rows, cols, cols)):
            assert_close(grad[span], expected_grad[span], RTOL64, name=f"sequence {b}: grad {name}")


def _assert_lse_close(lse, expected):
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(lse)), "lse: -inf rows differ"
    assert_close(lse[finite], expected[finite], RTOL64, name="lse")


def test_varlen_causal_is_bottom_right_per_sequence():
    """Against torch's SDPA with flash-attn's band mask (independent of the reference's offsets)."""
    q, k, v, cu_q, cu_k = _packed(_ALIGNED_Q, _ALIGNED_K, requires_grad=True)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, max(_ALIGNED_Q), max(_ALIGNED_K), causal=True)
    out.backward(random_tensor(*out.shape, dtype=F64))
    for b, (length_q, length_k) in enumerate(zip(_ALIGNED_Q, _ALIGNED_K)):
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        band = _band_mask(length_q, length_k, -1, 0)
        per_head = [x[span].transpose(0, 1).repeat_interleave(4 // x.shape[1], 0) for x, span in
                    ((q, rows), (k, cols), (v, cols))]
        expected = _torch_sdpa(*per_head, attn_mask=band).transpose(0, 1)
        assert_close(out[rows], expected, RTOL64, name=f"sequence {b}")
    blind = slice(int(cu_q[1]), int(cu_q[1]) + 5)  # sequence 1: 7 queries, 2 keys
    assert (out[blind] == 0).all()
    assert torch.isfinite(q.grad).all() and (q.grad[blind] == 0).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


# ---------------------------------------------------------------------------------------------
# rows that no key takes part in


def test_fully_masked_rows_give_zero_and_no_nan_gradient():
    q, k, v = _qkv((1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 8), requires_grad=True)
    mask = torch.rand(1, 2, 4, 6) > 0.3
    mask[0, 1, 2] = False
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and (out[0, 1, 2] == 0).all()
    out.backward(random_tensor(*out.shape, dtype=F64))
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        assert torch.isfinite(tensor.grad).all(), f"grad {name} has NaN"
    assert (q.grad[0, 1, 2] == 0).all()


def test_flash_causal_with_more_queries_than_keys_zeroes_the_top_rows():
    q, k, v = _qkv((1, 2, 6, 8), (1, 2, 3, 8), (1, 2, 3, 8), requires_grad=True)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, layout="bhsd")
    assert (out[:, :, :3] == 0).all() and torch.isneginf(lse[:, :, :3]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, :3] == 0).all()


# ---------------------------------------------------------------------------------------------
# gradcheck on tiny float64 cases


def test_gradcheck_sdpa_with_float_mask_and_gqa():
    q, k, v = _qkv((1, 2, 3, 4), (1, 1, 5, 4), (1, 1, 5, 3), requires_grad=True)
    mask = random_tensor(3, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, mask: scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), (q, k, v, mask))


def test_gradcheck_flash_with_options():
    q, k, v = _qkv((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 3), requires_grad=True)
    slopes = torch.rand(2) + 0.1
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, causal=True, window=(2, -1), softcap=2.0, alibi_slopes=slopes, layout="bhsd"),
        (q, k, v))


def test_gradcheck_varlen():
    # seqlen_k - seqlen_q is 1 and -1: the second sequence's first row sees no key.
    q, k, v, cu_q, cu_k = _packed([2, 3], [3, 2], heads=2, heads_k=1, head_dim=4, head_dim_v=3, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, 3, 3, causal=True),
                                    (q, k, v))



def test_varlen_reference_with_a_sequence_that_has_queries_but_no_keys():
    # Sequence 1 has 3 queries and no key: its rows see nothing (output 0, LSE -inf); the others are ordinary.
    cu_seqlens_q = torch.tensor([0, 4, 7, 12], dtype=torch.int32)
    cu_seqlens_k = torch.tensor([0, 5, 5, 11], dtype=torch.int32)
    q, k, v = (random_tensor(total, 2, 8, dtype=torch.float64) for total in (12, 11, 11))
    out, lse = reference_attention(q, k, v, scale=0.35, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                   max_seqlen_q=5, max_seqlen_k=6)
    assert torch.equal(out[4:7], torch.zeros_like(out[4:7])) and torch.isneginf(lse[:, 4:7]).all()
    for rows, keys in ((slice(0, 4), slice(0, 5)), (slice(7, 12), slice(5, 11))):
        expected = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k[keys].transpose(0, 1),
                                                  v[keys].transpose(0, 1), scale=0.35).transpose(0, 1)
        assert_close(out[rows], expected, 1e-12)
