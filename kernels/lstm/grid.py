"""The grid-barrier recurrences: one launch for all T steps, a tile of hidden units per program (its slice of
W_hh on chip), every batch row in 16-row tiles, and a grid barrier per step. The forward keeps W_hh's rows of its
units (the four gates interleaved); the backward through time keeps W_hh's columns of its units. Both need every
program resident at once (the launcher checks the compiled kernel's occupancy and launches cooperatively).
docs/lstm.md has the designs and when each one runs."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (add_bias, add_input_projection, add_output_gradients, forward_epilogue, gate_gradients,
                     row_schedule, store_gates, tanh)


@triton.jit
def _split_gates(pre, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_B, 4·BLOCK_H) pre-activations with gate-interleaved columns n = 4·j + q (unit j, gate q in
    i, f, g, o order) -> the four (BLOCK_B, BLOCK_H) gate tiles."""
    quads = tl.reshape(pre, (BLOCK_B, BLOCK_H, 2, 2))  # [b, j, q // 2, q % 2]
    even, odd = tl.split(quads)  # q % 2 = 0 (i, g), 1 (f, o)
    pre_i, pre_g = tl.split(even)
    pre_f, pre_o = tl.split(odd)
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def _tile_running(active, HAS_LENGTHS: tl.constexpr):
    """Whether any row of a batch tile runs at this step. A PackedSequence reaches the grid kernels padded in its
    sorted order (``stacked(..., sorted_padding=True)``), so the rows that have ended fill the last tiles, whose
    products the kernels skip: each step's tensor-core work shrinks with the active batch, a tile at a time."""
    if HAS_LENGTHS:
        return tl.max(active.to(tl.int32), axis=0) > 0
    else:
        return True


