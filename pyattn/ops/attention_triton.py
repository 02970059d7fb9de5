"""Attention on the triton backend: the custom ops over ``pyattn.kernels.attention``, with autograd.

One forward and one backward custom op serve the dense and the varlen layouts (cu_seqlens None =
dense); the mask's dtype is its kind (bool = visibility, float = additive). Two variants serve the
dense op, tried in this order: ``triton/tma`` (Hopper: Q/K/V tiles through TMA descriptors, where
the call's dtype, head dims and strides allow) and ``triton/pointer`` (every GPU). A third,
``triton/ws`` (the warp-specialised Hopper forward), serves plain and causal calls when forced by name;
``auto`` passes it over until a GPU run has timed it against ``triton/tma`` (docs/attention.md, v7). Dropout draws its
Philox seed from torch's default generator, so ``torch.manual_seed`` makes it reproducible.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyattn.kernels._layout import new_attention_output
from pyattn._registry import Request, Support, Target, register
from pyattn.ops.attention_common import FEATURES

_TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
_TRITON_FEATURES = FEATURES - {"mask_grad", "alibi_grad"}  # no gradient for a float mask or the slopes (as flash-attn)


def _descriptor_operands(request: Request, target: Target):
    """(q, k, v, compute capability) for a descriptor path's rule, or the reason it cannot be judged. The
    interpreter (forced variants on CPU tensors) runs descriptors as on ``INTERPRETER_CAPABILITY``."""
    if target.device_type != "cuda" and not target.interpreter:
        return f"TMA needs a CUDA GPU of compute capability >= 9.0, not {target.device_type}"
    operands = request.operands
    if not {"q", "k", "v"} <= set(operands):
        return "the call's q, k, v are unknown (their strides and alignment decide TMA)"
    from pyattn.kernels.attention import INTERPRETER_CAPABILITY

    capability = target.capability if target.device_type == "cuda" else INTERPRETER_CAPABILITY
    return operands["q"], operands["k"], operands["v"], capability


def _check_warp_specialized(request: Request, target: Target) -> str | None:
    operands = _descriptor_operands(request, target)
    if isinstance(operands, str):
        return operands
    from pyattn.kernels.attention import warp_specialized_unsupported_reason

    # The per-score options are features, which the Support below excludes; a non-positive scale (the request
    # does not carry it) is refused by the launcher, naming it.
    *tensors, capability = operands
    return warp_specialized_unsupported_reason(*tensors, varlen=False, capability=capability)


def _check_tma(request: Request, target: Target) -> str | None:
    operands = _descriptor_operands(request, target)
    if isinstance(operands, str):
        return operands
    from pyattn.kernels.attention import tma_unsupported_reason

    *tensors, capability = operands
    return tma_unsupported_reason(*tensors, varlen=False, capability=capability)


_POINTER_SUPPORT = Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}), dtypes=_TRITON_DTYPES,
                           max_head_dim=256, features=_TRITON_FEATURES)
_TMA_SUPPORT = Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}),
                       dtypes=frozenset({torch.float16, torch.bfloat16}), max_head_dim=256,
                       min_compute_capability=(9, 0), features=_TRITON_FEATURES, checks=(_check_tma,))
_WARP_SPECIALIZED_SUPPORT = Support(
    devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}), dtypes=frozenset({torch.float16, torch.bfloat16}),
    max_head_dim=256, min_compute_capability=(9, 0), features=frozenset({"causal", "gqa", "lse"}),
    checks=(_check_warp_specialized,),
    forced_only="not yet timed on a GPU against triton/tma, which auto takes (docs/attention.md, schedule v7)")


def _kernels():
    import pyattn.kernels.attention as kernels  # lazily: Triton may be absent

    return kernels


def _seed_value(dropout_seed: Optional[Tensor]) -> int:
    return 0 if dropout_seed is None else int(dropout_seed.item())


@torch.library.custom_op("pyattn::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], dropout_seed: Optional[Tensor],
    scale: float, window_left: int, window_right: int, diagonal_offset: int, align_to_end: bool, softcap: float,
    dropout_p: float, max_seqlen_q: int, max_seqlen_k: int, deterministic: bool, use_tma: bool,
    warp_specialize: bool = False,
) -> tuple[Tensor, Tensor]:
    del deterministic  # an input only so that the backward can read it
    return _kernels().attention_forward(
        q, k, v, scale=scale, mask=mask, window_left=window_left, window_right=window_right,
        diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, seed=_seed_value(dropout_seed), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, use_tma=use_tma, warp_specialize=warp_specialize)


@triton_attention_fwd.register_fake
def _(q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, dropout_seed, scale, window_left, window_right,
      diagonal_offset, align_to_end, softcap, dropout_p, max_seqlen_q, max_seqlen_k, deterministic, use_tma,
      warp_specialize=False):
    if cu_seqlens_q is None:
        out = new_attention_output(q, v.shape[-1])
    else:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    if cu_seqlens_q is None:
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, Hq, L)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)  # (Hq, total_q)
    return out, lse


@torch.library.custom_op("pyattn::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
    alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    dropout_seed: Optional[Tensor], scale: float, window_left: int, window_right: int, diagonal_offset: int,
    align_to_end: bool, softcap: float, dropout_p: float, max_seqlen_q: int, max_seqlen_k: int, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().attention_backward(
        grad_out, q, k, v, out, lse, scale=scale, mask=mask, window_left=window_left, window_right=window_right,
        diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, seed=_seed_value(dropout_seed), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, deterministic=deterministic)


@triton_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, dropout_seed, scale, window_left,
      window_right, diagonal_offset, align_to_end, softcap, dropout_p, max_seqlen_q, max_seqlen_k, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernels allocate


_FORWARD_PARAMETERS = tuple(argument.name
                            for argument in torch.ops.pyattn.triton_attention_fwd.default._schema.arguments)
_SAVED_TENSORS = ("q", "k", "v", "mask", "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "dropout_seed")
_OPTIONS = ("scale", "window_left", "window_right", "diagonal_offset", "align_to_end", "softcap", "dropout_p",
            "max_seqlen_q", "max_seqlen_k", "deterministic")  # the backward's; use_tma, warp_specialize: the forward's


def _setup_context(ctx, inputs, output):
    arguments = dict(zip(_FORWARD_PARAMETERS, inputs))
    out, lse = output
    ctx.save_for_backward(out, lse, *(arguments[name] for name in _SAVED_TENSORS))
    ctx.options = {name: arguments[name] for name in _OPTIONS}
    # The functional layer returns lse detached (as flash-attn's); only `out` carries a gradient.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    out, lse, *saved = ctx.saved_tensors
    tensors = dict(zip(_SAVED_TENSORS, saved))
    dq, dk, dv = triton_attention_bwd(grad_out, tensors["q"], tensors["k"], tensors["v"], out, lse, tensors["mask"],
                                      tensors["alibi_slopes"], tensors["cu_seqlens_q"], tensors["cu_seqlens_k"],
                                      tensors["dropout_seed"], **ctx.options)
    gradients = dict.fromkeys(_FORWARD_PARAMETERS)
    gradients.update(q=dq, k=dk, v=dv)
    return tuple(gradients.values())


triton_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _draw_dropout_seed(dropout_p: float) -> Optional[Tensor]:
    """A Philox seed from torch's default CPU generator, so ``torch.manual_seed`` fixes the pattern."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


