// What the forward and backward kernels share: tile configurations, the shared-memory swizzle, the
// ldmatrix address patterns that produce mma fragments, cp.async tile loads, the band of visible
// tiles, and the score transform (scale, softcap, ALiBi, masks, window).
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/attention_params.h"
#include "attention/device.cuh"

namespace pyattn::attention {

// ---------------------------------------------------------------------------------- configurations
// One warp owns 16 rows of every mma (m16): the M tile is 16 x warps. Configurations are data: the
// sm_80 kernels use these on A100 and H100; registers and shared memory are in docs/attention.md.

template <int HEAD_DIM>
struct ForwardConfig;
template <>
struct ForwardConfig<64> {
  static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8, kStages = 3;
};
template <>
struct ForwardConfig<128> {
  static constexpr int kBlockM = 128, kBlockN = 64, kWarps = 8, kStages = 2;
};

// dK/dV: a CTA owns BLOCK_N keys (16 per warp) and streams query tiles of BLOCK_M.
template <int HEAD_DIM>
struct BackwardConfig;
template <>
struct BackwardConfig<64> {
  static constexpr int kBlockN = 128, kBlockM = 64, kWarps = 8, kStages = 2;
};
template <>
struct BackwardConfig<128> {
  static constexpr int kBlockN = 128, kBlockM = 32, kWarps = 8, kStages = 2;
};

// Deterministic dQ: a CTA owns BLOCK_M queries (16 per warp) and streams key tiles of BLOCK_N.
template <int HEAD_DIM>
struct DqConfig;
template <>
struct DqConfig<64> {
  static constexpr int kBlockM = 64, kBlockN = 64, kWarps = 4, kStages = 2;
};
template <>
struct DqConfig<128> {  // S, dP and dS of 16 x 64 next to a 16 x 128 accumulator spill on sm_90a: 32 keys
  static constexpr int kBlockM = 64, kBlockN = 32, kWarps = 4, kStages = 2;
};

// ------------------------------------------------------------------------------------------ helpers

PYATTN_DEVICE int imin(int a, int b) { return a < b ? a : b; }
PYATTN_DEVICE int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }
PYATTN_DEVICE int64_t imax64(int64_t a, int64_t b) { return a > b ? a : b; }
inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// ---------------------------------------------------------------------------------------- swizzle

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile whose rows hold ROW_CHUNKS chunks. The
// chunk index is XORed with the row's position among the rows that share the 32 banks (one row per
// 128-byte line when rows are >= 128 bytes, two when they are 64), so the 8 rows an ldmatrix phase
// reads at one logical chunk fall into 8 different 16-byte bank groups: no bank conflicts.
template <int ROW_CHUNKS>
PYATTN_DEVICE uint32_t tile_offset(int row, int chunk) {
  static_assert(ROW_CHUNKS == 4 || ROW_CHUNKS % 8 == 0, "rows of 64 bytes or a multiple of 128");
  constexpr int kRowsPerLine = ROW_CHUNKS >= 8 ? 1 : 8 / ROW_CHUNKS;
  constexpr int kMask = ROW_CHUNKS >= 8 ? 7 : ROW_CHUNKS - 1;
  return static_cast<uint32_t>(row * ROW_CHUNKS + (chunk ^ ((row / kRowsPerLine) & kMask))) * 16u;
}

// ldmatrix.x4 row addresses for the 16x16 block of 16-bit elements at (row0, chunk0) of a swizzled tile.
//
// rows_first: matrices (rows 0-7, chunk 0), (rows 8-15, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 1).
//   non-trans: the A fragment of a row-major 16x16 block (rows = M, chunks = K);
//   .trans:    B fragments of two n8 tiles of a K-major block (rows = K, chunks = N):
//              registers {b[n][0], b[n][1], b[n+1][0], b[n+1][1]}.
template <int ROW_CHUNKS>
PYATTN_DEVICE uint32_t rows_first(uint32_t tile, int row0, int chunk0, int lane) {
  return tile + tile_offset<ROW_CHUNKS>(row0 + (lane & 15), chunk0 + (lane >> 4));
}
// chunks_first: matrices (rows 0-7, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 0), (rows 8-15, chunk 1).
//   non-trans: B fragments of two n8 tiles of an N-major block (rows = N, chunks = K):
//              registers {b[n][0], b[n][1], b[n+1][0], b[n+1][1]};
//   .trans:    the A fragment of a block stored transposed (rows = K, chunks = M).
template <int ROW_CHUNKS>
PYATTN_DEVICE uint32_t chunks_first(uint32_t tile, int row0, int chunk0, int lane) {
  return tile + tile_offset<ROW_CHUNKS>(row0 + (lane & 7) + ((lane >> 4) << 3), chunk0 + ((lane >> 3) & 1));
}

