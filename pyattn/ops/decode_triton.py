"""KV-cache attention on the triton backend: one custom op over ``pyattn.kernels.decode`` (split-K flash-decoding).

The op mutates the caches (the in-place append) and has no backward (flash-attn's ``flash_attn_with_kvcache``
has none either). It never reads ``cache_seqlens`` on the host, so a decode step captures in a CUDA graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyattn._registry import Support, register
from pyattn.ops.decode_common import FEATURES, OP

_SUPPORT = Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}),
                   dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_head_dim=256,
                   features=FEATURES)


def _kernels():
    import pyattn.kernels.decode as kernels  # lazily: Triton may be absent

    return kernels


@torch.library.custom_op("pyattn::triton_attention_kvcache", mutates_args=("k_cache", "v_cache"))
def triton_attention_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor], cache_seqlens: Tensor,
    block_table: Optional[Tensor], cache_batch_idx: Optional[Tensor], alibi_slopes: Optional[Tensor], scale: float,
    window_left: int, window_right: int, softcap: float, num_splits: int, sm_count: int,
) -> tuple[Tensor, Tensor]:
    return _kernels().attention_with_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, scale=scale, window_left=window_left, window_right=window_right,
        softcap=softcap, alibi_slopes=alibi_slopes, num_splits=num_splits, sm_count=sm_count or None)


@triton_attention_kvcache.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, scale, window_left,
      window_right, softcap, num_splits, sm_count):
    batch, seqlen_q, heads_q, _ = q.shape
    return (q.new_empty((batch, seqlen_q, heads_q, v_cache.shape[-1])),
            q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32))


@register("triton", OP, _SUPPORT, summary="split-K flash-decoding: GQA-packed tiles, paged reads, in-place append")
def triton_attention_with_kvcache(q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, cache_batch_idx, scale,
                                  window_left, window_right, softcap, alibi_slopes, num_splits, sm_count):
    return triton_attention_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx,
                                    alibi_slopes, float(scale), int(window_left), int(window_right), float(softcap),
                                    int(num_splits), int(sm_count or 0))
