// LSTM kernels: templated on the element type (float, __half, __nv_bfloat16); instantiated by the
// small lstm_{forward,backward}_<dtype>.cu files so the build compiles them in parallel.
//
// Every GEMM here has the same shape: a CTA computes C[BM × BN] = A[BM × K] · Wᵀ where W is
// [BN × K] (rows gathered from a weight matrix), K walked in kBlockK-deep shared-memory slices.
// fp16/bf16 run it on tensor cores (WMMA 16×16×16, fp32 accumulators); fp32 runs exact FMA so it
// meets the 1e-5 bound (tf32 would not). C lands in shared memory and the epilogue that follows —
// the LSTM cell update forward, the gate gradients backward — reads it from there, so gate
// pre-activations never round-trip global memory.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lstm/lstm_launch.h"

namespace pyattn::lstm {

constexpr int kThreads = 128;  // four warps in every CTA
constexpr int kBlockK = 64;    // depth of one shared-memory K slice
// The persistent kernels' recurrent operand (h_{t-1}, m_t, dgates_{t+1}, dr_t) goes to shared memory by
// cp.async, into a ring of K slices at the end of the CTA's shared memory. The launcher gives the ring
// whatever the CTA's budget leaves (LayerForwardParams::ring_slices), at least kPipelineStages slices:
// 16-bit tiles of one batch fragment (the latency-bound small batch) 16 (37 KB), the rest 4 (fp32
// backward at H = 768 and BM 64 at H = 1024 would not fit more). A product issues as much of its
// operand as the ring holds at once (one pass; the whole operand whenever it fits), in kBurstGroups
// commit groups, and multiplies each group as soon as it has landed: one L2 round trip and
// kBurstGroups barriers per pass instead of a wait and a barrier per slice.
template <typename T, int BM>
constexpr int kPipelineStages = BM == 16 && sizeof(T) == 2 ? 16 : 4;
constexpr int kBurstGroups = 4;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }
__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

template <typename T>
struct Element;

template <>
struct Element<float> {
  static constexpr bool kTensorCores = false;
  __device__ static float to_float(float x) { return x; }
  __device__ static float from_float(float x) { return x; }
  __device__ static float load_l2(const float* p) { return __ldcg(p); }
};

template <>
struct Element<__half> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ static __half load_l2(const __half* p) {
    return __ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p)));
  }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr bool kTensorCores = true;
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static __nv_bfloat16 load_l2(const __nv_bfloat16* p) {
    return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
  }
};

// Shared-memory row padding. fp32 rows get one word, so the FMA loop's column reads (16 rows, same
// k) fall in 16 distinct banks; 16-bit rows get 16 bytes, which keeps WMMA's 32-byte alignment for
// fragments starting on rows that are multiples of 16 and staggers banks between rows.
template <typename T>
constexpr int kRowPad = sizeof(T) == 4 ? 1 : 8;
// The A slices' rows: cp.async writes 16 bytes to a 16-byte-aligned shared address, so every row of an A slice
// starts on one (fp32: 64 + 4 words; a warp's FMA loop reads two A rows at a time, so no bank conflict either).
template <typename T>
constexpr int kARowPad = sizeof(T) == 4 ? 4 : 8;

// Shared memory of one CTA: the W region (one staged slice, or all of K resident), then the A
// slice, then the fp32 C tile (one copy per K split, summed by the epilogue).
template <typename T, int BM, int BN, int SPLITS>
struct TileShape {
  static constexpr int kSplits = Element<T>::kTensorCores ? SPLITS : 1;
  static constexpr int kLdA = kBlockK + kARowPad<T>;
  static_assert(kLdA * sizeof(T) % 16 == 0, "A rows start 16-byte aligned (cp.async destinations)");
  static constexpr int kLdC = BN + 4;
  static constexpr size_t kABytes = align128(size_t(BM) * kLdA * sizeof(T));
  static constexpr int kStages = kPipelineStages<T, BM>;
  static constexpr size_t kCBytes = align128(size_t(kSplits) * BM * kLdC * sizeof(float));
  __host__ __device__ static int w_ld(int k_size, bool resident) {
    return (resident ? round_up(k_size, kBlockK) : kBlockK) + kRowPad<T>;
  }
  __host__ __device__ static size_t w_bytes(int k_size, bool resident) {
    return align128(size_t(BN) * w_ld(k_size, resident) * sizeof(T));
  }
  __host__ __device__ static size_t total_bytes(int k_size, bool resident) {
    return w_bytes(k_size, resident) + kABytes + kCBytes;
  }
};

template <typename T>
__host__ __device__ inline bool is_vectorizable(const void* base, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_stride % (16 / int64_t(sizeof(T))) == 0;
}

// Stages rows [0, ROWS) × columns [k0, k0 + kBlockK) of a row-major global matrix into shared
// memory with 16-byte loads. row_of(r) gives the global row or -1; absent rows and columns past
// k_size become zeros, so the padded edges add nothing to the product (odd sizes need no special
// case). kFromL2 reads through L2 only: data another CTA wrote earlier in the same persistent
// kernel must not come from this SM's (non-coherent) L1.
template <typename T, int ROWS, bool kFromL2, typename RowOf>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* src, int64_t src_stride, int k0, int k_size,
                                          bool vectorized, RowOf row_of) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunksPerRow = kBlockK / kVec;
  for (int chunk = threadIdx.x; chunk < ROWS * kChunksPerRow; chunk += kThreads) {
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * kVec;
    const int64_t row = row_of(r);
    const int k = k0 + c;
    uint4 raw;
    T* values = reinterpret_cast<T*>(&raw);
    if (row >= 0 && vectorized && k + kVec <= k_size) {
      const uint4* p = reinterpret_cast<const uint4*>(src + row * src_stride + k);
      if constexpr (kFromL2) {
        raw = __ldcg(p);
      } else {
        raw = *p;
      }
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        if (row >= 0 && k + v < k_size) {
          const T* p = src + row * src_stride + k + v;
          if constexpr (kFromL2) {
            values[v] = Element<T>::load_l2(p);
          } else {
            values[v] = *p;
          }
        } else {
          values[v] = Element<T>::from_float(0.f);
        }
      }
    }
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint4*>(tile + r * ld + c) = raw;
    } else {
#pragma unroll
      for (int v = 0; v < kVec; ++v) tile[r * ld + c + v] = values[v];
    }
  }
}

// cp.async (sm_80+): 16 bytes global -> shared without a register round trip, `.cg` (L2 only, like
// __ldcg: the data may have been written by another SM in this kernel); commit closes a group, wait<N>
// returns once at most N of this thread's groups are pending. The CPU emulation defers the copies to
// the wait, so a slice read before its wait (and __syncthreads) sees stale bytes there too.
__device__ __forceinline__ void copy_async_l2(void* shared_destination, const void* global_source) {
#if defined(__CUDA_ARCH__)
  const unsigned destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(destination), "l"(global_source) : "memory");
#elif defined(PYATTN_LSTM_EMULATION)
  emu::copy_async(shared_destination, global_source, 16);
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(PYATTN_LSTM_EMULATION)
  emu::copy_async_commit();
#endif
}
template <int PENDING>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#elif defined(PYATTN_LSTM_EMULATION)
  emu::copy_async_wait(PENDING);
#endif
}

// Waits until at most `pending` (< kBurstGroups) of this thread's cp.async groups are in flight: wait_group
// takes an immediate, so the count picks the case (the same in every thread).
__device__ __forceinline__ void copy_async_wait_pending(int pending) {
  static_assert(kBurstGroups == 4, "one case per burst group");
  switch (pending) {
    case 3: copy_async_wait<3>(); break;
    case 2: copy_async_wait<2>(); break;
    case 1: copy_async_wait<1>(); break;
    default: copy_async_wait<0>(); break;
  }
}

// load_tile for data written in this kernel (through L2 only) by cp.async: whole 16-byte chunks go
// straight to shared memory asynchronously; ragged edges and misaligned views take the synchronous
// zero-filling path of load_tile.
template <typename T, int ROWS, typename RowOf>
__device__ __forceinline__ void load_tile_async(T* tile, int ld, const T* src, int64_t src_stride, int k0, int k_size,
                                                bool vectorized, RowOf row_of) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kChunksPerRow = kBlockK / kVec;
  for (int chunk = threadIdx.x; chunk < ROWS * kChunksPerRow; chunk += kThreads) {
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * kVec;
    const int64_t row = row_of(r);
    const int k = k0 + c;
    if (row >= 0 && vectorized && k + kVec <= k_size) {
      copy_async_l2(tile + r * ld + c, src + row * src_stride + k);
      continue;
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      tile[r * ld + c + v] = row >= 0 && k + v < k_size ? Element<T>::load_l2(src + row * src_stride + k + v)
                                                         : Element<T>::from_float(0.f);
    }
  }
}

