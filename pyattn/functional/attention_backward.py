"""The attention backward as a function of its own: gradients from a forward's ``out`` and ``lse``.

:func:`flash_attention_backward` is what a caller that runs the forward in pieces needs (ring
attention: each key block's share of the gradient, given every row's *final* out and lse); most
code never calls it, since ``flash_attention``'s autograd runs the same kernels. It validates
once (messages name the argument), builds the ``attention_backward`` dispatch request like the
forward's and calls the implementation dispatch picks. ``REQUEST_BUILDERS`` serves ``pyattn.explain``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pyattn._dispatch import Request, choose
from pyattn.functional.attention import (
    _LAYOUTS,
    _check_dim,
    _check_heads,
    _check_qkv,
    _checked_scale,
    _checked_softcap,
    _checked_window,
    _dense_request,
    _flash_features,
)

__all__ = ["flash_attention_backward", "REQUEST_BUILDERS"]

_NAME = "flash_attention_backward"


def _plan(grad_out, q, k, v, out, lse, *, causal, scale, window, softcap, layout):
    _check_qkv(_NAME, {"q": q, "k": k, "v": v, "out": out, "grad_out": grad_out})
    if layout not in _LAYOUTS:
        raise ValueError(f"{_NAME}: layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
    for name, tensor in (("q", q), ("k", k), ("v", v), ("out", out), ("grad_out", grad_out)):
        _check_dim(_NAME, name, tensor, 4, f'{_LAYOUTS[layout]} (layout="{layout}")')
    if layout == "bshd":  # transposed views: the kernels take any strides
        q, k, v, out, grad_out = (x.transpose(1, 2) for x in (q, k, v, out, grad_out))
    batch, heads_q, seqlen_q, head_dim = q.shape
    _, heads_k, seqlen_k, _ = k.shape
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape[0] != batch:
            raise ValueError(f"{_NAME}: {name} has batch size {tensor.shape[0]} but q has {batch}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{_NAME}: k's head dim {k.shape[-1]} != q's head dim {head_dim}")
    if v.shape[2] != seqlen_k:
        raise ValueError(f"{_NAME}: v's sequence length {v.shape[2]} != k's {seqlen_k}")
    if seqlen_k == 0:
        raise ValueError(f"{_NAME}: k and v have sequence length 0; attention needs at least one key")
    _check_heads(_NAME, heads_q, heads_k, v.shape[1])
    expected = (batch, heads_q, seqlen_q, v.shape[-1])
    for name, tensor in (("out", out), ("grad_out", grad_out)):
        if tuple(tensor.shape) != expected:
            shown = expected if layout == "bhsd" else (batch, seqlen_q, heads_q, v.shape[-1])
            raise ValueError(f"{_NAME}: {name} must have the forward output's shape {shown} (layout=\"{layout}\"), "
                             f"got {tuple(tensor.transpose(1, 2).shape if layout == 'bshd' else tensor.shape)}")
    if not isinstance(lse, Tensor):
        raise TypeError(f"{_NAME}: lse must be a torch.Tensor, got {type(lse).__name__}")
    lse_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if lse.dtype not in lse_dtypes:
        raise TypeError(f"{_NAME}: lse must be float32 (the forward's log-sum-exp; float64 also with float64 "
                        f"inputs), got {lse.dtype}")
    if tuple(lse.shape) != (batch, heads_q, seqlen_q):
        raise ValueError(f"{_NAME}: lse must have shape (batch, nheads, seqlen_q) = {(batch, heads_q, seqlen_q)}, "
                         f"got {tuple(lse.shape)}")
    if lse.device != q.device:
        raise ValueError(f"{_NAME}: lse is on {lse.device} but q is on {q.device}")
    scale = _checked_scale(_NAME, scale, head_dim)
    window_left, window_right = _checked_window(_NAME, window, causal)
    softcap = _checked_softcap(_NAME, softcap)
    features = _flash_features(causal, window_left, window_right, softcap, None, 0.0, heads_q, heads_k)
    request = Request(op="attention_backward", device=q.device, dtype=q.dtype, head_dim=max(head_dim, v.shape[-1]),
                      features=features)
    # Bottom-right alignment, as flash_attention: query i sits at key position i + S - L.
    request = _dense_request(request, q, k, v, diagonal_offset=seqlen_k - seqlen_q)
    options = dict(scale=scale, window_left=window_left, window_right=window_right,
                   diagonal_offset=seqlen_k - seqlen_q, softcap=softcap)
    return request, (grad_out, q, k, v, out, lse), options


def _flash_backward_request(grad_out, q, k, v, out, lse, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                            layout="bshd") -> Request:
    return _plan(grad_out, q, k, v, out, lse, causal=causal, scale=scale, window=window, softcap=softcap,
                 layout=layout)[0]


def flash_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                             causal: bool = False, scale: float | None = None, window: tuple[int, int] = (-1, -1),
                             softcap: float = 0.0, layout: str = "bshd") -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`pyattn.flash_attention` from ``grad_out``, the forward's ``out``, ``lse``.

    Shapes (layout="bshd", the default, as :func:`pyattn.flash_attention`): q (batch, seqlen_q, nheads,
    headdim), k (batch, seqlen_k, nheads_k, headdim), v (batch, seqlen_k, nheads_k, headdim_v), out
    and grad_out (batch, seqlen_q, nheads, headdim_v) -> dq, dk, dv shaped as q, k, v; lse (batch,
    nheads, seqlen_q) float32 (float64 allowed with float64 inputs) in either layout.
    layout="bhsd" takes and returns (batch, nheads, seqlen, headdim) instead.
    causal, scale, window, softcap mean what they mean for :func:`pyattn.flash_attention`
    (bottom-right alignment: query i sees keys up to i + seqlen_k - seqlen_q); no ALiBi, dropout or mask.

    FlashAttention-2's backward, with the row statistics taken as given: D = rowsum(grad_out ∘ out),
    P = exp(S − lse), dV = Pᵀ·dO, dS = P ∘ (dO·Vᵀ − D), dQ = dS·K·scale, dK = dSᵀ·Q·scale (through
    softcap's tanh when on). With ``out``/``lse`` the final statistics of rows whose keys were split
    into blocks, the call on one block returns that block's share: summing over blocks gives the
    whole gradient. dk/dv are summed over each query group (GQA). Rows with lse = -inf get zero dq.
    """
    request, tensors, options = _plan(grad_out, q, k, v, out, lse, causal=causal, scale=scale, window=window,
                                      softcap=softcap, layout=layout)
    dq, dk, dv = choose(request).implementation(*tensors, **options)
    if layout == "bshd":
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return dq, dk, dv


REQUEST_BUILDERS = {_NAME: _flash_backward_request}
