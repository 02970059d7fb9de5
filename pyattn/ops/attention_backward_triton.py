"""The attention backward on the triton backend: the ``pyattn::triton_attention_bwd`` custom op, called alone.

The dispatch-level signature is ``attention_backward_reference``'s. The op is the one the Triton
forward's autograd calls (preprocess D = rowsum(dO ∘ O), then the dK/dV and dQ passes); here it is
given an ``out`` and ``lse`` from the caller, with no mask, ALiBi or dropout.
"""

from __future__ import annotations

import torch

from pyattn._registry import Support, register
from pyattn.ops.attention_backward_reference import BACKWARD_FEATURES
from pyattn.ops.attention_triton import triton_attention_bwd

_SUPPORT = Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}),
                   dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_head_dim=256,
                   features=BACKWARD_FEATURES)


@register("triton", "attention_backward", _SUPPORT,
          summary="FlashAttention-2 backward kernels (preprocess, dK/dV, dQ) from the given out and lse")
def triton_attention_backward(grad_out, q, k, v, out, lse, *, scale, window_left, window_right, diagonal_offset,
                              softcap):
    return triton_attention_bwd(grad_out, q, k, v, out, lse, None, None, None, None, None, scale, window_left,
                                window_right, diagonal_offset, False, softcap, 0.0, 0, 0, False)