// Tensor-core accumulator: the (BM/16)·(BN/16) output fragments times SPLITS K-splits are spread
// over the four warps; a split takes every SPLITS-th 16-deep step of a slice, so a small batch
// still keeps all warps busy.
template <typename T, int BM, int BN, int SPLITS>
struct TensorCoreTile {
  static constexpr int kFragmentsM = BM / 16;
  static constexpr int kFragmentsN = BN / 16;
  static constexpr int kTasks = kFragmentsM * kFragmentsN * SPLITS;
  static constexpr int kTasksPerWarp = kTasks / (kThreads / 32);
  static_assert(BM % 16 == 0 && BN % 16 == 0, "tiles are whole 16×16 fragments");
  static_assert(kTasks % (kThreads / 32) == 0, "every warp gets the same number of fragments");
  static_assert((kBlockK / 16) % SPLITS == 0, "K splits divide a slice");

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> accumulator[kTasksPerWarp];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kTasksPerWarp; ++i) nvcuda::wmma::fill_fragment(accumulator[i], 0.f);
  }

  __device__ static void task_coordinates(int i, int& split, int& fragment_m, int& fragment_n) {
    const int task = threadIdx.x / 32 + i * (kThreads / 32);
    split = task % SPLITS;
    fragment_m = (task / SPLITS) % kFragmentsM;
    fragment_n = (task / SPLITS) / kFragmentsM;
  }

  // A slice: a[m * lda + k]; W slice: w[n * ldw + k] (the column-major view of Wᵀ).
  __device__ void accumulate(const T* a, int lda, const T* w, int ldw) {
    using namespace nvcuda;
#pragma unroll
    for (int i = 0; i < kTasksPerWarp; ++i) {
      int split, fm, fn;
      task_coordinates(i, split, fm, fn);
#pragma unroll
      for (int kk = split; kk < kBlockK / 16; kk += SPLITS) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_fragment;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> w_fragment;
        wmma::load_matrix_sync(a_fragment, a + fm * 16 * lda + kk * 16, lda);
        wmma::load_matrix_sync(w_fragment, w + fn * 16 * ldw + kk * 16, ldw);
        wmma::mma_sync(accumulator[i], a_fragment, w_fragment, accumulator[i]);
      }
    }
  }

  // C tile: c[(split * BM + m) * ldc + n].
  __device__ void store(float* c, int ldc) {
#pragma unroll
    for (int i = 0; i < kTasksPerWarp; ++i) {
      int split, fm, fn;
      task_coordinates(i, split, fm, fn);
      nvcuda::wmma::store_matrix_sync(c + (split * BM + fm * 16) * ldc + fn * 16, accumulator[i], ldc,
                                      nvcuda::wmma::mem_row_major);
    }
  }
};

// fp32 accumulator: thread (row group g, lane l) owns rows g + 8i and columns l + 16j.
template <int BM, int BN>
struct FmaTile {
  static constexpr int kRowGroups = kThreads / 16;
  static constexpr int kRowsPerThread = BM / kRowGroups;
  static constexpr int kColumnsPerThread = BN / 16;
  static_assert(BM % kRowGroups == 0 && BN % 16 == 0, "tile must divide among the threads");

  float accumulator[kRowsPerThread][kColumnsPerThread];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColumnsPerThread; ++j) accumulator[i][j] = 0.f;
  }

  __device__ void accumulate(const float* a, int lda, const float* w, int ldw) {
    const int group = threadIdx.x / 16, lane = threadIdx.x % 16;
#pragma unroll 8
    for (int k = 0; k < kBlockK; ++k) {
      float a_values[kRowsPerThread], w_values[kColumnsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) a_values[i] = a[(group + i * kRowGroups) * lda + k];
#pragma unroll
      for (int j = 0; j < kColumnsPerThread; ++j) w_values[j] = w[(lane + j * 16) * ldw + k];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kColumnsPerThread; ++j) accumulator[i][j] = fmaf(a_values[i], w_values[j], accumulator[i][j]);
    }
  }

  __device__ void store(float* c, int ldc) {
    const int group = threadIdx.x / 16, lane = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kColumnsPerThread; ++j) c[(group + i * kRowGroups) * ldc + lane + j * 16] = accumulator[i][j];
  }
};

template <typename T, int BM, int BN, int SPLITS>
using TileAccumulator =
    std::conditional_t<Element<T>::kTensorCores, TensorCoreTile<T, BM, BN, SPLITS>, FmaTile<BM, BN>>;

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// tanh from one exponential; a short series near zero, where 1 - e^{-2|x|} would cancel.
__device__ __forceinline__ float tanh_fast(float x) {
  const float magnitude = fabsf(x);
  if (magnitude < 0.125f) {
    const float x2 = x * x;
    return x * (1.f + x2 * (-1.f / 3.f + x2 * (2.f / 15.f - x2 * (17.f / 315.f))));
  }
  const float e = __expf(-2.f * magnitude);
  return copysignf((1.f - e) / (1.f + e), x);
}

// Gradients w.r.t. the four pre-activation gates of one unit, from the activated gates (i, f, g, o),
// the incoming dh and dc, and the cell states around the step; returns dc for the previous step.
__device__ __forceinline__ float gate_gradients(float dh, float dc, float i, float f, float g, float o, float c_prev,
                                                float c_cur, float (&grad_gates)[4]) {
  const float tanh_c = tanh_fast(c_cur);
  dc += dh * o * (1.f - tanh_c * tanh_c);
  grad_gates[0] = dc * g * i * (1.f - i);
  grad_gates[1] = dc * c_prev * f * (1.f - f);
  grad_gates[2] = dc * i * (1.f - g * g);
  grad_gates[3] = dh * tanh_c * o * (1.f - o);
  return dc * f;
}

// Whether every row of the batch tile [b0, b0 + BM) is frozen at `time` (past its end, or reversed
// before its start). A frozen tile's product would feed no update, so the kernels skip it and run only
// the epilogue's carry: with rows sorted by length (the packed path, lstm_common.stacked's sorted
// padding) the frozen rows are the tail tiles, and each step's tensor-core work shrinks with the active
// batch, as cuDNN's does, a tile at a time. A tile whose first row runs is running (one broadcast load, no
// barrier: in sorted order every running tile answers here); otherwise, as the rows may come in any order, thread
// r loads row r's length and one __syncthreads_or votes. Every thread of the CTA calls it at the same point, reads
// the same first length, and gets the same answer.
template <int BM>
__device__ __forceinline__ bool tile_frozen(const int64_t* lengths, int b0, int batch, int time) {
  static_assert(BM <= kThreads, "one row per thread");
  if (!lengths) return false;  // a kernel argument: the same branch in every thread
  if (time < lengths[b0]) return false;
  const int row = b0 + static_cast<int>(threadIdx.x);
  const bool running = threadIdx.x < BM && row < batch && time < lengths[row];
  return __syncthreads_or(running) == 0;
}

// Where one forward step's epilogue reads and writes; row strides are H (state) and 4H (gates).
template <typename T>
struct ForwardStep {
  const T* pre_gates;
  const T* bias0;
  const T* bias1;
  const T* c_prev;
  const float* c_prev_f32;
  T* h_out;
  T* c_out;
  float* c_out_f32;
  T* gates_out;
  T* m_out;  // projection: m = σ(o)·tanh(c') goes here (zero on frozen rows) and h_out is not written
  const int64_t* lengths;  // ragged batch: rows with time >= lengths[b] keep their state
  int time;
  const T* h_prev;
};

// What a thread of the epilogue keeps in registers across the persistent forward's steps when the CTA
// has one batch tile: the next step's input-projection values (loaded before the grid barrier, so the
// epilogue waits on nothing but the product) and its units' float32 c (carried, never reloaded).
template <int BM, int BJ>
struct EpilogueOperands {
  static constexpr int kPerThread = ceil_div(BM * BJ, kThreads);
  float pre[kPerThread][4];
  float c[kPerThread];
};

// Loads step t's input-projection values of the thread's (row, unit) pairs into `operands`.
template <typename T, int BM, int BJ>
__device__ __forceinline__ void prefetch_pre_gates(EpilogueOperands<BM, BJ>& operands, const T* pre_gates, int b0,
                                                   int j0, int batch, int hidden) {
#pragma unroll
  for (int i = 0; i < EpilogueOperands<BM, BJ>::kPerThread; ++i) {
    const int index = threadIdx.x + i * kThreads;
    const int b = b0 + index / BJ, j = j0 + index % BJ;
    if (index >= BM * BJ || b >= batch || j >= hidden) continue;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) {
      operands.pre[i][gate] = Element<T>::to_float(pre_gates[int64_t(b) * 4 * hidden + gate * hidden + j]);
    }
  }
}

