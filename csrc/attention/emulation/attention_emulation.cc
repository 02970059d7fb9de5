// The attention kernels of csrc/attention, run on the CPU at lane level (include/emu_warp.h), driven by
// tests/test_attention_cuda.py: the test writes a case (sizes, strides, options, raw tensors) into a
// folder, this program runs the forward (and the backward) exactly as attention_api.cpp sequences the
// launches — same params, same grids, same kernels, compiled from the same headers — and writes the
// results back; the test compares them with pyattn.reference.attention in float64.
//
//   ./attention_emulation CASE_DIR
//
// CASE_DIR/case.txt holds "key value..." lines (see read_case); tensors are raw little-endian files.
// Outputs: out.bin, lse.bin (and dq.bin, dk.bin, dv.bin), each gathered to a contiguous (B, H, rows, D)
// (lse (B, Hq, L)), and stats.txt. Exit status 0: ran; 3: an emulator error (printed on stderr).
// Varlen cases ("varlen 1"): operands are packed (total, H, D) with batch stride 0, cu_seqlens_q/k list the
// offsets, seqlen_q/k are the longest sequences; outputs are (total, H, D) and lse (Hq, total_q), as
// attention_api.cpp's varlen ops allocate them.
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/attention_run.cuh"

using namespace pyattn::attention;

namespace {

using Case = std::map<std::string, std::vector<std::string>>;

Case read_case(const std::string& dir) {
  std::ifstream file(dir + "/case.txt");
  if (!file) throw std::runtime_error("cannot read " + dir + "/case.txt");
  Case c;
  std::string line;
  while (std::getline(file, line)) {
    std::istringstream words(line);
    std::string key, value;
    if (!(words >> key)) continue;
    auto& values = c[key];
    while (words >> value) values.push_back(value);
  }
  return c;
}

const std::vector<std::string>& field(const Case& c, const std::string& key) {
  const auto it = c.find(key);
  if (it == c.end()) throw std::runtime_error("case.txt lacks " + key);
  return it->second;
}
int64_t integer(const Case& c, const std::string& key, size_t index = 0) { return std::stoll(field(c, key).at(index)); }
double real(const Case& c, const std::string& key) { return std::stod(field(c, key).at(0)); }
std::string word(const Case& c, const std::string& key) { return field(c, key).at(0); }

template <class T>
std::vector<T> read_file(const std::string& path, size_t count) {
  std::vector<T> data(count);
  std::ifstream file(path, std::ios::binary);
  if (!file.read(reinterpret_cast<char*>(data.data()), std::streamsize(count * sizeof(T))))
    throw std::runtime_error("cannot read " + std::to_string(count) + " elements from " + path);
  return data;
}
template <class T>
void write_file(const std::string& path, const std::vector<T>& data) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(data.data()), std::streamsize(data.size() * sizeof(T)));
}

// A 4-D (B, H, rows, D) operand: its storage and strides (batch, head, row; the last is 1).
struct Operand {
  std::vector<uint16_t> storage;
  int64_t strides[3];
};

Operand read_operand(const Case& c, const std::string& dir, const std::string& name) {
  Operand o;
  o.storage = read_file<uint16_t>(dir + "/" + name + ".bin", size_t(integer(c, name + "_storage")));
  for (int i = 0; i < 3; ++i) o.strides[i] = integer(c, name + "_strides", i);
  return o;
}

// An output laid out as the API lays it out: (B, rows, H, D) memory when the input it mirrors is a
// (B, L, H, D) view (its head stride below its row stride), else (B, H, rows, D); varlen (packed): (total,
// H, D) with batch stride 0 (`rows` is the total). NaN-poisoned.
Operand new_output(const Operand& like, int batch, int heads, int rows, int head_dim, bool packed) {
  Operand o;
  o.storage.assign(size_t(packed ? 1 : batch) * heads * rows * head_dim, 0xFFFF);
  if (packed) {
    o.strides[0] = 0;
    o.strides[1] = head_dim;
    o.strides[2] = int64_t(heads) * head_dim;
  } else if (like.strides[1] < like.strides[2]) {
    o.strides[0] = int64_t(rows) * heads * head_dim;
    o.strides[1] = head_dim;
    o.strides[2] = int64_t(heads) * head_dim;
  } else {
    o.strides[0] = int64_t(heads) * rows * head_dim;
    o.strides[1] = int64_t(rows) * head_dim;
    o.strides[2] = head_dim;
  }
  return o;
}

