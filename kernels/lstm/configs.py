"""LSTM launch configurations as data: per-step tiles by batch bucket, the persistent and grid kernels' limits
and warps. ``launch.py``, ``aot.py`` and ``pyattn.kernels.report`` read the same tables, so the compile test
checks the configs the launchers can run (``auto_may_pick``)."""

from __future__ import annotations

import torch
import triton

# fp32 GEMMs in strict IEEE fp32, matching torch's default (TF32 off for matmul) and the fp32 bound.
DOT_PRECISION = "ieee"

# Per-step kernels: (BLOCK_B, BLOCK_H, BLOCK_K, num_warps, num_stages) by (element kind, batch bucket).
# Chosen so that no config spills on sm_90 or sm_80, odd sizes included (the four gate accumulators and the
# four weight tiles are all live in the K loop; masked scalar loads of an odd H take the most registers):
# narrow hidden tiles and 16-32 deep K slices. Small batch also takes narrow hidden tiles so the grid still
# spreads over the SMs. Not yet timed on a GPU.
STEP_CONFIGS = {
    ("16-bit", 16): (16, 32, 32, 4, 2),
    ("16-bit", 32): (32, 16, 32, 4, 2),
    ("16-bit", 64): (64, 16, 16, 4, 2),
    ("fp32", 16): (16, 16, 32, 4, 2),
    ("fp32", 32): (32, 16, 32, 4, 2),
    ("fp32", 64): (32, 16, 32, 4, 2),
}
BATCH_BUCKETS = (16, 32, 64)
# The step backward's register cap (PTX .maxnreg, Triton's ``maxnreg``) per element kind. Without one, ptxas 12.8
# (Triton 3.6's) caps some 16-bit configs at a register count of its own choosing and spills a word or two (8 B at
# 56 registers on sm_80: B 16, packed, with a projection; 8 B at 96 on sm_90: B 32, odd H); capped at 255 it takes
# 68 and 118 registers and spills nothing (docs/lstm.md, "Triton 3.6").
STEP_BACKWARD_MAXNREG = {"16-bit": 255}
# A projected LSTM's step kernels (proj_size > 0) where the bucket's tiles spill: fp32 at 32 × 16 × 32 spills
# 8 bytes on sm_80 in the gate launch (K = P); 16-deep K slices do not (80 registers).
STEP_CONFIGS_PROJECTION = {
    ("fp32", 32): (32, 16, 16, 4, 2),
    ("fp32", 64): (32, 16, 16, 4, 2),
}
# Persistent kernels keep W_hh (4H × H) on chip for the whole sequence (Triton stages it in shared memory for
# the dots): the largest padded hidden size per dtype that compiles without spilling, for H a multiple of 16
# (vector loads) and for other H (masked scalar loads, more registers).
PERSISTENT_MAX_HIDDEN = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}
PERSISTENT_MAX_HIDDEN_UNALIGNED = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
# Warps per padded hidden size: 8 for the largest sizes (16 warps cap a thread at 128 registers and spill).
PERSISTENT_WARPS = {"16-bit": {16: 4, 32: 4, 64: 8, 128: 8}, "fp32": {16: 4, 32: 4, 64: 8}}
# With a projection (W_hr and a second product on chip too): fp32 at H_pad 32 spills 8 bytes on sm_80 with 4 warps
# (odd H), none with 8.
PERSISTENT_WARPS_PROJECTION = {"16-bit": {}, "fp32": {32: 8}}
# The packed layout's persistent kernels (PACKED: per-row offsets, c before each step stored) where the padded warps
# spill: fp32 at H_pad 16 with 4 warps spilled 8 bytes on sm_90 (odd H: ptxas took 128 registers); 8 warps take 64
# forward, 48 backward, none. A projection keeps its own warps (8 at H_pad 16 spilled 8 bytes there).
PERSISTENT_WARPS_PACKED = {"16-bit": {}, "fp32": {16: 8}}
PERSISTENT_BLOCK_B = 16
# Grid kernels: every batch row in tiles of GRID_BLOCK_B, hidden units split GRID_BLOCK_H to a program, so a forward
# step's product per program and tile is one (16 × H_pad) · (H_pad × 4·GRID_BLOCK_H) GEMM with its K split over the
# warps (K_SPLIT = num_warps: a warp per K slice, see the kernel); the backward's is (16 × 4·H_pad) · (4·H_pad ×
# GRID_BLOCK_H) against W_hh's columns. H = 1024 spreads over 64 programs. Each program keeps 4 · GRID_BLOCK_H · H_pad
# of W_hh on chip (staged in shared memory): 128 KB at H_pad = 1024 in 16-bit types.
GRID_BLOCK_B = 16
GRID_BLOCK_H = 16
# The grid kernels (forward and backward) run a batch of more than GRID_BLOCK_B rows as GRID_BLOCK_B-row tiles one
# after another inside each step, against the same on-chip W_hh slice: registers and shared memory do not grow
# with B (one compiled kernel serves every B > 1), but the step's time does: each extra tile re-reads the W slice
# from shared memory (≈ 0.56 µs at H_pad 1024), where the stepwise kernels (on as many programs at B ≤ 64) stream it
# once from L2 (≈ 0.8 µs) and pay a kernel boundary per step instead of the barrier. Predicted ahead up to 2 tiles,
# even at 3, behind from 4 (docs/lstm.md, "Batches of more than 16 rows"); not yet timed.
GRID_MAX_BATCH = 48
# The largest padded H that compiles without spills on sm_90 and sm_80, for H a multiple of 16 and for other H
# (masked scalar loads of the W_hh slice take more registers): H_pad 1024 odd-size 16-bit spills 24-56 bytes,
# fp32 at 512 48-232 bytes, so those run stepwise.
GRID_MAX_HIDDEN = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 256}
GRID_MAX_HIDDEN_UNALIGNED = {torch.float16: 512, torch.bfloat16: 512, torch.float32: 256}
# Warps (= K slices) per padded hidden size: 8 everywhere (4 and 16 spill more at H_pad 1024, docs/lstm.md).
GRID_WARPS = {"16-bit": {256: 8, 512: 8, 1024: 8}, "fp32": {128: 8, 256: 8}}
# The compiled grid kernel's registers per thread and shared memory per program, by (arch, element kind, H_pad):
# the larger of the aligned and odd-size compiles of `python -m pyattn.kernels.report --op lstm` (Triton 3.8,
# this repository's toolchain). Dispatch computes the grid's occupancy from these for an assumed GPU (and for a
# real one before the launch, where the launcher then re-checks the kernel it compiled);
# tests/test_triton_compile.py checks that they bound what the compiler reports.
# Both tables hold the larger of Triton 3.8's figures (this repository's) and Triton 3.6's (the GPU machine's,
# benchmarks/compile_triton36.sh), so dispatch's occupancy check holds for either.
GRID_COMPILED = {
    (90, "16-bit", 256): (208, 66560), (90, "16-bit", 512): (234, 99328), (90, "16-bit", 1024): (234, 164864),
    (90, "fp32", 128): (122, 50176), (90, "fp32", 256): (182, 82944),
    (80, "16-bit", 256): (204, 65536), (80, "16-bit", 512): (254, 98304), (80, "16-bit", 1024): (250, 163840),
    (80, "fp32", 128): (128, 49152), (80, "fp32", 256): (128, 81920),
}

