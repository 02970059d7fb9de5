// LSTM ops: checks (messages name the argument), allocation, GEMMs through ATen, kernel launches.
#include "lstm/lstm_api.h"

// Per-op ATen headers rather than ATen/ATen.h: they compile faster, and ATen.h (like
// ATen/cuda/CUDAContext.h, which needs cusparse.h) is not usable under every toolchain we build on.
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <initializer_list>
#include <sstream>
#include <string>

#include "lstm/lstm_launch.h"

namespace pyattn::lstm {
namespace {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<element type>) for the kernels' dtypes.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(Tag<float>{});
    case at::kHalf:
      return f(Tag<__half>{});
    case at::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, "input: dtype ", dtype, " is not supported by the CUDA LSTM kernels (float32, float16, bfloat16)");
  }
}

void check_input(const at::Tensor& input, int64_t dims) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor, got device ", input.device());
  TORCH_CHECK(input.dim() == dims, "input must be ", dims, "-D, got shape ", input.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kHalf ||
                  input.scalar_type() == at::kBFloat16,
              "input: dtype ", input.scalar_type(), " is not supported (float32, float16, bfloat16)");
  TORCH_CHECK(input.is_contiguous(), "input must be contiguous");
}

// Device, dtype (both as input's), shape and contiguity of one tensor argument.
void check_like_input(const at::Tensor& tensor, const char* name, const at::Tensor& input,
                      std::initializer_list<int64_t> shape) {
  TORCH_CHECK(tensor.device() == input.device(), name, " must be on ", input.device(), " like input, got ",
              tensor.device());
  TORCH_CHECK(tensor.scalar_type() == input.scalar_type(), name, " must have dtype ", input.scalar_type(),
              " like input, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == at::IntArrayRef(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ",
              tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

void check_float_state(const at::Tensor& tensor, const char* name, const at::Tensor& input,
                       std::initializer_list<int64_t> shape) {
  TORCH_CHECK(tensor.device() == input.device(), name, " must be on ", input.device(), ", got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == at::kFloat, name, " must be float32, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.sizes() == at::IntArrayRef(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ",
              tensor.sizes());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

void check_fits_int(int64_t value, const char* what) {
  TORCH_CHECK(value <= INT_MAX, what, " = ", value, " exceeds the kernels' 32-bit index range");
}

void check_bias(const std::optional<at::Tensor>& bias, const char* name, const at::Tensor& input, int64_t hidden) {
  if (bias.has_value()) check_like_input(*bias, name, input, {4 * hidden});
}

// b_ih + b_hh summed in float32 and rounded once, or nullopt when neither is given.
std::optional<at::Tensor> combined_bias(const std::optional<at::Tensor>& bias_ih,
                                        const std::optional<at::Tensor>& bias_hh, at::ScalarType dtype) {
  if (!bias_ih.has_value() && !bias_hh.has_value()) return std::nullopt;
  at::Tensor sum = bias_ih.has_value() ? bias_ih->to(at::kFloat) : bias_hh->to(at::kFloat);
  if (bias_ih.has_value() && bias_hh.has_value()) sum = at::add(sum, bias_hh->to(at::kFloat));
  return sum.to(dtype);
}

const void* data_or_null(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr() : nullptr;
}

void check_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& input, int64_t batch) {
  if (!lengths.has_value()) return;
  TORCH_CHECK(lengths->device() == input.device(), "lengths must be on ", input.device(), " like input, got ",
              lengths->device());
  TORCH_CHECK(lengths->scalar_type() == at::kLong, "lengths must be int64, got ", lengths->scalar_type());
  TORCH_CHECK(lengths->dim() == 1 && lengths->size(0) == batch, "lengths must have shape (", batch, ",), got ",
              lengths->sizes());
  TORCH_CHECK(lengths->is_contiguous(), "lengths must be contiguous");
}

struct LayerSizes {
  int64_t steps, batch, input_size, hidden;
  int64_t proj;  // proj_size, 0 without a projection
  // The width of h (output, h0, h_n, the recurrent product's K): P with a projection, else H.
  int64_t width() const { return proj > 0 ? proj : hidden; }
};

// The operands every layer op shares, checked once; returns their sizes. With weight_hr (P, H) the
// hidden size is its column count and h is P wide (torch's proj_size), else H is h0's width.
LayerSizes check_layer_operands(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                                const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                const std::optional<at::Tensor>& weight_hr, const std::optional<at::Tensor>& lengths) {
  check_input(input, 3);
  TORCH_CHECK(h0.dim() == 2, "h0 must be 2-D (batch, ", weight_hr.has_value() ? "proj_size" : "hidden_size",
              "), got shape ", h0.sizes());
  const int64_t steps = input.size(0), batch = input.size(1), input_size = input.size(2);
  int64_t hidden = h0.size(1), proj = 0;
  if (weight_hr.has_value()) {  // proj_size from weight_hr's rows, hidden_size from c0 (c is H wide)
    TORCH_CHECK(weight_hr->dim() == 2, "weight_hr must be 2-D (proj_size, hidden_size), got shape ",
                weight_hr->sizes());
    TORCH_CHECK(c0.dim() == 2, "c0 must be 2-D (batch, hidden_size), got shape ", c0.sizes());
    proj = weight_hr->size(0);
    hidden = c0.size(1);
    TORCH_CHECK(proj > 0, "weight_hr must have at least one row (proj_size > 0), got shape ", weight_hr->sizes());
    check_like_input(*weight_hr, "weight_hr", input, {proj, hidden});
  }
  const int64_t width = proj > 0 ? proj : hidden;
  check_like_input(h0, "h0", input, {batch, width});
  check_like_input(c0, "c0", input, {batch, hidden});
  check_like_input(weight_ih, "weight_ih", input, {4 * hidden, input_size});
  check_like_input(weight_hh, "weight_hh", input, {4 * hidden, width});
  check_lengths(lengths, input, batch);
  check_fits_int(steps, "sequence length");
  check_fits_int(batch, "batch");
  check_fits_int(4 * hidden, "4 * hidden_size");
  return {steps, batch, input_size, hidden, proj};
}

// (T, B) true where step t of row b is past the row's length.
at::Tensor steps_past_length(const at::Tensor& lengths, int64_t steps) {
  return at::arange(steps, lengths.options()).unsqueeze(1).ge(lengths.unsqueeze(0));
}

// kPersistentOrStepwise: the persistent kernel where the launchers' residency check admits it, else the
// per-step loop. Dispatch asks that check before it calls the op; this mode serves the calls where it
// cannot (torch.compile with dynamic shapes: the sizes are symbolic while tracing).
enum class Recurrence { kPersistent, kStepwise, kPersistentOrStepwise };

Recurrence checked_recurrence(c10::string_view recurrence) {
  if (recurrence == "persistent") return Recurrence::kPersistent;
  if (recurrence == "persistent_or_stepwise") return Recurrence::kPersistentOrStepwise;
  TORCH_CHECK(recurrence == "stepwise",
              "recurrence must be \"persistent\", \"stepwise\" or \"persistent_or_stepwise\", got \"",
              std::string(recurrence), "\"");
  return Recurrence::kStepwise;
}

// Why `residency` refuses a cooperative launch of the `direction` kernel, with its figures; "" when it fits.
std::string residency_refusal(const char* direction, const PersistentResidency& residency) {
  if (residency.fits()) return "";
  std::ostringstream reason;
  reason << direction << ": ";
  if (!residency.cooperative) {
    reason << "the device does not support cooperative launches";
  } else if (residency.shared_bytes > static_cast<size_t>(residency.shared_limit)) {
    reason << "a CTA needs " << residency.shared_bytes << " B of shared memory, over the " << residency.shared_limit
           << " B a block may use";
  } else {
    reason << residency.grid << " CTAs must be co-resident for the grid sync, the occupancy API allows "
           << residency.per_multiprocessor << " per SM on " << residency.multiprocessors << " SMs ("
           << residency.shared_bytes << " B of shared memory and " << residency.registers << " registers per thread, "
           << residency.threads << " threads per CTA)";
  }
  return reason.str();
}

}  // namespace

std::string lstm_persistent_resident(int64_t batch, int64_t hidden_size, int64_t proj_size, at::ScalarType dtype,
                                     int64_t device_index) {
  TORCH_CHECK(batch >= 0 && batch <= INT_MAX, "batch must be in [0, ", INT_MAX, "], got ", batch);
  TORCH_CHECK(hidden_size >= 0 && hidden_size <= INT_MAX, "hidden_size must be in [0, ", INT_MAX, "], got ",
              hidden_size);
  TORCH_CHECK(proj_size >= 0 && proj_size <= INT_MAX, "proj_size must be in [0, ", INT_MAX, "], got ", proj_size);
  TORCH_CHECK(device_index >= 0, "device_index must be a CUDA device index, got ", device_index);
  if (batch == 0 || hidden_size == 0) return "";  // the layer ops return before launching anything
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  std::string reason;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int b = static_cast<int>(batch), h = static_cast<int>(hidden_size), p = static_cast<int>(proj_size);
    PersistentResidency forward, backward;
    C10_CUDA_CHECK(persistent_forward_residency<T>(b, h, p, forward));
    C10_CUDA_CHECK(persistent_backward_residency<T>(b, h, p, backward));
    reason = residency_refusal("forward", forward);
    if (reason.empty()) reason = residency_refusal("backward", backward);
  });
  return reason;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    bool save_for_backward) {
  check_input(input, 2);
  TORCH_CHECK(hx.dim() == 2, "hx must be 2-D (batch, hidden_size), got shape ", hx.sizes());
  const int64_t batch = input.size(0), input_size = input.size(1), hidden = hx.size(1);
  check_like_input(hx, "hx", input, {batch, hidden});
  check_like_input(cx, "cx", input, {batch, hidden});
  check_like_input(weight_ih, "weight_ih", input, {4 * hidden, input_size});
  check_like_input(weight_hh, "weight_hh", input, {4 * hidden, hidden});
  check_bias(bias_ih, "bias_ih", input, hidden);
  check_bias(bias_hh, "bias_hh", input, hidden);
  check_fits_int(batch, "batch");
  check_fits_int(input_size, "input_size");
  check_fits_int(4 * hidden, "4 * hidden_size");

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor hy = at::empty({batch, hidden}, input.options());
  at::Tensor cy = at::empty({batch, hidden}, input.options());
  at::Tensor workspace = at::empty({save_for_backward ? batch : 0, 4 * hidden}, input.options());
  if (batch == 0 || hidden == 0) return {hy, cy, workspace};

  StepForwardParams params{};
  params.a0 = input.data_ptr();
  params.w0 = weight_ih.data_ptr();
  params.k0 = static_cast<int>(input_size);
  params.a1 = hx.data_ptr();
  params.w1 = weight_hh.data_ptr();
  params.k1 = static_cast<int>(hidden);
  params.bias0 = data_or_null(bias_ih);
  params.bias1 = data_or_null(bias_hh);
  params.c_prev = cx.data_ptr();
  params.h_out = hy.data_ptr();
  params.c_out = cy.data_ptr();
  params.gates_out = save_for_backward ? workspace.data_ptr() : nullptr;
  params.batch = static_cast<int>(batch);
  params.hidden = static_cast<int>(hidden);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(input.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(launch_step_forward<T>(params, stream));
  });
  return {hy, cy, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& weight_ih, const at::Tensor& weight_hh, const at::Tensor& cy,
    const at::Tensor& workspace) {
  check_input(input, 2);
  TORCH_CHECK(hx.dim() == 2, "hx must be 2-D (batch, hidden_size), got shape ", hx.sizes());
  const int64_t batch = input.size(0), input_size = input.size(1), hidden = hx.size(1);
  check_like_input(hx, "hx", input, {batch, hidden});
  check_like_input(cx, "cx", input, {batch, hidden});
  check_like_input(weight_ih, "weight_ih", input, {4 * hidden, input_size});
  check_like_input(weight_hh, "weight_hh", input, {4 * hidden, hidden});
  check_like_input(cy, "cy", input, {batch, hidden});
  check_like_input(grad_hy, "grad_hy", input, {batch, hidden});
  check_like_input(grad_cy, "grad_cy", input, {batch, hidden});
  check_like_input(workspace, "workspace", input, {batch, 4 * hidden});
  check_fits_int(batch, "batch");
  check_fits_int(4 * hidden, "4 * hidden_size");

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_gates = at::empty({batch, 4 * hidden}, input.options());
  at::Tensor grad_cx = at::empty({batch, hidden}, input.options());
  if (batch > 0 && hidden > 0) {
    CellBackwardParams params{};
    params.grad_hy = grad_hy.data_ptr();
    params.grad_cy = grad_cy.data_ptr();
    params.gates = workspace.data_ptr();
    params.cx = cx.data_ptr();
    params.cy = cy.data_ptr();
    params.grad_gates = grad_gates.data_ptr();
    params.grad_cx = grad_cx.data_ptr();
    params.batch = static_cast<int>(batch);
    params.hidden = static_cast<int>(hidden);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_dtype(input.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      C10_CUDA_CHECK(launch_cell_backward<T>(params, stream));
    });
  }
  at::Tensor grad_bias = at::sum(grad_gates, {0}, false, at::kFloat).to(input.scalar_type());
  return {at::mm(grad_gates, weight_ih), at::mm(grad_gates, weight_hh), grad_cx, at::mm(grad_gates.t(), input),
          at::mm(grad_gates.t(), hx), grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    bool reverse, const std::optional<at::Tensor>& lengths, bool save_for_backward, c10::string_view recurrence,
    const std::optional<at::Tensor>& weight_hr) {
  const Recurrence mode = checked_recurrence(recurrence);
  const LayerSizes sizes = check_layer_operands(input, h0, c0, weight_ih, weight_hh, weight_hr, lengths);
  const int64_t steps = sizes.steps, batch = sizes.batch, input_size = sizes.input_size, hidden = sizes.hidden;
  const int64_t proj = sizes.proj, width = sizes.width();
  check_bias(bias_ih, "bias_ih", input, hidden);
  check_bias(bias_hh, "bias_hh", input, hidden);

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor output = at::empty({steps, batch, width}, input.options());
  at::Tensor gates = at::empty({save_for_backward ? steps : 0, batch, 4 * hidden}, input.options());
  at::Tensor cell_states = at::empty({save_for_backward ? steps : 0, batch, hidden}, input.options().dtype(at::kFloat));
  if (steps == 0 || batch == 0 || hidden == 0) return {output, h0.clone(), c0.clone(), gates, cell_states};

  // Every step's input projection at once: one GEMM with both biases folded in.
  const at::Tensor input_2d = input.view({steps * batch, input_size});
  const std::optional<at::Tensor> bias = combined_bias(bias_ih, bias_hh, input.scalar_type());
  const at::Tensor projection =
      bias.has_value() ? at::addmm(*bias, input_2d, weight_ih.t()) : at::mm(input_2d, weight_ih.t());
  // Without saving, the float32 cell state lives in one slot that each step updates in place.
  at::Tensor state = save_for_backward ? cell_states : at::empty({1, batch, hidden}, cell_states.options());
  // With a projection, m = σ(o)·tanh(c) of the step crosses from the gate kernel to the projection.
  at::Tensor m_scratch = at::empty({proj > 0 ? batch : 0, hidden}, input.options());

  LayerForwardParams layer{};
  layer.input_projection = projection.data_ptr();
  layer.weight_hh = weight_hh.data_ptr();
  layer.h0 = h0.data_ptr();
  layer.c0 = c0.data_ptr();
  layer.output = output.data_ptr();
  layer.cell_states = state.data_ptr<float>();
  layer.save_all_cell_states = save_for_backward;
  layer.gates = save_for_backward ? gates.data_ptr() : nullptr;
  layer.lengths = lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
  layer.weight_hr = data_or_null(weight_hr);
  layer.m_scratch = proj > 0 ? m_scratch.data_ptr() : nullptr;
  layer.proj_size = static_cast<int>(proj);
  layer.steps = static_cast<int>(steps);
  layer.batch = static_cast<int>(batch);
  layer.hidden = static_cast<int>(hidden);
  layer.reverse = reverse;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  dispatch_dtype(input.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    bool fits = false;
    if (mode != Recurrence::kStepwise) C10_CUDA_CHECK(launch_persistent_forward<T>(layer, stream, fits));
    TORCH_CHECK(fits || mode != Recurrence::kPersistent, "recurrence=persistent: hidden_size ", hidden,
                " with this dtype and batch does not fit on chip (W_hh slices in shared memory, all CTAs "
                "co-resident); the cuda/stepwise variant serves it");
    if (fits) return;
    const int64_t state_size = batch * hidden, h_size = batch * width;
    auto* output_data = static_cast<T*>(output.data_ptr());
    auto* state_data = state.data_ptr<float>();
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t t = reverse ? steps - 1 - s : s;
      const int64_t t_prev = reverse ? t + 1 : t - 1;
      StepForwardParams step{};
      step.a0 = s == 0 ? h0.data_ptr() : static_cast<const void*>(output_data + t_prev * h_size);
      step.w0 = weight_hh.data_ptr();
      step.k0 = static_cast<int>(width);
      step.pre_gates = static_cast<const T*>(projection.data_ptr()) + t * 4 * state_size;
      step.c_prev = s == 0 ? c0.data_ptr() : nullptr;
      step.c_prev_f32 = s == 0 ? nullptr : state_data + (save_for_backward ? t_prev * state_size : 0);
      step.h_out = output_data + t * h_size;
      step.m_out = proj > 0 ? m_scratch.data_ptr() : nullptr;
      step.c_out_f32 = state_data + (save_for_backward ? t * state_size : 0);
      step.gates_out = save_for_backward ? static_cast<T*>(gates.data_ptr()) + t * 4 * state_size : nullptr;
      step.lengths = layer.lengths;
      step.time = static_cast<int>(t);
      step.h_prev = step.a0;
      step.batch = static_cast<int>(batch);
      step.hidden = static_cast<int>(hidden);
      C10_CUDA_CHECK(launch_step_forward<T>(step, stream));
      if (proj == 0) continue;
      ProjectionForwardParams projection_step{};
      projection_step.m = m_scratch.data_ptr();
      projection_step.weight_hr = weight_hr->data_ptr();
      projection_step.r_prev = step.a0;
      projection_step.r_out = step.h_out;
      projection_step.lengths = layer.lengths;
      projection_step.time = static_cast<int>(t);
      projection_step.batch = static_cast<int>(batch);
      projection_step.hidden = static_cast<int>(hidden);
      projection_step.proj_size = static_cast<int>(proj);
      C10_CUDA_CHECK(launch_projection_forward<T>(projection_step, stream));
    }
  });

  const int64_t last = reverse ? 0 : steps - 1;
  // Rows past their length hold their frozen h until here: the last step's row is h_n.
  at::Tensor h_n = output.select(0, last).clone();
  at::Tensor c_n = state.select(0, save_for_backward ? last : 0).to(input.scalar_type(), false, /*copy=*/true);
  if (lengths.has_value()) output.masked_fill_(steps_past_length(*lengths, steps).unsqueeze(2), 0);
  return {output, h_n, c_n, gates, cell_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cell_states, bool reverse,
    const std::optional<at::Tensor>& lengths, c10::string_view recurrence, const std::optional<at::Tensor>& weight_hr) {
  const Recurrence mode = checked_recurrence(recurrence);
  const LayerSizes sizes = check_layer_operands(input, h0, c0, weight_ih, weight_hh, weight_hr, lengths);
  const int64_t steps = sizes.steps, batch = sizes.batch, input_size = sizes.input_size, hidden = sizes.hidden;
  const int64_t proj = sizes.proj, width = sizes.width();
  check_like_input(output, "output", input, {steps, batch, width});
  check_like_input(grad_output, "grad_output", input, {steps, batch, width});
  check_like_input(grad_h_n, "grad_h_n", input, {batch, width});
  check_like_input(grad_c_n, "grad_c_n", input, {batch, hidden});
  check_like_input(gates, "gates", input, {steps, batch, 4 * hidden});
  check_float_state(cell_states, "cell_states", input, {steps, batch, hidden});

  const c10::cuda::CUDAGuard guard(input.device());
  const at::ScalarType dtype = input.scalar_type();
  // grad_weight_hr: (P, H), or empty without a projection.
  at::Tensor grad_weight_hr = weight_hr.has_value() ? at::zeros_like(*weight_hr) : at::empty({0}, input.options());
  if (steps == 0 || batch == 0 || hidden == 0) {
    return {at::zeros_like(input), grad_h_n.clone(), grad_c_n.clone(), at::zeros_like(weight_ih),
            at::zeros_like(weight_hh), at::zeros({4 * hidden}, input.options()), grad_weight_hr};
  }
  at::Tensor grad_gates = at::empty({steps, batch, 4 * hidden}, input.options());
  at::Tensor grad_cell = at::empty({batch, hidden}, input.options().dtype(at::kFloat));
  const at::Tensor weight_hh_t = weight_hh.t().contiguous();
  // With a projection: W_hrᵀ (H, P) for dm = dr · W_hr, and dr of every step (kept for dW_hr).
  const at::Tensor weight_hr_t = proj > 0 ? weight_hr->t().contiguous() : at::Tensor();
  at::Tensor grad_recurrent = at::empty({proj > 0 ? steps : 0, batch, proj}, input.options());

  LayerBackwardParams layer{};
  layer.weight_hh_t = weight_hh_t.data_ptr();
  layer.grad_output = grad_output.data_ptr();
  layer.grad_h_n = grad_h_n.data_ptr();
  layer.grad_c_n = grad_c_n.data_ptr();
  layer.gates = gates.data_ptr();
  layer.cell_states = cell_states.data_ptr<float>();
  layer.c0 = c0.data_ptr();
  layer.grad_gates = grad_gates.data_ptr();
  layer.grad_cell = grad_cell.data_ptr<float>();
  layer.lengths = lengths.has_value() ? lengths->data_ptr<int64_t>() : nullptr;
  layer.weight_hr_t = proj > 0 ? weight_hr_t.data_ptr() : nullptr;
  layer.grad_recurrent = proj > 0 ? grad_recurrent.data_ptr() : nullptr;
  layer.proj_size = static_cast<int>(proj);
  layer.steps = static_cast<int>(steps);
  layer.batch = static_cast<int>(batch);
  layer.hidden = static_cast<int>(hidden);
  layer.reverse = reverse;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bool fits = false;
    if (mode != Recurrence::kStepwise) C10_CUDA_CHECK(launch_persistent_backward<T>(layer, stream, fits));
    TORCH_CHECK(fits || mode != Recurrence::kPersistent, "recurrence=persistent: hidden_size ", hidden,
                " with this dtype and batch does not fit on chip for backward; the cuda/stepwise variant serves it");
    if (fits) return;
    for (int s = 0; s < layer.steps; ++s) C10_CUDA_CHECK(launch_step_backward<T>(layer, s, stream));
  });

  // The weight gradients over all steps at once, from the stacked gate gradients: step t's
  // recurrent input is output[t ∓ 1], except each row's first step, whose is h0. That is step 0
  // (T - 1 reversed), or reversed with lengths the row's own last valid step, where output[t + 1]
  // is a zeroed row: its h0 term comes from the gathered first-step gradients.
  const at::Tensor grad_gates_2d = grad_gates.view({steps * batch, 4 * hidden});
  at::Tensor grad_gates_first;
  if (reverse && lengths.has_value()) {
    const at::Tensor first_step = lengths->sub(1).clamp(0, steps - 1).view({1, batch, 1});
    grad_gates_first = grad_gates.gather(0, first_step.expand({1, batch, 4 * hidden})).squeeze(0);
  } else {
    grad_gates_first = grad_gates.select(0, reverse ? steps - 1 : 0);
  }
  const at::Tensor grad_gates_rest = grad_gates.narrow(0, reverse ? 0 : 1, steps - 1).view({-1, 4 * hidden});
  const at::Tensor previous_h = output.narrow(0, reverse ? 1 : 0, steps - 1).view({-1, width});
  at::Tensor grad_weight_hh = at::addmm(at::mm(grad_gates_first.t(), h0), grad_gates_rest.t(), previous_h);
  at::Tensor grad_weight_ih = at::mm(grad_gates_2d.t(), input.view({steps * batch, input_size}));
  at::Tensor grad_input = at::mm(grad_gates_2d, weight_ih).view({steps, batch, input_size});
  at::Tensor grad_h0 = at::mm(grad_gates_first, weight_hh);
  // A row of length 0 never ran: its h_n is h0.
  if (lengths.has_value()) grad_h0.add_(grad_h_n.masked_fill(lengths->ne(0).unsqueeze(1), 0));
  at::Tensor grad_bias = at::sum(grad_gates_2d, {0}, false, at::kFloat).to(dtype);
  if (proj > 0) {
    // dW_hr = Σ_t dr_tᵀ m_t, one GEMM; m = σ(o)·tanh(c) rebuilt from the saved o gate and float32 cell
    // states (frozen steps have dr = 0, so their m does not matter).
    const at::Tensor output_gate = gates.narrow(2, 3 * hidden, hidden).to(at::kFloat);
    const at::Tensor m = at::mul(output_gate, at::tanh(cell_states)).to(dtype).view({steps * batch, hidden});
    grad_weight_hr = at::mm(grad_recurrent.view({steps * batch, proj}).t(), m);
  }
  return {grad_input, grad_h0, grad_cell.to(dtype), grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr};
}

}  // namespace pyattn::lstm
