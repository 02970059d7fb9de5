// The LSTM ops of pyattn._C (schemas in csrc/registration.cpp): argument checks, output
// allocation and kernel launches on the current stream. Shapes: B batch, I input size, H hidden
// size, T steps; gates are (i, f, g, o) blocks of H, as torch orders them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace pyattn::lstm {

// Recurrence kernels of the layer ops, chosen by dispatch (pyattn/ops/lstm_cuda.py): "persistent"
// (one cooperative kernel, W_hh on chip; raises when the layer does not fit) or "stepwise" (one
// launch per step).

// -> hy (B, H), cy (B, H), workspace: activated gates (B, 4H) when save_for_backward, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    bool save_for_backward);

// -> grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias (4H,: both biases').
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& cy,
    const at::Tensor& workspace);

// -> output (T, B, W), h_n (B, W), c_n (B, H), and for backward (empty unless save_for_backward):
//    gates (T, B, 4H) activated, cell_states (T, B, H) float32. W = P with weight_hr (P, H) (torch's
//    proj_size: h_t = W_hr · (σ(o)·tanh(c_t)), h0 and weight_hh's columns are P wide), else W = H.
// lengths (B,) int64 (ragged batch): row b is valid at steps t < lengths[b]; past them its state is
// frozen and its output zero; reversed, each row starts from its own last valid step.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    bool reverse, const std::optional<at::Tensor>& lengths, bool save_for_backward, c10::string_view recurrence,
    const std::optional<at::Tensor>& weight_hr);

// -> grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias (4H,: both biases'),
//    grad_weight_hr ((P, H), or empty without a projection).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cell_states, bool reverse,
    const std::optional<at::Tensor>& lengths, c10::string_view recurrence, const std::optional<at::Tensor>& weight_hr);

// Whether recurrence="persistent" would launch for a layer of these sizes on CUDA device `device_index`
// (proj_size 0: no projection): "" when the cooperative grids of both the persistent forward and backward
// can be resident, else why not, with the figures. The same occupancy computation the launchers run before
// launching (registers as compiled included); nothing is launched.
std::string lstm_persistent_resident(int64_t batch, int64_t hidden_size, int64_t proj_size, at::ScalarType dtype,
                                     int64_t device_index);

}  // namespace pyattn::lstm
