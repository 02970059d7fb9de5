// Host-side interface between lstm_api.cpp (torch) and the CUDA kernels (no torch headers).
//
// Every tensor is row-major and contiguous; pointers are raw device pointers of the element type
// named by the launcher's template argument (float, __half or __nv_bfloat16). Gate rows follow
// torch: rows [0,H) input gate, [H,2H) forget, [2H,3H) cell candidate, [3H,4H) output gate.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pyattn::lstm {

// One step: gates = pre_gates + a0 · w0ᵀ + a1 · w1ᵀ + bias0 + bias1, then the cell update.
// The lstm_cell op uses a0 = input, a1 = hx; a layer's per-step fallback uses a0 = h_{t-1} and
// pre_gates = the step's slice of the precomputed input projection (biases folded in).
struct StepForwardParams {
  const void* a0;  // (batch, k0)
  const void* w0;  // (4H, k0)
  int k0;
  const void* a1;  // (batch, k1) or null
  const void* w1;  // (4H, k1) or null
  int k1;
  const void* pre_gates;  // (batch, 4H) or null
  const void* bias0;      // (4H,) or null
  const void* bias1;      // (4H,) or null
  const void* c_prev;        // (batch, H) element type, or null when c_prev_f32 is given
  const float* c_prev_f32;   // (batch, H) float32 cell state (a layer's carried state)
  void* h_out;               // (batch, H)
  void* c_out;               // (batch, H) or null
  float* c_out_f32;          // (batch, H) or null
  void* gates_out;           // (batch, 4H) activated gates (σi, σf, tanh g, σo) for backward, or null
  // Projection (proj_size > 0): the step writes m = σ(o)·tanh(c') (batch, H) here instead of h_out
  // (zero on frozen rows); a projection launch then makes r = m · W_hrᵀ. Null without a projection.
  void* m_out;
  // Ragged batch (layer steps only): row b is past its end when time >= lengths[b]; then its state
  // is frozen — h_out gets h_prev, the cell state is copied, the gates are zero.
  const int64_t* lengths;    // (batch,) or null
  int time;
  const void* h_prev;        // (batch, H): the h this step starts from
  int batch;
  int hidden;
};

// The projection of one step (proj_size = P > 0): r = m · W_hrᵀ, the recurrent state and output.
// Rows past their end (time >= lengths[b]) keep r_prev.
struct ProjectionForwardParams {
  const void* m;          // (batch, H): σ(o)·tanh(c) of the step
  const void* weight_hr;  // (P, H)
  const void* r_prev;     // (batch, P)
  void* r_out;            // (batch, P)
  const int64_t* lengths;  // (batch,) or null
  int time;
  int batch;
  int hidden;
  int proj_size;
};

// A whole layer's recurrence in one persistent kernel (W_hh held on chip, grid-wide sync per step).
// W = P (proj_size) with a projection, else H: the width of h, the recurrent product's K.
struct LayerForwardParams {
  const void* input_projection;  // (T, batch, 4H): x_t · W_ihᵀ + b_ih + b_hh
  const void* weight_hh;         // (4H, W)
  const void* h0;                // (batch, W)
  const void* c0;                // (batch, H)
  void* output;                  // (T, batch, W); output[t] is also h_t for the next step
  float* cell_states;            // (T, batch, H) when saving for backward, else (1, batch, H) scratch
  bool save_all_cell_states;     // cell_states holds every step (training) or one reused slot
  void* gates;                   // (T, batch, 4H) activated gates, or null
  // (batch,) or null. Rows past their end keep their state; their output rows hold the frozen h
  // (the caller zeroes them afterwards), so the recurrence always reads the right h_{t-1}.
  const int64_t* lengths;
  // Projection: W_hr (P, H) kept on chip too, and m (batch, H) exchanged through a scratch slot
  // (a second grid barrier per step: r_t needs every CTA's units of m). Null / 0 without one.
  const void* weight_hr;
  void* m_scratch;
  int proj_size;
  int steps;
  int batch;
  int hidden;
  bool reverse;
  // K slices the CTA's cp.async ring of the recurrent operand holds: set by the launcher from the shared
  // memory left after the resident weights (lstm_kernels.cuh, kPipelineStages); below the least ring, that.
  int ring_slices;
};

