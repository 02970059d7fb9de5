// A C interface to the emulated kernels of lstm_kernels.cuh (see lstm_emulation.cc for the
// emulation itself), built as a shared library by tests/test_lstm_cuda.py and called through ctypes:
// there a CPU implementation of the layer ops drives these recurrences with torch doing the host
// work of lstm_api.cpp (the GEMMs around the loop), so a whole torch.nn.LSTM — projection, packed
// sequences, both directions, autograd through pyattn/ops/lstm_cuda.py — runs on the kernels' code.
//
// Each entry runs what lstm_api.cpp launches for one layer: the persistent kernel, or the stepwise
// loop (with a projection two launches per step forward and backward), with the launchers' tile
// choices (BM 16 up to 16 batch rows, else 64) and the ring an H100 launcher would give a persistent CTA. dtype: 0 float32, 1 float16, 2 bfloat16; pointers
// are contiguous host tensors of that dtype (cell states and the carried dc are float32).
#include "lstm_kernels_emulated.cuh"

using namespace pyattn::lstm;

namespace {

template <class T, int BM>
void layer_forward(bool persistent, const LayerForwardParams& p) {
  const int steps = p.steps, batch = p.batch, hidden = p.hidden, proj = p.proj_size;
  const int width = proj > 0 ? proj : hidden;
  if (persistent) {
    constexpr int BJ = kPersistentForwardUnits, S = kPersistentForwardSplits<BM>;
    using Layout = PersistentForwardLayout<T, BM, BJ, S>;
    LayerForwardParams q = p;  // the ring the launcher would give the CTAs on an H100
    q.ring_slices = grown_ring_slices(kH100SharedMemory, Layout::grid(hidden, proj), Layout::fixed_bytes(hidden, proj),
                                      Layout::Gates::kABytes, Layout::Gates::kStages, Layout::needed_slices(hidden, proj));
    emu::launch(dim3(Layout::grid(hidden, proj)), kThreads, Layout::total_bytes(hidden, proj, q.ring_slices),
                [&] { lstm_persistent_forward_kernel<T, BM, BJ, S>(q); });
    return;
  }
  const size_t state = size_t(batch) * hidden, h_size = size_t(batch) * width;
  const T* output = static_cast<const T*>(p.output);
  for (int s = 0; s < steps; ++s) {
    const int t = p.reverse ? steps - 1 - s : s, tp = p.reverse ? t + 1 : t - 1;
    const void* h_prev = s == 0 ? p.h0 : static_cast<const void*>(output + tp * h_size);
    StepForwardParams q{};
    q.a0 = h_prev;
    q.w0 = p.weight_hh;
    q.k0 = width;
    q.pre_gates = static_cast<const T*>(p.input_projection) + t * state * 4;
    q.c_prev = s == 0 ? p.c0 : nullptr;
    q.c_prev_f32 = s == 0 ? nullptr : p.cell_states + (p.save_all_cell_states ? tp * state : 0);
    q.h_out = const_cast<T*>(output) + t * h_size;
    q.c_out_f32 = p.cell_states + (p.save_all_cell_states ? t * state : 0);
    q.gates_out = p.gates ? static_cast<T*>(p.gates) + t * state * 4 : nullptr;
    q.m_out = proj > 0 ? p.m_scratch : nullptr;
    q.lengths = p.lengths;
    q.time = t;
    q.h_prev = h_prev;
    q.batch = batch;
    q.hidden = hidden;
    emu::launch(dim3(ceil_div(hidden, 16), ceil_div(batch, BM)), kThreads, TileShape<T, BM, 64, 1>::total_bytes(0, false),
                [&] { lstm_step_forward_kernel<T, BM, 16>(q); });
    if (proj == 0) continue;
    ProjectionForwardParams r{};
    r.m = p.m_scratch;
    r.weight_hr = p.weight_hr;
    r.r_prev = h_prev;
    r.r_out = q.h_out;
    r.lengths = p.lengths;
    r.time = t;
    r.batch = batch;
    r.hidden = hidden;
    r.proj_size = proj;
    emu::launch(dim3(ceil_div(proj, kProjectionColumns), ceil_div(batch, BM)), kThreads,
                ProjectionShape<T, BM>::total_bytes(0, false), [&] { lstm_projection_forward_kernel<T, BM>(r); });
  }
}

template <class T, int BM>
void layer_backward(bool persistent, const LayerBackwardParams& p) {
  constexpr int BJ = kBackwardUnits, S = kBackwardSplits<BM>;
  if (persistent) {
    using Layout = PersistentBackwardLayout<T, BM, BJ, S>;
    LayerBackwardParams q = p;  // as forward
    q.ring_slices =
        grown_ring_slices(kH100SharedMemory, Layout::grid(p.hidden, p.proj_size), Layout::fixed_bytes(p.hidden, p.proj_size),
                          Layout::Shape::kABytes, Layout::Shape::kStages, Layout::needed_slices(p.hidden, p.proj_size));
    emu::launch(dim3(Layout::grid(p.hidden, p.proj_size)), kThreads,
                Layout::total_bytes(p.hidden, p.proj_size, q.ring_slices),
                [&] { lstm_persistent_backward_kernel<T, BM, BJ, S>(q); });
    return;
  }
  const size_t shared_bytes = TileShape<T, BM, BJ, S>::total_bytes(0, false);
  const unsigned batch_tiles = ceil_div(p.batch, BM);
  for (int s = 0; s < p.steps; ++s) {
    if (p.proj_size > 0)
      emu::launch(dim3(ceil_div(p.proj_size, BJ), batch_tiles), kThreads, shared_bytes,
                  [&] { lstm_step_recurrent_backward_kernel<T, BM, BJ, S>(p, s); });
    emu::launch(dim3(ceil_div(p.hidden, BJ), batch_tiles), kThreads, shared_bytes,
                [&] { lstm_step_backward_kernel<T, BM, BJ, S>(p, s); });
  }
}

template <template <class, int> class Run, class Params>
int by_dtype(int dtype, bool persistent, const Params& p) {
  const bool small = p.batch <= 16;
  switch (dtype) {
    case 0: small ? Run<float, 16>{}(persistent, p) : Run<float, 64>{}(persistent, p); return 0;
    case 1: small ? Run<__half, 16>{}(persistent, p) : Run<__half, 64>{}(persistent, p); return 0;
    case 2: small ? Run<__nv_bfloat16, 16>{}(persistent, p) : Run<__nv_bfloat16, 64>{}(persistent, p); return 0;
    default: return 1;
  }
}

template <class T, int BM>
struct Forward {
  void operator()(bool persistent, const LayerForwardParams& p) const { layer_forward<T, BM>(persistent, p); }
};
template <class T, int BM>
struct Backward {
  void operator()(bool persistent, const LayerBackwardParams& p) const { layer_backward<T, BM>(persistent, p); }
};

}  // namespace

