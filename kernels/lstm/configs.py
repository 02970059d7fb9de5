"""LSTM launch configurations as data: per-step tiles by batch bucket, the persistent and grid kernels' limits
and warps. ``launch.py``, ``aot.py`` and ``pyattn.kernels.report`` read the same tables, so the compile test
checks the configs the launchers can run (``auto_may_pick``)."""

from __future__ import annotations

import torch
import triton

# fp32 GEMMs in strict IEEE fp32, matching torch's default (TF32 off for matmul) and the fp32 bound.
DOT_PRECISION = "ieee"

# Per-step kernels: (BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages) by batch bucket. Small batch
# takes narrow hidden tiles so the grid still spreads over the SMs. Untuned: no GPU measured these.
STEP_CONFIGS = {
    16: (16, 32, 64, 4, 3),
    32: (32, 32, 64, 4, 3),
    64: (64, 64, 64, 8, 3),
}
# Persistent kernels keep all of W_hh (4H × H) in registers: the largest padded hidden size per dtype
# that fits one program's registers (ptxas -v, sm_90: no spills up to 64; at 128 in 16-bit types,
# ~70 bytes a thread spill to L1: expected, not measured, to cost less than a launch per step).
PERSISTENT_MAX_HIDDEN = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}
PERSISTENT_BLOCK_B = 16
# Grid kernel: all batch rows (≤ 16) in one tile, hidden units split 16 to a program (tl.dot's least N)
# so H = 1024 spreads over 64 SMs. Each program keeps 4 · GRID_BLOCK_H · H_padded of W_hh on chip:
# 128 KB at H = 1024 in 16-bit types; fp32 up to 512.
GRID_BLOCK_B = 16
GRID_BLOCK_H = 16
GRID_MAX_HIDDEN = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 512}

FORWARD_RECURRENCES = ("persistent", "grid", "stepwise")
BACKWARD_RECURRENCES = ("persistent", "stepwise")


def step_config(batch: int) -> tuple[int, int, int, int, int]:
    for bucket in sorted(STEP_CONFIGS):
        if batch <= bucket:
            return STEP_CONFIGS[bucket]
    return STEP_CONFIGS[max(STEP_CONFIGS)]


def hidden_pad(hidden_size: int) -> int:
    return max(16, triton.next_power_of_2(hidden_size))


def persistent_hidden_sizes(dtype: torch.dtype) -> list[int]:
    """The padded hidden sizes the persistent kernels compile for: 16 up to the register limit."""
    sizes, padded = [], 16
    while padded <= PERSISTENT_MAX_HIDDEN[dtype]:
        sizes.append(padded)
        padded *= 2
    return sizes


def grid_hidden_sizes(dtype: torch.dtype) -> list[int]:
    """The padded hidden sizes the grid kernel runs with multiple programs: past the persistent limit (where
    dispatch prefers the persistent kernel) up to GRID_MAX_HIDDEN."""
    sizes, padded = [], 2 * PERSISTENT_MAX_HIDDEN[dtype]
    while padded <= GRID_MAX_HIDDEN[dtype]:
        sizes.append(padded)
        padded *= 2
    return sizes


def persistent_warps(padded_hidden: int, dtype: torch.dtype, block_h: int | None = None) -> int:
    # Spread the resident W_hh (4 · HIDDEN · block_h elements) so each thread holds at most ~64 registers of it.
    block_h = padded_hidden if block_h is None else block_h
    weight_bytes = 4 * padded_hidden * block_h * torch.finfo(dtype).bits // 8
    return 4 if weight_bytes <= 16384 else 8 if weight_bytes <= 32768 else 16


def step_meta(config: tuple[int, int, int, int, int]) -> dict:
    block_b, block_h, block_k, num_warps, num_stages = config
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, DOT_PRECISION=DOT_PRECISION,
                num_warps=num_warps, num_stages=num_stages)


def persistent_meta(hidden_size: int, dtype: torch.dtype) -> dict:
    padded = hidden_pad(hidden_size)
    # num_stages=1: the software pipeliner would prefetch next step's h (or dgates) before this
    # step's stores and the barrier, reading a stale state.
    return dict(BLOCK_B=PERSISTENT_BLOCK_B, HIDDEN=padded, DOT_PRECISION=DOT_PRECISION,
                num_warps=persistent_warps(padded, dtype), num_stages=1)


def grid_meta(padded_hidden: int, block_h: int, dtype: torch.dtype) -> dict:
    # num_stages=1 for the same reason as the persistent kernel: no load may move above the barrier.
    return dict(BLOCK_B=GRID_BLOCK_B, BLOCK_H=block_h, HIDDEN=padded_hidden, DOT_PRECISION=DOT_PRECISION,
                num_warps=persistent_warps(padded_hidden, dtype, block_h), num_stages=1)
