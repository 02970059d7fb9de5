// FlashAttention-2 backward on mma.sync.m16n8k16 (sm_80+), from the forward's out and lse:
//
//   1. preprocess: delta_i = Σ_d dO_id O_id, and lse_i·log2(e) (+inf where lse = -inf: P = 0 there);
//   2. dK/dV: one CTA per (key tile, kv head, batch) keeps dK, dV in registers (16 keys per warp) and
//      streams the band's query tiles of every query head of its GQA group (no atomics on dK/dV):
//          Sᵀ = K Qᵀ,  dPᵀ = V dOᵀ,  Pᵀ = exp2(x·c − lse·log2 e),  dSᵀ = Pᵀ ∘ (dPᵀ − delta) (∘ (1 − tanh²))
//          dV += Pᵀ dO,  dK += dSᵀ Q                      (dK scaled once at the end)
//      and, unless deterministic, writes dSᵀ to shared memory and adds this tile's dQ = dS K to an fp32
//      buffer with atomics (one pass over the band);
//   3. deterministic: a dQ kernel per (query tile, head, batch) recomputes S and dP over the key band and
//      writes dQ once (2 more GEMMs per tile, bit-reproducible); otherwise a conversion of the fp32 buffer.
// In the varlen layout every kernel works inside one sequence (attention_common.cuh's Sequence); the grids
// cover the longest one and CTAs past their own sequence's end return at once.
// Every transposed product is arranged so that its operands come straight from ldmatrix (.trans where the
// stored layout is the other way round) and the accumulators of one mma feed the next as A fragments.
#pragma once

#include "attention/attention_common.cuh"