// The cell update for the CTA's BM batch rows × BJ hidden units; the C tile holds the four gates of
// unit jj in columns jj, BJ + jj, 2BJ + jj, 3BJ + jj. With `operands` (kPrefetched) the pre-gates
// (biases folded in) and c come from registers and c' is left there for the next step; otherwise they
// are loaded from step's pointers.
template <typename T, int BM, int BJ, int SPLITS, bool kPrefetched = false>
__device__ __forceinline__ void forward_epilogue(const float* c_tile, int ldc, int b0, int j0, int batch, int hidden,
                                                 const ForwardStep<T>& step,
                                                 EpilogueOperands<BM, BJ>* operands = nullptr) {
  using E = Element<T>;
#pragma unroll
  for (int i = 0; i < EpilogueOperands<BM, BJ>::kPerThread; ++i) {
    const int index = threadIdx.x + i * kThreads;
    const int m = index / BJ, jj = index % BJ;
    const int b = b0 + m, j = j0 + jj;
    if (index >= BM * BJ || b >= batch || j >= hidden) continue;
    const int64_t state = int64_t(b) * hidden + j;
    const int64_t gate_row = int64_t(b) * 4 * hidden;
    float c_old;
    if constexpr (kPrefetched) {
      c_old = operands->c[i];
    } else {
      c_old = step.c_prev_f32 ? step.c_prev_f32[state] : E::to_float(step.c_prev[state]);
    }
    if (step.lengths && step.time >= step.lengths[b]) {
      // Past this sequence's end (or, reversed, before its start): the state is frozen, and the
      // output row carries h on to the next step; the caller zeroes those rows afterwards. With a
      // projection the projection epilogue carries r instead, and m (unused) is zero.
      if (step.m_out) {
        step.m_out[state] = E::from_float(0.f);
      } else {
        step.h_out[state] = step.h_prev[state];
      }
      if (step.c_out) step.c_out[state] = E::from_float(c_old);
      if (step.c_out_f32) step.c_out_f32[state] = c_old;
      if (step.gates_out) {
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) step.gates_out[gate_row + gate * hidden + j] = E::from_float(0.f);
      }
      continue;
    }
    float pre[4];
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) {
      float value = 0.f;
#pragma unroll
      for (int split = 0; split < SPLITS; ++split) value += c_tile[(split * BM + m) * ldc + gate * BJ + jj];
      const int column = gate * hidden + j;
      if constexpr (kPrefetched) {
        value += operands->pre[i][gate];
      } else {
        if (step.pre_gates) value += E::to_float(step.pre_gates[gate_row + column]);
        if (step.bias0) value += E::to_float(step.bias0[column]);
        if (step.bias1) value += E::to_float(step.bias1[column]);
      }
      pre[gate] = value;
    }
    const float input_gate = sigmoid(pre[0]), forget_gate = sigmoid(pre[1]);
    const float cell_gate = tanh_fast(pre[2]), output_gate = sigmoid(pre[3]);
    const float c_new = forget_gate * c_old + input_gate * cell_gate;
    const float h_new = output_gate * tanh_fast(c_new);
    if constexpr (kPrefetched) operands->c[i] = c_new;
    if (step.m_out) {
      step.m_out[state] = E::from_float(h_new);
    } else {
      step.h_out[state] = E::from_float(h_new);
    }
    if (step.c_out) step.c_out[state] = E::from_float(c_new);
    if (step.c_out_f32) step.c_out_f32[state] = c_new;
    if (step.gates_out) {
      step.gates_out[gate_row + j] = E::from_float(input_gate);
      step.gates_out[gate_row + hidden + j] = E::from_float(forget_gate);
      step.gates_out[gate_row + 2 * hidden + j] = E::from_float(cell_gate);
      step.gates_out[gate_row + 3 * hidden + j] = E::from_float(output_gate);
    }
  }
}

// acc += A[b0 + r, 0 .. k_size) · W[w_row(n), 0 .. k_size)ᵀ over kBlockK-deep slices; A is (batch, k_size)
// row-major. kAFromL2: A was written in this kernel by other CTAs (read through L2
// only). W is either resident (staged once into w_resident with leading dimension w_ld) or streamed
// through w_tile. With W resident (the persistent kernels: A always comes from L2 then) a_tile is a ring
// of ring_slices slices (at least kPipelineStages): a pass issues as many slices as it holds at once, in
// kBurstGroups cp.async groups, then multiplies each group once it has landed (the later groups still in
// flight); an operand longer than the ring takes ⌈slices / ring_slices⌉ passes. Otherwise one A slice
// (and one W slice) per __syncthreads pair.
template <typename T, int BM, int BN, int SPLITS, bool kAFromL2, bool kResident, typename RowOf>
__device__ __forceinline__ void accumulate_product(TileAccumulator<T, BM, BN, SPLITS>& accumulator, const T* a,
                                                   int k_size, int b0, int batch,
                                                   const T* w_resident, const T* w, RowOf w_row, int w_ld, T* w_tile,
                                                   T* a_tile, int ring_slices = 0) {
  using Shape = TileShape<T, BM, BN, SPLITS>;
  constexpr int kLdA = Shape::kLdA;
#if defined(PYATTN_LSTM_EMULATION)
  if (threadIdx.x == 0) emu::products.fetch_add(1);  // the emulation tests count products (tile_frozen skips)
#endif
  auto batch_row = [&](int r) -> int64_t { return b0 + r < batch ? int64_t(b0 + r) : -1; };
  const bool a_vectorized = is_vectorizable<T>(a, k_size);
  if constexpr (kResident) {
    static_assert(kAFromL2, "the resident-W (persistent) products read an operand written in the same kernel");
    constexpr int kSliceElements = static_cast<int>(Shape::kABytes / sizeof(T));
    const int slices = ceil_div(k_size, kBlockK);
    const int capacity = ring_slices > Shape::kStages ? ring_slices : Shape::kStages;
    for (int first = 0; first < slices; first += capacity) {
      const int count = slices - first < capacity ? slices - first : capacity;
      const int groups = count < kBurstGroups ? count : kBurstGroups;  // none empty; group g: [g·count/groups, ..)
      for (int group = 0; group < groups; ++group) {
        for (int i = group * count / groups; i < (group + 1) * count / groups; ++i) {
          load_tile_async<T, BM>(a_tile + i * kSliceElements, kLdA, a, k_size, (first + i) * kBlockK, k_size,
                                 a_vectorized, batch_row);
        }
        copy_async_commit();
      }
      for (int group = 0; group < groups; ++group) {
        copy_async_wait_pending(groups - 1 - group);  // this thread's copies of the group have landed
        __syncthreads();                              // everyone's have
        for (int i = group * count / groups; i < (group + 1) * count / groups; ++i) {
          accumulator.accumulate(a_tile + i * kSliceElements, kLdA, w_resident + (first + i) * kBlockK, w_ld);
        }
      }
      __syncthreads();  // every warp is done with the ring before the next pass (or product) refills it
    }
    return;
  }
  const bool w_vectorized = is_vectorizable<T>(w, k_size);
  for (int k0 = 0; k0 < k_size; k0 += kBlockK) {
    load_tile<T, BM, kAFromL2>(a_tile, kLdA, a, k_size, k0, k_size, a_vectorized, batch_row);
    if constexpr (!kResident) load_tile<T, BN, false>(w_tile, w_ld, w, k_size, k0, k_size, w_vectorized, w_row);
    __syncthreads();
    accumulator.accumulate(a_tile, kLdA, kResident ? w_resident + k0 : w_tile, w_ld);
    __syncthreads();
  }
}

// Stages rows w_row(0 .. ROWS) of a (·, k_size) row-major matrix into shared memory for the whole kernel.
template <typename T, int ROWS, typename RowOf>
__device__ __forceinline__ void stage_resident(T* w_resident, int w_ld, const T* w, int k_size, RowOf w_row) {
  const bool vectorized = is_vectorizable<T>(w, k_size);
  for (int k0 = 0; k0 < round_up(k_size, kBlockK); k0 += kBlockK) {
    load_tile<T, ROWS, false>(w_resident + k0, w_ld, w, k_size, k0, k_size, vectorized, w_row);
  }
}

// The projection's tile: kProjectionColumns columns of r per CTA, K (= H) split across the warps when
// the batch tile is one fragment high so that all four warps have work.
constexpr int kProjectionColumns = 16;
template <int BM>
constexpr int kProjectionSplits = BM == 16 ? 4 : 1;
template <typename T, int BM>
using ProjectionShape = TileShape<T, BM, kProjectionColumns, kProjectionSplits<BM>>;
template <typename T, int BM>
using ProjectionAccumulator = TileAccumulator<T, BM, kProjectionColumns, kProjectionSplits<BM>>;

