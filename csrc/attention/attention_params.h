// The kernels' interface: raw pointers, sizes and strides (in elements), no torch and no CUDA types.
// attention_api.cpp fills these from tensors; the CPU emulation (emulation/) fills them from host
// buffers. Every arch's launchers take the same structs (attention_launch.h), so an sm_90a path (wgmma,
// TMA) can be added beside the sm_80 one without touching the API.
//
// Layout: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, D) with any strides whose last dim is 1 and
// whose other strides are multiples of 8 elements (16 bytes; cp.async moves 16-byte chunks), base
// pointers 16-byte aligned. out like q, lse (B, Hq, L) float32 contiguous. Query head h reads key/value
// head h / (Hq / Hk). Semantics: pyattn/reference/attention.py (docs/attention.md).
#pragma once

#include <cstdint>

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
  float* lse;  // (B, Hq, L) contiguous
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int batch, heads_q, heads_k, seqlen_q, seqlen_k;

  float scale;          // softmax scale on q·k
  int window_left;      // -1: unbounded; key j visible to query i iff j >= i + diagonal_offset - window_left
  int window_right;     // -1: unbounded; ... and j <= i + diagonal_offset + window_right (causal: 0)
  int64_t diagonal_offset;
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
  const float* lse_fwd;  // (B, Hq, L) contiguous
  // Workspace (B, Hq, padded_seqlen_q) float32, written by the preprocess kernel: delta = rowsum(dO ∘ O)
  // and lse * log2(e) (+inf for rows that saw no key, and for the padding rows, so that P = 0 there).
  float* delta;
  float* lse_log2;
  int padded_seqlen_q;
  float* dq_accum;       // (B, Hq, L, D) float32, zeroed, when !deterministic (fp32 atomics)
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
inline int padded_rows(int seqlen_q) { return (seqlen_q + kBackwardRowPadding - 1) / kBackwardRowPadding * kBackwardRowPadding; }

// Fills the score_* fields from scale, softcap, ALiBi and the mask kind.
inline void prepare_scores(ForwardParams& p) {
  p.plain_scores = p.scale > 0.f && p.softcap == 0.f && p.alibi_slopes == nullptr && p.mask_kind != MaskKind::kAdditive;
  p.score_unit = p.plain_scores ? p.scale : 1.f;
  p.score_scale_log2 = p.score_unit * 1.4426950408889634f;
}

}  // namespace pyattn::attention
