"""Triton decode kernels vs the float64 reference, on CPU through the Triton interpreter.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -m interpreter tests/test_decode_triton.py``.
Calls go through ``pyattn.flash_attention_with_kvcache`` under ``use_backend("triton")`` (the Triton backend
serves CPU tensors only when forced) or straight to the launcher. Every buffer the launcher allocates (out, lse,
the split partials) is NaN-filled first, so an element a kernel forgets to write fails; the whole cache is
compared after the append, so a write outside the appended positions fails too. The interpreter runs 16-key
tiles, so these short caches cross several tiles and splits.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from tests.conftest import RTOL, assert_close, poison_
from tests.test_decode_reference import CASES, call_reference, case_options, make_inputs

pytest.importorskip("triton", reason="triton is not installed")

import pyattn  # noqa: E402
from pyattn.kernels import decode as kernels  # noqa: E402
from pyattn.kernels.decode import launch  # noqa: E402

pytestmark = pytest.mark.interpreter
DTYPES = [torch.float32, torch.float16]  # bf16 arithmetic is wrong in the interpreter: GPU tests cover it


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def poisoned_empty(shape, dtype, device):
        return poison_(torch.empty(shape, dtype=dtype, device=device))

    monkeypatch.setattr(launch, "_empty", poisoned_empty)


def _call(inputs: dict, options: dict, *, num_splits: int, return_lse: bool = True):
    """pyattn.flash_attention_with_kvcache on the triton backend, on clones of the caches."""
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with pyattn.use_backend("triton"):
        out, lse = pyattn.flash_attention_with_kvcache(
            inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"], cache_seqlens=inputs["cache_seqlens"],
            block_table=inputs["block_table"], cache_batch_idx=inputs["cache_batch_idx"], causal=options["causal"],
            window=options["window"], softcap=options["softcap"], alibi_slopes=inputs["alibi_slopes"],
            num_splits=num_splits, return_lse=return_lse)
    return out, lse, k_cache, v_cache


def _check(got, want, dtype):
    out, lse, k_cache, v_cache = got
    want_out, want_lse, want_k, want_v = want
    assert torch.equal(k_cache, want_k.to(dtype)) and torch.equal(v_cache, want_v.to(dtype)), "cache after the append"
    assert out.dtype == dtype and out.shape == want_out.shape
    assert_close(out, want_out, RTOL[dtype])
    finite = torch.isfinite(want_lse)
    assert not lse.isnan().any(), "lse: unwritten elements"
    assert torch.equal(torch.isfinite(lse), finite), "lse is -inf exactly where a query sees no key"
    assert_close(lse[finite], want_lse[finite], RTOL[torch.float32], "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_reference(name, dtype):
    options = case_options(name)
    inputs = make_inputs(options, dtype)
    want = call_reference(inputs, options, dtype=torch.float64)
    _check(_call(inputs, options, num_splits=3), want, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 4, 7, 64])
@pytest.mark.parametrize("name", ["contiguous-append1-gqa", "paged16-speculative", "window-causal"])
def test_every_split_count(name, num_splits):
    options = case_options(name)
    inputs = make_inputs(options, torch.float32)
    want = call_reference(inputs, options, dtype=torch.float64)
    _check(_call(inputs, options, num_splits=num_splits), want, torch.float32)


def test_default_split_from_the_sm_count():
    """num_splits = 0 with an SM count splits a small grid (here 3 rows × 2 KV heads over a 512-key cache)."""
    options = case_options("paged256-append1")
    inputs = make_inputs(options, torch.float32)
    plan = kernels.plan(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_table"], 0, 132)
    assert plan["num_splits"] > 1
    assert kernels.plan(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_table"], 0, None)[
        "num_splits"] == 1
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    out, lse = kernels.attention_with_kvcache(
        inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"], cache_seqlens=inputs["cache_seqlens"],
        block_table=inputs["block_table"], scale=1 / math.sqrt(options["head_dim"]), window_right=0, num_splits=0,
        sm_count=132)
    _check((out, lse, k_cache, v_cache), call_reference(inputs, options, dtype=torch.float64), torch.float32)


def test_split_heuristic():
    heuristic = kernels.num_splits_heuristic
    assert heuristic(programs=264, capacity=131072, sm_count=132, block_n=64) == 1  # the grid fills the GPU
    assert heuristic(programs=8, capacity=131072, sm_count=132, block_n=64) > 8  # batch 1, 8 KV heads: split
    assert heuristic(programs=8, capacity=512, sm_count=132, block_n=64) <= 2  # a short cache: few splits
    assert heuristic(programs=8, capacity=131072, sm_count=None, block_n=64) == 1


def test_return_lse_off_returns_out_only():
    options = case_options("mqa")
    inputs = make_inputs(options, torch.float32)
    with pyattn.use_backend("triton"):
        out = pyattn.flash_attention_with_kvcache(inputs["q"], inputs["k_cache"].clone(), inputs["v_cache"].clone(),
                                                  inputs["k"], inputs["v"], cache_seqlens=inputs["cache_seqlens"],
                                                  causal=True)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 1, 4, 32)


def test_strided_views_and_int_cache_seqlens():
    """q and the caches as transposed views (transformers' (B, H, S, D) cache seen as (B, S, H, D)); an int
    cache_seqlens is turned into a device tensor."""
    options = dict(case_options("contiguous-no-append"), cache_seqlens=[30, 30, 30])
    inputs = make_inputs(options, torch.float32)
    want = call_reference(inputs, options, dtype=torch.float64)
    q = inputs["q"].transpose(1, 2).contiguous().transpose(1, 2)
    k_cache = inputs["k_cache"].transpose(1, 2).contiguous().transpose(1, 2)
    v_cache = inputs["v_cache"].transpose(1, 2).contiguous().transpose(1, 2)
    with pyattn.use_backend("triton"):
        out, lse = pyattn.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=30, causal=True,
                                                       return_lse=True)
    _check((out, lse, k_cache, v_cache), want, torch.float32)


def test_out_of_range_indices_are_neither_read_nor_written():
    """The kernels cannot read index values on the host: a block index or cache row outside the cache makes its
    positions invisible and unwritten (the reference raises instead)."""
    options = case_options("paged16-append1")
    inputs = make_inputs(options, torch.float32)
    bad = inputs["block_table"].clone()
    bad[2, :] = -5  # sequence 2's every block: out of range
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    out, lse = kernels.attention_with_kvcache(inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"],
                                              cache_seqlens=inputs["cache_seqlens"], block_table=bad,
                                              scale=1 / math.sqrt(options["head_dim"]),
                                              window_right=0, num_splits=2)
    good = dict(inputs, block_table=inputs["block_table"])
    want = call_reference(good, options, dtype=torch.float64)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isinf(lse[2]).all()
    assert_close(out[:2], want[0][:2], RTOL[torch.float32])
    untouched = torch.ones(k_cache.shape[0], dtype=torch.bool)
    untouched[inputs["block_table"][:2].flatten().long()] = False
    assert torch.equal(k_cache[untouched], inputs["k_cache"][untouched]), "wrote into blocks of no valid sequence"


def test_opcheck():
    options = case_options("paged16-append1")
    inputs = make_inputs(options, torch.float32)
    args = (inputs["q"], inputs["k_cache"].clone(), inputs["v_cache"].clone(), inputs["k"], inputs["v"],
            inputs["cache_seqlens"], inputs["block_table"], None, None, 0.1, -1, 0, 0.0, 2, 0)
    torch.library.opcheck(torch.ops.pyattn.triton_attention_kvcache.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------- the fused append


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel launched, by name, counted where the kernels run (their ``run``)."""
    counts: collections.Counter = collections.Counter()
    kernel_type = type(launch.decode_attention_kernel)
    run = kernel_type.run

    def counted_run(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_type, "run", counted_run)
    return counts


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("name", ["contiguous-append1-gqa", "paged16-speculative", "contiguous-no-append",
                                  "batch-idx"])
def test_one_attention_launch_appends_and_attends(name, num_splits, launches):
    """One launch of the attention kernel (which also appends), plus the merge when split; no other kernel."""
    options = case_options(name)
    inputs = make_inputs(options, torch.float32)
    want = call_reference(inputs, options, dtype=torch.float64)
    _check(_call(inputs, options, num_splits=num_splits), want, torch.float32)
    expected = {"decode_attention_kernel": 1}
    if num_splits > 1:
        expected["combine_splits_kernel"] = 1
    assert dict(launches) == expected


def test_new_keys_are_read_from_k_v_not_from_the_cache():
    """The cache rows the call appends to hold NaN before it: the attention must take the new keys from k/v.

    The interpreter runs programs one at a time in grid order, and the last programs write first. With 4 splits of
    these ≤ 3-tile bands the last split has no keys, so it writes the first new tokens after the program that
    attends to them has run: a kernel reading them from the cache would see NaN there."""
    options = dict(case_options("paged16-speculative"), cache_seqlens=[0, 15, 40])
    inputs = make_inputs(options, torch.float32)
    want = call_reference(inputs, options, dtype=torch.float64)
    for b, start in enumerate(inputs["cache_seqlens"].tolist()):
        for position in range(start, start + options["seqlen_new"]):
            block = inputs["block_table"][b, position // options["block_size"]]
            inputs["k_cache"][block, position % options["block_size"]] = float("nan")
            inputs["v_cache"][block, position % options["block_size"]] = float("nan")
    for num_splits in (1, 2, 4):
        _check(_call(inputs, options, num_splits=num_splits), want, torch.float32)


def test_append_dealt_to_many_programs():
    """Nine new tokens (chunks of 2 under the interpreter) over 2 row tiles (9 queries × a group of 8 = 72 rows, in
    64-row fp16 tiles) × 3 splits: every token written once, into its block, and attended to."""
    options = dict(case_options("paged16-speculative"), heads_q=16, heads_k=2, seqlen_q=9, seqlen_new=9,
                   cache_seqlens=[0, 20, 55])
    inputs = make_inputs(options, torch.float16)
    assert kernels.plan(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_table"], 3, None)[
        "row_tiles"] == 2
    want = call_reference(inputs, options, dtype=torch.float64)
    _check(_call(inputs, options, num_splits=3), want, torch.float16)


def _row_reference(inputs, options, b, cache_seqlen, new_tokens):
    """The reference for batch row b of a contiguous cache alone, with ``new_tokens`` of its k/v appended at
    ``cache_seqlen``."""
    row = {name: (value[b:b + 1] if isinstance(value, torch.Tensor) else value) for name, value in inputs.items()}
    row["cache_seqlens"] = torch.tensor([cache_seqlen], dtype=torch.int32)
    row["k"] = row["k"][:, :new_tokens] if new_tokens else None
    row["v"] = row["v"][:, :new_tokens] if new_tokens else None
    row_options = dict(options, seqlen_new=new_tokens)
    return call_reference(row, row_options, dtype=torch.float64)


def test_lengths_out_of_range_are_clamped_not_written_past_the_cache():
    """A negative length counts as 0; at the capacity, or one short of it, the new tokens past it are dropped."""
    options = dict(case_options("mqa"), seqlen_q=2, seqlen_new=2, cache_seqlens=[0, 0, 0])
    inputs = make_inputs(options, torch.float32)
    capacity = options["capacity"]
    lengths = torch.tensor([-3, capacity, capacity - 1], dtype=torch.int32)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    out, lse = kernels.attention_with_kvcache(inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"],
                                              cache_seqlens=lengths, scale=1 / math.sqrt(options["head_dim"]),
                                              window_right=0, num_splits=2)
    for b, (cache_seqlen, new_tokens) in enumerate([(0, 2), (capacity, 0), (capacity - 1, 1)]):
        want_out, want_lse, want_k, want_v = _row_reference(inputs, options, b, cache_seqlen, new_tokens)
        assert torch.equal(k_cache[b], want_k[0].float()) and torch.equal(v_cache[b], want_v[0].float()), b
        assert_close(out[b:b + 1], want_out, RTOL[torch.float32])
        assert_close(lse[b:b + 1], want_lse, RTOL[torch.float32], "lse")


def test_a_call_without_queries_still_appends(launches):
    """seqlen_q = 0: nothing to attend, but k/v are written, by one launch of the same kernel."""
    options = case_options("paged16-append1")
    inputs = make_inputs(options, torch.float32)
    want = call_reference(inputs, options, dtype=torch.float64)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    out, lse = kernels.attention_with_kvcache(inputs["q"][:, :0], k_cache, v_cache, inputs["k"], inputs["v"],
                                              cache_seqlens=inputs["cache_seqlens"], block_table=inputs["block_table"],
                                              scale=0.1, window_right=0, num_splits=3)
    assert out.shape == (3, 0, 4, 32) and lse.shape == (3, 4, 0)
    assert torch.equal(k_cache, want[2].float()) and torch.equal(v_cache, want[3].float())
    assert dict(launches) == {"decode_attention_kernel": 1}
