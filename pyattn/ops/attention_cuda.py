"""Attention on the cuda backend: the ops of the CUDA extension (pyattn._C) — fake kernels, autograd, variants.

The ops are defined in C++ (csrc/registration.cpp, csrc/attention/attention_api.cpp):

  pyattn::cuda_attention_fwd(q, k, v, mask?, alibi_slopes?, scale, window_left, window_right, diagonal_offset,
                             softcap, deterministic) -> out (B, Hq, L, D) laid out like q, lse (B, Hq, L) float32
  pyattn::cuda_attention_bwd(grad_out, q, k, v, out, lse, mask?, alibi_slopes?, scale, window_left, window_right,
                             diagonal_offset, softcap, deterministic) -> grad_q, grad_k, grad_v (each like its input)
  pyattn::cuda_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes?, max_seqlen_q, max_seqlen_k,
                                    scale, window_left, window_right, diagonal_offset, align_to_end, softcap,
                                    deterministic) -> out (total_q, Hq, D), lse (Hq, total_q) float32
  pyattn::cuda_attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes?,
                                    max_seqlen_q, max_seqlen_k, scale, ..., deterministic) -> grad_q, grad_k, grad_v

Both run FlashAttention-2 on ``mma.sync.m16n8k16`` with ``ldmatrix`` and ``cp.async`` pipelining (the sm80
path, which also serves Hopper until an sm_90a path lands; docs/attention.md). ``deterministic`` is an
input of the forward only so that ``setup_context`` can hand it to the backward (dQ by a second pass
instead of fp32 atomics). Served: fp16/bf16, head dims 64 and 128 (q, k and v alike), any strides whose
last dim is contiguous and whose others are 16-byte multiples (bhsd and bshd views), GQA/MQA, causal and
sliding windows, softcap, ALiBi, bool/additive masks through strides, the LSE, and the varlen layout (the
same kernels, each CTA reading its sequence's rows and lengths from cu_seqlens on the device; causal and
windows aligned to each sequence's bottom-right corner, as the Triton varlen path). Not served (dispatch
sends those calls on, ``explain`` says why): dropout (left to the triton backend), gradients of masks or
slopes, other head dims, fp32.

Importing this module never fails: without the extension the variants say so in ``explain``.
"""

from __future__ import annotations

import torch

from pyattn.kernels._layout import base_is_16_byte_aligned, new_attention_output
from pyattn._registry import Request, Support, Target, register
from pyattn.ops.attention_backward_reference import BACKWARD_FEATURES

HEAD_DIMS = (64, 128)
_DEVICES = frozenset({"cuda"})
_DTYPES = frozenset({torch.float16, torch.bfloat16})
_FEATURES = frozenset({"mask", "causal", "window", "softcap", "alibi", "gqa", "lse"})
_VARLEN_FEATURES = _FEATURES - {"mask"}  # flash_attention_varlen takes no mask
_MIN_CAPABILITY = (8, 0)  # mma.sync.m16n8k16 with bf16, cp.async, ldmatrix
# The most dynamic shared memory a kernel of each head dim asks for (the backward's dK/dV kernel; the
# forward takes 64 KB / 96 KB), mirrored from csrc/attention (a test compares): sm_86/sm_89 allow 99 KB.
SHARED_MEMORY_BYTES = {64: 82944, 128: 107008}


def _extension_ops_loaded() -> bool:
    try:
        from pyattn import _extension

        _extension.extension_module()
    except ImportError:
        return False
    return hasattr(torch.ops.pyattn, "cuda_attention_fwd")


# ---- fake kernels (shapes and layouts only, never data; the layouts are attention_api.cpp's) ----


def _fake_forward(q, k, v, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset, softcap,
                  deterministic):
    return new_attention_output(q, q.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _fake_backward(grad_out, q, k, v, out, lse, mask, alibi_slopes, scale, window_left, window_right,
                   diagonal_offset, softcap, deterministic):
    return (new_attention_output(q, q.shape[-1]), new_attention_output(k, k.shape[-1]),
            new_attention_output(v, v.shape[-1]))


def _fake_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k, scale,
                         window_left, window_right, diagonal_offset, align_to_end, softcap, deterministic):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # contiguous


