"""``pyattn.flash_attention_with_kvcache``: validation (errors name the argument, nothing written when rejected),
dispatch (which backend serves what, and why not), the torch backend vs the reference, and on a GPU the Triton
path vs the reference, captured in a CUDA graph and compiled."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import HAS_CUDA, RTOL, assert_close
from tests.test_decode_reference import CASES, call_reference, case_options, expected, make_inputs

import pyattn

FN = pyattn.flash_attention_with_kvcache


def _base(dtype=torch.float32, device="cpu", name="paged16-append1"):
    options = case_options(name)
    return options, make_inputs(options, dtype, device)


def _kwargs(inputs, **overrides):
    kwargs = dict(cache_seqlens=inputs["cache_seqlens"], block_table=inputs["block_table"],
                  cache_batch_idx=inputs["cache_batch_idx"], causal=True)
    kwargs.update(overrides)
    return kwargs


BAD_CALLS = {
    # name: (change to the call, the argument the message must name)
    "q-3d": (lambda a, kw: a.__setitem__("q", a["q"][0]), "q must have 4 dims"),
    "q-int": (lambda a, kw: a.__setitem__("q", a["q"].to(torch.int32)), "q must be a floating-point"),
    "cache-dtype": (lambda a, kw: a.__setitem__("v_cache", a["v_cache"].double()), "v_cache has dtype"),
    "head-dim": (lambda a, kw: a.__setitem__("q", a["q"][..., :16]), "k_cache's head dim 32 != q's head dim 16"),
    "heads": (lambda a, kw: a.__setitem__("q", a["q"][:, :, :3]), "q's 3 heads must be a multiple"),
    "k-without-v": (lambda a, kw: a.__setitem__("v", None), "pass k and v together"),
    "k-heads": (lambda a, kw: a.__setitem__("k", a["k"][:, :, :1]), "k must have shape"),
    "k-dtype": (lambda a, kw: a.__setitem__("k", a["k"].double()), "k has dtype"),
    "v-tokens": (lambda a, kw: a.__setitem__("v", torch.cat([a["v"], a["v"]], 1)), "v has 2 new tokens"),
    "seqlens-dtype": (lambda a, kw: kw.__setitem__("cache_seqlens", kw["cache_seqlens"].long()),
                      "cache_seqlens must be int32"),
    "seqlens-shape": (lambda a, kw: kw.__setitem__("cache_seqlens", kw["cache_seqlens"][:2]),
                      r"cache_seqlens must have shape \(batch,\)"),
    "seqlens-float": (lambda a, kw: kw.__setitem__("cache_seqlens", 3.0), "cache_seqlens must be an int"),
    "seqlens-int-too-long": (lambda a, kw: kw.__setitem__("cache_seqlens", 64), "the cache is too short"),
    "append-longer-than-cache": (lambda a, kw: (a.__setitem__("k", a["k"].repeat(1, 65, 1, 1)),
                                                a.__setitem__("v", a["v"].repeat(1, 65, 1, 1))),
                                 "k/v append 65 tokens but the cache holds 64"),
    "block-table-dtype": (lambda a, kw: kw.__setitem__("block_table", kw["block_table"].long()),
                          "block_table must be int32"),
    "block-table-shape": (lambda a, kw: kw.__setitem__("block_table", kw["block_table"][:1]),
                          "block_table must have shape"),
    "block-table-and-batch-idx": (lambda a, kw: kw.__setitem__("cache_batch_idx", kw["cache_seqlens"]),
                                  "cache_batch_idx cannot be combined with block_table"),
    "window": (lambda a, kw: kw.__setitem__("window", (3,)), "window must be a pair"),
    "softcap": (lambda a, kw: kw.__setitem__("softcap", -1.0), "softcap must be"),
    "num-splits": (lambda a, kw: kw.__setitem__("num_splits", -2), "num_splits must be an int >= 0"),
    "alibi-shape": (lambda a, kw: kw.__setitem__("alibi_slopes", torch.ones(3)), "alibi_slopes must have shape"),
    "scale": (lambda a, kw: kw.__setitem__("scale", float("nan")), "scale must be a finite number"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_names_the_argument_and_writes_nothing(name):
    change, message = BAD_CALLS[name]
    _, inputs = _base()
    arguments = dict(q=inputs["q"], k_cache=inputs["k_cache"], v_cache=inputs["v_cache"], k=inputs["k"], v=inputs["v"])
    kwargs = _kwargs(inputs)
    change(arguments, kwargs)
    before = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with pytest.raises((ValueError, TypeError), match=message):
        FN(arguments["q"], arguments["k_cache"], arguments["v_cache"], arguments["k"], arguments["v"], **kwargs)
    assert torch.equal(inputs["k_cache"], before[0]) and torch.equal(inputs["v_cache"], before[1])


def test_contiguous_cache_rows_must_match_the_batch():
    _, inputs = _base(name="batch-idx")
    with pytest.raises(ValueError, match="k_cache has 5 rows .* pass cache_batch_idx"):
        FN(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"],
           cache_seqlens=inputs["cache_seqlens"])


def test_device_mismatch_names_the_argument():
    _, inputs = _base()
    with pytest.raises(ValueError, match="k_cache is on meta but q is on cpu"):
        FN(inputs["q"], inputs["k_cache"].to("meta"), inputs["v_cache"], cache_seqlens=3)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("change, message", [
    (lambda i: i["cache_seqlens"].fill_(64), "cache is too short"),
    (lambda i: i["block_table"].__setitem__((1, 0), 999), r"block_table\[1\] holds block 999"),
], ids=["seqlens-values", "block-values"])
def test_bad_index_values_raise_on_cpu_and_write_nothing(backend, change, message):
    _, inputs = _base()
    change(inputs)
    before = inputs["k_cache"].clone()
    with pyattn.use_backend(backend), pytest.raises(ValueError, match=message):
        FN(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"], **_kwargs(inputs))
    assert torch.equal(inputs["k_cache"], before)


TORCH_CASES = [name for name in sorted(CASES) if not any(k in name for k in ("softcap", "alibi"))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", TORCH_CASES)
def test_torch_backend_matches_reference(name, dtype):
    options = case_options(name)
    inputs = make_inputs(options, dtype)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with pyattn.use_backend("torch"):
        out = FN(inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"], **_kwargs(
            inputs, causal=options["causal"], window=options["window"]))
    want_out, _, want_k, want_v = expected(inputs, options)
    assert torch.equal(k_cache, want_k.to(dtype)) and torch.equal(v_cache, want_v.to(dtype))
    assert_close(out, want_out, RTOL[dtype])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("name", ["contiguous-append1-gqa", "paged16-append1"])
def test_torch_backend_at_equal_lengths_calls_sdpa_without_a_mask(name, causal, monkeypatch):
    """A decode step in which every query sees every key (equal lengths, one query) needs no mask."""
    options = dict(case_options(name), cache_seqlens=[30, 30, 30], causal=causal)
    inputs = make_inputs(options, torch.float64)
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recorded_sdpa)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with pyattn.use_backend("torch"):
        out = FN(inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"], **_kwargs(inputs, causal=causal))
    monkeypatch.undo()
    assert masks == [None]
    want_out, _, want_k, want_v = expected(inputs, options)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert_close(out, want_out, RTOL[torch.float64])


def test_auto_on_cpu_takes_torch_and_the_reference_for_what_sdpa_cannot_do():
    _, inputs = _base()
    args = (inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"])
    report = pyattn.explain("flash_attention_with_kvcache", *args, **_kwargs(inputs))
    assert "auto picks: torch" in report
    report = pyattn.explain("flash_attention_with_kvcache", *args, **_kwargs(inputs, softcap=5.0, return_lse=True))
    assert "unsupported features: lse, softcap" in report and "auto picks: reference" in report
    report = pyattn.explain("flash_attention_with_kvcache", *args, **_kwargs(inputs), assume="sm_90")
    assert "torch's CUDA SDPA kernels do not all give 0" in report


def test_explain_on_meta_tensors_reads_nothing():
    _, inputs = _base()
    meta = {name: (t.to("meta") if isinstance(t, torch.Tensor) else t) for name, t in inputs.items()}
    report = pyattn.explain("flash_attention_with_kvcache", meta["q"], meta["k_cache"], meta["v_cache"], meta["k"],
                            meta["v"], **_kwargs(meta))
    assert "op=attention_kvcache" in report and "paged" in report and "block_size=16" in report


def test_int_cache_seqlens_and_return_lse():
    options = dict(case_options("contiguous-append1-gqa"), cache_seqlens=[12, 12, 12])
    inputs = make_inputs(options, torch.float64)
    out, lse = FN(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"], cache_seqlens=12,
                  causal=True, return_lse=True)
    want_out, want_lse, _, _ = expected(make_inputs(options, torch.float64), options)
    assert_close(out, want_out, RTOL[torch.float64])
    assert_close(lse, want_lse, RTOL[torch.float64], "lse")
    assert lse.shape == (3, 4, 1)


# ------------------------------------------------------------------------------ the Triton launcher's launches


class _RecordedKernel:
    """Stands in for a Triton kernel: ``kernel[grid](**arguments)`` records the launch and runs nothing."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda **arguments: self.log.append((self.name, grid, arguments))


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("name", ["paged16-append1", "paged16-speculative", "contiguous-no-append", "batch-idx"])
def test_triton_launcher_launches_attention_once_and_no_separate_append(name, num_splits, monkeypatch):
    """The launcher layer mocked (no kernel runs): one attention launch, which carries the new k/v and so does the
    append, then the merge when split; nothing else."""
    pytest.importorskip("triton", reason="triton is not installed")
    from pyattn.kernels.decode import launch

    log: list = []
    monkeypatch.setattr(launch, "decode_attention_kernel", _RecordedKernel("attention", log))
    monkeypatch.setattr(launch, "combine_splits_kernel", _RecordedKernel("merge", log))
    options, inputs = _base(name=name)
    before = inputs["k_cache"].clone()
    launch.attention_with_kvcache(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["k"], inputs["v"],
                                  cache_seqlens=inputs["cache_seqlens"], block_table=inputs["block_table"],
                                  cache_batch_idx=inputs["cache_batch_idx"], scale=0.1, window_right=0,
                                  num_splits=num_splits)
    assert torch.equal(inputs["k_cache"], before), "something besides the (mocked) kernels wrote the cache"
    splits = launch.plan(inputs["q"], inputs["k_cache"], inputs["v_cache"], inputs["block_table"], num_splits,
                         None)["num_splits"]  # clamped to the cache's key tiles
    assert [entry[0] for entry in log] == ["attention"] + (["merge"] if splits > 1 else [])
    _, grid, arguments = log[0]
    batch, heads_k = options["batch"], options["heads_k"]
    assert grid[1:] == (splits, batch) and grid[0] % heads_k == 0
    assert arguments["seqlen_new"] == options["seqlen_new"]
    if options["seqlen_new"]:
        assert arguments["KNew"] is inputs["k"] and arguments["VNew"] is inputs["v"]
    else:
        assert arguments["KNew"] is inputs["q"]  # a placeholder of the same layout, never read


