// FlashAttention-2 forward on mma.sync.m16n8k16 (sm_80+): one CTA per (query tile, head, batch).
//
// The CTA loads its Q tile once (cp.async, swizzled), keeps each warp's 16 query rows as A fragments in
// registers, and streams the band of K/V tiles through a kStages-deep cp.async ring. Per K/V tile a warp
// computes S = Q Kᵀ (16 x BLOCK_N, fp32), transforms and masks it where needed, and updates its rows'
// online softmax in log2 units:
//     m' = max(m, rowmax(x));  α = exp2((m − m')·c);  P = exp2(x·c − m'·c)   (one FFMA + EX2)
//     ℓ = α ℓ + rowsum(P);     O = α O + P V
// with c = scale·log2(e) when x = q·k (the scale folded into the FFMA), or log2(e) when x is already the
// transformed logit (softcap, ALiBi, additive mask). P's accumulators become the A fragments of P·V in
// registers. A row that has seen no visible key keeps m = −inf and is shifted by 0 (never −inf − −inf),
// so ℓ = 0 at the end gives out = 0 and lse = −inf. In the varlen layout the grid covers the longest
// sequence; a CTA past its own sequence's end returns at once.
#pragma once

#include "attention/attention_common.cuh"

namespace pyattn::attention {

template <int HEAD_DIM>
struct ForwardShape {
  using Config = ForwardConfig<HEAD_DIM>;
  static constexpr int kThreads = Config::kWarps * 32;
  static constexpr uint32_t kTileQ = Config::kBlockM * HEAD_DIM * 2;
  static constexpr uint32_t kTileKV = Config::kBlockN * HEAD_DIM * 2;
  static constexpr uint32_t kSharedBytes = kTileQ + Config::kStages * 2 * kTileKV;
  static_assert(Config::kBlockM == 16 * Config::kWarps, "a warp owns 16 query rows");
  static Grid grid(const ForwardParams& p) {
    return {ceil_div(p.seqlen_q, Config::kBlockM), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)};
  }
};

