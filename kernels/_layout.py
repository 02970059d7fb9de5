"""Output layouts shared by the Triton launchers and the fake (meta) kernels of the ops, so both agree."""

from __future__ import annotations

import torch


def attention_output_order(q: torch.Tensor) -> tuple[int, int, int, int]:
    """Memory order of the dense attention output (B, Hq, L, Dv) for a query (B, Hq, L, D).

    A query whose positions are further apart than its heads is a (B, L, H, D) "bshd" view; the
    output then gets (B, L, Hq, Dv) memory, so ``out.transpose(1, 2).reshape(B, L, -1)`` is a view
    (flash-attn's layout), not a copy.
    """
    if q.dim() == 4 and q.stride(1) < q.stride(2):
        return (0, 2, 1, 3)
    return (0, 1, 2, 3)


def new_attention_output(q: torch.Tensor, head_dim_v: int, empty=None) -> torch.Tensor:
    """An uninitialised dense attention output shaped (B, Hq, L, Dv), laid out as q is.

    ``empty(shape, dtype, device)`` allocates the buffer (default: ``q.new_empty``)."""
    order = attention_output_order(q)
    shape = (*q.shape[:-1], head_dim_v)
    stored = tuple(shape[axis] for axis in order)
    if empty is None:
        buffer = q.new_empty(stored)
    else:
        buffer = empty(stored, q.dtype, q.device)
    return buffer.permute(*[order.index(axis) for axis in range(4)])


def base_is_16_byte_aligned(tensor: torch.Tensor) -> bool:
    """Whether the tensor's first element sits on a 16-byte boundary (what vector loads, cp.async and TMA
    need). While torch.compile traces there is no address: the storage offset decides, since the caching
    allocator aligns every allocation's base (meta tensors have address 0)."""
    if torch.compiler.is_compiling():
        return tensor.storage_offset() * tensor.element_size() % 16 == 0
    return tensor.data_ptr() % 16 == 0
