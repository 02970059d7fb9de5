"""KV-cache attention on the reference backend: plain PyTorch, float64-capable, every option (the ground truth)."""

from __future__ import annotations

import torch

from pyattn._registry import Support, register
from pyattn.ops.decode_common import ANY_FLOAT, EVERY_DEVICE, FEATURES, OP
from pyattn.reference import decode as reference


@register("reference", OP, Support(devices=EVERY_DEVICE, dtypes=ANY_FLOAT, features=FEATURES),
          summary="plain PyTorch, every option, float64-capable; checks index values on the host")
def reference_attention_kvcache(q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, cache_batch_idx, scale,
                                window_left, window_right, softcap, alibi_slopes, num_splits, sm_count):
    del num_splits, sm_count  # one pass over the keys: nothing to split
    if q.device.type == "meta":  # shapes only (explain, fake tensors): nothing to read or write
        out = q.new_empty((*q.shape[:-1], v_cache.shape[-1]))
        return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return reference.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                            block_table=block_table, cache_batch_idx=cache_batch_idx, scale=scale,
                                            window_left=window_left, window_right=window_right, softcap=softcap,
                                            alibi_slopes=alibi_slopes)
