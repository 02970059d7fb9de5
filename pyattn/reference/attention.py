"""Attention reference in plain PyTorch: the ground truth the kernels are tested against.

One definition of every option, shared with the kernels (docs/attention.md):
  s_ij = scale · q_i·k_j; softcap > 0: s = softcap · tanh(s / softcap); ALiBi: s −= slope · |i + offset − j|;
  float mask: s += mask_ij. Key j is visible to query i iff
  (window_left < 0 or j ≥ i + offset − window_left) and (window_right < 0 or j ≤ i + offset + window_right)
  and the bool mask (if any) is True; invisible keys (and scores of −inf) get probability 0.
offset is diagonal_offset, plus S − L with align_to_end: counted from the bottom-right corner of each
sequence's (L, S) score matrix (flash-attn's alignment, per sequence in the varlen layout).
A row with no visible key yields output 0, lse −inf and zero gradient. Dropout drops normalised
probabilities and scales the kept ones by 1 / (1 − p), as torch does.

Half-precision inputs are computed in float32 and cast back; float64 stays float64 (the tests'
reference), so the result is differentiable by autograd in whatever precision it is given.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dense_attention(q, k, v, scale, mask, window_left, window_right, diagonal_offset, softcap, alibi_slopes,
                     dropout_p, dropout_keep_mask, with_probabilities=False):
    """q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv), all in the compute dtype -> (out, lse), and the
    (dropped-out) probabilities (B, Hq, L, S) as a third result when ``with_probabilities``."""
    batch, heads, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    group = heads // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = scale * (q @ k.transpose(-1, -2))
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    rows = torch.arange(seqlen_q, device=q.device)[:, None] + diagonal_offset
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores.dtype)
        slopes = slopes.reshape(1, heads, 1, 1) if slopes.dim() == 1 else slopes.reshape(batch, heads, 1, 1)
        scores = scores - slopes * (rows - cols).abs().to(scores.dtype)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if window_left >= 0:
        visible = visible & (cols >= rows - window_left)
    if window_right >= 0:
        visible = visible & (cols <= rows + window_right)
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            scores = scores + mask.to(scores.dtype)
    visible = visible & (scores > float("-inf"))
    # torch.where (not a NaN-producing −inf arithmetic) keeps fully masked rows at zero gradient.
    scores = torch.where(visible, scores, torch.full_like(scores, float("-inf")))
    # softmax is shift-invariant: no gradient needed (and a call with no keys at all has no maximum)
    row_max = (scores.amax(dim=-1, keepdim=True) if seqlen_k else scores.new_zeros(*scores.shape[:-1], 1)).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.where(visible, torch.exp(scores - row_max), torch.zeros_like(scores))
    denominator = unnormalised.sum(dim=-1, keepdim=True)
    probabilities = unnormalised / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    if dropout_p > 0:
        probabilities = probabilities * dropout_keep_mask.to(probabilities.dtype) / (1.0 - dropout_p)
    out = probabilities @ v
    lse = (torch.log(denominator) + row_max).squeeze(-1)  # log(0) = −inf for rows with no visible key
    if with_probabilities:
        return out, lse, probabilities
    return out, lse


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None = None, window_left: int = -1,
              window_right: int = -1, diagonal_offset: int = 0, align_to_end: bool = False, softcap: float = 0.0,
              alibi_slopes: Tensor | None = None, dropout_p: float = 0.0, dropout_keep_mask: Tensor | None = None,
              generator: torch.Generator | None = None, cu_seqlens_q: Tensor | None = None,
              cu_seqlens_k: Tensor | None = None, max_seqlen_q: int = 0, max_seqlen_k: int = 0) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention with every pyattn option; returns ``(out, lse)``.

    Dense: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with Hq % Hk == 0 (query head h reads
    kv head h // (Hq // Hk)) -> out (B, Hq, L, Dv), lse (B, Hq, L).
    Varlen (cu_seqlens_q/k int32 (B + 1,)): q (total_q, Hq, D), k (total_k, Hk, D), v (total_k, Hk, Dv)
    -> out (total_q, Hq, Dv), lse (Hq, total_q); sequence b is rows cu[b]:cu[b + 1], and i, j count
    from each sequence's start. max_seqlen_q/k size the dropout keep mask (B, Hq, max_L, max_S).
    align_to_end: the offset of the diagonal is diagonal_offset + S − L, with L, S the lengths of each
    sequence (so causal, window and ALiBi align to every sequence's own bottom-right corner).
    mask (dense only): 4 dims, each 1 or the full size of (B, Hq, L, S); bool (True = takes part) or additive float.
    dropout_keep_mask: bool (B, Hq, L, S) pattern of kept probabilities; drawn with ``generator`` if None.
    lse is the natural log of the softmax denominator, in the compute dtype (float32 for half inputs).
    """
    dtype = q.dtype
    compute = _compute_dtype(dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if dropout_p > 0 and dropout_keep_mask is None:
        if cu_seqlens_q is None:
            shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        else:
            shape = (cu_seqlens_q.numel() - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
        dropout_keep_mask = torch.rand(shape, generator=generator, device=q.device) >= dropout_p
    options = dict(scale=scale, window_left=window_left, window_right=window_right, softcap=softcap,
                   dropout_p=dropout_p)
    if cu_seqlens_q is None:
        offset = diagonal_offset + (k.shape[2] - q.shape[2] if align_to_end else 0)
        out, lse = _dense_attention(q, k, v, mask=mask, alibi_slopes=alibi_slopes, diagonal_offset=offset,
                                    dropout_keep_mask=dropout_keep_mask, **options)
        return out.to(dtype), lse
    if mask is not None:
        raise ValueError("attention: mask is supported only in the dense layout, not with cu_seqlens_q/cu_seqlens_k")
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q_b = q[starts_q[b]:starts_q[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, L_b, D)
        k_b = k[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        v_b = v[starts_k[b]:starts_k[b + 1]].transpose(0, 1).unsqueeze(0)
        slopes_b = None
        if alibi_slopes is not None:
            slopes_b = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        keep_b = None
        if dropout_p > 0:
            keep_b = dropout_keep_mask[b:b + 1, :, :q_b.shape[2], :k_b.shape[2]]
        offset_b = diagonal_offset + (k_b.shape[2] - q_b.shape[2] if align_to_end else 0)
        out_b, lse_b = _dense_attention(q_b, k_b, v_b, mask=None, alibi_slopes=slopes_b, diagonal_offset=offset_b,
                                        dropout_keep_mask=keep_b, **options)
        outs.append(out_b[0].transpose(0, 1))
        lses.append(lse_b[0])
    return torch.cat(outs).to(dtype), torch.cat(lses, dim=1)


def attention_with_weights(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None = None,
                           dropout_p: float = 0.0, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Dense attention that also returns its probabilities: ``(out, weights)``, both in q's dtype.

    Shapes as :func:`attention` (dense, no flash options): weights (B, Hq, L, S) are the normalised
    probabilities after dropout (what ``torch.nn.MultiheadAttention`` returns with need_weights=True);
    a row with no visible key has weights 0 and output 0.
    """
    dtype = q.dtype
    compute = _compute_dtype(dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    keep = None
    if dropout_p > 0:
        keep = torch.rand((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), generator=generator,
                          device=q.device) >= dropout_p
    out, _, weights = _dense_attention(q, k, v, scale=scale, mask=mask, window_left=-1, window_right=-1,
                                       diagonal_offset=0, softcap=0.0, alibi_slopes=None, dropout_p=dropout_p,
                                       dropout_keep_mask=keep, with_probabilities=True)
    return out.to(dtype), weights.to(dtype)


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, scale: float,
                       window_left: int = -1, window_right: int = -1, diagonal_offset: int = 0,
                       softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` of dense :func:`attention` from the forward's ``out`` and ``lse`` alone.

    FlashAttention-2's backward with the row statistics given, not recomputed: with S the scores
    (scale, softcap, window as in :func:`attention`), P = exp(S − lse) on visible keys (0 elsewhere
    and on rows whose lse is −inf), D = rowsum(dO ∘ O), dV = Pᵀ·dO, dS = P ∘ (dO·Vᵀ − D), and
    dQ = dS'·K·scale, dK = dS'ᵀ·Q·scale with dS' = dS through softcap's tanh (dS itself without).
    ``out`` and ``lse`` need not come from this block alone: given a whole row's final statistics
    (ring attention), the result is this block's share of that row's gradient. Shapes as
    :func:`attention` (dense; no mask, ALiBi or dropout); dk, dv summed over each query group (GQA);
    results in the inputs' dtypes. No autograd inside, so it traces like any other op.
    """
    compute = _compute_dtype(q.dtype)
    grad_out, out, lse = grad_out.to(compute), out.to(compute), lse.to(compute)
    q_, k_, v_ = q.to(compute), k.to(compute), v.to(compute)
    batch, heads, seqlen_q, _ = q.shape
    heads_k, seqlen_k = k.shape[1], k.shape[2]
    group = heads // heads_k
    if group > 1:
        k_ = k_.repeat_interleave(group, dim=1)
        v_ = v_.repeat_interleave(group, dim=1)
    scores = scale * (q_ @ k_.transpose(-1, -2))
    if softcap > 0:
        capped = torch.tanh(scores / softcap)
        scores = softcap * capped
    rows = torch.arange(seqlen_q, device=q.device)[:, None] + diagonal_offset
    cols = torch.arange(seqlen_k, device=q.device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if window_left >= 0:
        visible = visible & (cols >= rows - window_left)
    if window_right >= 0:
        visible = visible & (cols <= rows + window_right)
    row_lse = lse.unsqueeze(-1)
    visible = visible & torch.isfinite(row_lse)  # a row that sees no key has P = 0, not exp(S + inf)
    safe_lse = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
    probabilities = torch.where(visible, torch.exp(scores - safe_lse), torch.zeros_like(scores))
    delta = (grad_out * out).sum(dim=-1, keepdim=True)
    grad_scores = probabilities * (grad_out @ v_.transpose(-1, -2) - delta)
    if softcap > 0:
        grad_scores = grad_scores * (1 - capped * capped)
    dq = scale * (grad_scores @ k_)
    dk = scale * (grad_scores.transpose(-1, -2) @ q_)
    dv = probabilities.transpose(-1, -2) @ grad_out
    if group > 1:  # query head h read kv head h // group: its gradient is the group's sum
        dk = dk.unflatten(1, (heads_k, group)).sum(dim=2)
        dv = dv.unflatten(1, (heads_k, group)).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
