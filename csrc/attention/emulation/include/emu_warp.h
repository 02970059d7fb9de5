// Lane-level CPU emulation of the primitives in csrc/attention/device.cuh (built with g++ -DPYATTN_EMULATION).
//
// A CTA runs as one cooperative fiber per CUDA thread on one OS thread (deterministic, no data races in
// the emulator itself). A fiber runs until it reaches a warp-collective operation or a barrier:
//   * warp collectives (mma.sync, ldmatrix, shfl.sync) wait until all 32 lanes of the warp arrive, then
//     execute once on the 32 lanes' own registers, with the PTX ISA's fragment layouts — a kernel that
//     puts a value in the wrong register or gives ldmatrix the wrong row address computes a wrong answer;
//     lanes that reach different collectives are a divergence error;
//   * __syncthreads waits for every thread of the CTA and starts a new barrier epoch;
//   * cp.async copies 16 bytes only when the issuing thread's cp.async.wait_group retires its group:
//     until then the destination is "in flight", and any read or write of it is an error (a missing
//     wait), and the landed bytes count as written by the issuing thread at the wait;
//   * shared memory has a shadow word per 4 bytes (writer, epoch, readers): two threads touching the
//     same word in one barrier epoch, one of them writing, is a race error (a missing __syncthreads),
//     and reading a word nobody wrote is an error. Shared memory starts as 0xFF bytes (NaN halves);
//   * global accesses through device.cuh must fall inside a buffer the driver registered.
// Errors print "emulator error: ..." with the kernel, CTA and thread, and exit with status 3.
// Statistics (ldmatrix bank conflicts per 8-row phase, instruction counts) are kept in emu::stats.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <vector>

