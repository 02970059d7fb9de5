"""Warp-specialised attention forward (Hopper): one program per (query tile, head, batch), Q/K/V/O through
tensor descriptors built on the device, the interior key loop split by Triton's Hopper warp specialisation into
a producer warp group (TMA loads into a shared-memory ring, mbarrier hand-offs) and consumer warp groups
(wgmma and softmax, registers rebalanced by ``setmaxnreg``). docs/attention.md, "Schedule v7".

It serves the plain case that FA3's kernel is built for: dense layout, fp16/bf16, power-of-two head dims,
causal or not (any right window and diagonal offset), no mask, softcap, ALiBi, left window or dropout. The
other calls take ``attention_forward_kernel``. Triton's pass specialises a loop only with device-side
descriptors and 4 warps per partition (docs: "Warp specialisation"), hence ``tl.make_tensor_descriptor`` here;
its 128-byte descriptors live in a per-program global scratch that the launcher's allocator provides.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LN2, LOG2E, key_ranges


@triton.jit
def _forward_ws_tile(acc, row_sum, row_max, q, k_desc, v_desc, start_n, rows, seqlen_k, scale_log2, window_right,
                     diagonal_offset, BLOCK_N: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr,
                     MASK_KEYS: tl.constexpr):
    """One key tile of the online softmax (the invariant of ``forward._forward_inner``, scale folded into exp2's
    argument). Keys past the sequence's end read as zeros from the descriptor; with MASK_KEYS (a length that is
    not a multiple of every BLOCK_N) their scores become −inf, and with a right window so do the keys past each
    row's band. Rows past the sequence's end compute harmless scores of zeros and are never stored."""
    k = k_desc.load([start_n, 0])
    qk = tl.dot(q, tl.trans(k))
    if HAS_WINDOW_RIGHT or MASK_KEYS:
        cols = start_n + tl.arange(0, BLOCK_N)
        if HAS_WINDOW_RIGHT:
            visible = cols[None, :] <= (rows + diagonal_offset + window_right)[:, None]
            if MASK_KEYS:
                visible &= cols[None, :] < seqlen_k
        else:
            visible = cols[None, :] < seqlen_k
        qk = tl.where(visible, qk, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(qk, 1) * scale_log2)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(qk * scale_log2 - shift[:, None])
    correction = tl.exp2(row_max - shift)
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = acc * correction[:, None]
    v = v_desc.load([start_n, 0])
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, row_sum, new_max


@triton.jit
def attention_forward_ws_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    num_heads, group_size, seqlen_q, seqlen_k, seqlen_q_bucket, seqlen_k_bucket,
    scale, window_right, diagonal_offset,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, MASK_KEYS: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), out like q with Dv, lse (B, Hq, L) fp32; the last dim
    of q/k/v/out contiguous and every other stride a multiple of 16 bytes (``launch.tma_unsupported_reason``).
    A (batch, head)'s descriptors span only its own rows, so tiles past a sequence's end read zeros (masked as
    invisible) and store nothing. ``seqlen_*_bucket`` are read by the autotuner's key, not here."""
    query_tile = tl.program_id(0)
    if HAS_WINDOW_RIGHT:  # causal-like bands: the heaviest tiles first (as the pointer forward orders them)
        query_tile = tl.num_programs(0) - 1 - query_tile
    start_m = query_tile * BLOCK_M
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // group_size
    batch64, head64, kv_head64 = batch.to(tl.int64), head.to(tl.int64), kv_head.to(tl.int64)
    dtype = Q.dtype.element_ty
    q_desc = tl.make_tensor_descriptor(Q + batch64 * stride_qb + head64 * stride_qh, shape=[seqlen_q, HEAD_DIM],
                                       strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + batch64 * stride_kb + kv_head64 * stride_kh, shape=[seqlen_k, HEAD_DIM],
                                       strides=[stride_kn, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + batch64 * stride_vb + kv_head64 * stride_vh,
                                       shape=[seqlen_k, HEAD_DIM_V], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM_V])
    o_desc = tl.make_tensor_descriptor(Out + batch64 * stride_ob + head64 * stride_oh, shape=[seqlen_q, HEAD_DIM_V],
                                       strides=[stride_om, 1], block_shape=[BLOCK_M, HEAD_DIM_V])
    rows = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([start_m, 0])
    scale_log2 = scale * LOG2E

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # No left window: the band is keys [0, hi). One loop, masked per score where MASK_KEYS or a right window
    # asks: Triton's Hopper pass specialises a kernel with one such loop, and fails on a second (3.6 and 3.8), so
    # the pointer forward's unmasked interior and masked edge passes cannot be split out here.
    _, _, _, hi = key_ranges(start_m, seqlen_k, 0, window_right, diagonal_offset, BLOCK_M, BLOCK_N, False,
                             HAS_WINDOW_RIGHT)
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, row_sum, row_max = _forward_ws_tile(acc, row_sum, row_max, q, k_desc, v_desc, start_n, rows, seqlen_k,
                                                 scale_log2, window_right, diagonal_offset, BLOCK_N, HAS_WINDOW_RIGHT,
                                                 MASK_KEYS)

    # A row with no visible key has row_sum = 0: output 0 and lse = −inf, never 0/0.
    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * LN2, float("-inf"))
    o_desc.store([start_m, 0], (acc / safe_sum[:, None]).to(dtype))
    lse_ptr = Lse + batch64 * stride_lb + head64 * stride_lh
    tl.store(lse_ptr + rows, lse, mask=rows < seqlen_q)
