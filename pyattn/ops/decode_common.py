"""What every KV-cache attention backend shares: the dispatch-level signature and the request features.

Dispatch-level signature (every backend's implementation has exactly this; the functional layer has validated
every shape, dtype and device, and turned an int ``cache_seqlens`` into a tensor):

  attention_kvcache(q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, cache_batch_idx, scale,
                    window_left, window_right, softcap, alibi_slopes, num_splits, sm_count) -> (out, lse)
      q (B, L, Hq, D) (flash-attn's layout); k_cache/v_cache (B_cache, S_cache, Hk, D/Dv), or paged
      (num_blocks, block_size, Hk, ·) with block_table int32 (B, max_blocks); k/v (B, n, Hk, ·) or None,
      appended in place at cache_seqlens (int32 (B,), contiguous, on q's device) before attending; causal is
      window_right = 0, aligned at the bottom-right (query i at key position i + cache_seqlens[b] + n − L).
      num_splits 0 = the backend's choice; sm_count: the target's SM count (0 unknown).
      out (B, L, Hq, Dv) in q's dtype; lse (B, Hq, L) float32 (float64 for float64 input on the reference).
      Values (cache_seqlens, block indices, cache rows) are checked by backends that can read them for free
      (the reference, CPU variants); the kernels clamp them into the cache and never read or write outside.

Semantics of every option: ``pyattn.reference.decode``.

Request features: "append" (k/v given), "paged" (block_table), "cache_batch_idx", "causal", "window", "softcap",
"alibi", "gqa", "lse" (the caller wants the log-sum-exp). Request sizes: batch, seqlen_q, seqlen_new, heads_q,
heads_k, capacity (positions per sequence), block_size (paged), num_splits. Operands: q, k_cache, v_cache.
"""

from __future__ import annotations

import torch

OP = "attention_kvcache"
FEATURES = frozenset({"append", "paged", "cache_batch_idx", "causal", "window", "softcap", "alibi", "gqa", "lse"})
EVERY_DEVICE = frozenset({"cpu", "cuda", "meta"})
ANY_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
