"""Ahead-of-time compile specs of the attention kernels (``tests/test_triton_compile.py`` and
``python -m pyattn.kernels.report`` compile each for sm_90 and sm_80).

Every spec is a launch: ``meta`` tensors shaped and laid out as a call's inputs, run through the launchers'
own argument builders (``launch._forward_arguments`` and friends) and then through the JIT's binder
(``_aot.launch_spec``), so the spec carries exactly the specialisation (divisibility hints, constants) that
launch compiles with. Each case (dtype, head dim, option set) lists every config autotuning may choose for
it (``configs.table_configs``), in the "aligned" variant (contiguous inputs, lengths multiples of 16, MHA)
and, for the cases in ``UNALIGNED_CASES``, the "unaligned" one (views with odd strides and offsets, odd
lengths, GQA: no divisibility hint at all).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import _aot
from . import configs, launch
from .backward import attention_backward_dkdv_kernel, attention_backward_dq_kernel, attention_backward_preprocess_kernel
from .common import attention_dropout_keep_mask_kernel
from .forward import attention_forward_kernel
from .forward_ws import attention_forward_ws_kernel

_DTYPE_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
HEAD_DIMS = (64, 128, 256)

# Option sets a call can switch on, as launcher keywords (the window/causal values use L and S).
OPTION_SETS = {
    "plain": lambda L, S: {},
    "causal": lambda L, S: dict(window_right=0, diagonal_offset=S - L),
    # Every dense option at once: the most registers a call can need (Philox, mask loads, tanh, ALiBi, band).
    "dense-all": lambda L, S: dict(mask="bool", softcap=30.0, alibi=True, window_left=256, window_right=0,
                                   diagonal_offset=S - L, dropout_p=0.1),
    "additive-mask-all": lambda L, S: dict(mask="additive", softcap=30.0, alibi=True, window_left=256,
                                           window_right=0, diagonal_offset=S - L, dropout_p=0.1),
    "varlen-all": lambda L, S: dict(varlen=True, softcap=30.0, alibi=True, window_left=256, window_right=0,
                                    align_to_end=True, dropout_p=0.1),
}

# (dtype, head dim, option set) cases compiled for the band kernels (forward, dK/dV, fused dK/dV/dQ, dQ). Each
# table entry (configs.table_key) is reached by at least one case in each alignment, with every config it
# lists; "dense-all" (every dense option at once) stands for the "features" entries, being their worst case, and
# causal for the "band" entry (windows without per-score options; tables without one serve it from "plain").
# fp16 plain is the odd-shaped cases' (and d80's); the fp32 entries serve every option set, so their
# worst case, dense-all, stands for them. The head dims the forward splits into two column blocks
# (``launch.head_blocks``: 80 -> 64 + 16, 96 -> 64 + 32, 192 -> 128 + 64) take their padded width's entries
# (80 and 96: d128's, 192: d256's) with a different forward; the backward runs them padded, with masked columns.
SPLIT_HEAD_DIMS = (80, 96, 192)
CASES = (
    [(torch.bfloat16, head_dim, "plain") for head_dim in HEAD_DIMS]
    + [(dtype, head_dim, "dense-all") for dtype in (torch.bfloat16, torch.float32) for head_dim in HEAD_DIMS]
    + [(torch.bfloat16, 128, "causal"), (torch.float16, 128, "additive-mask-all"), (torch.bfloat16, 128, "varlen-all")]
    + [(torch.float16, head_dim, "plain") for head_dim in SPLIT_HEAD_DIMS]
    + [(torch.bfloat16, head_dim, option_set) for head_dim in (96, 192) for option_set in ("causal", "dense-all")]
    + [(torch.float32, head_dim, "dense-all") for head_dim in (96, 192)]
)
# The same entries as an odd-shaped launch compiles them (the unaligned tables' overrides included).
UNALIGNED_CASES = (
    [(torch.float16, head_dim, "plain") for head_dim in (*HEAD_DIMS, *SPLIT_HEAD_DIMS)]
    + [(torch.float16, 128, "causal")]
    + [(torch.bfloat16, head_dim, "dense-all") for head_dim in (*HEAD_DIMS, 96, 192)]
    + [(torch.float32, head_dim, "dense-all") for head_dim in (*HEAD_DIMS, 96, 192)]
)
# The descriptor forward takes the aligned forward table (TMA needs aligned strides): each entry once, plus
# odd lengths and GQA (the only unaligned launch TMA admits).
TMA_CASES = [(torch.bfloat16, head_dim, option_set) for head_dim in HEAD_DIMS for option_set in ("plain", "dense-all")]
TMA_CASES += [(torch.float16, 128, "plain"), (torch.bfloat16, 128, "causal")]  # causal: the "band" entry
TMA_UNALIGNED_CASES = [(torch.bfloat16, 128, "plain")]
# The warp-specialised forward: every head-dim entry plain and causal; odd lengths (MASK_KEYS) and GQA as the
# unaligned launch (its strides stay aligned: the descriptor rule).
WS_CASES = [(torch.bfloat16, head_dim, option_set) for head_dim in HEAD_DIMS for option_set in ("plain", "causal")]
WS_CASES += [(torch.float16, 128, "plain")]
WS_UNALIGNED_CASES = [(torch.bfloat16, head_dim, "causal") for head_dim in HEAD_DIMS]


def _inputs(dtype, head_dim, variant, varlen):
    """(q, k, v, layout keywords) of a modelled launch, as ``meta`` tensors."""
    meta = dict(dtype=dtype, device="meta")
    if variant == "aligned":  # contiguous, MHA, lengths multiples of 16
        batch, heads, kv_heads, seqlen_q, seqlen_k = 2, 8, 8, 1024, 1024
        pad, offset = 0, 0
    else:  # odd lengths, GQA (group 3), rows one element longer than the head dim, one element in
        batch, heads, kv_heads, seqlen_q, seqlen_k = 3, 6, 2, 1001, 1037
        pad, offset = 1, 1
    width = head_dim + pad
    if varlen:
        q = torch.empty(batch * seqlen_q, heads, width, **meta)[..., offset:offset + head_dim]
        k = torch.empty(batch * seqlen_k, kv_heads, width, **meta)[..., offset:offset + head_dim]
        v = torch.empty(batch * seqlen_k, kv_heads, width, **meta)[..., offset:offset + head_dim]
        cu_q = torch.empty(batch + 1, dtype=torch.int32, device="meta")
        cu_k = torch.empty(batch + 1, dtype=torch.int32, device="meta")
        layout = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=seqlen_q, max_seqlen_k=seqlen_k)
    else:
        q = torch.empty(batch, heads, seqlen_q, width, **meta)[..., offset:offset + head_dim]
        k = torch.empty(batch, kv_heads, seqlen_k, width, **meta)[..., offset:offset + head_dim]
        v = torch.empty(batch, kv_heads, seqlen_k, width, **meta)[..., offset:offset + head_dim]
        layout = {}
    return q, k, v, layout, (batch, heads, seqlen_q, seqlen_k)


def _call(dtype, head_dim, option_set, variant):
    """(q, k, v, launcher keywords) of a modelled call."""
    options = dict(OPTION_SETS[option_set](*((1001, 1037) if variant == "unaligned" else (1024, 1024))))
    varlen = options.pop("varlen", False)
    q, k, v, layout, (batch, heads, seqlen_q, seqlen_k) = _inputs(dtype, head_dim, variant, varlen)
    mask_kind = options.pop("mask", None)
    if mask_kind is not None:  # a (B, 1, L, S) mask broadcast over heads, as padding masks are
        mask_dtype = torch.bool if mask_kind == "bool" else dtype
        options["mask"] = torch.empty(batch, 1, seqlen_q, seqlen_k, dtype=mask_dtype, device="meta").expand(
            batch, heads, seqlen_q, seqlen_k)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.empty(heads, dtype=torch.float32, device="meta")
    if options.get("dropout_p"):
        options["seed"] = 1234567
    return q, k, v, dict(scale=head_dim ** -0.5, **layout, **options)


def _launch_options(call: dict) -> dict:
    """The launch keywords the argument builders take, with the launchers' defaults filled in."""
    return dict(scale=call["scale"], mask=call.get("mask"), window_left=call.get("window_left", -1),
                window_right=call.get("window_right", -1), diagonal_offset=call.get("diagonal_offset", 0),
                align_to_end=call.get("align_to_end", False), softcap=call.get("softcap", 0.0),
                alibi_slopes=call.get("alibi_slopes"), dropout_p=call.get("dropout_p", 0.0), seed=call.get("seed", 0),
                cu_seqlens_q=call.get("cu_seqlens_q"), cu_seqlens_k=call.get("cu_seqlens_k"))


