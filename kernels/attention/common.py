"""Device helpers shared by the attention kernels: tanh, the Philox dropout draw, int64 tile offsets, score
masking, tile loads and the band (causal / sliding-window) ranges. docs/attention.md states the semantics these
implement."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Mask kinds (the kernels' constexpr MASK_KIND).
NO_MASK, BOOL_MASK, ADDITIVE_MASK = 0, 1, 2


@triton.jit
def tanh(x):
    # From exp2 of a non-positive argument: no overflow, exact ±1 saturation, and no dependence on
    # libdevice, whose module path moved between Triton versions.
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


# Dropout: a 16-bit uniform per score, eight per Philox4x32-10 call (docs/attention.md, "Dropout RNG").
DROPOUT_KEYS_PER_DRAW = 8
DROPOUT_RESOLUTION = 65536  # drop probabilities are multiples of 1/65536


def quantised_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels apply for ``dropout_p``: ``round(p · 65536) / 65536``, at most
    65535/65536, rounded as :func:`dropout_threshold` rounds it (from ``p`` in fp32, the kernel argument's type).
    Their 1/(1 − p) scale uses this value, so E[keep · scale] = 1 exactly."""
    scaled = torch.tensor(dropout_p, dtype=torch.float32) * DROPOUT_RESOLUTION + 0.5
    return min(int(scaled.floor()), DROPOUT_RESOLUTION - 1) / DROPOUT_RESOLUTION


@triton.jit
def dropout_threshold(dropout_p):
    """t = round(p · 65536) ≤ 65535: a 16-bit uniform u keeps its score iff u ≥ t, with probability 1 − t/65536.
    p · 65536 is exact in fp32 and, below 2¹⁶, so is adding ½ (p = 0 never reaches here: HAS_DROPOUT)."""
    # tl.cast also makes a tensor of the interpreter's Python float (Triton 3.6 has no public tl.to_tensor).
    return tl.minimum((tl.cast(dropout_p, tl.float32) * 65536.0 + 0.5).to(tl.uint32), 65535)


@triton.jit
def dropout_scale(dropout_p):
    """1 / (1 − t/65536) = 65536 / (65536 − t): the rescale of the kept scores for the probability applied."""
    return 65536.0 / (65536 - dropout_threshold(dropout_p)).to(tl.float32)


@triton.jit
def dropout_keep(seed, batch_head, rows, start_col, dropout_p, NUM_COLS: tl.constexpr):
    """(len(rows), NUM_COLS) tile, True where score (batch_head, i = rows, j = start_col + c) survives dropout.

    One Philox call per row and run of 8 keys: key = seed, counter = (j // 8, i, batch_head, 0); key j takes
    16-bit half (j % 2) of output word (j % 8) // 2, low half first. The bits depend on (seed, batch_head, i, j)
    only, so every kernel redraws the same ones whatever its tiles; ``start_col`` must be a multiple of 8.
    """
    tl.static_assert(NUM_COLS % 8 == 0, "dropout draws keys in runs of 8: NUM_COLS must be a multiple of 8")
    groups = start_col // 8 + tl.arange(0, NUM_COLS // 8)
    zero = (rows[:, None] * 0 + groups[None, :] * 0).to(tl.uint32)
    word0, word1, word2, word3 = tl.philox(seed, groups[None, :].to(tl.uint32) + zero, rows[:, None].to(tl.uint32)
                                           + zero, zero + batch_head.to(tl.uint32), zero)
    # (rows, groups, 2, 2): [..., a, b] = word 2a + b; then the halves: [..., a, b, h] is key 8 g + 2 (2a + b) + h.
    words = tl.join(tl.join(word0, word2), tl.join(word1, word3))
    threshold = dropout_threshold(dropout_p)
    keep = tl.join((words & 0xFFFF) >= threshold, (words >> 16) >= threshold)
    return tl.reshape(keep, (rows.shape[0], NUM_COLS))


@triton.jit
def element_offsets(rows, stride_rows, cols, stride_cols):
    """int64 offsets rows · stride_rows + cols · stride_cols (broadcasting): an index times a stride passes 2³¹
    inside one slice (a 46k × 46k mask plane, bshd/varlen rows of seqlen · H · D; even the head-dim term, as
    inputs may have any strides). The casts act on the index vectors before they broadcast to the tile.

    Offsets left int32, being provably small: lse/delta rows (the launchers allocate them with unit row stride,
    so rows · stride_lm < seqlen), ALiBi slopes (B · H entries), cu_seqlens (B + 1), and the Philox counters
    (32-bit by design). Batch, head and sequence-start offsets are int64 scalars in each kernel."""
    return rows.to(tl.int64) * stride_rows + cols.to(tl.int64) * stride_cols