def _dense_forward(use_tma: bool, warp_specialize: bool = False):
    def triton_attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap, alibi_slopes,
                         dropout_p, deterministic):
        return triton_attention_fwd(q, k, v, mask, alibi_slopes, None, None, _draw_dropout_seed(dropout_p), scale,
                                    window_left, window_right, diagonal_offset, False, softcap, dropout_p, 0, 0,
                                    deterministic, use_tma, warp_specialize)

    return triton_attention


register("triton", "attention", _WARP_SPECIALIZED_SUPPORT, variant="ws",
         summary="Hopper warp-specialised forward: device descriptors, a TMA producer warp group, two wgmma "
                 "consumer groups")(_dense_forward(use_tma=False, warp_specialize=True))
register("triton", "attention", _TMA_SUPPORT, variant="tma",
         summary="Hopper forward loading Q/K/V tiles through TMA descriptors")(_dense_forward(use_tma=True))
register("triton", "attention", _POINTER_SUPPORT, variant="pointer",
         summary="forward loading tiles through pointers (every GPU)")(_dense_forward(use_tma=False))


@register("triton", "attention_varlen", _POINTER_SUPPORT, summary="varlen forward (pointer loads)")
def triton_attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                            window_right, diagonal_offset, align_to_end, softcap, alibi_slopes, dropout_p,
                            deterministic):
    return triton_attention_fwd(q, k, v, None, alibi_slopes, cu_seqlens_q, cu_seqlens_k, _draw_dropout_seed(dropout_p),
                                scale, window_left, window_right, diagonal_offset, align_to_end, softcap, dropout_p,
                                max_seqlen_q, max_seqlen_k, deterministic, False)