// r[b0.., p0..p0 + 16) = m · W_hr[p0.., :]ᵀ for one batch tile; rows past their end keep r_prev.
template <typename T, int BM, bool kResident>
__device__ __forceinline__ void projection_step(const ProjectionForwardParams& p, int b0, int p0, const T* w_resident,
                                                int w_ld, T* w_tile, T* a_tile, float* c_tile, int ring_slices = 0) {
  using Shape = ProjectionShape<T, BM>;
  using E = Element<T>;
  const int hidden = p.hidden, proj = p.proj_size;
  auto column_row = [&](int n) -> int64_t { return p0 + n < proj ? int64_t(p0 + n) : -1; };
  if (!tile_frozen<BM>(p.lengths, b0, p.batch, p.time)) {
    ProjectionAccumulator<T, BM> accumulator;
    accumulator.zero();
    accumulate_product<T, BM, kProjectionColumns, kProjectionSplits<BM>, kResident, kResident>(
        accumulator, static_cast<const T*>(p.m), hidden, b0, p.batch, w_resident, static_cast<const T*>(p.weight_hr),
        column_row, w_ld, w_tile, a_tile, ring_slices);
    accumulator.store(c_tile, Shape::kLdC);
    __syncthreads();
  }
  const T* r_prev = static_cast<const T*>(p.r_prev);
  T* r_out = static_cast<T*>(p.r_out);
  for (int index = threadIdx.x; index < BM * kProjectionColumns; index += kThreads) {
    const int m = index / kProjectionColumns, n = index % kProjectionColumns;
    const int b = b0 + m, column = p0 + n;
    if (b >= p.batch || column >= proj) continue;
    const int64_t state = int64_t(b) * proj + column;
    if (p.lengths && p.time >= p.lengths[b]) {  // frozen: r carries on (this CTA wrote it, or it is h0)
      r_out[state] = r_prev[state];
      continue;
    }
    float value = 0.f;
#pragma unroll
    for (int split = 0; split < Shape::kSplits; ++split) value += c_tile[(split * BM + m) * Shape::kLdC + n];
    r_out[state] = E::from_float(value);
  }
  __syncthreads();
}

// lstm_cell forward, and one step of a layer when it does not fit on chip.
// Grid: (ceil(H / BJ), ceil(batch / BM)); W rows are streamed through shared memory.
template <typename T, int BM, int BJ>
__global__ void __launch_bounds__(kThreads) lstm_step_forward_kernel(const StepForwardParams p) {
  constexpr int BN = 4 * BJ;
  using Shape = TileShape<T, BM, BN, 1>;
  extern __shared__ __align__(128) unsigned char shared[];
  const int w_ld = Shape::w_ld(0, false);
  T* w_tile = reinterpret_cast<T*>(shared);
  T* a_tile = reinterpret_cast<T*>(shared + Shape::w_bytes(0, false));
  float* c_tile = reinterpret_cast<float*>(shared + Shape::w_bytes(0, false) + Shape::kABytes);

  const int j0 = blockIdx.x * BJ, b0 = blockIdx.y * BM;
  auto gate_row = [&](int n) -> int64_t {
    const int j = j0 + n % BJ;
    return j < p.hidden ? int64_t(n / BJ) * p.hidden + j : -1;
  };

  if (!tile_frozen<BM>(p.lengths, b0, p.batch, p.time)) {
    TileAccumulator<T, BM, BN, 1> accumulator;
    accumulator.zero();
    for (int source = 0; source < 2; ++source) {
      const T* a = static_cast<const T*>(source == 0 ? p.a0 : p.a1);
      const T* w = static_cast<const T*>(source == 0 ? p.w0 : p.w1);
      const int k_size = source == 0 ? p.k0 : p.k1;
      if (a == nullptr) continue;
      accumulate_product<T, BM, BN, 1, false, false>(accumulator, a, k_size, b0, p.batch, nullptr, w, gate_row, w_ld,
                                                     w_tile, a_tile);
    }
    accumulator.store(c_tile, Shape::kLdC);
    __syncthreads();
  }

  ForwardStep<T> step;
  step.pre_gates = static_cast<const T*>(p.pre_gates);
  step.bias0 = static_cast<const T*>(p.bias0);
  step.bias1 = static_cast<const T*>(p.bias1);
  step.c_prev = static_cast<const T*>(p.c_prev);
  step.c_prev_f32 = p.c_prev_f32;
  step.h_out = static_cast<T*>(p.h_out);
  step.c_out = static_cast<T*>(p.c_out);
  step.c_out_f32 = p.c_out_f32;
  step.gates_out = static_cast<T*>(p.gates_out);
  step.m_out = static_cast<T*>(p.m_out);
  step.lengths = p.lengths;
  step.time = p.time;
  step.h_prev = static_cast<const T*>(p.h_prev);
  forward_epilogue<T, BM, BJ, Shape::kSplits>(c_tile, Shape::kLdC, b0, j0, p.batch, p.hidden, step);
}

// One step's projection r = m · W_hrᵀ when the layer runs stepwise. Grid: (ceil(P / 16), ceil(batch / BM)).
template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) lstm_projection_forward_kernel(const ProjectionForwardParams p) {
  using Shape = ProjectionShape<T, BM>;
  extern __shared__ __align__(128) unsigned char shared[];
  T* w_tile = reinterpret_cast<T*>(shared);
  T* a_tile = reinterpret_cast<T*>(shared + Shape::w_bytes(0, false));
  float* c_tile = reinterpret_cast<float*>(shared + Shape::w_bytes(0, false) + Shape::kABytes);
  projection_step<T, BM, false>(p, blockIdx.y * BM, blockIdx.x * kProjectionColumns, nullptr, Shape::w_ld(0, false),
                                w_tile, a_tile, c_tile);
}

// Shared memory of the persistent forward: W_hh's 4·BJ rows (K = W, the width of h), W_hr's 16 rows
// (K = H) with a projection, one C tile big enough for either product, then the ring of A slices
// (ring_slices of them: at least kPipelineStages, at most what the longer product's K needs).
template <typename T, int BM, int BJ, int SPLITS>
struct PersistentForwardLayout {
  using Gates = TileShape<T, BM, 4 * BJ, SPLITS>;
  using Projection = ProjectionShape<T, BM>;
  static constexpr size_t kCBytes = Gates::kCBytes > Projection::kCBytes ? Gates::kCBytes : Projection::kCBytes;
  __host__ __device__ static int width(int hidden, int proj) { return proj > 0 ? proj : hidden; }
  __host__ __device__ static size_t projection_bytes(int hidden, int proj) {
    return proj > 0 ? Projection::w_bytes(hidden, true) : 0;
  }
  __host__ __device__ static size_t fixed_bytes(int hidden, int proj) {
    return Gates::w_bytes(width(hidden, proj), true) + projection_bytes(hidden, proj) + kCBytes;
  }
  __host__ __device__ static int needed_slices(int hidden, int proj) {
    const int gates = ceil_div(width(hidden, proj), kBlockK), projection = proj > 0 ? ceil_div(hidden, kBlockK) : 0;
    return gates > projection ? gates : projection;
  }
  __host__ __device__ static size_t total_bytes(int hidden, int proj, int ring_slices = Gates::kStages) {
    return fixed_bytes(hidden, proj) + size_t(ring_slices) * Gates::kABytes;
  }
  // CTAs: BJ units each for the gates, 16 columns of r each for the projection.
  __host__ __device__ static int grid(int hidden, int proj) {
    const int gates = ceil_div(hidden, BJ), projection = ceil_div(proj, kProjectionColumns);
    return gates > projection ? gates : projection;
  }
};

