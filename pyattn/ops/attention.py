"""Attention ops: the reference registration, and the Triton custom ops with their autograd.

Dispatch-level signatures (every backend's implementation has exactly these; the functional layer
has validated and normalised every argument before the call):

  attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap,
            alibi_slopes, dropout_p, deterministic) -> (out, lse)
      q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), Hq % Hk == 0, any strides;
      mask None or 4 dims each 1 or full of (B, Hq, L, S), bool (True = attend) or additive float;
      out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L).
  attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                   window_left, window_right, diagonal_offset, align_to_end, softcap, alibi_slopes,
                   dropout_p, deterministic) -> (out, lse)
      q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv), cu_seqlens int32 (B + 1,);
      out (total_q, Hq, Dv), lse (Hq, total_q). align_to_end: sequence b's diagonal offset is
      diagonal_offset + S_b − L_b (its own bottom-right corner), found on the device: no host sync.

Semantics of every option: ``pyattn.reference.attention``. Dropout draws its randomness from torch's
default generator (the reference directly, the Triton path through a Philox seed drawn from it), so
``torch.manual_seed`` makes either reproducible.

Request features: "mask", "causal", "window", "softcap", "alibi", "dropout", "gqa", and
"mask_grad" / "alibi_grad" (a float mask / ALiBi slopes that require grad: only the reference
differentiates with respect to them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyattn._dispatch import Support, register
from pyattn._layout import new_attention_output

FEATURES = frozenset({"mask", "causal", "window", "softcap", "alibi", "dropout", "gqa", "mask_grad", "alibi_grad"})
_EVERY_DEVICE = frozenset({"cpu", "cuda", "meta"})
_ANY_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

_REFERENCE_SUPPORT = Support(devices=_EVERY_DEVICE, dtypes=_ANY_FLOAT, features=FEATURES)
_TRITON_SUPPORT = Support(
    devices=frozenset({"cuda"}),
    interpreter_devices=frozenset({"cpu"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    max_head_dim=256,
    # The kernels compute no gradient for the additive mask or the slopes (flash-attn's do not either).
    features=FEATURES - {"mask_grad", "alibi_grad"},
)


# ---------------------------------------------------------------------------------------------
# reference backend


@register("reference", "attention", _REFERENCE_SUPPORT)
def reference_attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap, alibi_slopes,
                        dropout_p, deterministic):
    from pyattn.reference.attention import attention

    del deterministic  # autograd's backward of the reference is deterministic already
    return attention(q, k, v, scale=scale, mask=mask, window_left=window_left, window_right=window_right,
                     diagonal_offset=diagonal_offset, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p)


@register("reference", "attention_varlen", _REFERENCE_SUPPORT)
def reference_attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                               window_right, diagonal_offset, align_to_end, softcap, alibi_slopes, dropout_p,
                               deterministic):
    from pyattn.reference.attention import attention

    del deterministic
    return attention(q, k, v, scale=scale, window_left=window_left, window_right=window_right,
                     diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap,
                     alibi_slopes=alibi_slopes, dropout_p=dropout_p, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


# ---------------------------------------------------------------------------------------------
# Triton backend: one forward and one backward custom op serve the dense and the varlen layouts
# (cu_seqlens None = dense). The mask's dtype is its kind: bool = visibility, float = additive.


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
    dropout_p: float, max_seqlen_q: int, max_seqlen_k: int, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    del deterministic  # an input only so that the backward can read it
    return _kernels().attention_forward(
        q, k, v, scale=scale, mask=mask, window_left=window_left, window_right=window_right,
        diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, seed=_seed_value(dropout_seed), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


@triton_attention_fwd.register_fake
def _(q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, dropout_seed, scale, window_left, window_right,
      diagonal_offset, align_to_end, softcap, dropout_p, max_seqlen_q, max_seqlen_k, deterministic):
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
            "max_seqlen_q", "max_seqlen_k", "deterministic")


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


@register("triton", "attention", _TRITON_SUPPORT)
def triton_attention(q, k, v, *, scale, mask, window_left, window_right, diagonal_offset, softcap, alibi_slopes,
                     dropout_p, deterministic):
    return triton_attention_fwd(q, k, v, mask, alibi_slopes, None, None, _draw_dropout_seed(dropout_p), scale,
                                window_left, window_right, diagonal_offset, False, softcap, dropout_p, 0, 0,
                                deterministic)


@register("triton", "attention_varlen", _TRITON_SUPPORT)
def triton_attention_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                            window_right, diagonal_offset, align_to_end, softcap, alibi_slopes, dropout_p,
                            deterministic):
    return triton_attention_fwd(q, k, v, None, alibi_slopes, cu_seqlens_q, cu_seqlens_k, _draw_dropout_seed(dropout_p),
                                scale, window_left, window_right, diagonal_offset, align_to_end, softcap, dropout_p,
                                max_seqlen_q, max_seqlen_k, deterministic)
