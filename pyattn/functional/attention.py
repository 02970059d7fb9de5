"""Attention functional API: torch's ``scaled_dot_product_attention`` and flash-attn's interface.

Each functional validates its arguments once (messages name the argument), normalises them to the
dispatch layout (q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), a 4-dim broadcast mask) by
views, builds a :class:`pyattn._dispatch.Request` and calls the implementation the dispatcher
picks. ``REQUEST_BUILDERS`` exposes the request step alone (it reads no tensor data, so it works
on ``meta`` tensors): that is what ``pyattn.explain`` reports on.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from pyattn._dispatch import Request, choose

__all__ = ["scaled_dot_product_attention", "attention_with_weights", "flash_attention", "flash_attention_varlen",
           "REQUEST_BUILDERS"]


@dataclass
class _AttentionPlan:
    """A validated call: the dispatch request and the implementation's arguments."""

    request: Request
    q: Tensor
    k: Tensor
    v: Tensor
    options: dict  # the implementation's keyword arguments


# ---------------------------------------------------------------------------------------------
# argument checks shared by the functionals


def _check_qkv(function: str, tensors: dict[str, Tensor]) -> None:
    first_name, first = next(iter(tensors.items()))
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{function}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise TypeError(f"{function}: {name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.dtype != first.dtype:
            raise TypeError(f"{function}: {name} has dtype {tensor.dtype} but {first_name} has {first.dtype}; "
                            f"pass {', '.join(tensors)} in one dtype")
        if tensor.device != first.device:
            raise ValueError(f"{function}: {name} is on {tensor.device} but {first_name} is on {first.device}; "
                             f"pass {', '.join(tensors)} on one device")


def _check_dim(function: str, name: str, tensor: Tensor, dims: int, layout: str) -> None:
    if tensor.dim() != dims:
        raise ValueError(f"{function}: {name} must have {dims} dims {layout}, got shape {tuple(tensor.shape)}")


def _checked_scale(function: str, scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"{function}: scale must be a finite number or None (for 1/sqrt(head dim)), got {scale!r}")
    return float(scale)


def _checked_dropout(function: str, dropout_p) -> float:
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{function}: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def _checked_window(function: str, window, causal: bool) -> tuple[int, int]:
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"{function}: window must be a pair (left, right) of ints >= -1 (-1: unbounded), "
                         f"got {window!r}")
    left, right = window
    return left, 0 if causal else right


def _checked_softcap(function: str, softcap) -> float:
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool) or not 0.0 <= softcap < math.inf:
        raise ValueError(f"{function}: softcap must be a finite number >= 0 (0: off), got {softcap!r}")
    return float(softcap)