// A layer's whole recurrence (minimum one CTA per SM in the launch bounds: without it ptxas aims at
// an occupancy these kernels never have and spills). CTA x owns hidden units [x·BJ, x·BJ + BJ) — their 4·BJ rows of W_hh stay
// in shared memory for all T steps — and computes them for every batch row; a grid-wide barrier
// per step publishes h_t (written into output[t]) before any CTA reads it. With a projection the
// epilogue publishes m_t instead; after a second barrier CTA x computes r_t's columns
// [16x, 16x + 16) from its resident rows of W_hr.
template <typename T, int BM, int BJ, int SPLITS>
__global__ void __launch_bounds__(kThreads, 1) lstm_persistent_forward_kernel(const LayerForwardParams p) {
  constexpr int BN = 4 * BJ;
  using Layout = PersistentForwardLayout<T, BM, BJ, SPLITS>;
  using Shape = typename Layout::Gates;
  extern __shared__ __align__(128) unsigned char shared[];
  const int hidden = p.hidden, batch = p.batch, proj = p.proj_size;
  const int width = Layout::width(hidden, proj);
  const int w_ld = Shape::w_ld(width, true), hr_ld = Layout::Projection::w_ld(hidden, true);
  const size_t w_bytes = Shape::w_bytes(width, true), hr_bytes = Layout::projection_bytes(hidden, proj);
  T* w_resident = reinterpret_cast<T*>(shared);
  T* hr_resident = reinterpret_cast<T*>(shared + w_bytes);
  float* c_tile = reinterpret_cast<float*>(shared + w_bytes + hr_bytes);
  T* a_tile = reinterpret_cast<T*>(shared + w_bytes + hr_bytes + Layout::kCBytes);

  const int j0 = blockIdx.x * BJ, p0 = blockIdx.x * kProjectionColumns;
  const bool owns_units = j0 < hidden, owns_columns = proj > 0 && p0 < proj;
  auto gate_row = [&](int n) -> int64_t {
    const int j = j0 + n % BJ;
    return j < hidden ? int64_t(n / BJ) * hidden + j : -1;
  };
  if (owns_units) stage_resident<T, BN>(w_resident, w_ld, static_cast<const T*>(p.weight_hh), width, gate_row);
  if (owns_columns) {
    auto column_row = [&](int n) -> int64_t { return p0 + n < proj ? int64_t(p0 + n) : -1; };
    stage_resident<T, kProjectionColumns>(hr_resident, hr_ld, static_cast<const T*>(p.weight_hr), hidden, column_row);
  }
  __syncthreads();

  const T* h0 = static_cast<const T*>(p.h0);
  T* output = static_cast<T*>(p.output);
  T* gates = static_cast<T*>(p.gates);
  const T* input_projection = static_cast<const T*>(p.input_projection);
  const int64_t state_size = int64_t(batch) * hidden, h_size = int64_t(batch) * width;
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  auto step_time = [&](int s) { return p.reverse ? p.steps - 1 - s : s; };

  // One batch tile (batch <= BM, the latency-bound case): each thread's pre-gates and c live in
  // registers; the next step's pre-gates are loaded before the barrier that precedes it.
  const bool one_tile = batch <= BM;
  EpilogueOperands<BM, BJ> operands;
  if (one_tile && owns_units) {
    prefetch_pre_gates<T, BM, BJ>(operands, input_projection + step_time(0) * 4 * state_size, 0, j0, batch, hidden);
#pragma unroll
    for (int i = 0; i < EpilogueOperands<BM, BJ>::kPerThread; ++i) {
      const int index = threadIdx.x + i * kThreads;
      const int b = index / BJ, j = j0 + index % BJ;
      operands.c[i] = index < BM * BJ && b < batch && j < hidden
                          ? Element<T>::to_float(static_cast<const T*>(p.c0)[int64_t(b) * hidden + j])
                          : 0.f;
    }
  }

  for (int s = 0; s < p.steps; ++s) {
    const int t = p.reverse ? p.steps - 1 - s : s;
    const int t_prev = p.reverse ? t + 1 : t - 1;
    const T* h_prev = s == 0 ? h0 : output + t_prev * h_size;
    if (owns_units) {
      ForwardStep<T> step;
      step.pre_gates = input_projection + t * 4 * state_size;
      step.bias0 = nullptr;
      step.bias1 = nullptr;
      step.c_prev = s == 0 ? static_cast<const T*>(p.c0) : nullptr;
      step.c_prev_f32 = s == 0 ? nullptr : p.cell_states + (p.save_all_cell_states ? t_prev * state_size : 0);
      step.h_out = output + t * h_size;
      step.c_out = nullptr;
      step.c_out_f32 = p.cell_states + (p.save_all_cell_states ? t * state_size : 0);
      step.gates_out = gates ? gates + t * 4 * state_size : nullptr;
      step.m_out = proj > 0 ? static_cast<T*>(p.m_scratch) : nullptr;
      step.lengths = p.lengths;
      step.time = t;
      step.h_prev = h_prev;

      for (int b0 = 0; b0 < batch; b0 += BM) {
        if (!tile_frozen<BM>(p.lengths, b0, batch, t)) {
          TileAccumulator<T, BM, BN, SPLITS> accumulator;
          accumulator.zero();
          accumulate_product<T, BM, BN, SPLITS, true, true>(accumulator, h_prev, width, b0, batch, w_resident,
                                                            nullptr, gate_row, w_ld, nullptr, a_tile, p.ring_slices);
          accumulator.store(c_tile, Shape::kLdC);
          __syncthreads();
        }
        if (one_tile) {
          forward_epilogue<T, BM, BJ, Shape::kSplits, true>(c_tile, Shape::kLdC, b0, j0, batch, hidden, step,
                                                            &operands);
        } else {
          forward_epilogue<T, BM, BJ, Shape::kSplits>(c_tile, Shape::kLdC, b0, j0, batch, hidden, step);
        }
        __syncthreads();
      }
      if (one_tile && s + 1 < p.steps) {
        prefetch_pre_gates<T, BM, BJ>(operands, input_projection + step_time(s + 1) * 4 * state_size, 0, j0, batch,
                                      hidden);
      }
    }
    if (proj > 0) {
      grid.sync();  // every CTA's units of m_t are out
      if (owns_columns) {
        ProjectionForwardParams projection{};
        projection.m = p.m_scratch;
        projection.weight_hr = p.weight_hr;
        projection.r_prev = h_prev;
        projection.r_out = output + t * h_size;
        projection.lengths = p.lengths;
        projection.time = t;
        projection.batch = batch;
        projection.hidden = hidden;
        projection.proj_size = proj;
        for (int b0 = 0; b0 < batch; b0 += BM) {
          projection_step<T, BM, true>(projection, b0, p0, hr_resident, hr_ld, nullptr, a_tile, c_tile,
                                       p.ring_slices);
        }
      }
    }
    if (s + 1 < p.steps) grid.sync();
  }
}

// Row b's last valid forward step, where grad_h_n enters: T-1 (or 0 reversed) unless ragged.
__device__ __forceinline__ int last_valid_step(const LayerBackwardParams& p, int b) {
  if (p.reverse || !p.lengths) return p.reverse ? 0 : p.steps - 1;
  const int64_t length = p.lengths[b];
  return static_cast<int>(length < p.steps ? length : p.steps) - 1;
}

// With a projection, backward step s's first half for batch rows [b0, b0 + BM) × columns [p0, p0 + BJ)
// of r: dr_t = dgates_{t_next} · W_hh[:, columns] + grad_output[t] (+ grad_h_n at the row's last
// valid step), stored into grad_recurrent[t] (zero on frozen steps). The W slice is W_hhᵀ's rows
// for the columns: resident (persistent kernel) or streamed (one launch per step).
template <typename T, int BM, int BJ, int SPLITS, bool kResident>
__device__ __forceinline__ void backward_recurrent_step(const LayerBackwardParams& p, int s, int b0, int p0,
                                                        const T* w_resident, T* w_tile, int w_ld, T* a_tile,
                                                        float* c_tile) {
  using Shape = TileShape<T, BM, BJ, SPLITS>;
  using E = Element<T>;
  const int hidden = p.hidden, batch = p.batch, proj = p.proj_size, gates_width = 4 * hidden;
  const int64_t state_size = int64_t(batch) * hidden, r_size = int64_t(batch) * proj;
  const int t = p.reverse ? s : p.steps - 1 - s;
  const int t_next = p.reverse ? t - 1 : t + 1;
  const T* grad_gates = static_cast<const T*>(p.grad_gates);
  if (!tile_frozen<BM>(p.lengths, b0, batch, t)) {
    TileAccumulator<T, BM, BJ, SPLITS> accumulator;
    accumulator.zero();
    if (s != 0) {
      auto column_row = [&](int n) -> int64_t { return p0 + n < proj ? int64_t(p0 + n) : -1; };
      accumulate_product<T, BM, BJ, SPLITS, kResident, kResident>(
          accumulator, grad_gates + t_next * 4 * state_size, gates_width, b0, batch, w_resident,
          static_cast<const T*>(p.weight_hh_t), column_row, w_ld, w_tile, a_tile, p.ring_slices);
    }
    accumulator.store(c_tile, Shape::kLdC);
    __syncthreads();
  }
  const T* grad_output = static_cast<const T*>(p.grad_output) + t * r_size;
  T* grad_recurrent = static_cast<T*>(p.grad_recurrent) + t * r_size;
  for (int index = threadIdx.x; index < BM * BJ; index += kThreads) {
    const int m = index / BJ, n = index % BJ;
    const int b = b0 + m, column = p0 + n;
    if (b >= batch || column >= proj) continue;
    const int64_t state = int64_t(b) * proj + column;
    if (p.lengths && t >= p.lengths[b]) {  // frozen: r had no effect here
      grad_recurrent[state] = E::from_float(0.f);
      continue;
    }
    float dr = E::to_float(grad_output[state]);
#pragma unroll
    for (int split = 0; split < Shape::kSplits; ++split) dr += c_tile[(split * BM + m) * Shape::kLdC + n];
    if (t == last_valid_step(p, b)) dr += E::to_float(static_cast<const T*>(p.grad_h_n)[state]);
    grad_recurrent[state] = E::from_float(dr);
  }
  __syncthreads();
}