def _options(constexprs: dict) -> dict:
    """The option-class inputs of ``configs.table_key`` from a launch's constexprs."""
    return dict(mask_kind=constexprs["MASK_KIND"], has_softcap=constexprs["HAS_SOFTCAP"],
                has_alibi=constexprs["HAS_ALIBI"], has_dropout=constexprs["HAS_DROPOUT"],
                has_window=constexprs["HAS_WINDOW_LEFT"] or constexprs["HAS_WINDOW_RIGHT"])


def _call_configs(table_name: str, dtype, positional, kernel, constexprs: dict) -> list[tuple]:
    """The configs autotuning may pick for this launch (as the pruner sees its arguments)."""
    alignment = dict(zip(kernel.arg_names, positional))["alignment"]
    return configs.table_configs(table_name, dtype, constexprs["HEAD_DIM_PADDED"], constexprs["HEAD_DIM_V_PADDED"],
                                 alignment=alignment, **_options(constexprs))


def _named(kernel, positional, constexprs, block_m, block_n):
    arguments = dict(zip(kernel.arg_names, positional))
    arguments.update(constexprs, BLOCK_M=block_m, BLOCK_N=block_n)
    return arguments


def _spec(kernel_name, kernel, case, variant, arguments, config, *, auto_may_pick=True, min_capability=80,
          table_entry=None):
    block_m, block_n, num_warps, num_stages, *register_cap = config
    maxnreg = register_cap[0] if register_cap else None
    tiles = f"BM{block_m}" + (f",BN{block_n}" if block_n else "") + f",w{num_warps},s{num_stages}"
    return _aot.launch_spec("attention", kernel_name, case, variant, kernel, arguments, config=tiles,
                            num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg, auto_may_pick=auto_may_pick,
                            min_capability=min_capability, table_entry=table_entry)


