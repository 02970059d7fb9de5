"""KV-cache attention reference in plain PyTorch: append into the cache, then attend (flash-attn's semantics).

One definition shared with the kernels (docs/decode.md). For batch row b, with c_b = cache_seqlens[b] and
n = seqlen_new (0 without k/v):

* append: the new keys/values k[b, t], v[b, t] (t < n) are written in place at logical position c_b + t of
  row b's cache;
* attend: q[b] (L queries) attends to the first S_b = c_b + n logical positions of that cache, with the
  diagonal at the bottom-right corner: query i sits at key position i + S_b − L (the attention reference's
  ``diagonal_offset``), so causal is ``window_right = 0`` and a window (left, right) sees keys
  [i + S_b − L − left, i + S_b − L + right]; softcap and ALiBi as in ``pyattn.reference.attention``.

Logical position p of row b lives at ``cache[cache_batch_idx[b], p]`` (contiguous cache, ``cache_batch_idx``
defaulting to b) or at ``cache[block_table[b, p // block_size], p % block_size]`` (paged cache). A row
with no visible key (S_b = 0, or a window past every key) gives out 0 and lse −inf.

The reference reads ``cache_seqlens``, ``block_table`` and ``cache_batch_idx`` on the host and checks their
values (:func:`check_cache_values`) before it writes anything, so a rejected call leaves the cache as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyattn.reference.attention import attention


def cache_capacity(k_cache: Tensor, block_table: Tensor | None) -> int:
    """Logical positions one row of the cache can hold."""
    if block_table is None:
        return k_cache.shape[1]
    return block_table.shape[1] * k_cache.shape[1]


def check_cache_values(k_cache: Tensor, seqlen_new: int, cache_seqlens: Tensor, block_table: Tensor | None,
                       cache_batch_idx: Tensor | None, *, function: str = "attention_with_kvcache") -> None:
    """Raise ``ValueError`` naming the argument when an index tensor's *values* are out of range.

    Reads the tensors on the host (a device sync on a GPU): the reference and the CPU paths call it; the
    kernels instead clamp every index so that nothing outside the cache is read or written.
    """
    capacity = cache_capacity(k_cache, block_table)
    lengths = cache_seqlens.tolist()
    for b, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"{function}: cache_seqlens[{b}] = {length} is negative")
        if length + seqlen_new > capacity:
            raise ValueError(f"{function}: cache_seqlens[{b}] = {length} plus the {seqlen_new} new tokens of k/v "
                             f"exceeds the cache's {capacity} positions per sequence; the cache is too short")
    if block_table is not None:
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        for b, length in enumerate(lengths):
            used = -(-(length + seqlen_new) // block_size)  # blocks holding positions < S_b
            row = block_table[b, :used].tolist()
            bad = [index for index in row if not 0 <= index < num_blocks]
            if bad:
                raise ValueError(f"{function}: block_table[{b}] holds block {bad[0]}, outside the paged cache's "
                                 f"{num_blocks} blocks (k_cache.shape[0])")
    if cache_batch_idx is not None:
        batch_cache = k_cache.shape[0]
        bad = [(b, index) for b, index in enumerate(cache_batch_idx.tolist()) if not 0 <= index < batch_cache]
        if bad:
            raise ValueError(f"{function}: cache_batch_idx[{bad[0][0]}] = {bad[0][1]} is outside the cache's "
                             f"{batch_cache} rows (k_cache.shape[0])")


def _row_positions(b: int, length: int, cache: Tensor, block_table: Tensor | None,
                   cache_batch_idx: Tensor | None) -> tuple[Tensor, Tensor]:
    """(first index, second index) into ``cache`` of row b's logical positions 0 .. length − 1."""
    positions = torch.arange(length, device=cache.device)
    if block_table is None:
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        return torch.full_like(positions, row), positions
    block_size = cache.shape[1]
    blocks = block_table[b].to(device=cache.device, dtype=torch.long)[positions // block_size]
    return blocks, positions % block_size


def append_to_cache(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                    block_table: Tensor | None = None, cache_batch_idx: Tensor | None = None) -> None:
    """Write k/v (B, n, Hk, ·) into the caches in place at positions cache_seqlens[b] .. + n − 1 (values checked
    by the caller)."""
    seqlen_new = k.shape[1]
    for b, start in enumerate(cache_seqlens.tolist()):
        first, second = _row_positions(b, start + seqlen_new, k_cache, block_table, cache_batch_idx)
        first, second = first[start:], second[start:]
        k_cache[first, second] = k[b].to(k_cache.dtype)
        v_cache[first, second] = v[b].to(v_cache.dtype)


def gather_cache(cache: Tensor, b: int, length: int, block_table: Tensor | None = None,
                 cache_batch_idx: Tensor | None = None) -> Tensor:
    """Row b's first ``length`` logical positions, (length, Hk, D) (a copy for a paged cache)."""
    first, second = _row_positions(b, length, cache, block_table, cache_batch_idx)
    return cache[first, second]


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                           v: Tensor | None = None, *, cache_seqlens: Tensor, block_table: Tensor | None = None,
                           cache_batch_idx: Tensor | None = None, scale: float, window_left: int = -1,
                           window_right: int = -1, softcap: float = 0.0,
                           alibi_slopes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Append k/v into the cache in place, then attend; returns ``(out, lse)``.

    q (B, L, Hq, D); k_cache/v_cache (B_cache, S_cache, Hk, D/Dv), or paged (num_blocks, block_size, Hk, ·)
    with block_table int32 (B, max_blocks); k/v (B, n, Hk, ·) or None; cache_seqlens int32 (B,).
    Causal is ``window_right = 0``. out (B, L, Hq, Dv) in q's dtype; lse (B, Hq, L) in the compute dtype
    (float32 for half inputs, float64 for float64). Computed in float64 when q is float64.
    """
    seqlen_new = 0 if k is None else k.shape[1]
    check_cache_values(k_cache, seqlen_new, cache_seqlens, block_table, cache_batch_idx)
    if k is not None:
        append_to_cache(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx)
    batch, seqlen_q, heads_q, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros((batch, seqlen_q, heads_q, v_cache.shape[-1]))
    lse = torch.full((batch, heads_q, seqlen_q), float("-inf"), dtype=compute, device=q.device)
    for b, start in enumerate(cache_seqlens.tolist()):
        length = start + seqlen_new
        if length == 0:
            continue  # no key: out 0, lse −inf
        keys = gather_cache(k_cache, b, length, block_table, cache_batch_idx).transpose(0, 1).unsqueeze(0)
        values = gather_cache(v_cache, b, length, block_table, cache_batch_idx).transpose(0, 1).unsqueeze(0)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        out_b, lse_b = attention(q[b].transpose(0, 1).unsqueeze(0).to(compute), keys.to(compute), values.to(compute),
                                 scale=scale, window_left=window_left, window_right=window_right,
                                 diagonal_offset=length - seqlen_q, softcap=softcap, alibi_slopes=slopes)
        out[b] = out_b[0].transpose(0, 1).to(q.dtype)
        lse[b] = lse_b[0]
    return out, lse
