"""Ring attention: attention over a sequence sharded across the ranks of a process group.

Each of the W ranks holds one shard of q, k and v (:mod:`pyattn.distributed.sharding`). The K/V
shards travel around the ring (rank r sends to r+1 and receives from r−1 with
``batch_isend_irecv``); at step s rank r holds the K/V of rank r−s and attends its queries to the
parts of it they see (:mod:`pyattn.distributed.blocks`: a full, a causal-diagonal or a windowed
call, or none), through dispatch on whichever backend serves the call. The next step's transfer is
in flight while the current step computes.

Forward: each call returns (out_i, lse_i) for the rows it covers; the partials merge in fp32 (fp64
for fp64 inputs) as out = Σ exp(lse_i − LSE)·out_i with LSE = logsumexp_i lse_i, kept as a running
merge; a row with no visible key so far has LSE = −inf and weight 0.

Backward (a ``torch.autograd.Function``): FlashAttention-2's backward with the *final* (out, LSE)
of every row, so no forward is recomputed. K/V travel the ring again, and with each K/V shard its
dK/dV accumulator: rank r adds its share for the shard it holds and passes the sum on, so after W
hops every accumulator is home, complete. dQ stays local. The accumulator's hop to the next rank
overlaps that rank's next block (it adds its share once the accumulator arrives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pyattn.distributed.blocks import SHARDINGS, Span, plan_step, shard_spans
from pyattn.functional.attention import (
    _check_dim,
    _check_heads,
    _check_qkv,
    _checked_scale,
    _checked_softcap,
    _checked_window,
    flash_attention,
)
from pyattn.functional.attention_backward import flash_attention_backward

__all__ = ["ring_attention"]

_NAME = "ring_attention"
_LAYOUTS = {"bshd": "(batch, seqlen, nheads, headdim)", "bhsd": "(batch, nheads, seqlen, headdim)"}


@dataclass(frozen=True)
class _RingConfig:
    """Everything but the tensors: the group, this rank's place in it, the attention's options."""

    group: dist.ProcessGroup | None
    world_size: int
    rank: int
    next_rank: int  # global ranks of the neighbours (what P2POp takes)
    previous_rank: int
    sharding: str
    scale: float
    window_left: int
    window_right: int
    softcap: float

    def spans(self, rank: int, shard_length: int) -> tuple[Span, ...]:
        return shard_spans(self.sharding, rank, self.world_size, shard_length)

    def source(self, step: int) -> int:
        """The rank whose K/V this rank holds at ``step``."""
        return (self.rank - step) % self.world_size


# ------------------------------------------------------------------------------------------ communication


def _pack(tensors: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """One contiguous buffer holding ``tensors`` (one message per hop instead of several)."""
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def _unpack(buffer: Tensor, shapes: tuple[torch.Size, ...]) -> list[Tensor]:
    views, start = [], 0
    for shape in shapes:
        count = math.prod(shape)
        views.append(buffer[start:start + count].view(shape))
        start += count
    return views


# Messages of each kind arrive in the order sent; the tags keep K/V and dK/dV apart too (gloo matches
# on them; NCCL ignores them and matches by order, which every rank keeps the same).
_KV_TAG, _GRADIENT_TAG = 0, 1


def _peer_failed(config: _RingConfig, what: str, step: int, error: RuntimeError) -> RuntimeError:
    """A peer that failed or exited: say so here rather than only in its log."""
    return RuntimeError(
        f"{_NAME}: rank {config.rank} of {config.world_size}: passing {what} around the ring at step {step} "
        f"(to rank {config.next_rank}, from rank {config.previous_rank}) failed; a peer rank has probably "
        f"failed or exited (its own error says why): {error}")


def _exchange(config: _RingConfig, send: Tensor, receive: Tensor, what: str, step: int, tag: int = _KV_TAG) -> list:
    """Start sending ``send`` to the next rank and receiving into ``receive`` from the previous one. A peer that
    is already gone can fail the send at once (gloo: "Connection closed by peer") as well as at the wait."""
    operations = [dist.P2POp(dist.isend, send, config.next_rank, config.group, tag),
                  dist.P2POp(dist.irecv, receive, config.previous_rank, config.group, tag)]
    try:
        return dist.batch_isend_irecv(operations)
    except RuntimeError as error:
        raise _peer_failed(config, what, step, error) from error


def _wait(config: _RingConfig, works: list, what: str, step: int) -> None:
    try:
        for work in works:
            work.wait()
    except RuntimeError as error:
        raise _peer_failed(config, what, step, error) from error


# ------------------------------------------------------------------------------------------------ forward


def _merge(out: Tensor, lse: Tensor, rows: slice, block_out: Tensor, block_lse: Tensor) -> None:
    """out[rows], lse[rows] ← the merge of the running partial with one block's (in place, fp32/fp64)."""
    old_lse = lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, block_lse.to(lse.dtype))  # -inf only if both are
    shift = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    old_weight = torch.exp(old_lse - shift).unsqueeze(-1)
    block_weight = torch.exp(block_lse.to(lse.dtype) - shift).unsqueeze(-1)
    out[:, :, rows] = old_weight * out[:, :, rows] + block_weight * block_out.to(out.dtype)
    lse[:, :, rows] = new_lse


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_like_layout(reference: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros (B, H, L, D) laid out as ``reference`` is (bshd memory for a transposed bshd view)."""
    if reference.stride(1) < reference.stride(2):
        return reference.new_zeros((shape[0], shape[2], shape[1], shape[3]), dtype=dtype).transpose(1, 2)
    return reference.new_zeros(shape, dtype=dtype)


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, config: _RingConfig) -> tuple[Tensor, Tensor]:
    batch, heads_q, shard_length, _ = q.shape
    accumulate = _accumulator_dtype(q.dtype)
    out = _new_like_layout(q, (batch, heads_q, shard_length, v.shape[-1]), accumulate)
    lse = q.new_full((batch, heads_q, shard_length), float("-inf"), dtype=accumulate)
    query_spans = config.spans(config.rank, shard_length)
    shapes = (k.shape, v.shape)
    buffer = _pack((k, v), k.dtype)
    for step in range(config.world_size):
        works = []
        if step + 1 < config.world_size:  # the next K/V travels while this one is used
            incoming = torch.empty_like(buffer)
            works = _exchange(config, buffer, incoming, "K/V", step)
        keys, values = _unpack(buffer, shapes)
        for block in plan_step(query_spans, config.spans(config.source(step), shard_length), config.window_left,
                               config.window_right):
            block_out, block_lse = flash_attention(
                q[:, :, block.rows], keys[:, :, block.cols], values[:, :, block.cols], causal=block.causal,
                window=block.window, scale=config.scale, softcap=config.softcap, return_lse=True, layout="bhsd")
            _merge(out, lse, block.rows, block_out, block_lse)
        if works:
            _wait(config, works, "K/V", step)
            buffer = incoming
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------------------------- backward


def _ring_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   config: _RingConfig) -> tuple[Tensor, Tensor, Tensor]:
    shard_length = q.shape[2]
    accumulate = _accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=accumulate, device=q.device)
    query_spans = config.spans(config.rank, shard_length)
    shapes = (k.shape, v.shape)
    buffer = _pack((k, v), k.dtype)
    gradient_works, gradient_incoming = [], None
    for step in range(config.world_size):
        works = []
        if step + 1 < config.world_size:
            incoming = torch.empty_like(buffer)
            works = _exchange(config, buffer, incoming, "K/V", step)
        keys, values = _unpack(buffer, shapes)
        # This rank's share of the gradient of the K/V shard it holds, into a fresh buffer: the running
        # sum for that shard is still on its way from the previous rank.
        share = torch.zeros(buffer.numel(), dtype=accumulate, device=q.device)
        share_k, share_v = _unpack(share, shapes)
        for block in plan_step(query_spans, config.spans(config.source(step), shard_length), config.window_left,
                               config.window_right):
            rows, cols = block.rows, block.cols
            block_dq, block_dk, block_dv = flash_attention_backward(
                grad_out[:, :, rows], q[:, :, rows], keys[:, :, cols], values[:, :, cols], out[:, :, rows],
                lse[:, :, rows], causal=block.causal, window=block.window, scale=config.scale,
                softcap=config.softcap, layout="bhsd")
            dq[:, :, rows] += block_dq
            share_k[:, :, cols] += block_dk
            share_v[:, :, cols] += block_dv
        if gradient_works:
            _wait(config, gradient_works, "dK/dV", step - 1)
            share += gradient_incoming
        # Pass the sum on; after the last step it goes home, and this rank's own arrives.
        if config.world_size == 1:
            gradient_incoming = share
        else:
            gradient_incoming = torch.empty_like(share)
            gradient_works = _exchange(config, share, gradient_incoming, "dK/dV", step, tag=_GRADIENT_TAG)
        if works:
            _wait(config, works, "K/V", step)
            buffer = incoming
    if gradient_works:
        _wait(config, gradient_works, "dK/dV", config.world_size - 1)
    dk, dv = _unpack(gradient_incoming, shapes)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """q, k, v: this rank's shards (B, H, n, D) (any strides); ``config``: the rest."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, config: _RingConfig) -> Tensor:
        out, lse = _ring_forward(q, k, v, config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(grad_out, q, k, v, out, lse, ctx.config)
        return dq, dk, dv, None


# ------------------------------------------------------------------------------------------------ the API


def _config(group, causal, scale, window, softcap, sharding, head_dim) -> _RingConfig:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{_NAME}: torch.distributed is not initialized; call torch.distributed."
                           "init_process_group first (on one process, use pyattn.flash_attention)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{_NAME}: group must be a torch.distributed.ProcessGroup or None (the default group), "
                        f"got {type(group).__name__}")
    if sharding not in SHARDINGS:
        raise ValueError(f"{_NAME}: sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{_NAME}: this process (global rank {dist.get_rank()}) is not a member of group")

    def global_rank(group_rank: int) -> int:
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    window_left, window_right = _checked_window(_NAME, window, causal)
    return _RingConfig(group=group, world_size=world_size, rank=rank, next_rank=global_rank((rank + 1) % world_size),
                       previous_rank=global_rank((rank - 1) % world_size), sharding=sharding,
                       scale=_checked_scale(_NAME, scale, head_dim), window_left=window_left,
                       window_right=window_right, softcap=_checked_softcap(_NAME, softcap))


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group: dist.ProcessGroup | None = None, causal: bool = False,
                   scale: float | None = None, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                   sharding: str = "contiguous", layout: str = "bshd") -> Tensor:
    """Self-attention over a sequence split across the ranks of ``group`` (context parallelism), with gradients.

    Each rank passes its own shard; the result is this rank's shard of the output, equal to the
    rows of ``pyattn.flash_attention`` on the whole sequence that this rank holds. Shapes
    (layout="bshd", the default): q (batch, n, nheads, headdim), k (batch, n, nheads_k, headdim),
    v (batch, n, nheads_k, headdim_v) -> out (batch, n, nheads, headdim_v), n the shard length
    (layout="bhsd": (batch, nheads, n, headdim)). Every rank's shards have the same shapes;
    nheads % nheads_k == 0 (GQA).

    sharding: which positions each rank holds. "contiguous": rank r holds positions [r·n, (r+1)·n).
    "zigzag" (use it with ``causal``: every rank then does the same work at every step): of 2W chunks
    of n/2, rank r holds chunks r and 2W−1−r, concatenated (:func:`pyattn.distributed.zigzag_shard`).
    causal, window, scale, softcap: as :func:`pyattn.flash_attention` on the whole sequence
    (window (left, right) in positions of the whole sequence, -1 unbounded; causal is right = 0).

    group: the ring's process group (default: the world). Use a group of its own, not the one DDP
    or FSDP reduce gradients over, so that the ring's point-to-point messages never interleave with
    their collectives on one communicator. Every rank of ``group`` must call this with shards of
    the same shapes, as for any collective. Gradients flow to q, k and v (this rank's shards).
    """
    _check_qkv(_NAME, {"q": q, "k": k, "v": v})
    if layout not in _LAYOUTS:
        raise ValueError(f"{_NAME}: layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _check_dim(_NAME, name, tensor, 4, f'{_LAYOUTS[layout]} (layout="{layout}")')
    if layout == "bshd":  # transposed views: the kernels take any strides
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    batch, heads_q, shard_length, head_dim = q.shape
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape[0] != batch:
            raise ValueError(f"{_NAME}: {name} has batch size {tensor.shape[0]} but q has {batch}")
        if tensor.shape[2] != shard_length:
            raise ValueError(f"{_NAME}: {name}'s shard has {tensor.shape[2]} positions but q's has {shard_length}; "
                             "ring attention is self-attention: q, k and v are shards of one sequence")
    if k.shape[-1] != head_dim:
        raise ValueError(f"{_NAME}: k's head dim {k.shape[-1]} != q's head dim {head_dim}")
    if shard_length == 0:
        raise ValueError(f"{_NAME}: the shards are empty; each rank needs at least one position")
    _check_heads(_NAME, heads_q, k.shape[1], v.shape[1])
    config = _config(group, causal, scale, window, softcap, sharding, head_dim)
    if sharding == "zigzag" and shard_length % 2:
        raise ValueError(f"{_NAME}: a zigzag shard holds two equal chunks, so its length must be even, "
                         f"got {shard_length}")
    out = _RingAttention.apply(q, k, v, config)
    return out.transpose(1, 2) if layout == "bshd" else out
