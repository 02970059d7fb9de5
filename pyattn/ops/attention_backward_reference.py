"""The attention backward on the reference backend: FlashAttention-2's formulas in plain PyTorch.

Dispatch-level signature (shared with ``attention_backward_triton``; the functional layer,
``pyattn.functional.attention_backward``, has validated every argument):

  attention_backward(grad_out, q, k, v, out, lse, *, scale, window_left, window_right, diagonal_offset,
                     softcap) -> (dq, dk, dv)
      the dense layout of ``attention_common``: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv),
      grad_out and out (B, Hq, L, Dv), lse (B, Hq, L); dk/dv summed over each query group (GQA).

``out`` and ``lse`` are taken as given (never recomputed): a caller holding a row's *final*
statistics from several key blocks (ring attention) gets each block's share of the gradient.
"""

from __future__ import annotations

from pyattn._registry import Support, register
from pyattn.ops.attention_common import ANY_FLOAT, EVERY_DEVICE
from pyattn.reference import attention as reference

# The options the backward takes: a window (causal is its right edge at 0), softcap, grouped heads.
BACKWARD_FEATURES = frozenset({"causal", "window", "softcap", "gqa"})

_SUPPORT = Support(devices=EVERY_DEVICE, dtypes=ANY_FLOAT, features=BACKWARD_FEATURES)


@register("reference", "attention_backward", _SUPPORT,
          summary="plain PyTorch FlashAttention-2 backward from the given out and lse, float64-capable")
def reference_attention_backward(grad_out, q, k, v, out, lse, *, scale, window_left, window_right, diagonal_offset,
                                 softcap):
    return reference.attention_backward(grad_out, q, k, v, out, lse, scale=scale, window_left=window_left,
                                        window_right=window_right, diagonal_offset=diagonal_offset, softcap=softcap)
