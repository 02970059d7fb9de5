// The LSTM kernels of lstm_kernels.cuh run on the CPU against a float64 model: every kernel, every
// tile configuration (BM 16 with K splits, BM 64), persistent and stepwise recurrences, both
// directions, fp32/fp16/bf16, odd sizes, NaN-poisoned outputs and shared memory.
//
// Without a GPU this is how the kernels' indexing, tiling, barriers and gradient math get checked.
// include/ emulates what the kernels use — one OS thread per CUDA thread, std::barrier for
// __syncthreads and grid.sync, per-CTA shared buffers, WMMA computed whole by every lane — and
// tests/test_lstm_cuda.py builds it with g++ against a copy of lstm_kernels.cuh whose dynamic
// shared-memory declaration points at the CTA's buffer and whose launchers (host CUDA API) are cut.
// Run: ./lstm_emulation [all|fp32|fp16|bf16|ragged|pipeline]; exit status 0 when every comparison passes.
#include "lstm_kernels_emulated.cuh"
#include <cstdio>
#include <random>
#include <string>
using namespace pyattn::lstm;

static std::mt19937 rng(1);
template <class T> std::vector<T> random_vector(size_t n, float scale) {
  std::normal_distribution<float> normal;
  std::vector<T> v(n);
  for (auto& x : v) x = Element<T>::from_float(normal(rng) * scale);
  return v;
}
template <class T> std::vector<T> poisoned(size_t n) { return std::vector<T>(n, Element<T>::from_float(NAN)); }
template <class T> double value(T x) { return Element<T>::to_float(x); }
static double sig(double x) { return 1 / (1 + std::exp(-x)); }

static int failures = 0;
template <class V> void check(const char* what, const V& got, const std::vector<double>& want, double tol) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) { double d = value(got[i]) - want[i]; num += d * d; den += want[i] * want[i]; }
  double err = std::sqrt(num) / std::sqrt(den);
  bool ok = err <= tol;  // NaN fails
  failures += !ok;
  printf("  %-40s rel err %.2e %s\n", what, err, ok ? "ok" : "FAIL");
}
template <> double value<double>(double x) { return x; }

