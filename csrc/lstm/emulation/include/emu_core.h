// Host emulation of the CUDA features lstm_kernels.cuh uses (see ../lstm_emulation.cc): one OS
// thread per CUDA thread, std::barrier for __syncthreads and grid.sync, per-CTA shared buffers.
// The headers beside this one stand in for the CUDA headers of the same names; they are only ever
// on the include path of the emulation build, never of the extension.
#pragma once
#include <math.h>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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
// __syncthreads_or: three vote words per CTA, used in turn; a call clears the word the next one uses, which
// every thread read two calls ago, before the barrier of the call after it (so no thread still reads it).
inline thread_local std::atomic<int>* cta_votes = nullptr;
inline thread_local unsigned vote_round = 0;
inline std::barrier<>* grid_barrier = nullptr;
template <class Body>
void launch(dim3 grid, unsigned threads, size_t shared_bytes, Body body) {
  const unsigned ctas = grid.x * grid.y;
  std::barrier<> grid_sync(ctas * threads);
  grid_barrier = &grid_sync;
  std::vector<std::unique_ptr<std::barrier<>>> barriers;
  std::vector<std::vector<unsigned char>> buffers;
  std::vector<std::unique_ptr<std::atomic<int>[]>> votes;
  for (unsigned c = 0; c < ctas; ++c) {
    votes.emplace_back(new std::atomic<int>[3]{0, 0, 0});
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
        cta_votes = votes[c].get();
        vote_round = 0;
        auto* raw = buffers[c].data();
        cta_shared = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(raw) + 127) / 128 * 128);
        body();
      });
  for (auto& th : pool) th.join();
}
}  // namespace emu
inline void __syncthreads() { emu::cta_barrier->arrive_and_wait(); }
inline int __syncthreads_or(int predicate) {
  std::atomic<int>* word = emu::cta_votes + emu::vote_round % 3;
  if (threadIdx.x == 0) emu::cta_votes[(emu::vote_round + 1) % 3].store(0);
  ++emu::vote_round;
  if (predicate) word->fetch_or(1);
  emu::cta_barrier->arrive_and_wait();
  return word->load();
}
// cp.async: lstm_kernels.cuh calls these under PYATTN_LSTM_EMULATION. Copies are deferred to the wait
// that retires their group (a kernel reading a slice before waiting for it sees the old bytes).
#define PYATTN_LSTM_EMULATION 1
namespace emu {
struct AsyncCopy { void* destination; const void* source; size_t bytes; };
inline thread_local std::vector<AsyncCopy> open_group;
inline thread_local std::vector<std::vector<AsyncCopy>> pending_groups;
// cp.async of 16 bytes needs both addresses 16-byte aligned (a misaligned-address fault on a GPU): the
// emulation aborts on one, naming it, rather than copying as memcpy would.
inline void copy_async(void* destination, const void* source, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(destination) % 16 != 0 || reinterpret_cast<uintptr_t>(source) % 16 != 0) {
    fprintf(stderr, "emulation: cp.async with a misaligned address (shared %p, global %p)\n", destination, source);
    std::abort();
  }
  open_group.push_back({destination, source, bytes});
}
inline void copy_async_commit() { pending_groups.push_back(std::move(open_group)); open_group.clear(); }
inline void copy_async_wait(int pending) {
  while (static_cast<int>(pending_groups.size()) > pending) {
    for (const AsyncCopy& copy : pending_groups.front()) memcpy(copy.destination, copy.source, copy.bytes);
    pending_groups.erase(pending_groups.begin());
  }
}
}  // namespace emu
namespace emu {
// accumulate_product calls, one per CTA: the tests count them to see that frozen batch tiles skip theirs.
inline std::atomic<long> products{0};
}  // namespace emu
inline float __expf(float x) { return expf(x); }
template <class T> inline T __ldcg(const T* p) { return *p; }