@triton.jit
def attention_scores(qk, rows, cols, seqlen_q, seqlen_k, scale, softcap, slope, window_left, window_right,
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
        capped = tanh(qk * (scale / softcap))
        s = capped * (softcap * LOG2E)
    else:
        capped = qk
        s = qk * (scale * LOG2E)
    if HAS_ALIBI:
        distance = tl.abs(rows + diagonal_offset - cols).to(tl.float32)
        s -= (slope * LOG2E) * distance
    if MASK_KIND == 2:
        s += mask_tile(mask_ptr, rows, cols, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND).to(tl.float32) * LOG2E
    s = visible_scores(s, rows, cols, seqlen_q, seqlen_k, window_left, window_right, diagonal_offset, mask_ptr,
                       stride_mm, stride_mn, MASK_KIND, HAS_WINDOW_LEFT, HAS_WINDOW_RIGHT, ON_EDGE)
    return s, capped


@triton.jit
def mask_tile(mask_ptr, rows, cols, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND: tl.constexpr):
    """The user mask's (rows, cols) tile, 0 outside the sequences (called only with a mask: MASK_KIND != 0)."""
    if MASK_KIND != 0:
        in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
        mask = tl.load(mask_ptr + element_offsets(rows, stride_mm, cols, stride_mn), mask=in_bounds, other=0)
    return mask


@triton.jit
def visible_scores(s, rows, cols, seqlen_q, seqlen_k, window_left, window_right, diagonal_offset, mask_ptr,
                   stride_mm, stride_mn, MASK_KIND: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr,
                   HAS_WINDOW_RIGHT: tl.constexpr, ON_EDGE: tl.constexpr):
    """``s`` with −inf where the key is invisible: False in a bool mask, outside the window or the sequence.
    Scale-free, so the forward's folded path applies it to raw q·k (a positive scale keeps −inf and the max)."""
    if MASK_KIND == 1:
        s = tl.where(mask_tile(mask_ptr, rows, cols, seqlen_q, seqlen_k, stride_mm, stride_mn, MASK_KIND) != 0, s,
                     float("-inf"))
    if ON_EDGE:
        visible = (rows < seqlen_q) & (cols < seqlen_k)
        if HAS_WINDOW_LEFT:
            visible &= cols >= rows + diagonal_offset - window_left
        if HAS_WINDOW_RIGHT:
            visible &= cols <= rows + diagonal_offset + window_right
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def load_tile(ptrs, rows, num_rows, cols, NUM_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr,
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
def load_kv_tile(base, batch, kv_head, start_n, offs_n, seqlen_k, offs_d, stride_n, stride_d, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PADDED: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
                 ON_EDGE: tl.constexpr):
    """A (BLOCK_N, len(offs_d)) key or value tile. With USE_TMA ``base`` is the (B, H, S, D) tensor
    descriptor (one bulk copy; keys past the sequence are zero-filled, as the masked load fills them),
    else the pointer to this (batch, kv head)'s first row. ``HEAD_DIM_PADDED`` is the end of the tile's
    columns (past the head dim when the tile is padded: those columns are masked, and read as 0)."""
    if USE_TMA:
        tile = base.load([batch, kv_head, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_PADDED)
    else:
        tile = load_tile(base + element_offsets(offs_n[:, None], stride_n, offs_d[None, :], stride_d), offs_n, seqlen_k,
                         offs_d, HEAD_DIM, ON_EDGE, HEAD_DIM < HEAD_DIM_PADDED)
    return tile


@triton.jit
def sequence_bounds(cu_seqlens, batch, max_seqlen, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence ``batch``: from cu_seqlens in the varlen layout, else (0, max)."""
    if IS_VARLEN:
        start = tl.load(cu_seqlens + batch)
        length = tl.load(cu_seqlens + batch + 1) - start
    else:
        start = batch * 0
        length = max_seqlen + batch * 0
    return start, length


@triton.jit
def key_ranges(start_m, seqlen_k, window_left, window_right, diagonal_offset, BLOCK_M: tl.constexpr,
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
def query_ranges(start_n, seqlen_q, seqlen_k, window_left, window_right, diagonal_offset, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_WINDOW_LEFT: tl.constexpr, HAS_WINDOW_RIGHT: tl.constexpr):
    """Query tiles of key tile [start_n, start_n + BLOCK_N), as :func:`key_ranges` with roles swapped.

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



@triton.jit(do_not_specialize=["seed"])  # a fresh random seed per call: one compiled kernel
def attention_dropout_keep_mask_kernel(Keep, num_heads, seqlen_q, seqlen_k, dropout_p, seed,
                                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep pattern :func:`dropout_keep` draws for one (query tile, head, batch) of (B, H, L, S)."""
    head = tl.program_id(1)
    batch = tl.program_id(2)
    batch_head = batch * num_heads + head
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    keep_ptr = Keep + batch_head.to(tl.int64) * seqlen_q * seqlen_k
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, batch_head, rows, start_n, dropout_p, BLOCK_N)
        tl.store(keep_ptr + element_offsets(rows[:, None], seqlen_k, cols[None, :], 1), keep.to(tl.int8),
                 mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))

