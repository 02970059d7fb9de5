// Attention ops: checks (messages name the argument), allocation, launches on the current stream.
#include "attention/attention_api.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "attention/attention_launch.h"

namespace pyattn::attention {
namespace {

// Calls f(element tag, head dim constant) for the instantiated kernels.
template <typename F>
void dispatch_kernels(at::ScalarType dtype, int64_t head_dim, F&& f) {
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "q: dtype ", dtype,
              " is not supported by the CUDA attention kernels (float16, bfloat16)");
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "q: head dim ", head_dim,
              " is not supported by the CUDA attention kernels (64, 128)");
  const bool bf16 = dtype == at::kBFloat16;
  if (head_dim == 64) return bf16 ? f(Bf16{}, std::integral_constant<int, 64>{}) : f(Fp16{}, std::integral_constant<int, 64>{});
  return bf16 ? f(Bf16{}, std::integral_constant<int, 128>{}) : f(Fp16{}, std::integral_constant<int, 128>{});
}

// cp.async moves 16-byte chunks: the last dim contiguous, every other stride of a dim longer than 1 a
// multiple of 8 elements, the base 16-byte aligned.
bool chunk_aligned(const at::Tensor& t) {
  if (t.stride(-1) != 1 && t.size(-1) > 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), name, " must be on ", q.device(), " like q, got ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have dtype ", q.scalar_type(), " like q, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (batch, heads, seqlen, head_dim), got shape ", t.sizes());
  TORCH_CHECK(chunk_aligned(t), name, " must have a contiguous last dim and 16-byte aligned strides and base (got ",
              "strides ", t.strides(), "); pass .contiguous()");
}

struct Sizes {
  int64_t batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim;
};

Sizes check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  const Sizes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.batch && v.size(0) == s.batch, "k and v must have q's batch size ", s.batch);
  TORCH_CHECK(k.size(3) == s.head_dim, "k's head dim ", k.size(3), " != q's ", s.head_dim);
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), " (the kernels need equal head dims), got ",
              v.sizes());
  TORCH_CHECK(s.heads_k > 0 && s.heads_q % s.heads_k == 0, "q's ", s.heads_q, " heads must be a multiple of k's ",
              s.heads_k);
  TORCH_CHECK(s.batch <= 65535 && s.heads_q <= 65535, "batch and heads must be <= 65535 (the grid's y and z)");
  TORCH_CHECK(s.seqlen_q < INT_MAX && s.seqlen_k < INT_MAX, "sequence lengths must fit 32 bits");
  return s;
}

// A new (B, H, rows, D) tensor laid out as `like` (pyattn/_layout.py: (B, rows, H, D) memory when like's
// head stride is below its row stride), so that the fake kernels agree.
at::Tensor new_like_layout(const at::Tensor& like, int64_t batch, int64_t heads, int64_t rows, int64_t head_dim) {
  if (like.stride(1) < like.stride(2))
    return at::empty({batch, rows, heads, head_dim}, like.options()).permute({0, 2, 1, 3});
  return at::empty({batch, heads, rows, head_dim}, like.options());
}

void set_strides(const at::Tensor& t, int64_t& batch, int64_t& head, int64_t& row) {
  batch = t.stride(0);
  head = t.stride(1);
  row = t.stride(2);
}