namespace pyattn::attention {

// ------------------------------------------------------------------------------------ preprocess

constexpr int kPreprocessWarps = 4;

// Index of (batch, head, row 0) in the per-row workspaces (delta, lse·log2 e): attention_params.h's layout.
PYATTN_DEVICE int64_t row_values_base(const BackwardParams& p, const Sequence& seq, int batch, int head) {
  const int64_t first = p.cu_seqlens_q != nullptr ? varlen_row_values(seq.q_start, batch) : 0;
  return batch * p.row_values_batch_stride + head * p.row_values_head_stride + first;
}

template <int HEAD_DIM>
struct PreprocessShape {
  static constexpr int kThreads = kPreprocessWarps * 32;
  static constexpr uint32_t kSharedBytes = 0;
  static Grid grid(const BackwardParams& p) {
    return {ceil_div(p.padded_seqlen_q, kPreprocessWarps), static_cast<unsigned>(p.heads_q),
            static_cast<unsigned>(p.batch)};
  }
};

// One warp per row, padding rows included (delta 0, lse·log2 e = +inf).
template <class E, int HEAD_DIM>
PYATTN_GLOBAL void PYATTN_LAUNCH_BOUNDS(kPreprocessWarps * 32, 4)
    attention_backward_preprocess_kernel(const BackwardParams p) {
  const int lane = thread_index() & 31, warp = thread_index() >> 5;
  const int row = block_index_x() * kPreprocessWarps + warp, head = block_index_y(), batch = block_index_z();
  if (row >= p.padded_seqlen_q) return;  // the whole warp
  const Sequence seq = sequence_of(p, batch);
  if (row >= padded_rows(seq.seqlen_q)) return;  // varlen: past this sequence's padded tiles
  float delta = 0.f, lse_log2 = INFINITY;
  if (row < seq.seqlen_q) {
    const int64_t packed_row = seq.q_start + row;
    const uint16_t* o = static_cast<const uint16_t*>(p.out_fwd) + batch * p.o_batch_stride +
                        head * p.o_head_stride + packed_row * p.o_row_stride;
    const uint16_t* d_o = static_cast<const uint16_t*>(p.grad_out) + batch * p.do_batch_stride +
                          head * p.do_head_stride + packed_row * p.do_row_stride;
    for (int d = lane; d < HEAD_DIM; d += 32) delta += to_float(E{}, ld_global(d_o + d)) * to_float(E{}, ld_global(o + d));
    const float lse = ld_global(p.lse_fwd + batch * p.lse_batch_stride + head * p.lse_head_stride + packed_row);
    lse_log2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
  }
  for (int mask = 16; mask >= 1; mask /= 2) delta += shfl_xor(delta, mask);
  if (lane == 0) {
    const int64_t index = row_values_base(p, seq, batch, head) + row;
    st_global(p.delta + index, delta);
    st_global(p.lse_log2 + index, lse_log2);
  }
}

// ------------------------------------------------------------------------------------------ dK/dV

template <int HEAD_DIM>
struct DkDvShape {
  using Config = BackwardConfig<HEAD_DIM>;
  static constexpr int kThreads = Config::kWarps * 32;
  static constexpr uint32_t kTileKV = Config::kBlockN * HEAD_DIM * 2;  // K or V
  static constexpr uint32_t kTileQ = Config::kBlockM * HEAD_DIM * 2;   // Q or dO
  static constexpr uint32_t kRowValues = Config::kBlockM * 4;          // lse·log2 e or delta
  static constexpr uint32_t kStage = 2 * kTileQ + 2 * kRowValues;
  static constexpr uint32_t kTileDs = Config::kBlockN * Config::kBlockM * 2;  // dSᵀ, for the fused dQ
  static constexpr uint32_t kSharedBytes = 2 * kTileKV + Config::kStages * kStage + kTileDs;
  static_assert(Config::kBlockN == 16 * Config::kWarps, "a warp owns 16 keys");
  static_assert(kBackwardRowPadding % Config::kBlockM == 0, "the row workspace's padding holds whole query tiles");
  static Grid grid(const BackwardParams& p) {
    return {ceil_div(p.seqlen_k, Config::kBlockN), static_cast<unsigned>(p.heads_k), static_cast<unsigned>(p.batch)};
  }
};

template <class E, int HEAD_DIM>
PYATTN_GLOBAL void PYATTN_LAUNCH_BOUNDS(DkDvShape<HEAD_DIM>::kThreads, 1)
    attention_backward_dkdv_kernel(const BackwardParams p) {
  using Config = BackwardConfig<HEAD_DIM>;
  using Shape = DkDvShape<HEAD_DIM>;
  constexpr int BLOCK_N = Config::kBlockN, BLOCK_M = Config::kBlockM, STAGES = Config::kStages;
  constexpr int THREADS = Shape::kThreads, WARPS = Config::kWarps;
  constexpr int ROW_CHUNKS = HEAD_DIM / 8;
  constexpr int K_STEPS = HEAD_DIM / 16;     // k16 steps over the head dim
  constexpr int Q_TILES = BLOCK_M / 8;       // n8 tiles of Sᵀ (queries)
  constexpr int Q_STEPS = BLOCK_M / 16;      // k16 steps over queries
  constexpr int D_TILES = HEAD_DIM / 8;      // n8 tiles of dK, dV
  constexpr int DS_ROW_CHUNKS = BLOCK_M / 8;

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int group_row = lane >> 2, quad = lane & 3;
  const int n0 = block_index_x() * BLOCK_N, head_k = block_index_y(), batch = block_index_z();
  const Sequence seq = sequence_of(p, batch);
  if (n0 >= seq.seqlen_k) return;  // varlen: past this sequence's end
  const int group = p.heads_q / p.heads_k;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + batch * p.k_batch_stride + head_k * p.k_head_stride +
                      seq.k_start * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + batch * p.v_batch_stride + head_k * p.v_head_stride +
                      seq.k_start * p.v_row_stride;
  const int keys[2] = {n0 + warp * 16 + group_row, n0 + warp * 16 + group_row + 8};

  float dk[D_TILES][4], dv[D_TILES][4];
  #pragma unroll
  for (int nt = 0; nt < D_TILES; ++nt)
    #pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.f;

  const Band band = query_tiles<BLOCK_M, BLOCK_N>(p, seq, n0);
  const int tiles = band.end - band.begin, items = tiles * group;  // (query head of the group, query tile)

  const uint32_t shared = shared_base();
  const uint32_t k_tile = shared, v_tile = shared + Shape::kTileKV;
  const uint32_t stages = shared + 2 * Shape::kTileKV;  // stage s: Q, dO, lse·log2 e, delta
  const uint32_t ds_tile = stages + STAGES * Shape::kStage;

  auto item_head = [&](int item) { return head_k * group + item / tiles; };
  auto item_m0 = [&](int item) { return (band.begin + item % tiles) * BLOCK_M; };
  auto load_item = [&](int item, int stage) {
    const int head = item_head(item), m0 = item_m0(item);
    const uint32_t base = stages + stage * Shape::kStage;
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
                        seq.q_start * p.q_row_stride;
    const uint16_t* d_o = static_cast<const uint16_t*>(p.grad_out) + batch * p.do_batch_stride +
                          head * p.do_head_stride + seq.q_start * p.do_row_stride;
    load_tile<BLOCK_M, HEAD_DIM, THREADS>(base, q, p.q_row_stride, m0, seq.seqlen_q);
    load_tile<BLOCK_M, HEAD_DIM, THREADS>(base + Shape::kTileQ, d_o, p.do_row_stride, m0, seq.seqlen_q);
    const int64_t row_values = row_values_base(p, seq, batch, head) + m0;
    load_row_values<BLOCK_M>(base + 2 * Shape::kTileQ, p.lse_log2 + row_values);
    load_row_values<BLOCK_M>(base + 2 * Shape::kTileQ + Shape::kRowValues, p.delta + row_values);
  };

  if (items > 0) {
    load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_tile, k, p.k_row_stride, n0, seq.seqlen_k);
    load_tile<BLOCK_N, HEAD_DIM, THREADS>(v_tile, v, p.v_row_stride, n0, seq.seqlen_k);
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < items) load_item(s, s);
      cp_async_commit();
    }
  }
  const float c = p.score_scale_log2;

  for (int it = 0; it < items; ++it) {
    cp_async_wait<STAGES - 2>();
    syncthreads();  // item `it` landed everywhere; the previous item's stage and dSᵀ are free
    {
      const int refill = it + STAGES - 1;
      if (refill < items) load_item(refill, refill % STAGES);
      cp_async_commit();
    }
    const int head = item_head(it), m0 = item_m0(it);
    const uint32_t q_tile = stages + (it % STAGES) * Shape::kStage;
    const uint32_t do_tile = q_tile + Shape::kTileQ;
    const uint32_t lse_values = do_tile + Shape::kTileQ, delta_values = lse_values + Shape::kRowValues;
    const ScoreTerms terms = score_terms<E>(p, batch, head);

    // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: this warp's 16 keys against the tile's queries.
    float st[Q_TILES][4], dpt[Q_TILES][4];
    #pragma unroll
    for (int nt = 0; nt < Q_TILES; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
    #pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
      uint32_t a_k[4], a_v[4];
      ldmatrix_x4(a_k, rows_first<ROW_CHUNKS>(k_tile, warp * 16, 2 * kk, lane));
      ldmatrix_x4(a_v, rows_first<ROW_CHUNKS>(v_tile, warp * 16, 2 * kk, lane));
      #pragma unroll
      for (int nt = 0; nt < Q_TILES; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, chunks_first<ROW_CHUNKS>(q_tile, nt * 8, 2 * kk, lane));
        const uint32_t bq0[2] = {b[0], b[1]}, bq1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(st[nt], a_k, bq0);
        mma_m16n8k16<E>(st[nt + 1], a_k, bq1);
        ldmatrix_x4(b, chunks_first<ROW_CHUNKS>(do_tile, nt * 8, 2 * kk, lane));
        const uint32_t bo0[2] = {b[0], b[1]}, bo1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(dpt[nt], a_v, bo0);
        mma_m16n8k16<E>(dpt[nt + 1], a_v, bo1);
      }
    }

    // Pᵀ and dSᵀ element by element (key j = row, query i = column), packed as A fragments.
    const bool crosses_window = tile_crosses_window<BLOCK_M, BLOCK_N>(p, seq, m0, n0);
    const bool transform = !p.plain_scores || crosses_window || p.mask_kind != MaskKind::kNone;
    uint32_t pt[Q_STEPS][4], dst[Q_STEPS][4];
    #pragma unroll
    for (int nt = 0; nt < Q_TILES; ++nt) {
      float lse_log2[2], delta[2];
      ld_shared_f32x2(lse_values + (nt * 8 + 2 * quad) * 4, lse_log2[0], lse_log2[1]);
      ld_shared_f32x2(delta_values + (nt * 8 + 2 * quad) * 4, delta[0], delta[1]);
      #pragma unroll
      for (int r = 0; r < 2; ++r) {
        float probability[2], grad_score[2];
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          float x = st[nt][2 * r + h], tanh_value = 0.f;
          if (transform) x = transformed_score<E>(p, seq, terms, x, m0 + nt * 8 + 2 * quad + h, keys[r],
                                                  crosses_window, tanh_value);
          probability[h] = fast_exp2(fmaf(x, c, -lse_log2[h]));
          grad_score[h] = probability[h] * (dpt[nt][2 * r + h] - delta[h]);
          if (p.softcap > 0.f) grad_score[h] *= 1.f - tanh_value * tanh_value;
        }
        pt[nt / 2][(nt & 1) * 2 + r] = pack_pair(E{}, probability[0], probability[1]);
        dst[nt / 2][(nt & 1) * 2 + r] = pack_pair(E{}, grad_score[0], grad_score[1]);
      }
    }

    // dV += Pᵀ dO and dK += dSᵀ Q (dO and Q as K-major B operands through ldmatrix.trans).
    #pragma unroll
    for (int kk = 0; kk < Q_STEPS; ++kk) {
      #pragma unroll
      for (int nt = 0; nt < D_TILES; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, rows_first<ROW_CHUNKS>(do_tile, kk * 16, nt, lane));
        const uint32_t bo0[2] = {b[0], b[1]}, bo1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(dv[nt], pt[kk], bo0);
        mma_m16n8k16<E>(dv[nt + 1], pt[kk], bo1);
        ldmatrix_x4_trans(b, rows_first<ROW_CHUNKS>(q_tile, kk * 16, nt, lane));
        const uint32_t bq0[2] = {b[0], b[1]}, bq1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(dk[nt], dst[kk], bq0);
        mma_m16n8k16<E>(dk[nt + 1], dst[kk], bq1);
      }
    }

    if (!p.deterministic) {
      // dSᵀ (keys x queries) to shared memory; then this CTA's dQ share = dS K for the tile's queries:
      // warp w takes m16 tile w % (BLOCK_M / 16) and a quarter or half of the head dim.
      #pragma unroll
      for (int kk = 0; kk < Q_STEPS; ++kk)
        #pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
          const int key = warp * 16 + group_row + 8 * (reg & 1), query = kk * 16 + 8 * (reg >> 1) + 2 * quad;
          st_shared_b32(ds_tile + tile_offset<DS_ROW_CHUNKS>(key, query / 8) + (query % 8) * 2, dst[kk][reg]);
        }
      syncthreads();
      constexpr int M_TILES = BLOCK_M / 16;
      constexpr int N_PER_WARP = D_TILES * M_TILES / WARPS;
      static_assert(WARPS % M_TILES == 0 && N_PER_WARP % 2 == 0, "dQ work splits evenly over the warps");
      const int mt = warp % M_TILES, n_first = (warp / M_TILES) * N_PER_WARP;
      float dq[N_PER_WARP][4];
      #pragma unroll
      for (int j = 0; j < N_PER_WARP; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) dq[j][e] = 0.f;
      #pragma unroll
      for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, chunks_first<DS_ROW_CHUNKS>(ds_tile, kk * 16, 2 * mt, lane));
        #pragma unroll
        for (int j = 0; j < N_PER_WARP; j += 2) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, rows_first<ROW_CHUNKS>(k_tile, kk * 16, n_first + j, lane));
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          mma_m16n8k16<E>(dq[j], a, b0);
          mma_m16n8k16<E>(dq[j + 1], a, b1);
        }
      }
      float* accum = p.dq_accum + batch * p.dq_accum_batch_stride + head * p.dq_accum_head_stride +
                     seq.q_start * HEAD_DIM;
      #pragma unroll
      for (int j = 0; j < N_PER_WARP; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + mt * 16 + group_row + 8 * (e >> 1), col = (n_first + j) * 8 + 2 * quad + (e & 1);
          if (row < seq.seqlen_q) atomic_add_f32(accum + int64_t(row) * HEAD_DIM + col, dq[j][e]);
        }
    }
  }
  cp_async_wait<0>();

  // dK = scale · Σ dSᵀ Q, dV = Σ Pᵀ dO (zero for keys no query sees).
  uint16_t* dk_out = static_cast<uint16_t*>(p.dk) + batch * p.dk_batch_stride + head_k * p.dk_head_stride +
                     seq.k_start * p.dk_row_stride;
  uint16_t* dv_out = static_cast<uint16_t*>(p.dv) + batch * p.dv_batch_stride + head_k * p.dv_head_stride +
                     seq.k_start * p.dv_row_stride;
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (keys[r] >= seq.seqlen_k) continue;
    #pragma unroll
    for (int nt = 0; nt < D_TILES; ++nt) {
      const int col = nt * 8 + 2 * quad;
      st_global(reinterpret_cast<uint32_t*>(dk_out + keys[r] * p.dk_row_stride + col),
                pack_pair(E{}, dk[nt][2 * r] * p.scale, dk[nt][2 * r + 1] * p.scale));
      st_global(reinterpret_cast<uint32_t*>(dv_out + keys[r] * p.dv_row_stride + col),
                pack_pair(E{}, dv[nt][2 * r], dv[nt][2 * r + 1]));
    }
  }
}