template <class E, int HEAD_DIM>
PYATTN_GLOBAL void PYATTN_LAUNCH_BOUNDS(ForwardShape<HEAD_DIM>::kThreads, 1)
    attention_forward_kernel(const ForwardParams p) {
  using Config = ForwardConfig<HEAD_DIM>;
  using Shape = ForwardShape<HEAD_DIM>;
  constexpr int BLOCK_M = Config::kBlockM, BLOCK_N = Config::kBlockN, STAGES = Config::kStages;
  constexpr int THREADS = Shape::kThreads;
  constexpr int ROW_CHUNKS = HEAD_DIM / 8;  // 16-byte chunks per row of Q, K, V
  constexpr int K_STEPS = HEAD_DIM / 16;    // k16 steps of Q Kᵀ
  constexpr int S_TILES = BLOCK_N / 8;      // n8 tiles of S
  constexpr int O_TILES = HEAD_DIM / 8;     // n8 tiles of O

  const int tid = thread_index(), lane = tid & 31, warp = tid >> 5;
  const int group_row = lane >> 2, quad = lane & 3;  // a lane holds rows g, g + 8 and columns 2t, 2t + 1
  const int m0 = block_index_x() * BLOCK_M, head = block_index_y(), batch = block_index_z();
  const Sequence seq = sequence_of(p, batch);
  if (m0 >= seq.seqlen_q) return;  // varlen: past this sequence's end
  const int head_k = head / (p.heads_q / p.heads_k);
  const uint16_t* q = static_cast<const uint16_t*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
                      seq.q_start * p.q_row_stride;
  const uint16_t* k = static_cast<const uint16_t*>(p.k) + batch * p.k_batch_stride + head_k * p.k_head_stride +
                      seq.k_start * p.k_row_stride;
  const uint16_t* v = static_cast<const uint16_t*>(p.v) + batch * p.v_batch_stride + head_k * p.v_head_stride +
                      seq.k_start * p.v_row_stride;
  uint16_t* out = static_cast<uint16_t*>(p.out) + batch * p.out_batch_stride + head * p.out_head_stride +
                  seq.q_start * p.out_row_stride;
  float* lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + seq.q_start;
  const int rows[2] = {m0 + warp * 16 + group_row, m0 + warp * 16 + group_row + 8};

  const Band band = key_tiles<BLOCK_M, BLOCK_N>(p, seq, m0);
  if (band.begin >= band.end) {  // no row of this tile sees a key: out = 0, lse = -inf
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] >= seq.seqlen_q) continue;
      #pragma unroll
      for (int nt = 0; nt < O_TILES; ++nt)
        st_global(reinterpret_cast<uint32_t*>(out + rows[r] * p.out_row_stride + nt * 8 + 2 * quad), 0u);
      if (quad == 0) st_global(lse + rows[r], -INFINITY);
    }
    return;
  }

  const uint32_t shared = shared_base();
  const uint32_t q_tile = shared;
  const uint32_t kv_tiles = shared + Shape::kTileQ;  // stage s: K at + 2s·kTileKV, V after it

  // Prologue: Q with the first K/V tile in group 0, then K/V tiles 1 .. STAGES - 2, one group each
  // (committed even when empty, so that "tile n has landed" is always wait_group<STAGES - 2>).
  load_tile<BLOCK_M, HEAD_DIM, THREADS>(q_tile, q, p.q_row_stride, m0, seq.seqlen_q);
  for (int s = 0; s < STAGES - 1; ++s) {
    const int n = band.begin + s;
    if (n < band.end) {
      const uint32_t k_tile = kv_tiles + 2 * s * Shape::kTileKV;
      load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_tile, k, p.k_row_stride, n * BLOCK_N, seq.seqlen_k);
      load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_tile + Shape::kTileKV, v, p.v_row_stride, n * BLOCK_N, seq.seqlen_k);
    }
    cp_async_commit();
  }

  const ScoreTerms terms = score_terms<E>(p, batch, head);
  const float c = p.score_scale_log2;
  uint32_t q_fragments[K_STEPS][4];
  float acc[O_TILES][4];
  #pragma unroll
  for (int nt = 0; nt < O_TILES; ++nt)
    #pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this lane's columns only; the quad's sum is taken at the end

  for (int n = band.begin, it = 0; n < band.end; ++n, ++it) {
    cp_async_wait<STAGES - 2>();  // tile n (and, at it = 0, Q) has landed for this thread's copies
    syncthreads();                // ... and everyone's; everyone is also done with tile n - 1's stage
    if (it == 0) {
      #pragma unroll
      for (int kk = 0; kk < K_STEPS; ++kk)
        ldmatrix_x4(q_fragments[kk], rows_first<ROW_CHUNKS>(q_tile, warp * 16, 2 * kk, lane));
    }
    {  // refill the stage tile n - 1 used with tile n + STAGES - 1
      const int refill = n + STAGES - 1;
      if (refill < band.end) {
        const uint32_t k_tile = kv_tiles + 2 * ((it + STAGES - 1) % STAGES) * Shape::kTileKV;
        load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_tile, k, p.k_row_stride, refill * BLOCK_N, seq.seqlen_k);
        load_tile<BLOCK_N, HEAD_DIM, THREADS>(k_tile + Shape::kTileKV, v, p.v_row_stride, refill * BLOCK_N,
                                              seq.seqlen_k);
      }
      cp_async_commit();
    }
    const uint32_t k_tile = kv_tiles + 2 * (it % STAGES) * Shape::kTileKV;
    const uint32_t v_tile = k_tile + Shape::kTileKV;

    // S = Q Kᵀ for this warp's 16 rows.
    float s[S_TILES][4];
    #pragma unroll
    for (int nt = 0; nt < S_TILES; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    #pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
      #pragma unroll
      for (int nt = 0; nt < S_TILES; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, chunks_first<ROW_CHUNKS>(k_tile, nt * 8, 2 * kk, lane));
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(s[nt], q_fragments[kk], b0);
        mma_m16n8k16<E>(s[nt + 1], q_fragments[kk], b1);
      }
    }

    // Transform and mask only where needed: interior tiles of a plain call keep x = q·k as it is.
    const bool crosses_window = tile_crosses_window<BLOCK_M, BLOCK_N>(p, seq, m0, n * BLOCK_N);
    if (!p.plain_scores || crosses_window || p.mask_kind != MaskKind::kNone) {
      #pragma unroll
      for (int nt = 0; nt < S_TILES; ++nt)
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          float unused;
          const int j = n * BLOCK_N + nt * 8 + 2 * quad + (e & 1);
          s[nt][e] = transformed_score<E>(p, seq, terms, s[nt][e], rows[e >> 1], j, crosses_window, unused);
        }
    }

    // Online softmax: the quad (4 lanes) holding a row agrees on its maximum.
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
      #pragma unroll
      for (int nt = 0; nt < S_TILES; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      tile_max = fmaxf(tile_max, shfl_xor(tile_max, 1));
      tile_max = fmaxf(tile_max, shfl_xor(tile_max, 2));
      const float new_max = fmaxf(row_max[r], tile_max);
      const float shift = new_max == -INFINITY ? 0.f : new_max * c;  // a row with no visible key yet: 0
      const float alpha = fast_exp2(row_max[r] * c - shift);
      row_max[r] = new_max;
      float sum = 0.f;
      #pragma unroll
      for (int nt = 0; nt < S_TILES; ++nt)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float probability = fast_exp2(fmaf(s[nt][2 * r + h], c, -shift));
          s[nt][2 * r + h] = probability;
          sum += probability;
        }
      row_sum[r] = row_sum[r] * alpha + sum;
      #pragma unroll
      for (int nt = 0; nt < O_TILES; ++nt) {
        acc[nt][2 * r] *= alpha;
        acc[nt][2 * r + 1] *= alpha;
      }
    }

    // O += P V: P's accumulators are the A fragments; V's B fragments come through ldmatrix.trans.
    #pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
      uint32_t a[4];
      accumulators_to_a<E>(a, s[2 * kk], s[2 * kk + 1]);
      #pragma unroll
      for (int nt = 0; nt < O_TILES; nt += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, rows_first<ROW_CHUNKS>(v_tile, kk * 16, nt, lane));
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma_m16n8k16<E>(acc[nt], a, b0);
        mma_m16n8k16<E>(acc[nt + 1], a, b1);
      }
    }
  }
  cp_async_wait<0>();  // the ring's trailing groups are empty; retire them before exit

  // Epilogue: out = O / ℓ, lse = m·unit + ln ℓ (natural log), 0 and -inf for rows that saw no key.
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += shfl_xor(sum, 1);
    sum += shfl_xor(sum, 2);
    if (rows[r] >= seq.seqlen_q) continue;
    const float inverse = sum > 0.f ? 1.f / sum : 0.f;
    #pragma unroll
    for (int nt = 0; nt < O_TILES; ++nt)
      st_global(reinterpret_cast<uint32_t*>(out + rows[r] * p.out_row_stride + nt * 8 + 2 * quad),
                pack_pair(E{}, acc[nt][2 * r] * inverse, acc[nt][2 * r + 1] * inverse));
    if (quad == 0) st_global(lse + rows[r], sum > 0.f ? row_max[r] * p.score_unit + logf(sum) : -INFINITY);
  }
}

}  // namespace pyattn::attention