// The A fragment (16 x 16) made of two adjacent 16 x 8 accumulator tiles: the accumulator of one mma
// becomes the left operand of the next without leaving registers (FlashAttention-2's P·V).
template <class E>
PYATTN_DEVICE void accumulators_to_a(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack_pair(E{}, left[0], left[1]);
  a[1] = pack_pair(E{}, left[2], left[3]);
  a[2] = pack_pair(E{}, right[0], right[1]);
  a[3] = pack_pair(E{}, right[2], right[3]);
}

// ------------------------------------------------------------------------------------ tile loads

// cp.async of rows [row0, row0 + ROWS) of a (rows, HEAD_DIM) matrix into a swizzled tile; rows at or
// past `rows` are zero-filled (so padding keys hold V = 0, never stale NaN, and scores stay finite).
template <int ROWS, int HEAD_DIM, int THREADS>
PYATTN_DEVICE void load_tile(uint32_t tile, const uint16_t* matrix, int64_t row_stride, int row0, int rows) {
  constexpr int kRowChunks = HEAD_DIM / 8, kChunks = ROWS * kRowChunks;
  static_assert(kChunks % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; ++i) {
    const int c = thread_index() + i * THREADS;
    const int row = c / kRowChunks, chunk = c % kRowChunks;
    const bool valid = row0 + row < rows;
    const uint16_t* source = matrix + (valid ? int64_t(row0 + row) * row_stride : 0) + chunk * 8;
    cp_async_16(tile + tile_offset<kRowChunks>(row, chunk), source, valid);
  }
}

// cp.async of COUNT floats (a multiple of 4) from a padded per-row workspace into shared memory.
template <int COUNT>
PYATTN_DEVICE void load_row_values(uint32_t destination, const float* source) {
  static_assert(COUNT % 4 == 0, "16-byte chunks");
  const int c = thread_index();
  if (c < COUNT / 4) cp_async_16(destination + c * 16, source + c * 4, true);
}

// ------------------------------------------------------------------------------------ sequences

// One batch entry's rows: in the dense layout rows [0, seqlen) of its own batch slice; in the varlen layout
// rows [start, start + length) of the packed tensors, read from cu_seqlens. Every bound the kernels test
// (tile loads, visibility, stores) is the sequence's own, so no tile reads or writes another sequence's rows:
// a query tile that runs past its sequence's end zero-fills those rows and never stores them.
struct Sequence {
  int64_t q_start, k_start;  // first packed row (0 in the dense layout)
  int seqlen_q, seqlen_k;
  int64_t diagonal_offset;   // key position of query 0's diagonal: p.diagonal_offset (+ S_b − L_b with align_to_end)
};

PYATTN_DEVICE Sequence sequence_of(const ForwardParams& p, int batch) {
  Sequence seq{0, 0, p.seqlen_q, p.seqlen_k, p.diagonal_offset};
  if (p.cu_seqlens_q != nullptr) {
    seq.q_start = ld_global(p.cu_seqlens_q + batch);
    seq.k_start = ld_global(p.cu_seqlens_k + batch);
    seq.seqlen_q = ld_global(p.cu_seqlens_q + batch + 1) - static_cast<int>(seq.q_start);
    seq.seqlen_k = ld_global(p.cu_seqlens_k + batch + 1) - static_cast<int>(seq.k_start);
  }
  if (p.align_to_end) seq.diagonal_offset += seq.seqlen_k - seq.seqlen_q;
  return seq;
}

// ---------------------------------------------------------------------------------------- band

struct Band {
  int begin, end;  // tile indices [begin, end)
};

// The key tiles of BLOCK_N that some row of the query tile [m0, m0 + BLOCK_M) can see. Tiles outside
// are never loaded: under causal about half, under a window of w keys O(w / BLOCK_N) per query tile.
template <int BLOCK_M, int BLOCK_N>
PYATTN_DEVICE Band key_tiles(const ForwardParams& p, const Sequence& seq, int m0) {
  const int64_t last_row = imin(m0 + BLOCK_M, seq.seqlen_q) - 1;
  int64_t lo = 0, hi = seq.seqlen_k;
  if (p.window_left >= 0) lo = imax64(lo, m0 + seq.diagonal_offset - p.window_left);
  if (p.window_right >= 0) hi = imin64(hi, last_row + seq.diagonal_offset + p.window_right + 1);
  if (hi <= lo) return {0, 0};
  return {static_cast<int>(lo / BLOCK_N), static_cast<int>((hi + BLOCK_N - 1) / BLOCK_N)};
}

