// The launch sequence of each op, written once for every launcher: the CUDA one (attention_launch_sm80.cuh,
// in the .cu files) and the CPU emulation's. A launcher is called as
//     launch(name, kernel, grid, threads, shared_bytes, params)
// and skips empty grids.
#pragma once

#include "attention/attention_backward.cuh"
#include "attention/attention_forward.cuh"

namespace pyattn::attention {

template <class E, int HEAD_DIM, class Launcher>
void run_attention_forward(const ForwardParams& p, Launcher& launch) {
  using Shape = ForwardShape<HEAD_DIM>;
  launch("attention_forward_kernel", &attention_forward_kernel<E, HEAD_DIM>, Shape::grid(p), Shape::kThreads,
         Shape::kSharedBytes, p);
}

// p.dq_accum must be zeroed by the caller when !p.deterministic.
template <class E, int HEAD_DIM, class Launcher>
void run_attention_backward(const BackwardParams& p, Launcher& launch) {
  launch("attention_backward_preprocess_kernel", &attention_backward_preprocess_kernel<E, HEAD_DIM>,
         PreprocessShape<HEAD_DIM>::grid(p), PreprocessShape<HEAD_DIM>::kThreads, PreprocessShape<HEAD_DIM>::kSharedBytes,
         p);
  launch("attention_backward_dkdv_kernel", &attention_backward_dkdv_kernel<E, HEAD_DIM>, DkDvShape<HEAD_DIM>::grid(p),
         DkDvShape<HEAD_DIM>::kThreads, DkDvShape<HEAD_DIM>::kSharedBytes, p);
  if (p.deterministic) {
    launch("attention_backward_dq_kernel", &attention_backward_dq_kernel<E, HEAD_DIM>, DqShape<HEAD_DIM>::grid(p),
           DqShape<HEAD_DIM>::kThreads, DqShape<HEAD_DIM>::kSharedBytes, p);
  } else {
    launch("attention_backward_convert_dq_kernel", &attention_backward_convert_dq_kernel<E, HEAD_DIM>,
           ConvertShape<HEAD_DIM>::grid(p), ConvertShape<HEAD_DIM>::kThreads, ConvertShape<HEAD_DIM>::kSharedBytes, p);
  }
}

}  // namespace pyattn::attention