# The grid backward (W_hh's column slice on chip) by the same key, from the same report as GRID_COMPILED.
GRID_BACKWARD_COMPILED = {
    (90, "16-bit", 256): (144, 41984), (90, "16-bit", 512): (224, 82944), (90, "16-bit", 1024): (202, 164864),
    (90, "fp32", 128): (110, 41984), (90, "fp32", 256): (163, 82944),
    (80, "16-bit", 256): (152, 40960), (80, "16-bit", 512): (229, 81920), (80, "16-bit", 1024): (202, 163840),
    (80, "fp32", 128): (128, 40960), (80, "fp32", 256): (192, 81920),
}
# Warps (= K slices of each gate's rows) of the grid backward per padded hidden size: 8, but 4 for fp32, where 8
# warps spill 8 bytes (ptxas holds them at 80 registers on sm_80 at H_pad 256; at 128 with the frozen-tile skip,
# odd sizes at sm_90, 128 registers).
GRID_BACKWARD_WARPS = {"16-bit": {256: 8, 512: 8, 1024: 8}, "fp32": {128: 4, 256: 4}}

FORWARD_RECURRENCES = ("persistent", "grid", "stepwise")
BACKWARD_RECURRENCES = ("persistent", "grid", "stepwise")


def element_kind(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16-bit"


def step_config(batch: int, dtype: torch.dtype, projection: bool = False) -> tuple[int, int, int, int, int]:
    """The per-step tiles of this batch bucket; ``projection``: of a projected LSTM's step kernels."""
    bucket = next((bucket for bucket in BATCH_BUCKETS if batch <= bucket), BATCH_BUCKETS[-1])
    key = (element_kind(dtype), bucket)
    if projection and key in STEP_CONFIGS_PROJECTION:
        return STEP_CONFIGS_PROJECTION[key]
    return STEP_CONFIGS[key]


def hidden_pad(hidden_size: int) -> int:
    return max(16, triton.next_power_of_2(hidden_size))


def persistent_max_hidden(hidden_size: int, dtype: torch.dtype, proj_size: int = 0) -> int:
    """The persistent kernels' padded hidden-size limit for this H (and P: its loads are as wide), see
    PERSISTENT_MAX_HIDDEN*."""
    aligned = hidden_size % 16 == 0 and proj_size % 16 == 0
    table = PERSISTENT_MAX_HIDDEN if aligned else PERSISTENT_MAX_HIDDEN_UNALIGNED
    return table[dtype]


def persistent_weight_elements(hidden_size: int, proj_size: int = 0) -> int:
    """Padded weight elements a persistent program keeps on chip: W_hh (4H × H), or with a projection W_hh
    (4H × P) and W_hr (P × H)."""
    hidden = hidden_pad(hidden_size)
    if proj_size == 0:
        return 4 * hidden * hidden
    return 5 * hidden * hidden_pad(proj_size)


def persistent_weight_budget(hidden_size: int, dtype: torch.dtype, proj_size: int = 0) -> int:
    """The on-chip weight elements allowed: what W_hh takes at the hidden-size limit, the size that compiles
    without spills (a projected LSTM's two matrices share it)."""
    limit = persistent_max_hidden(hidden_size, dtype, proj_size)
    return 4 * limit * limit


def persistent_projection_sizes(dtype: torch.dtype, aligned: bool = True) -> list[tuple[int, int]]:
    """(padded H, padded P) the projected persistent kernels compile for: per padded H up to the limit, the
    widest padded P < H whose W_hh and W_hr fit the budget (a narrower P holds less)."""
    limit = (PERSISTENT_MAX_HIDDEN if aligned else PERSISTENT_MAX_HIDDEN_UNALIGNED)[dtype]
    sizes = []
    for hidden in persistent_hidden_sizes(dtype):
        if hidden > limit:
            continue
        proj = hidden
        while proj > 16 and 5 * hidden * proj > 4 * limit * limit:
            proj //= 2
        sizes.append((hidden, proj))
    return sizes


def persistent_hidden_sizes(dtype: torch.dtype) -> list[int]:
    """The padded hidden sizes the persistent kernels compile for: 16 up to the register limit."""
    sizes, padded = [], 16
    while padded <= PERSISTENT_MAX_HIDDEN[dtype]:
        sizes.append(padded)
        padded *= 2
    return sizes


def grid_max_hidden(hidden_size: int, dtype: torch.dtype) -> int:
    """The grid kernel's padded hidden-size limit for this H (see GRID_MAX_HIDDEN*)."""
    return (GRID_MAX_HIDDEN if hidden_size % 16 == 0 else GRID_MAX_HIDDEN_UNALIGNED)[dtype]


def grid_hidden_sizes(dtype: torch.dtype) -> list[int]:
    """The padded hidden sizes the grid kernel runs with multiple programs: past the persistent limit (where
    dispatch prefers the persistent kernel) up to GRID_MAX_HIDDEN."""
    sizes, padded = [], 2 * PERSISTENT_MAX_HIDDEN[dtype]
    while padded <= GRID_MAX_HIDDEN[dtype]:
        sizes.append(padded)
        padded *= 2
    return sizes


def step_meta(config: tuple[int, int, int, int, int]) -> dict:
    block_b, block_h, block_k, num_warps, num_stages = config
    return dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, DOT_PRECISION=DOT_PRECISION,
                num_warps=num_warps, num_stages=num_stages)