// Float64 model of one layer: forward then BPTT, in the kernels' conventions. lengths (empty: all
// T): row b is valid at time t < lengths[b]; past it the state is frozen and the output is zero.
struct Model {
  std::vector<double> output, h_n, cells, gates, grad_gates, grad_cell;
};
template <class T>
Model model(int steps, int batch, int hidden, bool reverse, const std::vector<int64_t>& lengths, const std::vector<T>& proj,
            const std::vector<T>& whh, const std::vector<T>& h0, const std::vector<T>& c0, const std::vector<T>& gout,
            const std::vector<T>& ghn, const std::vector<T>& gcn) {
  const int H = hidden, G = 4 * H;
  Model m;
  m.output.assign(size_t(steps) * batch * H, 0); m.cells = m.output; m.gates.assign(size_t(steps) * batch * G, 0);
  m.grad_gates = m.gates; m.h_n.assign(size_t(batch) * H, 0);
  std::vector<int> order(steps);
  for (int s = 0; s < steps; ++s) order[s] = reverse ? steps - 1 - s : s;
  for (int b = 0; b < batch; ++b) {
    const int64_t length = lengths.empty() ? steps : lengths[b];
    std::vector<double> h(H), c(H);
    for (int j = 0; j < H; ++j) { h[j] = value(h0[b * H + j]); c[j] = value(c0[b * H + j]); }
    for (int t : order) {
      if (t < length) {
        std::vector<double> hn(H), cn(H);
        for (int j = 0; j < H; ++j) {
          double pre[4];
          for (int g = 0; g < 4; ++g) {
            double v = value(proj[(size_t(t) * batch + b) * G + g * H + j]);
            for (int k = 0; k < H; ++k) v += value(whh[size_t(g * H + j) * H + k]) * h[k];
            pre[g] = v;
          }
          double i = sig(pre[0]), f = sig(pre[1]), gg = std::tanh(pre[2]), o = sig(pre[3]);
          cn[j] = f * c[j] + i * gg; hn[j] = o * std::tanh(cn[j]);
          double* gr = &m.gates[(size_t(t) * batch + b) * G];
          gr[j] = i; gr[H + j] = f; gr[2 * H + j] = gg; gr[3 * H + j] = o;
        }
        h = hn; c = cn;
        for (int j = 0; j < H; ++j) m.output[(size_t(t) * batch + b) * H + j] = h[j];
      }
      for (int j = 0; j < H; ++j) m.cells[(size_t(t) * batch + b) * H + j] = c[j];
    }
    for (int j = 0; j < H; ++j) m.h_n[b * H + j] = h[j];
  }
  // BPTT
  m.grad_cell.assign(size_t(batch) * H, 0);
  for (int b = 0; b < batch; ++b) {
    const int64_t length = lengths.empty() ? steps : lengths[b];
    const int last_valid = reverse ? 0 : int(std::min<int64_t>(length, steps)) - 1;
    std::vector<double> dc(H);
    for (int j = 0; j < H; ++j) dc[j] = value(gcn[b * H + j]);
    for (int s = steps - 1; s >= 0; --s) {
      int t = order[s];
      if (t >= length) continue;
      int t_next = s == steps - 1 ? -1 : order[s + 1];
      for (int j = 0; j < H; ++j) {
        double dh = value(gout[(size_t(t) * batch + b) * H + j]);
        if (t == last_valid) dh += value(ghn[b * H + j]);
        if (t_next >= 0)
          for (int n = 0; n < G; ++n) dh += m.grad_gates[(size_t(t_next) * batch + b) * G + n] * value(whh[size_t(n) * H + j]);
        const double* gr = &m.gates[(size_t(t) * batch + b) * G];
        double i = gr[j], f = gr[H + j], g = gr[2 * H + j], o = gr[3 * H + j];
        double cc = m.cells[(size_t(t) * batch + b) * H + j];
        double cp = s == 0 ? value(c0[b * H + j]) : m.cells[(size_t(order[s - 1]) * batch + b) * H + j];
        double th = std::tanh(cc), d = dc[j] + dh * o * (1 - th * th);
        double* out = &m.grad_gates[(size_t(t) * batch + b) * G];
        out[j] = d * g * i * (1 - i); out[H + j] = d * cp * f * (1 - f); out[2 * H + j] = d * i * (1 - g * g);
        out[3 * H + j] = dh * th * o * (1 - o);
        dc[j] = d * f;
      }
    }
    for (int j = 0; j < H; ++j) m.grad_cell[b * H + j] = dc[j];
  }
  return m;
}

// The ring of a persistent kernel's CTA: `ring` slices (0: the least ring, so long operands take several
// passes), or with kH100Ring what the launcher would grow on an H100.
constexpr int kH100Ring = -1;
template <class Layout>
int ring_slices(int ring, int grid, int H, size_t slice_bytes, int least) {
  if (ring >= 0) return ring > least ? ring : least;
  return grown_ring_slices(kH100SharedMemory, grid, Layout::fixed_bytes(H, 0), slice_bytes, least,
                           Layout::needed_slices(H, 0));
}

