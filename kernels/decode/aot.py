"""Ahead-of-time compile specs of the decode kernels: every specialisation a launch can produce.

Each spec is built from the *arguments of a launch* (``meta`` tensors laid out as the launchers lay them out,
through the launchers' own argument builders and the JIT's binder: ``pyattn.kernels._aot.launch_spec``), so it
compiles what that launch would. Reached by a call: dtype (fp16, bf16, fp32 with strict dots; one fp32 TF32
spec) × head-dim tile class (64, 128, 256; 80 is padded to 128) × BLOCK_M (16, 64; fp32 16) × contiguous or paged
cache × split or direct for the attention kernel, which also appends (the specs append as many tokens as
queries; a call without k/v passes q in their place and specialises alike, which
``tests/test_decode_compile.py`` checks); output dtype × head dim × padded split count (2 … 128) for the merge.
Features (softcap, ALiBi, both window sides, cache_batch_idx) are compiled together once per half dtype and
layout. "unaligned" launches take q and the new k/v as views whose base address and strides are not 16-byte
multiples (a fused QKV projection's slices): no divisibility hint on them.
The sizes the kernels use only in arithmetic are ``do_not_specialize``: their values select no variant.

``python -m pyattn.kernels.decode.aot`` compiles every spec for sm_90 and sm_80 (figures cached beside the other
ops', :func:`pyattn.kernels._aot.compile_result`) and prints registers, spills and shared memory per spec.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys

import torch

from .._aot import CAPABILITIES, CompileSpec, compile_result, launch_spec
from . import configs, launch
from .kernels import combine_splits_kernel, decode_attention_kernel

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_HEAD_DIMS = (64, 128, 256)
_BATCH, _HEADS_K, _GROUP = 4, 2, 8
_CACHE_LEN, _BLOCK_SIZE = 1024, 256


def _tensor(shape, dtype, *, aligned: bool) -> torch.Tensor:
    """A meta tensor of ``shape``; unaligned: a view one element into a buffer one element wider per row (as q,
    k, v sliced out of a fused projection; caches are allocated whole, so they stay aligned)."""
    if aligned:
        return torch.empty(shape, dtype=dtype, device="meta")
    wide = torch.empty((*shape[:-1], shape[-1] + 1), dtype=dtype, device="meta")
    return wide[..., 1:]


def _cache(dtype, head_dim, *, paged: bool):
    rows = _BATCH * _CACHE_LEN // _BLOCK_SIZE if paged else _BATCH
    length = _BLOCK_SIZE if paged else _CACHE_LEN
    k_cache = _tensor((rows, length, _HEADS_K, head_dim), dtype, aligned=True)
    v_cache = _tensor((rows, length, _HEADS_K, head_dim), dtype, aligned=True)
    block_table = None
    if paged:
        block_table = torch.empty((_BATCH, _CACHE_LEN // _BLOCK_SIZE), dtype=torch.int32, device="meta")
    return k_cache, v_cache, block_table


def _case(dtype, head_dim, layout, extra=""):
    return f"{_DTYPES[dtype]},d{head_dim},{layout}" + (f",{extra}" if extra else "")


def _attention_spec(dtype, head_dim, block_m, *, paged, split, features=False, batch_idx=False, aligned=True,
                    precision=None, append=True) -> CompileSpec:
    seqlen_q = 1 if block_m == 16 else 4  # a group of 8: 8 rows (one decode token) or 32 (speculative decoding)
    q = _tensor((_BATCH, seqlen_q, _HEADS_K * _GROUP, head_dim), dtype, aligned=aligned)
    k = v = None
    if append:  # as many new tokens as queries (a decode or a speculative step)
        k = _tensor((_BATCH, seqlen_q, _HEADS_K, head_dim), dtype, aligned=aligned)
        v = _tensor((_BATCH, seqlen_q, _HEADS_K, head_dim), dtype, aligned=aligned)
    k_cache, v_cache, block_table = _cache(dtype, head_dim, paged=paged)
    block_n, num_warps, num_stages, maxnreg = configs.decode_config(dtype, head_dim, head_dim, block_m,
                                                                    interpreter=False)
    splits = 4 if split else 1
    heads_q = q.shape[2]
    if split:
        out = torch.empty((splits, _BATCH, seqlen_q, heads_q, head_dim), dtype=torch.float32, device="meta")
        lse = torch.empty((splits, _BATCH, seqlen_q, heads_q), dtype=torch.float32, device="meta")
    else:
        out = torch.empty((_BATCH, seqlen_q, heads_q, head_dim), dtype=dtype, device="meta")
        lse = torch.empty((_BATCH, heads_q, seqlen_q), dtype=torch.float32, device="meta")
    plan = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_NEW=configs.APPEND_BLOCK_N, num_splits=splits)
    arguments = launch.attention_arguments(
        q, k_cache, v_cache, k, v, out, lse, cache_seqlens=torch.empty((_BATCH,), dtype=torch.int32, device="meta"),
        block_table=block_table,
        cache_batch_idx=torch.empty((_BATCH,), dtype=torch.int32, device="meta") if batch_idx else None,
        alibi_slopes=torch.empty((heads_q,), dtype=torch.float32, device="meta") if features else None,
        scale=0.1, window_left=256 if features else -1, window_right=0 if features else -1,
        softcap=30.0 if features else 0.0, launch=plan)
    if precision is not None:
        arguments["DOT_PRECISION"] = precision
    dtype_name = f"{_DTYPES[dtype]}-{arguments['DOT_PRECISION']}" if dtype == torch.float32 else _DTYPES[dtype]
    layout = "paged" if paged else ("batch-idx" if batch_idx else "contiguous")
    case = (f"{dtype_name},d{head_dim},{layout},{'split' if split else 'direct'}" + (",all" if features else "")
            + ("" if append else ",no-append"))
    return launch_spec("decode", "decode_attention", case, "aligned" if aligned else "unaligned",
                       decode_attention_kernel, arguments,
                       config=f"BM{block_m},BN{block_n},BNEW{configs.APPEND_BLOCK_N},w{num_warps},s{num_stages}",
                       num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg, auto_may_pick=True)


def _combine_spec(dtype, head_dim, splits) -> CompileSpec:
    heads_q = _HEADS_K * _GROUP
    partial_out = torch.empty((splits, _BATCH, 1, heads_q, head_dim), dtype=torch.float32, device="meta")
    partial_lse = torch.empty((splits, _BATCH, 1, heads_q), dtype=torch.float32, device="meta")
    out = torch.empty((_BATCH, 1, heads_q, head_dim), dtype=dtype, device="meta")
    lse = torch.empty((_BATCH, heads_q, 1), dtype=torch.float32, device="meta")
    arguments = launch.combine_arguments(partial_out, partial_lse, out, lse, num_splits=splits)
    return launch_spec("decode", "decode_combine", _case(dtype, head_dim, f"S{arguments['SPLITS_PADDED']}"),
                       "aligned", combine_splits_kernel, arguments, config="w4,s1", num_warps=4, num_stages=1,
                       auto_may_pick=True)


def aot_specs() -> list[CompileSpec]:
    specs = []
    for dtype in _DTYPES:
        for head_dim in _HEAD_DIMS:
            for block_m in configs.block_m_choices(dtype):
                for paged in (False, True):
                    for split in (False, True):
                        specs.append(_attention_spec(dtype, head_dim, block_m, paged=paged, split=split))
            splits = 2
            while splits <= launch.MAX_SPLITS:
                specs.append(_combine_spec(dtype, head_dim, splits))
                splits *= 2
        for paged in (False, True):  # views of a fused projection: no 16-byte alignment anywhere
            specs.append(_attention_spec(dtype, 128, 16, paged=paged, split=True, aligned=False))
    for dtype in (torch.float16, torch.bfloat16):
        specs.append(_attention_spec(dtype, 128, 16, paged=False, split=True, features=True, batch_idx=True))
        specs.append(_attention_spec(dtype, 128, 64, paged=True, split=True, features=True))
        specs.append(_attention_spec(dtype, 128, 16, paged=True, split=False, features=True))
    # A head dim that is not a power of two (padded to 128, masked), and fp32 with TF32 dots (allow_tf32=True).
    specs.append(_attention_spec(torch.float16, 80, 16, paged=True, split=True))
    specs.append(_combine_spec(torch.float16, 80, 8))
    specs.append(_attention_spec(torch.float32, 128, 16, paged=False, split=True, precision="tf32"))
    return specs


def specs_by_name() -> dict[str, CompileSpec]:
    return {spec.name: spec for spec in aot_specs()}


def _compile_job(name: str, capability: int) -> dict:
    return compile_result(specs_by_name()[name], capability)  # a worker rebuilds the specs: kernels do not pickle


def compile_all(capabilities=CAPABILITIES, workers: int | None = None, progress=None) -> dict:
    """{(spec name, capability): figures} of every spec, compiled in a process pool (cached ones read back)."""
    names = list(specs_by_name())
    jobs = [(name, capability) for name in names for capability in capabilities]
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(jobs)))
    results = {}
    context = multiprocessing.get_context("spawn")  # no fork after torch/triton have started threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_compile_job, *job): job for job in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            if progress is not None and not results[futures[future]].get("cached"):
                print(f"[decode aot] {done}/{len(jobs)} {futures[future][0]} sm_{futures[future][1]}", file=progress,
                      flush=True)
    return results


def main() -> int:
    """Print every spec's figures per arch; exit 1 if one fails to compile or spills."""
    results = compile_all(progress=sys.stderr)
    bad = 0
    print(f"{'spec':<100} " + "  ".join(f"sm_{c}: regs spill shared" for c in CAPABILITIES))
    for name in specs_by_name():
        cells = []
        for capability in CAPABILITIES:
            figures = results[(name, capability)]
            if figures.get("error"):
                bad += 1
                cells.append(f"sm_{capability}: ERROR {figures['error'][:60]}")
                continue
            bad += bool(figures["spill_bytes"])
            cells.append(f"sm_{capability}: {figures['registers']:>4} {figures['spill_bytes']:>5} "
                         f"{figures['shared_bytes']:>6}")
        print(f"{name:<100} " + "  ".join(cells))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