// Backward through time of one layer. Processing runs opposite to the forward's order; at each
// step t: dh_t = grad_output[t] + dgates_{t_next} · W_hh (+ grad_h_n on the first), the fused
// pointwise gate gradients write dgates_t and carry dc in float32.
// With a projection (W = P, else W = H): dr_t = grad_output[t] (+ grad_h_n) + dgates_{t_next} · W_hh
// is stored per step (P wide), then dm_t = dr_t · W_hr takes dh's place in the gate gradients.
struct LayerBackwardParams {
  const void* weight_hh_t;    // (W, 4H): W_hhᵀ, contiguous
  const void* grad_output;    // (T, batch, W)
  const void* grad_h_n;       // (batch, W)
  const void* grad_c_n;       // (batch, H)
  const void* gates;          // (T, batch, 4H) activated gates saved by the forward
  const float* cell_states;   // (T, batch, H)
  const void* c0;             // (batch, H)
  void* grad_gates;           // (T, batch, 4H) output: gradient w.r.t. pre-activation gates
  float* grad_cell;           // (batch, H) carried dc; holds grad_c0 at the end
  const int64_t* lengths;     // (batch,) or null: steps t >= lengths[b] pass dc through, dgates = 0
  const void* weight_hr_t;    // (H, P): W_hrᵀ, contiguous; null without a projection
  void* grad_recurrent;       // (T, batch, P) output dr (zero on frozen steps); null without a projection
  int proj_size;              // P, or 0
  int steps;
  int batch;
  int hidden;
  bool reverse;
  int ring_slices;            // set by the launcher, as LayerForwardParams::ring_slices
};

// lstm_cell backward: pointwise gate gradients of one step (the GEMMs are done by the caller).
struct CellBackwardParams {
  const void* grad_hy;  // (batch, H)
  const void* grad_cy;  // (batch, H)
  const void* gates;    // (batch, 4H) activated gates saved by the forward
  const void* cx;       // (batch, H)
  const void* cy;       // (batch, H)
  void* grad_gates;     // (batch, 4H)
  void* grad_cx;        // (batch, H)
  int batch;
  int hidden;
};

// Whether a persistent kernel's cooperative grid can be resident on the current device, with the figures
// that decide it: the launchers check it before launching, and lstm_persistent_resident (lstm_api.cpp)
// answers dispatch with it without launching anything, so the two can never disagree.
struct PersistentResidency {
  int grid = 0;                // CTAs that must be co-resident for the grid sync
  int threads = 0;             // per CTA
  size_t shared_bytes = 0;     // dynamic shared memory per CTA
  int shared_limit = 0;        // opt-in maximum per block on this device
  bool cooperative = false;    // the device supports cooperative launches
  int multiprocessors = 0;
  int registers = 0;           // per thread, as compiled
  int per_multiprocessor = 0;  // CTAs per SM the occupancy API allows (registers, shared memory, threads)
  // K slices of the recurrent operand's ring in shared_bytes: the least ring, grown into what the CTAs that
  // must share an SM leave of its shared memory (up to the whole operand: one pass per product).
  int ring_slices = 0;
  bool fits() const {
    return cooperative && shared_bytes <= static_cast<size_t>(shared_limit) &&
           per_multiprocessor * multiprocessors >= grid;
  }
};

// The residency of the persistent forward / backward kernel for a layer of these sizes (proj_size 0: none).
template <typename T>
cudaError_t persistent_forward_residency(int batch, int hidden, int proj_size, PersistentResidency& residency);

template <typename T>
cudaError_t persistent_backward_residency(int batch, int hidden, int proj_size, PersistentResidency& residency);

template <typename T>
cudaError_t launch_step_forward(const StepForwardParams& params, cudaStream_t stream);

// `fits` is set false (and nothing launched) when the layer does not fit on chip
// (persistent_forward_residency); the caller then runs the per-step kernels or raises.
template <typename T>
cudaError_t launch_persistent_forward(const LayerForwardParams& params, cudaStream_t stream, bool& fits);

template <typename T>
cudaError_t launch_projection_forward(const ProjectionForwardParams& params, cudaStream_t stream);

// One backward step `step` (0 = the first processed) of LayerBackwardParams, for the fallback loop;
// with a projection it is two launches (dr, then the gate gradients from dm = dr · W_hr).
template <typename T>
cudaError_t launch_step_backward(const LayerBackwardParams& params, int step, cudaStream_t stream);

template <typename T>
cudaError_t launch_persistent_backward(const LayerBackwardParams& params, cudaStream_t stream, bool& fits);

template <typename T>
cudaError_t launch_cell_backward(const CellBackwardParams& params, cudaStream_t stream);

}  // namespace pyattn::lstm