def step_backward_meta(config: tuple[int, int, int, int, int], dtype: torch.dtype) -> dict:
    """step_meta for lstm_step_backward_kernel: the tiles and the element kind's register cap, if any."""
    cap = STEP_BACKWARD_MAXNREG.get(element_kind(dtype))
    return step_meta(config) | ({"maxnreg": cap} if cap else {})


def persistent_meta(hidden_size: int, dtype: torch.dtype, proj_size: int = 0, packed: bool = False) -> dict:
    """Launch options of the persistent kernels; ``packed``: of their packed-layout form (``packed.py``)."""
    padded = hidden_pad(hidden_size)
    # num_stages=1: the software pipeliner would prefetch next step's h (or dgates) before this
    # step's stores and the barrier, reading a stale state. PROJ (padded P) is unused without a projection.
    return dict(BLOCK_B=PERSISTENT_BLOCK_B, HIDDEN=padded, PROJECTION=proj_size > 0,
                PROJ=hidden_pad(proj_size) if proj_size > 0 else 16, DOT_PRECISION=DOT_PRECISION,
                num_warps=_persistent_warps(padded, dtype, proj_size > 0, packed), num_stages=1)


def _persistent_warps(padded_hidden: int, dtype: torch.dtype, projection: bool, packed: bool = False) -> int:
    kind = element_kind(dtype)
    if projection and padded_hidden in PERSISTENT_WARPS_PROJECTION[kind]:
        return PERSISTENT_WARPS_PROJECTION[kind][padded_hidden]
    if packed and not projection and padded_hidden in PERSISTENT_WARPS_PACKED[kind]:
        return PERSISTENT_WARPS_PACKED[kind][padded_hidden]
    return PERSISTENT_WARPS[kind][padded_hidden]