extern "C" {

// output (T, B, W), cell_states (T, B, H) when save_all else (1, B, H), gates (T, B, 4H) or null;
// m_scratch (B, H) with a projection (proj > 0: W = proj, weight_hr (P, H)), else W = H.
int emu_layer_forward(int dtype, int persistent, const void* input_projection, const void* weight_hh,
                      const void* weight_hr, const void* h0, const void* c0, void* output, float* cell_states,
                      int save_all, void* gates, void* m_scratch, const int64_t* lengths, int steps, int batch,
                      int hidden, int proj, int reverse) {
  LayerForwardParams p{};
  p.input_projection = input_projection;
  p.weight_hh = weight_hh;
  p.h0 = h0;
  p.c0 = c0;
  p.output = output;
  p.cell_states = cell_states;
  p.save_all_cell_states = save_all != 0;
  p.gates = gates;
  p.lengths = lengths;
  p.weight_hr = weight_hr;
  p.m_scratch = m_scratch;
  p.proj_size = proj;
  p.steps = steps;
  p.batch = batch;
  p.hidden = hidden;
  p.reverse = reverse != 0;
  return by_dtype<Forward>(dtype, persistent != 0, p);
}

// weight_hh_t (W, 4H), weight_hr_t (H, P) or null, grad_recurrent (T, B, P) or null.
int emu_layer_backward(int dtype, int persistent, const void* weight_hh_t, const void* weight_hr_t,
                       const void* grad_output, const void* grad_h_n, const void* grad_c_n, const void* gates,
                       const float* cell_states, const void* c0, void* grad_gates, float* grad_cell,
                       void* grad_recurrent, const int64_t* lengths, int steps, int batch, int hidden, int proj,
                       int reverse) {
  LayerBackwardParams p{};
  p.weight_hh_t = weight_hh_t;
  p.grad_output = grad_output;
  p.grad_h_n = grad_h_n;
  p.grad_c_n = grad_c_n;
  p.gates = gates;
  p.cell_states = cell_states;
  p.c0 = c0;
  p.grad_gates = grad_gates;
  p.grad_cell = grad_cell;
  p.lengths = lengths;
  p.weight_hr_t = weight_hr_t;
  p.grad_recurrent = grad_recurrent;
  p.proj_size = proj;
  p.steps = steps;
  p.batch = batch;
  p.hidden = hidden;
  p.reverse = reverse != 0;
  return by_dtype<Backward>(dtype, persistent != 0, p);
}

// accumulate_product calls since the last reset (one per CTA and product): frozen tiles skip theirs.
long emu_products_counted(int reset) { return reset ? emu::products.exchange(0) : emu::products.load(); }

}  // extern "C"
