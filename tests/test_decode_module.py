"""``pyattn.nn.KVCache``: a prefill then decode steps through the cache equal causal attention over the whole
history (contiguous and paged, every layer its own), the block allocator, capacity errors, memory, reset."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import RTOL, assert_close

import pyattn
from pyattn.nn import BlockAllocator, KVCache
from pyattn.reference.attention import attention as reference_attention


def _history_attention(q, keys, values):
    """Causal attention (bottom-right) of q (B, L, Hq, D) over the whole history (B, S, Hk, D), float64."""
    out, _ = reference_attention(q.transpose(1, 2).double(), keys.transpose(1, 2).double(),
                                 values.transpose(1, 2).double(), scale=1 / math.sqrt(q.shape[-1]), window_right=0,
                                 diagonal_offset=keys.shape[1] - q.shape[1])
    return out.transpose(1, 2)


def _run_steps(cache: KVCache, steps=(5, 1, 1, 3, 1), heads_q=4, dtype=torch.float64):
    torch.manual_seed(0)
    batch, heads_k, head_dim = cache.batch_size, cache.num_heads_k, cache.head_dim
    history = [([], []) for _ in range(cache.num_layers)]
    for num_new in steps:
        cache.reserve(num_new)
        for layer in range(cache.num_layers):
            q = torch.randn(batch, num_new, heads_q, head_dim, dtype=dtype)
            k = torch.randn(batch, num_new, heads_k, head_dim, dtype=dtype)
            v = torch.randn(batch, num_new, heads_k, cache.head_dim_v, dtype=dtype)
            history[layer][0].append(k)
            history[layer][1].append(v)
            out = cache.attend(q, k, v, layer)
            want = _history_attention(q, torch.cat(history[layer][0], 1), torch.cat(history[layer][1], 1))
            assert_close(out, want, RTOL[dtype], f"layer {layer} after {cache.lengths[0] + num_new} tokens")
        cache.advance(num_new)
    assert cache.lengths == [sum(steps)] * batch
    assert cache.seqlens.tolist() == [sum(steps)] * batch


@pytest.mark.parametrize("block_size", [None, 4, 16], ids=["contiguous", "paged4", "paged16"])
def test_prefill_and_decode_equal_attention_over_the_history(block_size):
    cache = KVCache(2, 3, 16, 2, 8, block_size=block_size, dtype=torch.float64)
    _run_steps(cache)


@pytest.mark.interpreter
@pytest.mark.parametrize("block_size", [None, 16], ids=["contiguous", "paged16"])
def test_cache_through_the_triton_kernels(block_size):
    cache = KVCache(1, 2, 32, 2, 16, block_size=block_size, dtype=torch.float32)
    with pyattn.use_backend("triton"):
        _run_steps(cache, steps=(4, 1, 1), dtype=torch.float32)


def test_paged_cache_allocates_blocks_on_demand():
    cache = KVCache(1, 2, 64, 1, 8, block_size=16, num_blocks=5, dtype=torch.float32)
    assert cache.block_table.tolist() == [[-1] * 4, [-1] * 4]
    cache.reserve(17)  # two blocks per sequence
    assert cache.block_table.tolist() == [[0, 1, -1, -1], [2, 3, -1, -1]]
    assert cache.allocator.free_blocks == 1
    cache.advance(17)
    cache.reserve(15)  # 32 tokens still fit in two blocks
    assert cache.allocator.free_blocks == 1
    cache.advance(15)
    with pytest.raises(RuntimeError, match="1 more tokens need 2 new blocks but only 1 of 5 are free"):
        cache.reserve(1)
    assert cache.allocator.free_blocks == 1 and cache.block_table[:, 2].tolist() == [-1, -1]  # all or nothing
    cache.reset()
    assert cache.allocator.free_blocks == 5 and cache.lengths == [0, 0] and cache.seqlens.tolist() == [0, 0]
    assert (cache.block_table == -1).all()


def test_capacity_and_arguments():
    cache = KVCache(2, 1, 8, 1, 4)
    cache.reserve(8)
    cache.advance(8)
    with pytest.raises(RuntimeError, match="exceed max_seqlen 8"):
        cache.reserve(1)
    with pytest.raises(ValueError, match="layer_idx must be an int in"):
        cache.attend(torch.randn(1, 1, 1, 4), None, None, 2)
    with pytest.raises(ValueError, match="num_heads_k must be an int >= 1"):
        KVCache(1, 1, 8, 0, 4)
    with pytest.raises(ValueError, match="num_blocks needs block_size"):
        KVCache(1, 1, 8, 1, 4, num_blocks=3)
    with pytest.raises(RuntimeError, match="num_blocks"):
        BlockAllocator(2).allocate(3)


def test_memory_repr_and_state_dict():
    cache = KVCache(12, 4, 1024, 8, 64, dtype=torch.float16)
    assert cache.memory_bytes == 2 * 12 * 4 * 1024 * 8 * 64 * 2
    assert "contiguous" in repr(cache) and "memory=96.0 MiB" in repr(cache)
    assert cache.state_dict() == {}
    paged = KVCache(2, 2, 100, 1, 8, block_size=32)
    assert paged.k.shape == (2, 8, 32, 1, 8) and "paged, block_size=32, num_blocks=8" in repr(paged)