void fill_forward(ForwardParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Sizes& s,
                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes, double scale,
                  int64_t window_left, int64_t window_right, int64_t diagonal_offset, double softcap) {
  TORCH_CHECK(window_left >= -1 && window_left < INT_MAX && window_right >= -1 && window_right < INT_MAX,
              "window_left and window_right must be -1 (unbounded) or a 32-bit count >= 0, got ", window_left, ", ",
              window_right);
  TORCH_CHECK(softcap >= 0, "softcap must be >= 0 (0: off), got ", softcap);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens_q = p.cu_seqlens_k = nullptr;
  p.align_to_end = false;
  p.lse_batch_stride = s.heads_q * s.seqlen_q;
  p.lse_head_stride = s.seqlen_q;
  set_strides(q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set_strides(k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  set_strides(v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  p.batch = static_cast<int>(s.batch);
  p.heads_q = static_cast<int>(s.heads_q);
  p.heads_k = static_cast<int>(s.heads_k);
  p.seqlen_q = static_cast<int>(s.seqlen_q);
  p.seqlen_k = static_cast<int>(s.seqlen_k);
  p.scale = static_cast<float>(scale);
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  p.diagonal_offset = diagonal_offset;
  p.softcap = static_cast<float>(softcap);
  p.alibi_slopes = nullptr;
  p.alibi_batch_stride = 0;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device() == q.device(), "alibi_slopes must be on ", q.device(), ", got ", a.device());
    TORCH_CHECK(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK((a.dim() == 1 && a.size(0) == s.heads_q) || (a.dim() == 2 && a.size(0) == s.batch && a.size(1) == s.heads_q),
                "alibi_slopes must have shape (", s.heads_q, ",) or (", s.batch, ", ", s.heads_q, "), got ", a.sizes());
    TORCH_CHECK(a.is_contiguous(), "alibi_slopes must be contiguous");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? s.heads_q : 0;
  }
  p.mask_kind = MaskKind::kNone;
  p.mask = nullptr;
  for (int64_t& stride : p.mask_strides) stride = 0;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == q.device(), "mask must be on ", q.device(), ", got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                "mask must be bool (True = visible) or q's dtype ", q.scalar_type(), " (added), got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 4, "mask must be 4-D (batch, heads, L, S), got shape ", m.sizes());
    const int64_t full[4] = {s.batch, s.heads_q, s.seqlen_q, s.seqlen_k};
    for (int d = 0; d < 4; ++d) {
      TORCH_CHECK(m.size(d) == 1 || m.size(d) == full[d], "mask dim ", d, " must be 1 or ", full[d], ", got shape ",
                  m.sizes());
      p.mask_strides[d] = m.size(d) == 1 ? 0 : m.stride(d);  // broadcast dims read index 0
    }
    p.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    p.mask = m.data_ptr();
  }
  prepare_scores(p);
}

// The backward's float32 workspaces: delta and lse·log2 e (`rows_per_head` rows per head, from
// `row_values_elements` in all), and unless deterministic the zeroed dQ accumulator, `accum_rows` rows per head
// (batch stride set by the caller: 0 in the varlen layout).
struct Workspace {
  at::Tensor delta, lse_log2, dq_accum;
};

Workspace new_workspace(BackwardParams& p, const at::Tensor& q, int64_t row_values_elements, int64_t rows_per_head,
                        int64_t batch, int64_t heads_q, int64_t accum_rows, int64_t head_dim, bool deterministic) {
  const auto float_options = q.options().dtype(at::kFloat);
  Workspace w;
  w.delta = at::empty({row_values_elements}, float_options);
  w.lse_log2 = at::empty({row_values_elements}, float_options);
  p.delta = w.delta.data_ptr<float>();
  p.lse_log2 = w.lse_log2.data_ptr<float>();
  p.row_values_head_stride = rows_per_head;
  p.deterministic = deterministic;
  p.dq_accum = nullptr;
  p.dq_accum_head_stride = accum_rows * head_dim;
  if (!deterministic) {
    w.dq_accum = at::zeros({batch * heads_q * accum_rows * head_dim}, float_options);
    p.dq_accum = w.dq_accum.data_ptr<float>();
  }
  return w;
}

void set_output_strides(const at::Tensor& t, int64_t& batch, int64_t& head, int64_t& row, bool packed) {
  if (packed) {  // (total, heads, D): one batch of packed rows
    batch = 0;
    head = t.stride(1);
    row = t.stride(0);
  } else {
    set_strides(t, batch, head, row);
  }
}

void launch_backward(BackwardParams& p, const at::Tensor& q, int64_t head_dim, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv) {
  const bool packed = p.cu_seqlens_q != nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_output_strides(dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, packed);
  set_output_strides(dk, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride, packed);
  set_output_strides(dv, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride, packed);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kernels(q.scalar_type(), head_dim, [&](auto element, auto head_dim_constant) {
    C10_CUDA_CHECK((launch_attention_backward_sm80<decltype(element), decltype(head_dim_constant)::value>(p, stream)));
  });
}

void check_architecture(const at::Tensor& q) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  TORCH_CHECK(major >= 8, "the CUDA attention kernels need compute capability >= 8.0 (mma.sync.m16n8k16, cp.async)");
}

// The backward's grad_out and out, checked against q (dense and varlen alike). Autograd may hand grad_out any
// strides (an expanded scalar from .sum() has stride 0): a copy where cp.async cannot read it.
at::Tensor checked_grad_out(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& q) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "grad_out must have q's shape ", q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(),
              "grad_out must have q's dtype and device");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(),
              "out must be the forward's output: q's shape, dtype and device");
  TORCH_CHECK(out.stride(-1) == 1, "out must have a contiguous last dim");
  return chunk_aligned(grad_out) ? grad_out : grad_out.contiguous();
}

// ------------------------------------------------------------------------------------------- varlen

// Varlen operands are (total, heads, D); the kernels see them as one batch of packed rows, (1, heads, total, D)
// views, with each sequence's rows and lengths read from cu_seqlens on the device.
at::Tensor packed_view(const at::Tensor& t) { return t.unsqueeze(0).transpose(1, 2); }

