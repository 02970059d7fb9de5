"""Attention on the torch backend: PyTorch's own SDPA kernels, for every call they compute exactly.

Where no pyattn kernel runs (a CPU, say), changing one import must not make a user's code slower:
these variants hand the call to ``torch.nn.functional.scaled_dot_product_attention`` (its CPU flash
and math kernels, or the GPU ones) with pyattn's semantics intact, and refuse, with the reason,
what it cannot do exactly: softcap, ALiBi, the log-sum-exp, varlen.

* Fully masked rows: pyattn gives 0. torch >= 2.5's CPU kernels give 0 too (its "safe softmax");
  its CUDA kernels do not all promise it, so on CUDA this variant serves no mask or window.
* A sliding window (or a causal diagonal not at the top-left corner) becomes an (L, S) bool mask,
  only while that mask stays small (:data:`WINDOW_MASK_LIMIT` elements).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyattn._registry import Request, Support, Target, register
from pyattn.ops.attention_common import ANY_FLOAT

# Elements of the (L, S) bool mask a window may become: 64 Mi (64 MiB), e.g. L = S = 8192.
WINDOW_MASK_LIMIT = 1 << 26
_TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__)
_HAS_SAFE_SOFTMAX = _TORCH_VERSION >= "2.5"  # fully masked rows -> 0 on CPU (pyattn's semantics)
_HAS_ENABLE_GQA = _TORCH_VERSION >= "2.5"
_MASKED = frozenset({"mask", "window", "mask_grad"})


def _needs_explicit_mask(request: Request) -> bool:
    """A window, or a causal diagonal not at the top-left corner: SDPA's is_causal cannot say it."""
    return "window" in request.features or ("causal" in request.features and request.size("diagonal_offset", 0) != 0)


def _check_exact(request: Request, target: Target) -> str | None:
    if "gqa" in request.features and not _HAS_ENABLE_GQA:
        return f"grouped-query attention needs torch >= 2.5 (enable_gqa); this is {torch.__version__}"
    masked = bool(request.features & _MASKED) or _needs_explicit_mask(request)
    if masked and target.device_type == "cuda":
        return ("masks and windows: torch's CUDA SDPA kernels do not all give 0 for a query that sees no key "
                "(pyattn does)")
    if masked and not _HAS_SAFE_SOFTMAX:
        return f"masks and windows need torch >= 2.5 (0 for a query that sees no key); this is {torch.__version__}"
    if _needs_explicit_mask(request):
        elements = request.size("seqlen_q", 0) * request.size("seqlen_k", 0)
        if elements > WINDOW_MASK_LIMIT:
            return (f"the window would become an (L, S) bool mask of {elements} elements, over the "
                    f"{WINDOW_MASK_LIMIT} this variant builds")
    return None


_SUPPORT = Support(
    devices=frozenset({"cpu", "cuda", "meta"}),
    dtypes=ANY_FLOAT,
    features=frozenset({"mask", "causal", "window", "dropout", "gqa", "mask_grad"}),
    checks=(_check_exact,),
)


def _visible(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int, diagonal_offset: int,
             device: torch.device) -> torch.Tensor:
    """(L, S) bool: key j is visible to query i (the reference's window rule, pyattn.reference.attention)."""
    rows = torch.arange(seqlen_q, device=device)[:, None] + diagonal_offset
    cols = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible = visible & (cols >= rows - window_left)
    if window_right >= 0:
        visible = visible & (cols <= rows + window_right)
    return visible


@register("torch", "attention", _SUPPORT, summary="torch.nn.functional.scaled_dot_product_attention")
def torch_attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap, alibi_slopes,
                    dropout_p, deterministic):
    del softcap, alibi_slopes, deterministic  # refused by the support (softcap, alibi); torch's own determinism
    is_causal = False
    if window_left >= 0 or window_right >= 0:
        if window_left < 0 and window_right == 0 and diagonal_offset == 0 and mask is None:
            is_causal = True  # top-left causal: torch's own is_causal
        else:
            visible = _visible(q.shape[-2], k.shape[-2], window_left, window_right, diagonal_offset, q.device)
            if mask is None:
                mask = visible
            elif mask.dtype == torch.bool:
                mask = mask & visible
            else:
                mask = mask.masked_fill(~visible, float("-inf"))
    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                         scale=scale, **extra)
    return out, None


def _check_weights_exact(request: Request, target: Target) -> str | None:
    if not _HAS_SAFE_SOFTMAX:
        return f"0 for a query that sees no key needs torch >= 2.5 (aten._safe_softmax); this is {torch.__version__}"
    return None


@register("torch", "attention_weights",
          Support(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=ANY_FLOAT,
                  features=frozenset({"mask", "dropout", "gqa", "mask_grad"}), checks=(_check_weights_exact,)),
          summary="torch.nn.MultiheadAttention's own math: matmul, safe softmax, matmul")
def torch_attention_weights(q, k, v, *, scale, mask, dropout_p):
    """What torch.nn.MultiheadAttention computes with need_weights=True (batched matmul, softmax, dropout,
    matmul), with aten's safe softmax so a row that sees no key has weights 0, as pyattn promises."""
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cpu" else q.dtype
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(compute) * scale, k.to(compute).transpose(-2, -1))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(compute)
    # Without a mask every row sees a key: plain softmax (aten's safe softmax costs ~1.7x on a CPU).
    weights = torch.softmax(scores, -1) if mask is None else torch.ops.aten._safe_softmax(scores, -1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    out = torch.matmul(weights, v.to(compute))
    return out.to(q.dtype), weights.to(q.dtype)


@register("torch", "multihead_attention",
          Support(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=ANY_FLOAT,
                  features=frozenset({"need_weights", "dropout"})),
          variant="module", summary="torch.nn.MultiheadAttention's own forward (its fused fast path included)")
def torch_multihead_attention(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                              average_attn_weights, is_causal):
    """pyattn.nn.MultiheadAttention is a torch.nn.MultiheadAttention with the same parameters: without a mask
    every query sees a key, so torch's forward computes exactly pyattn's result (masks may empty a row,
    which torch turns into NaN: those calls go to pyattn's own path)."""
    return torch.nn.MultiheadAttention.forward(module, query, key, value, key_padding_mask=key_padding_mask,
                                               need_weights=need_weights, attn_mask=attn_mask,
                                               average_attn_weights=average_attn_weights, is_causal=is_causal)