def _table_entry(table_name: str, dtype, positional, kernel, constexprs: dict) -> tuple:
    """(table name, entry key, alignment) of a launch: where autotuning takes its configs from."""
    alignment = dict(zip(kernel.arg_names, positional))["alignment"]
    key = configs.table_key(dtype, constexprs["HEAD_DIM_PADDED"], constexprs["HEAD_DIM_V_PADDED"],
                            table_name=table_name, **_options(constexprs))
    return table_name, key, "aligned" if alignment == configs.ALIGNED else "unaligned"


def _case_name(dtype, head_dim, option_set, dot_precision=None):
    dtype_name = _DTYPE_NAME[dtype] + (f"-{dot_precision}" if dtype == torch.float32 else "")
    return f"{dtype_name},d{head_dim},{option_set}"


def _band_specs(dtype, head_dim, option_set, variant, dot_precision=None) -> list[_aot.CompileSpec]:
    """Forward, dK/dV (plain and with the fused dQ) and dQ specs of one case, every config the tables give it."""
    q, k, v, call = _call(dtype, head_dim, option_set, variant)
    varlen = "cu_seqlens_q" in call
    shape = launch._check_inputs("aot", q, k, v, call.get("mask"), call.get("alibi_slopes"), call.get("cu_seqlens_q"),
                                 call.get("cu_seqlens_k"), call.get("max_seqlen_q", 0), call.get("max_seqlen_k", 0),
                                 call.get("dropout_p", 0.0), call.get("softcap", 0.0), call.get("seed", 0))
    options = _launch_options(call)
    out, lse = launch._forward_outputs(q, v, shape, varlen)
    forward_positional, forward_constexprs = launch._forward_arguments([q, k, v], out, lse, shape, q=q, v=v,
                                                                       use_tma=False, **options)
    precision = dot_precision or forward_constexprs["DOT_PRECISION"]
    case = _case_name(dtype, head_dim, option_set, precision)
    grad_out = torch.empty_like(out) if variant == "aligned" else q.new_empty(
        *out.shape[:-1], out.shape[-1] + 1)[..., 1:]
    specs = []
    kinds = [("attention_forward", attention_forward_kernel, "forward", None),
             ("attention_backward_dkdv", attention_backward_dkdv_kernel, "dkdv", True),
             ("attention_backward_dkdv_fused_dq", attention_backward_dkdv_kernel, "dkdv", False),
             ("attention_backward_dq", attention_backward_dq_kernel, "dq", True)]
    for kernel_name, kernel, table_name, deterministic in kinds:
        if deterministic is None:
            positional, constexprs = forward_positional, forward_constexprs
        else:
            delta, dq, dk, dv = launch._backward_buffers(q, k, v, lse, deterministic=deterministic)
            # GQA as the launcher splits it (the unaligned case's group of 3 over few programs: fp32 partials).
            heads_per_program = launch._gqa_heads_per_program(shape, q.device, None)
            dk, dv, _ = launch._dkdv_targets(dk, dv, shape, heads_per_program, varlen)
            positional, constexprs = launch._backward_arguments(table_name, grad_out, q, k, v, lse, delta, dq, dk, dv,
                                                                shape, deterministic=deterministic,
                                                                heads_per_program=heads_per_program,
                                                                capability=(8, 0), **options)
        constexprs = dict(constexprs, DOT_PRECISION=precision)
        # What a launch on sm_90 passes differently: the fused dQ's orientation (launch._transposes_fused_dq).
        hopper = {}
        if kernel_name == "attention_backward_dkdv_fused_dq" and launch._transposes_fused_dq(
                dtype, constexprs["HEAD_DIM_PADDED"], (9, 0)):
            hopper = {90: {"TRANSPOSED_DQ": True}}
        entry = _table_entry(table_name, dtype, positional, kernel, constexprs)
        for config in _call_configs(table_name, dtype, positional, kernel, constexprs):
            arguments = _named(kernel, positional, constexprs, config[0], config[1])
            spec = _spec(kernel_name, kernel, case, variant, arguments, config, table_entry=entry + (config,))
            specs.append(dataclasses.replace(spec, capability_constexprs=hopper))
    return specs


