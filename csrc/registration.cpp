// pyattn._C: the Python module (so `import pyattn._C` loads the library and its op registrations)
// and the schemas + CUDA implementations of the extension's ops in the `pyattn` namespace.
// FRAGMENT: Python-defined custom ops live in the same namespace.
#include <torch/extension.h>
#include <torch/library.h>

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
  // recurrence: "persistent" (raises when the layer does not fit on chip) or "stepwise".
  // lengths: int64 (batch,) ragged batch, or None.
  m.def(
      "cuda_lstm_layer_fwd(Tensor input, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, bool reverse, Tensor? lengths, bool save_for_backward, str recurrence) -> (Tensor output, "
      "Tensor h_n, Tensor c_n, Tensor gates, Tensor cell_states)");
  m.def(
      "cuda_lstm_layer_bwd(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor h0, "
      "Tensor c0, Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor gates, Tensor cell_states, "
      "bool reverse, Tensor? lengths, str recurrence) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, "
      "Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(pyattn, CUDA, m) {
  m.impl("cuda_lstm_cell_fwd", &pyattn::lstm::lstm_cell_forward);
  m.impl("cuda_lstm_cell_bwd", &pyattn::lstm::lstm_cell_backward);
  m.impl("cuda_lstm_layer_fwd", &pyattn::lstm::lstm_layer_forward);
  m.impl("cuda_lstm_layer_bwd", &pyattn::lstm::lstm_layer_backward);
}