@triton.jit
def _grid_barrier(barrier_ptr, target):
    """Wait until ``target`` arrivals have reached the global counter at ``barrier_ptr`` (this program's included).

    The CTA barrier orders every thread's stores before the (one-thread, scalar) release increment; the acquire
    that sees the target orders the loads after it; the second CTA barrier holds every thread until then."""
    tl.debug_barrier()
    arrived = tl.atomic_add(barrier_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while arrived < target:
        # A compare-and-swap that never swaps (the count is never negative) reads the counter atomically; an
        # atomic add of 0 is folded away by the compiler, leaving a loop that never ends.
        arrived = tl.atomic_cas(barrier_ptr, -1, -1, sem="acquire", scope="gpu")
    tl.debug_barrier()


# B and T are not specialised: the JIT would compile B = 1 or T = 1 as constants, a kernel of its own (B = 1 spilled
# 8 bytes at bf16 H_pad 512 on sm_90), and every other B is the same runtime tile loop.
@triton.jit(do_not_specialize=["B", "T"])
def lstm_sequence_forward_grid_kernel(
    projection_ptr, w_hh_ptr, bias_ptr, lengths_ptr, h_state_ptr, c_state_ptr, c_slots,
    output_ptr, hidden_saved_ptr, gates_ptr, barrier_ptr,
    B, H, T,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, HIDDEN: tl.constexpr, K_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """All T steps for every batch row and one tile of BLOCK_H hidden units, its W_hh rows on chip.

    The step's product is one GEMM per batch tile, h_{t-1} (BLOCK_B × HIDDEN) · W_tileᵀ (HIDDEN × 4·BLOCK_H), whose
    columns interleave the four gates of the tile's units (n = 4·j + q), so the epilogue gets i, f, g, o of a unit
    from one accumulator. K is split K_SPLIT ways as the batch axis of a 3-D dot: Triton gives a rank-3
    dot's warps to that axis, so with K_SPLIT = num_warps each warp multiplies its own K slice by its own
    W slice (no warp computes another's tile, and no warp reads another's h or W), and one cross-warp sum
    adds the partial tiles. A batch of more than BLOCK_B rows runs its tiles one after another inside the
    step, against the same on-chip W slice.

    Step t needs all of h_{t-1}, written by every program: h ping-pongs between two global slots and the
    programs meet at a barrier after each step but the last (a counter in global memory, zeroed before
    launch, that reaches (t + 1) · programs once every program has stored step t). Two slots suffice: a
    program writes slot t % 2 again only after that barrier, when every read of it has completed. A
    program spins until all others arrive, so every program must be resident at once: the launcher checks
    the compiled kernel's occupancy and launches cooperatively; the interpreter, which runs programs one
    after another, gets one program (or any number for T = 1, which crosses no barrier).
    """
    N: tl.constexpr = 4 * BLOCK_H  # annotated: the interpreter too keeps them constants
    K_CHUNK: tl.constexpr = HIDDEN // K_SPLIT
    num_programs = tl.num_programs(0)
    first_unit = tl.program_id(0) * BLOCK_H
    offs_h = first_unit + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    # W_tileᵀ split along K: w[s, kk, n] = W_hh[q·H + unit j, s·K_CHUNK + kk] for n = 4·j + q; loaded once.
    offs_n = tl.arange(0, N)
    w_unit = first_unit + offs_n // 4
    w_row = (offs_n % 4) * H + w_unit
    k_3d = tl.arange(0, K_SPLIT)[:, None, None] * K_CHUNK + tl.arange(0, K_CHUNK)[None, :, None]
    w_mask = (k_3d < H) & (w_unit < H)[None, None, :]
    w = tl.load(w_hh_ptr + w_row[None, None, :] * H + k_3d, mask=w_mask, other=0.0)
    # h_{t-1} split the same way: h[s, b, kk] = h_{t-1}[b, s·K_CHUNK + kk].
    k_h = tl.arange(0, K_SPLIT)[:, None, None] * K_CHUNK + tl.arange(0, K_CHUNK)[None, None, :]
    state_size = B * H
    for step in range(0, T):
        h_in_ptr = h_state_ptr + (step % 2) * state_size
        for tile_start in range(0, B, BLOCK_B):
            offs_b = tile_start + tl.arange(0, BLOCK_B)
            b_mask = offs_b < B
            mask = b_mask[:, None] & h_mask[None, :]
            _, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
            if _tile_running(active, HAS_LENGTHS):
                # Other SMs wrote most of h_{t-1}: read it from L2 (.cg), never from a stale L1 line.
                h_prev = tl.load(h_in_ptr + offs_b[None, :, None] * H + k_h,
                                 mask=b_mask[None, :, None] & (k_h < H), other=0.0, cache_modifier=".cg")
                partial = tl.dot(h_prev, w, input_precision=DOT_PRECISION)  # (K_SPLIT, BLOCK_B, N), fp32
                recurrent = tl.sum(partial, axis=0)
            else:  # every row of the tile has ended: no product, only the epilogue's carry
                recurrent = tl.zeros((BLOCK_B, N), dtype=tl.float32)
            pre_i, pre_f, pre_g, pre_o = _split_gates(recurrent, BLOCK_B, BLOCK_H)
            pre_i, pre_f, pre_g, pre_o = add_input_projection(
                pre_i, pre_f, pre_g, pre_o, projection_ptr, time, B, H, offs_b, offs_h, mask
            )
            if HAS_BIAS:
                pre_i, pre_f, pre_g, pre_o = add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask)
            forward_epilogue(
                pre_i, pre_f, pre_g, pre_o, active, time, offs_b, offs_h, mask, B, H,
                h_in_ptr, c_state_ptr + tl.cast(step % c_slots, tl.int64) * state_size,
                h_state_ptr + ((step + 1) % 2) * state_size,
                c_state_ptr + tl.cast((step + 1) % c_slots, tl.int64) * state_size,
                output_ptr, hidden_saved_ptr, gates_ptr + tl.cast(step, tl.int64) * (4 * state_size),
                HAS_LENGTHS, True, STORE_FOR_BACKWARD, STORE_FOR_BACKWARD,
            )
        if step + 1 < T:
            # None after the last step: nothing in this launch reads h_T.
            _grid_barrier(barrier_ptr, (step + 1) * num_programs)


@triton.jit
def _grid_backward_epilogue(
    dh, step, length, active, time, offs_b, offs_h, mask, B, H, grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr,
    c_state_ptr, dgates_ptr,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
):
    """Gate gradients of one (batch tile × hidden slice) at iteration ``step`` from its recurrent dh and the
    carried dc (updated in place): ``gate_gradients`` as ``backward_epilogue``, but with tanh(c_t) from the saved
    fp32 c_t (``c_state_ptr`` slot step + 1) rather than rebuilt from gates rounded to the input dtype."""
    state_size = B * H
    state = offs_b[:, None] * H + offs_h[None, :]
    dh = add_output_gradients(dh, step, length, active, time, offs_b, offs_h, mask, B, H, grad_output_ptr,
                              grad_h_n_ptr, HAS_GRAD_OUTPUT, HAS_GRAD_H_N)
    dc_next = tl.load(dc_ptr + state, mask=mask, other=0.0)
    gate = tl.cast(step, tl.int64) * (4 * state_size) + offs_b[:, None] * (4 * H) + offs_h[None, :]
    input_gate = tl.load(gates_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    forget_gate = tl.load(gates_ptr + gate + H, mask=mask, other=0.0).to(tl.float32)
    cell_gate = tl.load(gates_ptr + gate + 2 * H, mask=mask, other=0.0).to(tl.float32)
    output_gate = tl.load(gates_ptr + gate + 3 * H, mask=mask, other=0.0).to(tl.float32)
    c_prev = tl.load(c_state_ptr + tl.cast(step, tl.int64) * state_size + state, mask=mask, other=0.0)
    c = tl.load(c_state_ptr + tl.cast(step + 1, tl.int64) * state_size + state, mask=mask, other=0.0)
    d_input_gate, d_forget_gate, d_cell_gate, d_output_gate, dc_prev = gate_gradients(
        dh, dc_next, input_gate, forget_gate, cell_gate, output_gate, c_prev, tanh(c), active, HAS_LENGTHS
    )
    tl.store(dc_ptr + state, dc_prev, mask=mask)
    store_gates(dgates_ptr, d_input_gate, d_forget_gate, d_cell_gate, d_output_gate, time * B + offs_b, offs_h, mask, H)


# B and T are not specialised: the JIT would compile B = 1 or T = 1 as constants, a kernel of its own (B = 1 spilled
# 8 bytes at bf16 H_pad 512 on sm_90), and every other B is the same runtime tile loop.
@triton.jit(do_not_specialize=["B", "T"])
def lstm_sequence_backward_grid_kernel(
    dgates_ptr, w_hh_ptr, grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_state_ptr, lengths_ptr, barrier_ptr,
    B, H, T,
    HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, HIDDEN: tl.constexpr, K_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward through time for every batch row and one slice of BLOCK_H hidden units, its W_hh columns on chip.

    The mirror of the grid forward. Iteration k (reverse time) needs dh_k = dgates_{k+1} · W_hh[:, slice]: the
    slice's recurrent gradient depends on every program's gate gradients of the iteration before, so the
    program keeps the column slice W_hh[:, slice] (4H × BLOCK_H, as four per-gate (HIDDEN × BLOCK_H) blocks),
    reads the whole dgates_{k+1} row (B × 4H) from L2 after the grid barrier, and multiplies with K = 4H split
    K_SPLIT ways per gate as the batch axis of a 3-D dot (a warp per K slice, one cross-warp sum, as the
    forward). Its epilogue forms the slice's gate gradients from dh, the output and h_n gradients, the carried
    dc (this program's own (B × slice) of ``dc_ptr``, never read by another) and the saved gates and fp32 cell
    states, and stores them into dgates in time order. dgates slots are written once (every (t, b) is one
    iteration's), so the programs need one barrier per iteration (after every one but the last) and no
    ping-pong. Batch tiles of BLOCK_B rows run one after another in each iteration. Co-residency as the
    forward: checked by the launcher, cooperative launch; one program under the interpreter (for T > 1).
    """
    K_CHUNK: tl.constexpr = HIDDEN // K_SPLIT
    num_programs = tl.num_programs(0)
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    # Gate q's block of the column slice, split along K (its H rows): w_q[s, kk, n] = W_hh[q·H + s·K_CHUNK + kk,
    # unit n]; loaded once.
    k_w = tl.arange(0, K_SPLIT)[:, None, None] * K_CHUNK + tl.arange(0, K_CHUNK)[None, :, None]
    w_mask = (k_w < H) & h_mask[None, None, :]
    w_columns = k_w * H + offs_h[None, None, :]
    w_i = tl.load(w_hh_ptr + w_columns, mask=w_mask, other=0.0)
    w_f = tl.load(w_hh_ptr + H * H + w_columns, mask=w_mask, other=0.0)
    w_g = tl.load(w_hh_ptr + 2 * H * H + w_columns, mask=w_mask, other=0.0)
    w_o = tl.load(w_hh_ptr + 3 * H * H + w_columns, mask=w_mask, other=0.0)
    # dgates_{k+1} split the same way per gate: a[s, b, kk] = dgates[time, b, q·H + s·K_CHUNK + kk].
    k_a = tl.arange(0, K_SPLIT)[:, None, None] * K_CHUNK + tl.arange(0, K_CHUNK)[None, None, :]
    for reverse_step in range(0, T):
        step = T - 1 - reverse_step
        for tile_start in range(0, B, BLOCK_B):
            offs_b = tile_start + tl.arange(0, BLOCK_B)
            b_mask = offs_b < B
            mask = b_mask[:, None] & h_mask[None, :]
            length, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
            _, _, time_next = row_schedule(step + 1, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
            # The first iteration (the last step) has no successor: its loads are masked off and dh starts at 0.
            # Other SMs wrote most of dgates_{k+1}: read it from L2 (.cg).
            a_rows = dgates_ptr + (time_next[None, :, None] * B + offs_b[None, :, None]) * (4 * H) + k_a
            a_mask = (b_mask[None, :, None] & (k_a < H)) & (step + 1 < T)
            if _tile_running(active, HAS_LENGTHS):
                partial = tl.dot(tl.load(a_rows, mask=a_mask, other=0.0, cache_modifier=".cg"), w_i,
                                 input_precision=DOT_PRECISION)  # (K_SPLIT, BLOCK_B, BLOCK_H), fp32
                partial = tl.dot(tl.load(a_rows + H, mask=a_mask, other=0.0, cache_modifier=".cg"), w_f, partial,
                                 input_precision=DOT_PRECISION)
                partial = tl.dot(tl.load(a_rows + 2 * H, mask=a_mask, other=0.0, cache_modifier=".cg"), w_g, partial,
                                 input_precision=DOT_PRECISION)
                partial = tl.dot(tl.load(a_rows + 3 * H, mask=a_mask, other=0.0, cache_modifier=".cg"), w_o, partial,
                                 input_precision=DOT_PRECISION)
                dh = tl.sum(partial, axis=0)
            else:  # every row of the tile has ended (frozen: its dh is never used)
                dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            _grid_backward_epilogue(
                dh, step, length, active, time, offs_b, offs_h, mask, B, H, grad_output_ptr,
                grad_h_n_ptr, dc_ptr, gates_ptr, c_state_ptr, dgates_ptr, HAS_LENGTHS, HAS_GRAD_OUTPUT, HAS_GRAD_H_N,
            )
        if step > 0:
            # None after the last iteration: nothing in this launch reads dgates_0 (dh_0 is a GEMM afterwards).
            _grid_barrier(barrier_ptr, (reverse_step + 1) * num_programs)
