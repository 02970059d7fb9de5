#pragma once
#include "emu_core.h"
struct __half { uint16_t bits; };
inline float __half2float(__half h) { _Float16 f; memcpy(&f, &h.bits, 2); return (float)f; }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; memcpy(&h.bits, &f, 2); return h; }
inline __half __ushort_as_half(unsigned short u) { __half h; h.bits = u; return h; }