def grid_meta(padded_hidden: int, block_h: int, dtype: torch.dtype) -> dict:
    """Launch options of the grid kernel; ``block_h`` is GRID_BLOCK_H on a GPU, HIDDEN for the interpreter's
    single program (whose warps do not matter)."""
    # num_stages=1 for the same reason as the persistent kernel: no load may move above the barrier.
    warps = GRID_WARPS[element_kind(dtype)].get(padded_hidden, 4)
    # One K slice per warp (a rank-3 dot gives its warps to the slice axis); slices at least 16 deep (tl.dot's K).
    k_split = min(warps, padded_hidden // 16)
    return dict(BLOCK_B=GRID_BLOCK_B, BLOCK_H=block_h, HIDDEN=padded_hidden, K_SPLIT=k_split,
                DOT_PRECISION=DOT_PRECISION, num_warps=warps, num_stages=1)


def grid_backward_meta(padded_hidden: int, block_h: int, dtype: torch.dtype) -> dict:
    """Launch options of the grid backward (as :func:`grid_meta`): K_SPLIT slices of each gate's H_pad rows, one
    per warp."""
    warps = GRID_BACKWARD_WARPS[element_kind(dtype)].get(padded_hidden, 4)
    k_split = min(warps, padded_hidden // 16)
    return dict(BLOCK_B=GRID_BLOCK_B, BLOCK_H=block_h, HIDDEN=padded_hidden, K_SPLIT=k_split,
                DOT_PRECISION=DOT_PRECISION, num_warps=warps, num_stages=1)
