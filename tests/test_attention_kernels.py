"""Triton flash-attention launchers vs the float64 reference, on CPU through the Triton interpreter.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -m interpreter tests/test_attention_kernels.py``.
Every launcher output is allocated NaN-filled (``poisoned_outputs``), so an element a kernel forgets to
write fails the comparison. The interpreter runs 16×16 tiles, so these short sequences still cross
several tiles: band edges, interiors and ragged ends are all exercised. The Hopper (TMA descriptor)
forward runs here with ``use_tma=True`` (the interpreter emulates the descriptor loads); its ``requires_sm90``
tests at the end run in the plain process on an H100.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tests.conftest import INTERPRET, RTOL, RTOL_TF32, assert_close, poison_, random_tensor, relative_error

pytest.importorskip("triton", reason="triton is not installed")

from pyattn.kernels import attention as kernels  # noqa: E402
from pyattn.kernels.attention import configs, launch  # noqa: E402
from pyattn.kernels.attention.common import quantised_dropout_p  # noqa: E402
from pyattn.reference.attention import attention as reference_attention  # noqa: E402

# Interpreter tests carry the mark one by one (no module pytestmark): the Hopper tests at the end run in the
# plain process.
DTYPES = [torch.float32, torch.float16]  # bf16 arithmetic is wrong in the interpreter: GPU tests cover it


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def poisoned_empty(shape, dtype, device):
        tensor = torch.empty(shape, dtype=dtype, device=device)
        return poison_(tensor) if tensor.is_floating_point() else tensor.fill_(-7)

    monkeypatch.setattr(launch, "_empty", poisoned_empty)


def make_inputs(batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v, dtype):
    q = random_tensor(batch, heads, seqlen_q, head_dim, dtype=dtype)
    k = random_tensor(batch, kv_heads, seqlen_k, head_dim, dtype=dtype)
    v = random_tensor(batch, kv_heads, seqlen_k, head_dim_v, dtype=dtype)
    return q, k, v


def reference_with_grads(q, k, v, grad_out, **options):
    """(out, lse, dq, dk, dv) of the reference in float64 on the same (rounded) inputs."""
    leaves = [x.detach().to(torch.float64).requires_grad_() for x in (q, k, v)]
    out, lse = reference_attention(*leaves, **options)
    out.backward(grad_out.to(torch.float64))
    return (out.detach(), lse.detach(), *(leaf.grad for leaf in leaves))


def check_against_reference(q, k, v, *, deterministic=False, dropout_keep_mask=None, use_tma=False,
                            warp_specialize=False, gqa_heads_per_program=None, **options):
    """Runs forward + backward through the launchers and compares all five results with the reference."""
    rtol = RTOL[q.dtype]
    out, lse = kernels.attention_forward(q, k, v, use_tma=use_tma, warp_specialize=warp_specialize, **options)
    grad_out = random_tensor(*out.shape, dtype=q.dtype)
    dq, dk, dv = kernels.attention_backward(grad_out, q, k, v, out, lse, deterministic=deterministic,
                                            gqa_heads_per_program=gqa_heads_per_program, **options)
    reference_options = {key: value for key, value in options.items() if key != "seed"}
    if "dropout_p" in options:  # the kernels drop with p rounded to 1/65536 and rescale by 1/(1 − that)
        reference_options["dropout_p"] = quantised_dropout_p(options["dropout_p"])
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_with_grads(
        q, k, v, grad_out, dropout_keep_mask=dropout_keep_mask, **reference_options)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype
    # lse is −inf exactly where the reference's is (rows with no visible key); compare the rest.
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse: −inf rows differ from the reference"
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], RTOL[torch.float32], "lse")
    assert_close(out, ref_out, rtol, "out")
    assert_close(dq, ref_dq, rtol, "dq")
    if ref_dk.norm() == 0:
        # One key per row (S = 1) makes dK ≡ 0 exactly; the kernel's dS = P (dP − delta) leaves rounding
        # noise, bounded against dV, whose terms have the same size.
        assert torch.isfinite(dk).all() and dk.double().norm() <= rtol * ref_dv.norm(), "dk: not ~0 with one key"
    else:
        assert_close(dk, ref_dk, rtol, "dk")
    assert_close(dv, ref_dv, rtol, "dv")
    return out, lse, dq, dk, dv


# (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v): lengths {1, 17, 64, 129} and head
# dims {16, 32, 64, 80, 128} covered pairwise rather than as a full product; GQA, MQA and Dv ≠ D included.
SHAPES = [
    (1, 2, 2, 1, 17, 16, 16),
    (2, 2, 1, 17, 64, 32, 32),
    (1, 4, 2, 64, 17, 64, 64),
    (1, 4, 1, 129, 64, 80, 80),
    (1, 1, 1, 64, 129, 128, 64),
    (1, 2, 1, 129, 1, 16, 32),
    (1, 1, 1, 17, 17, 80, 128),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_Hk{}_L{}_S{}_D{}_Dv{}".format(*s))
def test_matches_reference(shape, dtype):
    q, k, v = make_inputs(*shape, dtype)
    check_against_reference(q, k, v, scale=shape[5] ** -0.5)


# Head dims the forward covers with two column blocks (``launch.head_blocks``): q/k and v split apart or together,
# tails padded (40 -> 32 + 16, 48 -> 32 + 16) and exact (96 -> 64 + 32, 192 -> 128 + 64, 160 -> 128 + 32).
SPLIT_SHAPES = [
    (1, 2, 1, 33, 47, 40, 40),
    (1, 2, 2, 17, 40, 96, 48),
    (1, 1, 1, 20, 33, 48, 64),
    (1, 1, 1, 20, 33, 64, 96),
    (1, 1, 1, 17, 20, 192, 160),
]
SPLIT_OPTIONS = {
    "plain": dict(scale=0.3),
    "causal-bottom-right": dict(scale=0.3, window_right=0, diagonal_offset=13),
    "softcap-alibi-window": dict(scale=0.3, softcap=2.0, alibi_slopes=torch.tensor([0.25, 0.125]), window_left=8,
                                 window_right=8),
}


def test_head_blocks_split_only_where_two_blocks_are_narrower():
    assert [launch.head_blocks(d) for d in (16, 24, 40, 64, 80, 96, 112, 128, 160, 192, 200, 256)] == [
        (16, 0), (32, 0), (32, 16), (64, 0), (64, 16), (64, 32), (128, 0), (128, 0), (128, 32), (128, 64), (256, 0),
        (256, 0)]


@pytest.mark.parametrize("head_dim, head_dim_v", [(96, 48), (64, 96), (128, 128)])
def test_forward_launch_passes_the_head_blocks(head_dim, head_dim_v):
    q, k, v = (torch.empty(1, 2, 64, d, dtype=torch.float16, device="meta") for d in (head_dim, head_dim, head_dim_v))
    shape = launch._check_inputs("test", q, k, v, None, None, None, None, 0, 0, 0.0, 0.0, 0)
    out, lse = launch._forward_outputs(q, v, shape, False)
    _, constexprs = launch._forward_arguments([q, k, v], out, lse, shape, q=q, v=v, use_tma=False, scale=0.1,
                                              mask=None, window_left=-1, window_right=-1, diagonal_offset=0,
                                              align_to_end=False, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
                                              cu_seqlens_q=None, cu_seqlens_k=None)
    assert (constexprs["HEAD_BLOCK"], constexprs["HEAD_TAIL"]) == launch.head_blocks(head_dim)
    assert (constexprs["HEAD_BLOCK_V"], constexprs["HEAD_TAIL_V"]) == launch.head_blocks(head_dim_v)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SPLIT_OPTIONS)
@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=lambda s: "B{}_H{}_Hk{}_L{}_S{}_D{}_Dv{}".format(*s))
def test_split_head_dims_match_reference(shape, name, dtype):
    q, k, v = make_inputs(*shape, dtype)
    options = dict(SPLIT_OPTIONS[name])
    if "alibi_slopes" in options:
        options["alibi_slopes"] = options["alibi_slopes"][:shape[1]]
    check_against_reference(q, k, v, **options)


@pytest.mark.interpreter
def test_split_head_dims_with_mask_and_dropout_match_reference():
    q, k, v = make_inputs(2, 2, 1, 33, 47, 96, 80, torch.float32)
    mask = torch.rand(2, 1, 33, 47) > 0.3
    keep = kernels.attention_dropout_keep_mask(2, 2, 33, 47, **DROPOUT, device="cpu")
    check_against_reference(q, k, v, scale=0.3, mask=mask.expand(2, 2, 33, 47), dropout_keep_mask=keep, **DROPOUT)


# Alignment and band options on L ≠ S, with the band's edge tiles, interiors and ragged ends.
OPTIONS = {
    "causal-top-left": dict(window_right=0),
    "causal-bottom-right": dict(window_right=0, diagonal_offset=47 - 33),
    "causal-bottom-right-fewer-keys": dict(window_right=0, diagonal_offset=-14),  # rows 0..13 see no key
    "sliding-window": dict(window_left=5, window_right=3),
    "window-left-only": dict(window_left=20, diagonal_offset=9),
    "local-causal": dict(window_left=16, window_right=0, diagonal_offset=14),
    "softcap": dict(softcap=3.0),
    "alibi-per-head": dict(alibi_slopes=torch.tensor([0.5, 0.0625])),
    "alibi-per-batch-causal": dict(alibi_slopes=torch.tensor([[0.3, 0.1], [0.02, 0.7]]), window_right=0,
                                   diagonal_offset=14),
    "softcap-alibi-window": dict(softcap=2.0, alibi_slopes=torch.tensor([0.25, 0.125]), window_left=8, window_right=8),
    # align_to_end adds S − L = 14 to the offset: a window [i + 11 − 6, i + 11 + 1] in key positions.
    "window-aligned-to-end": dict(align_to_end=True, diagonal_offset=-3, window_left=6, window_right=1,
                                  alibi_slopes=torch.tensor([0.25, 0.125])),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIONS)
def test_options_match_reference(name, dtype):
    q, k, v = make_inputs(2, 2, 1, 33, 47, 32, 32, dtype)
    check_against_reference(q, k, v, scale=0.3, deterministic=name.startswith("causal"), **OPTIONS[name])


MASK_SHAPES = [(2, 1, 1, 47), (1, 2, 33, 47), (1, 1, 33, 47), (2, 2, 33, 47), (1, 1, 1, 1)]


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masks_of_broadcast_shapes(mask_shape, kind):
    q, k, v = make_inputs(2, 2, 2, 33, 47, 16, 16, torch.float32)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
    else:
        mask = torch.randn(mask_shape) * 2
        mask[torch.rand(mask_shape) < 0.2] = float("-inf")
    if mask_shape == (1, 1, 1, 1):  # the single element must not hide every key
        mask.fill_(True if kind == "bool" else 0.5)
    # Broadcast views (stride 0), as users make them: the kernel must read them through their strides.
    mask = mask.expand(2, 2, 33, 47)
    check_against_reference(q, k, v, scale=0.25, mask=mask, window_right=4)


@pytest.mark.interpreter
def test_mask_broadcast_view_is_read_not_materialised():
    q, k, v = make_inputs(1, 2, 2, 33, 47, 16, 16, torch.float16)
    mask = torch.randn(1, 1, 1, 47).to(torch.float16).expand(1, 2, 33, 47)
    assert mask.stride() == (47, 0, 0, 1)
    check_against_reference(q, k, v, scale=0.25, mask=mask)


@pytest.mark.interpreter
def test_fully_masked_rows_give_zero_output_and_gradient():
    q, k, v = make_inputs(1, 2, 1, 33, 40, 16, 16, torch.float32)
    mask = torch.rand(1, 2, 33, 40) > 0.5
    mask[:, :, 3] = False  # a whole row
    mask[:, 1, 20:] = False  # a whole tile of rows in one head
    out, lse, dq, _, _ = check_against_reference(q, k, v, scale=0.25, mask=mask)
    empty = ~mask.any(-1).expand(1, 2, 33)
    assert torch.isneginf(lse[empty]).all()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()

    float_mask = torch.zeros(1, 1, 33, 40)
    float_mask[:, :, 5:9] = float("-inf")
    out, lse, dq, dk, dv = check_against_reference(q, k, v, scale=0.25, mask=float_mask.expand(1, 2, 33, 40))
    assert torch.isneginf(lse[:, :, 5:9]).all() and (out[:, :, 5:9] == 0).all() and (dq[:, :, 5:9] == 0).all()


@pytest.mark.interpreter
def test_window_outside_every_key_gives_zeros():
    q, k, v = make_inputs(1, 1, 1, 20, 20, 16, 16, torch.float32)
    out, lse, dq, dk, dv = check_against_reference(q, k, v, scale=0.25, window_right=0, diagonal_offset=-40)
    assert torch.isneginf(lse).all() and (out == 0).all()
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def varlen_inputs(lengths_q, lengths_k, heads, kv_heads, head_dim, head_dim_v, dtype):
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = random_tensor(int(cu_q[-1]), heads, head_dim, dtype=dtype)
    k = random_tensor(int(cu_k[-1]), kv_heads, head_dim, dtype=dtype)
    v = random_tensor(int(cu_k[-1]), kv_heads, head_dim_v, dtype=dtype)
    layout = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lengths_q), max_seqlen_k=max(lengths_k))
    return q, k, v, layout


VARLEN_OPTIONS = {
    "plain": {},
    "causal-bottom-right": dict(window_right=0, diagonal_offset=3),
    "alibi-window": dict(alibi_slopes=torch.tensor([[0.3, 0.1], [0.2, 0.05], [0.5, 0.5], [0.01, 0.2]]),
                         window_left=6, window_right=2),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", VARLEN_OPTIONS)
def test_varlen_ragged_lengths(name, dtype):
    # Ragged lengths around the tile size, one empty query sequence, and L_b ≠ S_b.
    q, k, v, layout = varlen_inputs([5, 17, 0, 33], [9, 16, 3, 40], 2, 1, 32, 16, dtype)
    check_against_reference(q, k, v, scale=0.2, **layout, **VARLEN_OPTIONS[name])


# Each sequence aligned at its own bottom-right corner (flash-attn's varlen): S_b − L_b is 4, 23, 3, −3, −16,
# so under causal the last sequence's rows 0..15 (a whole tile) and the fourth's rows 0..2 see no key.
ALIGNED_LENGTHS_Q, ALIGNED_LENGTHS_K = [5, 17, 0, 33, 20], [9, 40, 3, 30, 4]
ALIGNED_OPTIONS = {
    "causal": dict(window_right=0),
    "sliding-window": dict(window_left=5, window_right=2),
    "local-causal-extra-offset": dict(window_left=8, window_right=0, diagonal_offset=-2),
    "alibi": dict(alibi_slopes=torch.tensor([0.3, 0.1])),
    "alibi-per-batch-causal": dict(alibi_slopes=torch.tensor([[0.3, 0.1], [0.2, 0.05], [0.5, 0.5], [0.01, 0.2],
                                                              [0.7, 0.02]]), window_right=0),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic-dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALIGNED_OPTIONS)
def test_varlen_aligned_to_each_sequence_end(name, dtype, deterministic):
    q, k, v, layout = varlen_inputs(ALIGNED_LENGTHS_Q, ALIGNED_LENGTHS_K, 2, 1, 32, 16, dtype)
    check_against_reference(q, k, v, scale=0.2, align_to_end=True, deterministic=deterministic, **layout,
                            **ALIGNED_OPTIONS[name])


@pytest.mark.interpreter
def test_varlen_aligned_rows_that_see_no_key_are_zero():
    q, k, v, layout = varlen_inputs(ALIGNED_LENGTHS_Q, ALIGNED_LENGTHS_K, 2, 1, 32, 16, torch.float32)
    out, lse, dq, _, _ = check_against_reference(q, k, v, scale=0.2, align_to_end=True, window_right=0, **layout)
    starts = layout["cu_seqlens_q"].tolist()
    blind = torch.zeros(q.shape[0], dtype=torch.bool)
    for start, length_q, length_k in zip(starts, ALIGNED_LENGTHS_Q, ALIGNED_LENGTHS_K):
        blind[start:start + max(length_q - length_k, 0)] = True
    assert blind.sum() == 3 + 16
    assert torch.isneginf(lse[:, blind]).all() and torch.isfinite(lse[:, ~blind]).all()
    assert (out[blind] == 0).all() and (dq[blind] == 0).all()


@pytest.mark.interpreter
def test_non_contiguous_inputs():
    # Transposed (batch, seqlen, heads, dim) views, and a feature stride of 2: nothing may be copied.
    q = random_tensor(2, 33, 4, 32).transpose(1, 2)
    k = random_tensor(2, 40, 2, 64)[..., ::2].transpose(1, 2)
    v = random_tensor(2, 2, 16, 40).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_reference(q, k, v, scale=0.2, window_right=0, diagonal_offset=7)
    check_against_reference(q, k, v, scale=0.2, deterministic=True)


@pytest.mark.interpreter
def test_non_contiguous_varlen_inputs():
    q, k, v, layout = varlen_inputs([20, 7], [11, 30], 4, 2, 16, 16, torch.float32)
    q_wide = random_tensor(q.shape[0], 4, 32)[..., 16:]
    check_against_reference(q_wide, k, v, scale=0.2, **layout)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_and_atomic_backward_agree(dtype):
    q, k, v = make_inputs(1, 4, 2, 40, 50, 32, 32, dtype)
    options = dict(scale=0.2, window_left=20, window_right=0, diagonal_offset=10)
    out, lse = kernels.attention_forward(q, k, v, **options)
    grad_out = random_tensor(*out.shape, dtype=dtype)
    atomic = kernels.attention_backward(grad_out, q, k, v, out, lse, deterministic=False, **options)
    deterministic = kernels.attention_backward(grad_out, q, k, v, out, lse, deterministic=True, **options)
    repeated = kernels.attention_backward(grad_out, q, k, v, out, lse, deterministic=True, **options)
    for name, a, b, c in zip(("dq", "dk", "dv"), atomic, deterministic, repeated):
        assert torch.equal(b, c), f"{name}: deterministic backward is not bit-reproducible"
        # Only the summation order of dQ differs: agreement to rounding, not to the tolerance.
        assert relative_error(a, b) <= (1e-6 if dtype == torch.float32 else 2e-3), name
    _, _, ref_dq, ref_dk, ref_dv = reference_with_grads(q, k, v, grad_out, **options)
    assert_close(atomic[0], ref_dq, RTOL[dtype], "atomic dq")
    assert_close(deterministic[0], ref_dq, RTOL[dtype], "deterministic dq")


# The fused dQ term in both orientations, dS K (sm_80) and (Kᵀ dSᵀ)ᵀ (sm_90 with 16-bit inputs and a head dim of 64
# or more; the interpreter launches as sm_90): each forced, fp32 and fp16, causal with ragged ends, GQA, a padded
# head dim and Dv ≠ D.
@pytest.mark.interpreter
@pytest.mark.parametrize("transposed", [False, True], ids=["dS-K", "Kt-dSt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_dq_orientations_match_reference(transposed, dtype, monkeypatch):
    chosen = []
    monkeypatch.setattr(launch, "_transposes_fused_dq", lambda *args: chosen.append(transposed) or transposed)
    q, k, v = make_inputs(1, 4, 2, 40, 33, 80, 64, dtype)
    check_against_reference(q, k, v, scale=0.2, window_right=0, diagonal_offset=5)
    assert chosen == [transposed], "the dK/dV launch did not ask for the fused dQ's orientation"


def test_fused_dq_is_transposed_on_hopper_for_16_bit_head_dims_from_64():
    rule = launch._transposes_fused_dq
    assert rule(torch.bfloat16, 128, (9, 0)) and rule(torch.float16, 64, (10, 0))
    assert not rule(torch.bfloat16, 128, (8, 0)) and not rule(torch.bfloat16, 128, None)
    assert not rule(torch.float32, 128, (9, 0)) and not rule(torch.float16, 32, (9, 0))


# The schedule: causal query tiles (and left-window-only key tiles) run in reversed index order, longest first.
# Each tile's arithmetic is unchanged, so the result must be bit-identical to the same band spelled with a
# second window side that cuts nothing (which keeps ascending order): causal + a left window wider than the keys
# (forward and dQ), a left window + a right window wider than the keys (dK/dV).
LONGEST_FIRST_BANDS = {
    "causal-top-left": (dict(window_right=0), dict(window_left=1000)),
    "causal-bottom-right": (dict(window_right=0, diagonal_offset=14), dict(window_left=1000)),
    "causal-rows-without-keys": (dict(window_right=0, diagonal_offset=-20), dict(window_left=1000)),
    "left-window-only": (dict(window_left=9, diagonal_offset=14), dict(window_right=1000)),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic-dq"])
@pytest.mark.parametrize("name", LONGEST_FIRST_BANDS)
def test_longest_first_tile_order_is_bit_identical_to_ascending(name, deterministic):
    band, no_op_side = LONGEST_FIRST_BANDS[name]
    q, k, v = make_inputs(2, 2, 1, 47, 33, 32, 32, torch.float32)
    results = []
    for options in (band, dict(band, **no_op_side)):
        out, lse = kernels.attention_forward(q, k, v, scale=0.3, **options)
        grad_out = torch.ones_like(out).cumsum(-2) / out.shape[-2]
        grads = kernels.attention_backward(grad_out, q, k, v, out, lse, scale=0.3, deterministic=deterministic,
                                           **options)
        results.append((out, lse, *grads))
    for label, reversed_order, ascending in zip(("out", "lse", "dq", "dk", "dv"), *results):
        if label == "dq" and not deterministic:  # atomics: the order of the dQ sums is not fixed
            assert_close(reversed_order, ascending, 1e-6, label)
        else:
            assert torch.equal(reversed_order, ascending), f"{name}: {label} differs between the tile orders"
    check_against_reference(q, k, v, scale=0.3, deterministic=deterministic, **band)


# GQA dK/dV: programs over slices of the group write fp32 partials summed after; every slicing, even or not,
# must give the reference's gradients (the default slices MQA/GQA fully on these small launches).
@pytest.mark.interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic-dq"])
@pytest.mark.parametrize("heads_per_program", [1, 2, 3, 4, None], ids=lambda n: f"heads{n}")
def test_gqa_backward_split_over_the_group_matches_reference(heads_per_program, deterministic):
    q, k, v = make_inputs(2, 8, 2, 33, 40, 32, 16, torch.float32)  # group of 4
    check_against_reference(q, k, v, scale=0.25, window_right=0, diagonal_offset=7, deterministic=deterministic,
                            gqa_heads_per_program=heads_per_program)


@pytest.mark.interpreter
@pytest.mark.parametrize("heads_per_program", [1, 3, 5])
def test_gqa_backward_split_varlen_mqa_matches_reference(heads_per_program):
    q, k, v, layout = varlen_inputs([5, 17, 0, 33], [9, 16, 3, 40], 5, 1, 32, 16, torch.float32)  # MQA, group 5
    check_against_reference(q, k, v, scale=0.2, align_to_end=True, window_right=0, deterministic=True, **layout,
                            gqa_heads_per_program=heads_per_program)


@pytest.mark.interpreter
def test_gqa_backward_splits_agree_and_stay_deterministic():
    q, k, v = make_inputs(1, 6, 1, 40, 50, 32, 32, torch.float32)
    out, lse = kernels.attention_forward(q, k, v, scale=0.2)
    grad_out = random_tensor(*out.shape)
    runs = {n: kernels.attention_backward(grad_out, q, k, v, out, lse, scale=0.2, deterministic=True,
                                         gqa_heads_per_program=n) for n in (1, 2, 6)}
    again = kernels.attention_backward(grad_out, q, k, v, out, lse, scale=0.2, deterministic=True,
                                       gqa_heads_per_program=2)
    assert all(torch.equal(a, b) for a, b in zip(runs[2], again)), "a split backward is not bit-reproducible"
    for n in (1, 2):
        assert torch.equal(runs[n][0], runs[6][0]), "dq does not depend on the dK/dV split"
        for label, a, b in zip(("dk", "dv"), runs[n][1:], runs[6][1:]):
            assert relative_error(a, b) <= 1e-6, f"{label}: split {n} differs beyond fp32 summation order"


@pytest.mark.interpreter
@pytest.mark.parametrize("value", [0, 7, 2.0, True])
def test_gqa_heads_per_program_is_checked(value):
    q, k, v = make_inputs(1, 6, 1, 8, 8, 16, 16, torch.float32)
    out, lse = kernels.attention_forward(q, k, v, scale=0.2)
    with pytest.raises(ValueError, match="gqa_heads_per_program"):
        kernels.attention_backward(out, q, k, v, out, lse, scale=0.2, gqa_heads_per_program=value)


def test_gqa_split_rule_fills_the_gpu_and_keeps_large_launches_whole():
    # MQA at batch 1, 4k keys: 32 key tiles of 128 for 132 SMs -> split the group of 32 into 9 slices of 4.
    assert configs.dkdv_heads_per_program(32, 1, 1, 4096, 132) == 4
    assert configs.dkdv_heads_per_program(8, 4, 8, 16384, 132) == 8  # 4096 programs already: one per group
    assert configs.dkdv_heads_per_program(1, 1, 1, 16, 132) == 1  # MHA never splits
    assert configs.dkdv_heads_per_program(3, 1, 1, 16, 132) == 1  # tiny launches split fully


# A non-positive scale does not commute with the row max: those calls keep the scaled-score path (FOLD_SCALE off).
@pytest.mark.interpreter
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_non_positive_scale_matches_reference(scale):
    q, k, v = make_inputs(1, 2, 1, 33, 47, 32, 32, torch.float32)
    mask = torch.rand(1, 1, 33, 47) > 0.3
    check_against_reference(q, k, v, scale=scale, window_right=0, diagonal_offset=14)
    check_against_reference(q, k, v, scale=scale, mask=mask)


def test_forward_folds_the_scale_only_where_it_commutes_with_the_max():
    features = dict(HAS_SOFTCAP=False, HAS_ALIBI=False, MASK_KIND=launch.NO_MASK)
    assert launch._folds_scale(0.125, features)
    assert launch._folds_scale(0.125, dict(features, MASK_KIND=launch.BOOL_MASK))
    assert not launch._folds_scale(0.125, dict(features, MASK_KIND=launch.ADDITIVE_MASK))
    assert not launch._folds_scale(0.125, dict(features, HAS_SOFTCAP=True))
    assert not launch._folds_scale(0.125, dict(features, HAS_ALIBI=True))
    assert not launch._folds_scale(0.0, features) and not launch._folds_scale(-1.0, features)


DROPOUT = dict(dropout_p=0.3, seed=1234)


@pytest.mark.interpreter
def test_dropout_same_seed_is_bit_identical_and_seeds_differ():
    q, k, v = make_inputs(1, 2, 1, 33, 40, 16, 16, torch.float32)
    first, first_lse = kernels.attention_forward(q, k, v, scale=0.25, **DROPOUT)
    second, second_lse = kernels.attention_forward(q, k, v, scale=0.25, **DROPOUT)
    other, _ = kernels.attention_forward(q, k, v, scale=0.25, dropout_p=0.3, seed=1235)
    assert torch.equal(first, second) and torch.equal(first_lse, second_lse)
    assert not torch.equal(first, other)
    grad_out = random_tensor(*first.shape)
    grads = [kernels.attention_backward(grad_out, q, k, v, first, first_lse, scale=0.25, deterministic=True,
                                        **DROPOUT) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.interpreter
def test_dropout_keep_fraction_and_independence():
    p = 0.3
    keep = kernels.attention_dropout_keep_mask(2, 3, 64, 129, dropout_p=p, seed=7, device="cpu")
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 64, 129)
    fraction = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(fraction - (1 - p)) < 5 * sigma, f"keep fraction {fraction:.4f}, expected {1 - p} ± {5 * sigma:.4f}"
    # Every (batch, head) draws its own pattern; the same seed redraws the same one.
    flat = keep.reshape(6, -1)
    for a in range(6):
        for b in range(a + 1, 6):
            assert not torch.equal(flat[a], flat[b])
    again = kernels.attention_dropout_keep_mask(2, 3, 64, 129, dropout_p=p, seed=7, device="cpu")
    assert torch.equal(keep, again)
    assert kernels.attention_dropout_keep_mask(1, 1, 8, 8, dropout_p=0.0, seed=7, device="cpu").all()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_reference_given_keep_mask(dtype):
    q, k, v = make_inputs(2, 2, 1, 33, 47, 32, 32, dtype)
    keep = kernels.attention_dropout_keep_mask(2, 2, 33, 47, **DROPOUT, device="cpu")
    check_against_reference(q, k, v, scale=0.3, dropout_keep_mask=keep, window_right=0, diagonal_offset=14,
                            **DROPOUT)
    check_against_reference(q, k, v, scale=0.3, dropout_keep_mask=keep, deterministic=True, softcap=2.0, **DROPOUT)


@pytest.mark.interpreter
def test_dropout_varlen_matches_reference_given_keep_mask():
    q, k, v, layout = varlen_inputs([5, 33, 17], [40, 9, 17], 2, 2, 16, 16, torch.float32)
    keep = kernels.attention_dropout_keep_mask(3, 2, layout["max_seqlen_q"], layout["max_seqlen_k"], **DROPOUT,
                                               device="cpu")
    check_against_reference(q, k, v, scale=0.3, dropout_keep_mask=keep, **layout, **DROPOUT)


@pytest.mark.interpreter
def test_reference_matches_torch_sdpa():
    q, k, v = make_inputs(2, 4, 2, 33, 47, 16, 16, torch.float64)
    mask = torch.randn(2, 1, 33, 47, dtype=torch.float64)
    for options, sdpa_options in (
        (dict(window_right=0), dict(is_causal=True)),
        (dict(mask=mask), dict(attn_mask=mask)),
        (dict(mask=mask > 0), dict(attn_mask=mask > 0)),
    ):
        out, _ = reference_attention(q, k, v, scale=0.3, **options)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True, **sdpa_options)
        assert relative_error(out, expected) < 1e-12


BAD_INPUTS = [
    (dict(k_heads=3), ValueError, "multiple of k/v's 3 heads"),
    (dict(head_dim=257), ValueError, "head dims"),
    (dict(k_dtype=torch.float16), TypeError, "share a dtype"),
    (dict(q_dtype=torch.int32), TypeError, "q has dtype"),
    (dict(mask=torch.ones(1, 1, 5, 7, dtype=torch.bool)), ValueError, "mask must have 4 dims"),
    (dict(mask=torch.ones(1, 1, 8, dtype=torch.bool)), ValueError, "mask must have 4 dims"),
    (dict(mask=torch.ones(1, 1, 8, 8, dtype=torch.int64)), TypeError, "mask must be bool"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int64)), ValueError, "cu_seqlens"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("bad, error, message", BAD_INPUTS, ids=lambda x: str(x)[:40] if isinstance(x, dict) else "")
def test_bad_input_raises_naming_the_argument(bad, error, message):
    bad = dict(bad)
    q = random_tensor(1, 2, 8, bad.pop("head_dim", 16), dtype=bad.pop("q_dtype", torch.float32))
    k = random_tensor(1, bad.pop("k_heads", 1), 8, q.shape[-1], dtype=bad.pop("k_dtype", torch.float32))
    v = random_tensor(*k.shape[:-1], 16)
    if "cu_seqlens_q" in bad:
        q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
        bad.update(cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32), max_seqlen_q=8, max_seqlen_k=8)
    with pytest.raises(error, match=message):
        kernels.attention_forward(q, k, v, scale=0.25, **bad)


@pytest.mark.interpreter
def test_gpu_autotune_configs_are_pruned_per_table_entry_and_length():
    # The GPU tables, pruned as the autotuner calls the pruner: positional arguments and constexprs apart. The
    # entry is (element kind, head-dim class, option class); any of mask, softcap, ALiBi, dropout is "features",
    # a window alone "band" where the table has such an entry, else "plain" (fp32 entries serve every option set:
    # "any").
    plain = dict(MASK_KIND=0, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False, HAS_WINDOW_LEFT=False,
                 HAS_WINDOW_RIGHT=False)
    causal = dict(plain, HAS_WINDOW_RIGHT=True)
    cases = [(torch.float16, 16, plain, ("16-bit", 64, "plain")),
             (torch.bfloat16, 128, causal, ("16-bit", 128, "band")),
             (torch.float16, 64, dict(causal, HAS_WINDOW_LEFT=True), ("16-bit", 64, "band")),
             (torch.bfloat16, 128, dict(causal, HAS_DROPOUT=True), ("16-bit", 128, "features")),
             (torch.bfloat16, 64, dict(plain, HAS_DROPOUT=True), ("16-bit", 64, "features")),
             (torch.float16, 80, dict(plain, MASK_KIND=1), ("16-bit", 128, "features")),
             (torch.float32, 64, plain, ("fp32", 64, "any")),
             (torch.bfloat16, 200, dict(plain, HAS_SOFTCAP=True), ("16-bit", 256, "features")),
             (torch.float32, 128, dict(plain, HAS_ALIBI=True), ("fp32", 128, "any")),
             (torch.float32, 256, plain, ("fp32", 256, "any"))]
    for table_name, (aligned_table, unaligned_table) in configs.TABLES.items():
        gpu_configs = configs.autotune_configs(table_name, interpreter=False)
        prune = configs.config_pruner(table_name)
        for dtype, head_dim, options, entry in cases:
            for alignment in (configs.ALIGNED, configs.UNALIGNED):
                q = torch.empty(0, dtype=dtype)
                constexprs = dict(HEAD_DIM_PADDED=launch.triton.next_power_of_2(head_dim), HEAD_DIM_V_PADDED=16,
                                  **options)
                arguments = dict(Q=q, seqlen_q_bucket=4096, seqlen_k_bucket=4096, alignment=alignment)
                chosen = prune(gpu_configs, arguments, **constexprs)
                # Unaligned launches take the override where the tables have one; "band" is "plain" where absent.
                if entry not in aligned_table:
                    entry = entry[:2] + ("plain",)
                expected = unaligned_table.get(entry, aligned_table[entry]) if alignment == configs.UNALIGNED else (
                    aligned_table[entry])
                # Entries are (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]): a register cap reaches the config.
                assert {configs.config_entry(c) for c in chosen} == set(expected), (table_name, dtype, head_dim, entry,
                                                                              alignment)
                short = prune(gpu_configs, dict(arguments, seqlen_q_bucket=configs.seqlen_bucket(1),
                                                seqlen_k_bucket=configs.seqlen_bucket(20)), **constexprs)
                assert len(short) >= 1 and all(c in chosen for c in short)


def test_autotune_key_holds_every_option_that_changes_the_kernel():
    # A choice tuned on one kernel must never be reused for another: every constexpr option and the GQA group.
    for option in ("alignment", "group_size", "IS_VARLEN", "MASK_KIND", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_WINDOW_LEFT",
                   "HAS_WINDOW_RIGHT", "HAS_DROPOUT", "ALIGN_TO_END", "DOT_PRECISION", "HEAD_DIM", "HEAD_DIM_V",
                   "TRANSPOSED_DQ"):
        assert option in configs.TUNING_KEY, option


def test_seqlen_buckets_are_powers_of_two_from_16():
    assert [configs.seqlen_bucket(n) for n in (1, 16, 17, 20, 32, 33, 4096, 4097)] == [
        16, 16, 32, 32, 32, 64, 4096, 8192]
    kernel_tuners = (launch.FORWARD, launch.FORWARD_TMA, launch.BACKWARD_DKDV, launch.BACKWARD_DKDV_FUSED_DQ,
                     launch.BACKWARD_DQ)
    for tuner in [tuners.gpu for tuners in kernel_tuners] + [tuners.interpreter for tuners in kernel_tuners]:
        assert "seqlen_q_bucket" in tuner.keys and "seqlen_k_bucket" in tuner.keys and "DOT_PRECISION" in tuner.keys
        assert "seqlen_q" not in tuner.keys and "seqlen_k" not in tuner.keys


class _RecordingTuner:
    """Wraps an autotuned kernel: records the autotune key of each launch (as the autotuner builds it from the
    key names, skipping those the kernel lacks), then launches. The interpreter has one config, so the autotuner
    keeps no cache to inspect."""

    def __init__(self, tuner):
        self.tuner, self.keys = tuner, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = {**dict(zip(self.tuner.arg_names, args)), **kwargs}
            self.keys.append(tuple(named[name] for name in self.tuner.keys if name in named))
            return self.tuner[grid](*args, **kwargs)

        return launch


@pytest.mark.interpreter
def test_varlen_max_lengths_in_one_bucket_share_the_autotune_key(monkeypatch):
    forward = _RecordingTuner(launch.FORWARD.interpreter)
    backward = _RecordingTuner(launch.BACKWARD_DKDV_FUSED_DQ.interpreter)
    monkeypatch.setattr(launch.FORWARD, "interpreter", forward)
    monkeypatch.setattr(launch.BACKWARD_DKDV_FUSED_DQ, "interpreter", backward)
    for lengths in ([17, 5], [20, 9], [33, 9]):  # max lengths 17, 20 (bucket 32), then 33 (bucket 64)
        q, k, v, layout = varlen_inputs(lengths, lengths, 2, 1, 16, 16, torch.float32)
        check_against_reference(q, k, v, scale=0.25, **layout)
    for tuner in (forward, backward):
        key_17, key_20, key_33 = tuner.keys
        assert key_17 == key_20, "max lengths 17 and 20 must reuse one autotune entry"
        assert key_33 != key_17


# --------------------------------------------------------------------------------------------
# The Hopper forward that loads Q/K/V tiles through TMA descriptors (USE_TMA)
# --------------------------------------------------------------------------------------------


class _PointerForwardForbidden:
    def __getitem__(self, grid):
        raise AssertionError("the pointer forward ran although use_tma=True selected the TMA path")


class _TmaForwardForbidden:
    def __getitem__(self, grid):
        raise AssertionError("the TMA forward ran although use_tma=False selected the pointer path")


@pytest.fixture
def forced_tma(monkeypatch):
    """The pointer forward unreachable (the tests pass use_tma=True), so that no silent fallback can pass."""
    monkeypatch.setattr(launch.FORWARD, "interpreter", _PointerForwardForbidden())


# Ragged lengths (17, 129: the last tile is mostly past the sequence, which the descriptor zero-fills),
# head dims 64 and 128, GQA/MQA, Dv ≠ D, and the band options the path is meant for.
TMA_CASES = {
    "noncausal-L17-S129-d64": ((1, 2, 2, 17, 129, 64, 64), {}),
    "noncausal-gqa-L129-S17-d128": ((2, 4, 2, 129, 17, 128, 128), {}),
    "causal-top-left-gqa-L129-S129-d64": ((1, 4, 2, 129, 129, 64, 64), dict(window_right=0)),
    "causal-bottom-right-L17-S129-d128": ((1, 2, 1, 17, 129, 128, 128), dict(window_right=0, diagonal_offset=112)),
    "sliding-window-L129-S17-d64": ((1, 2, 2, 129, 17, 64, 64), dict(window_left=5, window_right=3,
                                                                     diagonal_offset=-100)),
    "softcap-mqa-d64-dv128": ((1, 4, 1, 17, 47, 64, 128), dict(softcap=3.0, window_right=0, align_to_end=True)),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", TMA_CASES)
def test_tma_forward_matches_reference(name, forced_tma):
    shape, options = TMA_CASES[name]
    q, k, v = make_inputs(*shape, torch.float16)  # fp32 is not a TMA dtype; bf16 only on the GPU
    check_against_reference(q, k, v, scale=shape[5] ** -0.5, use_tma=True, **options)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", OPTIONS)
def test_tma_forward_composes_with_every_dense_option(name, forced_tma):
    # Only the tile loads differ from the pointer path, so ALiBi, masks and dropout come along unchanged.
    q, k, v = make_inputs(2, 2, 1, 33, 47, 32, 32, torch.float16)
    check_against_reference(q, k, v, scale=0.3, use_tma=True, **OPTIONS[name])


@pytest.mark.interpreter
def test_tma_forward_with_mask_and_dropout(forced_tma):
    q, k, v = make_inputs(2, 2, 1, 33, 47, 16, 16, torch.float16)
    mask = (torch.rand(2, 1, 33, 47) > 0.3).expand(2, 2, 33, 47)
    check_against_reference(q, k, v, scale=0.25, mask=mask, window_right=4, use_tma=True)
    keep = kernels.attention_dropout_keep_mask(2, 2, 33, 47, **DROPOUT, device="cpu")
    check_against_reference(q, k, v, scale=0.25, dropout_keep_mask=keep, use_tma=True, **DROPOUT)


@pytest.mark.interpreter
def test_tma_forward_equals_pointer_forward_bitwise():
    # The interpreter runs both paths' arithmetic in the same order: any difference is a loading bug.
    q, k, v = make_inputs(1, 4, 2, 129, 17, 64, 64, torch.float16)
    options = dict(scale=0.125, window_left=40, window_right=0, diagonal_offset=-100)
    pointer = kernels.attention_forward(q, k, v, use_tma=False, **options)
    tma = kernels.attention_forward(q, k, v, use_tma=True, **options)
    assert torch.equal(pointer[0], tma[0]) and torch.equal(pointer[1], tma[1])


@pytest.mark.interpreter
def test_tma_is_chosen_by_the_caller_and_its_eligibility_is_pure(monkeypatch):
    q, k, v = make_inputs(1, 2, 1, 17, 17, 64, 64, torch.float16)
    # The default is the pointer path, whatever the call: choosing TMA is dispatch's job, not the launcher's.
    tma_tuner = launch.FORWARD_TMA.interpreter
    monkeypatch.setattr(launch.FORWARD_TMA, "interpreter", _TmaForwardForbidden())
    pointer_out, _ = kernels.attention_forward(q, k, v, scale=0.125)
    monkeypatch.setattr(launch.FORWARD_TMA, "interpreter", tma_tuner)
    monkeypatch.setattr(launch.FORWARD, "interpreter", _PointerForwardForbidden())
    tma_out, _ = kernels.attention_forward(q, k, v, scale=0.125, use_tma=True)
    assert torch.equal(pointer_out, tma_out)
    with pytest.raises(TypeError, match="use_tma must be a bool"):
        kernels.attention_forward(q, k, v, scale=0.125, use_tma="yes")
    # The rule reads metadata and the given capability only: the same answer on meta tensors, for any device.
    meta = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta") for x in (q, k, v)]
    for tensors in ((q, k, v), meta):
        assert kernels.tma_unsupported_reason(*tensors, varlen=False, capability=(9, 0)) is None
        assert "compute capability >= 9.0 (not a CUDA GPU)" in kernels.tma_unsupported_reason(
            *tensors, varlen=False, capability=None)
        assert "compute capability 8.0" in kernels.tma_unsupported_reason(*tensors, varlen=False, capability=(8, 0))
        assert "varlen" in kernels.tma_unsupported_reason(*tensors, varlen=True, capability=(9, 0))
    # A meta view's pointer carries its storage offset, so misalignment shows without data.
    shifted = torch.empty(4 + 2 * 17 * 64, dtype=torch.float16, device="meta")[4:].view(1, 2, 17, 64)
    assert "not 16-byte aligned" in kernels.tma_unsupported_reason(shifted, *meta[1:], varlen=False,
                                                                   capability=(9, 0))


def test_tma_rule_reads_no_address_while_torch_compile_traces(monkeypatch):
    """Under torch.compile the operands are fake tensors with no address (data_ptr raises): the rule reads
    the storage offset instead, so a fullgraph compile on a Hopper GPU can still choose the TMA variant."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    # A fake tensor's data_ptr warns ("almost definitely a bug ... with torch.compile") or, in other
    # torch versions, raises: as an error here, either way the rule must not reach it.
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        q, k, v = (torch.empty(1, 2, 32, 64, dtype=torch.float16) for _ in range(3))
        assert kernels.tma_unsupported_reason(q, k, v, varlen=False, capability=(9, 0)) is None
        shifted = torch.empty(4 + 2 * 32 * 64, dtype=torch.float16)[4:].view(1, 2, 32, 64)
        assert "not 16-byte aligned" in kernels.tma_unsupported_reason(shifted, k, v, varlen=False,
                                                                       capability=(9, 0))
        assert launch._alignment(q, k, v) == configs.ALIGNED
        assert launch._alignment(shifted, k, v) == configs.UNALIGNED


