"""Triton decode kernels vs the float64 reference, on CPU through the Triton interpreter.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -m interpreter tests/test_decode_triton.py``.
Calls go through ``pyattn.flash_attention_with_kvcache`` under ``use_backend("triton")`` (the Triton backend
serves CPU tensors only when forced) or straight to the launcher. Every buffer the launcher allocates (out, lse,
the split partials) is NaN-filled first, so an element a kernel forgets to write fails; the whole cache is
compared after the append, so a write outside the appended positions fails too. The interpreter runs 16-key
tiles, so these short caches cross several tiles and splits.
"""

from __future__ import annotations

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