void check_packed(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.dim() == 3, name, " must be 3-D (total, heads, head_dim) in the varlen layout, got shape ", t.sizes());
  check_operand(packed_view(t), name, q);
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q, int64_t batch) {
  TORCH_CHECK(cu.device() == q.device(), name, " must be on ", q.device(), " like q, got ", cu.device());
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.is_contiguous(), name,
              " must be a contiguous 1-D int32 tensor, got ", cu.scalar_type(), " of shape ", cu.sizes());
  TORCH_CHECK(cu.numel() == batch + 1, name, " must have batch + 1 = ", batch + 1, " entries, got ", cu.numel());
}

struct VarlenSizes {
  Sizes sizes;  // batch = sequences, seqlen_q/k = the longest (the grids), heads and head_dim
  int64_t total_q, total_k;
};

VarlenSizes check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                         const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  check_packed(q, "q", q);
  check_packed(k, "k", q);
  check_packed(v, "v", q);
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.numel() >= 2, "cu_seqlens_q must be (batch + 1,) with batch >= 1, "
              "got shape ", cu_seqlens_q.sizes());
  const int64_t batch = cu_seqlens_q.numel() - 1;
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, batch);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q, batch);
  TORCH_CHECK(k.size(2) == q.size(2), "k's head dim ", k.size(2), " != q's ", q.size(2));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), " (the kernels need equal head dims), got ",
              v.sizes());
  const int64_t heads_q = q.size(1), heads_k = k.size(1);
  TORCH_CHECK(heads_k > 0 && heads_q % heads_k == 0, "q's ", heads_q, " heads must be a multiple of k's ", heads_k);
  TORCH_CHECK(batch <= 65535 && heads_q <= 65535, "batch and heads must be <= 65535 (the grid's y and z)");
  // The grids cover max_seqlen rows per sequence: a sequence longer than it would be cut short (its
  // lengths live on the device, so this is the caller's promise, as in flash-attn).
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q < INT_MAX && max_seqlen_k < INT_MAX,
              "max_seqlen_q and max_seqlen_k must be 32-bit counts >= 0, got ", max_seqlen_q, ", ", max_seqlen_k);
  TORCH_CHECK(q.size(0) < INT_MAX && k.size(0) < INT_MAX, "total_q and total_k must fit 32 bits (cu_seqlens is int32)");
  return {{batch, heads_q, heads_k, max_seqlen_q, max_seqlen_k, q.size(2)}, q.size(0), k.size(0)};
}

