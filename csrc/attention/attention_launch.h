// Host-side interface between attention_api.cpp (torch) and the CUDA kernels (no torch headers).
//
// One launcher per (element type, head dim, architecture path), each instantiated in its own .cu file
// so that builds parallelise. The sm80 path (mma.sync.m16n8k16, ldmatrix, cp.async) runs on every GPU
// of compute capability >= 8.0, Hopper included. An sm90 path (wgmma with shared-memory descriptors,
// TMA, warp-specialised producer/consumer warpgroups) would add launch_attention_{forward,backward}_sm90
// taking the same params, and attention_api.cpp would pick it on compute capability 9.0.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/attention_params.h"

namespace pyattn::attention {

template <class E, int HEAD_DIM>
cudaError_t launch_attention_forward_sm80(const ForwardParams& params, cudaStream_t stream);

// params.dq_accum must be zeroed when !params.deterministic.
template <class E, int HEAD_DIM>
cudaError_t launch_attention_backward_sm80(const BackwardParams& params, cudaStream_t stream);

#define PYATTN_ATTENTION_INSTANTIATIONS(E, HEAD_DIM)                                                       \
  extern template cudaError_t launch_attention_forward_sm80<E, HEAD_DIM>(const ForwardParams&, cudaStream_t); \
  extern template cudaError_t launch_attention_backward_sm80<E, HEAD_DIM>(const BackwardParams&, cudaStream_t);
PYATTN_ATTENTION_INSTANTIATIONS(Fp16, 64)
PYATTN_ATTENTION_INSTANTIATIONS(Fp16, 128)
PYATTN_ATTENTION_INSTANTIATIONS(Bf16, 64)
PYATTN_ATTENTION_INSTANTIATIONS(Bf16, 128)
#undef PYATTN_ATTENTION_INSTANTIATIONS

}  // namespace pyattn::attention