// The layer forward as lstm_api.cpp drives it (persistent kernel, or one launch per step), then
// the rows past each sequence's end zeroed; returns h_n as taken before the zeroing.
template <class T, int BM>
std::vector<T> layer_forward(bool persistent, int steps, int batch, int H, bool reverse, const int64_t* lengths,
                             const std::vector<T>& proj, const std::vector<T>& whh, const std::vector<T>& h0,
                             const std::vector<T>& c0, std::vector<T>& output, std::vector<float>& cells, bool save_all,
                             T* gates, int ring) {
  const size_t state = size_t(batch) * H;
  if (persistent) {
    LayerForwardParams p{};
    p.input_projection = proj.data(); p.weight_hh = whh.data(); p.h0 = h0.data(); p.c0 = c0.data();
    p.output = output.data(); p.cell_states = cells.data(); p.save_all_cell_states = save_all; p.gates = gates;
    p.lengths = lengths; p.steps = steps; p.batch = batch; p.hidden = H; p.reverse = reverse;
    constexpr int BJ = kPersistentForwardUnits, S = kPersistentForwardSplits<BM>;  // the launcher's tiles
    using Layout = PersistentForwardLayout<T, BM, BJ, S>;
    p.ring_slices = ring_slices<Layout>(ring, Layout::grid(H, 0), H, Layout::Gates::kABytes, Layout::Gates::kStages);
    emu::launch(dim3(Layout::grid(H, 0)), kThreads, Layout::total_bytes(H, 0, p.ring_slices),
                [&] { lstm_persistent_forward_kernel<T, BM, BJ, S>(p); });
  } else {
    for (int s = 0; s < steps; ++s) {
      int t = reverse ? steps - 1 - s : s, tp = reverse ? t + 1 : t - 1;
      StepForwardParams q{};
      q.a0 = s == 0 ? (const void*)h0.data() : (const void*)(output.data() + tp * state);
      q.w0 = whh.data(); q.k0 = H;
      q.pre_gates = proj.data() + t * state * 4;
      q.c_prev = s == 0 ? c0.data() : nullptr;
      q.c_prev_f32 = s == 0 ? nullptr : cells.data() + (save_all ? tp * state : 0);
      q.h_out = output.data() + t * state; q.c_out_f32 = cells.data() + (save_all ? t * state : 0);
      q.gates_out = gates ? gates + t * state * 4 : nullptr;
      q.lengths = lengths; q.time = t; q.h_prev = q.a0;
      q.batch = batch; q.hidden = H;
      emu::launch(dim3(ceil_div(H, 16), ceil_div(batch, BM)), kThreads, TileShape<T, BM, 64, 1>::total_bytes(0, false),
                  [&] { lstm_step_forward_kernel<T, BM, 16>(q); });
    }
  }
  const int last = reverse ? 0 : steps - 1;
  std::vector<T> h_n(output.begin() + last * state, output.begin() + (last + 1) * state);
  if (lengths)
    for (int t = 0; t < steps; ++t)
      for (int b = 0; b < batch; ++b)
        if (t >= lengths[b])
          for (int j = 0; j < H; ++j) output[(size_t(t) * batch + b) * H + j] = Element<T>::from_float(0.f);
  return h_n;
}

