"""A static KV cache for a stack of attention layers, contiguous or paged, and its append-and-attend call.

    cache = pyattn.nn.KVCache(num_layers=12, batch_size=8, max_seqlen=4096, num_heads_k=8, head_dim=128,
                              dtype=torch.bfloat16, device="cuda", block_size=256)   # block_size: paged
    cache.reserve(num_new)                      # host side, before a forward: blocks for the new tokens (paged)
    out = cache.attend(q, k, v, layer_idx)      # in every layer: append k/v at the current length, attend
    cache.advance(num_new)                      # after the forward: the lengths move on (on the device)

Everything is preallocated: K/V buffers (num_layers, batch, max_seqlen, Hk, D), or for a paged cache a pool
(num_layers, num_blocks, block_size, Hk, D) shared by the sequences through a block table (batch,
max_blocks_per_seq) that :class:`BlockAllocator` fills on :meth:`reserve`. ``attend`` and ``advance`` never
allocate or synchronise, so a decode step between a ``reserve`` and an ``advance`` can be captured in a CUDA
graph; ``reserve`` is the host-side part (it writes the new block-table entries; for a contiguous cache it only
checks the capacity).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pyattn.functional.kvcache import flash_attention_with_kvcache

__all__ = ["KVCache", "BlockAllocator"]


class BlockAllocator:
    """A free list of ``num_blocks`` cache blocks: :meth:`allocate` hands out the lowest free ids first."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"BlockAllocator: num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"BlockAllocator: {count} blocks wanted but only {len(self._free)} of "
                               f"{self.num_blocks} are free; make the cache's num_blocks larger")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(sorted(blocks, reverse=True))


