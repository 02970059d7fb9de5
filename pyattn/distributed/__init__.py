"""Context parallelism on torch.distributed: ring attention over a sequence sharded across ranks.

    import torch.distributed as dist, pyattn.distributed as cp
    dist.init_process_group("nccl")
    ring = dist.new_group(list(range(dist.get_world_size())))     # the ring's own group
    q_local = cp.zigzag_shard(q, dist.get_rank(), dist.get_world_size(), dim=1)   # (B, n, H, D)
    out_local = cp.ring_attention(q_local, k_local, v_local, group=ring, causal=True, sharding="zigzag")

* :func:`ring_attention` — the function (forward and backward), on pyattn's kernels via dispatch.
* :class:`ContextParallelAttention` — a ``pyattn.nn.MultiheadAttention``'s self-attention, run as ring attention.
* :func:`zigzag_shard`, :func:`zigzag_unshard`, :func:`shard_sequence`, :func:`unshard_sequence`,
  :func:`gather_sequence` — the shard layouts.

See docs/distributed.md for the algorithm, its communication against its compute, and DDP/FSDP.
"""

from pyattn.distributed.module import ContextParallelAttention
from pyattn.distributed.ring import ring_attention
from pyattn.distributed.sharding import gather_sequence, shard_sequence, unshard_sequence, zigzag_shard, zigzag_unshard

__all__ = ["ring_attention", "ContextParallelAttention", "zigzag_shard", "zigzag_unshard", "shard_sequence",
           "unshard_sequence", "gather_sequence"]
