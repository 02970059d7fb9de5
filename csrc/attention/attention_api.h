// The attention ops of pyattn._C (schemas in csrc/registration.cpp): argument checks, output
// allocation and kernel launches on the current stream. Shapes and semantics: pyattn/ops/attention_common.py
// and pyattn/reference/attention.py; q (B, Hq, L, D), k and v (B, Hk, S, D), any strides with a
// contiguous last dim and 16-byte aligned other strides; fp16 or bf16; D = 64 or 128.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace pyattn::attention {

// -> out (B, Hq, L, D), laid out like q ((B, L, Hq, D) memory for a (B, L, Hq, D) view), and lse
//    (B, Hq, L) float32. mask: 4-D, each dim 1 or full, bool (True = visible) or q's dtype (added);
//    alibi_slopes: float32 (Hq,) or (B, Hq). deterministic is the backward's (an input so that
//    autograd's setup_context can read it).
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                     int64_t window_left, int64_t window_right,
                                                     int64_t diagonal_offset, double softcap, bool deterministic);

// -> grad_q, grad_k, grad_v, each laid out like its input. deterministic: dQ by a second pass over the
//    key tiles instead of fp32 atomics (bit-reproducible).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
    double scale, int64_t window_left, int64_t window_right, int64_t diagonal_offset, double softcap,
    bool deterministic);

// Varlen: q (total_q, Hq, D), k and v (total_k, Hk, D), sequence b in rows [cu_seqlens[b], cu_seqlens[b + 1])
// (int32 (B + 1,) on q's device; max_seqlen_q/k at least every sequence's length: they size the grids)
// -> out (total_q, Hq, D) contiguous, lse (Hq, total_q) float32 (the Triton varlen path's layouts).
// align_to_end: sequence b's diagonal offset is diagonal_offset + S_b - L_b (flash-attn's varlen causal).
std::tuple<at::Tensor, at::Tensor> attention_varlen_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& alibi_slopes, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, int64_t diagonal_offset,
    bool align_to_end, double softcap, bool deterministic);

// -> grad_q (total_q, Hq, D), grad_k, grad_v (total_k, Hk, D), contiguous.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, int64_t diagonal_offset, bool align_to_end, double softcap,
    bool deterministic);

}  // namespace pyattn::attention
