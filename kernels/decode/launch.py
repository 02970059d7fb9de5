"""Launchers of the decode kernels: allocate outputs and scratch, pick the split and the tiles, launch.

One call, one or two launches on the current stream and no host synchronisation: the split-K attention, whose
programs also append the new keys/values into the cache, and the merge (when split). ``cache_seqlens`` is only
ever read by the kernels, so a decode step can be captured in a CUDA graph and replayed with new lengths.
"""

from __future__ import annotations

import torch
import triton

from .._launch import on_input_device
from . import configs
from .kernels import combine_splits_kernel, decode_attention_kernel

MAX_HEAD_DIM = 256
MAX_SPLITS = 128  # an explicit num_splits is clamped to this (and to the cache's key tiles)


def _empty(shape, dtype, device):
    """Every buffer a kernel must write in full; the tests swap in NaN-filled ones to catch gaps."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_precision(dtype: torch.dtype) -> str:
    # Strict fp32 dots unless torch itself allows TF32 for matmuls (docs/attention.md, "Precision").
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _check_shapes(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx):
    """Shapes only (the functional layer validates everything; these keep a direct caller from mis-indexing)."""
    batch, _, heads_q, head_dim = q.shape
    if k_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3] or k_cache.shape[-1] != head_dim:
        raise ValueError(f"attention_with_kvcache: k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} do "
                         f"not match q {tuple(q.shape)}")
    if heads_q % k_cache.shape[2]:
        raise ValueError(f"attention_with_kvcache: q's {heads_q} heads are not a multiple of the cache's "
                         f"{k_cache.shape[2]}")
    if cache_seqlens.shape != (batch,) or cache_seqlens.dtype != torch.int32 or cache_seqlens.stride(0) != 1:
        raise ValueError("attention_with_kvcache: cache_seqlens must be a contiguous int32 tensor (batch,)")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != batch
                                    or block_table.dtype != torch.int32 or block_table.stride(1) != 1):
        raise ValueError("attention_with_kvcache: block_table must be int32 (batch, max_blocks), rows contiguous")
    if cache_batch_idx is not None and (cache_batch_idx.shape != (batch,) or cache_batch_idx.dtype != torch.int32
                                        or cache_batch_idx.stride(0) != 1):
        raise ValueError("attention_with_kvcache: cache_batch_idx must be a contiguous int32 tensor (batch,)")
    if k is not None and (k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:] or v.shape[:3] != k.shape[:3]
                          or v.shape[-1] != v_cache.shape[-1]):
        raise ValueError(f"attention_with_kvcache: k {tuple(k.shape)} / v {tuple(v.shape)} do not match the cache")


def cache_capacity(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Logical positions one sequence of the cache can hold."""
    return k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
         num_splits: int, sm_count: int | None) -> dict:
    """The launch a call gets: tiles, warps, stages and splits (the split from the cache's capacity, not its fill)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_k = k_cache.shape[2]
    interpreter = q.device.type == "cpu"
    rows_per_head = seqlen_q * (heads_q // heads_k)
    block_m = configs.block_m_for(rows_per_head, q.dtype)
    block_n, num_warps, num_stages, maxnreg = configs.decode_config(q.dtype, head_dim, v_cache.shape[-1], block_m,
                                                                    interpreter=interpreter)
    row_tiles = max(1, triton.cdiv(rows_per_head, block_m))
    capacity = cache_capacity(k_cache, block_table)
    key_tiles = max(1, triton.cdiv(capacity, block_n))
    if num_splits <= 0:
        splits = configs.num_splits_heuristic(row_tiles * heads_k * batch, capacity, sm_count, block_n)
    else:
        splits = num_splits
    splits = max(1, min(splits, key_tiles, MAX_SPLITS))
    block_new = configs.INTERPRETER_APPEND_BLOCK_N if interpreter else configs.APPEND_BLOCK_N
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_NEW=block_new, num_warps=num_warps, num_stages=num_stages,
                maxnreg=maxnreg, row_tiles=row_tiles, num_splits=splits)


def attention_arguments(q, k_cache, v_cache, k, v, out, lse, *, cache_seqlens, block_table, cache_batch_idx,
                        alibi_slopes, scale, window_left, window_right, softcap, launch) -> dict:
    """Every parameter of ``decode_attention_kernel`` by name (``aot.py`` builds its specs from the same).
    ``out``/``lse``: the final (b, m, h, Dv) output and (b, h, m) LSE when ``launch["num_splits"]`` is 1, else the
    fp32 partials (split, b, m, h, ·). ``k``/``v``: the new tokens, or None (q then stands in for them, with q's
    strides, so the launch specialises as one with new tokens laid out like q; seqlen_new 0: never read).
    ``launch`` may carry ``seqlen_q`` (0: a launch that only appends)."""
    split = launch["num_splits"] > 1
    paged = block_table is not None
    if split:
        out_strides = out.stride()
        s, b, m, h = lse.stride()
        lse_strides = (s, b, h, m)
    else:
        out_strides = (0, *out.stride())
        lse_strides = (0, *lse.stride())
    alibi_strides = (0, 0)
    if alibi_slopes is not None:
        alibi_strides = (0, alibi_slopes.stride(0)) if alibi_slopes.dim() == 1 else tuple(alibi_slopes.stride())
    seqlen_new = 0 if k is None else k.shape[1]
    k_new, v_new = (q, q) if k is None else (k, v)
    strides = dict(zip(
        ("stride_qb", "stride_qm", "stride_qh", "stride_qd", "stride_knb", "stride_knn", "stride_knh", "stride_knd",
         "stride_vnb", "stride_vnn", "stride_vnh", "stride_vnd", "stride_kc0", "stride_kcn", "stride_kch", "stride_kcd",
         "stride_vc0", "stride_vcn", "stride_vch", "stride_vcd", "stride_os", "stride_ob", "stride_om", "stride_oh",
         "stride_od", "stride_ls", "stride_lb", "stride_lh", "stride_lm", "stride_ab", "stride_ah"),
        (*q.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), *out_strides,
         *lse_strides, *alibi_strides)))
    head_dim, head_dim_v = q.shape[-1], v_cache.shape[-1]
    return dict(
        Q=q, KNew=k_new, VNew=v_new, KCache=k_cache, VCache=v_cache, Out=out, Lse=lse, CacheSeqlens=cache_seqlens, BlockTable=block_table,
        CacheBatchIdx=cache_batch_idx, AlibiSlopes=alibi_slopes, **strides,
        stride_btb=block_table.stride(0) if paged else 0,
        seqlen_q=launch.get("seqlen_q", q.shape[1]), seqlen_new=seqlen_new,
        group_size=max(1, q.shape[2] // k_cache.shape[2]),
        capacity=cache_capacity(k_cache, block_table), num_cache_rows=k_cache.shape[0],
        block_size=k_cache.shape[1] if paged else 1, num_splits=launch["num_splits"],
        scale=float(scale), softcap=float(softcap), window_left=int(window_left), window_right=int(window_right),
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=_padded(head_dim), HEAD_DIM_V=head_dim_v,
        HEAD_DIM_V_PADDED=_padded(head_dim_v), PAGED=paged, HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW_LEFT=window_left >= 0,
        HAS_WINDOW_RIGHT=window_right >= 0, SPLIT=split, DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_M=launch["BLOCK_M"], BLOCK_N=launch["BLOCK_N"], BLOCK_NEW=launch["BLOCK_NEW"])


def combine_arguments(partial_out, partial_lse, out, lse, *, num_splits) -> dict:
    """Every parameter of ``combine_splits_kernel`` by name."""
    strides = dict(zip(
        ("stride_ps", "stride_pb", "stride_pm", "stride_ph", "stride_pd", "stride_qs", "stride_qb", "stride_qm",
         "stride_qh", "stride_ob", "stride_om", "stride_oh", "stride_od", "stride_lb", "stride_lh", "stride_lm"),
        (*partial_out.stride(), *partial_lse.stride(), *out.stride(), *lse.stride())))
    head_dim_v = out.shape[-1]
    return dict(PartialOut=partial_out, PartialLse=partial_lse, Out=out, Lse=lse, **strides, num_heads=out.shape[2],
                num_splits=num_splits, HEAD_DIM_V=head_dim_v, HEAD_DIM_V_PADDED=_padded(head_dim_v),
                SPLITS_PADDED=triton.next_power_of_2(num_splits),
                SPLITS_CHUNK=min(triton.next_power_of_2(num_splits), configs.MERGE_SPLITS_CHUNK))


def _merge_launch(device: torch.device) -> tuple[int, int]:
    """(num_warps, num_stages) of the merge kernel."""
    return (1, 1) if device.type == "cpu" else (4, 1)


@on_input_device
def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           cache_batch_idx=None, scale, window_left=-1, window_right=-1, softcap=0.0,
                           alibi_slopes=None, num_splits=0, sm_count=None):
    """Append k/v into the cache in place and attend to it (the new tokens included); returns ``(out, lse)``.
    Semantics: ``pyattn.reference.decode``.

    q (B, L, Hq, D); caches (B_cache, S_cache, Hk, D/Dv), or paged (num_blocks, block_size, Hk, ·) with
    block_table int32 (B, max_blocks); k/v (B, n, Hk, ·) or None; cache_seqlens int32 (B,) on the device.
    Causal is ``window_right = 0``. Any strides (the head dim need not be contiguous). out (B, L, Hq, Dv)
    contiguous in q's dtype, lse (B, Hq, L) float32.

    One launch of ``decode_attention_kernel`` (which also writes k/v into the cache), plus the merge when split.
    ``num_splits`` 0 picks the split from ``sm_count`` and the cache's capacity
    (:func:`configs.num_splits_heuristic`); > 0 forces it (clamped to the cache's key tiles and 128).
    """
    _check_shapes(q, k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx)
    batch, seqlen_q, heads_q, _ = q.shape
    heads_k, head_dim_v = k_cache.shape[2], v_cache.shape[-1]
    out = _empty((batch, seqlen_q, heads_q, head_dim_v), q.dtype, q.device)
    lse = _empty((batch, heads_q, seqlen_q), torch.float32, q.device)
    if k is not None and k.shape[1] == 0:
        k = v = None
    launch = plan(q, k_cache, v_cache, block_table, num_splits, sm_count)
    if out.numel() == 0:  # nothing to attend: out 0, lse −inf; a launch with no query rows only appends
        lse.fill_(float("-inf"))
        out.zero_()
        if k is None or batch == 0:
            return out, lse
        launch.update(seqlen_q=0, row_tiles=1, num_splits=1)
    splits = launch["num_splits"]
    target_out, target_lse = out, lse
    if splits > 1:
        target_out = _empty((splits, batch, seqlen_q, heads_q, head_dim_v), torch.float32, q.device)
        target_lse = _empty((splits, batch, seqlen_q, heads_q), torch.float32, q.device)
    arguments = attention_arguments(
        q, k_cache, v_cache, k, v, target_out, target_lse, cache_seqlens=cache_seqlens, block_table=block_table,
        cache_batch_idx=cache_batch_idx, alibi_slopes=alibi_slopes, scale=scale, window_left=window_left,
        window_right=window_right, softcap=softcap, launch=launch)
    decode_attention_kernel[(launch["row_tiles"] * heads_k, splits, batch)](
        **arguments, num_warps=launch["num_warps"], num_stages=launch["num_stages"], maxnreg=launch["maxnreg"])
    if splits > 1:
        num_warps, num_stages = _merge_launch(q.device)
        combine_splits_kernel[(seqlen_q * heads_q, batch)](
            **combine_arguments(target_out, target_lse, out, lse, num_splits=splits), num_warps=num_warps,
            num_stages=num_stages)
    return out, lse
