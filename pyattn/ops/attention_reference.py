"""Attention on the reference backend: plain PyTorch, float64-capable, every option (the ground truth)."""

from __future__ import annotations

from pyattn._registry import Support, register
from pyattn.ops.attention_common import ANY_FLOAT, EVERY_DEVICE, FEATURES
from pyattn.reference import attention as reference

_SUPPORT = Support(devices=EVERY_DEVICE, dtypes=ANY_FLOAT, features=FEATURES)
_SUMMARY = "plain PyTorch, every option, float64-capable: the ground truth"


@register("reference", "attention", _SUPPORT, summary=_SUMMARY)
def reference_attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap, alibi_slopes,
                        dropout_p, deterministic):
    del deterministic  # autograd's backward of the reference is deterministic already
    return reference.attention(q, k, v, scale=scale, mask=mask, window_left=window_left, window_right=window_right,
                               diagonal_offset=diagonal_offset, softcap=softcap, alibi_slopes=alibi_slopes,
                               dropout_p=dropout_p)


@register("reference", "attention_varlen", _SUPPORT, summary=_SUMMARY)
def reference_attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                               window_right, diagonal_offset, align_to_end, softcap, alibi_slopes, dropout_p,
                               deterministic):
    del deterministic
    return reference.attention(q, k, v, scale=scale, window_left=window_left, window_right=window_right,
                               diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap,
                               alibi_slopes=alibi_slopes, dropout_p=dropout_p, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@register("reference", "attention_weights", _SUPPORT, summary=_SUMMARY)
def reference_attention_weights(q, k, v, *, scale, mask, dropout_p):
    return reference.attention_with_weights(q, k, v, scale=scale, mask=mask, dropout_p=dropout_p)