def _fake_varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q,
                          max_seqlen_k, scale, window_left, window_right, diagonal_offset, align_to_end, softcap,
                          deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---- autograd ----

# forward op -> (backward op, the forward's tensor inputs the backward takes, its other inputs), by schema name.
_BACKWARDS = {
    "cuda_attention_fwd": ("cuda_attention_bwd", ("q", "k", "v", "mask", "alibi_slopes"),
                           ("scale", "window_left", "window_right", "diagonal_offset", "softcap", "deterministic")),
    "cuda_attention_varlen_fwd": (
        "cuda_attention_varlen_bwd", ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes"),
        ("max_seqlen_q", "max_seqlen_k", "scale", "window_left", "window_right", "diagonal_offset", "align_to_end",
         "softcap", "deterministic")),
}


def _autograd(forward_name: str):
    """(backward, setup_context) of one forward op: saves out, lse and the inputs its backward op reads."""
    backward_name, saved_names, option_names = _BACKWARDS[forward_name]
    schema_names = tuple(a.name for a in getattr(torch.ops.pyattn, forward_name).default._schema.arguments)

    def setup_context(ctx, inputs, output):
        arguments = dict(zip(schema_names, inputs))
        out, lse = output
        ctx.save_for_backward(out, lse, *(arguments[name] for name in saved_names))
        ctx.options = {name: arguments[name] for name in option_names}
        ctx.mark_non_differentiable(lse)  # returned detached by the functional layer, as flash-attn's

    def backward(ctx, grad_out, _grad_lse):
        out, lse, *saved = ctx.saved_tensors
        grad_q, grad_k, grad_v = getattr(torch.ops.pyattn, backward_name)(
            grad_out=grad_out, out=out, lse=lse, **dict(zip(saved_names, saved)), **ctx.options)
        gradients = dict.fromkeys(schema_names)
        gradients.update(q=grad_q, k=grad_k, v=grad_v)
        return tuple(gradients.values())

    return backward, setup_context


# ---- dispatch variants (the signatures every backend shares) ----


def chunk_aligned(tensor: torch.Tensor) -> bool:
    """What cp.async's 16-byte chunks need: a contiguous last dim, every other stride of a dim longer
    than 1 a multiple of 8 elements, a 16-byte aligned base (0 on meta tensors)."""
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        return False
    if any(size > 1 and stride % 8 for size, stride in zip(tensor.shape[:-1], tensor.stride()[:-1])):
        return False
    return base_is_16_byte_aligned(tensor)