def _check_alibi(function: str, alibi_slopes, query: Tensor, batch: int, heads: int) -> None:
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(f"{function}: alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"{function}: alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"{function}: alibi_slopes must have shape (nheads,) = ({heads},) or (batch, nheads) = "
                         f"({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != query.device:
        raise ValueError(f"{function}: alibi_slopes is on {alibi_slopes.device} but q is on {query.device}")


def _check_heads(function: str, heads_q: int, heads_k: int, heads_v: int) -> None:
    if heads_v != heads_k:
        raise ValueError(f"{function}: value has {heads_v} heads but key has {heads_k}; key and value must have "
                         "the same number of heads")
    if heads_q % heads_k:
        raise ValueError(f"{function}: query's {heads_q} heads must be a multiple of key/value's {heads_k} "
                         "(grouped-query attention)")


def _dense_request(request: Request, q: Tensor, k: Tensor, v: Tensor, *, diagonal_offset: int) -> Request:
    """``request`` with the dense call's sizes and operands (q (B, Hq, L, D), k/v (B, Hk, S, ·) views)."""
    sizes = dict(batch=q.shape[0], heads_q=q.shape[1], heads_k=k.shape[1], seqlen_q=q.shape[2], seqlen_k=k.shape[2],
                 diagonal_offset=diagonal_offset)
    return Request(op=request.op, device=request.device, dtype=request.dtype, head_dim=request.head_dim,
                   features=request.features, sizes=sizes, operands=dict(q=q, k=k, v=v))


def _requires_grad(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad and torch.is_grad_enabled()


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention

_SDPA = "scaled_dot_product_attention"


def _mask_as_4d(attn_mask, query: Tensor, weights_shape: tuple[int, ...], batch: int) -> Tensor:
    """``attn_mask`` (broadcastable to ``weights_shape`` = (*leading, L, S)) as 4 dims, each 1 or full.

    Views only, except where some but not all of several leading batch dims broadcast: then only
    those are expanded (never the head, L or S dims).
    """
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_SDPA}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise TypeError(f"{_SDPA}: attn_mask must be bool (True = takes part) or a float mask of query's dtype "
                        f"{query.dtype}, got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"{_SDPA}: attn_mask is on {attn_mask.device} but query is on {query.device}")
    broadcastable = attn_mask.dim() <= len(weights_shape) and all(
        size in (1, full) for size, full in zip(reversed(attn_mask.shape), reversed(weights_shape)))
    if not broadcastable:
        raise ValueError(f"{_SDPA}: attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to the "
                         f"attention weights' shape (..., L, S) = {tuple(weights_shape)}")
    mask = attn_mask.reshape((1,) * (len(weights_shape) - attn_mask.dim()) + tuple(attn_mask.shape))
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    leading = mask.shape[:-3]
    if all(size == 1 for size in leading):
        return mask.reshape(1, *mask.shape[-3:])
    return mask.expand(*weights_shape[:-3], *mask.shape[-3:]).reshape(batch, *mask.shape[-3:])


def _plan_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False) -> _AttentionPlan:
    _check_qkv(_SDPA, {"query": query, "key": key, "value": value})
    if query.dim() < 2:
        raise ValueError(f"{_SDPA}: query must have at least 2 dims (..., L, E), got shape {tuple(query.shape)}")
    for name, tensor in (("key", key), ("value", value)):
        if tensor.dim() != query.dim():
            raise ValueError(f"{_SDPA}: {name} has {tensor.dim()} dims but query has {query.dim()}; expected "
                             "query (..., L, E), key (..., S, E), value (..., S, Ev) with the same leading dims")
    seqlen_q, head_dim = query.shape[-2:]
    seqlen_k, head_dim_v = key.shape[-2], value.shape[-1]
    if key.shape[-1] != head_dim:
        raise ValueError(f"{_SDPA}: key's last dim {key.shape[-1]} != query's last dim {head_dim}; query and key "
                         "must share the embedding dim E")
    if value.shape[-2] != seqlen_k:
        raise ValueError(f"{_SDPA}: value's sequence length (dim -2) {value.shape[-2]} != key's {seqlen_k}")
    if seqlen_k == 0:
        raise ValueError(f"{_SDPA}: key and value have sequence length 0; attention needs at least one key")
    batch_dims = tuple(query.shape[:-3])
    for name, tensor in (("key", key), ("value", value)):
        if tuple(tensor.shape[:-3]) != batch_dims:
            raise ValueError(f"{_SDPA}: {name}'s batch dims {tuple(tensor.shape[:-3])} != query's {batch_dims}")
    heads_q, heads_k = (query.shape[-3], key.shape[-3]) if query.dim() >= 3 else (1, 1)
    if heads_q != heads_k and not enable_gqa:
        raise ValueError(f"{_SDPA}: query has {heads_q} heads (dim -3) but key has {heads_k}; set enable_gqa=True "
                         "for grouped-query attention")
    _check_heads(_SDPA, heads_q, heads_k, value.shape[-3] if value.dim() >= 3 else 1)
    scale = _checked_scale(_SDPA, scale, head_dim)
    dropout_p = _checked_dropout(_SDPA, dropout_p)
    if is_causal and attn_mask is not None:
        raise ValueError(f"{_SDPA}: Explicit attn_mask should not be set when is_causal=True")
    batch = math.prod(batch_dims)
    mask = None
    if attn_mask is not None:
        mask = _mask_as_4d(attn_mask, query, (*query.shape[:-1], seqlen_k), batch)
    features = {name for name, used in (("mask", mask is not None), ("causal", is_causal), ("dropout", dropout_p > 0),
                                        ("gqa", heads_q != heads_k)) if used}
    if mask is not None and mask.is_floating_point() and _requires_grad(mask):
        features.add("mask_grad")
    request = Request(op="attention", device=query.device, dtype=query.dtype, head_dim=max(head_dim, head_dim_v),
                      features=frozenset(features))
    q = query.reshape(batch, heads_q, seqlen_q, head_dim)
    k = key.reshape(batch, heads_k, seqlen_k, head_dim)
    v = value.reshape(batch, heads_k, seqlen_k, head_dim_v)
    request = _dense_request(request, q, k, v, diagonal_offset=0)
    return _AttentionPlan(
        request=request, q=q, k=k, v=v,
        options=dict(scale=scale, mask=mask, window_left=-1, window_right=0 if is_causal else -1, diagonal_offset=0,
                     softcap=0.0, alibi_slopes=None, dropout_p=dropout_p,
                     deterministic=torch.are_deterministic_algorithms_enabled()),
    )


def _sdpa_request(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False) -> Request:
    return _plan_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa).request


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`, on pyattn's backends.

    Shapes: query (N..., Hq, L, E), key (N..., H, S, E), value (N..., H, S, Ev) -> (N..., Hq, L, Ev),
    with any number (>= 0) of leading dims N... shared by all three (query (L, E) alone works too).
    L may differ from S and Ev from E. Hq != H only with ``enable_gqa=True`` (Hq % H == 0; query head
    h reads key/value head h // (Hq // H)).

    attn_mask: broadcastable to the attention weights (N..., Hq, L, S) (e.g. (L, S), (N, 1, 1, S));
    bool (True = the key takes part) or float of query's dtype (added to the scores). It is passed
    to the kernels as a broadcast view, never materialised at (N..., Hq, L, S).
    is_causal: query i sees keys j <= i (top-left alignment, as torch's ``tril``); not together
    with attn_mask. scale: defaults to 1 / sqrt(E). dropout_p: applied to the attention
    probabilities whenever > 0 (this is a function: pass 0.0 in evaluation), drawn from torch's
    default generator so ``torch.manual_seed`` makes it reproducible. Under
    ``torch.use_deterministic_algorithms(True)`` the backward runs without atomics (bit-reproducible).

    A query row that no key takes part in (every key masked) gives an output of 0 and a zero
    gradient on every pyattn backend. (torch >= 2.5 gives 0 there too on CPU, through its "safe
    softmax"; earlier versions, and some of its CUDA kernels, give NaN — which is why the torch
    backend serves masked calls only where it gives 0.)
    """
    plan = _plan_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    out, _ = choose(plan.request).implementation(plan.q, plan.k, plan.v, **plan.options)
    return out.reshape(*query.shape[:-1], value.shape[-1])


_WEIGHTS = "attention_with_weights"


def _plan_weights(q, k, v, attn_mask=None, dropout_p=0.0, scale=None) -> _AttentionPlan:
    _check_qkv(_WEIGHTS, {"q": q, "k": k, "v": v})
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_dim(_WEIGHTS, name, tensor, 4, "(batch, nheads, seqlen, headdim)")
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_k, seqlen_k = k.shape[1], k.shape[2]
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"{_WEIGHTS}: k and v must have q's batch size {batch}, got {k.shape[0]} and {v.shape[0]}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{_WEIGHTS}: k's head dim {k.shape[-1]} != q's head dim {head_dim}")
    if v.shape[2] != seqlen_k:
        raise ValueError(f"{_WEIGHTS}: v's sequence length {v.shape[2]} != k's {seqlen_k}")
    _check_heads(_WEIGHTS, heads_q, heads_k, v.shape[1])
    scale = _checked_scale(_WEIGHTS, scale, head_dim)
    dropout_p = _checked_dropout(_WEIGHTS, dropout_p)
    mask = None if attn_mask is None else _mask_as_4d(attn_mask, q, (batch, heads_q, seqlen_q, seqlen_k), batch)
    features = {name for name, used in (("mask", mask is not None), ("dropout", dropout_p > 0),
                                        ("gqa", heads_q != heads_k)) if used}
    if mask is not None and mask.is_floating_point() and _requires_grad(mask):
        features.add("mask_grad")
    request = Request(op="attention_weights", device=q.device, dtype=q.dtype, head_dim=max(head_dim, v.shape[-1]),
                      features=frozenset(features))
    request = _dense_request(request, q, k, v, diagonal_offset=0)
    return _AttentionPlan(request=request, q=q, k=k, v=v, options=dict(scale=scale, mask=mask, dropout_p=dropout_p))


def _weights_request(q, k, v, attn_mask=None, dropout_p=0.0, scale=None) -> Request:
    return _plan_weights(q, k, v, attn_mask, dropout_p, scale).request


def attention_with_weights(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                           scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention that also returns its weights: ``(out, weights)``.

    q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev) (Hq % Hk == 0) -> out (B, Hq, L, Ev), weights
    (B, Hq, L, S) in q's dtype: the probabilities after dropout, as ``torch.nn.MultiheadAttention``
    returns with need_weights=True. attn_mask as for :func:`scaled_dot_product_attention`. The
    weights are quadratic in memory by nature, so no fused kernel serves this: dispatch picks the
    torch or reference backend (``pyattn.explain`` says why). A row that sees no key gives 0.
    """
    plan = _plan_weights(q, k, v, attn_mask, dropout_p, scale)
    return choose(plan.request).implementation(plan.q, plan.k, plan.v, **plan.options)


# ---------------------------------------------------------------------------------------------
# flash_attention (dense) and flash_attention_varlen

_FLASH = "flash_attention"
_FLASH_VARLEN = "flash_attention_varlen"
_LAYOUTS = {"bhsd": "(batch, nheads, seqlen, headdim)", "bshd": "(batch, seqlen, nheads, headdim)"}


def _flash_features(causal: bool, window_left: int, window_right: int, softcap: float, alibi_slopes, dropout_p: float,
                    heads_q: int, heads_k: int) -> frozenset[str]:
    used = {
        "causal": causal,
        "window": window_left >= 0 or (window_right >= 0 and not causal),
        "softcap": softcap > 0,
        "alibi": alibi_slopes is not None,
        "alibi_grad": _requires_grad(alibi_slopes),
        "dropout": dropout_p > 0,
        "gqa": heads_q != heads_k,
    }
    return frozenset(name for name, is_used in used.items() if is_used)


def _plan_flash(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                return_lse=False, deterministic=False, layout="bshd") -> _AttentionPlan:
    _check_qkv(_FLASH, {"q": q, "k": k, "v": v})
    if layout not in _LAYOUTS:
        raise ValueError(f"{_FLASH}: layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_dim(_FLASH, name, tensor, 4, f'{_LAYOUTS[layout]} (layout="{layout}")')
    if layout == "bshd":  # transposed views: the kernels take any strides
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    batch, heads_q, seqlen_q, head_dim = q.shape
    _, heads_k, seqlen_k, _ = k.shape
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape[0] != batch:
            raise ValueError(f"{_FLASH}: {name} has batch size {tensor.shape[0]} but q has {batch}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{_FLASH}: k's head dim {k.shape[-1]} != q's head dim {head_dim}")
    if v.shape[2] != seqlen_k:
        raise ValueError(f"{_FLASH}: v's sequence length {v.shape[2]} != k's {seqlen_k}")
    if seqlen_k == 0:
        raise ValueError(f"{_FLASH}: k and v have sequence length 0; attention needs at least one key")
    _check_heads(_FLASH, heads_q, heads_k, v.shape[1])
    scale = _checked_scale(_FLASH, scale, head_dim)
    window_left, window_right = _checked_window(_FLASH, window, causal)
    softcap = _checked_softcap(_FLASH, softcap)
    dropout_p = _checked_dropout(_FLASH, dropout_p)
    _check_alibi(_FLASH, alibi_slopes, q, batch, heads_q)
    features = _flash_features(causal, window_left, window_right, softcap, alibi_slopes, dropout_p, heads_q, heads_k)
    if return_lse:
        features |= {"lse"}
    request = Request(op="attention", device=q.device, dtype=q.dtype, head_dim=max(head_dim, v.shape[-1]),
                      features=features)
    request = _dense_request(request, q, k, v, diagonal_offset=seqlen_k - seqlen_q)
    # Bottom-right alignment (flash-attn >= 2.1): query i sits at key position i + S - L.
    options = dict(scale=scale, mask=None, window_left=window_left, window_right=window_right,
                   diagonal_offset=seqlen_k - seqlen_q, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                   deterministic=bool(deterministic) or torch.are_deterministic_algorithms_enabled())
    return _AttentionPlan(request=request, q=q, k=k, v=v, options=options)


def _flash_spellings(function: str, scale, softmax_scale, window, window_size) -> tuple:
    """flash-attn spells them softmax_scale and window_size; pyattn's scale and window are the same options."""
    if scale is not None and softmax_scale is not None:
        raise ValueError(f"{function}: pass softmax_scale (flash-attn's name) or scale, not both")
    if window is not None and tuple(window_size) != (-1, -1):
        raise ValueError(f"{function}: pass window_size (flash-attn's name) or window, not both")
    return (softmax_scale if softmax_scale is not None else scale), (window_size if window is None else window)


def _flash_request(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                   alibi_slopes=None, deterministic=False, return_attn_probs=False, *, scale=None, window=None,
                   return_lse=False, layout="bshd") -> Request:
    scale, window = _flash_spellings(_FLASH, scale, softmax_scale, window, window_size)
    return _plan_flash(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                       dropout_p=dropout_p, return_lse=return_lse or return_attn_probs, deterministic=deterministic,
                       layout=layout).request


def flash_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False, return_attn_probs: bool = False,
                    *, scale: float | None = None, window: tuple[int, int] | None = None, return_lse: bool = False,
                    layout: str = "bshd"):
    """Drop-in for flash-attn's ``flash_attn_func``, on pyattn's backends: same arguments, order and layout.

    Shapes (layout="bshd", the default, flash-attn's): q (batch, seqlen_q, nheads, headdim), k
    (batch, seqlen_k, nheads_k, headdim), v (batch, seqlen_k, nheads_k, headdim_v) -> out (batch,
    seqlen_q, nheads, headdim_v). layout="bhsd" takes and returns (batch, nheads, seqlen, headdim)
    instead (SDPA's order; any strides either way, no copies). nheads % nheads_k == 0 (MQA/GQA:
    query head h reads key/value head h // (nheads // nheads_k)); headdim_v may differ from headdim.

    causal: query i sees keys j <= i + seqlen_k - seqlen_q, i.e. the mask is aligned to the
    bottom-right corner of the (seqlen_q, seqlen_k) score matrix (flash-attn >= 2.1). With
    seqlen_q = 2, seqlen_k = 5 the mask is [[1 1 1 1 0], [1 1 1 1 1]]; with seqlen_q = 5,
    seqlen_k = 2 it is [[0 0], [0 0], [0 0], [1 0], [1 1]]: rows with no visible key give 0.
    window_size (left, right) (or ``window=``): sliding window, -1 = unbounded; query i sees keys j in
    [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]; with causal, right is 0.
    softcap > 0: scores become softcap * tanh(scores / softcap). alibi_slopes: float32 (nheads,)
    or (batch, nheads): adds -slope * |i + seqlen_k - seqlen_q - j| to the scores (no gradient
    flows to the slopes on the Triton backend). softmax_scale (or ``scale=``): defaults to
    1 / sqrt(headdim). dropout_p: on the attention probabilities whenever > 0 (pass 0.0 in
    evaluation), reproducible with ``torch.manual_seed``. deterministic: a backward without atomics
    (same result each run); also on whenever ``torch.use_deterministic_algorithms(True)`` is.

    Returns out; (out, lse) with return_lse; (out, lse, None) with return_attn_probs (flash-attn's
    triple: pyattn never forms the probabilities, so the third is None). lse (batch, nheads,
    seqlen_q) float32 is the natural log of each row's softmax denominator (-inf for rows with no
    visible key), detached: no gradient flows through it (as in flash-attn).
    """
    scale, window = _flash_spellings(_FLASH, scale, softmax_scale, window, window_size)
    plan = _plan_flash(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                       dropout_p=dropout_p, return_lse=return_lse or return_attn_probs, deterministic=deterministic,
                       layout=layout)
    out, lse = choose(plan.request).implementation(plan.q, plan.k, plan.v, **plan.options)
    if layout == "bshd":
        out = out.transpose(1, 2)
    if return_attn_probs:
        return out, lse.detach(), None
    return (out, lse.detach()) if return_lse else out


def _check_cu_seqlens(name: str, cu_seqlens, q: Tensor) -> None:
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{_FLASH_VARLEN}: {name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{_FLASH_VARLEN}: {name} must be a 1-dim int32 tensor (batch + 1,) of cumulative "
                         f"sequence lengths starting at 0, got dtype {cu_seqlens.dtype} shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{_FLASH_VARLEN}: {name} is on {cu_seqlens.device} but q is on {q.device}")


def _check_max_seqlen(name: str, value) -> None:
    if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{_FLASH_VARLEN}: {name} must be an int >= 1 (the longest sequence), got {value!r}")


def _plan_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                       window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, return_lse=False,
                       deterministic=False) -> _AttentionPlan:
    _check_qkv(_FLASH_VARLEN, {"q": q, "k": k, "v": v})
    for name, tensor, rows in (("q", q, "total_q"), ("k", k, "total_k"), ("v", v, "total_k")):
        _check_dim(_FLASH_VARLEN, name, tensor, 3, f"({rows}, nheads, headdim)")
    total_q, heads_q, head_dim = q.shape
    total_k, heads_k, _ = k.shape
    if k.shape[-1] != head_dim:
        raise ValueError(f"{_FLASH_VARLEN}: k's head dim {k.shape[-1]} != q's head dim {head_dim}")
    if v.shape[0] != total_k:
        raise ValueError(f"{_FLASH_VARLEN}: v has {v.shape[0]} rows (total_k) but k has {total_k}")
    _check_heads(_FLASH_VARLEN, heads_q, heads_k, v.shape[1])
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{_FLASH_VARLEN}: cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}; both must be (batch + 1,)")
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    batch = cu_seqlens_q.numel() - 1
    scale = _checked_scale(_FLASH_VARLEN, scale, head_dim)
    window_left, window_right = _checked_window(_FLASH_VARLEN, window, causal)
    softcap = _checked_softcap(_FLASH_VARLEN, softcap)
    dropout_p = _checked_dropout(_FLASH_VARLEN, dropout_p)
    _check_alibi(_FLASH_VARLEN, alibi_slopes, q, batch, heads_q)
    features = _flash_features(causal, window_left, window_right, softcap, alibi_slopes, dropout_p, heads_q, heads_k)
    if return_lse:
        features |= {"lse"}
    request = Request(op="attention_varlen", device=q.device, dtype=q.dtype, head_dim=max(head_dim, v.shape[-1]),
                      features=features, sizes=dict(batch=batch, heads_q=heads_q, heads_k=heads_k,
                                                    max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k),
                      operands=dict(q=q, k=k, v=v))
    # Bottom-right alignment per sequence (flash-attn >= 2.1): query i of sequence b sits at key position
    # i + S_b - L_b. The kernels find S_b - L_b from cu_seqlens on the device: nothing is read here.
    options = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                   max_seqlen_k=max_seqlen_k, scale=scale, window_left=window_left, window_right=window_right,
                   diagonal_offset=0, align_to_end=True, softcap=softcap, alibi_slopes=alibi_slopes,
                   dropout_p=dropout_p,
                   deterministic=bool(deterministic) or torch.are_deterministic_algorithms_enabled())
    return _AttentionPlan(request=request, q=q, k=k, v=v, options=options)


def _flash_varlen_request(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                          softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          deterministic=False, return_attn_probs=False, *, scale=None, window=None,
                          return_lse=False) -> Request:
    scale, window = _flash_spellings(_FLASH_VARLEN, scale, softmax_scale, window, window_size)
    return _plan_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                              scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                              dropout_p=dropout_p, return_lse=return_lse or return_attn_probs,
                              deterministic=deterministic).request


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, *, scale: float | None = None,
                           window: tuple[int, int] | None = None, return_lse: bool = False):
    """Drop-in for flash-attn's ``flash_attn_varlen_func``: sequences of different lengths, packed without padding.

    Shapes (flash-attn's): q (total_q, nheads, headdim), k (total_k, nheads_k, headdim), v (total_k,
    nheads_k, headdim_v) -> out (total_q, nheads, headdim_v). cu_seqlens_q / cu_seqlens_k: int32
    (batch + 1,), the cumulative sequence lengths starting at 0 (sequence b is rows
    cu_seqlens[b]:cu_seqlens[b + 1]); max_seqlen_q / max_seqlen_k: the longest sequence of each
    (ints; they size the launch grid and must not be smaller than the truth).

    Every option means what it means for :func:`flash_attention`, per sequence, with positions
    counted from the sequence's start: causal, window and ALiBi are aligned to each sequence's own
    bottom-right corner (flash-attn >= 2.1), so query i of sequence b sees key j iff
    j <= i + seqlen_k_b - seqlen_q_b with causal, and seqlen_k_b - seqlen_q_b may differ between
    sequences. A sequence with seqlen_q_b > seqlen_k_b gives its first seqlen_q_b - seqlen_k_b rows
    output 0 under causal (they see no key). The Triton backend reads cu_seqlens on the device only
    (no host sync, no graph break under torch.compile); the reference loops over sequences on the host.

    Returns out; (out, lse) with return_lse; (out, lse, None) with return_attn_probs. lse (nheads,
    total_q) float32, detached.
    """
    scale, window = _flash_spellings(_FLASH_VARLEN, scale, softmax_scale, window, window_size)
    plan = _plan_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                              scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                              dropout_p=dropout_p, return_lse=return_lse or return_attn_probs,
                              deterministic=deterministic)
    out, lse = choose(plan.request).implementation(plan.q, plan.k, plan.v, **plan.options)
    if return_attn_probs:
        return out, lse.detach(), None
    return (out, lse.detach()) if return_lse else out


REQUEST_BUILDERS = {
    "scaled_dot_product_attention": _sdpa_request,
    "attention_with_weights": _weights_request,
    "flash_attention": _flash_request,
    "flash_attention_varlen": _flash_varlen_request,
}