// ------------------------------------------------------------------------------- deterministic dQ

template <int HEAD_DIM>
struct DqShape {
  using Config = DqConfig<HEAD_DIM>;
  static constexpr int kThreads = Config::kWarps * 32;
  static constexpr uint32_t kTileQ = Config::kBlockM * HEAD_DIM * 2;   // Q or dO
  static constexpr uint32_t kTileKV = Config::kBlockN * HEAD_DIM * 2;  // K or V
  static constexpr uint32_t kSharedBytes = 2 * kTileQ + Config::kStages * 2 * kTileKV;
  static_assert(Config::kBlockM == 16 * Config::kWarps, "a warp owns 16 query rows");
  static Grid grid(const BackwardParams& p) {
    return {ceil_div(p.seqlen_q, Config::kBlockM), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)};
  }
};

template <class E, int HEAD_DIM>
PYATTN_GLOBAL void PYATTN_LAUNCH_BOUNDS(DqShape<HEAD_DIM>::kThreads, 1)
    attention_backward_dq_kernel(const BackwardParams p) {
  using Config = DqConfig<HEAD_DIM>;
  using Shape = DqShape<HEAD_DIM>;
  constexpr int BLOCK_M = Config::kBlockM, BLOCK_N = Config::kBlockN, STAGES = Config::kStages;
  constexpr int THREADS = Shape::kThreads;
  constexpr int ROW_CHUNKS = HEAD_DIM / 8, K_STEPS = HEAD_DIM / 16, S_TILES = BLOCK_N / 8, D_TILES = HEAD_DIM / 8;

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int group_row = lane >> 2, quad = lane & 3;
  const int m0 = block_index_x() * BLOCK_M, head = block_index_y(), batch = block_index_z();
  const Sequence seq = sequence_of(p, batch);
  if (m0 >= seq.seqlen_q) return;  // varlen: past this sequence's end
  const int head_k = head / (p.heads_q / p.heads_k);
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
                      seq.q_start * p.q_row_stride;
  const uint16_t* d_o = static_cast<const uint16_t*>(p.grad_out) + batch * p.do_batch_stride +
                        head * p.do_head_stride + seq.q_start * p.do_row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + batch * p.k_batch_stride + head_k * p.k_head_stride +
                      seq.k_start * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + batch * p.v_batch_stride + head_k * p.v_head_stride +
                      seq.k_start * p.v_row_stride;
  uint16_t* dq_out = static_cast<uint16_t*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride +
                     seq.q_start * p.dq_row_stride;
  const int rows[2] = {m0 + warp * 16 + group_row, m0 + warp * 16 + group_row + 8};

  float acc[D_TILES][4];
  #pragma unroll
  for (int nt = 0; nt < D_TILES; ++nt)
    #pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

  const Band band = key_tiles<BLOCK_M, BLOCK_N>(p, seq, m0);
  const uint32_t shared = shared_base();
  const uint32_t q_tile = shared, do_tile = shared + Shape::kTileQ, kv_tiles = shared + 2 * Shape::kTileQ;
  if (band.begin < band.end) {
    load_tile<BLOCK_M, HEAD_DIM, THREADS>(q_tile, q, p.q_row_stride, m0, seq.seqlen_q);
    load_tile<BLOCK_M, HEAD_DIM, THREADS>(do_tile, d_o, p.do_row_stride, m0, seq.seqlen_q);
    for (int s = 0; s < STAGES - 1; ++s) {
      const int n = band.begin + s;
      if (n < band.end) {
        const uint32_t k_stage = kv_tiles + 2 * s * Shape::kTileKV;
        load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_stage, k, p.k_row_stride, n * BLOCK_N, seq.seqlen_k);
        load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_stage + Shape::kTileKV, v, p.v_row_stride, n * BLOCK_N,
                                              seq.seqlen_k);
      }
      cp_async_commit();
    }
  }
  const int64_t row_values = row_values_base(p, seq, batch, head);
  const float lse_log2[2] = {ld_global(p.lse_log2 + row_values + rows[0]), ld_global(p.lse_log2 + row_values + rows[1])};
  const float delta[2] = {ld_global(p.delta + row_values + rows[0]), ld_global(p.delta + row_values + rows[1])};
  const ScoreTerms terms = score_terms<E>(p, batch, head);
  const float c = p.score_scale_log2;

  for (int n = band.begin, it = 0; n < band.end; ++n, ++it) {
    cp_async_wait<STAGES - 2>();
    syncthreads();
    {
      const int refill = n + STAGES - 1;
      if (refill < band.end) {
        const uint32_t k_stage = kv_tiles + 2 * ((it + STAGES - 1) % STAGES) * Shape::kTileKV;
        load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_stage, k, p.k_row_stride, refill * BLOCK_N, seq.seqlen_k);
        load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_stage + Shape::kTileKV, v, p.v_row_stride, refill * BLOCK_N,
                                              seq.seqlen_k);
      }
      cp_async_commit();
    }
    const uint32_t k_tile = kv_tiles + 2 * (it % STAGES) * Shape::kTileKV, v_tile = k_tile + Shape::kTileKV;

    // S = Q Kᵀ and dP = dO Vᵀ for this warp's 16 rows.
    float s[S_TILES][4], dp[S_TILES][4];
    #pragma unroll
    for (int nt = 0; nt < S_TILES; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    #pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
      uint32_t a_q[4], a_do[4];
      ldmatrix_x4(a_q, rows_first<ROW_CHUNKS>(q_tile, warp * 16, 2 * kk, lane));
      ldmatrix_x4(a_do, rows_first<ROW_CHUNKS>(do_tile, warp * 16, 2 * kk, lane));
      #pragma unroll
      for (int nt = 0; nt < S_TILES; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, chunks_first<ROW_CHUNKS>(k_tile, nt * 8, 2 * kk, lane));
        const uint32_t bk0[2] = {b[0], b[1]}, bk1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(s[nt], a_q, bk0);
        mma_m16n8k16<E>(s[nt + 1], a_q, bk1);
        ldmatrix_x4(b, chunks_first<ROW_CHUNKS>(v_tile, nt * 8, 2 * kk, lane));
        const uint32_t bv0[2] = {b[0], b[1]}, bv1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(dp[nt], a_do, bv0);
        mma_m16n8k16<E>(dp[nt + 1], a_do, bv1);
      }
    }

    const bool crosses_window = tile_crosses_window<BLOCK_M, BLOCK_N>(p, seq, m0, n * BLOCK_N);
    const bool transform = !p.plain_scores || crosses_window || p.mask_kind != MaskKind::kNone;
    float ds[S_TILES][4];
    #pragma unroll
    for (int nt = 0; nt < S_TILES; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float x = s[nt][e], tanh_value = 0.f;
        if (transform)
          x = transformed_score<E>(p, seq, terms, x, rows[r], n * BLOCK_N + nt * 8 + 2 * quad + (e & 1),
                                   crosses_window, tanh_value);
        const float probability = fast_exp2(fmaf(x, c, -lse_log2[r]));
        ds[nt][e] = probability * (dp[nt][e] - delta[r]);
        if (p.softcap > 0.f) ds[nt][e] *= 1.f - tanh_value * tanh_value;
      }

    // dQ += dS K (K as a K-major B operand through ldmatrix.trans).
    #pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t a[4];
      accumulators_to_a<E>(a, ds[2 * kk], ds[2 * kk + 1]);
      #pragma unroll
      for (int nt = 0; nt < D_TILES; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, rows_first<ROW_CHUNKS>(k_tile, kk * 16, nt, lane));
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(acc[nt], a, b0);
        mma_m16n8k16<E>(acc[nt + 1], a, b1);
      }
    }
  }
  cp_async_wait<0>();

  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= seq.seqlen_q) continue;
    #pragma unroll
    for (int nt = 0; nt < D_TILES; ++nt)
      st_global(reinterpret_cast<uint32_t*>(dq_out + rows[r] * p.dq_row_stride + nt * 8 + 2 * quad),
                pack_pair(E{}, acc[nt][2 * r] * p.scale, acc[nt][2 * r + 1] * p.scale));
  }
}

