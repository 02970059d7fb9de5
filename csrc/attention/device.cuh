// The device primitives the attention kernels are written against, and the only code that differs
// between the GPU build (nvcc: PTX) and the CPU emulation (g++ -DPYATTN_EMULATION: emulation/include/
// emu_warp.h, which keeps every lane's registers with the PTX ISA's fragment layouts).
//
// Everything a kernel does to shared memory goes through these (cp.async, ldmatrix, st/ld.shared on
// 32-bit shared addresses), and so does every warp-collective operation (mma.sync, ldmatrix,
// shfl.sync) and barrier, so that the emulator sees each one. What the kernels compute around them
// (fragment index arithmetic, swizzles, masks, the online softmax) is the same source on both sides.
// Operand marshalling (which register goes where) is done here in shared code, before the one-line
// #if, so that it is checked by the emulation too.
#pragma once

#include <cstdint>

#include "attention/attention_params.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PYATTN_DEVICE __device__ __forceinline__
#define PYATTN_GLOBAL __global__
#define PYATTN_LAUNCH_BOUNDS(threads, blocks) __launch_bounds__(threads, blocks)
#elif defined(PYATTN_EMULATION)
#include "emu_warp.h"
#define PYATTN_DEVICE inline
#define PYATTN_GLOBAL
#define PYATTN_LAUNCH_BOUNDS(threads, blocks)
#else
#error "device.cuh is compiled by nvcc, or by a host compiler with -DPYATTN_EMULATION (the CPU emulation)"
#endif

namespace pyattn::attention {

constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------- thread geometry

#if defined(__CUDACC__)
PYATTN_DEVICE int thread_index() { return static_cast<int>(threadIdx.x); }
PYATTN_DEVICE int block_index_x() { return static_cast<int>(blockIdx.x); }
PYATTN_DEVICE int block_index_y() { return static_cast<int>(blockIdx.y); }
PYATTN_DEVICE int block_index_z() { return static_cast<int>(blockIdx.z); }
// The 32-bit shared-window address of the dynamic shared memory (what cp.async and ldmatrix take).
PYATTN_DEVICE uint32_t shared_base() {
  extern __shared__ __align__(128) unsigned char pyattn_dynamic_shared[];
  return static_cast<uint32_t>(__cvta_generic_to_shared(pyattn_dynamic_shared));
}
#else
inline int thread_index() { return emu::thread_index(); }
inline int block_index_x() { return emu::block_index(0); }
inline int block_index_y() { return emu::block_index(1); }
inline int block_index_z() { return emu::block_index(2); }
inline uint32_t shared_base() { return emu::shared_base(); }
#endif

// ------------------------------------------------------------------------------------ conversions

PYATTN_DEVICE uint32_t pack_pair(Fp16, float lo, float hi) {
#if defined(__CUDACC__)
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
#else
  return emu::pack_half2(lo, hi);
#endif
}
PYATTN_DEVICE uint32_t pack_pair(Bf16, float lo, float hi) {
#if defined(__CUDACC__)
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
#else
  return emu::pack_bfloat162(lo, hi);
#endif
}
PYATTN_DEVICE float to_float(Fp16, uint16_t bits) {
#if defined(__CUDACC__)
  return __half2float(__ushort_as_half(bits));
#else
  return emu::half_to_float(bits);
#endif
}
PYATTN_DEVICE float to_float(Bf16, uint16_t bits) {
#if defined(__CUDACC__)
  return __bfloat162float(__ushort_as_bfloat16(bits));
#else
  return emu::bfloat16_to_float(bits);
#endif
}

PYATTN_DEVICE float fast_exp2(float x) {
#if defined(__CUDACC__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // exp2(-inf) = +0
  return y;
#else
  return exp2f(x);
#endif
}

// ------------------------------------------------------------------------ warp-collective: mma, shfl

// d += a·b with mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32. With g = lane / 4,
// t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k16"): a[0] = A[g][2t..2t+1],
// a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g],
// b[1] = B[2t+8..][g]; d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]. Lower half = lower index.
template <class E>
PYATTN_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint32_t a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], b0 = b[0], b1 = b[1];
#if defined(__CUDACC__)
  if constexpr (E::kIsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  emu::mma_m16n8k16(E::kIsBf16, d, a0, a1, a2, a3, b0, b1);
#endif
}

