#pragma once
// WMMA emulated per thread: every lane holds the whole 16x16 tile (redundant, same results).
#include "cuda_fp16.h"
#include "cuda_bf16.h"
namespace nvcuda::wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {}; struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment { float x[256]; };
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class Use, class T, class L> void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) { for (auto& e : f.x) e = v; }
template <class T> void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ld) {
  for (int m = 0; m < 16; ++m) for (int k = 0; k < 16; ++k) f.x[m * 16 + k] = to_f(p[m * ld + k]); }
template <class T> void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ld) {
  for (int k = 0; k < 16; ++k) for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = to_f(p[k + n * ld]); }
template <class T> void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, row_major>& a,
                                 const fragment<matrix_b, 16, 16, 16, T, col_major>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) { float s = c.x[m * 16 + n]; for (int k = 0; k < 16; ++k) s += a.x[m * 16 + k] * b.x[k * 16 + n]; out[m * 16 + n] = s; }
  memcpy(d.x, out, sizeof out); }
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t) {
  for (int m = 0; m < 16; ++m) for (int n = 0; n < 16; ++n) p[m * ld + n] = f.x[m * 16 + n]; }
}
