"""What every attention backend shares: the dispatch-level signatures and the request features.

Dispatch-level signatures (every backend's implementation has exactly these; the functional layer
has validated and normalised every argument before the call):

  attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap,
            alibi_slopes, dropout_p, deterministic) -> (out, lse)
      q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), Hq % Hk == 0, any strides;
      mask None or 4 dims each 1 or full of (B, Hq, L, S), bool (True = attend) or additive float;
      out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L) float32, or None from a variant that
      computes none (only for requests without the "lse" feature).
  attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   window_left, window_right, diagonal_offset, align_to_end, softcap, alibi_slopes,
                   dropout_p, deterministic) -> (out, lse)
      q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv), cu_seqlens int32 (B + 1,);
      out (total_q, Hq, Dv), lse (Hq, total_q). align_to_end: sequence b's diagonal offset is
      diagonal_offset + S_b − L_b (its own bottom-right corner), found on the device: no host sync.
  attention_weights(q, k, v, *, scale, mask, dropout_p) -> (out, weights)
      the dense layout without the flash options; weights (B, Hq, L, S) are the (dropped-out)
      probabilities, which a fused kernel never forms (MultiheadAttention's need_weights=True).

Semantics of every option: ``pyattn.reference.attention``.

Request features: "mask", "causal", "window", "softcap", "alibi", "dropout", "gqa", "lse" (the caller
wants the log-sum-exp), and "mask_grad" / "alibi_grad" (a float mask / ALiBi slopes that require grad).
Request sizes: batch, heads_q, heads_k, seqlen_q, seqlen_k, diagonal_offset. Operands: q, k, v.
"""

from __future__ import annotations

import torch

FEATURES = frozenset({"mask", "causal", "window", "softcap", "alibi", "dropout", "gqa", "lse", "mask_grad",
                      "alibi_grad"})
EVERY_DEVICE = frozenset({"cpu", "cuda", "meta"})
ANY_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