def _tma_specs(dtype, head_dim, option_set, variant) -> list[_aot.CompileSpec]:
    """The descriptor forward (Hopper only), its descriptors' boxes shaped as the autotuner's pre_hook shapes them."""
    q, k, v, call = _call(dtype, head_dim, option_set, variant)
    if variant == "unaligned":  # TMA needs 16-byte aligned strides: only the lengths and the GQA group stay odd
        q, k, v = (x.contiguous() for x in (q, k, v))
    reason = launch.tma_unsupported_reason(q, k, v, varlen=False, capability=(9, 0))
    assert reason is None, reason
    shape = launch._check_inputs("aot", q, k, v, call.get("mask"), call.get("alibi_slopes"), None, None, 0, 0,
                                 call.get("dropout_p", 0.0), call.get("softcap", 0.0), call.get("seed", 0))
    out, lse = launch._forward_outputs(q, v, shape, False)
    options = _launch_options(call)
    specs = []
    call_positional, call_constexprs = launch._forward_arguments([q, k, v], out, lse, shape, q=q, v=v, use_tma=False,
                                                                 **options)
    for config in _call_configs("forward", dtype, call_positional, attention_forward_kernel, call_constexprs):
        tiles = [launch._tma_descriptor(x) for x in (q, k, v)]
        positional, constexprs = launch._forward_arguments(tiles, out, lse, shape, q=q, v=v, use_tma=True, **options)
        arguments = _named(attention_forward_kernel, positional, constexprs, config[0], config[1])
        launch._set_tma_block_shapes(arguments)
        entry = _table_entry("forward", dtype, call_positional, attention_forward_kernel, call_constexprs)
        specs.append(_spec("attention_forward_tma", attention_forward_kernel, _case_name(dtype, head_dim, option_set),
                           variant, arguments, config, min_capability=90, table_entry=entry + (config,)))
    return specs


def _ws_specs(dtype, head_dim, option_set, variant) -> list[_aot.CompileSpec]:
    """The warp-specialised forward (Hopper only), every config of its head-dim entry."""
    q, k, v, call = _call(dtype, head_dim, option_set, variant)
    if variant == "unaligned":  # descriptors need 16-byte aligned strides: only the lengths and the GQA group stay odd
        q, k, v = (x.contiguous() for x in (q, k, v))
    reason = launch.warp_specialized_unsupported_reason(q, k, v, varlen=False, capability=(9, 0), scale=call["scale"])
    assert reason is None, reason
    shape = launch._check_inputs("aot", q, k, v, None, None, None, None, 0, 0, 0.0, 0.0, 0)
    out, lse = launch._forward_outputs(q, v, shape, False)
    positional, constexprs = launch._forward_ws_arguments(q, k, v, out, lse, shape, scale=call["scale"],
                                                          window_right=call.get("window_right", -1),
                                                          diagonal_offset=call.get("diagonal_offset", 0))
    key = configs.head_dim_class(head_dim, head_dim)
    specs = []
    for config in configs.forward_ws_configs(head_dim, head_dim):
        arguments = _named(attention_forward_ws_kernel, positional, constexprs, config[0], config[1])
        specs.append(_spec("attention_forward_ws", attention_forward_ws_kernel, _case_name(dtype, head_dim, option_set),
                           variant, arguments, config, min_capability=90,
                           table_entry=("forward_ws", key, variant, config)))
    return specs