template <class T, int BM>
void run_layer(const char* dtype, int steps, int batch, int hidden, bool reverse, bool persistent, double tol,
               std::vector<int64_t> lengths = {}, int ring = kH100Ring) {
  printf("layer %s T=%d B=%d H=%d reverse=%d %s%s%s\n", dtype, steps, batch, hidden, reverse,
         persistent ? "persistent" : "stepwise", lengths.empty() ? "" : " ragged",
         persistent && ring == 0 ? " least ring" : "");
  const int H = hidden, G = 4 * H;
  const size_t state = size_t(batch) * H;
  const int64_t* length_data = lengths.empty() ? nullptr : lengths.data();
  auto proj = random_vector<T>(steps * state * 4, 1.0f);
  auto whh = random_vector<T>(size_t(G) * H, 1.0f / std::sqrt(float(H)));
  auto h0 = random_vector<T>(state, 1), c0 = random_vector<T>(state, 1);
  auto gout = random_vector<T>(steps * state, 1), ghn = random_vector<T>(state, 1), gcn = random_vector<T>(state, 1);
  Model want = model(steps, batch, H, reverse, lengths, proj, whh, h0, c0, gout, ghn, gcn);

  auto output = poisoned<T>(steps * state);
  std::vector<float> cells(steps * state, NAN);
  auto gates = poisoned<T>(steps * state * 4);
  auto h_n = layer_forward<T, BM>(persistent, steps, batch, H, reverse, length_data, proj, whh, h0, c0, output, cells,
                                     true, gates.data(), ring);
  check("output", output, want.output, tol);
  check("h_n", h_n, want.h_n, tol);
  check("cell states", cells, want.cells, tol);
  check("gates", gates, want.gates, tol);

  // Inference: nothing saved, the float32 cell state updated in place in one slot.
  auto output_inference = poisoned<T>(steps * state);
  std::vector<float> cell_slot(state, NAN);
  layer_forward<T, BM>(persistent, steps, batch, H, reverse, length_data, proj, whh, h0, c0, output_inference,
                          cell_slot, false, nullptr, ring);
  const int last = reverse ? 0 : steps - 1;
  check("inference output", output_inference, want.output, tol);
  check("inference c_n", cell_slot,
        std::vector<double>(want.cells.begin() + last * state, want.cells.begin() + (last + 1) * state), tol);

  // Backward from the model's own saved tensors, rounded like the forward would save them.
  std::vector<T> saved_gates(want.gates.size());
  for (size_t i = 0; i < saved_gates.size(); ++i) saved_gates[i] = Element<T>::from_float(float(want.gates[i]));
  std::vector<float> saved_cells(want.cells.begin(), want.cells.end());
  std::vector<T> whh_t(size_t(G) * H);
  for (int n = 0; n < G; ++n) for (int k = 0; k < H; ++k) whh_t[size_t(k) * G + n] = whh[size_t(n) * H + k];
  auto grad_gates = poisoned<T>(steps * state * 4);
  std::vector<float> grad_cell(state, NAN);
  LayerBackwardParams b{};
  b.weight_hh_t = whh_t.data(); b.grad_output = gout.data(); b.grad_h_n = ghn.data(); b.grad_c_n = gcn.data();
  b.gates = saved_gates.data(); b.cell_states = saved_cells.data(); b.c0 = c0.data(); b.grad_gates = grad_gates.data();
  b.grad_cell = grad_cell.data(); b.lengths = length_data; b.steps = steps; b.batch = batch; b.hidden = H; b.reverse = reverse;
  constexpr int BJB = kBackwardUnits;
  constexpr int SB = kBackwardSplits<BM>;
  if (persistent) {
    using Layout = PersistentBackwardLayout<T, BM, BJB, SB>;
    b.ring_slices = ring_slices<Layout>(ring, Layout::grid(H, 0), H, Layout::Shape::kABytes, Layout::Shape::kStages);
    emu::launch(dim3(Layout::grid(H, 0)), kThreads, Layout::total_bytes(H, 0, b.ring_slices),
                [&] { lstm_persistent_backward_kernel<T, BM, BJB, SB>(b); });
  } else {
    for (int s = 0; s < steps; ++s)
      emu::launch(dim3(ceil_div(H, BJB), ceil_div(batch, BM)), kThreads, TileShape<T, BM, BJB, SB>::total_bytes(0, false),
                  [&] { lstm_step_backward_kernel<T, BM, BJB, SB>(b, s); });
  }
  check("grad gates", grad_gates, want.grad_gates, tol);
  check("grad c0", grad_cell, want.grad_cell, tol);
}

// The ring the launchers grow (grown_ring_slices), on an H100's figures and on an A100's (164 KB an SM,
// 163 KB a block, 108 SMs), against the slice counts docs/lstm.md works out.
void check_ring_sizes() {
  printf("ring sizes\n");
  using Backward = PersistentBackwardLayout<__half, 16, kBackwardUnits, kBackwardSplits<16>>;
  using Forward = PersistentForwardLayout<__half, 16, kPersistentForwardUnits, kPersistentForwardSplits<16>>;
  using Forward64 = PersistentForwardLayout<__half, 64, kPersistentForwardUnits, kPersistentForwardSplits<64>>;
  constexpr SharedMemoryFigures a100{166912, 167936, 1024, 108};
  auto ring = [](const SharedMemoryFigures& device, auto layout, int hidden, size_t slice, int least) {
    using Layout = decltype(layout);
    return grown_ring_slices(device, Layout::grid(hidden, 0), Layout::fixed_bytes(hidden, 0), slice, least,
                             Layout::needed_slices(hidden, 0));
  };
  const size_t slice16 = Backward::Shape::kABytes, slice64 = Forward64::Gates::kABytes;
  const struct { const char* what; int got, want; } cases[] = {
      // H = 768: the whole 48-slice operand (55 would fit); H = 1024: 41 of 64 (two passes).
      {"H100 fp16 backward H=768", ring(kH100SharedMemory, Backward{}, 768, slice16, 16), 48},
      {"H100 fp16 backward H=1024", ring(kH100SharedMemory, Backward{}, 1024, slice16, 16), 41},
      {"H100 fp16 forward H=1024", ring(kH100SharedMemory, Forward{}, 1024, slice16, 16), 16},
      {"H100 fp16 forward H=40", ring(kH100SharedMemory, Forward{}, 40, slice16, 16), 16},  // 1 slice: least
      {"H100 fp16 BM64 forward H=1024", ring(kH100SharedMemory, Forward64{}, 1024, slice64, 4), 16},
      // 128 CTAs on 108 SMs share SMs two by two: 81 KB each, less than the weights and C (75 KB) + one slice.
      {"A100 fp16 BM64 forward H=1024", ring(a100, Forward64{}, 1024, slice64, 4), 4},
      {"A100 fp16 backward H=768", ring(a100, Backward{}, 768, slice16, 16), 27},
  };
  for (const auto& c : cases) {
    const bool ok = c.got == c.want;
    failures += !ok;
    printf("  %-40s %d slices (want %d) %s\n", c.what, c.got, c.want, ok ? "ok" : "FAIL");
  }
}