// One backward step s of a layer for batch rows [b0, b0 + BM) × hidden units [j0, j0 + BJ), then the
// gate gradients. Without a projection dh_t = dgates_{t_next} · W_hh[:, units] + grad_output[t]
// (+ grad_h_n at the row's last valid step), the W slice being W_hhᵀ's rows for the units; with one
// dh_t = dm_t = dr_t · W_hr[:, units] (dr_t from backward_recurrent_step), the W slice W_hrᵀ's rows.
// The slice is resident in shared memory (persistent kernel) or streamed (one launch per step).
template <typename T, int BM, int BJ, int SPLITS, bool kResident>
__device__ __forceinline__ void backward_step(const LayerBackwardParams& p, int s, int b0, int j0, const T* w_resident,
                                              T* w_tile, int w_ld, T* a_tile, float* c_tile) {
  using Shape = TileShape<T, BM, BJ, SPLITS>;
  using E = Element<T>;
  const int hidden = p.hidden, batch = p.batch, proj = p.proj_size, gates_width = 4 * hidden;
  const int64_t state_size = int64_t(batch) * hidden;
  const int t = p.reverse ? s : p.steps - 1 - s;
  const int t_next = p.reverse ? t - 1 : t + 1;  // the forward step after t, processed just before
  const int t_prev = p.reverse ? t + 1 : t - 1;
  const bool first = s == 0, forward_first = s == p.steps - 1;
  T* grad_gates = static_cast<T*>(p.grad_gates);

  auto unit_row = [&](int n) -> int64_t { return j0 + n < hidden ? int64_t(j0 + n) : -1; };
  if (!tile_frozen<BM>(p.lengths, b0, batch, t)) {
    TileAccumulator<T, BM, BJ, SPLITS> accumulator;
    accumulator.zero();
    if (proj > 0) {
      accumulate_product<T, BM, BJ, SPLITS, kResident, kResident>(
          accumulator, static_cast<const T*>(p.grad_recurrent) + t * int64_t(batch) * proj, proj, b0, batch,
          w_resident, static_cast<const T*>(p.weight_hr_t), unit_row, w_ld, w_tile, a_tile, p.ring_slices);
    } else if (!first) {
      accumulate_product<T, BM, BJ, SPLITS, kResident, kResident>(
          accumulator, grad_gates + t_next * 4 * state_size, gates_width, b0, batch, w_resident,
          static_cast<const T*>(p.weight_hh_t), unit_row, w_ld, w_tile, a_tile, p.ring_slices);
    }
    accumulator.store(c_tile, Shape::kLdC);
    __syncthreads();
  }

  const T* grad_output = static_cast<const T*>(p.grad_output) + t * state_size;
  const T* gates = static_cast<const T*>(p.gates) + t * 4 * state_size;
  const float* c_cur = p.cell_states + t * state_size;
  for (int index = threadIdx.x; index < BM * BJ; index += kThreads) {
    const int m = index / BJ, jj = index % BJ;
    const int b = b0 + m, j = j0 + jj;
    if (b >= batch || j >= hidden) continue;
    const int64_t state = int64_t(b) * hidden + j;
    const int64_t gate_row = int64_t(b) * gates_width;
    const float dc = first ? E::to_float(static_cast<const T*>(p.grad_c_n)[state]) : p.grad_cell[state];
    T* out = grad_gates + t * 4 * state_size + gate_row;
    if (p.lengths && t >= p.lengths[b]) {  // a frozen step: dc passes through, the gates had no effect
      p.grad_cell[state] = dc;
#pragma unroll
      for (int gate = 0; gate < 4; ++gate) out[gate * hidden + j] = E::from_float(0.f);
      continue;
    }
    float dh = 0.f;
#pragma unroll
    for (int split = 0; split < Shape::kSplits; ++split) dh += c_tile[(split * BM + m) * Shape::kLdC + jj];
    if (proj == 0) {
      dh += E::to_float(grad_output[state]);
      if (t == last_valid_step(p, b)) dh += E::to_float(static_cast<const T*>(p.grad_h_n)[state]);
    }
    const float c_prev = forward_first ? E::to_float(static_cast<const T*>(p.c0)[state])
                                       : p.cell_states[t_prev * state_size + state];
    float grads[4];
    p.grad_cell[state] = gate_gradients(dh, dc, E::to_float(gates[gate_row + j]),
                                        E::to_float(gates[gate_row + hidden + j]),
                                        E::to_float(gates[gate_row + 2 * hidden + j]),
                                        E::to_float(gates[gate_row + 3 * hidden + j]), c_prev, c_cur[state], grads);
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) out[gate * hidden + j] = E::from_float(grads[gate]);
  }
}

// Backward through time, one launch per step. Grid: (ceil(H / BJ), ceil(batch / BM)).
template <typename T, int BM, int BJ, int SPLITS>
__global__ void __launch_bounds__(kThreads) lstm_step_backward_kernel(const LayerBackwardParams p, int s) {
  using Shape = TileShape<T, BM, BJ, SPLITS>;
  extern __shared__ __align__(128) unsigned char shared[];
  T* w_tile = reinterpret_cast<T*>(shared);
  T* a_tile = reinterpret_cast<T*>(shared + Shape::w_bytes(0, false));
  float* c_tile = reinterpret_cast<float*>(shared + Shape::w_bytes(0, false) + Shape::kABytes);
  backward_step<T, BM, BJ, SPLITS, false>(p, s, blockIdx.y * BM, blockIdx.x * BJ, nullptr, w_tile,
                                          Shape::w_ld(0, false), a_tile, c_tile);
}

// With a projection, the dr half of a backward step, one launch per step. Grid: (ceil(P / BJ), ceil(batch / BM)).
template <typename T, int BM, int BJ, int SPLITS>
__global__ void __launch_bounds__(kThreads) lstm_step_recurrent_backward_kernel(const LayerBackwardParams p, int s) {
  using Shape = TileShape<T, BM, BJ, SPLITS>;
  extern __shared__ __align__(128) unsigned char shared[];
  T* w_tile = reinterpret_cast<T*>(shared);
  T* a_tile = reinterpret_cast<T*>(shared + Shape::w_bytes(0, false));
  float* c_tile = reinterpret_cast<float*>(shared + Shape::w_bytes(0, false) + Shape::kABytes);
  backward_recurrent_step<T, BM, BJ, SPLITS, false>(p, s, blockIdx.y * BM, blockIdx.x * BJ, nullptr, w_tile,
                                                    Shape::w_ld(0, false), a_tile, c_tile);
}

// Shared memory of the persistent backward: W_hhᵀ's BJ rows (K = 4H) for the dh (or dr) product,
// W_hrᵀ's BJ rows (K = P) with a projection, the C tile, then the ring of A slices (as forward's).
template <typename T, int BM, int BJ, int SPLITS>
struct PersistentBackwardLayout {
  using Shape = TileShape<T, BM, BJ, SPLITS>;
  __host__ __device__ static size_t projection_bytes(int proj) { return proj > 0 ? Shape::w_bytes(proj, true) : 0; }
  __host__ __device__ static size_t fixed_bytes(int hidden, int proj) {
    return Shape::w_bytes(4 * hidden, true) + projection_bytes(proj) + Shape::kCBytes;
  }
  __host__ __device__ static int needed_slices(int hidden, int proj) {
    const int gates = ceil_div(4 * hidden, kBlockK), projection = ceil_div(proj, kBlockK);
    return gates > projection ? gates : projection;
  }
  __host__ __device__ static size_t total_bytes(int hidden, int proj, int ring_slices = Shape::kStages) {
    return fixed_bytes(hidden, proj) + size_t(ring_slices) * Shape::kABytes;
  }
  __host__ __device__ static int grid(int hidden, int proj) { return ceil_div(hidden > proj ? hidden : proj, BJ); }
};