def test_decode_kernels_hold_no_separate_append():
    pytest.importorskip("triton", reason="triton is not installed")
    import triton

    from pyattn.kernels.decode import kernels

    launched = sorted(name for name, value in vars(kernels).items()
                      if isinstance(value, triton.runtime.JITFunction) and not name.startswith("_"))
    assert launched == ["combine_splits_kernel", "decode_attention_kernel"]


# ------------------------------------------------------------------------------------------------- GPU


def _cuda_inputs(name, dtype=torch.bfloat16):
    options = case_options(name)
    return options, make_inputs(options, dtype, "cuda")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_on_gpu_matches_reference(name):
    options, inputs = _cuda_inputs(name)
    want = call_reference(inputs, options, dtype=torch.float64)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with pyattn.use_backend("triton"):
        out, lse = FN(inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"], **_kwargs(
            inputs, causal=options["causal"], window=options["window"], softcap=options["softcap"],
            alibi_slopes=inputs["alibi_slopes"], return_lse=True))
    assert torch.equal(k_cache, want[2].to(k_cache.dtype))
    assert_close(out, want[0], RTOL[torch.bfloat16])


@pytest.mark.requires_cuda
def test_decode_step_captures_in_a_cuda_graph():
    """One decode step (append + split-K attention + merge) captured once, replayed with advanced lengths."""
    torch.manual_seed(0)
    batch, heads_q, heads_k, head_dim, capacity = 4, 8, 2, 128, 4096
    device, dtype = "cuda", torch.bfloat16
    k_cache = torch.randn(batch, capacity, heads_k, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    cache_seqlens = torch.tensor([0, 100, 1000, 3000], dtype=torch.int32, device=device)
    q = torch.randn(batch, 1, heads_q, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, 1, heads_k, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)

    def step():
        return FN(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)

    with pyattn.use_backend("triton"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up: compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        cache_seqlens.add_(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        for _ in range(3):
            q.normal_(), k.normal_(), v.normal_()
            cache_seqlens.add_(1)
            before_k = k_cache.clone()
            graph.replay()
            torch.cuda.synchronize()
            reference_k, reference_v = before_k, v_cache.clone()
            want, _ = pyattn.reference.decode.attention_with_kvcache(
                q.double(), reference_k.double(), reference_v.double(), k.double(), v.double(),
                cache_seqlens=cache_seqlens, scale=1 / math.sqrt(head_dim), window_right=0)
            assert_close(out, want, RTOL[dtype])


@pytest.mark.requires_cuda
def test_compiles_with_fullgraph():
    options, inputs = _cuda_inputs("paged16-append1")

    def step(q, k_cache, v_cache, k, v, cache_seqlens, block_table):
        return FN(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table, causal=True)

    want = call_reference(inputs, options, dtype=torch.float64)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    with pyattn.use_backend("triton"):
        out = torch.compile(step, fullgraph=True)(inputs["q"], k_cache, v_cache, inputs["k"], inputs["v"],
                                                  inputs["cache_seqlens"], inputs["block_table"])
    assert torch.equal(k_cache, want[2].to(k_cache.dtype))
    assert_close(out, want[0], RTOL[torch.bfloat16])
