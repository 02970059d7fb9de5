// The CUDA launcher behind launch_attention_{forward,backward}_sm80 (included by the .cu files only).
#pragma once

#include <cuda_runtime.h>

#include "attention/attention_launch.h"
#include "attention/attention_run.cuh"

namespace pyattn::attention {

struct CudaLauncher {
  cudaStream_t stream;
  cudaError_t error = cudaSuccess;

  template <class P>
  void operator()(const char*, void (*kernel)(P), Grid grid, int threads, size_t shared_bytes, const P& params) {
    if (error != cudaSuccess || grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    if (shared_bytes > 48 * 1024) {  // above the default: opt in (A100 allows 163 KB, H100 227 KB)
      error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
      if (error != cudaSuccess) return;
    }
    kernel<<<dim3(grid.x, grid.y, grid.z), threads, shared_bytes, stream>>>(params);
    error = cudaGetLastError();
  }
};

template <class E, int HEAD_DIM>
cudaError_t launch_attention_forward_sm80(const ForwardParams& params, cudaStream_t stream) {
  CudaLauncher launch{stream};
  run_attention_forward<E, HEAD_DIM>(params, launch);
  return launch.error;
}

template <class E, int HEAD_DIM>
cudaError_t launch_attention_backward_sm80(const BackwardParams& params, cudaStream_t stream) {
  CudaLauncher launch{stream};
  run_attention_backward<E, HEAD_DIM>(params, launch);
  return launch.error;
}

}  // namespace pyattn::attention
