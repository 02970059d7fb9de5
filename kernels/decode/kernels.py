"""Decode attention over a KV cache: the split-K attention with the in-place append fused in, and the merge.

docs/decode.md states the algorithm; ``pyattn.reference.decode`` the semantics these implement. In brief:

* ``decode_attention_kernel``: one program per (query-row tile, split, batch row). Its rows are the
  ``group × seqlen_q`` queries of one KV head's GQA group (row r is query position r // group of head
  kv_head · group + r % group), so every K/V byte is read once per group. The split's share of the key band is
  streamed with an online softmax in fp32: the cached keys from the cache, the new ones from k/v; with ``SPLIT``
  the normalised partial output and its LSE go to fp32 scratch, else straight to out/lse. Then the program
  writes its share of the new tokens (k/v) into the cache at logical positions cache_seqlens[b] + t (a
  contiguous row, or blocks found through the block table); positions past the cache are not written. No cache
  row is both written and read by one launch (two sequences whose block tables or cache rows alias aside);
* ``combine_splits_kernel``: out = Σ_s exp(lse_s − m) o_s / Σ_s exp(lse_s − m), lse = m + log Σ_s exp(lse_s − m).

Every index read from the device is made safe, so no value can make a kernel read or write outside the cache:
a negative cache_seqlens counts as 0 and the keys stop at the cache's capacity (appended positions past it are
dropped); a position whose block (block_table) or row (cache_batch_idx) is outside the cache is neither written
nor read. Only the reference and the CPU paths check the values themselves (and raise).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    # From exp2 of a non-positive argument: no overflow, exact ±1 saturation, no libdevice.
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _cache_row(CacheBatchIdx, batch, num_cache_rows, HAS_BATCH_IDX: tl.constexpr):
    """(row, in range) of batch row ``batch`` in a contiguous cache: cache_batch_idx[batch], else batch."""
    if HAS_BATCH_IDX:
        row = tl.load(CacheBatchIdx + batch)
        in_range = (row >= 0) & (row < num_cache_rows)
        return tl.where(in_range, row, 0), in_range
    return batch, batch >= 0


@triton.jit
def _locate(block_table_row, cache_row, cache_row_ok, positions, valid, block_size, num_cache_rows,
            PAGED: tl.constexpr):
    """(first-dim index, validity) of logical ``positions`` of one sequence: the block of each position read
    through the block table (PAGED), else the sequence's cache row. A position whose block or row is outside the
    cache is invalid: neither written nor read (its index is replaced by 0, so no address leaves the cache)."""
    if PAGED:
        blocks = tl.load(block_table_row + positions // block_size, mask=valid, other=0)
        in_range = (blocks >= 0) & (blocks < num_cache_rows)
        return tl.where(in_range, blocks, 0).to(tl.int64), valid & in_range
    return (positions * 0 + cache_row).to(tl.int64), valid & cache_row_ok


@triton.jit
def _offsets(rows0, positions, block_size, stride_row0, stride_pos, PAGED: tl.constexpr):
    """int64 offsets of logical ``positions`` in a cache laid out (rows0, positions, heads, d)."""
    if PAGED:
        return rows0 * stride_row0 + (positions % block_size).to(tl.int64) * stride_pos
    return rows0 * stride_row0 + positions.to(tl.int64) * stride_pos


@triton.jit
def _attend_tile(acc, row_sum, row_max, q, k, v, offs_n, key_valid, row_valid, position, slope, scale, softcap,
                 window_left, window_right, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The online softmax over one key tile (keys ``offs_n``, rows k and v): the updated (acc, row_sum, row_max)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        s = _tanh(qk * (scale / softcap)) * (softcap * LOG2E)
    else:
        s = qk * (scale * LOG2E)
    if HAS_ALIBI:
        s -= (slope[:, None] * LOG2E) * tl.abs(position[:, None] - offs_n[None, :]).to(tl.float32)
    visible = row_valid[:, None] & key_valid[None, :]
    if HAS_WINDOW_LEFT:
        visible &= offs_n[None, :] >= position[:, None] - window_left
    if HAS_WINDOW_RIGHT:
        visible &= offs_n[None, :] <= position[:, None] + window_right
    s = tl.where(visible, s, float("-inf"))
    # Invariant: acc = Σ_j exp2(s_ij − row_max_i) v_j, row_sum = Σ_j exp2(s_ij − row_max_i) over the keys
    # seen; a row that has seen no visible key keeps row_max = −inf and is shifted by 0 instead.
    new_max = tl.maximum(row_max, tl.max(s, 1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.exp2(s - shift[:, None])
    correction = tl.exp2(row_max - shift)
    row_sum = row_sum * correction + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=DOT_PRECISION)
    return acc, row_sum, new_max


# Sizes used only in arithmetic are not specialised (a length of 1, or one divisible by 16, would otherwise compile
# its own variant: decode steps have seqlen_q = seqlen_new = 1, MHA a group of 1, short caches one split).
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_new", "group_size", "capacity", "num_cache_rows", "block_size",
                               "num_splits", "window_left", "window_right"])
def decode_attention_kernel(
    Q, KNew, VNew, KCache, VCache, Out, Lse, CacheSeqlens, BlockTable, CacheBatchIdx, AlibiSlopes,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_knb, stride_knn, stride_knh, stride_knd,
    stride_vnb, stride_vnn, stride_vnh, stride_vnd,
    stride_kc0, stride_kcn, stride_kch, stride_kcd,
    stride_vc0, stride_vcn, stride_vch, stride_vcd,
    stride_os, stride_ob, stride_om, stride_oh, stride_od,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_btb, stride_ab, stride_ah,
    seqlen_q, seqlen_new, group_size, capacity, num_cache_rows, block_size, num_splits,
    scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NEW: tl.constexpr,
):
    """One split of the key band for BLOCK_M packed (query, head) rows of one KV head's group, and this program's
    share of the append.

    Grid (row tiles × heads_k, splits, batch). Out/Lse are the fp32 partials (split, b, m, h, ·) with SPLIT,
    else the final out (b, m, h, Dv) and lse (b, h, m) (their split strides are then unused). KNew/VNew
    (b, n, h, ·) hold the seqlen_new new tokens (a placeholder when seqlen_new is 0: never read).

    The cached keys (positions < cache_seqlens[b]) stream from the cache; the new ones come from KNew/VNew, never
    from the cache rows this launch writes, since another program may be writing them (there is no grid barrier).
    """
    rows_per_head = seqlen_q * group_size
    row_tiles = tl.maximum(tl.cdiv(rows_per_head, BLOCK_M), 1)  # 1 with no query row: the program only appends
    kv_head = tl.program_id(0) // row_tiles
    row_tile = tl.program_id(0) % row_tiles
    start_m = row_tile * BLOCK_M
    split = tl.program_id(1)
    batch = tl.program_id(2)

    rows = start_m + tl.arange(0, BLOCK_M)
    row_valid = rows < rows_per_head
    query = rows // group_size  # query position i of each row
    head = kv_head * group_size + rows % group_size
    # Keys of this row: the first S_b logical positions, of which the first `cached` are in the cache already;
    # query i sits at key position i + S_b − L.
    start = tl.maximum(tl.load(CacheSeqlens + batch), 0)
    seqlen_k = tl.minimum(start + seqlen_new, capacity)
    cached = tl.minimum(start, seqlen_k)
    offset = seqlen_k - seqlen_q

    # The band any row of the tile can see, then this split's share of it (whole BLOCK_N tiles).
    lo = start_m * 0
    hi = seqlen_k
    if HAS_WINDOW_LEFT:
        lo = tl.maximum(start_m // group_size + offset - window_left, 0)
    if HAS_WINDOW_RIGHT:
        last_query = tl.minimum((start_m + BLOCK_M - 1) // group_size, seqlen_q - 1)
        hi = tl.minimum(hi, tl.maximum(last_query + offset + window_right + 1, 0))
    hi = tl.where(rows_per_head > 0, hi, lo)
    lo = lo // BLOCK_N * BLOCK_N
    tiles_per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits)
    key_start = lo + split * tiles_per_split * BLOCK_N
    key_end = tl.minimum(key_start + tiles_per_split * BLOCK_N, hi)

    # Every index that meets a stride is int64 (the head dim need not be contiguous, so even d · stride_d may
    # pass 2³¹); int32 stays only where the tensor is tiny or has unit stride: ALiBi slopes (B · H), cache_seqlens,
    # cache_batch_idx and a block-table row (positions // block_size, stride 1 checked by the launcher).
    batch64 = batch.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    offs_d64, offs_dv64 = offs_d.to(tl.int64), offs_dv.to(tl.int64)
    d_valid = offs_d < HEAD_DIM
    dv_valid = offs_dv < HEAD_DIM_V
    q = tl.load(Q + batch64 * stride_qb + query[:, None].to(tl.int64) * stride_qm
                + head[:, None].to(tl.int64) * stride_qh + offs_d64[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(AlibiSlopes + batch * stride_ab + head * stride_ah, mask=row_valid, other=0.0)
    cache_row, cache_row_ok = _cache_row(CacheBatchIdx, batch, num_cache_rows, HAS_BATCH_IDX)
    # Row ``batch`` of the block table (PAGED), else the absent table itself. Assigned in the caller: Triton 3.6
    # cannot compile a helper that returns None from one branch (the unpaged table).
    block_table_row = BlockTable
    if PAGED:
        block_table_row = BlockTable + batch.to(tl.int64) * stride_btb
    head64 = kv_head.to(tl.int64)
    k_base = KCache + head64 * stride_kch
    v_base = VCache + head64 * stride_vch
    k_new_base = KNew + batch64 * stride_knb + head64 * stride_knh
    v_new_base = VNew + batch64 * stride_vnb + head64 * stride_vnh
    position = query + offset  # each row's own key position

    # The append: the new tokens of this (sequence, KV head) in chunks of BLOCK_NEW, dealt round-robin to its
    # row_tiles × num_splits programs, the last program first. Every new cache row is written by one program and
    # read by none: the attention below takes the new keys from k/v. Written first, while the accumulators are not
    # yet live (fewer registers). The reversed deal is for the interpreter, which runs programs one at a time in
    # grid order: a token is written after the earlier programs that attend to it have run, so a kernel that read
    # new keys from the cache would see the old rows there and fail the tests.
    programs = row_tiles * num_splits
    writer = programs - 1 - (row_tile * num_splits + split)
    for first in range(writer * BLOCK_NEW, seqlen_new, programs * BLOCK_NEW):
        tokens = first + tl.arange(0, BLOCK_NEW)
        new_positions = start + tokens
        rows0, write = _locate(block_table_row, cache_row, cache_row_ok, new_positions,
                               (tokens < seqlen_new) & (new_positions < capacity), block_size, num_cache_rows, PAGED)
        tokens64 = tokens.to(tl.int64)
        k = tl.load(k_new_base + tokens64[:, None] * stride_knn + offs_d64[None, :] * stride_knd,
                    mask=write[:, None] & d_valid[None, :])
        tl.store(k_base + _offsets(rows0, new_positions, block_size, stride_kc0, stride_kcn, PAGED)[:, None]
                 + offs_d64[None, :] * stride_kcd, k.to(KCache.dtype.element_ty),
                 mask=write[:, None] & d_valid[None, :])
        v = tl.load(v_new_base + tokens64[:, None] * stride_vnn + offs_dv64[None, :] * stride_vnd,
                    mask=write[:, None] & dv_valid[None, :])
        tl.store(v_base + _offsets(rows0, new_positions, block_size, stride_vc0, stride_vcn, PAGED)[:, None]
                 + offs_dv64[None, :] * stride_vcd, v.to(VCache.dtype.element_ty),
                 mask=write[:, None] & dv_valid[None, :])

    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PADDED], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    cached_end = tl.minimum(key_end, cached)
    for start_n in range(key_start, cached_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows0, key_valid = _locate(block_table_row, cache_row, cache_row_ok, offs_n, offs_n < cached_end, block_size,
                                   num_cache_rows, PAGED)
        k = tl.load(k_base + _offsets(rows0, offs_n, block_size, stride_kc0, stride_kcn, PAGED)[:, None]
                    + offs_d64[None, :] * stride_kcd, mask=key_valid[:, None] & d_valid[None, :], other=0.0)
        v = tl.load(v_base + _offsets(rows0, offs_n, block_size, stride_vc0, stride_vcn, PAGED)[:, None]
                    + offs_dv64[None, :] * stride_vcd, mask=key_valid[:, None] & dv_valid[None, :], other=0.0)
        acc, row_sum, row_max = _attend_tile(acc, row_sum, row_max, q, k, v, offs_n, key_valid, row_valid, position,
                                             slope, scale, softcap, window_left, window_right, HAS_SOFTCAP,
                                             HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, DOT_PRECISION)
    # The new keys of the band, from k/v, cast as the cache stores them. A new position whose block or row is out
    # of range is not written (above), so it is not seen either (as a cached one would not be).
    for start_n in range(tl.maximum(key_start, cached), key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        _, key_valid = _locate(block_table_row, cache_row, cache_row_ok, offs_n, offs_n < key_end, block_size,
                               num_cache_rows, PAGED)
        tokens = (offs_n - start).to(tl.int64)
        k = tl.load(k_new_base + tokens[:, None] * stride_knn + offs_d64[None, :] * stride_knd,
                    mask=key_valid[:, None] & d_valid[None, :], other=0.0).to(KCache.dtype.element_ty)
        v = tl.load(v_new_base + tokens[:, None] * stride_vnn + offs_dv64[None, :] * stride_vnd,
                    mask=key_valid[:, None] & dv_valid[None, :], other=0.0).to(VCache.dtype.element_ty)
        acc, row_sum, row_max = _attend_tile(acc, row_sum, row_max, q, k, v, offs_n, key_valid, row_valid, position,
                                             slope, scale, softcap, window_left, window_right, HAS_SOFTCAP,
                                             HAS_ALIBI, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, DOT_PRECISION)

    # No visible key in this split (or at all): out 0 and lse −inf, never 0/0.
    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * LN2, float("-inf"))
    o_ptr = Out
    lse_ptr = Lse
    if SPLIT:
        o_ptr += split.to(tl.int64) * stride_os
        lse_ptr += split.to(tl.int64) * stride_ls
    o_ptr = (o_ptr + batch64 * stride_ob + query[:, None].to(tl.int64) * stride_om
             + head[:, None].to(tl.int64) * stride_oh + offs_dv64[None, :] * stride_od)
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_valid[:, None] & dv_valid[None, :])
    lse_ptr = (lse_ptr + batch64 * stride_lb + head.to(tl.int64) * stride_lh
               + query.to(tl.int64) * stride_lm)
    tl.store(lse_ptr, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def combine_splits_kernel(
    PartialOut, PartialLse, Out, Lse,
    stride_ps, stride_pb, stride_pm, stride_ph, stride_pd,
    stride_qs, stride_qb, stride_qm, stride_qh,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_lm,
    num_heads, num_splits,
    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PADDED: tl.constexpr, SPLITS_PADDED: tl.constexpr,
    SPLITS_CHUNK: tl.constexpr,
):
    """Merge the splits of one output row (b, i, h): all LSEs at once, the partial outputs SPLITS_CHUNK at a time
    (a whole (128, 256) fp32 tile would not fit in registers). Grid (seqlen_q · heads_q, batch)."""
    query = tl.program_id(0) // num_heads
    head = tl.program_id(0) % num_heads
    batch64 = tl.program_id(1).to(tl.int64)
    offs_dv = tl.arange(0, HEAD_DIM_V_PADDED)
    offs_dv64 = offs_dv.to(tl.int64)
    row = batch64 * stride_qb + query.to(tl.int64) * stride_qm + head.to(tl.int64) * stride_qh
    splits = tl.arange(0, SPLITS_PADDED)
    lse = tl.load(PartialLse + row + splits.to(tl.int64) * stride_qs, mask=splits < num_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp2((lse - shift) * LOG2E), 0)  # exp2(−inf) = 0 for splits that saw no key
    partial_row = batch64 * stride_pb + query.to(tl.int64) * stride_pm + head.to(tl.int64) * stride_ph
    acc = tl.zeros([HEAD_DIM_V_PADDED], dtype=tl.float32)
    for first in tl.static_range(0, SPLITS_PADDED, SPLITS_CHUNK):
        chunk = first + tl.arange(0, SPLITS_CHUNK)
        valid = chunk < num_splits
        weight = tl.exp2((tl.load(PartialLse + row + chunk.to(tl.int64) * stride_qs, mask=valid,
                                  other=float("-inf")) - shift) * LOG2E)
        partial = tl.load(PartialOut + partial_row + chunk[:, None].to(tl.int64) * stride_ps
                          + offs_dv64[None, :] * stride_pd,
                          mask=valid[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc += tl.sum(partial * weight[:, None], 0)
    safe_total = tl.where(total > 0, total, 1.0)
    tl.store(Out + batch64 * stride_ob + query.to(tl.int64) * stride_om + head.to(tl.int64) * stride_oh
             + offs_dv64 * stride_od, (acc / safe_total).to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Lse + batch64 * stride_lb + head.to(tl.int64) * stride_lh + query.to(tl.int64) * stride_lm,
             tl.where(total > 0, shift + tl.log(safe_total), float("-inf")))