namespace emu {

struct Grid3 {
  unsigned x = 1, y = 1, z = 1;
};

// --------------------------------------------------------------------------------- conversions

inline uint16_t float_to_half_bits(float x) {
  const _Float16 h = static_cast<_Float16>(x);  // round to nearest even, as __float2half_rn
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
inline float half_to_float(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}
inline uint16_t float_to_bfloat16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
inline float bfloat16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t pack_half2(float lo, float hi) {
  return uint32_t(float_to_half_bits(lo)) | (uint32_t(float_to_half_bits(hi)) << 16);
}
inline uint32_t pack_bfloat162(float lo, float hi) {
  return uint32_t(float_to_bfloat16_bits(lo)) | (uint32_t(float_to_bfloat16_bits(hi)) << 16);
}

// ------------------------------------------------------------------------------------- state

enum class Wait : uint8_t { kRunnable, kCollective, kBarrier, kDone };
enum class Op : uint8_t { kNone, kMma, kLdmatrix, kShfl };
inline const char* op_name(Op op) {
  switch (op) {
    case Op::kMma: return "mma.sync";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kShfl: return "shfl.sync";
    default: return "nothing";
  }
}

struct Copy {
  uint32_t destination;
  unsigned char data[16];
};

struct Thread {
  ucontext_t context;
  char* stack = nullptr;
  int index = 0;
  Wait wait = Wait::kRunnable;
  std::vector<Copy> open_group;                // issued since the last commit
  std::deque<std::vector<Copy>> committed;     // oldest first
};

// One lane's operands (in) and results (out) at a warp collective.
struct Slot {
  uint32_t u[6];
  float f[4];
  int i;
};

struct Warp {
  int arrived = 0;
  Op op = Op::kNone;
  int variant = 0;
  Slot slots[32];
};

struct ShadowWord {
  int32_t writer = -1;  // thread that last wrote the word (-1: never written)
  uint32_t write_epoch = 0;
  int32_t reader = -1;  // thread that read it in read_epoch; -2: several threads
  uint32_t read_epoch = UINT32_MAX;
  int32_t in_flight = -1;  // thread whose cp.async into the word has not landed
};

struct Stats {
  uint64_t mma = 0, ldmatrix = 0, ldmatrix_phases = 0, ldmatrix_conflict_wavefronts = 0, shfl = 0, barriers = 0,
           cp_async = 0, ctas = 0;
};
inline Stats stats;

enum class Schedule { kForward, kReverse };
inline Schedule schedule = Schedule::kForward;  // order of CTAs and of threads within a round

struct Buffer {
  uintptr_t begin, end;
  std::string name;
};
inline std::vector<Buffer> buffers;

constexpr uint32_t kSharedWindowBase = 0x400;  // a shared address of 0 is never valid here

struct Launch {
  const char* kernel = "";
  Grid3 grid;
  unsigned block[3] = {0, 0, 0};
  int threads = 0;
  std::vector<Thread> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> shared;
  std::vector<ShadowWord> shadow;
  uint32_t epoch = 0;
  int barrier_arrived = 0;
  ucontext_t scheduler;
  Thread* current = nullptr;
  std::function<void()> body;
};
inline Launch* active = nullptr;

// ------------------------------------------------------------------------------------- errors

[[noreturn]] inline void fail(const char* format, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "emulator error: ");
  va_list args;
  va_start(args, format);
  std::vfprintf(stderr, format, args);
  va_end(args);
  if (active != nullptr) {
    const Thread* t = active->current;
    std::fprintf(stderr, "\n  in %s, CTA (%u, %u, %u)", active->kernel, active->block[0], active->block[1],
                 active->block[2]);
    if (t != nullptr) std::fprintf(stderr, ", thread %d (warp %d, lane %d)", t->index, t->index / 32, t->index % 32);
  }
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(3);
}

inline Thread& self() { return *active->current; }
inline int thread_index() { return self().index; }
inline int block_index(int axis) { return static_cast<int>(active->block[axis]); }
inline uint32_t shared_base() { return kSharedWindowBase; }

inline void register_buffer(const void* pointer, size_t bytes, std::string name) {
  const auto begin = reinterpret_cast<uintptr_t>(pointer);
  buffers.push_back({begin, begin + bytes, std::move(name)});
}
inline void clear_buffers() { buffers.clear(); }
inline void check_global(const void* pointer, size_t bytes, const char* what) {
  const auto begin = reinterpret_cast<uintptr_t>(pointer);
  for (const Buffer& b : buffers)
    if (begin >= b.begin && begin + bytes <= b.end) return;
  fail("global %s of %zu bytes at %p lies outside every buffer the kernel was given", what, bytes, pointer);
}

// ---------------------------------------------------------------------------- fiber scheduling

inline void yield() { swapcontext(&self().context, &active->scheduler); }

inline void fiber_main() {
  Thread& t = self();
  active->body();
  size_t unlanded = t.open_group.size();
  for (const auto& group : t.committed) unlanded += group.size();
  if (unlanded != 0) fail("thread exited with %zu cp.async copies never waited for (cp.async.wait_group)", unlanded);
  t.wait = Wait::kDone;
}  // returns to active->scheduler through uc_link

inline void run_cta(Launch& L) {
  L.epoch = 0;
  L.barrier_arrived = 0;
  std::fill(L.shared.begin(), L.shared.end(), 0xFF);
  std::fill(L.shadow.begin(), L.shadow.end(), ShadowWord{});
  for (Warp& w : L.warps) w = Warp{};
  constexpr size_t kStack = 512 * 1024;
  for (int i = 0; i < L.threads; ++i) {
    Thread& t = L.fibers[i];
    if (t.stack == nullptr) t.stack = static_cast<char*>(std::malloc(kStack));
    t.index = i;
    t.wait = Wait::kRunnable;
    t.open_group.clear();
    t.committed.clear();
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack;
    t.context.uc_stack.ss_size = kStack;
    t.context.uc_link = &L.scheduler;
    makecontext(&t.context, fiber_main, 0);
  }
  int done = 0;
  while (done < L.threads) {
    bool ran = false;
    for (int k = 0; k < L.threads; ++k) {
      const int i = schedule == Schedule::kForward ? k : L.threads - 1 - k;
      Thread& t = L.fibers[i];
      if (t.wait != Wait::kRunnable) continue;
      L.current = &t;
      swapcontext(&L.scheduler, &t.context);
      L.current = nullptr;
      ran = true;
      if (t.wait == Wait::kDone) ++done;
    }
    if (!ran && done < L.threads) {
      int at_barrier = 0, at_collective = 0;
      for (int i = 0; i < L.threads; ++i) {
        at_barrier += L.fibers[i].wait == Wait::kBarrier;
        at_collective += L.fibers[i].wait == Wait::kCollective;
      }
      fail("deadlock: %d threads wait at __syncthreads, %d at a warp collective, %d exited", at_barrier, at_collective,
           done);
    }
  }
}

// Runs `body` as every thread of every CTA of `grid`, CTAs one after another.
inline void launch(const char* kernel, Grid3 grid, int threads, size_t shared_bytes, std::function<void()> body) {
  if (threads <= 0 || threads % 32 != 0 || threads > 1024) fail("launch of %s with %d threads per CTA", kernel, threads);
  static Launch L;  // fibers' stacks are kept from launch to launch
  L.kernel = kernel;
  L.grid = grid;
  L.threads = threads;
  if (L.fibers.size() < size_t(threads)) L.fibers.resize(threads);
  L.warps.assign(threads / 32, Warp{});
  L.shared.assign(shared_bytes, 0xFF);
  L.shadow.assign((shared_bytes + 3) / 4, ShadowWord{});
  L.body = std::move(body);
  active = &L;
  const unsigned total = grid.x * grid.y * grid.z;
  for (unsigned n = 0; n < total; ++n) {
    const unsigned c = schedule == Schedule::kForward ? n : total - 1 - n;
    L.block[0] = c % grid.x;
    L.block[1] = (c / grid.x) % grid.y;
    L.block[2] = c / (grid.x * grid.y);
    run_cta(L);
    ++stats.ctas;
  }
  active = nullptr;
}

// --------------------------------------------------------------------------------- shared memory

inline size_t shared_offset(uint32_t address, uint32_t bytes, uint32_t alignment, const char* what) {
  if (address % alignment != 0) fail("%s at shared address 0x%x is not %u-byte aligned", what, address, alignment);
  if (address < kSharedWindowBase || address - kSharedWindowBase + bytes > active->shared.size())
    fail("%s of %u bytes at shared address 0x%x is outside the CTA's %zu bytes of dynamic shared memory", what, bytes,
         address, active->shared.size());
  return address - kSharedWindowBase;
}

inline void check_read(size_t offset, int reader, const char* what) {
  ShadowWord& w = active->shadow[offset / 4];
  const uint32_t address = uint32_t(offset) + kSharedWindowBase;
  if (w.in_flight >= 0)
    fail("%s reads shared address 0x%x while thread %d's cp.async into it is in flight (a missing "
         "cp.async.wait_group)", what, address, w.in_flight);
  if (w.writer < 0) fail("%s reads shared address 0x%x, which nothing has written", what, address);
  if (w.writer != reader && w.write_epoch == active->epoch)
    fail("%s by thread %d reads shared address 0x%x that thread %d wrote in the same barrier epoch (a missing "
         "__syncthreads)", what, reader, address, w.writer);
  if (w.read_epoch != active->epoch) {
    w.read_epoch = active->epoch;
    w.reader = reader;
  } else if (w.reader != reader) {
    w.reader = -2;
  }
}

inline void check_write(size_t offset, int writer, const char* what) {
  ShadowWord& w = active->shadow[offset / 4];
  const uint32_t address = uint32_t(offset) + kSharedWindowBase;
  if (w.in_flight >= 0)
    fail("%s writes shared address 0x%x while thread %d's cp.async into it is in flight", what, address, w.in_flight);
  if (w.read_epoch == active->epoch && w.reader != writer)
    fail("%s by thread %d overwrites shared address 0x%x that %s read in the same barrier epoch (a missing "
         "__syncthreads before reuse)", what, writer, address, w.reader == -2 ? "other threads" : "another thread");
  if (w.writer >= 0 && w.writer != writer && w.write_epoch == active->epoch)
    fail("%s by thread %d writes shared address 0x%x that thread %d wrote in the same barrier epoch", what, writer,
         address, w.writer);
}

inline void mark_written(size_t offset, int writer) {
  ShadowWord& w = active->shadow[offset / 4];
  w.writer = writer;
  w.write_epoch = active->epoch;
}

inline void st_shared(uint32_t address, const void* data, uint32_t bytes) {
  const size_t offset = shared_offset(address, bytes, bytes >= 4 ? 4 : bytes, "st.shared");
  for (uint32_t b = 0; b < bytes; b += 4) {
    check_write(offset + b, self().index, "st.shared");
    mark_written(offset + b, self().index);
  }
  std::memcpy(active->shared.data() + offset, data, bytes);
}

inline void ld_shared(uint32_t address, void* data, uint32_t bytes) {
  const size_t offset = shared_offset(address, bytes, bytes >= 4 ? 4 : bytes, "ld.shared");
  for (uint32_t b = 0; b < bytes; b += 4) check_read(offset + b, self().index, "ld.shared");
  std::memcpy(data, active->shared.data() + offset, bytes);
}

// ------------------------------------------------------------------------------------- cp.async

inline void cp_async_16(uint32_t address, const void* global, bool valid) {
  const size_t offset = shared_offset(address, 16, 16, "cp.async");
  Copy copy{address, {}};
  if (valid) {
    check_global(global, 16, "cp.async source");
    if (reinterpret_cast<uintptr_t>(global) % 16 != 0) fail("cp.async source %p is not 16-byte aligned", global);
    std::memcpy(copy.data, global, 16);
  } else {
    std::memset(copy.data, 0, 16);  // src-size 0: zero fill
  }
  for (int b = 0; b < 16; b += 4) {
    check_write(offset + b, self().index, "cp.async");
    active->shadow[(offset + b) / 4].in_flight = self().index;
  }
  self().open_group.push_back(copy);
  ++stats.cp_async;
}

inline void cp_async_commit() {
  Thread& t = self();
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

inline void cp_async_wait(int pending) {
  Thread& t = self();
  while (t.committed.size() > size_t(pending)) {
    for (const Copy& c : t.committed.front()) {
      const size_t offset = c.destination - kSharedWindowBase;
      std::memcpy(active->shared.data() + offset, c.data, 16);
      for (int b = 0; b < 16; b += 4) {
        active->shadow[(offset + b) / 4].in_flight = -1;
        mark_written(offset + b, t.index);
      }
    }
    t.committed.pop_front();
  }
}

// -------------------------------------------------------------------------------------- barrier

inline void syncthreads() {
  Launch& L = *active;
  if (++L.barrier_arrived == L.threads) {
    L.barrier_arrived = 0;
    ++L.epoch;
    ++stats.barriers;
    for (int i = 0; i < L.threads; ++i)
      if (L.fibers[i].wait == Wait::kBarrier) L.fibers[i].wait = Wait::kRunnable;
    return;
  }
  self().wait = Wait::kBarrier;
  yield();
}

// ---------------------------------------------------------------------------- warp collectives

inline Slot& my_slot() { return active->warps[self().index / 32].slots[self().index % 32]; }

template <class Execute>
inline void warp_collective(Op op, int variant, Execute&& execute) {
  Launch& L = *active;
  Warp& w = L.warps[self().index / 32];
  if (w.arrived == 0) {
    w.op = op;
    w.variant = variant;
  } else if (w.op != op || w.variant != variant) {
    fail("divergent warp: this lane reached %s (variant %d) while lanes before it wait at %s (variant %d)",
         op_name(op), variant, op_name(w.op), w.variant);
  }
  if (++w.arrived < 32) {
    self().wait = Wait::kCollective;
    yield();
    return;
  }
  w.arrived = 0;
  execute(w, (self().index / 32) * 32);
  for (int lane = 0; lane < 32; ++lane) {
    Thread& t = L.fibers[(self().index / 32) * 32 + lane];
    if (t.wait == Wait::kCollective) t.wait = Wait::kRunnable;
  }
}

inline float element(bool bf16, uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return bf16 ? bfloat16_to_float(bits) : half_to_float(bits);
}

// D = A·B + C for the warp, from and to each lane's registers (layouts in device.cuh).
inline void mma_m16n8k16(bool bf16, float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                         uint32_t b1) {
  Slot& mine = my_slot();
  mine.u[0] = a0; mine.u[1] = a1; mine.u[2] = a2; mine.u[3] = a3; mine.u[4] = b0; mine.u[5] = b1;
  for (int i = 0; i < 4; ++i) mine.f[i] = d[i];
  warp_collective(Op::kMma, bf16, [bf16](Warp& w, int) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const Slot& s = w.slots[lane];
      const int g = lane >> 2, t = lane & 3;
      for (int h = 0; h < 2; ++h) {
        A[g][2 * t + h] = element(bf16, s.u[0], h);
        A[g + 8][2 * t + h] = element(bf16, s.u[1], h);
        A[g][2 * t + 8 + h] = element(bf16, s.u[2], h);
        A[g + 8][2 * t + 8 + h] = element(bf16, s.u[3], h);
        B[2 * t + h][g] = element(bf16, s.u[4], h);
        B[2 * t + 8 + h][g] = element(bf16, s.u[5], h);
        C[g][2 * t + h] = s.f[h];
        C[g + 8][2 * t + h] = s.f[2 + h];
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      Slot& s = w.slots[lane];
      const int g = lane >> 2, t = lane & 3;
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        double sum = C[row][col];
        for (int k = 0; k < 16; ++k) sum += double(A[row][k]) * double(B[k][col]);
        s.f[e] = static_cast<float>(sum);
      }
    }
    ++stats.mma;
  });
  for (int i = 0; i < 4; ++i) d[i] = my_slot().f[i];
}