def _preprocess_specs(dtype, head_dim, option_set, variant) -> list[_aot.CompileSpec]:
    q, k, v, call = _call(dtype, head_dim, option_set, variant)
    varlen = "cu_seqlens_q" in call
    shape = launch._check_inputs("aot", q, k, v, None, None, call.get("cu_seqlens_q"), call.get("cu_seqlens_k"),
                                 call.get("max_seqlen_q", 0), call.get("max_seqlen_k", 0), 0.0, 0.0, 0)
    out, lse = launch._forward_outputs(q, v, shape, varlen)
    grad_out = torch.empty_like(out) if variant == "aligned" else q.new_empty(
        *out.shape[:-1], out.shape[-1] + 1)[..., 1:]
    delta, _, _, _ = launch._backward_buffers(q, k, v, lse, deterministic=True)
    positional, constexprs = launch._preprocess_arguments(out, grad_out, delta, shape,
                                                          cu_seqlens_q=call.get("cu_seqlens_q"))
    block_m, num_warps, num_stages = configs.PREPROCESS_CONFIG
    arguments = _named(attention_backward_preprocess_kernel, positional, constexprs, block_m, None)
    del arguments["BLOCK_N"]
    return [_spec("attention_backward_preprocess", attention_backward_preprocess_kernel,
                  f"{_DTYPE_NAME[dtype]},d{head_dim},{'varlen' if varlen else 'dense'}", variant, arguments,
                  (block_m, None, num_warps, num_stages))]


def _keep_mask_spec() -> _aot.CompileSpec:
    block_m, block_n, num_warps, num_stages = configs.KEEP_MASK_CONFIG
    keep = torch.empty(2, 8, 1024, 1024, dtype=torch.int8, device="meta")
    arguments = dict(Keep=keep, num_heads=8, seqlen_q=1024, seqlen_k=1024, dropout_p=0.1, seed=1234567,
                     BLOCK_M=block_m, BLOCK_N=block_n)
    return _spec("attention_dropout_keep_mask", attention_dropout_keep_mask_kernel, "int8", "aligned", arguments,
                 configs.KEEP_MASK_CONFIG)


def aot_specs() -> list[_aot.CompileSpec]:
    """Every attention kernel specialisation the compile test and the report compile."""
    specs = []
    for dtype, head_dim, option_set in CASES:
        specs += _band_specs(dtype, head_dim, option_set, "aligned")
    for dtype, head_dim, option_set in UNALIGNED_CASES:
        specs += _band_specs(dtype, head_dim, option_set, "unaligned")
    # fp32 with TF32 dots (torch.backends.cuda.matmul.allow_tf32 = True); the fp32 cases above are strict IEEE.
    specs += _band_specs(torch.float32, 128, "plain", "aligned", dot_precision="tf32")
    for dtype, head_dim, option_set in TMA_CASES:
        specs += _tma_specs(dtype, head_dim, option_set, "aligned")
    for dtype, head_dim, option_set in TMA_UNALIGNED_CASES:
        specs += _tma_specs(dtype, head_dim, option_set, "unaligned")
    for dtype, head_dim, option_set in WS_CASES:
        specs += _ws_specs(dtype, head_dim, option_set, "aligned")
    for dtype, head_dim, option_set in WS_UNALIGNED_CASES:
        specs += _ws_specs(dtype, head_dim, option_set, "unaligned")
    for dtype in _DTYPE_NAME:
        for head_dim in (*HEAD_DIMS, 80):
            specs += _preprocess_specs(dtype, head_dim, "plain", "aligned")
    specs += _preprocess_specs(torch.float16, 80, "plain", "unaligned")
    specs += _preprocess_specs(torch.bfloat16, 128, "varlen-all", "aligned")
    specs.append(_keep_mask_spec())
    return specs