std::vector<uint16_t> gather(const Operand& o, int batch, int heads, int rows, int head_dim, bool packed) {
  if (packed) return o.storage;  // (total, H, D) contiguous already
  std::vector<uint16_t> dense(size_t(batch) * heads * rows * head_dim);
  size_t n = 0;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int r = 0; r < rows; ++r)
        for (int d = 0; d < head_dim; ++d)
          dense[n++] = o.storage[b * o.strides[0] + h * o.strides[1] + r * o.strides[2] + d];
  return dense;
}

struct EmulationLauncher {
  template <class P>
  void operator()(const char* name, void (*kernel)(P), Grid grid, int threads, size_t shared_bytes, const P& params) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
    emu::launch(name, {grid.x, grid.y, grid.z}, threads, shared_bytes, [&] { kernel(params); });
  }
};

template <class E, int HEAD_DIM>
void run_case(const Case& c, const std::string& dir) {
  const int batch = int(integer(c, "batch")), heads_q = int(integer(c, "heads_q")), heads_k = int(integer(c, "heads_k"));
  const int seqlen_q = int(integer(c, "seqlen_q")), seqlen_k = int(integer(c, "seqlen_k"));
  const bool varlen = c.count("varlen") != 0 && integer(c, "varlen") != 0;
  // Rows the outputs hold per (batch, head): the sequence length, or every packed row.
  const int rows_q = varlen ? int(integer(c, "total_q")) : seqlen_q;
  const int rows_k = varlen ? int(integer(c, "total_k")) : seqlen_k;
  Operand q = read_operand(c, dir, "q"), k = read_operand(c, dir, "k"), v = read_operand(c, dir, "v");
  emu::register_buffer(q.storage.data(), q.storage.size() * 2, "q");
  emu::register_buffer(k.storage.data(), k.storage.size() * 2, "k");
  emu::register_buffer(v.storage.data(), v.storage.size() * 2, "v");

  ForwardParams p{};
  p.q = q.storage.data();
  p.k = k.storage.data();
  p.v = v.storage.data();
  p.q_batch_stride = q.strides[0], p.q_head_stride = q.strides[1], p.q_row_stride = q.strides[2];
  p.k_batch_stride = k.strides[0], p.k_head_stride = k.strides[1], p.k_row_stride = k.strides[2];
  p.v_batch_stride = v.strides[0], p.v_head_stride = v.strides[1], p.v_row_stride = v.strides[2];
  p.batch = batch, p.heads_q = heads_q, p.heads_k = heads_k, p.seqlen_q = seqlen_q, p.seqlen_k = seqlen_k;
  p.scale = float(real(c, "scale"));
  p.window_left = int(integer(c, "window_left"));
  p.window_right = int(integer(c, "window_right"));
  p.diagonal_offset = integer(c, "diagonal_offset");
  p.softcap = float(real(c, "softcap"));
  std::vector<int> cu_seqlens_q, cu_seqlens_k;
  p.lse_batch_stride = int64_t(heads_q) * seqlen_q;
  p.lse_head_stride = seqlen_q;
  if (varlen) {
    for (const std::string& value : field(c, "cu_seqlens_q")) cu_seqlens_q.push_back(std::stoi(value));
    for (const std::string& value : field(c, "cu_seqlens_k")) cu_seqlens_k.push_back(std::stoi(value));
    if (cu_seqlens_q.size() != size_t(batch) + 1 || cu_seqlens_k.size() != size_t(batch) + 1)
      throw std::runtime_error("cu_seqlens_q and cu_seqlens_k need batch + 1 entries");
    emu::register_buffer(cu_seqlens_q.data(), cu_seqlens_q.size() * 4, "cu_seqlens_q");
    emu::register_buffer(cu_seqlens_k.data(), cu_seqlens_k.size() * 4, "cu_seqlens_k");
    p.cu_seqlens_q = cu_seqlens_q.data();
    p.cu_seqlens_k = cu_seqlens_k.data();
    p.align_to_end = integer(c, "align_to_end") != 0;
    p.lse_batch_stride = 0;
    p.lse_head_stride = rows_q;
  }

  std::vector<float> alibi;
  if (integer(c, "alibi") != 0) {
    alibi = read_file<float>(dir + "/alibi.bin", size_t(integer(c, "alibi_count")));
    emu::register_buffer(alibi.data(), alibi.size() * 4, "alibi_slopes");
    p.alibi_slopes = alibi.data();
    p.alibi_batch_stride = integer(c, "alibi_batch_stride");
  }
  std::vector<unsigned char> mask_bytes;
  const std::string mask = word(c, "mask");
  p.mask_kind = mask == "bool" ? MaskKind::kBool : mask == "additive" ? MaskKind::kAdditive : MaskKind::kNone;
  if (p.mask_kind != MaskKind::kNone) {
    const size_t element = p.mask_kind == MaskKind::kBool ? 1 : 2;
    mask_bytes = read_file<unsigned char>(dir + "/mask.bin", size_t(integer(c, "mask_storage")) * element);
    emu::register_buffer(mask_bytes.data(), mask_bytes.size(), "mask");
    p.mask = mask_bytes.data();
    for (int i = 0; i < 4; ++i) p.mask_strides[i] = integer(c, "mask_strides", i);
  }
  prepare_scores(p);

  Operand out = new_output(q, batch, heads_q, rows_q, HEAD_DIM, varlen);
  std::vector<float> lse(size_t(varlen ? 1 : batch) * heads_q * rows_q, NAN);
  emu::register_buffer(out.storage.data(), out.storage.size() * 2, "out");
  emu::register_buffer(lse.data(), lse.size() * 4, "lse");
  p.out = out.storage.data();
  p.out_batch_stride = out.strides[0], p.out_head_stride = out.strides[1], p.out_row_stride = out.strides[2];
  p.lse = lse.data();

  EmulationLauncher launch;
  run_attention_forward<E, HEAD_DIM>(p, launch);
  write_file(dir + "/out.bin", gather(out, batch, heads_q, rows_q, HEAD_DIM, varlen));
  write_file(dir + "/lse.bin", lse);

  if (integer(c, "backward") != 0) {
    Operand grad_out = read_operand(c, dir, "grad_out");
    emu::register_buffer(grad_out.storage.data(), grad_out.storage.size() * 2, "grad_out");
    BackwardParams b{};
    static_cast<ForwardParams&>(b) = p;
    b.out_fwd = out.storage.data();
    b.o_batch_stride = out.strides[0], b.o_head_stride = out.strides[1], b.o_row_stride = out.strides[2];
    b.grad_out = grad_out.storage.data();
    b.do_batch_stride = grad_out.strides[0], b.do_head_stride = grad_out.strides[1];
    b.do_row_stride = grad_out.strides[2];
    b.lse_fwd = lse.data();
    b.padded_seqlen_q = padded_rows(seqlen_q);
    // The workspaces as attention_api.cpp allocates them (attention_params.h's layouts), NaN-poisoned.
    const int64_t row_values_per_head = varlen ? varlen_row_values(rows_q, batch) : b.padded_seqlen_q;
    b.row_values_head_stride = row_values_per_head;
    b.row_values_batch_stride = varlen ? 0 : int64_t(heads_q) * row_values_per_head;
    b.dq_accum_head_stride = int64_t(rows_q) * HEAD_DIM;
    b.dq_accum_batch_stride = varlen ? 0 : int64_t(heads_q) * rows_q * HEAD_DIM;
    std::vector<float> delta(size_t(varlen ? 1 : batch) * heads_q * row_values_per_head, NAN);
    std::vector<float> lse_log2(delta.size(), NAN);
    emu::register_buffer(delta.data(), delta.size() * 4, "delta");
    emu::register_buffer(lse_log2.data(), lse_log2.size() * 4, "lse_log2");
    b.delta = delta.data();
    b.lse_log2 = lse_log2.data();
    b.deterministic = integer(c, "deterministic") != 0;
    std::vector<float> dq_accum;
    if (!b.deterministic) {
      dq_accum.assign(size_t(varlen ? 1 : batch) * heads_q * rows_q * HEAD_DIM, 0.f);
      emu::register_buffer(dq_accum.data(), dq_accum.size() * 4, "dq_accum");
      b.dq_accum = dq_accum.data();
    }
    Operand dq = new_output(q, batch, heads_q, rows_q, HEAD_DIM, varlen);
    Operand dk = new_output(k, batch, heads_k, rows_k, HEAD_DIM, varlen);
    Operand dv = new_output(v, batch, heads_k, rows_k, HEAD_DIM, varlen);
    emu::register_buffer(dq.storage.data(), dq.storage.size() * 2, "dq");
    emu::register_buffer(dk.storage.data(), dk.storage.size() * 2, "dk");
    emu::register_buffer(dv.storage.data(), dv.storage.size() * 2, "dv");
    b.dq = dq.storage.data(), b.dk = dk.storage.data(), b.dv = dv.storage.data();
    b.dq_batch_stride = dq.strides[0], b.dq_head_stride = dq.strides[1], b.dq_row_stride = dq.strides[2];
    b.dk_batch_stride = dk.strides[0], b.dk_head_stride = dk.strides[1], b.dk_row_stride = dk.strides[2];
    b.dv_batch_stride = dv.strides[0], b.dv_head_stride = dv.strides[1], b.dv_row_stride = dv.strides[2];
    run_attention_backward<E, HEAD_DIM>(b, launch);
    write_file(dir + "/dq.bin", gather(dq, batch, heads_q, rows_q, HEAD_DIM, varlen));
    write_file(dir + "/dk.bin", gather(dk, batch, heads_k, rows_k, HEAD_DIM, varlen));
    write_file(dir + "/dv.bin", gather(dv, batch, heads_k, rows_k, HEAD_DIM, varlen));
  }
  emu::clear_buffers();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASE_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  try {
    const Case c = read_case(dir);
    emu::schedule = c.count("schedule") && word(c, "schedule") == "reverse" ? emu::Schedule::kReverse
                                                                            : emu::Schedule::kForward;
    const std::string dtype = word(c, "dtype");
    const int64_t head_dim = integer(c, "head_dim");
    if (dtype == "fp16" && head_dim == 64) run_case<Fp16, 64>(c, dir);
#ifndef PYATTN_EMULATION_HEAD_DIM_64_ONLY
    else if (dtype == "fp16" && head_dim == 128) run_case<Fp16, 128>(c, dir);
    else if (dtype == "bf16" && head_dim == 64) run_case<Bf16, 64>(c, dir);
    else if (dtype == "bf16" && head_dim == 128) run_case<Bf16, 128>(c, dir);
#endif
    else throw std::runtime_error("no kernel for dtype " + dtype + ", head dim " + std::to_string(head_dim));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "attention_emulation: %s\n", error.what());
    return 2;
  }
  const auto& s = emu::stats;
  std::ofstream stats(dir + "/stats.txt");
  stats << "ctas " << s.ctas << "\nmma " << s.mma << "\nldmatrix " << s.ldmatrix << "\nldmatrix_phases "
        << s.ldmatrix_phases << "\nldmatrix_conflict_wavefronts " << s.ldmatrix_conflict_wavefronts << "\nshfl " << s.shfl
        << "\nbarriers " << s.barriers << "\ncp_async " << s.cp_async << "\n";
  return 0;
}