template <class T, int BM>
void run_cell(const char* dtype, int batch, int input, int hidden, double tol) {
  printf("cell %s B=%d I=%d H=%d\n", dtype, batch, input, hidden);
  const int H = hidden, G = 4 * H;
  auto x = random_vector<T>(size_t(batch) * input, 1), hx = random_vector<T>(size_t(batch) * H, 1), cx = random_vector<T>(size_t(batch) * H, 1);
  auto wih = random_vector<T>(size_t(G) * input, 0.3f), whh = random_vector<T>(size_t(G) * H, 0.3f);
  auto bih = random_vector<T>(G, 0.3f), bhh = random_vector<T>(G, 0.3f);
  std::vector<double> hy_want(size_t(batch) * H), cy_want(hy_want.size()), gates_want(size_t(batch) * G);
  for (int b = 0; b < batch; ++b) for (int j = 0; j < H; ++j) {
    double pre[4];
    for (int g = 0; g < 4; ++g) {
      int n = g * H + j; double v = value(bih[n]) + value(bhh[n]);
      for (int k = 0; k < input; ++k) v += value(x[b * input + k]) * value(wih[size_t(n) * input + k]);
      for (int k = 0; k < H; ++k) v += value(hx[b * H + k]) * value(whh[size_t(n) * H + k]);
      pre[g] = v;
    }
    double i = sig(pre[0]), f = sig(pre[1]), g = std::tanh(pre[2]), o = sig(pre[3]);
    cy_want[b * H + j] = f * value(cx[b * H + j]) + i * g; hy_want[b * H + j] = o * std::tanh(cy_want[b * H + j]);
    gates_want[b * G + j] = i; gates_want[b * G + H + j] = f; gates_want[b * G + 2 * H + j] = g; gates_want[b * G + 3 * H + j] = o;
  }
  auto hy = poisoned<T>(hy_want.size()), cy = poisoned<T>(hy_want.size()), gates = poisoned<T>(gates_want.size());
  StepForwardParams q{};
  q.a0 = x.data(); q.w0 = wih.data(); q.k0 = input; q.a1 = hx.data(); q.w1 = whh.data(); q.k1 = H;
  q.bias0 = bih.data(); q.bias1 = bhh.data(); q.c_prev = cx.data(); q.h_out = hy.data(); q.c_out = cy.data();
  q.gates_out = gates.data(); q.batch = batch; q.hidden = H;
  emu::launch(dim3(ceil_div(H, 16), ceil_div(batch, BM)), kThreads, TileShape<T, BM, 64, 1>::total_bytes(0, false),
              [&] { lstm_step_forward_kernel<T, BM, 16>(q); });
  check("hy", hy, hy_want, tol); check("cy", cy, cy_want, tol); check("gates", gates, gates_want, tol);

  auto ghy = random_vector<T>(hy.size(), 1), gcy = random_vector<T>(hy.size(), 1);
  std::vector<double> gg_want(gates_want.size()), gcx_want(hy.size());
  for (int b = 0; b < batch; ++b) for (int j = 0; j < H; ++j) {
    double i = value(gates[b * G + j]), f = value(gates[b * G + H + j]), g = value(gates[b * G + 2 * H + j]), o = value(gates[b * G + 3 * H + j]);
    double th = std::tanh(value(cy[b * H + j])), dh = value(ghy[b * H + j]), d = value(gcy[b * H + j]) + dh * o * (1 - th * th);
    gg_want[b * G + j] = d * g * i * (1 - i); gg_want[b * G + H + j] = d * value(cx[b * H + j]) * f * (1 - f);
    gg_want[b * G + 2 * H + j] = d * i * (1 - g * g); gg_want[b * G + 3 * H + j] = dh * th * o * (1 - o); gcx_want[b * H + j] = d * f;
  }
  auto grad_gates = poisoned<T>(gates.size()), grad_cx = poisoned<T>(hy.size());
  CellBackwardParams c{ghy.data(), gcy.data(), gates.data(), cx.data(), cy.data(), grad_gates.data(), grad_cx.data(), batch, H};
  emu::launch(dim3(2), 256, 0, [&] { lstm_cell_backward_kernel<T>(c); });
  check("cell grad gates", grad_gates, gg_want, tol); check("cell grad cx", grad_cx, gcx_want, tol);
}

