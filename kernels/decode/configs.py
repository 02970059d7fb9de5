"""Decode launch configurations as data, and the split-K heuristic.

No autotuning: a decode step must be capturable in a CUDA graph from its first call, and autotuning benchmarks
(and synchronises) on first use. The table is chosen for H100/H200, where decode is bound by HBM bandwidth:
the tile only has to keep enough K/V bytes in flight (BLOCK_N keys × head dim × num_stages buffers) while
its rows (a GQA group × seqlen_q) stay small. ``aot.py`` compiles exactly these entries.
"""

from __future__ import annotations

import math

import torch
import triton

# (BLOCK_N, num_warps, num_stages[, maxnreg]) per (tile-width class, BLOCK_M); maxnreg is the PTX register cap
# (.maxnreg), for configs where ptxas would otherwise pick a low register count of its own and spill. The class
# is the larger padded head dim of K and V in 16-bit units (fp32 counts double). Each stage buffers a K and a V tile: 64 × 128 × 2 B × 2 = 32 KB at
# d128 in 16 bits. 64-row tiles take 8 warps and wide classes shorter key tiles, so that no spec spills
# registers on sm_90 or sm_80 (d256 with 16-row tiles: 32 keys spilled 8 bytes on sm_80 once the offsets
# became int64, and 8 warps spilled 8-24; 16 keys with 4 warps do not).
DECODE_CONFIGS = {
    (64, 16): (64, 4, 3),
    (64, 64): (64, 8, 3),
    (128, 16): (64, 4, 3),
    # 64 keys: 8 B of spill at sm_80 under Triton 3.6 (255 registers, paged split, every option); 32 keys without a
    # cap: 16 B at sm_80 under 3.8 (ptxas held the paged direct launch at 128 registers); 32 keys capped: none.
    (128, 64): (32, 8, 3, 255),
    (256, 16): (16, 4, 3),
    (256, 64): (32, 8, 2),
}
# fp32 (strict IEEE dots run on FMAs and hold both operands in registers): 16-row tiles only, short key tiles. With
# the append fused in, d128 takes one stage (64 keys and two stages spilled 8-16 bytes). Under Triton 3.6 d64's
# 32-key tiles spilled 8-16 bytes on sm_90 (16 keys do not) and d128 at 4 warps 8-16 bytes of stack at 80
# registers in the odd-shaped split launches (8 warps do not).
FP32_CONFIGS = {128: (16, 4, 3), 256: (16, 8, 1), 512: (16, 4, 2)}  # by width class (fp32 d64, d128, d256)
WIDTH_CLASSES = (64, 128, 256, 512)
# Rows of a tile (group heads × seqlen_q, padded): tl.dot needs 16; a decode step of GQA groups up to 16 takes one
# 16-row tile, anything longer (speculative decoding, chunked prefill) 64-row tiles. Compute is nearly free in
# decode, so padding rows costs registers, not time; two sizes keep the compiled variants few.
BLOCK_M_CHOICES = (16, 64)
# New tokens per chunk of the fused append (a decode step appends one: one program of each (row, KV head) writes it).
APPEND_BLOCK_N = 16
MERGE_SPLITS_CHUNK = 16  # partial outputs the merge reads per iteration (a (16, Dv) fp32 tile)
INTERPRETER_BLOCK_N = 16  # small tiles so the tests' short caches cross several tiles and splits
INTERPRETER_APPEND_BLOCK_N = 2  # so the tests' 4- and 5-token appends are dealt to several programs

# Split-K: at most MAX_SPLITS splits, and at least MIN_KEYS_PER_SPLIT cache positions per split (below that
# the partial writes and the merge cost more than the parallelism returns).
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256
# A grid that already fills this fraction of the SMs in one wave is not split.
FULL_WAVE = 0.8
# Among split counts, the smallest whose wave efficiency is within this factor of the best one.
EFFICIENCY_SLACK = 0.85


def tile_width_class(dtype: torch.dtype, head_dim: int, head_dim_v: int) -> int:
    padded = max(16, triton.next_power_of_2(max(head_dim, head_dim_v)))
    width = padded * dtype.itemsize // 2
    return next(limit for limit in WIDTH_CLASSES if width <= limit)


def decode_config(dtype: torch.dtype, head_dim: int, head_dim_v: int, block_m: int, *,
                  interpreter: bool) -> tuple[int, int, int, int | None]:
    """(BLOCK_N, num_warps, num_stages, maxnreg or None) of a call whose tiles have ``block_m`` rows."""
    if interpreter:
        return INTERPRETER_BLOCK_N, 1, 1, None
    width = tile_width_class(dtype, head_dim, head_dim_v)
    config = FP32_CONFIGS[width] if dtype == torch.float32 else DECODE_CONFIGS[(width, block_m)]
    return (*config, None) if len(config) == 3 else config


def block_m_choices(dtype: torch.dtype) -> tuple[int, ...]:
    return (16,) if dtype == torch.float32 else BLOCK_M_CHOICES


def block_m_for(rows_per_head: int, dtype: torch.dtype) -> int:
    """Rows of one program's tile for ``rows_per_head`` = group size × seqlen_q packed rows."""
    choices = block_m_choices(dtype)
    return next((block_m for block_m in choices if rows_per_head <= block_m), choices[-1])


def num_splits_heuristic(programs: int, capacity: int, sm_count: int | None, block_n: int) -> int:
    """Splits of the key range for a grid of ``programs`` (row tiles × heads_k × batch) over a cache of
    ``capacity`` positions per sequence, on ``sm_count`` SMs (None: unknown, e.g. the interpreter: 1 split).

    A grid that fills the SMs is not split. Otherwise each split count s (up to MAX_SPLITS, keeping at least
    MIN_KEYS_PER_SPLIT positions and one BLOCK_N tile per split) runs programs × s programs in
    ceil(programs × s / SMs) waves, at efficiency programs × s / (waves × SMs); the smallest s within
    EFFICIENCY_SLACK of the best efficiency wins (more splits than that only add partials to merge).
    ``capacity`` is the cache's size, not its fill: lengths live on the device and are never read here.
    """
    if sm_count is None or sm_count <= 0 or programs <= 0 or programs >= FULL_WAVE * sm_count:
        return 1
    limit = max(1, min(MAX_SPLITS, capacity // MIN_KEYS_PER_SPLIT, triton.cdiv(capacity, block_n)))

    def efficiency(splits: int) -> float:
        work = programs * splits
        return work / (math.ceil(work / sm_count) * sm_count)

    best = max(efficiency(s) for s in range(1, limit + 1))
    return next(s for s in range(1, limit + 1) if efficiency(s) >= EFFICIENCY_SLACK * best)