class _TmaLaunchFails:
    """Stands in for the TMA forward's autotuner: its launch raises, as a compile error of an older Triton would."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("simulated TMA compile error")

        return launch


@pytest.mark.interpreter
def test_tma_launch_failure_leaves_no_state_behind(monkeypatch):
    # There is no fallback and no process-wide switch: a failed TMA launch raises, the next pointer call is
    # unaffected, and the next TMA call tries TMA again.
    q, k, v = make_inputs(1, 2, 1, 33, 47, 64, 64, torch.float16)
    options = dict(scale=0.125, window_right=0)
    pointer_out, pointer_lse = kernels.attention_forward(q, k, v, **options)
    monkeypatch.setattr(launch.FORWARD_TMA, "interpreter", _TmaLaunchFails())
    for _ in range(2):
        with pytest.raises(RuntimeError, match="simulated TMA compile error"):
            kernels.attention_forward(q, k, v, use_tma=True, **options)
        out, lse = kernels.attention_forward(q, k, v, **options)
        assert torch.equal(out, pointer_out) and torch.equal(lse, pointer_lse)


@pytest.mark.interpreter
def test_tma_launch_failure_with_forced_tma_propagates(monkeypatch):
    import warnings

    q, k, v = make_inputs(1, 2, 1, 33, 47, 64, 64, torch.float16)
    monkeypatch.setattr(launch.FORWARD_TMA, "interpreter", _TmaLaunchFails())
    monkeypatch.setattr(launch.FORWARD, "interpreter", _PointerForwardForbidden())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="simulated TMA compile error"):
            kernels.attention_forward(q, k, v, scale=0.125, use_tma=True)


def _misaligned_rows(dtype=torch.float16):
    return random_tensor(1, 2, 17, 68, dtype=dtype)[..., :64]  # a 136-byte row stride


def _misaligned_base(dtype=torch.float16):
    return random_tensor(4 + 2 * 17 * 64, dtype=dtype)[4:].view(1, 2, 17, 64)  # starts 8 bytes in


TMA_INELIGIBLE = [
    ("fp32", dict(dtype=torch.float32), "dtype torch.float32 is not supported"),
    ("head-dim-80", dict(head_dim=80), "head dim 80"),
    ("head-dim-8", dict(head_dim=8), "head dim 8"),
    ("feature-stride-2", dict(q=lambda: random_tensor(1, 2, 17, 128, dtype=torch.float16)[..., ::2]),
     "q has feature stride 2"),
    ("row-stride-136-bytes", dict(k=_misaligned_rows), "k is not 16-byte aligned"),
    ("base-8-bytes-in", dict(v=_misaligned_base), "v is not 16-byte aligned"),
    ("varlen", dict(varlen=True), "varlen layout"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("case, change, message", TMA_INELIGIBLE, ids=[case[0] for case in TMA_INELIGIBLE])
def test_tma_forced_on_an_ineligible_call_raises_the_reason(case, change, message):
    change = dict(change)
    dtype, head_dim = change.pop("dtype", torch.float16), change.pop("head_dim", 64)
    q, k, v = make_inputs(1, 2, 2, 17, 17, head_dim, head_dim, dtype)
    tensors = dict(q=q, k=k, v=v)
    tensors.update({name: change.pop(name)() for name in tensors if name in change})
    q, k, v = tensors.values()
    layout = {}
    if change.pop("varlen", False):
        q, k, v, layout = varlen_inputs([17, 5], [17, 9], 2, 2, 64, 64, torch.float16)
    with pytest.raises(ValueError, match=f"use_tma=True, but .*{message}"):
        kernels.attention_forward(q, k, v, scale=0.125, use_tma=True, **layout)
    check_against_reference(q, k, v, scale=0.125, **layout)  # the pointer path takes every one of them


# On an H100 (plain pytest process): the TMA path against the pointer path and the float64 reference.
TMA_GPU_SHAPES = [
    (2, 8, 2, 1000, 1037, 128, 128),
    (1, 4, 4, 129, 4096, 64, 64),
    (1, 4, 1, 4097, 257, 256, 256),
    (3, 2, 2, 17, 129, 64, 128),
]
TMA_GPU_OPTIONS = {
    "noncausal": {},
    "causal-bottom-right": dict(window_right=0, align_to_end=True),
    "sliding-window": dict(window_left=256, window_right=0, align_to_end=True),
    "softcap": dict(softcap=30.0),
}


@pytest.mark.requires_cuda
@pytest.mark.requires_sm90
@pytest.mark.skipif(INTERPRET, reason="GPU test: run it in the plain process, without TRITON_INTERPRET")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", TMA_GPU_OPTIONS)
@pytest.mark.parametrize("shape", TMA_GPU_SHAPES, ids=lambda s: "B{}_H{}_Hk{}_L{}_S{}_D{}_Dv{}".format(*s))
def test_gpu_tma_forward_matches_pointer_forward_and_reference(shape, options, dtype):
    q, k, v = (x.cuda() for x in make_inputs(*shape, dtype))
    call = dict(scale=shape[5] ** -0.5, **TMA_GPU_OPTIONS[options])
    capability = torch.cuda.get_device_capability(q.device)
    assert kernels.tma_unsupported_reason(q, k, v, varlen=False, capability=capability) is None
    out_tma, lse_tma = kernels.attention_forward(q, k, v, use_tma=True, **call)
    out_pointer, lse_pointer = kernels.attention_forward(q, k, v, use_tma=False, **call)
    ref_out, ref_lse = reference_attention(q.double(), k.double(), v.double(), **call)
    finite = torch.isfinite(ref_lse)  # causal with L > S: the first L − S rows see no key (lse = −inf)
    for name, out, lse in (("tma", out_tma, lse_tma), ("pointer", out_pointer, lse_pointer)):
        assert_close(out, ref_out, RTOL[dtype], f"{name} out")
        assert torch.equal(torch.isneginf(lse), ~finite), f"{name} lse: −inf rows differ from the reference"
        assert_close(lse[finite], ref_lse[finite], RTOL[torch.float32], f"{name} lse")
    # Same tiles, same online softmax: the paths agree far inside the dtype's tolerance.
    assert relative_error(out_tma, out_pointer.double()) <= RTOL[dtype] / 4



@pytest.mark.requires_cuda
@pytest.mark.requires_sm90
@pytest.mark.skipif(INTERPRET, reason="GPU test: run it in the plain process, without TRITON_INTERPRET")
def test_gpu_tma_ineligible_calls_name_their_reason_and_run_on_pointers(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 dots in IEEE fp32
    q, k, v = (x.cuda() for x in make_inputs(1, 2, 1, 65, 65, 64, 64, torch.bfloat16))
    capability = torch.cuda.get_device_capability(q.device)
    assert kernels.tma_unsupported_reason(q, k, v, varlen=False, capability=capability) is None
    rows_136_bytes = random_tensor(1, 2, 65, 68, dtype=torch.bfloat16, device="cuda")[..., :64]
    cases = {"fp32": ((q.float(), k.float(), v.float()), RTOL[torch.float32]),
             "misaligned": ((rows_136_bytes, k, v), RTOL[q.dtype])}
    for name, (inputs, rtol) in cases.items():
        reason = kernels.tma_unsupported_reason(*inputs, varlen=False, capability=capability)
        assert reason is not None, name
        with pytest.raises(ValueError, match="use_tma=True, but"):
            kernels.attention_forward(*inputs, scale=0.125, use_tma=True)
        out, _ = kernels.attention_forward(*inputs, scale=0.125)
        ref, _ = reference_attention(*(x.double() for x in inputs), scale=0.125)
        assert_close(out, ref, rtol, name)


# --------------------------------------------------------------------------------------------
# GPU only (plain pytest process): fp32 precision and the launch device
# --------------------------------------------------------------------------------------------


def _gpu_forward_backward(q, k, v, grad_out, **options):
    out, lse = kernels.attention_forward(q, k, v, **options)
    return (out, lse, *kernels.attention_backward(grad_out, q, k, v, out, lse, deterministic=True, **options))


@pytest.mark.requires_cuda
@pytest.mark.skipif(INTERPRET, reason="GPU test: run it in the plain process, without TRITON_INTERPRET")
@pytest.mark.parametrize("options", [{}, dict(window_right=0, align_to_end=True)], ids=["noncausal", "causal"])
def test_gpu_fp32_is_strict_fp32_unless_tf32_is_allowed(options, monkeypatch):
    # Long rows and head dim 128: TF32's 10-bit mantissa would miss the 1e-5 bound by two orders of magnitude.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q, k, v = (x.cuda() for x in make_inputs(2, 4, 2, 300, 513, 128, 128, torch.float32))
    grad_out = random_tensor(2, 4, 300, 128, device="cuda")
    results = _gpu_forward_backward(q, k, v, grad_out, scale=128 ** -0.5, **options)
    references = reference_with_grads(q, k, v, grad_out, scale=128 ** -0.5, **options)
    for name, result, reference in zip(("out", "lse", "dq", "dk", "dv"), results, references):
        finite = torch.isfinite(reference)
        assert_close(result[finite], reference[finite], RTOL[torch.float32], name)
    # With TF32 allowed the kernels follow torch into TF32: still within its own bound.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert launch._dot_precision(torch.float32) == "tf32"
    out, _ = kernels.attention_forward(q, k, v, scale=128 ** -0.5, **options)
    assert_close(out, references[0], RTOL_TF32, "tf32 out")


@pytest.mark.requires_cuda
@pytest.mark.skipif(INTERPRET, reason="GPU test: run it in the plain process, without TRITON_INTERPRET")
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA GPUs: inputs on a device other than the current one")
def test_gpu_launchers_run_on_the_inputs_device():
    # Triton launches on the current device; the launchers must switch to the inputs' (cuda:1, current cuda:0).
    torch.cuda.set_device(0)
    device = torch.device("cuda", 1)
    q, k, v = (x.to(device) for x in make_inputs(2, 4, 2, 65, 97, 64, 64, torch.float16))
    grad_out = random_tensor(2, 4, 65, 64, dtype=torch.float16, device=device)
    options = dict(scale=0.125, window_right=0, dropout_p=0.2, seed=11)
    results = _gpu_forward_backward(q, k, v, grad_out, **options)
    keep = kernels.attention_dropout_keep_mask(2, 4, 65, 97, dropout_p=0.2, seed=11, device=device)
    assert torch.cuda.current_device() == 0, "the launchers must restore the current device"
    assert all(result.device == device for result in (*results, keep))
    assert torch.equal(keep.cpu(), kernels.attention_dropout_keep_mask(2, 4, 65, 97, dropout_p=0.2, seed=11,
                                                                       device="cuda:0").cpu())
    references = reference_with_grads(q, k, v, grad_out, dropout_keep_mask=keep, scale=0.125, window_right=0,
                                      dropout_p=0.2)
    for name, result, reference in zip(("out", "lse", "dq", "dk", "dv"), results, references):
        rtol = RTOL[torch.float32] if name == "lse" else RTOL[torch.float16]
        assert_close(result, reference, rtol, name)
