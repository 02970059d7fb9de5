"""Attention forward: one program per (query tile, head, batch) streams the key tiles of its band with an
online softmax in fp32 (docs/attention.md, "Forward: online softmax"). With USE_TMA (Hopper) the same
kernel loads its Q/K/V tiles through tensor descriptors."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (LN2, attention_scores, dropout_keep, dropout_scale, element_offsets, key_ranges, load_kv_tile,
                     load_tile, sequence_bounds)
from .common import LOG2E, visible_scores


@triton.jit
def _forward_inner(acc, acc_tail, row_sum, row_max, q, q_tail, k_ptr, v_ptr, mask_ptr, key_start, key_end, rows,
                   offs_dk, offs_dk_tail, offs_dv, offs_dv_tail, seqlen_q, seqlen_k, stride_kn, stride_kd, stride_vn,
                   stride_vd, stride_mm, stride_mn, scale, softcap, slope, window_left, window_right,
                   diagonal_offset, dropout_p, seed, batch, kv_head, batch_head,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_BLOCK: tl.constexpr,
                   HEAD_TAIL: tl.constexpr, HEAD_BLOCK_V: tl.constexpr, HEAD_TAIL_V: tl.constexpr,
                   BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr,
                   HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
                   ON_EDGE: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr):
    scale_log2 = scale * LOG2E
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_kv_tile(k_ptr, batch, kv_head, start_n, offs_n, seqlen_k, offs_dk, stride_kn, stride_kd, HEAD_DIM,
                         HEAD_BLOCK, BLOCK_N, USE_TMA, ON_EDGE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HEAD_TAIL > 0:  # the head dim's second column block: the same scores, a second chain of products
            k_tail = load_kv_tile(k_ptr, batch, kv_head, start_n, offs_n, seqlen_k, offs_dk_tail, stride_kn, stride_kd,
                                  HEAD_DIM, HEAD_BLOCK + HEAD_TAIL, BLOCK_N, USE_TMA, ON_EDGE)
            qk = tl.dot(q_tail, tl.trans(k_tail), qk, input_precision=DOT_PRECISION)
        # Invariant: acc = Σ_j exp2(s_ij − row_max_i) v_j and row_sum = Σ_j exp2(s_ij − row_max_i) over
        # the keys seen so far (s in log2 units). A row that has seen only invisible keys keeps row_max = −inf;
        # shifting it by 0 instead keeps exp2 free of −inf − (−inf).
        if FOLD_SCALE:
            # s = scale·log2(e)·q·k with no transform: a positive scale commutes with the row max and keeps −inf,
            # so the scores stay raw and the scale enters exp2's argument, one FFMA per score.
            qk = visible_scores(qk, rows[:, None], offs_n[None, :], seqlen_q, seqlen_k, window_left, window_right,
                                diagonal_offset, mask_ptr, stride_mm, stride_mn, MASK_KIND, HAS_WINDOW_LEFT,
                                HAS_WINDOW_RIGHT, ON_EDGE)
            new_max = tl.maximum(row_max, tl.max(qk, 1) * scale_log2)
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp2(qk * scale_log2 - shift[:, None])
        else:
            s, _ = attention_scores(qk, rows[:, None], offs_n[None, :], seqlen_q, seqlen_k, scale, softcap, slope,
                                    window_left, window_right, diagonal_offset, mask_ptr, stride_mm, stride_mn,
                                    MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, ON_EDGE)
            new_max = tl.maximum(row_max, tl.max(s, 1))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp2(s - shift[:, None])
        correction = tl.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = acc * correction[:, None]
        if HEAD_TAIL_V > 0:
            acc_tail = acc_tail * correction[:, None]
        if HAS_DROPOUT:
            # Dropped after the denominator: dropout acts on normalised probabilities (the rescale at the end).
            keep = dropout_keep(seed, batch_head, rows, start_n, dropout_p, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = load_kv_tile(v_ptr, batch, kv_head, start_n, offs_n, seqlen_k, offs_dv, stride_vn, stride_vd, HEAD_DIM_V,
                         HEAD_BLOCK_V, BLOCK_N, USE_TMA, ON_EDGE)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        if HEAD_TAIL_V > 0:
            v_tail = load_kv_tile(v_ptr, batch, kv_head, start_n, offs_n, seqlen_k, offs_dv_tail, stride_vn, stride_vd,
                                  HEAD_DIM_V, HEAD_BLOCK_V + HEAD_TAIL_V, BLOCK_N, USE_TMA, ON_EDGE)
            acc_tail = tl.dot(p.to(v_tail.dtype), v_tail, acc_tail, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, acc_tail, row_sum, row_max


@triton.jit
def _store_output(o_ptr, acc, safe_sum, rows, seqlen_q, cols, stride_om, stride_od, dropout_p,
                  HEAD_DIM_V: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """One column block of the output: the accumulator over the softmax denominator (and dropout's rescale)."""
    out = acc / safe_sum[:, None]
    if HAS_DROPOUT:
        out = out * dropout_scale(dropout_p)
    tl.store(o_ptr + element_offsets(rows[:, None], stride_om, cols[None, :], stride_od),
             out.to(o_ptr.dtype.element_ty), mask=(rows[:, None] < seqlen_q) & (cols[None, :] < HEAD_DIM_V))


@triton.jit(do_not_specialize=["seed"])  # a fresh random seed per call: one compiled kernel
def attention_forward_kernel(
    Q, K, V, Out, Lse, Mask, AlibiSlopes, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    num_heads, group_size, seqlen_q, seqlen_k, seqlen_q_bucket, seqlen_k_bucket, alignment,
    scale, softcap, window_left, window_right, diagonal_offset, dropout_p, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr,
    HEAD_BLOCK: tl.constexpr, HEAD_TAIL: tl.constexpr, HEAD_BLOCK_V: tl.constexpr, HEAD_TAIL_V: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr, FOLD_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile of one head. With USE_TMA (dense layout, Hopper) Q, K, V are (B, H, rows, D) tensor
    descriptors and their strides are unused; everything but the tile loads is the same code.

    ``seqlen_*_bucket`` and ``alignment`` are read by the autotuner (its key and pruning), not here.
    ``FOLD_SCALE``: scale > 0 and no softcap, ALiBi or additive mask (the launcher's rule): see the loop.
    ``HEAD_BLOCK``/``HEAD_TAIL`` (q, k) and ``HEAD_BLOCK_V``/``HEAD_TAIL_V`` (v, out): the head dim as one
    power-of-two column block (tail 0) or two, columns [0, BLOCK) and [BLOCK, BLOCK + TAIL), so that a head dim
    of 96 costs 64 + 32 columns of products, not 128 (``launch.head_blocks``)."""
    tl.static_assert(not (FOLD_SCALE and (HAS_SOFTCAP or (HAS_ALIBI or MASK_KIND == 2))),
                     "FOLD_SCALE needs scores without a per-score transform")
    tl.static_assert(not (USE_TMA and (HEAD_TAIL > 0 or HEAD_TAIL_V > 0)), "TMA boxes cover one column block")
    query_tile = tl.program_id(0)
    if HAS_WINDOW_RIGHT and not HAS_WINDOW_LEFT:
        # Causal: a tile's band grows with its index. Blocks start in index order, so reversing it starts each
        # head's heaviest tiles first and leaves the lightest for the tail of the last wave.
        query_tile = tl.num_programs(0) - 1 - query_tile
    start_m = query_tile * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = batch * num_heads + head
    kv_head = head // group_size
    q_start, seqlen_q_b = sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    k_start, seqlen_k_b = sequence_bounds(CuSeqlensK, batch, seqlen_k, IS_VARLEN)
    if start_m >= seqlen_q_b:  # a varlen sequence shorter than the grid's max_seqlen_q
        return
    if ALIGN_TO_END:  # count the diagonal from this sequence's own bottom-right corner
        diagonal_offset += seqlen_k_b - seqlen_q_b

    batch64, head64, kv_head64 = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, HEAD_BLOCK)
    offs_dv = tl.arange(0, HEAD_BLOCK_V)
    # One column block: the tail names are placeholders that the loop never reads.
    offs_dk_tail = offs_dk
    offs_dv_tail = offs_dv
    if HEAD_TAIL > 0:
        offs_dk_tail = HEAD_BLOCK + tl.arange(0, HEAD_TAIL)
    if HEAD_TAIL_V > 0:
        offs_dv_tail = HEAD_BLOCK_V + tl.arange(0, HEAD_TAIL_V)
    if USE_TMA:
        q = Q.load([batch, head, start_m, 0]).reshape(BLOCK_M, HEAD_BLOCK)
        q_tail = q
        k_ptr = K
        v_ptr = V
    else:
        q_ptr = Q + batch64 * stride_qb + head64 * stride_qh + q_start.to(tl.int64) * stride_qm
        k_ptr = K + batch64 * stride_kb + kv_head64 * stride_kh + k_start.to(tl.int64) * stride_kn
        v_ptr = V + batch64 * stride_vb + kv_head64 * stride_vh + k_start.to(tl.int64) * stride_vn
        q = load_tile(q_ptr + element_offsets(rows[:, None], stride_qm, offs_dk[None, :], stride_qd), rows, seqlen_q_b,
                      offs_dk, HEAD_DIM, True, HEAD_DIM < HEAD_BLOCK)
        q_tail = q
        if HEAD_TAIL > 0:
            q_tail = load_tile(q_ptr + element_offsets(rows[:, None], stride_qm, offs_dk_tail[None, :], stride_qd),
                               rows, seqlen_q_b, offs_dk_tail, HEAD_DIM, True, HEAD_DIM < HEAD_BLOCK + HEAD_TAIL)
    mask_ptr = Mask
    if MASK_KIND != 0:
        mask_ptr = Mask + batch64 * stride_mb + head64 * stride_mh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(AlibiSlopes + batch * stride_ab + head * stride_ah)

    acc = tl.zeros([BLOCK_M, HEAD_BLOCK_V], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc_tail = row_sum  # a placeholder unless the output has a tail block
    if HEAD_TAIL_V > 0:
        acc_tail = tl.zeros([BLOCK_M, HEAD_TAIL_V], dtype=tl.float32)

    lo, interior_lo, interior_hi, hi = key_ranges(start_m, seqlen_k_b, window_left, window_right, diagonal_offset,
                                                  BLOCK_M, BLOCK_N, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
    # Three passes over the band: leading edge tiles, interior tiles (no visibility arithmetic), trailing edge.
    acc, acc_tail, row_sum, row_max = _forward_inner(
        acc, acc_tail, row_sum, row_max, q, q_tail, k_ptr, v_ptr, mask_ptr, lo, interior_lo, rows, offs_dk,
        offs_dk_tail, offs_dv, offs_dv_tail, seqlen_q_b, seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mm, stride_mn, scale, softcap, slope, window_left, window_right, diagonal_offset, dropout_p, seed, batch,
        kv_head, batch_head, HEAD_DIM, HEAD_DIM_V, HEAD_BLOCK, HEAD_TAIL,
        HEAD_BLOCK_V, HEAD_TAIL_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, USE_TMA, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION, FOLD_SCALE=FOLD_SCALE)
    acc, acc_tail, row_sum, row_max = _forward_inner(
        acc, acc_tail, row_sum, row_max, q, q_tail, k_ptr, v_ptr, mask_ptr, interior_lo, interior_hi, rows, offs_dk,
        offs_dk_tail, offs_dv, offs_dv_tail, seqlen_q_b, seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mm, stride_mn, scale, softcap, slope, window_left, window_right, diagonal_offset, dropout_p, seed, batch,
        kv_head, batch_head, HEAD_DIM, HEAD_DIM_V, HEAD_BLOCK, HEAD_TAIL,
        HEAD_BLOCK_V, HEAD_TAIL_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, USE_TMA, ON_EDGE=False, DOT_PRECISION=DOT_PRECISION, FOLD_SCALE=FOLD_SCALE)
    acc, acc_tail, row_sum, row_max = _forward_inner(
        acc, acc_tail, row_sum, row_max, q, q_tail, k_ptr, v_ptr, mask_ptr, interior_hi, hi, rows, offs_dk,
        offs_dk_tail, offs_dv, offs_dv_tail, seqlen_q_b, seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mm, stride_mn, scale, softcap, slope, window_left, window_right, diagonal_offset, dropout_p, seed, batch,
        kv_head, batch_head, HEAD_DIM, HEAD_DIM_V, HEAD_BLOCK, HEAD_TAIL,
        HEAD_BLOCK_V, HEAD_TAIL_V, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, USE_TMA, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION, FOLD_SCALE=FOLD_SCALE)

    # A row with no visible key has row_sum = 0: output 0 and lse = −inf, never 0/0.
    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * LN2, float("-inf"))
    o_ptr = Out + batch64 * stride_ob + head64 * stride_oh + q_start.to(tl.int64) * stride_om
    _store_output(o_ptr, acc, safe_sum, rows, seqlen_q_b, offs_dv, stride_om, stride_od, dropout_p, HEAD_DIM_V,
                  HAS_DROPOUT)
    if HEAD_TAIL_V > 0:
        _store_output(o_ptr, acc_tail, safe_sum, rows, seqlen_q_b, offs_dv_tail, stride_om, stride_od, dropout_p,
                      HEAD_DIM_V, HAS_DROPOUT)
    lse_ptr = Lse + batch64 * stride_lb + head64 * stride_lh + q_start.to(tl.int64) * stride_lm
    tl.store(lse_ptr + rows * stride_lm, lse, mask=rows < seqlen_q_b)

