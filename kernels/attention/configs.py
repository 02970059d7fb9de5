"""Attention launch configurations as data: the tile tables, the autotune key, and the pruning that picks a
call's share of a table. ``aot.py`` and ``pyattn.kernels.report`` read the same tables, so what the compile
test checks is what autotuning can choose (``auto_may_pick``)."""

from __future__ import annotations

import torch
import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg: the PTX register cap]) per (element kind, head-dim
# class, option class) — see ``table_key``. Found by compiling candidates, largest first, for sm_90 and sm_80 with the specialisation
# real launches get (every case of the entry: plain and causal, or every per-score option at once) and
# keeping the first that neither spill registers nor overflow the shared memory of H100 (227 KB) or A100
# (163 KB); ``python -m pyattn.kernels.report`` shows each config's figures, docs/attention.md the log. 16-bit: BLOCK_M 128 with 8 warps gives each of two warpgroups wgmma's 64 rows; "features" calls
# (mask, softcap, ALiBi, dropout: more live values per score) take smaller tiles. fp32 dots are strict IEEE
# FMA (no tensor cores): their operands are replicated across threads, so fp32 takes the smallest tiles.
FORWARD_CONFIGS = {
    ("16-bit", 64, "plain"): [(128, 128, 8, 2), (128, 64, 8, 3)],
    ("16-bit", 128, "plain"): [(128, 64, 8, 3), (64, 64, 4, 3)],
    # Triton 3.6: causal 128x64 spills 8 B at sm_80 (3 stages and 2; 210 registers with 3.8), 128x32 does not.
    ("16-bit", 128, "band"): [(128, 32, 8, 3), (64, 64, 4, 3)],
    ("16-bit", 256, "plain"): [(64, 32, 4, 2)],  # (32, 32, 4, 2) spills 8 bytes in the TMA forward
    ("16-bit", 64, "features"): [(128, 64, 8, 3)],
    ("16-bit", 128, "features"): [(128, 32, 8, 1)],  # 2 stages: 8 B of spill at sm_80 (dense-all)
    ("16-bit", 256, "features"): [(64, 32, 8, 2)],
    ("fp32", 64, "any"): [(32, 16, 4, 2)],
    # 32x16: the d96 two-block forward spills 16 B at sm_90 under Triton 3.6 (with maxnreg 255: 8 B at d128).
    ("fp32", 128, "any"): [(16, 16, 4, 2)],
    ("fp32", 256, "any"): [(32, 16, 8, 2)],
}
# dK/dV holds a key tile and loops over query tiles: long key tiles, short query tiles. On sm_90 its products
# with M = BLOCK_N and the fused dQ, formed as Kᵀ dSᵀ (M = head dim), are wgmma whatever BLOCK_M; 64-row query
# tiles fit d128 plain only: causal (the "band" entry) spills 16-32 B at 64×64 on sm_90, d64 spills 8-32 B in the
# deterministic kernel on sm_80 with any 64-row query tile.
DKDV_CONFIGS = {
    ("16-bit", 64, "plain"): [(32, 128, 8, 2), (32, 64, 4, 3)],
    ("16-bit", 128, "plain"): [(64, 64, 8, 2), (32, 64, 8, 2)],
    ("16-bit", 128, "band"): [(32, 64, 8, 2), (32, 32, 8, 2)],
    ("16-bit", 256, "plain"): [(32, 32, 8, 2), (16, 16, 4, 2)],
    ("16-bit", 64, "features"): [(64, 32, 8, 2)],
    ("16-bit", 128, "features"): [(32, 32, 8, 2)],
    # 4 warps: 8 B of spill in the fused dQ at d192 (padded to 256, masked columns) at sm_80.
    ("16-bit", 256, "features"): [(16, 16, 8, 1)],
    ("fp32", 64, "any"): [(16, 16, 4, 1)],
    ("fp32", 128, "any"): [(16, 16, 4, 2)],
    ("fp32", 256, "any"): [(16, 16, 8, 1)],
}
# dQ holds a query tile and loops over key tiles: the mirror image.
DQ_CONFIGS = {
    ("16-bit", 64, "plain"): [(128, 64, 8, 2)],  # (128, 32, 4, 3) spills 24 B at sm_80
    ("16-bit", 128, "plain"): [(128, 32, 8, 2), (64, 32, 4, 2)],
    ("16-bit", 256, "plain"): [(64, 32, 8, 2)],  # 64x32 at 4 warps spills 24 B on sm_90
    ("16-bit", 64, "features"): [(64, 32, 4, 2)],
    ("16-bit", 128, "features"): [(32, 32, 4, 2)],
    ("16-bit", 256, "features"): [(32, 32, 4, 2)],
    ("fp32", 64, "any"): [(16, 16, 4, 2)],
    ("fp32", 128, "any"): [(16, 16, 4, 2)],
    ("fp32", 256, "any"): [(16, 16, 4, 2)],
}
# Launches whose inputs are not all 16-byte aligned (a pointer or a row stride off the 16-element grid:
# ``alignment`` = 1) get no vector loads and no cp.async; the tiles arrive through registers, which the
# aligned tables' largest configs cannot spare. These entries replace the aligned ones for such launches;
# the other entries serve both. An optional fifth element is the PTX register cap (``.maxnreg``, Triton's
# ``maxnreg``): without one, ptxas may aim a 256-thread kernel at two CTAs per SM (128 registers) and spill.
FORWARD_UNALIGNED_CONFIGS = {
    ("16-bit", 64, "plain"): [(128, 128, 8, 2)],
    ("16-bit", 128, "plain"): [(64, 32, 8, 2)],  # 4 warps: 255 registers, 8 B of spill at sm_80 with Triton 3.6
    ("16-bit", 128, "band"): [(64, 32, 8, 2)],
    ("16-bit", 256, "plain"): [(32, 32, 4, 2)],
    ("16-bit", 64, "features"): [(32, 32, 4, 2)],
    ("16-bit", 128, "features"): [(32, 32, 4, 2)],
    ("16-bit", 256, "features"): [(32, 32, 4, 2)],
    ("fp32", 64, "any"): [(16, 16, 4, 2)],
    ("fp32", 128, "any"): [(16, 16, 4, 2)],
    # 4 warps spill 8 B at sm_90 under Triton 3.6 (168 registers; with maxnreg 255: 255 registers and 8 B).
    ("fp32", 256, "any"): [(16, 16, 8, 2)],
}
DKDV_UNALIGNED_CONFIGS = {
    ("16-bit", 64, "plain"): [(16, 16, 4, 2)],
    ("16-bit", 128, "plain"): [(16, 16, 4, 2)],
    ("16-bit", 128, "band"): [(16, 16, 4, 1)],  # plain's 2 stages: 16 B of spill (dK/dV at sm_90, Triton 3.6)
    ("16-bit", 256, "plain"): [(16, 16, 8, 2)],
    ("16-bit", 64, "features"): [(32, 32, 8, 2)],
    ("16-bit", 128, "features"): [(16, 16, 8, 2)],
    ("16-bit", 256, "features"): [(16, 16, 8, 1)],
    # maxnreg 255: ptxas otherwise holds these 8-warp kernels at 128 registers (two CTAs per SM) at sm_90 and spills a
    # few loop-invariant words: d128's fused dQ 16 B (Triton 3.8 and 3.6), d64's 8 B and d256's dK/dV 8 B (3.6);
    # with the cap they take what they need (d128 fused: 204) and spill nothing, one CTA per SM.
    ("fp32", 64, "any"): [(16, 16, 8, 2, 255)],  # 1 stage: 24 B of spill in the fused dQ at sm_90 since the GQA split
    # 8 warps: 8 B of spill in d96's fused dQ at sm_90 (the column masks of a head dim padded to 128).
    ("fp32", 128, "any"): [(16, 16, 4, 1, 255)],
    ("fp32", 256, "any"): [(16, 16, 8, 1, 255)],
}
DQ_UNALIGNED_CONFIGS = {
    ("16-bit", 64, "plain"): [(64, 32, 8, 2)],  # 4 warps: 8 B of spill at sm_80
    ("16-bit", 128, "plain"): [(32, 32, 4, 2)],
    ("16-bit", 256, "plain"): [(32, 32, 4, 2)],
    ("16-bit", 64, "features"): [(64, 32, 4, 2)],
    # The aligned (16, 16, 4, 2): d96 spills 16 B (128 registers, sm_90 and sm_80); 8 warps with the cap: none.
    ("fp32", 128, "any"): [(16, 16, 8, 2, 255)],
}
# The warp-specialised forward (forward_ws.py, Hopper, 16-bit, power-of-two head dims, no per-score options): per
# head-dim class, (BLOCK_M, BLOCK_N, num_warps, num_stages) with num_warps per partition (Triton's Hopper pass
# specialises 4-warp partitions only: a producer and two consumer warp groups, 12 warps in all). Compiled for
# sm_90 under Triton 3.8 and 3.6: no spill, each partition's registers set by setmaxnreg; shared memory 67-198 KB.
# d256 keeps 64x64: 230.9 KB, within an H100's 232,448-byte opt-in; 128x64 needs 264 KB and 128x128 spills.
FORWARD_WS_CONFIGS = {
    64: [(128, 128, 4, 3), (128, 64, 4, 3)],
    128: [(128, 64, 4, 2), (128, 128, 4, 2), (128, 64, 4, 3)],
    256: [(64, 64, 4, 2)],
}
WS_TUNING_KEY = ["seqlen_q_bucket", "seqlen_k_bucket", "group_size", "HEAD_DIM", "HEAD_DIM_V", "HAS_WINDOW_RIGHT",
                 "MASK_KEYS"]


def forward_ws_configs(head_dim: int, head_dim_v: int) -> list[tuple]:
    """The warp-specialised forward's configs for a call's head dims (powers of two in 64..256)."""
    return list(FORWARD_WS_CONFIGS[head_dim_class(head_dim, head_dim_v)])


def _ws_pruner(configs, named_args, **kwargs):
    arguments = {**named_args, **kwargs}
    wanted = set(forward_ws_configs(arguments["HEAD_DIM"], arguments["HEAD_DIM_V"]))
    chosen = [c for c in configs if config_entry(c) in wanted]
    return _fitting(chosen, arguments["seqlen_q_bucket"], arguments["seqlen_k_bucket"])


def autotuned_ws(kernel, *, interpreter: bool):
    """The warp-specialised forward autotuned over FORWARD_WS_CONFIGS (a GPU) or the interpreter's config."""
    if interpreter:
        candidates = [_config(*INTERPRETER_CONFIG)]
    else:
        unique = dict.fromkeys(entry for entries in FORWARD_WS_CONFIGS.values() for entry in entries)
        candidates = [_config(*entry) for entry in unique]
    return triton.autotune(configs=candidates, key=WS_TUNING_KEY,
                           prune_configs_by=None if interpreter else {"early_config_prune": _ws_pruner})(kernel)


TABLES = {"forward": (FORWARD_CONFIGS, FORWARD_UNALIGNED_CONFIGS), "dkdv": (DKDV_CONFIGS, DKDV_UNALIGNED_CONFIGS),
          "dq": (DQ_CONFIGS, DQ_UNALIGNED_CONFIGS)}
ALIGNED, UNALIGNED = 16, 1  # the launchers' ``alignment`` argument

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
TUNING_KEY = ["seqlen_q_bucket", "seqlen_k_bucket", "alignment", "group_size", "HEAD_DIM", "HEAD_DIM_V", "IS_VARLEN",
              "MASK_KIND", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_WINDOW_LEFT", "HAS_WINDOW_RIGHT", "HAS_DROPOUT",
              "ALIGN_TO_END", "DOT_PRECISION", "FOLD_SCALE", "TRANSPOSED_DQ"]
# Everything that changes the compiled kernel is in the key (the dtypes enter through the tensors), so a
# tuned choice is never reused for a kernel it was not measured on; the GQA group changes dK/dV's loop. Names a
# kernel lacks (FOLD_SCALE: the forward's; TRANSPOSED_DQ: dK/dV's) are skipped by the autotuner.

HEAD_DIM_CLASSES = (64, 128, 256)

# GQA dK/dV: a program per (key tile, kv head, batch) sums its group's query heads in registers, which leaves MQA
# and small batches with fewer programs than the GPU has SMs. Then each program takes a slice of the group and
# writes an fp32 partial dK/dV that the launcher sums over the slices (a fixed-order sum: deterministic), at the
# cost of (group / heads per program) fp32 copies of dK and dV. Slices are cut so that a launch has at least
# DKDV_PROGRAMS_PER_SM programs per SM, counting key tiles at DKDV_NOMINAL_BLOCK_N (the largest 16-bit tile,
# so the estimate errs toward splitting). Launches on the interpreter or on meta tensors count an H100's SMs.
DKDV_PROGRAMS_PER_SM = 2
DKDV_NOMINAL_BLOCK_N = 128
NOMINAL_SM_COUNT = 132


def dkdv_heads_per_program(group_size: int, batch: int, kv_heads: int, seqlen_k: int, sm_count: int) -> int:
    """Query heads of a GQA group one dK/dV program sums: the whole group, unless too few programs fill the GPU."""
    programs = max(1, batch * kv_heads * triton.cdiv(seqlen_k, DKDV_NOMINAL_BLOCK_N))
    splits = min(group_size, triton.cdiv(DKDV_PROGRAMS_PER_SM * sm_count, programs))
    return triton.cdiv(group_size, max(1, splits))


def seqlen_bucket(seqlen: int) -> int:
    """The tuning bucket of a length: the next power of two, at least 16 (so its kernel argument is always
    divisible by 16 and never 1, and the JIT compiles a single specialisation of it)."""
    return triton.next_power_of_2(max(int(seqlen), 16))


def element_kind(dtype: torch.dtype) -> str:
    """"16-bit" (fp16, bf16: tensor-core dots) or "fp32" (strict IEEE FMA dots, or TF32 when allowed)."""
    return "fp32" if dtype == torch.float32 else "16-bit"


def head_dim_class(head_dim_padded: int, head_dim_v_padded: int) -> int:
    width = max(head_dim_padded, head_dim_v_padded)
    return next(limit for limit in HEAD_DIM_CLASSES if width <= limit)


def option_class(*, mask_kind: int, has_softcap: bool, has_alibi: bool, has_dropout: bool,
                 has_window: bool = False) -> str:
    """"features" when a call adds per-score work (mask loads, softcap's tanh, ALiBi, Philox); else "band" for
    causal and sliding windows, which only move loop bounds and add the edge tiles' compare (a table without a
    "band" entry serves them from "plain": ``table_key``); else "plain"."""
    if mask_kind or has_softcap or has_alibi or has_dropout:
        return "features"
    return "band" if has_window else "plain"


def table_key(dtype: torch.dtype, head_dim_padded: int, head_dim_v_padded: int, *, table_name: str | None = None,
              **options) -> tuple[str, int, str]:
    """(element kind, head-dim class, option class); fp32 entries serve every option set ("any"): their tiles
    are already the smallest, and the same with every option on. With ``table_name``: the entry of that table
    that serves the call ("band" falls back to "plain" where the table has no "band" entry)."""
    kind = element_kind(dtype)
    options_class = "any" if kind == "fp32" else option_class(**options)
    key = kind, head_dim_class(head_dim_padded, head_dim_v_padded), options_class
    if table_name is not None and options_class == "band" and key not in TABLES[table_name][0]:
        key = kind, key[1], "plain"
    return key


def table_configs(table_name: str, dtype: torch.dtype, head_dim_padded: int, head_dim_v_padded: int, *,
                  alignment: int, mask_kind: int, has_softcap: bool, has_alibi: bool,
                  has_dropout: bool, has_window: bool) -> list[tuple]:
    """The configs autotuning may choose among for a call (before the length filter): its entry of the
    ``table_name`` ("forward", "dkdv", "dq") tables, the unaligned override where ``alignment`` is not 16."""
    aligned_table, unaligned_table = TABLES[table_name]
    key = table_key(dtype, head_dim_padded, head_dim_v_padded, table_name=table_name, mask_kind=mask_kind,
                    has_softcap=has_softcap, has_alibi=has_alibi, has_dropout=has_dropout, has_window=has_window)
    if alignment != ALIGNED and key in unaligned_table:
        return list(unaligned_table[key])
    return list(aligned_table[key])


def _config(block_m: int, block_n: int, num_warps: int, num_stages: int, maxnreg: int | None = None,
            pre_hook=None) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages,
                         maxnreg=maxnreg, pre_hook=pre_hook)


