"""Attention launch configurations as data: the tile tables, the autotune key, and the pruning that picks a
call's share of a table. ``aot.py`` and ``pyattn.kernels.report`` read the same tables, so what the compile
test checks is what autotuning can choose (``auto_may_pick``)."""

from __future__ import annotations

import torch
import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per tile-width class: the larger padded head dim of q/k and
# v in 16-bit units (fp32 counts double: its rows take the bytes of a 16-bit head dim twice as wide).
# Chosen for H100 (BLOCK_M 128 feeds wgmma's 64-row granularity with 4-8 warps); wider classes shrink
# tiles and stages so the buffers fit the shared memory of both H100 (227 KB) and A100 (163 KB).
FORWARD_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 64, 4, 3), (128, 128, 8, 2)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2)],
    512: [(64, 32, 4, 1), (32, 32, 4, 2)],
}
# dK/dV holds a key tile and loops over query tiles: large BLOCK_N, small BLOCK_M.
DKDV_CONFIGS = {
    64: [(32, 128, 4, 3), (64, 128, 8, 2)],
    128: [(32, 128, 8, 2), (64, 128, 8, 2)],
    256: [(32, 64, 4, 2), (16, 64, 4, 2)],
    512: [(16, 32, 4, 1), (16, 32, 4, 2)],
}
# dQ holds a query tile and loops over key tiles: the mirror image.
DQ_CONFIGS = {
    64: [(128, 32, 4, 3), (128, 64, 8, 2)],
    128: [(128, 32, 8, 2), (128, 64, 8, 2)],
    256: [(64, 32, 4, 2), (64, 16, 4, 2)],
    512: [(32, 16, 4, 1), (32, 16, 4, 2)],
}
TABLES = {"forward": FORWARD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}

# The interpreter runs each program in Python: one small config, and tiles small enough that the
# tests' short sequences still cross several tiles (edges, interiors, ragged ends).
INTERPRETER_CONFIG = (16, 16, 1, 1)
# Untuned single-config kernels: (BLOCK_M, num_warps, num_stages) on a GPU; the interpreter's BLOCK_M.
PREPROCESS_CONFIG = (64, 4, 1)
INTERPRETER_PREPROCESS_BLOCK_M = 16
KEEP_MASK_CONFIG = (64, 64, 4, 1)  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
INTERPRETER_KEEP_MASK_BLOCK = 16

# Lengths enter the key as power-of-two buckets (kernel arguments the kernel itself ignores): varlen training
# with a new max length each step would otherwise re-tune (benchmark runs, host syncs, no CUDA-graph capture)
# nearly every step, and lengths within a bucket prune to the same configs.
TUNING_KEY = ["seqlen_q_bucket", "seqlen_k_bucket", "HEAD_DIM", "HEAD_DIM_V", "IS_VARLEN", "MASK_KIND", "HAS_DROPOUT",
              "DOT_PRECISION"]


def seqlen_bucket(seqlen: int) -> int:
    """The tuning bucket of a length: the next power of two, at least 16 (so its kernel argument is always
    divisible by 16 and never 1, and the JIT compiles a single specialisation of it)."""
    return triton.next_power_of_2(max(int(seqlen), 16))


def tile_width_class(dtype: torch.dtype, head_dim_padded: int, head_dim_v_padded: int) -> int:
    width = max(head_dim_padded, head_dim_v_padded) * dtype.itemsize // 2
    return next(limit for limit in sorted(FORWARD_CONFIGS) if width <= limit)


def table_configs(table: dict, dtype: torch.dtype, head_dim_padded: int, head_dim_v_padded: int) -> list[tuple]:
    """The entries of ``table`` that autotuning may choose among for a call (before the length filter)."""
    return list(table[tile_width_class(dtype, head_dim_padded, head_dim_v_padded)])


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int, pre_hook=None) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=pre_hook)


def _entry(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _argument_dtype(arg) -> torch.dtype:
    base = getattr(arg, "base", None)  # a TensorDescriptor: the dtype is its tensor's
    return base.dtype if isinstance(base, torch.Tensor) else arg.dtype


def config_pruner(table: dict):
    """Keep the configs of the call's tile-width class whose tiles do not dwarf the sequences."""

    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}  # Triton passes the positional arguments and the constexprs apart
        wanted = set(table_configs(table, _argument_dtype(arguments["Q"]), arguments["HEAD_DIM_PADDED"],
                                   arguments["HEAD_DIM_V_PADDED"]))
        chosen = [c for c in configs if _entry(c) in wanted]
        longest_q, longest_k = arguments["seqlen_q_bucket"], arguments["seqlen_k_bucket"]
        fitting = [c for c in chosen if c.kwargs["BLOCK_M"] <= longest_q and c.kwargs["BLOCK_N"] <= longest_k]
        # A short sequence may fit no config: then the smallest tiles of the class still run correctly.
        return fitting or [min(chosen, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


def autotune_configs(table: dict, *, interpreter: bool, pre_hook=None) -> list[triton.Config]:
    if interpreter:
        return [_config(*INTERPRETER_CONFIG, pre_hook=pre_hook)]
    unique = dict.fromkeys(entry for entries in table.values() for entry in entries)
    return [_config(*entry, pre_hook=pre_hook) for entry in unique]


def autotuned(kernel, table: dict, *, interpreter: bool, reset_to_zero=None, pre_hook=None):
    """``kernel`` autotuned over ``table`` (a GPU) or over the single interpreter config (nothing to tune:
    Triton's autotuner neither benchmarks nor prunes a single config)."""
    return triton.autotune(configs=autotune_configs(table, interpreter=interpreter, pre_hook=pre_hook),
                           key=TUNING_KEY, prune_configs_by={"early_config_prune": config_pruner(table)},
                           reset_to_zero=reset_to_zero)(kernel)