// __shfl_xor_sync over the full warp.
PYATTN_DEVICE float shfl_xor(float value, int lane_mask) {
#if defined(__CUDACC__)
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
#else
  return emu::shfl_xor(value, lane_mask);
#endif
}

// ------------------------------------------------------------------------------- ldmatrix (shared)

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: lanes 8i..8i+7 give the 16-byte row
// addresses of 8x8 matrix i; register i of lane l receives matrix i's row l/4, columns 2(l%4),
// 2(l%4)+1 — or, with .trans, its column l/4, rows 2(l%4), 2(l%4)+1.
PYATTN_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#else
  emu::ldmatrix(4, false, r, address);
#endif
}
PYATTN_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#else
  emu::ldmatrix(4, true, r, address);
#endif
}
PYATTN_DEVICE void ldmatrix_x2(uint32_t (&r)[2], uint32_t address) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
#else
  emu::ldmatrix(2, false, r, address);
#endif
}
PYATTN_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t address) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address));
#else
  emu::ldmatrix(2, true, r, address);
#endif
}
PYATTN_DEVICE void ldmatrix_x1(uint32_t (&r)[1], uint32_t address) {
#if defined(__CUDACC__)
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
#else
  emu::ldmatrix(1, false, r, address);
#endif
}

// ----------------------------------------------------------------------------- cp.async and barriers

// 16 bytes global -> shared, asynchronous (cp.async.cg: cached in L2 only). valid = false zero-fills
// the 16 bytes and reads nothing (src-size 0); `global` must still be a mapped address.
PYATTN_DEVICE void cp_async_16(uint32_t shared_address, const void* global, bool valid) {
#if defined(__CUDACC__)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address), "l"(global),
               "r"(valid ? 16 : 0));
#else
  emu::cp_async_16(shared_address, global, valid);
#endif
}
// Closes the group of this thread's cp.async issued since the last commit (an empty group is fine).
PYATTN_DEVICE void cp_async_commit() {
#if defined(__CUDACC__)
  asm volatile("cp.async.commit_group;\n" ::);
#else
  emu::cp_async_commit();
#endif
}
// Waits until at most N of this thread's committed groups are pending. The landed bytes are visible
// to this thread; other threads see them only after a barrier.
template <int N>
PYATTN_DEVICE void cp_async_wait() {
#if defined(__CUDACC__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  emu::cp_async_wait(N);
#endif
}

PYATTN_DEVICE void syncthreads() {
#if defined(__CUDACC__)
  __syncthreads();
#else
  emu::syncthreads();
#endif
}

// ------------------------------------------------------------------------------ shared loads/stores

PYATTN_DEVICE void st_shared_b32(uint32_t address, uint32_t value) {
#if defined(__CUDACC__)
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(address), "r"(value));
#else
  emu::st_shared(address, &value, 4);
#endif
}
PYATTN_DEVICE void st_shared_b128(uint32_t address, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
#if defined(__CUDACC__)
  asm volatile("st.shared.v4.b32 [%0], {%1,%2,%3,%4};\n" ::"r"(address), "r"(x), "r"(y), "r"(z), "r"(w));
#else
  const uint32_t v[4] = {x, y, z, w};
  emu::st_shared(address, v, 16);
#endif
}
// Two consecutive floats.
PYATTN_DEVICE void ld_shared_f32x2(uint32_t address, float& x, float& y) {
#if defined(__CUDACC__)
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(x), "=f"(y) : "r"(address));
#else
  float v[2];
  emu::ld_shared(address, v, 8);
  x = v[0];
  y = v[1];
#endif
}

// ------------------------------------------------------------------------------ global memory

template <class T>
PYATTN_DEVICE T ld_global(const T* pointer) {
#if defined(__CUDACC__)
  return *pointer;
#else
  return emu::ld_global(pointer);
#endif
}
template <class T>
PYATTN_DEVICE void st_global(T* pointer, T value) {
#if defined(__CUDACC__)
  *pointer = value;
#else
  emu::st_global(pointer, value);
#endif
}
PYATTN_DEVICE void atomic_add_f32(float* pointer, float value) {
#if defined(__CUDACC__)
  atomicAdd(pointer, value);
#else
  emu::atomic_add(pointer, value);
#endif
}

}  // namespace pyattn::attention