// Backward through time in one persistent kernel: CTA x keeps W_hhᵀ rows [x·BJ, x·BJ + BJ) (all 4H
// columns) on chip; a grid-wide barrier per step publishes dgates_t before any CTA reads it. With a
// projection those rows are r's columns (dr), CTA x also keeps W_hrᵀ rows [x·BJ, x·BJ + BJ) (all P
// columns) for its hidden units, and a second barrier per step publishes dr_t before dm_t is formed.
template <typename T, int BM, int BJ, int SPLITS>
__global__ void __launch_bounds__(kThreads, 1) lstm_persistent_backward_kernel(const LayerBackwardParams p) {
  using Layout = PersistentBackwardLayout<T, BM, BJ, SPLITS>;
  using Shape = typename Layout::Shape;
  extern __shared__ __align__(128) unsigned char shared[];
  const int hidden = p.hidden, proj = p.proj_size, gates_width = 4 * hidden;
  const int w_ld = Shape::w_ld(gates_width, true), hr_ld = Shape::w_ld(proj, true);
  const size_t w_bytes = Shape::w_bytes(gates_width, true), hr_bytes = Layout::projection_bytes(proj);
  T* w_resident = reinterpret_cast<T*>(shared);
  T* hr_resident = reinterpret_cast<T*>(shared + w_bytes);
  float* c_tile = reinterpret_cast<float*>(shared + w_bytes + hr_bytes);
  T* a_tile = reinterpret_cast<T*>(shared + w_bytes + hr_bytes + Shape::kCBytes);

  const int j0 = blockIdx.x * BJ;
  const int w_rows = proj > 0 ? proj : hidden;  // rows of W_hhᵀ
  const bool owns_rows = j0 < w_rows, owns_units = j0 < hidden;
  auto w_row = [&](int n) -> int64_t { return j0 + n < w_rows ? int64_t(j0 + n) : -1; };
  if (owns_rows) stage_resident<T, BJ>(w_resident, w_ld, static_cast<const T*>(p.weight_hh_t), gates_width, w_row);
  if (proj > 0 && owns_units) {
    auto unit_row = [&](int n) -> int64_t { return j0 + n < hidden ? int64_t(j0 + n) : -1; };
    stage_resident<T, BJ>(hr_resident, hr_ld, static_cast<const T*>(p.weight_hr_t), proj, unit_row);
  }
  __syncthreads();

  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int s = 0; s < p.steps; ++s) {
    if (proj > 0) {
      if (owns_rows) {
        for (int b0 = 0; b0 < p.batch; b0 += BM) {
          backward_recurrent_step<T, BM, BJ, SPLITS, true>(p, s, b0, j0, w_resident, nullptr, w_ld, a_tile, c_tile);
        }
      }
      grid.sync();  // every CTA's columns of dr_t are out
    }
    if (owns_units) {
      for (int b0 = 0; b0 < p.batch; b0 += BM) {
        backward_step<T, BM, BJ, SPLITS, true>(p, s, b0, j0, proj > 0 ? hr_resident : w_resident, nullptr,
                                               proj > 0 ? hr_ld : w_ld, a_tile, c_tile);
        __syncthreads();
      }
    }
    if (s + 1 < p.steps) grid.sync();
  }
}

// lstm_cell backward: the pointwise gate gradients, one thread per (batch row, hidden unit).
template <typename T>
__global__ void __launch_bounds__(256) lstm_cell_backward_kernel(const CellBackwardParams p) {
  using E = Element<T>;
  const T* grad_hy = static_cast<const T*>(p.grad_hy);
  const T* grad_cy = static_cast<const T*>(p.grad_cy);
  const T* gates = static_cast<const T*>(p.gates);
  const T* cx = static_cast<const T*>(p.cx);
  const T* cy = static_cast<const T*>(p.cy);
  T* grad_gates = static_cast<T*>(p.grad_gates);
  T* grad_cx = static_cast<T*>(p.grad_cx);
  const int hidden = p.hidden;
  const int64_t total = int64_t(p.batch) * hidden;
  for (int64_t index = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = index / hidden, j = index % hidden;
    const T* gate_row = gates + b * 4 * hidden;
    float grads[4];
    const float grad_c_prev =
        gate_gradients(E::to_float(grad_hy[index]), E::to_float(grad_cy[index]), E::to_float(gate_row[j]),
                       E::to_float(gate_row[hidden + j]), E::to_float(gate_row[2 * hidden + j]),
                       E::to_float(gate_row[3 * hidden + j]), E::to_float(cx[index]), E::to_float(cy[index]), grads);
    grad_cx[index] = E::from_float(grad_c_prev);
    T* out = grad_gates + b * 4 * hidden;
#pragma unroll
    for (int gate = 0; gate < 4; ++gate) out[gate * hidden + j] = E::from_float(grads[gate]);
  }
}

// Tile choices, shared by the launchers and the CPU emulation: a batch of at most 16 rows takes
// BM = 16 (with K split across warps so all four stay busy); larger batches take BM = 64 and loop
// over batch chunks. Persistent forward: 8 units per CTA (H = 1024 spreads over 128 CTAs, one per SM
// on an H100); backward: 16 (W_hhᵀ rows are 4H long, so a CTA holds as many bytes as forward's 8).
constexpr int kPersistentForwardUnits = 8;
constexpr int kBackwardUnits = 16;
template <int BM>
constexpr int kPersistentForwardSplits = BM == 16 ? 4 : 1;
template <int BM>
constexpr int kBackwardSplits = BM == 16 ? 4 : 1;

// The ring a persistent CTA gets (shared by the launchers and the CPU emulation): the least ring, grown
// into the shared memory left after `fixed_bytes` (resident weights and C tile) when ⌈grid / SMs⌉ CTAs
// share an SM — each gets its share of the SM less the driver's reservation per block, at most the
// per-block limit — up to the `needed_slices` of the longest product (then every product is one pass).
struct SharedMemoryFigures {
  size_t per_block_limit;          // cudaDevAttrMaxSharedMemoryPerBlockOptin
  size_t per_multiprocessor;       // cudaDevAttrMaxSharedMemoryPerMultiprocessor
  size_t reserved_per_block;       // cudaDevAttrReservedSharedMemoryPerBlock
  int multiprocessors;
};
// An H100 SXM's figures: the CPU emulation sizes its rings as the launchers would there.
constexpr SharedMemoryFigures kH100SharedMemory{232448, 233472, 1024, 132};
__host__ __device__ inline int grown_ring_slices(const SharedMemoryFigures& device, int grid, size_t fixed_bytes,
                                                 size_t slice_bytes, int least_slices, int needed_slices) {
  if (grid <= 0 || device.multiprocessors <= 0 || needed_slices <= least_slices) return least_slices;
  const size_t sharing = static_cast<size_t>(ceil_div(grid, device.multiprocessors));
  size_t budget = device.per_multiprocessor / sharing;
  budget = budget > device.reserved_per_block ? budget - device.reserved_per_block : 0;
  if (budget > device.per_block_limit) budget = device.per_block_limit;
  if (budget <= fixed_bytes) return least_slices;
  const size_t slices = (budget - fixed_bytes) / slice_bytes;
  if (slices <= static_cast<size_t>(least_slices)) return least_slices;
  return slices < static_cast<size_t>(needed_slices) ? static_cast<int>(slices) : needed_slices;
}

// ---------------------------------------------------------------------------------------------
// Launchers.

template <typename Kernel>
cudaError_t set_shared_memory(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// The device's figures and `kernel`'s occupancy for residency.grid CTAs of `fixed_bytes` plus the least ring
// each (what a cooperative launch needs: every CTA resident at once, so the least ring decides whether the
// kernel fits); where it fits, the ring grows into what is left (grown_ring_slices) unless that would cost
// residency.
template <typename Kernel>
cudaError_t measure_residency(Kernel kernel, size_t fixed_bytes, size_t slice_bytes, int least_slices,
                              int needed_slices, PersistentResidency& residency) {
  residency.threads = kThreads;
  residency.ring_slices = least_slices;
  residency.shared_bytes = fixed_bytes + size_t(least_slices) * slice_bytes;
  int device = 0, cooperative = 0, per_multiprocessor = 0, reserved = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&residency.multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&residency.shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error == cudaSuccess)
    error = cudaDeviceGetAttribute(&per_multiprocessor, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
  residency.cooperative = cooperative != 0;
  cudaFuncAttributes attributes{};
  if (error == cudaSuccess) error = cudaFuncGetAttributes(&attributes, kernel);
  residency.registers = attributes.numRegs;
  if (error != cudaSuccess || !residency.cooperative ||
      residency.shared_bytes > static_cast<size_t>(residency.shared_limit))
    return error;
  // The occupancy API counts dynamic shared memory only up to the kernel's opt-in attribute.
  error = set_shared_memory(kernel, residency.shared_bytes);
  if (error == cudaSuccess)
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&residency.per_multiprocessor, kernel, residency.threads,
                                                          residency.shared_bytes);
  if (error != cudaSuccess || !residency.fits()) return error;
  const SharedMemoryFigures figures{static_cast<size_t>(residency.shared_limit), static_cast<size_t>(per_multiprocessor),
                                    static_cast<size_t>(reserved), residency.multiprocessors};
  const int ring_slices =
      grown_ring_slices(figures, residency.grid, fixed_bytes, slice_bytes, least_slices, needed_slices);
  if (ring_slices == least_slices) return cudaSuccess;
  const size_t grown_bytes = fixed_bytes + size_t(ring_slices) * slice_bytes;
  int grown_per_multiprocessor = 0;
  error = set_shared_memory(kernel, grown_bytes);
  if (error == cudaSuccess)
    error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&grown_per_multiprocessor, kernel, residency.threads,
                                                          grown_bytes);
  if (error == cudaSuccess && grown_per_multiprocessor * residency.multiprocessors >= residency.grid) {
    residency.ring_slices = ring_slices;
    residency.shared_bytes = grown_bytes;
    residency.per_multiprocessor = grown_per_multiprocessor;
    return cudaSuccess;
  }
  // The least ring fits: a grown one that does not (or could not be asked about) leaves it as it was, and a
  // failed call's error is cleared here rather than reported by a later launch's cudaGetLastError.
  if (error != cudaSuccess) (void)cudaGetLastError();
  return set_shared_memory(kernel, residency.shared_bytes);
}