def operands_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these operands (head dims, strides), or None."""
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if head_dim != head_dim_v:
        return f"head dims {head_dim} (q, k) and {head_dim_v} (v) differ: the CUDA kernels need them equal"
    if head_dim not in HEAD_DIMS:
        return (f"head dim {head_dim}: the CUDA kernels are built for {' and '.join(map(str, HEAD_DIMS))} "
                "(one .cu per dtype and head dim)")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not chunk_aligned(tensor):
            return (f"{name}: strides {tuple(tensor.stride())} (or its base address) are not what cp.async's 16-byte "
                    "chunks need: a contiguous last dim and the other strides multiples of 8 elements")
    return None


def _check_operands(request: Request, target: Target) -> str | None:
    if not EXTENSION_OPS_LOADED:
        return "the extension pyattn._C holds no attention kernels (built before csrc/attention existed: rebuild)"
    needed = SHARED_MEMORY_BYTES.get(request.head_dim)
    if needed is not None and target.shared_memory_per_block is not None and needed > target.shared_memory_per_block:
        return (f"head dim {request.head_dim}: the kernels need {needed} B of shared memory per block, over the "
                f"{target.shared_memory_per_block} B this GPU allows")
    operands = request.operands
    if not operands:
        return None
    return operands_unsupported_reason(operands["q"], operands["k"], operands["v"])


def _check_varlen_ops(request: Request, target: Target) -> str | None:
    if EXTENSION_OPS_LOADED and not VARLEN_OPS_LOADED:
        return "the extension pyattn._C was built before the varlen kernels (cuda_attention_varlen_fwd): rebuild"
    return None


def _check_grid(request: Request, target: Target) -> str | None:
    for name in ("batch", "heads_q"):
        value = request.size(name)
        if value is not None and value > 65535:
            return f"{name} {value} > 65535: the kernels put batch and heads on the grid's y and z"
    return None


def _support(features: frozenset[str], *extra_checks) -> Support:
    return Support(devices=_DEVICES, dtypes=_DTYPES, features=features, max_head_dim=max(HEAD_DIMS),
                   min_compute_capability=_MIN_CAPABILITY, checks=(_check_operands, *extra_checks))


_SUMMARY = "FlashAttention-2 on mma.sync/ldmatrix/cp.async (sm_80+, also Hopper); dropout is left to triton"


@register("cuda", "attention", _support(_FEATURES), variant="sm80", summary=_SUMMARY)
def cuda_attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap, alibi_slopes,
                   dropout_p, deterministic):
    if dropout_p > 0:
        raise ValueError("dropout_p: the cuda attention kernels have no dropout; dispatch routes such calls to triton")
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.contiguous()
    return torch.ops.pyattn.cuda_attention_fwd(q, k, v, mask, alibi_slopes, scale, window_left, window_right,
                                               diagonal_offset, softcap, deterministic)


@register("cuda", "attention_backward", _support(BACKWARD_FEATURES), variant="sm80",
          summary="FlashAttention-2 backward (preprocess, dK/dV, dQ) from the given out and lse")
def cuda_attention_backward(grad_out, q, k, v, out, lse, *, scale, window_left, window_right, diagonal_offset,
                            softcap):
    out = out if out.stride(-1) == 1 else out.contiguous()
    return torch.ops.pyattn.cuda_attention_bwd(grad_out, q, k, v, out, lse.contiguous(), None, None, scale,
                                               window_left, window_right, diagonal_offset, softcap, False)


@register("cuda", "attention_varlen", _support(_VARLEN_FEATURES, _check_varlen_ops, _check_grid), variant="sm80",
          summary="the same kernels over packed sequences, rows and lengths read from cu_seqlens on the device")
def cuda_attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                          window_right, diagonal_offset, align_to_end, softcap, alibi_slopes, dropout_p, deterministic):
    if dropout_p > 0:
        raise ValueError("dropout_p: the cuda attention kernels have no dropout; dispatch routes such calls to triton")
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.contiguous()
    return torch.ops.pyattn.cuda_attention_varlen_fwd(
        q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), alibi_slopes, max_seqlen_q, max_seqlen_k, scale,
        window_left, window_right, diagonal_offset, align_to_end, softcap, deterministic)


EXTENSION_OPS_LOADED = _extension_ops_loaded()
VARLEN_OPS_LOADED = EXTENSION_OPS_LOADED and hasattr(torch.ops.pyattn, "cuda_attention_varlen_fwd")

if EXTENSION_OPS_LOADED:
    torch.library.register_fake("pyattn::cuda_attention_fwd")(_fake_forward)
    torch.library.register_fake("pyattn::cuda_attention_bwd")(_fake_backward)
if VARLEN_OPS_LOADED:
    torch.library.register_fake("pyattn::cuda_attention_varlen_fwd")(_fake_varlen_forward)
    torch.library.register_fake("pyattn::cuda_attention_varlen_bwd")(_fake_varlen_backward)
_LOADED_FORWARDS = {"cuda_attention_fwd": EXTENSION_OPS_LOADED, "cuda_attention_varlen_fwd": VARLEN_OPS_LOADED}
for _forward in (name for name, loaded in _LOADED_FORWARDS.items() if loaded):
    _backward, _setup_context = _autograd(_forward)
    torch.library.register_autograd(f"pyattn::{_forward}", _backward, setup_context=_setup_context)
