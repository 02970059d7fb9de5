"""Flash attention in Triton: forward, backward (preprocess + dK/dV + dQ), dropout keep mask.

The algorithm and its invariants are in docs/attention.md; the option semantics are those of
``pyattn.reference.attention`` (the tests hold the two equal). In brief:

* forward: one program per (query tile, batch·head) streams key tiles with an online softmax in
  fp32 (``exp2``, log2(e) folded into the scale), and writes out and the natural-log LSE;
* on Hopper (dense layout, fp16/bf16, power-of-two head dims, 16-byte-aligned strides) the same forward
  kernel loads its Q/K/V tiles through TMA tensor descriptors (``USE_TMA``); ``PYATTN_ATTENTION_TMA=0/1``
  overrides the automatic choice;
* the key tiles a query tile can see are cut to the causal/sliding-window band before the loop;
  tiles wholly inside the band and the sequence run without any visibility arithmetic, only the
  band's edge tiles and the ragged last tile compute it;
* backward: delta = rowsum(dO·O), then one program per (key tile, batch·kv-head) accumulates
  dK/dV over every query head of its GQA group (no atomics), and dQ is either added atomically
  by that same program (fast) or computed by its own kernel looping over key tiles
  (``deterministic=True``);
* dropout draws Philox numbers whose counter is (j, i, batch·heads + head): a pure function of the
  element, so the backward and :func:`attention_dropout_keep_mask` regenerate the forward's pattern.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch
import triton
import triton.language as tl

from pyattn._layout import new_attention_output
from pyattn.kernels._aot import CompileSpec
from pyattn.kernels._launch import on_input_device

try:  # host-side TMA descriptors: Triton >= 3.4 (users run 3.6)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256

# Mask kinds (constexpr MASK_KIND).
_NO_MASK, _BOOL_MASK, _ADDITIVE_MASK = 0, 1, 2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # From exp2 of a non-positive argument: no overflow, exact ±1 saturation, and no dependence on
    # libdevice, whose module path moved between Triton versions.
    e = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _dropout_keep(seed, batch_head, rows, cols, dropout_p):
    """True where the element (batch_head, i = rows, j = cols) survives dropout; rows/cols broadcast."""
    zero = (rows * 0 + cols * 0).to(tl.uint32)
    random, _, _, _ = tl.philox(seed, cols.to(tl.uint32) + zero, rows.to(tl.uint32) + zero,
                                zero + batch_head.to(tl.uint32), zero)
    return tl.uint_to_uniform_float(random) >= dropout_p


@triton.jit
def _attention_scores(qk, rows, cols, seqlen_q, seqlen_k, scale, softcap, slope, window_left, window_right,
                      diagonal_offset, mask_ptr, stride_mm, stride_mn,
                      MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                      HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, ON_EDGE: tl.constexpr):
    """Scores of one tile in log2 units, −inf where the key is invisible, and tanh(s / softcap).

    ``rows`` (query index i) and ``cols`` (key index j) broadcast to the tile's shape, so the same
    code serves the (M, N) tiles of the forward/dQ and the transposed (N, M) tiles of dK/dV.
    ``ON_EDGE`` tiles straddle the window band or the end of a sequence and check visibility;
    the others were proven fully visible when the loop bounds were cut.
    """
    if HAS_SOFTCAP:
        tanh = _tanh(qk * (scale / softcap))
        s = tanh * (softcap * _LOG2E)
    else:
        tanh = qk
        s = qk * (scale * _LOG2E)
    if HAS_ALIBI:
        distance = tl.abs(rows + diagonal_offset - cols).to(tl.float32)
        s -= (slope * _LOG2E) * distance
    if MASK_KIND != 0:
        in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
        mask = tl.load(mask_ptr + rows * stride_mm + cols * stride_mn, mask=in_bounds, other=0)
        if MASK_KIND == 1:
            s = tl.where(mask != 0, s, float("-inf"))
        else:
            s += mask.to(tl.float32) * _LOG2E
    if ON_EDGE:
        visible = (rows < seqlen_q) & (cols < seqlen_k)
        if HAS_WINDOW_LEFT:
            visible &= cols >= rows + diagonal_offset - window_left
        if HAS_WINDOW_RIGHT:
            visible &= cols <= rows + diagonal_offset + window_right
        s = tl.where(visible, s, float("-inf"))
    return s, tanh


@triton.jit
def _load_tile(ptrs, rows, num_rows, cols, NUM_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr):
    """Load a (rows, cols) tile, masking only the bounds that can be crossed (constexpr)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < num_rows) & (cols[None, :] < NUM_COLS), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < num_rows, other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < NUM_COLS, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_kv_tile(base, batch, kv_head, start_n, offs_n, seqlen_k, offs_d, stride_n, stride_d, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_PADDED: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
                  ON_EDGE: tl.constexpr):
    """A (BLOCK_N, HEAD_DIM_PADDED) key or value tile. With USE_TMA ``base`` is the (B, H, S, D) tensor
    descriptor (one bulk copy; keys past the sequence are zero-filled, as the masked load fills them),
    else the pointer to this (batch, kv head)'s first row."""
    if USE_TMA:
        tile = base.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PADDED)
    else:
        tile = _load_tile(base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, offs_n, seqlen_k, offs_d,
                          HEAD_DIM, ON_EDGE, HEAD_DIM != HEAD_DIM_PADDED)
    return tile


