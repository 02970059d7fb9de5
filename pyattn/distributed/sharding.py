"""Splitting a sequence across ranks and putting it back: the layouts ring attention expects.

"zigzag" (the default for causal attention): the sequence is cut into 2W equal chunks and rank r
holds chunks r and 2W−1−r, concatenated in that order. Under a causal mask an early chunk sees
little and a late one much, so pairing them gives every rank the same work at every ring step.
"contiguous": rank r holds the r-th of W equal pieces (balanced without a causal mask).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from pyattn.distributed.blocks import SHARDINGS

__all__ = ["zigzag_shard", "zigzag_unshard", "shard_sequence", "unshard_sequence", "gather_sequence"]


def _check_pieces(function: str, x: Tensor, dim: int, pieces: int, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{function}: x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{function}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    if x.shape[dim] % pieces:
        raise ValueError(f"{function}: the sequence length {x.shape[dim]} (dim {dim}) must be divisible by {what} = "
                         f"{pieces}; pad the sequence")


def _check_rank(function: str, rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"{function}: need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")


def zigzag_shard(x: Tensor, rank: int, world_size: int, dim: int = 1) -> Tensor:
    """Rank ``rank``'s zigzag shard of the whole sequence ``x``: chunks r and 2W−1−r of 2W along ``dim``.

    ``x.shape[dim]`` must be divisible by 2·world_size. The result is a new tensor of length
    ``x.shape[dim] / world_size`` (dim=1 is the sequence of a (batch, seqlen, ...) tensor).
    """
    _check_rank("zigzag_shard", rank, world_size)
    _check_pieces("zigzag_shard", x, dim, 2 * world_size, "2 * world_size")
    chunks = x.chunk(2 * world_size, dim)
    return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim)


def zigzag_unshard(shards: list[Tensor] | tuple[Tensor, ...], dim: int = 1) -> Tensor:
    """The whole sequence from every rank's zigzag shard (``shards[r]`` from rank r); inverts :func:`zigzag_shard`."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("zigzag_unshard: shards is empty; pass one shard per rank, in rank order")
    pieces: list[Tensor | None] = [None] * (2 * world_size)
    for rank, shard in enumerate(shards):
        _check_pieces("zigzag_unshard", shard, dim, 2, "2 (each zigzag shard holds two chunks)")
        pieces[rank], pieces[2 * world_size - 1 - rank] = shard.chunk(2, dim)
    return torch.cat(pieces, dim)


def shard_sequence(x: Tensor, rank: int, world_size: int, *, dim: int = 1, sharding: str = "zigzag") -> Tensor:
    """Rank ``rank``'s shard of ``x`` along ``dim``: :func:`zigzag_shard`, or the r-th of W equal pieces."""
    if sharding not in SHARDINGS:
        raise ValueError(f"shard_sequence: sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
    if sharding == "zigzag":
        return zigzag_shard(x, rank, world_size, dim)
    _check_rank("shard_sequence", rank, world_size)
    _check_pieces("shard_sequence", x, dim, world_size, "world_size")
    return x.chunk(world_size, dim)[rank].clone()


def unshard_sequence(shards: list[Tensor] | tuple[Tensor, ...], *, dim: int = 1, sharding: str = "zigzag") -> Tensor:
    """The whole sequence from every rank's shard, in rank order: inverse of :func:`shard_sequence`."""
    if sharding not in SHARDINGS:
        raise ValueError(f"unshard_sequence: sharding must be one of {list(SHARDINGS)}, got {sharding!r}")
    if sharding == "zigzag":
        return zigzag_unshard(shards, dim)
    return torch.cat(list(shards), dim)


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                    sharding: str = "zigzag") -> Tensor:
    """The whole sequence on every rank of ``group``, from each rank's shard ``x`` (an all-gather; no gradient).

    For outputs and checks; every rank's shard must have the same shape.
    """
    world_size = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, dim=dim, sharding=sharding)
