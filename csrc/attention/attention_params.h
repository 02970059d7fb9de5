// The kernels' interface: raw pointers, sizes and strides (in elements), no torch and no CUDA types.
// attention_api.cpp fills these from tensors; the CPU emulation (emulation/) fills them from host
// buffers. Every arch's launchers take the same structs (attention_launch.h), so an sm_90a path (wgmma,
// TMA) can be added beside the sm_80 one without touching the API.
//
// Layout: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, D) with any strides whose last dim is 1 and
// whose other strides are multiples of 8 elements (16 bytes; cp.async moves 16-byte chunks), base
// pointers 16-byte aligned. out like q, lse (B, Hq, L) float32 contiguous. Query head h reads key/value
// head h / (Hq / Hk). Semantics: pyattn/reference/attention.py (docs/attention.md).
//
// Varlen (cu_seqlens_q/k set): q, out (total_q, Hq, D) and k, v (total_k, Hk, D) hold the sequences packed
// one after another; sequence b is rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q (and likewise of k).
// The batch strides are 0, seqlen_q/k are the longest sequences (they size the grids), and the kernels read
// each sequence's rows and lengths from cu_seqlens on the device (attention_common.cuh's Sequence).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYATTN_HOST_DEVICE __host__ __device__
#else
#define PYATTN_HOST_DEVICE
#endif

namespace pyattn::attention {

// Element types, as tags: the kernels move raw 16-bit patterns and convert only at the edges.
struct Fp16 {
  static constexpr bool kIsBf16 = false;
};
struct Bf16 {
  static constexpr bool kIsBf16 = true;
};

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

struct Grid {
  unsigned x = 1, y = 1, z = 1;
};

struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (B, Hq, L) contiguous; varlen (Hq, total_q)
  int64_t lse_batch_stride, lse_head_stride;  // (Hq·L, L); varlen (0, total_q)
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int batch, heads_q, heads_k, seqlen_q, seqlen_k;
  const int* cu_seqlens_q;  // (B + 1,) int32 on the device, or null (dense); both or neither
  const int* cu_seqlens_k;

  float scale;          // softmax scale on q·k
  int window_left;      // -1: unbounded; key j visible to query i iff j >= i + diagonal_offset - window_left
  int window_right;     // -1: unbounded; ... and j <= i + diagonal_offset + window_right (causal: 0)
  int64_t diagonal_offset;
  bool align_to_end;    // each sequence's diagonal offset is diagonal_offset + S_b - L_b (its bottom-right corner)
  float softcap;        // 0: off; else s = softcap * tanh(s / softcap)
  const float* alibi_slopes;        // (B, Hq) or (Hq,) float32, or null: s -= slope * |i + offset - j|
  int64_t alibi_batch_stride;       // 0 for (Hq,)
  MaskKind mask_kind;
  const void* mask;                 // bool (1 byte) or q's dtype (additive), 4-D, read through strides
  int64_t mask_strides[4];          // (b, h, i, j); 0 on broadcast dims

  // Filled by prepare_scores(): scores enter the softmax as x with logit = score_unit * x. Plain
  // calls keep x = q·k, so that exp2(x * score_scale_log2 - m * score_scale_log2) is one FFMA + EX2.
  float score_unit;
  float score_scale_log2;  // score_unit * log2(e)
  bool plain_scores;       // x = q·k (score_unit = scale > 0); else x is the transformed logit (unit 1)
};

struct BackwardParams : ForwardParams {
  const void* out_fwd;   // the forward's out (B, Hq, L, D)
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  const void* grad_out;  // (B, Hq, L, D)
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  const float* lse_fwd;  // as lse (lse_batch_stride, lse_head_stride)
  // Workspace float32, written by the preprocess kernel: delta = rowsum(dO ∘ O) and lse * log2(e) (+inf for
  // rows that saw no key, and for the padding rows, so that P = 0 there). Dense (B, Hq, padded_seqlen_q);
  // varlen (Hq, varlen_row_values(total_q, B)) with sequence b from varlen_row_values(cu_seqlens_q[b], b),
  // so that every sequence owns whole padded query tiles.
  float* delta;
  float* lse_log2;
  int padded_seqlen_q;   // padded_rows(seqlen_q): the preprocess grid's rows
  int64_t row_values_batch_stride, row_values_head_stride;  // (Hq·padded_seqlen_q, padded_seqlen_q); varlen (0, rows)
  float* dq_accum;       // (B, Hq, L, D) float32, zeroed, when !deterministic (fp32 atomics); varlen (Hq, total_q, D)
  int64_t dq_accum_batch_stride, dq_accum_head_stride;      // (Hq·L·D, L·D); varlen (0, total_q·D)
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  bool deterministic;    // dQ by a second pass over key tiles, no atomics: bit-reproducible
};

// The padded length of the backward's per-row workspace (a multiple of every query tile).
constexpr int kBackwardRowPadding = 128;
PYATTN_HOST_DEVICE inline int padded_rows(int seqlen_q) {
  return (seqlen_q + kBackwardRowPadding - 1) / kBackwardRowPadding * kBackwardRowPadding;
}
// Varlen: the first workspace row of sequence b, which starts at packed row `first_row`; with first_row =
// total_q and b = B, the rows one head needs. Consecutive sequences' starts differ by
// 128 · (⌊c_{b+1}/128⌋ − ⌊c_b/128⌋ + 1) ≥ padded_rows(c_{b+1} − c_b): each owns whole padded tiles, and every
// start is a multiple of 128 rows, so each tile's row values are 16-byte aligned for cp.async.
PYATTN_HOST_DEVICE inline int64_t varlen_row_values(int64_t first_row, int batch) {
  return (first_row / kBackwardRowPadding + batch) * kBackwardRowPadding;
}

// Fills the score_* fields from scale, softcap, ALiBi and the mask kind.
inline void prepare_scores(ForwardParams& p) {
  p.plain_scores = p.scale > 0.f && p.softcap == 0.f && p.alibi_slopes == nullptr && p.mask_kind != MaskKind::kAdditive;
  p.score_unit = p.plain_scores ? p.scale : 1.f;
  p.score_scale_log2 = p.score_unit * 1.4426950408889634f;
}

}  // namespace pyattn::attention