@triton.jit
def _sequence_bounds(cu_seqlens, batch, max_seqlen, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence ``batch``: from cu_seqlens in the varlen layout, else (0, max)."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + batch)
        length = tl.load(cu_seqlens + batch + 1) - start
    else:
        start = batch * 0
        length = max_seqlen + batch * 0
    return start, length


@triton.jit
def _key_ranges(start_m, seqlen_k, window_left, window_right, diagonal_offset, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr):
    """Key tiles of query tile [start_m, start_m + BLOCK_M): [lo, hi) holds every visible key and
    [interior_lo, interior_hi) the tiles visible to every row of the tile and inside the sequence.

    Key j is visible to row i iff i + offset − left ≤ j ≤ i + offset + right. Values are clamped at 0
    before dividing because Triton's integer division truncates toward zero.
    """
    lo = start_m * 0
    hi = seqlen_k + start_m * 0
    interior_lo = lo
    interior_hi = seqlen_k // BLOCK_N * BLOCK_N + start_m * 0
    if HAS_WINDOW_LEFT:
        lo = tl.maximum(start_m + diagonal_offset - window_left, 0) // BLOCK_N * BLOCK_N
        last_row_first_key = tl.maximum(start_m + BLOCK_M - 1 + diagonal_offset - window_left, 0)
        interior_lo = tl.maximum(lo, tl.cdiv(last_row_first_key, BLOCK_N) * BLOCK_N)
    if HAS_WINDOW_RIGHT:
        hi = tl.minimum(hi, tl.maximum(start_m + BLOCK_M + diagonal_offset + window_right, 0))
        first_row_end = tl.maximum(start_m + diagonal_offset + window_right + 1, 0)
        interior_hi = tl.minimum(interior_hi, first_row_end // BLOCK_N * BLOCK_N)
    interior_lo = tl.minimum(interior_lo, hi)
    interior_hi = tl.maximum(interior_hi, interior_lo)
    return lo, interior_lo, interior_hi, hi


@triton.jit
def _query_ranges(start_n, seqlen_q, seqlen_k, window_left, window_right, diagonal_offset, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr):
    """Query tiles of key tile [start_n, start_n + BLOCK_N), as :func:`_key_ranges` with roles swapped.

    Row i sees key j iff j − offset − right ≤ i ≤ j − offset + left. A key tile that crosses the end
    of its sequence has no interior: its padding columns must be masked for the fused dQ.
    """
    lo = start_n * 0
    hi = seqlen_q + start_n * 0
    interior_lo = lo
    interior_hi = seqlen_q // BLOCK_M * BLOCK_M + start_n * 0
    if HAS_WINDOW_RIGHT:
        lo = tl.maximum(start_n - diagonal_offset - window_right, 0) // BLOCK_M * BLOCK_M
        last_key_first_row = tl.maximum(start_n + BLOCK_N - 1 - diagonal_offset - window_right, 0)
        interior_lo = tl.maximum(lo, tl.cdiv(last_key_first_row, BLOCK_M) * BLOCK_M)
    if HAS_WINDOW_LEFT:
        hi = tl.minimum(hi, tl.maximum(start_n + BLOCK_N - diagonal_offset + window_left, 0))
        first_key_end = tl.maximum(start_n - diagonal_offset + window_left + 1, 0)
        interior_hi = tl.minimum(interior_hi, first_key_end // BLOCK_M * BLOCK_M)
    interior_lo = tl.minimum(interior_lo, hi)
    interior_hi = tl.maximum(interior_hi, interior_lo)
    if start_n + BLOCK_N > seqlen_k:
        interior_hi = interior_lo
    return lo, interior_lo, interior_hi, hi


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attention_forward_inner(acc, row_sum, row_max, q, k_ptr, v_ptr, mask_ptr, key_start, key_end, rows,
                             offs_dk, offs_dv, seqlen_q, seqlen_k, stride_kn, stride_kd, stride_vn, stride_vd,
                             stride_mm, stride_mn, scale, softcap, slope, window_left, window_right,
                             diagonal_offset, dropout_p, seed, batch, kv_head, batch_head,
                             HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                             HEAD_DIM_V_PADDED: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                             HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr,
                             HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
                             ON_EDGE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_kv_tile(k_ptr, batch, kv_head, start_n, offs_n, seqlen_k, offs_dk, stride_kn, stride_kd, HEAD_DIM,
                          HEAD_DIM_PADDED, BLOCK_N, USE_TMA, ON_EDGE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = _attention_scores(qk, rows[:, None], offs_n[None, :], seqlen_q, seqlen_k, scale, softcap, slope,
                                 window_left, window_right, diagonal_offset, mask_ptr, stride_mm, stride_mn,
                                 MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, ON_EDGE)
        # Invariant: acc = Σ_j exp2(s_ij − row_max_i) v_j and row_sum = Σ_j exp2(s_ij − row_max_i) over
        # the keys seen so far. A row that has seen only invisible keys keeps row_max = −inf; shifting it
        # by 0 instead keeps exp2 free of −inf − (−inf).
        new_max = tl.maximum(row_max, tl.max(s, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(s - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None]
        if HAS_DROPOUT:
            # Dropped after the denominator: dropout acts on normalised probabilities (1/(1−p) at the end).
            keep = _dropout_keep(seed, batch_head, rows[:, None], offs_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_kv_tile(v_ptr, batch, kv_head, start_n, offs_n, seqlen_k, offs_dv, stride_vn, stride_vd, HEAD_DIM_V,
                          HEAD_DIM_V_PADDED, BLOCK_N, USE_TMA, ON_EDGE)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Out, Lse, Mask, AlibiSlopes, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    num_heads, group_size, seqlen_q, seqlen_k, seqlen_q_bucket, seqlen_k_bucket,
    scale, softcap, window_left, window_right, diagonal_offset, dropout_p, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile of one head. With USE_TMA (dense layout, Hopper) Q, K, V are (B, H, rows, D) tensor
    descriptors and their strides are unused; everything but the tile loads is the same code."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = batch * num_heads + head
    kv_head = head // group_size
    q_start, seqlen_q_b = _sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    k_start, seqlen_k_b = _sequence_bounds(CuSeqlensK, batch, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q_b:  # a varlen sequence shorter than the grid's max_seqlen_q
        return
    if ALIGN_TO_END:  # count the diagonal from this sequence's own bottom-right corner
        diagonal_offset += seqlen_k_b - seqlen_q_b

    batch64, head64, kv_head64 = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, HEAD_DIM_PADDED)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    if USE_TMA:
        q = Q.load([batch, head, start_m, 0]).reshape(BLOCK_M, HEAD_DIM_PADDED)
        k_ptr = K
        v_ptr = V
    else:
        q_ptr = Q + batch64 * stride_qb + head64 * stride_qh + q_start.to(tl.int64) * stride_qm
        k_ptr = K + batch64 * stride_kb + kv_head64 * stride_kh + k_start.to(tl.int64) * stride_kn
        v_ptr = V + batch64 * stride_vb + kv_head64 * stride_vh + k_start.to(tl.int64) * stride_vn
        q = _load_tile(q_ptr + rows[:, None] * stride_qm + offs_dk[None, :] * stride_qd, rows, seqlen_q_b, offs_dk,
                       HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PADDED)
    mask_ptr = Mask
    if MASK_KIND != 0:
        mask_ptr = Mask + batch64 * stride_mb + head64 * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(AlibiSlopes + batch * stride_ab + head * stride_ah)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PADDED], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    lo, interior_lo, interior_hi, hi = _key_ranges(start_m, seqlen_k_b, window_left, window_right, diagonal_offset,
                                                   BLOCK_M, BLOCK_N, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
    # Three passes over the band: leading edge tiles, interior tiles (no visibility arithmetic), trailing edge.
    acc, row_sum, row_max = _attention_forward_inner(
        acc, row_sum, row_max, q, k_ptr, v_ptr, mask_ptr, lo, interior_lo, rows, offs_dk, offs_dv, seqlen_q_b,
        seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap, slope,
        window_left, window_right, diagonal_offset, dropout_p, seed, batch, kv_head, batch_head, HEAD_DIM,
        HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT, HAS_DROPOUT, USE_TMA, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)
    acc, row_sum, row_max = _attention_forward_inner(
        acc, row_sum, row_max, q, k_ptr, v_ptr, mask_ptr, interior_lo, interior_hi, rows, offs_dk, offs_dv,
        seqlen_q_b, seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
        slope, window_left, window_right, diagonal_offset, dropout_p, seed, batch, kv_head, batch_head, HEAD_DIM,
        HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT, HAS_DROPOUT, USE_TMA, ON_EDGE=False, DOT_PRECISION=DOT_PRECISION)
    acc, row_sum, row_max = _attention_forward_inner(
        acc, row_sum, row_max, q, k_ptr, v_ptr, mask_ptr, interior_hi, hi, rows, offs_dk, offs_dv, seqlen_q_b,
        seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap, slope,
        window_left, window_right, diagonal_offset, dropout_p, seed, batch, kv_head, batch_head, HEAD_DIM,
        HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT,
        HAS_WINDOW_RIGHT, HAS_DROPOUT, USE_TMA, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)

    # A row with no visible key has row_sum = 0: output 0 and lse = −inf, never 0/0.
    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * _LN2, float("-inf"))
    o_ptr = Out + batch64 * stride_ob + head64 * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_ptr + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=(rows[:, None] < seqlen_q_b) & (offs_dv[None, :] < HEAD_DIM_V))
    lse_ptr = Lse + batch64 * stride_lb + head64 * stride_lh + q_start.to(tl.int64) * stride_lm
    tl.store(lse_ptr + rows * stride_lm, lse, mask=rows < seqlen_q_b)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _attention_backward_preprocess_kernel(
    Out, GradOut, Delta, CuSeqlensQ,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_db, stride_dh, stride_dm,
    seqlen_q,
    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = Σ_d dO_id · O_id (fp32): the row term of dS = P ∘ (dP − delta)."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start, seqlen_q_b = _sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    if start_m >= seqlen_q_b:
        return
    batch64, head64, q_start64 = batch.to(tl.int64), head.to(tl.int64), q_start.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    o_ptr = Out + batch64 * stride_ob + head64 * stride_oh + q_start64 * stride_om
    g_ptr = GradOut + batch64 * stride_gb + head64 * stride_gh + q_start64 * stride_gm
    out = _load_tile(o_ptr + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, rows, seqlen_q_b, offs_dv,
                     HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    grad_out = _load_tile(g_ptr + rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd, rows, seqlen_q_b,
                          offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    d_ptr = Delta + batch64 * stride_db + head64 * stride_dh + q_start64 * stride_dm
    tl.store(d_ptr + rows * stride_dm, delta, mask=rows < seqlen_q_b)


@triton.jit
def _attention_backward_dkdv_inner(dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, row_start,
                                   row_end, cols, offs_dk, offs_dv, seqlen_q, seqlen_k, stride_qm, stride_qd,
                                   stride_gm, stride_gd, stride_dqm, stride_dqd, stride_lm, stride_dm, stride_mm,
                                   stride_mn, scale, softcap, slope, window_left, window_right, diagonal_offset,
                                   dropout_p, seed, batch_head,
                                   HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                                   HEAD_DIM_V_PADDED: tl.constexpr, BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr,
                                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                                   HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
                                   HAS_DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr, ON_EDGE: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr):
    # Tiles are transposed, (keys, queries), so that dK and dV accumulate as plain dot products.
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr + rows[:, None] * stride_qm + offs_dk[None, :] * stride_qd, rows, seqlen_q, offs_dk,
                       HEAD_DIM, ON_EDGE, HEAD_DIM != HEAD_DIM_PADDED)
        grad_out = _load_tile(g_ptr + rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd, rows, seqlen_q,
                              offs_dv, HEAD_DIM_V, ON_EDGE, HEAD_DIM_V != HEAD_DIM_V_PADDED)
        if ON_EDGE:
            lse = tl.load(lse_ptr + rows * stride_lm, mask=rows < seqlen_q, other=0.0)
            delta = tl.load(delta_ptr + rows * stride_dm, mask=rows < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows * stride_lm)
            delta = tl.load(delta_ptr + rows * stride_dm)
        # Rows with no visible key (lse = −inf) get P = exp2(−inf − inf) = 0 rather than NaN.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        s_t, tanh_t = _attention_scores(qk_t, rows[None, :], cols[:, None], seqlen_q, seqlen_k, scale, softcap, slope,
                                        window_left, window_right, diagonal_offset, mask_ptr, stride_mm, stride_mn,
                                        MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, ON_EDGE)
        p_t = tl.exp2(s_t - lse2[None, :])
        dp_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = _dropout_keep(seed, batch_head, rows[None, :], cols[:, None], dropout_p)
            rescale = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keep_t, p_t * rescale, 0.0).to(grad_out.dtype), grad_out, dv,
                        input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * rescale, 0.0)
        else:
            dv = tl.dot(p_t.to(grad_out.dtype), grad_out, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        ds_t = ds_t.to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
        if FUSED_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(dq_ptr + rows[:, None] * stride_dqm + offs_dk[None, :] * stride_dqd, dq,
                          mask=(rows[:, None] < seqlen_q) & (offs_dk[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, DQ, DK, DV, Mask, AlibiSlopes, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    num_heads, group_size, seqlen_q, seqlen_k, seqlen_q_bucket, seqlen_k_bucket,
    scale, softcap, window_left, window_right, diagonal_offset, dropout_p, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of one kv head: dK, dV summed over the query heads of its GQA group, no atomics.
    With FUSED_DQ it also adds each (query tile, key tile) term of dQ into the fp32 buffer DQ."""
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start, seqlen_q_b = _sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    k_start, seqlen_k_b = _sequence_bounds(CuSeqlensK, batch, seqlen_k, IS_VARLEN)
    if start_n >= seqlen_k_b:
        return
    if ALIGN_TO_END:  # count the diagonal from this sequence's own bottom-right corner
        diagonal_offset += seqlen_k_b - seqlen_q_b
    batch64, kv_head64 = batch.to(tl.int64), kv_head.to(tl.int64)
    q_start64, k_start64 = q_start.to(tl.int64), k_start.to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, HEAD_DIM_PADDED)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    k_ptr = K + batch64 * stride_kb + kv_head64 * stride_kh + k_start64 * stride_kn
    v_ptr = V + batch64 * stride_vb + kv_head64 * stride_vh + k_start64 * stride_vn
    k = _load_tile(k_ptr + cols[:, None] * stride_kn + offs_dk[None, :] * stride_kd, cols, seqlen_k_b, offs_dk,
                   HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PADDED)
    v = _load_tile(v_ptr + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd, cols, seqlen_k_b, offs_dv,
                   HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V_PADDED], dtype=tl.float32)
    lo, interior_lo, interior_hi, hi = _query_ranges(start_n, seqlen_q_b, seqlen_k_b, window_left, window_right,
                                                     diagonal_offset, BLOCK_M, BLOCK_N, HAS_WINDOW_LEFT,
                                                     HAS_WINDOW_RIGHT)
    for head_in_group in range(0, group_size):
        head64 = kv_head64 * group_size + head_in_group
        batch_head = batch * num_heads + head64.to(tl.int32)
        q_ptr = Q + batch64 * stride_qb + head64 * stride_qh + q_start64 * stride_qm
        g_ptr = GradOut + batch64 * stride_gb + head64 * stride_gh + q_start64 * stride_gm
        lse_ptr = Lse + batch64 * stride_lb + head64 * stride_lh + q_start64 * stride_lm
        delta_ptr = Delta + batch64 * stride_lb + head64 * stride_lh + q_start64 * stride_lm
        dq_ptr = DQ
        if FUSED_DQ:
            dq_ptr = DQ + batch64 * stride_dqb + head64 * stride_dqh + q_start64 * stride_dqm
        mask_ptr = Mask
        if MASK_KIND != 0:
            mask_ptr = Mask + batch64 * stride_mb + head64 * stride_mh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(AlibiSlopes + batch64 * stride_ab + head64 * stride_ah)
        dk, dv = _attention_backward_dkdv_inner(
            dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, lo, interior_lo, cols, offs_dk, offs_dv,
            seqlen_q_b, seqlen_k_b, stride_qm, stride_qd, stride_gm, stride_gd, stride_dqm, stride_dqd, stride_lm,
            stride_lm, stride_mm, stride_mn, scale, softcap, slope, window_left, window_right, diagonal_offset,
            dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_M, MASK_KIND,
            HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_DROPOUT, FUSED_DQ,
            ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _attention_backward_dkdv_inner(
            dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, interior_lo, interior_hi, cols, offs_dk,
            offs_dv, seqlen_q_b, seqlen_k_b, stride_qm, stride_qd, stride_gm, stride_gd, stride_dqm, stride_dqd,
            stride_lm, stride_lm, stride_mm, stride_mn, scale, softcap, slope, window_left, window_right,
            diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED,
            BLOCK_M, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_DROPOUT, FUSED_DQ,
            ON_EDGE=False, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _attention_backward_dkdv_inner(
            dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, interior_hi, hi, cols, offs_dk, offs_dv,
            seqlen_q_b, seqlen_k_b, stride_qm, stride_qd, stride_gm, stride_gd, stride_dqm, stride_dqd, stride_lm,
            stride_lm, stride_mm, stride_mn, scale, softcap, slope, window_left, window_right, diagonal_offset,
            dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_M, MASK_KIND,
            HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_DROPOUT, FUSED_DQ,
            ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)

    dk_ptr = DK + batch64 * stride_dkb + kv_head64 * stride_dkh + k_start64 * stride_dkn
    dv_ptr = DV + batch64 * stride_dvb + kv_head64 * stride_dvh + k_start64 * stride_dvn
    tl.store(dk_ptr + cols[:, None] * stride_dkn + offs_dk[None, :] * stride_dkd, (dk * scale).to(DK.dtype.element_ty),
             mask=(cols[:, None] < seqlen_k_b) & (offs_dk[None, :] < HEAD_DIM))
    tl.store(dv_ptr + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=(cols[:, None] < seqlen_k_b) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _attention_backward_dq_inner(dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, key_start, key_end, rows,
                                 offs_dk, offs_dv, seqlen_q, seqlen_k, stride_kn, stride_kd, stride_vn, stride_vd,
                                 stride_mm, stride_mn, scale, softcap, slope, window_left, window_right,
                                 diagonal_offset, dropout_p, seed, batch_head,
                                 HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                                 HEAD_DIM_V_PADDED: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr,
                                 HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, ON_EDGE: tl.constexpr,
                                 DOT_PRECISION: tl.constexpr):
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd, offs_n, seqlen_k,
                       offs_dk, HEAD_DIM, ON_EDGE, HEAD_DIM != HEAD_DIM_PADDED)
        v = _load_tile(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd, offs_n, seqlen_k,
                       offs_dv, HEAD_DIM_V, ON_EDGE, HEAD_DIM_V != HEAD_DIM_V_PADDED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, tanh = _attention_scores(qk, rows[:, None], offs_n[None, :], seqlen_q, seqlen_k, scale, softcap, slope,
                                    window_left, window_right, diagonal_offset, mask_ptr, stride_mm, stride_mn,
                                    MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, ON_EDGE)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, batch_head, rows[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, GradOut, Lse, Delta, DQ, Mask, AlibiSlopes, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    num_heads, group_size, seqlen_q, seqlen_k, seqlen_q_bucket, seqlen_k_bucket,
    scale, softcap, window_left, window_right, diagonal_offset, dropout_p, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile of one head: dQ over the same key band as the forward, written once (deterministic)."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = batch * num_heads + head
    kv_head = head // group_size
    q_start, seqlen_q_b = _sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    k_start, seqlen_k_b = _sequence_bounds(CuSeqlensK, batch, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q_b:
        return
    if ALIGN_TO_END:  # count the diagonal from this sequence's own bottom-right corner
        diagonal_offset += seqlen_k_b - seqlen_q_b
    batch64, head64, kv_head64 = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    q_start64, k_start64 = q_start.to(tl.int64), k_start.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, HEAD_DIM_PADDED)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    q_ptr = Q + batch64 * stride_qb + head64 * stride_qh + q_start64 * stride_qm
    g_ptr = GradOut + batch64 * stride_gb + head64 * stride_gh + q_start64 * stride_gm
    k_ptr = K + batch64 * stride_kb + kv_head64 * stride_kh + k_start64 * stride_kn
    v_ptr = V + batch64 * stride_vb + kv_head64 * stride_vh + k_start64 * stride_vn
    mask_ptr = Mask
    if MASK_KIND != 0:
        mask_ptr = Mask + batch64 * stride_mb + head64 * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(AlibiSlopes + batch * stride_ab + head * stride_ah)
    q = _load_tile(q_ptr + rows[:, None] * stride_qm + offs_dk[None, :] * stride_qd, rows, seqlen_q_b, offs_dk,
                   HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PADDED)
    grad_out = _load_tile(g_ptr + rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd, rows, seqlen_q_b, offs_dv,
                          HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    row_offset = batch64 * stride_lb + head64 * stride_lh + q_start64 * stride_lm
    lse = tl.load(Lse + row_offset + rows * stride_lm, mask=rows < seqlen_q_b, other=0.0)
    delta = tl.load(Delta + row_offset + rows * stride_lm, mask=rows < seqlen_q_b, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    lo, interior_lo, interior_hi, hi = _key_ranges(start_m, seqlen_k_b, window_left, window_right, diagonal_offset,
                                                   BLOCK_M, BLOCK_N, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
    dq = _attention_backward_dq_inner(
        dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, lo, interior_lo, rows, offs_dk, offs_dv, seqlen_q_b,
        seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap, slope,
        window_left, window_right, diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED,
        HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)
    dq = _attention_backward_dq_inner(
        dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, interior_lo, interior_hi, rows, offs_dk, offs_dv,
        seqlen_q_b, seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
        slope, window_left, window_right, diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED,
        HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, ON_EDGE=False, DOT_PRECISION=DOT_PRECISION)
    dq = _attention_backward_dq_inner(
        dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, interior_hi, hi, rows, offs_dk, offs_dv, seqlen_q_b,
        seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap, slope,
        window_left, window_right, diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED,
        HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)
    dq_ptr = DQ + batch64 * stride_dqb + head64 * stride_dqh + q_start64 * stride_dqm
    tl.store(dq_ptr + rows[:, None] * stride_dqm + offs_dk[None, :] * stride_dqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=(rows[:, None] < seqlen_q_b) & (offs_dk[None, :] < HEAD_DIM))


@triton.jit
def _attention_dropout_keep_mask_kernel(Keep, num_heads, seqlen_q, seqlen_k, dropout_p, seed,
                                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep pattern :func:`_dropout_keep` draws for one (query tile, head, batch) of (B, H, L, S)."""
    head = tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = batch * num_heads + head
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    keep_ptr = Keep + batch_head.to(tl.int64) * seqlen_q * seqlen_k
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, batch_head, rows[:, None], cols[None, :], dropout_p)
        tl.store(keep_ptr + rows[:, None] * seqlen_k + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


# --------------------------------------------------------------------------------------------
# Autotune configurations
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per tile-width class: the larger padded head dim of q/k and
# v in 16-bit units (fp32 counts double: its rows take the bytes of a 16-bit head dim twice as wide).
# Chosen for H100 (BLOCK_M 128 feeds wgmma's 64-row granularity with 4-8 warps); wider classes shrink
# tiles and stages so the buffers fit the shared memory of both H100 (227 KB) and A100 (163 KB).
_FORWARD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 64, 4, 3), (128, 128, 8, 2)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2)],
    512: [(64, 32, 4, 1), (32, 32, 4, 2)],
}
# dK/dV holds a key tile and loops over query tiles: large BLOCK_N, small BLOCK_M.
_DKDV_CONFIGS = {
    64: [(32, 128, 4, 3), (64, 128, 8, 2)],
    128: [(32, 128, 8, 2), (64, 128, 8, 2)],
    256: [(32, 64, 4, 2), (16, 64, 4, 2)],
    512: [(16, 32, 4, 1), (16, 32, 4, 2)],
}
# dQ holds a query tile and loops over key tiles: the mirror image.
_DQ_CONFIGS = {
    64: [(128, 32, 4, 3), (128, 64, 8, 2)],
    128: [(128, 32, 8, 2), (128, 64, 8, 2)],
    256: [(64, 32, 4, 2), (64, 16, 4, 2)],
    512: [(32, 16, 4, 1), (32, 16, 4, 2)],
}
# The interpreter runs each program in Python: one small config, and tiles small enough that the
# tests' short sequences still cross several tiles (edges, interiors, ragged ends).
_INTERPRETER_CONFIG = (16, 16, 1, 1)
_PREPROCESS_BLOCK_M = 16 if _INTERPRET else 64
# Lengths enter the key as power-of-two buckets (kernel arguments the kernel itself ignores): varlen training
# with a new max length each step would otherwise re-tune (benchmark runs, host syncs, no CUDA-graph capture)
# nearly every step, and lengths within a bucket prune to the same configs.
_TUNING_KEY = ["seqlen_q_bucket", "seqlen_k_bucket", "HEAD_DIM", "HEAD_DIM_V", "IS_VARLEN", "MASK_KIND", "HAS_DROPOUT",
               "DOT_PRECISION"]


def _seqlen_bucket(seqlen: int) -> int:
    """The tuning bucket of a length: the next power of two, at least 16 (so its kernel argument is always
    divisible by 16 and never 1, and the JIT compiles a single specialisation of it)."""
    return triton.next_power_of_2(max(int(seqlen), 16))


def _tile_width_class(dtype: torch.dtype, head_dim_padded: int, head_dim_v_padded: int) -> int:
    width = max(head_dim_padded, head_dim_v_padded) * dtype.itemsize // 2
    return next(limit for limit in sorted(_FORWARD_CONFIGS) if width <= limit)


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int, pre_hook=None) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=pre_hook)


def _autotune_configs(table: dict, pre_hook=None) -> list[triton.Config]:
    if _INTERPRET:
        return [_config(*_INTERPRETER_CONFIG, pre_hook=pre_hook)]
    unique = dict.fromkeys(entry for entries in table.values() for entry in entries)
    return [_config(*entry, pre_hook=pre_hook) for entry in unique]


def _config_pruner(table: dict):
    """Keep the configs of the call's tile-width class whose tiles do not dwarf the sequences."""

    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        arguments = {**named_args, **kwargs}  # Triton passes the positional arguments and the constexprs apart
        q = arguments["Q"]
        width_class = _tile_width_class(q.base.dtype if _is_descriptor(q) else q.dtype, arguments["HEAD_DIM_PADDED"],
                                        arguments["HEAD_DIM_V_PADDED"])
        wanted = set(table[width_class])
        chosen = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        longest_q, longest_k = arguments["seqlen_q_bucket"], arguments["seqlen_k_bucket"]
        fitting = [c for c in chosen if c.kwargs["BLOCK_M"] <= longest_q and c.kwargs["BLOCK_N"] <= longest_k]
        # A short sequence may fit no config: then the smallest tiles of the class still run correctly.
        return fitting or [min(chosen, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


def _autotuned(kernel, table: dict, reset_to_zero=None, pre_hook=None):
    return triton.autotune(configs=_autotune_configs(table, pre_hook), key=_TUNING_KEY,
                           prune_configs_by={"early_config_prune": _config_pruner(table)},
                           reset_to_zero=reset_to_zero)(kernel)


def _is_descriptor(arg) -> bool:
    return TensorDescriptor is not None and isinstance(arg, TensorDescriptor)


def _set_tma_block_shapes(arguments):
    """A descriptor's box is part of its type: set it to the tiles of the config about to run."""
    block_m, block_n = arguments["BLOCK_M"], arguments["BLOCK_N"]
    arguments["Q"].block_shape = [1, 1, block_m, arguments["HEAD_DIM_PADDED"]]
    arguments["K"].block_shape = [1, 1, block_n, arguments["HEAD_DIM_PADDED"]]
    arguments["V"].block_shape = [1, 1, block_n, arguments["HEAD_DIM_V_PADDED"]]


_attention_forward = _autotuned(_attention_forward_kernel, _FORWARD_CONFIGS)
# The same kernel with USE_TMA: descriptors have no dtype, but Out (in the tuning key) carries it.
_attention_forward_tma = _autotuned(_attention_forward_kernel, _FORWARD_CONFIGS, pre_hook=_set_tma_block_shapes)
_attention_backward_dkdv = _autotuned(_attention_backward_dkdv_kernel, _DKDV_CONFIGS)
# Benchmarking a config adds into DQ: zero it before each trial and before the final run.
_attention_backward_dkdv_fused_dq = _autotuned(_attention_backward_dkdv_kernel, _DKDV_CONFIGS, reset_to_zero=["DQ"])
_attention_backward_dq = _autotuned(_attention_backward_dq_kernel, _DQ_CONFIGS)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _empty(shape, dtype, device):
    """Every buffer a kernel must write in full; the tests swap in NaN-filled ones to catch gaps."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(caller, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  dropout_p, softcap, seed):
    """Validate the layout; returns (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{caller}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{caller}: {name} has dtype {tensor.dtype}; expected float16, bfloat16 or float32")
        if tensor.device != q.device:
            raise ValueError(f"{caller}: {name} is on {tensor.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{caller}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, heads, seqlen, head_dim)"
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != rank:
            raise ValueError(f"{caller}: {name} must be {layout}, got shape {tuple(tensor.shape)}")
    head_axis, row_axis = (1, 0) if varlen else (1, 2)
    heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{caller}: k has head dim {k.shape[-1]} but q has {head_dim}")
    if v.shape[head_axis] != kv_heads or v.shape[row_axis] != k.shape[row_axis]:
        raise ValueError(f"{caller}: v {tuple(v.shape)} must match k {tuple(k.shape)} except in the last dim")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"{caller}: q's {heads} heads must be a multiple of k/v's {kv_heads} heads (GQA/MQA)")
    if max(head_dim, head_dim_v) > MAX_HEAD_DIM or min(head_dim, head_dim_v) < 1:
        raise ValueError(f"{caller}: head dims {head_dim} (q, k) and {head_dim_v} (v) must be in 1..{MAX_HEAD_DIM}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{caller}: dropout_p must be in [0, 1), got {dropout_p}")
    if softcap < 0:
        raise ValueError(f"{caller}: softcap must be >= 0 (0 disables it), got {softcap}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{caller}: seed must be in [0, 2**63), got {seed}")
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu is None:
                raise ValueError(f"{caller}: the varlen layout needs both cu_seqlens_q and cu_seqlens_k; {name} is None")
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
                raise ValueError(f"{caller}: {name} must be a 1-D int32 tensor on {q.device}, got {cu.dtype} "
                                 f"{tuple(cu.shape)} on {cu.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
            raise ValueError(f"{caller}: cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 2 entries, got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if value <= 0:
                raise ValueError(f"{caller}: {name} must be > 0 in the varlen layout (it bounds the grid), got {value}")
        if mask is not None:
            raise ValueError(f"{caller}: mask is supported only in the dense layout, not with cu_seqlens")
        batch, seqlen_q, seqlen_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[2], k.shape[2]
        if k.shape[0] != batch or v.shape[0] != batch:
            raise ValueError(f"{caller}: batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if mask is not None:
        full = (batch, heads, seqlen_q, seqlen_k)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or any(
                size not in (1, want) for size, want in zip(mask.shape, full)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{caller}: mask must have 4 dims, each 1 or the size of (batch, heads, seqlen_q, "
                             f"seqlen_k) = {full}; got {shape}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{caller}: mask must be bool (True = takes part) or floating (additive), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"{caller}: mask is on {mask.device} but q is on {q.device}")
    if alibi_slopes is not None:
        if (alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device
                or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads))):
            raise ValueError(f"{caller}: alibi_slopes must be float32 of shape ({heads},) or ({batch}, {heads}) on "
                             f"{q.device}, got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)} on "
                             f"{alibi_slopes.device}")
    return batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v


def _bhmd_strides(tensor, varlen):
    """Strides in (batch, head, row, feature) order; varlen tensors (total, heads, dim) have no batch stride."""
    if varlen:
        return 0, tensor.stride(1), tensor.stride(0), tensor.stride(2)
    return tensor.stride(0), tensor.stride(1), tensor.stride(2), tensor.stride(3)


def _row_stat_strides(stat, varlen):
    """Strides of lse/delta in (batch, head, row) order: dense (B, H, L), varlen (H, total)."""
    if varlen:
        return 0, stat.stride(0), stat.stride(1)
    return stat.stride(0), stat.stride(1), stat.stride(2)


def _mask_arguments(mask):
    """(pointer tensor, kind, strides): broadcast dims get stride 0 so the kernel reads in bounds."""
    if mask is None:
        return None, _NO_MASK, (0, 0, 0, 0)
    strides = tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), _BOOL_MASK, strides
    return mask, _ADDITIVE_MASK, strides


def _alibi_strides(alibi_slopes):
    if alibi_slopes is None:
        return 0, 0
    if alibi_slopes.dim() == 1:
        return 0, alibi_slopes.stride(0)
    return alibi_slopes.stride(0), alibi_slopes.stride(1)


def _feature_constexprs(q, v, mask_kind, varlen, softcap, alibi_slopes, window_left, window_right, dropout_p,
                        align_to_end):
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        HEAD_DIM_V=head_dim_v, HEAD_DIM_V_PADDED=max(16, triton.next_power_of_2(head_dim_v)),
        IS_VARLEN=varlen, MASK_KIND=mask_kind, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        HAS_WINDOW_LEFT=window_left >= 0, HAS_WINDOW_RIGHT=window_right >= 0, HAS_DROPOUT=dropout_p > 0,
        ALIGN_TO_END=bool(align_to_end), DOT_PRECISION=_dot_precision(q.dtype),
    )


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in strict IEEE fp32 unless torch allows TF32 for matmuls (its default does not), as torch's
    own fp32 attention does; 16-bit dots ignore the setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_TMA_DTYPES = (torch.float16, torch.bfloat16)
TMA_ENV = "PYATTN_ATTENTION_TMA"


def _tma_unsupported_reason(q, k, v, varlen) -> str | None:
    """Why the descriptor (TMA) forward cannot run this call, or None if it can."""
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no triton.tools.tensor_descriptor (Triton >= 3.4 has)"
    if varlen:
        return "the varlen layout is not supported (a tile crossing a sequence end would read the next sequence)"
    if q.dtype not in _TMA_DTYPES:
        return f"dtype {q.dtype} is not supported (float16 and bfloat16 are)"
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        dim = tensor.shape[-1]
        if dim < 16 or dim & (dim - 1):
            return f"{name} has head dim {dim}; the TMA path needs a power of two >= 16"
        if tensor.numel() == 0:
            return f"{name} is empty (shape {tuple(tensor.shape)})"
        if tensor.stride(-1) != 1:
            return f"{name} has feature stride {tensor.stride(-1)}; the last dim must be contiguous"
        if tensor.data_ptr() % 16 or any(stride * tensor.element_size() % 16 for stride in tensor.stride()[:-1]):
            return (f"{name} is not 16-byte aligned (address {tensor.data_ptr():#x}, strides {tuple(tensor.stride())} "
                    f"in {tensor.element_size()}-byte elements)")
    if not _INTERPRET and (q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) < (9, 0)):
        return f"q is on {q.device}; the tensor memory accelerator needs a CUDA GPU of compute capability >= 9.0"
    return None


# Whether auto mode (PYATTN_ATTENTION_TMA unset) takes the TMA forward where it can run: never under the
# interpreter, and no longer once a TMA launch has failed in this process (an untested Triton may reject it).
_tma_auto_enabled = not _INTERPRET


def _tma_setting() -> str:
    setting = os.environ.get(TMA_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"attention_forward: {TMA_ENV} must be 0, 1 or unset, got {setting!r}")
    return setting


def _forward_uses_tma(q, k, v, varlen) -> bool:
    """Auto: the TMA path wherever it can run (see ``_tma_auto_enabled``); PYATTN_ATTENTION_TMA=0/1 forces."""
    setting = _tma_setting()
    if setting == "0":
        return False
    reason = _tma_unsupported_reason(q, k, v, varlen)
    if setting == "1" and reason is not None:
        raise ValueError(f"attention_forward: {TMA_ENV}=1 forces the TMA forward, but {reason}")
    return reason is None and (setting == "1" or _tma_auto_enabled)


def _disable_tma_auto(error: Exception) -> None:
    """After the auto-selected TMA forward failed to launch: warn once, use the pointer path from now on."""
    global _tma_auto_enabled
    _tma_auto_enabled = False
    warnings.warn(f"attention_forward: the Hopper TMA forward failed ({type(error).__name__}: {error}); using the "
                  f"pointer forward for the rest of this process (set {TMA_ENV}=1 to raise instead)", RuntimeWarning,
                  stacklevel=4)  # the caller of attention_forward (under on_input_device)


def _tma_descriptor(tensor):
    """A (B, H, rows, D) descriptor; its block shape is a placeholder until the autotuner's pre_hook sets it."""
    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [1, 1, 16, tensor.shape[-1]])


@on_input_device
def attention_forward(q, k, v, *, scale, mask=None, window_left=-1, window_right=-1, diagonal_offset=0,
                      align_to_end=False, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """Flash-attention forward; returns ``(out, lse)``. Shapes and semantics: ``pyattn.reference.attention``.

    ``align_to_end``: sequence b's diagonal offset is ``diagonal_offset + S_b - L_b``, counted from its own
    bottom-right corner (flash-attn's varlen alignment); varlen lengths are read on the device, never the host.

    Dense: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv) -> out (B, Hq, L, Dv), lse (B, Hq, L) fp32.
    Varlen: q (total_q, Hq, D), k/v (total_k, Hk, ·) -> out (total_q, Hq, Dv), lse (Hq, total_q) fp32.
    Inputs may have any strides; nothing is copied.

    On Hopper, dense fp16/bf16 calls with power-of-two head dims and 16-byte-aligned strides load their
    Q/K/V tiles through TMA descriptors; ``PYATTN_ATTENTION_TMA=0`` forces the pointer path and ``=1``
    the TMA path (raising if this call cannot take it). If the automatically chosen TMA launch fails, a
    warning names the error and the pointer path runs, for this call and the rest of the process.
    """
    batch, heads, kv_heads, seqlen_q, seqlen_k, _, head_dim_v = _check_inputs(
        "attention_forward", q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softcap, seed)
    varlen = cu_seqlens_q is not None
    if varlen:
        out = _empty((q.shape[0], heads, head_dim_v), q.dtype, q.device)
        lse = _empty((heads, q.shape[0]), torch.float32, q.device)
    else:
        out = new_attention_output(q, head_dim_v, empty=_empty)
        lse = _empty((batch, heads, seqlen_q), torch.float32, q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    mask_arg, mask_kind, mask_strides = _mask_arguments(mask)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731

    def launch(use_tma):
        kernel = _attention_forward_tma if use_tma else _attention_forward
        tiles = [_tma_descriptor(x) if use_tma else x for x in (q, k, v)]
        kernel[grid](
            *tiles, out, lse, mask_arg, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
            *_bhmd_strides(q, varlen), *_bhmd_strides(k, varlen), *_bhmd_strides(v, varlen),
            *_bhmd_strides(out, varlen), *_row_stat_strides(lse, varlen), *mask_strides,
            *_alibi_strides(alibi_slopes), heads, heads // kv_heads, seqlen_q, seqlen_k, _seqlen_bucket(seqlen_q),
            _seqlen_bucket(seqlen_k), float(scale), float(softcap), int(window_left), int(window_right),
            int(diagonal_offset), float(dropout_p), int(seed),
            **_feature_constexprs(q, v, mask_kind, varlen, softcap, alibi_slopes, window_left, window_right,
                                  dropout_p, align_to_end), USE_TMA=use_tma,
        )

    use_tma = _forward_uses_tma(q, k, v, varlen)
    try:
        launch(use_tma)
    except Exception as error:
        if not use_tma or _tma_setting() == "1":
            raise
        _disable_tma_auto(error)
        launch(use_tma=False)
    return out, lse


@on_input_device
def attention_backward(grad_out, q, k, v, out, lse, *, scale, mask=None, window_left=-1, window_right=-1,
                       diagonal_offset=0, align_to_end=False, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                       deterministic=False):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward` given its ``out`` and ``lse``, in q's dtype.

    ``deterministic=False`` adds dQ with fp32 atomics from the dK/dV kernel (one pass over the band);
    ``True`` computes dQ in its own kernel instead (two passes, bit-reproducible).
    """
    batch, heads, kv_heads, seqlen_q, seqlen_k, _, _ = _check_inputs(
        "attention_backward", q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softcap, seed)
    varlen = cu_seqlens_q is not None
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if tuple(tensor.shape) != tuple(q.shape[:-1]) + (v.shape[-1],):
            raise ValueError(f"attention_backward: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(q.shape[:-1]) + (v.shape[-1],)}")
    expected_lse = (heads, q.shape[0]) if varlen else (batch, heads, seqlen_q)
    if tuple(lse.shape) != expected_lse or lse.dtype != torch.float32:
        raise ValueError(f"attention_backward: lse must be float32 of shape {expected_lse}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    lse = lse.contiguous()  # delta is allocated like lse and the kernels share their strides
    delta = _empty(lse.shape, torch.float32, lse.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if grad_out.numel() == 0 or dk.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()

    _attention_backward_preprocess_kernel[(triton.cdiv(seqlen_q, _PREPROCESS_BLOCK_M), heads, batch)](
        out, grad_out, delta, cu_seqlens_q,
        *_bhmd_strides(out, varlen), *_bhmd_strides(grad_out, varlen), *_row_stat_strides(delta, varlen),
        seqlen_q, HEAD_DIM_V=v.shape[-1], HEAD_DIM_V_PADDED=max(16, triton.next_power_of_2(v.shape[-1])),
        IS_VARLEN=varlen, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    if deterministic:
        dq = _empty(q.shape, q.dtype, q.device)
        dq_accumulator = None
        dkdv = _attention_backward_dkdv
    else:
        dq_accumulator = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkdv = _attention_backward_dkdv_fused_dq
    dq_strides = _bhmd_strides(dq if deterministic else dq_accumulator, varlen)
    mask_arg, mask_kind, mask_strides = _mask_arguments(mask)
    features = _feature_constexprs(q, v, mask_kind, varlen, softcap, alibi_slopes, window_left, window_right,
                                   dropout_p, align_to_end)
    scalars = (float(scale), float(softcap), int(window_left), int(window_right), int(diagonal_offset),
               float(dropout_p), int(seed))
    buckets = _seqlen_bucket(seqlen_q), _seqlen_bucket(seqlen_k)
    dkdv_grid = lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), kv_heads, batch)  # noqa: E731
    dkdv[dkdv_grid](
        q, k, v, grad_out, lse, delta, dq_accumulator, dk, dv, mask_arg, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
        *_bhmd_strides(q, varlen), *_bhmd_strides(k, varlen), *_bhmd_strides(v, varlen),
        *_bhmd_strides(grad_out, varlen), *_row_stat_strides(lse, varlen), *dq_strides,
        *_bhmd_strides(dk, varlen), *_bhmd_strides(dv, varlen), *mask_strides, *_alibi_strides(alibi_slopes),
        heads, heads // kv_heads, seqlen_q, seqlen_k, *buckets, *scalars, FUSED_DQ=not deterministic, **features,
    )
    if not deterministic:
        return dq_accumulator.to(q.dtype), dk, dv
    dq_grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    _attention_backward_dq[dq_grid](
        q, k, v, grad_out, lse, delta, dq, mask_arg, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
        *_bhmd_strides(q, varlen), *_bhmd_strides(k, varlen), *_bhmd_strides(v, varlen),
        *_bhmd_strides(grad_out, varlen), *_row_stat_strides(lse, varlen), *dq_strides, *mask_strides,
        *_alibi_strides(alibi_slopes), heads, heads // kv_heads, seqlen_q, seqlen_k, *buckets, *scalars, **features,
    )
    return dq, dk, dv


@on_input_device
def attention_dropout_keep_mask(batch, heads, seqlen_q, seqlen_k, *, dropout_p, seed, device):
    """The (batch, heads, seqlen_q, seqlen_k) bool pattern of kept probabilities the kernels draw for
    ``seed`` (varlen: seqlen_* are max_seqlen_* and sequence b uses [b, :, :L_b, :S_b])."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention_dropout_keep_mask: dropout_p must be in [0, 1), got {dropout_p}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"attention_dropout_keep_mask: seed must be in [0, 2**63), got {seed}")
    keep = _empty((batch, heads, seqlen_q, seqlen_k), torch.int8, device)
    if keep.numel() == 0:
        return keep.bool()
    block = 16 if _INTERPRET else 64
    grid = (triton.cdiv(seqlen_q, block), heads, batch)
    _attention_dropout_keep_mask_kernel[grid](keep, heads, seqlen_q, seqlen_k, float(dropout_p), int(seed),
                                              BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (tests/test_triton_compile.py compiles each for sm_90 and sm_80)
# --------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_INT32_ARGS = {"num_heads", "group_size", "seqlen_q", "seqlen_k", "seqlen_q_bucket", "seqlen_k_bucket", "window_left",
               "window_right", "diagonal_offset"}
_FLOAT_ARGS = {"scale", "softcap", "dropout_p"}
# Optional features a call can switch on, compiled together (the plain specs have none).
_AOT_FEATURES = {
    "plain": {},
    "dense-all": dict(MASK_KIND=_BOOL_MASK, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_WINDOW_LEFT=True,
                      HAS_WINDOW_RIGHT=True, HAS_DROPOUT=True),
    "additive-mask-all": dict(MASK_KIND=_ADDITIVE_MASK, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_WINDOW_LEFT=True,
                              HAS_WINDOW_RIGHT=True, HAS_DROPOUT=True),
    "varlen-all": dict(IS_VARLEN=True, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_WINDOW_LEFT=True,
                       HAS_WINDOW_RIGHT=True, HAS_DROPOUT=True, ALIGN_TO_END=True),
}
# Feature variants per dtype: each set once (they compile slowly: Philox and three copies of the loop).
_AOT_FEATURE_VARIANTS = ((torch.bfloat16, "dense-all"), (torch.bfloat16, "varlen-all"),
                         (torch.float16, "additive-mask-all"))
_AOT_HEAD_DIMS = (64, 128, 256)


def _aot_spec(name, kernel, dtype, head_dim, config, feature_set="plain", fixed=None, dq_type=None, tma=False):
    """A CompileSpec of ``kernel`` as the launchers call it, feature dims contiguous (their stride is 1,
    which the JIT also specialises on); ``tma``: the forward's descriptor path, as its pre_hook shapes it."""
    dt = _TRITON_DTYPE[dtype]
    block_m, block_n, num_warps, num_stages = config
    features = _AOT_FEATURES[feature_set]
    padded = max(16, triton.next_power_of_2(head_dim))
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PADDED=padded, HEAD_DIM_V=head_dim, HEAD_DIM_V_PADDED=padded,
                      BLOCK_M=block_m, BLOCK_N=block_n, IS_VARLEN=False, MASK_KIND=_NO_MASK, HAS_SOFTCAP=False,
                      HAS_ALIBI=False, HAS_WINDOW_LEFT=False, HAS_WINDOW_RIGHT=False, HAS_DROPOUT=False,
                      ALIGN_TO_END=False, USE_TMA=tma,
                      DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    constexprs.update(features)
    constexprs.update(fixed or {})
    if dtype == torch.float32:  # both fp32 precisions are reachable (torch.backends.cuda.matmul.allow_tf32)
        dt_name = f"{dt}-{constexprs['DOT_PRECISION']}"
    else:
        dt_name = dt
    pointers = {"Lse": "*fp32", "Delta": "*fp32", "Keep": "*i8", "DQ": dq_type or f"*{dt}",
                "Mask": {_NO_MASK: None, _BOOL_MASK: "*u8", _ADDITIVE_MASK: f"*{dt}"}[constexprs["MASK_KIND"]],
                "AlibiSlopes": "*fp32" if constexprs["HAS_ALIBI"] else None,
                "CuSeqlensQ": "*i32" if constexprs["IS_VARLEN"] else None,
                "CuSeqlensK": "*i32" if constexprs["IS_VARLEN"] else None}
    if tma:
        key_tile = f"tensordesc<{dt}[1, 1, {block_n}, {padded}]>"
        pointers.update(Q=f"tensordesc<{dt}[1, 1, {block_m}, {padded}]>", K=key_tile, V=key_tile)
    signature, values = {}, {}
    # Parameters from the Python function: under TRITON_INTERPRET the kernel object has no ``params``.
    for arg, param in inspect.signature(kernel.fn).parameters.items():
        if "constexpr" in str(param.annotation):
            signature[arg], values[arg] = "constexpr", constexprs[arg]
        elif arg.startswith("stride_") and arg.endswith("d"):
            signature[arg], values[arg] = "constexpr", 1
        elif arg.startswith("stride_") or arg in _INT32_ARGS:
            signature[arg] = "i32"
        elif arg == "seed":
            signature[arg] = "i64"
        elif arg in _FLOAT_ARGS:
            signature[arg] = "fp32"
        elif arg in pointers and pointers[arg] is None:  # an absent optional tensor: passed as None
            signature[arg], values[arg] = "constexpr", None
        else:
            signature[arg] = pointers.get(arg, f"*{dt}")
    tiles = f"BM{block_m},BN{block_n},w{num_warps},s{num_stages}"
    return CompileSpec(name=f"{name}[{dt_name},d{head_dim},{feature_set},{tiles}]",
                       kernel=kernel, signature=signature, constexprs=values, num_warps=num_warps,
                       num_stages=num_stages, min_capability=90 if tma else 80)


def _aot_specs() -> list[CompileSpec]:
    tuned = (
        ("attention_forward", _attention_forward_kernel, _FORWARD_CONFIGS, {}, None),
        ("attention_backward_dkdv", _attention_backward_dkdv_kernel, _DKDV_CONFIGS, {"FUSED_DQ": False}, None),
        ("attention_backward_dkdv_fused_dq", _attention_backward_dkdv_kernel, _DKDV_CONFIGS, {"FUSED_DQ": True},
         "*fp32"),
        ("attention_backward_dq", _attention_backward_dq_kernel, _DQ_CONFIGS, {}, None),
    )
    specs = []
    for name, kernel, table, fixed, dq_type in tuned:
        for dtype in _TRITON_DTYPE:
            for head_dim in _AOT_HEAD_DIMS:
                specs += [_aot_spec(name, kernel, dtype, head_dim, config, fixed=fixed, dq_type=dq_type)
                          for config in table[_tile_width_class(dtype, head_dim, head_dim)]]
        for dtype, feature_set in _AOT_FEATURE_VARIANTS:
            specs.append(_aot_spec(name, kernel, dtype, 128, table[128][0], feature_set, fixed, dq_type))
        # A head dim that is not a power of two: padded to 128 with masked loads and stores.
        specs.append(_aot_spec(name, kernel, torch.float16, 80, table[128][0], fixed=fixed, dq_type=dq_type))
        # fp32 with TF32 dots (allow_tf32=True); the fp32 specs above are the default strict IEEE ones.
        specs.append(_aot_spec(name, kernel, torch.float32, 128, table[256][0],
                               fixed={**fixed, "DOT_PRECISION": "tf32"}, dq_type=dq_type))
    # The Hopper descriptor forward: every config it can reach, and once with every feature it composes with.
    for dtype in _TMA_DTYPES:
        for head_dim in _AOT_HEAD_DIMS:
            specs += [_aot_spec("attention_forward_tma", _attention_forward_kernel, dtype, head_dim, config, tma=True)
                      for config in _FORWARD_CONFIGS[_tile_width_class(dtype, head_dim, head_dim)]]
    specs.append(_aot_spec("attention_forward_tma", _attention_forward_kernel, torch.bfloat16, 128,
                           _FORWARD_CONFIGS[128][0], "dense-all", tma=True))
    for dtype in _TRITON_DTYPE:
        for head_dim in (*_AOT_HEAD_DIMS, 80):
            specs.append(_aot_spec("attention_backward_preprocess", _attention_backward_preprocess_kernel, dtype,
                                   head_dim, (_PREPROCESS_BLOCK_M, 0, 4, 1)))
    specs.append(_aot_spec("attention_backward_preprocess", _attention_backward_preprocess_kernel, torch.bfloat16,
                           128, (_PREPROCESS_BLOCK_M, 0, 4, 1), "varlen-all"))
    specs.append(_aot_spec("attention_dropout_keep_mask", _attention_dropout_keep_mask_kernel, torch.float32, 64,
                           (64, 64, 4, 1)))
    return specs


AOT_SPECS: list[CompileSpec] = _aot_specs()