// fill_forward on the packed views, then the varlen fields: batch strides 0, cu_seqlens, lse (Hq, total_q).
void fill_varlen_forward(ForwardParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const VarlenSizes& vs, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                         const std::optional<at::Tensor>& alibi_slopes, double scale, int64_t window_left,
                         int64_t window_right, int64_t diagonal_offset, bool align_to_end, double softcap) {
  fill_forward(p, packed_view(q), packed_view(k), packed_view(v), vs.sizes, std::nullopt, alibi_slopes, scale,
               window_left, window_right, diagonal_offset, softcap);
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = 0;
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
  p.align_to_end = align_to_end;
  p.lse_batch_stride = 0;
  p.lse_head_stride = vs.total_q;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask,
                                                     const std::optional<at::Tensor>& alibi_slopes, double scale,
                                                     int64_t window_left, int64_t window_right,
                                                     int64_t diagonal_offset, double softcap, bool deterministic) {
  (void)deterministic;
  const Sizes s = check_qkv(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = new_like_layout(q, s.batch, s.heads_q, s.seqlen_q, s.head_dim);
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(at::kFloat));
  ForwardParams p{};
  fill_forward(p, q, k, v, s, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset, softcap);
  if (out.numel() == 0) return {out, lse};
  check_architecture(q);
  p.out = out.data_ptr();
  set_strides(out, p.out_batch_stride, p.out_head_stride, p.out_row_stride);
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kernels(q.scalar_type(), s.head_dim, [&](auto element, auto head_dim) {
    C10_CUDA_CHECK((launch_attention_forward_sm80<decltype(element), decltype(head_dim)::value>(p, stream)));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& alibi_slopes,
    double scale, int64_t window_left, int64_t window_right, int64_t diagonal_offset, double softcap,
    bool deterministic) {
  const Sizes s = check_qkv(q, k, v);
  const at::Tensor grad_out = checked_grad_out(grad_out_in, out, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
                  lse.sizes() == at::IntArrayRef({s.batch, s.heads_q, s.seqlen_q}),
              "lse must be the forward's: float32, contiguous, shape (", s.batch, ", ", s.heads_q, ", ", s.seqlen_q,
              "), got ", lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = new_like_layout(q, s.batch, s.heads_q, s.seqlen_q, s.head_dim);
  at::Tensor dk = new_like_layout(k, s.batch, s.heads_k, s.seqlen_k, s.head_dim);
  at::Tensor dv = new_like_layout(v, s.batch, s.heads_k, s.seqlen_k, s.head_dim);
  BackwardParams p{};
  fill_forward(p, q, k, v, s, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset, softcap);
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  if (dq.numel() == 0) return {dq, dk.zero_(), dv.zero_()};  // no query: no gradient
  check_architecture(q);
  p.out_fwd = out.data_ptr();
  set_strides(out, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  p.grad_out = grad_out.data_ptr();
  set_strides(grad_out, p.do_batch_stride, p.do_head_stride, p.do_row_stride);
  p.lse_fwd = lse.data_ptr<float>();
  p.padded_seqlen_q = padded_rows(p.seqlen_q);
  const Workspace workspace = new_workspace(p, q, s.batch * s.heads_q * p.padded_seqlen_q, p.padded_seqlen_q,
                                            s.batch, s.heads_q, s.seqlen_q, s.head_dim, deterministic);
  p.row_values_batch_stride = s.heads_q * p.padded_seqlen_q;
  p.dq_accum_batch_stride = s.heads_q * s.seqlen_q * s.head_dim;
  launch_backward(p, q, s.head_dim, dq, dk, dv);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, const std::optional<at::Tensor>& alibi_slopes, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, int64_t window_left, int64_t window_right, int64_t diagonal_offset,
    bool align_to_end, double softcap, bool deterministic) {
  (void)deterministic;
  const VarlenSizes vs = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Sizes& s = vs.sizes;
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({vs.total_q, s.heads_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.heads_q, vs.total_q}, q.options().dtype(at::kFloat));
  ForwardParams p{};
  fill_varlen_forward(p, q, k, v, vs, cu_seqlens_q, cu_seqlens_k, alibi_slopes, scale, window_left, window_right,
                      diagonal_offset, align_to_end, softcap);
  if (out.numel() == 0 || s.seqlen_q == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  check_architecture(q);
  p.out = out.data_ptr();
  set_output_strides(out, p.out_batch_stride, p.out_head_stride, p.out_row_stride, true);
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kernels(q.scalar_type(), s.head_dim, [&](auto element, auto head_dim) {
    C10_CUDA_CHECK((launch_attention_forward_sm80<decltype(element), decltype(head_dim)::value>(p, stream)));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    const std::optional<at::Tensor>& alibi_slopes, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, int64_t diagonal_offset, bool align_to_end, double softcap,
    bool deterministic) {
  const VarlenSizes vs = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Sizes& s = vs.sizes;
  const at::Tensor grad_out = checked_grad_out(grad_out_in, out, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
                  lse.sizes() == at::IntArrayRef({s.heads_q, vs.total_q}),
              "lse must be the forward's: float32, contiguous, shape (", s.heads_q, ", ", vs.total_q, "), got ",
              lse.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty({vs.total_q, s.heads_q, s.head_dim}, q.options());
  at::Tensor dk = at::empty({vs.total_k, s.heads_k, s.head_dim}, q.options());
  at::Tensor dv = at::empty({vs.total_k, s.heads_k, s.head_dim}, q.options());
  if (dq.numel() == 0 || dk.numel() == 0 || s.seqlen_q == 0 || s.seqlen_k == 0)
    return {dq.zero_(), dk.zero_(), dv.zero_()};  // no query or no key: no gradient
  BackwardParams p{};
  fill_varlen_forward(p, q, k, v, vs, cu_seqlens_q, cu_seqlens_k, alibi_slopes, scale, window_left, window_right,
                      diagonal_offset, align_to_end, softcap);
  check_architecture(q);
  p.out_fwd = out.data_ptr();
  set_output_strides(out, p.o_batch_stride, p.o_head_stride, p.o_row_stride, true);
  p.grad_out = grad_out.data_ptr();
  set_output_strides(grad_out, p.do_batch_stride, p.do_head_stride, p.do_row_stride, true);
  p.lse_fwd = lse.data_ptr<float>();
  p.padded_seqlen_q = padded_rows(p.seqlen_q);
  const int64_t rows_per_head = varlen_row_values(vs.total_q, static_cast<int>(s.batch));
  const Workspace workspace = new_workspace(p, q, s.heads_q * rows_per_head, rows_per_head, 1, s.heads_q, vs.total_q,
                                            s.head_dim, deterministic);
  p.row_values_batch_stride = 0;
  p.dq_accum_batch_stride = 0;
  launch_backward(p, q, s.head_dim, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace pyattn::attention
