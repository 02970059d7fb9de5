"""The KV-cache attention reference vs float64 SDPA over the gathered cache, and its value checks.

The expectation here is built independently of ``pyattn.reference.decode``: the append and the gather walk the
logical positions one by one in Python (block table or cache row), and the attention is torch's own SDPA in
float64 with an additive mask (bottom-right causal/window visibility plus ALiBi), or the explicit softmax where
softcap is on (SDPA has none). The case table and the helpers are shared with the Triton and API tests.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import RTOL, assert_close

from pyattn.reference import decode as reference

# Each case: the call's shapes and options. cache_seqlens are ragged and include 0 where the append allows it.
CASES = {
    "contiguous-append1-gqa": dict(cache_seqlens=[0, 17, 47]),
    "contiguous-no-append": dict(seqlen_new=0, cache_seqlens=[1, 20, 48]),
    "paged16-append1": dict(block_size=16, capacity=64, cache_seqlens=[0, 33, 63]),
    "paged256-append1": dict(block_size=256, capacity=512, head_dim=16, head_dim_v=16, cache_seqlens=[0, 255, 300]),
    "paged16-speculative": dict(block_size=16, capacity=64, seqlen_q=4, seqlen_new=4, cache_seqlens=[0, 15, 60]),
    "append-several-causal": dict(seqlen_q=5, seqlen_new=5, cache_seqlens=[0, 9, 40]),
    "queries-beyond-new": dict(seqlen_q=3, seqlen_new=1, cache_seqlens=[0, 4, 30]),
    "mqa": dict(heads_q=4, heads_k=1, cache_seqlens=[3, 0, 31]),
    "mha-noncausal-2q": dict(heads_q=2, heads_k=2, seqlen_q=2, seqlen_new=2, causal=False, cache_seqlens=[5, 0, 44]),
    "window-causal": dict(seqlen_q=2, seqlen_new=2, window=(8, 0), cache_seqlens=[0, 6, 40]),
    "window-two-sided": dict(seqlen_q=3, seqlen_new=0, causal=False, window=(4, 3), cache_seqlens=[2, 20, 48]),
    "softcap": dict(softcap=2.0, cache_seqlens=[4, 0, 40]),
    "alibi-1d": dict(alibi="1d", seqlen_q=2, seqlen_new=2, cache_seqlens=[0, 13, 40]),
    "alibi-2d-noncausal": dict(alibi="2d", causal=False, cache_seqlens=[9, 30, 2]),
    "batch-idx": dict(batch_cache=5, cache_batch_idx=[4, 0, 2], cache_seqlens=[6, 0, 46]),
    "odd-head-dims": dict(head_dim=24, head_dim_v=16, cache_seqlens=[11, 1, 35]),
}
DEFAULTS = dict(batch=3, seqlen_q=1, seqlen_new=1, heads_q=4, heads_k=2, head_dim=32, head_dim_v=32, capacity=48,
                block_size=None, batch_cache=None, cache_batch_idx=None, causal=True, window=(-1, -1), softcap=0.0,
                alibi=None)


def case_options(name: str) -> dict:
    return {**DEFAULTS, **CASES[name]}


def make_inputs(options: dict, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict:
    """Random q, caches (paged: every sequence's blocks scattered at random over a larger pool), new k/v, indices."""
    o = options
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(device)

    batch, heads_k = o["batch"], o["heads_k"]
    block_table = None
    if o["block_size"] is not None:
        blocks_per_seq = o["capacity"] // o["block_size"]
        num_blocks = batch * blocks_per_seq + 3  # spare blocks nobody owns
        order = torch.randperm(num_blocks, generator=generator)[:batch * blocks_per_seq]
        block_table = order.reshape(batch, blocks_per_seq).to(torch.int32).to(device)
        cache_shape = (num_blocks, o["block_size"], heads_k)
    else:
        cache_shape = (o["batch_cache"] or batch, o["capacity"], heads_k)
    inputs = dict(q=randn(batch, o["seqlen_q"], o["heads_q"], o["head_dim"]),
                  k_cache=randn(*cache_shape, o["head_dim"]), v_cache=randn(*cache_shape, o["head_dim_v"]),
                  k=None, v=None, block_table=block_table, cache_batch_idx=None, alibi_slopes=None,
                  cache_seqlens=torch.tensor(o["cache_seqlens"], dtype=torch.int32, device=device))
    if o["seqlen_new"]:
        inputs["k"] = randn(batch, o["seqlen_new"], heads_k, o["head_dim"])
        inputs["v"] = randn(batch, o["seqlen_new"], heads_k, o["head_dim_v"])
    if o["cache_batch_idx"] is not None:
        inputs["cache_batch_idx"] = torch.tensor(o["cache_batch_idx"], dtype=torch.int32, device=device)
    if o["alibi"] == "1d":
        inputs["alibi_slopes"] = (torch.rand(o["heads_q"], generator=generator) * 0.3).to(device)
    elif o["alibi"] == "2d":
        inputs["alibi_slopes"] = (torch.rand(batch, o["heads_q"], generator=generator) * 0.3).to(device)
    return inputs


def _location(inputs: dict, b: int, position: int) -> tuple[int, int]:
    block_table = inputs["block_table"]
    if block_table is not None:
        block_size = inputs["k_cache"].shape[1]
        return int(block_table[b, position // block_size]), position % block_size
    row = b if inputs["cache_batch_idx"] is None else int(inputs["cache_batch_idx"][b])
    return row, position


def expected(inputs: dict, options: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, L, Hq, Dv), lse (B, Hq, L), k_cache, v_cache after the append), all float64."""
    o = options
    k_cache, v_cache = inputs["k_cache"].double().clone(), inputs["v_cache"].double().clone()
    lengths = inputs["cache_seqlens"].tolist()
    for b, start in enumerate(lengths):
        for t in range(o["seqlen_new"]):
            first, second = _location(inputs, b, start + t)
            k_cache[first, second] = inputs["k"][b, t].double()
            v_cache[first, second] = inputs["v"][b, t].double()
    q = inputs["q"].double()
    batch, seqlen_q, heads_q, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim)
    group = heads_q // o["heads_k"]
    out = torch.zeros(batch, seqlen_q, heads_q, o["head_dim_v"], dtype=torch.float64)
    lse = torch.full((batch, heads_q, seqlen_q), float("-inf"), dtype=torch.float64)
    left, right = o["window"]
    if o["causal"]:
        right = 0
    for b, start in enumerate(lengths):
        length = start + o["seqlen_new"]
        if length == 0:
            continue
        keys = torch.stack([k_cache[_location(inputs, b, p)] for p in range(length)]).transpose(0, 1)  # (Hk, S, D)
        values = torch.stack([v_cache[_location(inputs, b, p)] for p in range(length)]).transpose(0, 1)
        keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
        position = torch.arange(seqlen_q)[:, None] + length - seqlen_q  # each query's key position
        key = torch.arange(length)[None, :]
        visible = torch.ones(seqlen_q, length, dtype=torch.bool)
        if left >= 0:
            visible &= key >= position - left
        if right >= 0:
            visible &= key <= position + right
        bias = torch.zeros(heads_q, seqlen_q, length, dtype=torch.float64)
        if inputs["alibi_slopes"] is not None:
            slopes = inputs["alibi_slopes"].double()
            slopes = slopes if slopes.dim() == 1 else slopes[b]
            bias = bias - slopes[:, None, None] * (position - key).abs()
        bias = bias.masked_fill(~visible, float("-inf"))
        query = q[b].transpose(0, 1)  # (Hq, L, D)
        scores = scale * query @ keys.transpose(-1, -2)
        if o["softcap"] > 0:
            scores = o["softcap"] * torch.tanh(scores / o["softcap"])
            probabilities = torch.softmax(scores + bias, dim=-1)
            attended = probabilities @ values
        else:
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)
        rows_with_keys = visible.any(-1)  # a query that sees no key: out 0, lse −inf
        out[b] = torch.where(rows_with_keys[None, :, None], attended, 0.0).transpose(0, 1)
        lse[b] = torch.where(rows_with_keys[None, :], torch.logsumexp(scores + bias, dim=-1), float("-inf"))
    return out, lse, k_cache, v_cache


def call_reference(inputs: dict, options: dict, dtype=None):
    """The reference on (clones of) ``inputs``; returns (out, lse, k_cache, v_cache)."""
    cast = (lambda t: None if t is None else t.to(dtype)) if dtype is not None else (lambda t: t)
    k_cache, v_cache = cast(inputs["k_cache"]).clone(), cast(inputs["v_cache"]).clone()
    left, right = options["window"]
    out, lse = reference.attention_with_kvcache(
        cast(inputs["q"]), k_cache, v_cache, cast(inputs["k"]), cast(inputs["v"]),
        cache_seqlens=inputs["cache_seqlens"], block_table=inputs["block_table"],
        cache_batch_idx=inputs["cache_batch_idx"], scale=1.0 / math.sqrt(options["head_dim"]), window_left=left,
        window_right=0 if options["causal"] else right, softcap=options["softcap"],
        alibi_slopes=inputs["alibi_slopes"])
    return out, lse, k_cache, v_cache


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_sdpa_over_the_gathered_cache(name):
    options = case_options(name)
    inputs = make_inputs(options, torch.float64)
    out, lse, k_cache, v_cache = call_reference(inputs, options)
    want_out, want_lse, want_k, want_v = expected(inputs, options)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), "the append wrote the wrong positions"
    assert_close(out, want_out, RTOL[torch.float64])
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse is -inf exactly where a query sees no key"
    assert_close(lse[finite], want_lse[finite], RTOL[torch.float64], "lse")


def test_reference_half_precision_computes_in_float32():
    options = case_options("paged16-append1")
    inputs = make_inputs(options, torch.float16)
    out, lse, _, _ = call_reference(inputs, options)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    want_out, _, _, _ = expected(inputs, options)
    assert_close(out, want_out, RTOL[torch.float16])


@pytest.mark.parametrize("corrupt, message", [
    (lambda i: i.__setitem__("cache_seqlens", torch.tensor([0, 17, 48], dtype=torch.int32)), "cache is too short"),
    (lambda i: i.__setitem__("cache_seqlens", torch.tensor([0, -1, 3], dtype=torch.int32)), "negative"),
], ids=["too-short", "negative"])
def test_reference_rejects_bad_lengths_and_writes_nothing(corrupt, message):
    options = case_options("contiguous-append1-gqa")
    inputs = make_inputs(options, torch.float64)
    corrupt(inputs)
    before = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with pytest.raises(ValueError, match=f"cache_seqlens.*{message}"):
        reference.attention_with_kvcache(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"],
                                         cache_seqlens=inputs["cache_seqlens"], scale=0.1)
    assert torch.equal(inputs["k_cache"], before[0]) and torch.equal(inputs["v_cache"], before[1])


def test_reference_rejects_out_of_range_indices_and_writes_nothing():
    options = case_options("paged16-append1")
    inputs = make_inputs(options, torch.float64)
    inputs["block_table"][2, 3] = inputs["k_cache"].shape[0]  # past the pool, in a block sequence 2 uses
    before = inputs["k_cache"].clone()
    with pytest.raises(ValueError, match=r"block_table\[2\] holds block"):
        call_reference(inputs, options)
    with pytest.raises(ValueError, match=r"block_table\[2\] holds block"):
        reference.attention_with_kvcache(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"],
                                         cache_seqlens=inputs["cache_seqlens"], block_table=inputs["block_table"],
                                         scale=0.1)
    assert torch.equal(inputs["k_cache"], before)
    options = case_options("batch-idx")
    inputs = make_inputs(options, torch.float64)
    inputs["cache_batch_idx"][1] = 5
    with pytest.raises(ValueError, match=r"cache_batch_idx\[1\] = 5"):
        call_reference(inputs, options)
