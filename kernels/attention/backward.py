"""Attention backward: delta = rowsum(dO ∘ O), then dK/dV per key tile (with dQ added atomically, or dQ in
its own deterministic kernel). The recomputation and its gradients are in docs/attention.md, "Backward"."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (LOG2E, attention_scores, dropout_keep, dropout_scale, element_offsets, key_ranges, load_tile,
                     query_ranges, sequence_bounds)


@triton.jit
def attention_backward_preprocess_kernel(
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
    q_start, seqlen_q_b = sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    if start_m >= seqlen_q_b:
        return
    batch64, head64, q_start64 = batch.to(tl.int64), head.to(tl.int64), q_start.to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    o_ptr = Out + batch64 * stride_ob + head64 * stride_oh + q_start64 * stride_om
    g_ptr = GradOut + batch64 * stride_gb + head64 * stride_gh + q_start64 * stride_gm
    out = load_tile(o_ptr + element_offsets(rows[:, None], stride_om, offs_dv[None, :], stride_od), rows, seqlen_q_b,
                    offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    grad_out = load_tile(g_ptr + element_offsets(rows[:, None], stride_gm, offs_dv[None, :], stride_gd), rows,
                         seqlen_q_b, offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), 1)
    d_ptr = Delta + batch64 * stride_db + head64 * stride_dh + q_start64 * stride_dm
    tl.store(d_ptr + rows * stride_dm, delta, mask=rows < seqlen_q_b)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, row_start,
                row_end, start_n, offs_dk, offs_dv, seqlen_q, seqlen_k, stride_qm, stride_qd,
                stride_gm, stride_gd, stride_dqm, stride_dqd, stride_lm, stride_dm, stride_mm,
                stride_mn, scale, softcap, slope, window_left, window_right, diagonal_offset,
                dropout_p, seed, batch_head,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                HEAD_DIM_V_PADDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr, TRANSPOSED_DQ: tl.constexpr,
                ON_EDGE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # Tiles are transposed, (keys, queries), so that dK and dV accumulate as plain dot products.
    cols = start_n + tl.arange(0, BLOCK_N)
    for start_m in range(row_start, row_end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(q_ptr + element_offsets(rows[:, None], stride_qm, offs_dk[None, :], stride_qd), rows, seqlen_q,
                      offs_dk, HEAD_DIM, ON_EDGE, HEAD_DIM != HEAD_DIM_PADDED)
        grad_out = load_tile(g_ptr + element_offsets(rows[:, None], stride_gm, offs_dv[None, :], stride_gd), rows,
                             seqlen_q, offs_dv, HEAD_DIM_V, ON_EDGE, HEAD_DIM_V != HEAD_DIM_V_PADDED)
        if ON_EDGE:
            lse = tl.load(lse_ptr + rows * stride_lm, mask=rows < seqlen_q, other=0.0)
            delta = tl.load(delta_ptr + rows * stride_dm, mask=rows < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows * stride_lm)
            delta = tl.load(delta_ptr + rows * stride_dm)
        # Rows with no visible key (lse = −inf) get P = exp2(−inf − inf) = 0 rather than NaN.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        s_t, tanh_t = attention_scores(qk_t, rows[None, :], cols[:, None], seqlen_q, seqlen_k, scale, softcap, slope,
                                       window_left, window_right, diagonal_offset, mask_ptr, stride_mm, stride_mn,
                                       MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, ON_EDGE)
        p_t = tl.exp2(s_t - lse2[None, :])
        dp_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = tl.trans(dropout_keep(seed, batch_head, rows, start_n, dropout_p, BLOCK_N))
            rescale = dropout_scale(dropout_p)
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
        if FUSED_DQ and TRANSPOSED_DQ:
            # dQᵀ = Kᵀ dSᵀ: M is the head dim, so sm_90 lowers it to wgmma at any BLOCK_M (dS K has M = BLOCK_M).
            dq_t = tl.dot(tl.trans(k), ds_t, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(dq_ptr + element_offsets(offs_dk[:, None], stride_dqd, rows[None, :], stride_dqm), dq_t,
                          mask=(offs_dk[:, None] < HEAD_DIM) & (rows[None, :] < seqlen_q), sem="relaxed")
        elif FUSED_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(dq_ptr + element_offsets(rows[:, None], stride_dqm, offs_dk[None, :], stride_dqd), dq,
                          mask=(rows[:, None] < seqlen_q) & (offs_dk[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["seed"])  # a fresh random seed per call: one compiled kernel
def attention_backward_dkdv_kernel(
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
    num_heads, group_size, seqlen_q, seqlen_k, seqlen_q_bucket, seqlen_k_bucket, alignment,
    scale, softcap, window_left, window_right, diagonal_offset, dropout_p, seed, heads_per_program,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FUSED_DQ: tl.constexpr, TRANSPOSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key tile of one kv head and ``heads_per_program`` query heads of its GQA group: their dK, dV summed in
    registers, no atomics. Program (tile, kv_head · splits + split, batch) takes the group's heads
    [split · heads_per_program, …) and writes slot kv_head · splits + split of DK/DV: the kv head itself when one
    program takes the whole group (splits = 1), else an fp32 partial the launcher sums over the splits.
    With FUSED_DQ it also adds each (query tile, key tile) term of dQ into the fp32 buffer DQ, formed as
    (Kᵀ dSᵀ)ᵀ with TRANSPOSED_DQ (the launcher's choice for sm_90, see ``launch._transposes_fused_dq``)."""
    key_tile = tl.program_id(0)
    if HAS_WINDOW_LEFT and not HAS_WINDOW_RIGHT:
        # A left window alone: a key tile's band of queries grows with its index, so the heaviest start first
        # (causal already runs that way: its key tile 0 sees every query).
        key_tile = tl.num_programs(0) - 1 - key_tile
    start_n = key_tile * BLOCK_N
    slot = tl.program_id(1)
    splits = tl.cdiv(group_size, heads_per_program)
    kv_head = slot // splits
    first_head = (slot % splits) * heads_per_program
    last_head = tl.minimum(first_head + heads_per_program, group_size)
    batch = tl.program_id(2)
    q_start, seqlen_q_b = sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    k_start, seqlen_k_b = sequence_bounds(CuSeqlensK, batch, seqlen_k, IS_VARLEN)
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
    k = load_tile(k_ptr + element_offsets(cols[:, None], stride_kn, offs_dk[None, :], stride_kd), cols, seqlen_k_b,
                  offs_dk, HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PADDED)
    v = load_tile(v_ptr + element_offsets(cols[:, None], stride_vn, offs_dv[None, :], stride_vd), cols, seqlen_k_b,
                  offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PADDED], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V_PADDED], dtype=tl.float32)
    lo, interior_lo, interior_hi, hi = query_ranges(start_n, seqlen_q_b, seqlen_k_b, window_left, window_right,
                                                    diagonal_offset, BLOCK_M, BLOCK_N, HAS_WINDOW_LEFT,
                                                    HAS_WINDOW_RIGHT)
    for head_in_group in range(first_head, last_head):
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
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, lo, interior_lo, start_n, offs_dk,
            offs_dv, seqlen_q_b, seqlen_k_b, stride_qm, stride_qd, stride_gm, stride_gd, stride_dqm, stride_dqd,
            stride_lm, stride_lm, stride_mm, stride_mn, scale, softcap, slope, window_left, window_right,
            diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED,
            BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_DROPOUT,
            FUSED_DQ, TRANSPOSED_DQ, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, interior_lo, interior_hi, start_n,
            offs_dk, offs_dv, seqlen_q_b, seqlen_k_b, stride_qm, stride_qd, stride_gm, stride_gd, stride_dqm,
            stride_dqd, stride_lm, stride_lm, stride_mm, stride_mn, scale, softcap, slope, window_left,
            window_right, diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED, HEAD_DIM_V,
            HEAD_DIM_V_PADDED, BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
            HAS_DROPOUT, FUSED_DQ, TRANSPOSED_DQ, ON_EDGE=False, DOT_PRECISION=DOT_PRECISION)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_ptr, g_ptr, dq_ptr, lse_ptr, delta_ptr, mask_ptr, interior_hi, hi, start_n, offs_dk,
            offs_dv, seqlen_q_b, seqlen_k_b, stride_qm, stride_qd, stride_gm, stride_gd, stride_dqm, stride_dqd,
            stride_lm, stride_lm, stride_mm, stride_mn, scale, softcap, slope, window_left, window_right,
            diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED, HEAD_DIM_V, HEAD_DIM_V_PADDED,
            BLOCK_M, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, HAS_DROPOUT,
            FUSED_DQ, TRANSPOSED_DQ, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)

    slot64 = slot.to(tl.int64)
    dk_ptr = DK + batch64 * stride_dkb + slot64 * stride_dkh + k_start64 * stride_dkn
    dv_ptr = DV + batch64 * stride_dvb + slot64 * stride_dvh + k_start64 * stride_dvn
    tl.store(dk_ptr + element_offsets(cols[:, None], stride_dkn, offs_dk[None, :], stride_dkd),
             (dk * scale).to(DK.dtype.element_ty), mask=(cols[:, None] < seqlen_k_b) & (offs_dk[None, :] < HEAD_DIM))
    tl.store(dv_ptr + element_offsets(cols[:, None], stride_dvn, offs_dv[None, :], stride_dvd),
             dv.to(DV.dtype.element_ty), mask=(cols[:, None] < seqlen_k_b) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_inner(dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, key_start, key_end, rows,
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
        k = load_tile(k_ptr + element_offsets(offs_n[:, None], stride_kn, offs_dk[None, :], stride_kd), offs_n,
                      seqlen_k, offs_dk, HEAD_DIM, ON_EDGE, HEAD_DIM != HEAD_DIM_PADDED)
        v = load_tile(v_ptr + element_offsets(offs_n[:, None], stride_vn, offs_dv[None, :], stride_vd), offs_n,
                      seqlen_k, offs_dv, HEAD_DIM_V, ON_EDGE, HEAD_DIM_V != HEAD_DIM_V_PADDED)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, tanh = attention_scores(qk, rows[:, None], offs_n[None, :], seqlen_q, seqlen_k, scale, softcap, slope,
                                   window_left, window_right, diagonal_offset, mask_ptr, stride_mm, stride_mn,
                                   MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, ON_EDGE)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, batch_head, rows, start_n, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale(dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])  # a fresh random seed per call: one compiled kernel
def attention_backward_dq_kernel(
    Q, K, V, GradOut, Lse, Delta, DQ, Mask, AlibiSlopes, CuSeqlensQ, CuSeqlensK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab, stride_ah,
    num_heads, group_size, seqlen_q, seqlen_k, seqlen_q_bucket, seqlen_k_bucket, alignment,
    scale, softcap, window_left, window_right, diagonal_offset, dropout_p, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr,
    IS_VARLEN: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ALIGN_TO_END: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One query tile of one head: dQ over the same key band as the forward, written once (deterministic)."""
    query_tile = tl.program_id(0)
    if HAS_WINDOW_RIGHT and not HAS_WINDOW_LEFT:  # causal: the heaviest tiles first, as in the forward
        query_tile = tl.num_programs(0) - 1 - query_tile
    start_m = query_tile * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = batch * num_heads + head
    kv_head = head // group_size
    q_start, seqlen_q_b = sequence_bounds(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)
    k_start, seqlen_k_b = sequence_bounds(CuSeqlensK, batch, seqlen_k, IS_VARLEN)
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
    q = load_tile(q_ptr + element_offsets(rows[:, None], stride_qm, offs_dk[None, :], stride_qd), rows, seqlen_q_b,
                  offs_dk, HEAD_DIM, True, HEAD_DIM != HEAD_DIM_PADDED)
    grad_out = load_tile(g_ptr + element_offsets(rows[:, None], stride_gm, offs_dv[None, :], stride_gd), rows,
                         seqlen_q_b, offs_dv, HEAD_DIM_V, True, HEAD_DIM_V != HEAD_DIM_V_PADDED)
    row_offset = batch64 * stride_lb + head64 * stride_lh + q_start64 * stride_lm
    lse = tl.load(Lse + row_offset + rows * stride_lm, mask=rows < seqlen_q_b, other=0.0)
    delta = tl.load(Delta + row_offset + rows * stride_lm, mask=rows < seqlen_q_b, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    lo, interior_lo, interior_hi, hi = key_ranges(start_m, seqlen_k_b, window_left, window_right, diagonal_offset,
                                                  BLOCK_M, BLOCK_N, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT)
    dq = _dq_inner(
        dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, lo, interior_lo, rows, offs_dk, offs_dv, seqlen_q_b,
        seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap, slope,
        window_left, window_right, diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED,
        HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)
    dq = _dq_inner(
        dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, interior_lo, interior_hi, rows, offs_dk, offs_dv,
        seqlen_q_b, seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
        slope, window_left, window_right, diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED,
        HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, ON_EDGE=False, DOT_PRECISION=DOT_PRECISION)
    dq = _dq_inner(
        dq, q, grad_out, lse2, delta, k_ptr, v_ptr, mask_ptr, interior_hi, hi, rows, offs_dk, offs_dv, seqlen_q_b,
        seqlen_k_b, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap, slope,
        window_left, window_right, diagonal_offset, dropout_p, seed, batch_head, HEAD_DIM, HEAD_DIM_PADDED,
        HEAD_DIM_V, HEAD_DIM_V_PADDED, BLOCK_N, MASK_KIND, HAS_SOFTCAP, HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT,
        HAS_DROPOUT, ON_EDGE=True, DOT_PRECISION=DOT_PRECISION)
    dq_ptr = DQ + batch64 * stride_dqb + head64 * stride_dqh + q_start64 * stride_dqm
    tl.store(dq_ptr + element_offsets(rows[:, None], stride_dqm, offs_dk[None, :], stride_dqd),
             (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < seqlen_q_b) & (offs_dk[None, :] < HEAD_DIM))