def config_entry(config: triton.Config) -> tuple[int, ...]:
    """The table entry of ``config``: (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg])."""
    tiles = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    return tiles if config.maxnreg is None else tiles + (config.maxnreg,)


def _argument_dtype(arg) -> torch.dtype:
    base = getattr(arg, "base", None)  # a TensorDescriptor: the dtype is its tensor's
    return base.dtype if isinstance(base, torch.Tensor) else arg.dtype


def _fitting(chosen: list, longest_q: int, longest_k: int) -> list:
    """The configs whose tiles do not dwarf the sequences. A short sequence may fit none: then the smallest tiles
    of the entry still run correctly."""
    fitting = [c for c in chosen if c.kwargs["BLOCK_M"] <= longest_q and c.kwargs["BLOCK_N"] <= longest_k]
    return fitting or [min(chosen, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def config_pruner(table_name: str):
    """Keep the configs of the call's table entry whose tiles do not dwarf the sequences."""

    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}  # Triton passes the positional arguments and the constexprs apart
        wanted = set(table_configs(table_name, _argument_dtype(arguments["Q"]), arguments["HEAD_DIM_PADDED"],
                                   arguments["HEAD_DIM_V_PADDED"], alignment=arguments["alignment"],
                                   mask_kind=arguments["MASK_KIND"], has_softcap=arguments["HAS_SOFTCAP"],
                                   has_alibi=arguments["HAS_ALIBI"], has_dropout=arguments["HAS_DROPOUT"],
                                   has_window=arguments["HAS_WINDOW_LEFT"] or arguments["HAS_WINDOW_RIGHT"]))
        chosen = [c for c in configs if config_entry(c) in wanted]
        longest_q, longest_k = arguments["seqlen_q_bucket"], arguments["seqlen_k_bucket"]
        return _fitting(chosen, longest_q, longest_k)

    return prune


def autotune_configs(table_name: str, *, interpreter: bool, pre_hook=None) -> list[triton.Config]:
    if interpreter:
        return [_config(*INTERPRETER_CONFIG, pre_hook=pre_hook)]
    unique = dict.fromkeys(entry for table in TABLES[table_name] for entries in table.values() for entry in entries)
    return [_config(*entry, pre_hook=pre_hook) for entry in unique]


def autotuned(kernel, table_name: str, *, interpreter: bool, reset_to_zero=None, pre_hook=None):
    """``kernel`` autotuned over its tables (a GPU) or over the single interpreter config (nothing to tune:
    Triton's autotuner neither benchmarks nor prunes a single config)."""
    return triton.autotune(configs=autotune_configs(table_name, interpreter=interpreter, pre_hook=pre_hook),
                           key=TUNING_KEY, prune_configs_by={"early_config_prune": config_pruner(table_name)},
                           reset_to_zero=reset_to_zero)(kernel)
