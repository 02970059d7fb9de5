"""KV-cache attention on the torch backend: append with index_put, gather the rows, PyTorch's SDPA with a mask.

Where no pyattn kernel runs (a CPU), decode must not fall back to the reference's per-row Python loop: this
variant writes the new keys with one indexed assignment, gathers each row's cache (a view for a contiguous
cache without ``cache_batch_idx``; a gather through the block table for a paged one), builds the (B, 1, L, S)
visibility mask of the bottom-right causal/window rule and calls ``torch.nn.functional.scaled_dot_product_attention``.
It serves CPU only, and refuses with the reason what SDPA cannot compute exactly:

* CUDA: a row with no visible key (an empty cache row, a window past every key) must give 0; torch's CUDA
  SDPA kernels do not all promise that (its CPU kernels do since torch 2.5, the "safe softmax");
* softcap and ALiBi: SDPA has neither; the log-sum-exp: SDPA does not return it.

On CPU the index values are read for free, so they are checked (``pyattn.reference.decode.check_cache_values``)
before anything is written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyattn._registry import Request, Support, Target, register
from pyattn.ops.decode_common import ANY_FLOAT, OP
from pyattn.reference.decode import cache_capacity, check_cache_values

_TORCH_BEFORE_2_5 = torch.torch_version.TorchVersion(torch.__version__) < "2.5"  # once, not per call


def _check_exact(request: Request, target: Target) -> str | None:
    if target.device_type == "cuda":
        return ("torch's CUDA SDPA kernels do not all give 0 for a query that sees no key (an empty cache row); "
                "pyattn does")
    if _TORCH_BEFORE_2_5:
        return f"0 for a query that sees no key and enable_gqa need torch >= 2.5; this is {torch.__version__}"
    return None


_SUPPORT = Support(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=ANY_FLOAT,
                   features=frozenset({"append", "paged", "cache_batch_idx", "causal", "window", "gqa"}),
                   checks=(_check_exact,))


def _cache_rows(k_cache, block_table, cache_batch_idx, batch):
    """(B, S, Hk, ·) view or gather of every batch row's cache, in logical position order."""
    if block_table is not None:
        blocks = block_table.long()
        return lambda cache: cache[blocks].reshape(batch, -1, *cache.shape[2:])
    if cache_batch_idx is not None:
        rows = cache_batch_idx.long()
        return lambda cache: cache[rows]
    return lambda cache: cache


def _append(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx):
    batch, seqlen_new = k.shape[:2]
    positions = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=k.device)  # (B, n)
    if block_table is not None:
        block_size = k_cache.shape[1]
        first = block_table.long().gather(1, positions // block_size)
        second = positions % block_size
    else:
        rows = torch.arange(batch, device=k.device) if cache_batch_idx is None else cache_batch_idx.long()
        first, second = rows[:, None].expand_as(positions), positions
    k_cache[first, second] = k.to(k_cache.dtype)
    v_cache[first, second] = v.to(v_cache.dtype)


@register("torch", OP, _SUPPORT, summary="index_put append + gather + torch SDPA with a (B, 1, L, S) mask (CPU)")
def torch_attention_kvcache(q, k_cache, v_cache, k, v, *, cache_seqlens, block_table, cache_batch_idx, scale,
                            window_left, window_right, softcap, alibi_slopes, num_splits, sm_count):
    del softcap, alibi_slopes, num_splits, sm_count  # refused by the support (softcap, alibi); nothing to split
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_new = 0 if k is None else k.shape[1]
    on_meta = q.device.type == "meta"
    if not on_meta:
        check_cache_values(k_cache, seqlen_new, cache_seqlens, block_table, cache_batch_idx)
    if k is not None and seqlen_new > 0 and not on_meta:
        _append(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx)
    lengths = cache_seqlens.long() + seqlen_new  # (B,) keys of each row
    # On CPU the longest row is free to read: attend over it, not the whole capacity.
    keys_used = cache_capacity(k_cache, block_table) if on_meta else int(lengths.max()) if batch else 0
    out = q.new_zeros((batch, seqlen_q, heads_q, v_cache.shape[-1]))
    if keys_used == 0:
        return out, None  # no row sees a key
    rows = _cache_rows(k_cache, block_table, cache_batch_idx, batch)
    keys, values = rows(k_cache)[:, :keys_used], rows(v_cache)[:, :keys_used]
    extra = {"enable_gqa": True} if heads_q != k_cache.shape[2] else {}
    mask = None
    # Every query sees every key (a decode step at equal lengths, no left window): SDPA without a mask, as a user
    # calls it, instead of a (B, 1, L, S) one.
    every_key = (not on_meta and window_left < 0 and (window_right < 0 or seqlen_q == 1)
                 and int(lengths.min()) == keys_used)
    if not every_key:
        key_positions = torch.arange(keys_used, device=q.device)
        query_positions = lengths[:, None] - seqlen_q + torch.arange(seqlen_q, device=q.device)  # (B, L)
        visible = key_positions[None, None, :] < lengths[:, None, None]
        if window_left >= 0:
            visible = visible & (key_positions[None, None, :] >= query_positions[:, :, None] - window_left)
        if window_right >= 0:
            visible = visible & (key_positions[None, None, :] <= query_positions[:, :, None] + window_right)
        mask = visible[:, None]
    attended = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                              attn_mask=mask, scale=scale, **extra)
    out.copy_(attended.transpose(1, 2))
    return out, None
