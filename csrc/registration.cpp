// pyattn._C: the Python module (so `import pyattn._C` loads the library and its op registrations)
// and the schemas + CUDA implementations of the extension's ops in the `pyattn` namespace.
// FRAGMENT: Python-defined custom ops live in the same namespace.
#include <torch/extension.h>
#include <torch/library.h>

#include "attention/attention_api.h"
#include "lstm/lstm_api.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyattn CUDA kernels; the ops are registered under torch.ops.pyattn";
  m.attr("built_with_cuda") = true;
}

TORCH_LIBRARY_FRAGMENT(pyattn, m) {
  // save_for_backward: also return what backward needs (else those outputs are empty).
  m.def(
      "cuda_lstm_cell_fwd(Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, bool save_for_backward) -> (Tensor hy, Tensor cy, Tensor workspace)");
  m.def(
      "cuda_lstm_cell_bwd(Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor weight_ih, "
      "Tensor weight_hh, Tensor cy, Tensor workspace) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias)");
  // recurrence: "persistent" (raises when the layer does not fit on chip), "stepwise", or
  // "persistent_or_stepwise" (persistent where the residency check admits it, else stepwise).
  // lengths: int64 (batch,) ragged batch, or None. weight_hr: (proj_size, hidden_size) projection, or
  // None; with it h0, output, h_n (and their gradients) are proj_size wide; grad_weight_hr is empty
  // without it.
  m.def(
      "cuda_lstm_layer_fwd(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, bool reverse, Tensor? lengths, bool save_for_backward, str recurrence, "
      "Tensor? weight_hr=None) -> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cell_states)");
  m.def(
      "cuda_lstm_layer_bwd(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, "
      "Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor gates, Tensor cell_states, "
      "bool reverse, Tensor? lengths, str recurrence, Tensor? weight_hr=None) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_weight_hr)");
  // "" when cuda_lstm_layer_fwd/bwd with recurrence="persistent" would launch for these sizes on CUDA device
  // device_index (proj_size 0: no projection), else why not; asks the occupancy API, launches nothing.
  // No tensor argument to dispatch on: one kernel for every dispatch key.
  m.def("cuda_lstm_persistent_resident(int batch, int hidden_size, int proj_size, ScalarType dtype, "
        "int device_index) -> str",
        &pyattn::lstm::lstm_persistent_resident);
  // Attention (csrc/attention): q (B, Hq, L, D), k/v (B, Hk, S, D), fp16/bf16, D 64 or 128; mask 4-D
  // bool or q's dtype; deterministic is the backward's (read by autograd's setup_context).
  m.def(
      "cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? alibi_slopes, float scale, "
      "int window_left, int window_right, int diagonal_offset, float softcap, bool deterministic) -> (Tensor out, "
      "Tensor lse)");
  m.def(
      "cuda_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, "
      "Tensor? alibi_slopes, float scale, int window_left, int window_right, int diagonal_offset, float softcap, "
      "bool deterministic) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Varlen: q (total_q, Hq, D), k/v (total_k, Hk, D), cu_seqlens int32 (B + 1,); lse (Hq, total_q).
  m.def(
      "cuda_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? alibi_slopes, int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
      "int diagonal_offset, bool align_to_end, float softcap, bool deterministic) -> (Tensor out, Tensor lse)");
  m.def(
      "cuda_attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? alibi_slopes, int max_seqlen_q, int max_seqlen_k, "
      "float scale, int window_left, int window_right, int diagonal_offset, bool align_to_end, float softcap, "
      "bool deterministic) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("cuda_lstm_cell_fwd", &pyattn::lstm::lstm_cell_forward);
  m.impl("cuda_lstm_cell_bwd", &pyattn::lstm::lstm_cell_backward);
  m.impl("cuda_lstm_layer_fwd", &pyattn::lstm::lstm_layer_forward);
  m.impl("cuda_lstm_layer_bwd", &pyattn::lstm::lstm_layer_backward);
  m.impl("cuda_attention_fwd", &pyattn::attention::attention_forward);
  m.impl("cuda_attention_bwd", &pyattn::attention::attention_backward);
  m.impl("cuda_attention_varlen_fwd", &pyattn::attention::attention_varlen_forward);
  m.impl("cuda_attention_varlen_bwd", &pyattn::attention::attention_varlen_backward);
}
