"""KV-cache attention functional: flash-attn's ``flash_attn_with_kvcache``, on pyattn's backends.

Validates every shape, dtype and device once (messages name the argument) *before* anything is written, turns
an int ``cache_seqlens`` into a device tensor (no host sync either way), builds the dispatch request and calls
the chosen implementation. Index *values* in tensors (cache_seqlens, block_table, cache_batch_idx) are not read
here: that would synchronise with the GPU on every decode step. The reference and CPU backends check them
before writing; the Triton kernels clamp them into the cache (docs/decode.md, "Bad input").
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from pyattn._dispatch import Request, choose, target_for
from pyattn.functional.attention import _check_alibi, _checked_scale, _checked_softcap, _checked_window

__all__ = ["flash_attention_with_kvcache", "REQUEST_BUILDERS"]

_FN = "flash_attention_with_kvcache"


def _check_tensor(name: str, tensor, q: Tensor, *, floating: bool = True) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if floating and tensor.dtype != q.dtype:
        raise TypeError(f"{_FN}: {name} has dtype {tensor.dtype} but q has {q.dtype}; q, k_cache, v_cache, k and v "
                        "must share one floating-point dtype")
    if tensor.device != q.device:
        raise ValueError(f"{_FN}: {name} is on {tensor.device} but q is on {q.device}")


def _check_index(name: str, tensor, q: Tensor, shape: tuple, layout: str) -> Tensor:
    _check_tensor(name, tensor, q, floating=False)
    if tensor.dtype != torch.int32:
        raise TypeError(f"{_FN}: {name} must be int32, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{_FN}: {name} must have shape {layout} = {shape}, got {tuple(tensor.shape)}")
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _plan(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None, cache_batch_idx=None,
          causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None, num_splits=0, return_lse=False):
    """(request, implementation arguments) of a validated call."""
    if not isinstance(q, Tensor):
        raise TypeError(f"{_FN}: q must be a torch.Tensor, got {type(q).__name__}")
    if not q.is_floating_point():
        raise TypeError(f"{_FN}: q must be a floating-point tensor, got dtype {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"{_FN}: q must have 4 dims (batch, seqlen_q, nheads, headdim), got shape {tuple(q.shape)}")
    batch, seqlen_q, heads_q, head_dim = q.shape
    paged = block_table is not None
    cache_layout = "(num_blocks, block_size, nheads_k, headdim)" if paged else "(batch_cache, seqlen_cache, nheads_k, headdim)"
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, q)
        if cache.dim() != 4:
            raise ValueError(f"{_FN}: {name} must have 4 dims {cache_layout}, got shape {tuple(cache.shape)}")
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(f"{_FN}: v_cache's first three dims {tuple(v_cache.shape[:3])} != k_cache's "
                         f"{tuple(k_cache.shape[:3])}")
    if k_cache.shape[-1] != head_dim:
        raise ValueError(f"{_FN}: k_cache's head dim {k_cache.shape[-1]} != q's head dim {head_dim}")
    heads_k, head_dim_v = k_cache.shape[2], v_cache.shape[-1]
    if heads_k == 0 or heads_q % heads_k:
        raise ValueError(f"{_FN}: q's {heads_q} heads must be a multiple of the cache's {heads_k} (nheads_k, dim 2 of "
                         "k_cache): grouped-query attention")

    if (k is None) != (v is None):
        raise ValueError(f"{_FN}: pass k and v together (new keys and values to append), or neither")
    seqlen_new = 0
    if k is not None:
        for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
            _check_tensor(name, new, q)
            expected = f"(batch, seqlen_new, nheads_k, headdim) = ({batch}, ·, {heads_k}, {cache.shape[-1]})"
            if new.dim() != 4 or new.shape[0] != batch or new.shape[2] != heads_k or new.shape[3] != cache.shape[-1]:
                raise ValueError(f"{_FN}: {name} must have shape {expected}, got {tuple(new.shape)}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"{_FN}: v has {v.shape[1]} new tokens (dim 1) but k has {k.shape[1]}")
        seqlen_new = k.shape[1]

    if paged:
        if cache_batch_idx is not None:
            raise ValueError(f"{_FN}: cache_batch_idx cannot be combined with block_table (a paged cache selects its "
                             "blocks per sequence already)")
        _check_tensor("block_table", block_table, q, floating=False)
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"{_FN}: block_table must have shape (batch, max_blocks_per_seq) with batch = {batch}, "
                             f"got {tuple(block_table.shape)}")
        block_table = _check_index("block_table", block_table, q, tuple(block_table.shape), "(batch, max_blocks)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        if cache_batch_idx is not None:
            cache_batch_idx = _check_index("cache_batch_idx", cache_batch_idx, q, (batch,), "(batch,)")
        elif k_cache.shape[0] != batch:
            raise ValueError(f"{_FN}: k_cache has {k_cache.shape[0]} rows (dim 0) but q has batch {batch}; pass "
                             "cache_batch_idx to select the cache rows of a larger cache")
        capacity = k_cache.shape[1]
    if seqlen_new > capacity:
        raise ValueError(f"{_FN}: k/v append {seqlen_new} tokens but the cache holds {capacity} positions per "
                         "sequence; the cache is too short")

    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (numbers.Integral, Tensor)):
        raise TypeError(f"{_FN}: cache_seqlens must be an int or an int32 tensor (batch,), got "
                        f"{type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, Tensor):
        cache_seqlens = _check_index("cache_seqlens", cache_seqlens, q, (batch,), "(batch,)")
    else:
        if not 0 <= cache_seqlens <= capacity - seqlen_new:
            raise ValueError(f"{_FN}: cache_seqlens = {cache_seqlens} plus the {seqlen_new} new tokens must lie in "
                             f"[0, {capacity}] (the cache's positions per sequence); the cache is too short")
        cache_seqlens = torch.full((batch,), int(cache_seqlens), dtype=torch.int32, device=q.device)

    scale = _checked_scale(_FN, scale, head_dim)
    window_left, window_right = _checked_window(_FN, window, causal)
    softcap = _checked_softcap(_FN, softcap)
    _check_alibi(_FN, alibi_slopes, q, batch, heads_q)
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"{_FN}: num_splits must be an int >= 0 (0: chosen from the GPU and the cache), "
                         f"got {num_splits!r}")

    used = {"append": seqlen_new > 0, "paged": paged, "cache_batch_idx": cache_batch_idx is not None,
            "causal": bool(causal), "window": window_left >= 0 or (window_right >= 0 and not causal),
            "softcap": softcap > 0, "alibi": alibi_slopes is not None, "gqa": heads_q != heads_k,
            "lse": bool(return_lse)}
    sizes = dict(batch=batch, seqlen_q=seqlen_q, seqlen_new=seqlen_new, heads_q=heads_q, heads_k=heads_k,
                 capacity=capacity, num_splits=int(num_splits))
    if paged:
        sizes["block_size"] = k_cache.shape[1]
    request = Request(op="attention_kvcache", device=q.device, dtype=q.dtype, head_dim=max(head_dim, head_dim_v),
                      features=frozenset(name for name, is_used in used.items() if is_used), sizes=sizes,
                      operands=dict(q=q, k_cache=k_cache, v_cache=v_cache))
    arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k if seqlen_new else None, v=v if seqlen_new else None,
                     cache_seqlens=cache_seqlens, block_table=block_table, cache_batch_idx=cache_batch_idx,
                     scale=scale, window_left=window_left, window_right=window_right, softcap=softcap,
                     alibi_slopes=alibi_slopes, num_splits=int(num_splits))
    return request, arguments


def _kvcache_request(q, k_cache, v_cache, k=None, v=None, **kwargs) -> Request:
    return _plan(q, k_cache, v_cache, k, v, **kwargs)[0]


def flash_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                                 v: Tensor | None = None, *, cache_seqlens: int | Tensor,
                                 block_table: Tensor | None = None, cache_batch_idx: Tensor | None = None,
                                 causal: bool = False, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                 alibi_slopes: Tensor | None = None, scale: float | None = None, num_splits: int = 0,
                                 return_lse: bool = False):
    """Attention of q over a KV cache, appending new keys/values into it in place first (flash-attn's
    ``flash_attn_with_kvcache``, without rotary or cache_leftpad), on pyattn's backends.

    Shapes (flash-attn's layout): q (batch, seqlen_q, nheads, headdim); k_cache/v_cache (batch_cache,
    seqlen_cache, nheads_k, headdim / headdim_v), or a paged cache (num_blocks, block_size, nheads_k, ·) with
    block_table int32 (batch, max_blocks_per_seq) (logical position p of sequence b lives in block
    block_table[b, p // block_size] at row p % block_size; any block size). nheads % nheads_k == 0 (MQA/GQA:
    query head h reads KV head h // (nheads // nheads_k)). Returns out (batch, seqlen_q, nheads, headdim_v)
    in q's dtype, and lse (batch, nheads, seqlen_q) float32 when ``return_lse``.

    k/v (batch, seqlen_new, nheads_k, ·), optional: written into the caches *in place* at positions
    cache_seqlens[b] .. cache_seqlens[b] + seqlen_new − 1 (the caller then advances cache_seqlens). q then
    attends to the first cache_seqlens[b] + seqlen_new positions of sequence b's cache.
    cache_seqlens: an int, or an int32 tensor (batch,) on q's device, never read on the host (a decode step is
    CUDA-graph capturable on the Triton backend). cache_batch_idx: int32 (batch,), the cache row of each
    sequence (contiguous caches only; default b; with duplicates and k/v, which write lands is unspecified).

    causal: aligned at the bottom-right corner, so query i sits at key position
    i + cache_seqlens[b] + seqlen_new − seqlen_q (seqlen_q > 1 for speculative decoding or chunked prefill).
    window (left, right): query i sees keys in [pos_i − left, pos_i + right] (−1 unbounded; right is 0 with
    causal). softcap > 0: scores become softcap · tanh(scores / softcap). alibi_slopes float32 (nheads,) or
    (batch, nheads): −slope · |pos_i − j| is added to the scores. scale: default 1 / sqrt(headdim).
    num_splits: split the keys over this many programs (split-K, merged by LSE); 0 chooses from the GPU's SM
    count and the cache's capacity; 1 never splits. A row with no visible key gives 0 (lse −inf).

    Errors name the argument, and nothing is written to the cache when a call is rejected. Shapes, dtypes,
    devices and int ``cache_seqlens`` are checked here; out-of-range *values* in the index tensors raise on the
    reference and CPU backends (which read them) and are clamped into the cache by the Triton kernels (which
    must not synchronise to read them): they never read or write outside the cache. No backward.
    """
    request, arguments = _plan(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table,
                               cache_batch_idx=cache_batch_idx, causal=causal, window=window, softcap=softcap,
                               alibi_slopes=alibi_slopes, scale=scale, num_splits=num_splits, return_lse=return_lse)
    sm_count = target_for(request).sm_count or 0
    out, lse = choose(request).implementation(**arguments, sm_count=sm_count)
    return (out, lse) if return_lse else out


REQUEST_BUILDERS = {_FN: _kvcache_request}