// The query tiles of BLOCK_M that see some key of the key tile [n0, n0 + BLOCK_N).
template <int BLOCK_M, int BLOCK_N>
PYATTN_DEVICE Band query_tiles(const ForwardParams& p, const Sequence& seq, int n0) {
  const int64_t last_key = imin(n0 + BLOCK_N, seq.seqlen_k) - 1;
  int64_t lo = 0, hi = seq.seqlen_q;
  if (p.window_right >= 0) lo = imax64(lo, n0 - seq.diagonal_offset - p.window_right);
  if (p.window_left >= 0) hi = imin64(hi, last_key - seq.diagonal_offset + p.window_left + 1);
  if (hi <= lo) return {0, 0};
  return {static_cast<int>(lo / BLOCK_M), static_cast<int>((hi + BLOCK_M - 1) / BLOCK_M)};
}

// Whether the tile (queries [m0, m0 + BLOCK_M), keys [n0, n0 + BLOCK_N)) needs per-element visibility:
// the window's edge crosses it, or it runs past the sequence's last key. Interior tiles skip that arithmetic.
template <int BLOCK_M, int BLOCK_N>
PYATTN_DEVICE bool tile_crosses_window(const ForwardParams& p, const Sequence& seq, int m0, int n0) {
  if (n0 + BLOCK_N > seq.seqlen_k) return true;
  if (p.window_left >= 0 && int64_t(n0) < int64_t(m0 + BLOCK_M - 1) + seq.diagonal_offset - p.window_left) return true;
  if (p.window_right >= 0 && int64_t(n0 + BLOCK_N - 1) > int64_t(m0) + seq.diagonal_offset + p.window_right) return true;
  return false;
}

// --------------------------------------------------------------------------------------- scores

// Per (batch, head) constants of the score transform.
struct ScoreTerms {
  float softcap_inverse;
  float slope;
  const unsigned char* mask;  // at (batch, head): add i * stride_i + j * stride_j elements
};

template <class E>
PYATTN_DEVICE ScoreTerms score_terms(const ForwardParams& p, int batch, int head) {
  ScoreTerms t;
  t.softcap_inverse = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
  t.slope = p.alibi_slopes != nullptr ? ld_global(p.alibi_slopes + batch * p.alibi_batch_stride + head) : 0.f;
  const int element = p.mask_kind == MaskKind::kBool ? 1 : 2;
  t.mask = p.mask == nullptr ? nullptr
                             : static_cast<const unsigned char*>(p.mask) +
                                   (batch * p.mask_strides[0] + head * p.mask_strides[1]) * element;
  return t;
}

// The score of query i and key j as the softmax takes it (x, with logit = p.score_unit * x), from
// acc = q_i·k_j: -inf where key j is invisible (window, past the keys, bool mask) or the row is padding.
// `tanh_out` receives tanh(s / softcap) for the backward's chain rule.
template <class E>
PYATTN_DEVICE float transformed_score(const ForwardParams& p, const Sequence& seq, const ScoreTerms& t, float acc, int i,
                                      int j, bool crosses_window, float& tanh_out) {
  const bool in_bounds = i < seq.seqlen_q && j < seq.seqlen_k;
  float x = acc;
  if (!p.plain_scores) {
    x = acc * p.scale;
    if (p.softcap > 0.f) {
      tanh_out = tanhf(x * t.softcap_inverse);
      x = p.softcap * tanh_out;
    }
    if (p.alibi_slopes != nullptr) {
      const int64_t distance = int64_t(i) + seq.diagonal_offset - j;
      x -= t.slope * static_cast<float>(distance < 0 ? -distance : distance);
    }
    if (p.mask_kind == MaskKind::kAdditive && in_bounds) {
      const uint16_t* mask = reinterpret_cast<const uint16_t*>(t.mask);
      x += to_float(E{}, ld_global(mask + i * p.mask_strides[2] + j * p.mask_strides[3]));
    }
  }
  bool visible = true;
  if (crosses_window) {
    const int64_t diagonal = int64_t(i) + seq.diagonal_offset;
    visible = j < seq.seqlen_k && (p.window_left < 0 || j >= diagonal - p.window_left) &&
              (p.window_right < 0 || j <= diagonal + p.window_right);
  }
  if (p.mask_kind != MaskKind::kNone) {
    visible = visible && in_bounds;
    if (p.mask_kind == MaskKind::kBool && visible)
      visible = ld_global(t.mask + i * p.mask_strides[2] + j * p.mask_strides[3]) != 0;
  }
  return visible ? x : -INFINITY;
}

}  // namespace pyattn::attention