class KVCache(nn.Module):
    """Preallocated keys and values of ``num_layers`` attention layers for ``batch_size`` sequences.

    ``block_size`` (optional) makes the cache paged: a pool of ``num_blocks`` blocks (default: enough for every
    sequence at ``max_seqlen``) handed out on demand by :meth:`reserve`, so sequences that stay short leave blocks
    for others. Buffers are non-persistent (they are not in the state_dict) and follow ``.to()``.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seqlen: int, num_heads_k: int, head_dim: int,
                 head_dim_v: int | None = None, *, block_size: int | None = None, num_blocks: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size), ("max_seqlen", max_seqlen),
                            ("num_heads_k", num_heads_k), ("head_dim", head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache: {name} must be an int >= 1, got {value!r}")
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.num_layers, self.batch_size, self.max_seqlen = num_layers, batch_size, max_seqlen
        self.num_heads_k, self.head_dim, self.head_dim_v = num_heads_k, head_dim, head_dim_v
        self.block_size = block_size
        factory = dict(dtype=dtype, device=device)
        if block_size is None:
            if num_blocks is not None:
                raise ValueError("KVCache: num_blocks needs block_size (a paged cache)")
            shape = (num_layers, batch_size, max_seqlen, num_heads_k)
            self.allocator = None
            block_table = None
        else:
            if not isinstance(block_size, int) or block_size < 1:
                raise ValueError(f"KVCache: block_size must be an int >= 1, got {block_size!r}")
            blocks_per_sequence = math.ceil(max_seqlen / block_size)
            num_blocks = batch_size * blocks_per_sequence if num_blocks is None else num_blocks
            self.allocator = BlockAllocator(num_blocks)
            shape = (num_layers, num_blocks, block_size, num_heads_k)
            # −1: no block yet (the kernels neither read nor write such positions; reserve() fills entries first).
            block_table = torch.full((batch_size, blocks_per_sequence), -1, dtype=torch.int32, device=device)
        self.register_buffer("k", torch.zeros(*shape, head_dim, **factory), persistent=False)
        self.register_buffer("v", torch.zeros(*shape, head_dim_v, **factory), persistent=False)
        self.register_buffer("block_table", block_table, persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch_size, dtype=torch.int32, device=device), persistent=False)
        self._lengths = [0] * batch_size  # host mirror of seqlens: the host decides how many tokens each step adds
        self._blocks: list[list[int]] = [[] for _ in range(batch_size)]

    # ------------------------------------------------------------------------------------------ sizes

    @property
    def paged(self) -> bool:
        return self.block_size is not None

    @property
    def lengths(self) -> list[int]:
        """Tokens held per sequence (host side; ``seqlens`` is the same on the device)."""
        return list(self._lengths)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the K/V buffers (the block table and lengths add a few bytes per sequence)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def extra_repr(self) -> str:
        layout = (f"paged, block_size={self.block_size}, num_blocks={self.allocator.num_blocks}" if self.paged
                  else "contiguous")
        return (f"num_layers={self.num_layers}, batch_size={self.batch_size}, max_seqlen={self.max_seqlen}, "
                f"num_heads_k={self.num_heads_k}, head_dim={self.head_dim}, head_dim_v={self.head_dim_v}, "
                f"dtype={self.k.dtype}, {layout}, memory={self.memory_bytes / 2**20:.1f} MiB")

    # ---------------------------------------------------------------------------------------- the steps

    def reserve(self, num_tokens: int) -> None:
        """Make room for ``num_tokens`` more tokens in every sequence (host side, before the forward that adds
        them): checks the capacity and, for a paged cache, allocates the blocks and writes their table entries."""
        for b, length in enumerate(self._lengths):
            if length + num_tokens > self.max_seqlen:
                raise RuntimeError(f"KVCache.reserve: sequence {b} holds {length} tokens; {num_tokens} more exceed "
                                   f"max_seqlen {self.max_seqlen}")
        if not self.paged:
            return
        needs = [max(0, math.ceil((length + num_tokens) / self.block_size) - len(self._blocks[b]))
                 for b, length in enumerate(self._lengths)]
        if sum(needs) > self.allocator.free_blocks:  # all or nothing: a failed reserve changes no sequence
            raise RuntimeError(f"KVCache.reserve: {num_tokens} more tokens need {sum(needs)} new blocks but only "
                               f"{self.allocator.free_blocks} of {self.allocator.num_blocks} are free; make the "
                               "cache's num_blocks larger")
        rows, columns, blocks = [], [], []
        for b, needed in enumerate(needs):
            if needed > 0:
                new = self.allocator.allocate(needed)
                rows += [b] * needed
                columns += range(len(self._blocks[b]), len(self._blocks[b]) + needed)
                self._blocks[b] += new
                blocks += new
        if blocks:
            device = self.block_table.device
            self.block_table[torch.tensor(rows, device=device), torch.tensor(columns, device=device)] = torch.tensor(
                blocks, dtype=torch.int32, device=device)

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor | None, layer_idx: int, *, causal: bool = True,
               window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: Tensor | None = None,
               scale: float | None = None) -> Tensor:
        """Append k/v (batch, seqlen_new, num_heads_k, ·) to layer ``layer_idx`` at the current lengths, then attend
        q (batch, seqlen_q, nheads, head_dim) to that layer's cache (:func:`pyattn.flash_attention_with_kvcache`,
        causal aligned at the bottom-right). Returns (batch, seqlen_q, nheads, head_dim_v). Call :meth:`advance`
        once after the last layer."""
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"KVCache.attend: layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}")
        return flash_attention_with_kvcache(q, self.k[layer_idx], self.v[layer_idx], k, v, cache_seqlens=self.seqlens,
                                            block_table=self.block_table, causal=causal, window=window,
                                            softcap=softcap, alibi_slopes=alibi_slopes, scale=scale)

    def advance(self, num_tokens: int) -> None:
        """Count ``num_tokens`` more tokens in every sequence (on the device: no sync, graph-capturable)."""
        self.seqlens.add_(num_tokens)
        self._lengths = [length + num_tokens for length in self._lengths]

    def reset(self) -> None:
        """Empty every sequence (and give a paged cache's blocks back). The buffers keep their stale values."""
        self.seqlens.zero_()
        self._lengths = [0] * self.batch_size
        if self.paged:
            for blocks in self._blocks:
                self.allocator.free(blocks)
            self._blocks = [[] for _ in range(self.batch_size)]
            self.block_table.fill_(-1)