// ----------------------------------------------------------------------------- dQ from the fp32 sums

constexpr int kConvertRows = 16;

template <int HEAD_DIM>
struct ConvertShape {
  static constexpr int kThreads = 128;
  static constexpr uint32_t kSharedBytes = 0;
  static Grid grid(const BackwardParams& p) {
    return {ceil_div(p.seqlen_q, kConvertRows), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)};
  }
};

template <class E, int HEAD_DIM>
PYATTN_GLOBAL void PYATTN_LAUNCH_BOUNDS(128, 4) attention_backward_convert_dq_kernel(const BackwardParams p) {
  const int m0 = block_index_x() * kConvertRows, head = block_index_y(), batch = block_index_z();
  const Sequence seq = sequence_of(p, batch);
  const float* accum = p.dq_accum + batch * p.dq_accum_batch_stride + head * p.dq_accum_head_stride +
                       seq.q_start * HEAD_DIM;
  uint16_t* dq_out = static_cast<uint16_t*>(p.dq) + batch * p.dq_batch_stride + head * p.dq_head_stride +
                     seq.q_start * p.dq_row_stride;
  for (int index = thread_index(); index < kConvertRows * HEAD_DIM / 2; index += 128) {
    const int row = m0 + index / (HEAD_DIM / 2), col = 2 * (index % (HEAD_DIM / 2));
    if (row >= seq.seqlen_q) break;
    const float* pair = accum + int64_t(row) * HEAD_DIM + col;
    st_global(reinterpret_cast<uint32_t*>(dq_out + row * p.dq_row_stride + col),
              pack_pair(E{}, ld_global(pair) * p.scale, ld_global(pair + 1) * p.scale));
  }
}

}  // namespace pyattn::attention