// A persistent kernel's cooperative launch over residency.grid CTAs, after its residency was measured (with
// `measured`, that measurement's error): `fits` is false, and nothing launched, when the grid cannot be
// co-resident; the caller then runs the per-step kernels or raises.
template <typename Kernel, typename Params>
cudaError_t launch_cooperative(Kernel kernel, const Params& p, const PersistentResidency& residency,
                               cudaError_t measured, cudaStream_t stream, bool& fits) {
  fits = measured == cudaSuccess && residency.fits();
  if (!fits) return measured;
  Params params = p;
  params.ring_slices = residency.ring_slices;
  void* arguments[] = {&params};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(residency.grid), dim3(kThreads),
                                     arguments, residency.shared_bytes, stream);
}

template <typename T, int BM, int BJ>
cudaError_t launch_step_forward_tiles(const StepForwardParams& p, cudaStream_t stream) {
  const size_t shared_bytes = TileShape<T, BM, 4 * BJ, 1>::total_bytes(0, false);
  auto kernel = lstm_step_forward_kernel<T, BM, BJ>;
  cudaError_t error = set_shared_memory(kernel, shared_bytes);
  if (error != cudaSuccess) return error;
  kernel<<<dim3(ceil_div(p.hidden, BJ), ceil_div(p.batch, BM)), kThreads, shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_step_forward(const StepForwardParams& p, cudaStream_t stream) {
  return p.batch <= 16 ? launch_step_forward_tiles<T, 16, 16>(p, stream) : launch_step_forward_tiles<T, 64, 16>(p, stream);
}

template <typename T, int BM>
cudaError_t launch_projection_forward_tiles(const ProjectionForwardParams& p, cudaStream_t stream) {
  const size_t shared_bytes = ProjectionShape<T, BM>::total_bytes(0, false);
  auto kernel = lstm_projection_forward_kernel<T, BM>;
  cudaError_t error = set_shared_memory(kernel, shared_bytes);
  if (error != cudaSuccess) return error;
  kernel<<<dim3(ceil_div(p.proj_size, kProjectionColumns), ceil_div(p.batch, BM)), kThreads, shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_projection_forward(const ProjectionForwardParams& p, cudaStream_t stream) {
  return p.batch <= 16 ? launch_projection_forward_tiles<T, 16>(p, stream)
                       : launch_projection_forward_tiles<T, 64>(p, stream);
}

template <typename T, int BM>
cudaError_t persistent_forward_residency_tiles(int hidden, int proj_size, PersistentResidency& residency) {
  constexpr int BJ = kPersistentForwardUnits, SPLITS = kPersistentForwardSplits<BM>;
  using Layout = PersistentForwardLayout<T, BM, BJ, SPLITS>;
  residency.grid = Layout::grid(hidden, proj_size);
  return measure_residency(lstm_persistent_forward_kernel<T, BM, BJ, SPLITS>, Layout::fixed_bytes(hidden, proj_size),
                           Layout::Gates::kABytes, Layout::Gates::kStages, Layout::needed_slices(hidden, proj_size),
                           residency);
}

template <typename T>
cudaError_t persistent_forward_residency(int batch, int hidden, int proj_size, PersistentResidency& residency) {
  return batch <= 16 ? persistent_forward_residency_tiles<T, 16>(hidden, proj_size, residency)
                     : persistent_forward_residency_tiles<T, 64>(hidden, proj_size, residency);
}

template <typename T, int BM>
cudaError_t launch_persistent_forward_tiles(const LayerForwardParams& p, cudaStream_t stream, bool& fits) {
  PersistentResidency residency;
  cudaError_t error = persistent_forward_residency_tiles<T, BM>(p.hidden, p.proj_size, residency);
  auto kernel = lstm_persistent_forward_kernel<T, BM, kPersistentForwardUnits, kPersistentForwardSplits<BM>>;
  return launch_cooperative(kernel, p, residency, error, stream, fits);
}

template <typename T>
cudaError_t launch_persistent_forward(const LayerForwardParams& p, cudaStream_t stream, bool& fits) {
  return p.batch <= 16 ? launch_persistent_forward_tiles<T, 16>(p, stream, fits)
                       : launch_persistent_forward_tiles<T, 64>(p, stream, fits);
}

template <typename T, int BM>
cudaError_t launch_step_backward_tiles(const LayerBackwardParams& p, int s, cudaStream_t stream) {
  constexpr int BJ = kBackwardUnits, SPLITS = kBackwardSplits<BM>;
  const size_t shared_bytes = TileShape<T, BM, BJ, SPLITS>::total_bytes(0, false);
  const int batch_tiles = ceil_div(p.batch, BM);
  cudaError_t error = cudaSuccess;
  if (p.proj_size > 0) {
    auto recurrent = lstm_step_recurrent_backward_kernel<T, BM, BJ, SPLITS>;
    error = set_shared_memory(recurrent, shared_bytes);
    if (error != cudaSuccess) return error;
    recurrent<<<dim3(ceil_div(p.proj_size, BJ), batch_tiles), kThreads, shared_bytes, stream>>>(p, s);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  auto kernel = lstm_step_backward_kernel<T, BM, BJ, SPLITS>;
  error = set_shared_memory(kernel, shared_bytes);
  if (error != cudaSuccess) return error;
  kernel<<<dim3(ceil_div(p.hidden, BJ), batch_tiles), kThreads, shared_bytes, stream>>>(p, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_step_backward(const LayerBackwardParams& p, int s, cudaStream_t stream) {
  return p.batch <= 16 ? launch_step_backward_tiles<T, 16>(p, s, stream) : launch_step_backward_tiles<T, 64>(p, s, stream);
}

template <typename T, int BM>
cudaError_t persistent_backward_residency_tiles(int hidden, int proj_size, PersistentResidency& residency) {
  constexpr int BJ = kBackwardUnits, SPLITS = kBackwardSplits<BM>;
  using Layout = PersistentBackwardLayout<T, BM, BJ, SPLITS>;
  residency.grid = Layout::grid(hidden, proj_size);
  return measure_residency(lstm_persistent_backward_kernel<T, BM, BJ, SPLITS>, Layout::fixed_bytes(hidden, proj_size),
                           Layout::Shape::kABytes, Layout::Shape::kStages, Layout::needed_slices(hidden, proj_size),
                           residency);
}

template <typename T>
cudaError_t persistent_backward_residency(int batch, int hidden, int proj_size, PersistentResidency& residency) {
  return batch <= 16 ? persistent_backward_residency_tiles<T, 16>(hidden, proj_size, residency)
                     : persistent_backward_residency_tiles<T, 64>(hidden, proj_size, residency);
}

template <typename T, int BM>
cudaError_t launch_persistent_backward_tiles(const LayerBackwardParams& p, cudaStream_t stream, bool& fits) {
  PersistentResidency residency;
  cudaError_t error = persistent_backward_residency_tiles<T, BM>(p.hidden, p.proj_size, residency);
  auto kernel = lstm_persistent_backward_kernel<T, BM, kBackwardUnits, kBackwardSplits<BM>>;
  return launch_cooperative(kernel, p, residency, error, stream, fits);
}

template <typename T>
cudaError_t launch_persistent_backward(const LayerBackwardParams& p, cudaStream_t stream, bool& fits) {
  return p.batch <= 16 ? launch_persistent_backward_tiles<T, 16>(p, stream, fits)
                       : launch_persistent_backward_tiles<T, 64>(p, stream, fits);
}

template <typename T>
cudaError_t launch_cell_backward(const CellBackwardParams& p, cudaStream_t stream) {
  constexpr int kCellThreads = 256;
  const int64_t total = int64_t(p.batch) * p.hidden;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kCellThreads - 1) / kCellThreads, 65536));
  lstm_cell_backward_kernel<T><<<blocks, kCellThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pyattn::lstm
