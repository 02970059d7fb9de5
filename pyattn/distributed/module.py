"""``ContextParallelAttention``: a ``pyattn.nn.MultiheadAttention``'s self-attention over a sharded sequence."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pyattn.distributed.blocks import SHARDINGS
from pyattn.distributed.ring import ring_attention
from pyattn.functional.attention import _checked_window

__all__ = ["ContextParallelAttention"]

_NAME = "ContextParallelAttention"


class ContextParallelAttention(torch.nn.Module):
    """Runs ``attention`` (a :class:`pyattn.nn.MultiheadAttention`) as ring attention across ``group``.

    **Input is expected already sharded**, and output stays sharded: each rank passes its own shard
    of the sequence, laid out by ``sharding`` (``pyattn.distributed.shard_sequence(x, rank, W, dim=...,
    sharding=...)`` makes it; ``gather_sequence`` puts outputs back together), shaped as
    ``attention`` expects: (n, N, E), or (N, n, E) with ``batch_first``, n = this rank's shard
    length (the same on every rank; even for "zigzag"). The result is this rank's shard of what
    ``attention(x, x, x, need_weights=False)`` gives on the whole sequence (with the causal or
    window mask configured here), so per-token layers around it (norms, MLPs, the loss) run on
    shards unchanged; a recurrent layer (LSTM) does not, since it needs the sequence in order.

    The parameters are ``attention``'s own (state_dict keys ``attention.in_proj_weight``, ...).
    Each rank's parameter gradients are its shard's share only: reduce them over the group. DDP
    over the same ranks does it (its average, with every rank's loss the mean over its own tokens
    and shards of equal size, is the gradient of the mean over the whole sequence); FSDP2's
    reduce-scatter likewise. Give the ring its own ``group`` (``dist.new_group(ranks)``), not the
    one DDP/FSDP use, so the ring's messages never interleave with their collectives.

    causal: query i sees keys j <= i (whole-sequence positions); window (left, right): also
    i - left <= j <= i + right (-1 unbounded). sharding: "zigzag" (default; balanced under
    ``causal``) or "contiguous". Self-attention only, without masks, bias_k/bias_v, add_zero_attn or
    dropout (attention.dropout must be 0), with kdim = vdim = embed_dim.

    ``forward(x)`` returns the output; ``forward(query, key, value, need_weights=False)`` with
    ``key`` and ``value`` the query tensor itself returns ``(output, None)`` as MultiheadAttention
    does, so the wrapper drops into a block that calls ``self.attn(x, x, x, need_weights=False)``.
    """

    def __init__(self, attention: torch.nn.Module, group: dist.ProcessGroup | None = None, *, causal: bool = False,
                 window: tuple[int, int] = (-1, -1), sharding: str = "zigzag") -> None:
        super().__init__()
        from pyattn.nn import MultiheadAttention

        if not isinstance(attention, MultiheadAttention):
            raise TypeError(f"{_NAME}: attention must be a pyattn.nn.MultiheadAttention, got "
                            f"{type(attention).__name__}")
        if not attention._qkv_same_embed_dim:
            raise ValueError(f"{_NAME}: attention must have kdim = vdim = embed_dim (self-attention), got kdim="
                             f"{attention.kdim}, vdim={attention.vdim}, embed_dim={attention.embed_dim}")
        if attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError(f"{_NAME}: attention's add_bias_kv / add_zero_attn add a key outside the sequence, "
                             "which ring attention does not shard; build it without them")
        if attention.dropout:
            raise ValueError(f"{_NAME}: attention.dropout must be 0 (ring attention has no dropout), got "
                             f"{attention.dropout}")
        if sharding not in SHARDINGS:
            raise ValueError(f"{_NAME}: sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
        self.attention = attention
        self.group = group
        self.causal = bool(causal)
        self.window = _checked_window(_NAME, window, False)
        self.sharding = sharding

    def extra_repr(self) -> str:
        size = dist.get_world_size(self.group) if dist.is_initialized() else "?"
        text = f"ranks={size}, sharding={self.sharding!r}"
        if self.causal:
            text += ", causal=True"
        if self.window != (-1, -1):
            text += f", window={self.window}"
        return text

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                key_padding_mask: Tensor | None = None, need_weights: bool | None = None,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False):
        del average_attn_weights  # no weights are formed
        as_module = key is not None or value is not None or need_weights is not None
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError(f"{_NAME}: self-attention only: key and value must be the query tensor itself")
        if need_weights:
            raise ValueError(f"{_NAME}: need_weights=True would need the (L, S) weights across ranks; pass "
                             "need_weights=False")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(f"{_NAME}: masks are not sharded; configure causal= or window= at construction instead "
                             "of attn_mask / key_padding_mask / is_causal")
        attention = self.attention
        if query.dim() != 3 or query.shape[-1] != attention.embed_dim:
            layout = "(N, n, E)" if attention.batch_first else "(n, N, E)"
            raise ValueError(f"{_NAME}: query must be this rank's shard {layout} with E = {attention.embed_dim}, got "
                             f"shape {tuple(query.shape)}")
        x = query if attention.batch_first else query.transpose(0, 1)  # (N, n, E)
        batch, length, _ = x.shape
        heads = attention.num_heads
        q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, attention.head_dim)) for t in (q, k, v))  # bshd views
        out = ring_attention(q, k, v, group=self.group, causal=self.causal, window=self.window,
                             sharding=self.sharding, layout="bshd")
        out = attention.out_proj(out.reshape(batch, length, attention.embed_dim))
        if not attention.batch_first:
            out = out.transpose(0, 1)
        return (out, None) if as_module else out
