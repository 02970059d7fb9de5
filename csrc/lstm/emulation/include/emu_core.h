// Host emulation of the CUDA features lstm_kernels.cuh uses (see ../lstm_emulation.cc): one OS
// thread per CUDA thread, std::barrier for __syncthreads and grid.sync, per-CTA shared buffers.
// The headers beside this one stand in for the CUDA headers of the same names; they are only ever
// on the include path of the emulation build, never of the extension.
#pragma once
#include <math.h>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <memory>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(x) alignas(x)
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct emu_uint3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local emu_uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
using cudaError_t = int;
using cudaStream_t = void*;
constexpr int cudaSuccess = 0;
namespace emu {
inline thread_local std::barrier<>* cta_barrier = nullptr;
inline thread_local unsigned char* cta_shared = nullptr;
inline std::barrier<>* grid_barrier = nullptr;
template <class Body>
void launch(dim3 grid, unsigned threads, size_t shared_bytes, Body body) {
  const unsigned ctas = grid.x * grid.y;
  std::barrier<> grid_sync(ctas * threads);
  grid_barrier = &grid_sync;
  std::vector<std::unique_ptr<std::barrier<>>> barriers;
  std::vector<std::vector<unsigned char>> buffers;
  for (unsigned c = 0; c < ctas; ++c) {
    barriers.emplace_back(new std::barrier<>(threads));
    buffers.emplace_back(shared_bytes + 256, 0xFF);  // 0xFF..: NaN-like garbage, as uninitialised smem may be
  }
  std::vector<std::thread> pool;
  for (unsigned c = 0; c < ctas; ++c)
    for (unsigned t = 0; t < threads; ++t)
      pool.emplace_back([&, c, t] {
        threadIdx.x = t; blockIdx.x = c % grid.x; blockIdx.y = c / grid.x;
        blockDim = dim3(threads); gridDim = grid;
        cta_barrier = barriers[c].get();
        auto* raw = buffers[c].data();
        cta_shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 127) / 128 * 128);
        body();
      });
  for (auto& th : pool) th.join();
}
}  // namespace emu
inline void __syncthreads() { emu::cta_barrier->arrive_and_wait(); }
inline float __expf(float x) { return expf(x); }
template <class T> inline T __ldcg(const T* p) { return *p; }