int main(int argc, char** argv) {
  std::string which = argc > 1 ? argv[1] : "all";
  if (which == "all" || which == "fp32") {
    run_cell<float, 16>("fp32", 3, 19, 37, 1e-5);
    run_cell<float, 64>("fp32", 20, 72, 40, 1e-5);
    for (bool reverse : {false, true}) for (bool persistent : {true, false}) {
      run_layer<float, 16>("fp32", 5, 3, 37, reverse, persistent, 1e-5);
      run_layer<float, 64>("fp32", 4, 20, 40, reverse, persistent, 1e-5);
    }
  }
  if (which == "all" || which == "fp16") {
    run_cell<__half, 16>("fp16", 3, 19, 37, 1e-2);
    run_cell<__half, 64>("fp16", 20, 72, 40, 1e-2);
    for (bool reverse : {false, true}) for (bool persistent : {true, false}) {
      run_layer<__half, 16>("fp16", 5, 3, 37, reverse, persistent, 1e-2);
      run_layer<__half, 64>("fp16", 4, 20, 40, reverse, persistent, 1e-2);
    }
  }
  if (which == "all" || which == "bf16") {
    run_cell<__nv_bfloat16, 64>("bf16", 20, 72, 40, 1e-2);
    run_layer<__nv_bfloat16, 16>("bf16", 5, 3, 40, true, true, 1e-2);
    run_layer<__nv_bfloat16, 64>("bf16", 4, 20, 37, false, false, 1e-2);
  }
  if (which == "all" || which == "ragged") {
    for (bool reverse : {false, true}) for (bool persistent : {true, false}) {
      run_layer<float, 16>("fp32", 6, 4, 37, reverse, persistent, 1e-5, {6, 1, 0, 4});
      run_layer<__half, 64>("fp16", 5, 18, 40, reverse, persistent, 1e-2,
                               {5, 1, 0, 4, 2, 3, 5, 5, 1, 2, 3, 4, 0, 5, 2, 2, 1, 3});
    }
  }
  if (which == "all" || which == "pipeline") {
    // More K slices than the persistent kernels' least cp.async ring holds (4 for fp32, 16 for 16-bit at
    // BM 16): with the least ring a product takes several passes (forward K = H in fp32: 5 slices, 4 + 1;
    // backward K = 4H: 19 = 4 + 4 + 4 + 4 + 3, fp16 33 = 16 + 16 + 1, fp32 BM 64 17 = 4 · 4 + 1); with the
    // ring an H100 launcher grows, one pass each (fp16 H = 520 forward is 9 slices either way). The small
    // sizes of the other suites are single passes, most with empty commit groups (fewer slices than groups).
    check_ring_sizes();
    for (int ring : {0, kH100Ring}) {
      run_layer<float, 16>("fp32", 3, 3, 300, false, true, 1e-5, {}, ring);
      run_layer<__half, 16>("fp16", 2, 2, 520, true, true, 1e-2, {}, ring);
      run_layer<float, 64>("fp32", 2, 17, 264, false, true, 1e-5, {}, ring);
    }
  }
  printf("%d failure(s)\n", failures);
  return failures != 0;
}