template <size_t N>
inline void ldmatrix(int matrices, bool trans, uint32_t (&r)[N], uint32_t address) {
  my_slot().u[0] = address;
  warp_collective(Op::kLdmatrix, matrices * 2 + trans, [matrices, trans](Warp& w, int first_thread) {
    uint16_t M[4][8][8];
    for (int m = 0; m < matrices; ++m) {
      int bank_use[32] = {0};
      for (int row = 0; row < 8; ++row) {
        const int lane = 8 * m + row;
        const uint32_t a = w.slots[lane].u[0];
        const size_t offset = shared_offset(a, 16, 16, "ldmatrix row");
        for (int b = 0; b < 16; b += 4) check_read(offset + b, first_thread + lane, "ldmatrix");
        std::memcpy(M[m][row], active->shared.data() + offset, 16);
        for (int word = 0; word < 4; ++word) ++bank_use[(offset / 4 + word) % 32];
      }
      int ways = 0;
      for (int bank = 0; bank < 32; ++bank) ways = bank_use[bank] > ways ? bank_use[bank] : ways;
      ++stats.ldmatrix_phases;
      stats.ldmatrix_conflict_wavefronts += ways - 1;
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane & 3;
      for (int m = 0; m < matrices; ++m) {
        const uint16_t lo = trans ? M[m][2 * t][g] : M[m][g][2 * t];
        const uint16_t hi = trans ? M[m][2 * t + 1][g] : M[m][g][2 * t + 1];
        w.slots[lane].u[m] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
    ++stats.ldmatrix;
  });
  for (size_t i = 0; i < N; ++i) r[i] = my_slot().u[i];
}

inline float shfl_xor(float value, int lane_mask) {
  if (lane_mask < 0 || lane_mask > 31) fail("shfl.sync.bfly with lane mask %d", lane_mask);
  my_slot().f[0] = value;
  my_slot().i = lane_mask;
  warp_collective(Op::kShfl, 0, [](Warp& w, int) {
    float in[32];
    for (int lane = 0; lane < 32; ++lane) in[lane] = w.slots[lane].f[0];
    for (int lane = 0; lane < 32; ++lane) w.slots[lane].f[1] = in[lane ^ w.slots[lane].i];
    ++stats.shfl;
  });
  return my_slot().f[1];
}

// --------------------------------------------------------------------------------- global memory

template <class T>
inline T ld_global(const T* pointer) {
  check_global(pointer, sizeof(T), "load");
  return *pointer;
}
template <class T>
inline void st_global(T* pointer, T value) {
  check_global(pointer, sizeof(T), "store");
  *pointer = value;
}
inline void atomic_add(float* pointer, float value) {
  check_global(pointer, 4, "atomicAdd");
  *pointer += value;  // fibers are cooperative: read-modify-write is atomic here
}

}  // namespace emu
