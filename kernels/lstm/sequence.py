"""The layer recurrence: per step (one launch per step), persistent (one launch, a batch tile per program,
W_hh in registers) and the persistent backward through time; the grid-barrier forward and backward are in
``grid.py``. docs/lstm.md has the designs and when each one runs."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (accumulate_a_wt, accumulate_gates, add_bias, add_input_projection, add_output_gradients,
                     backward_epilogue, forward_epilogue, load_gate_block, load_weight_block, projected_forward_epilogue,
                     projection_epilogue, row_schedule)

# The packed layout's helpers (rows at offsets[t] + b, see common.py).
from .common import (add_input_projection_at, add_output_gradients_at, backward_epilogue_at,
                     forward_epilogue_at, projected_forward_epilogue_at, projection_epilogue_at, time_rows)


# ``step`` changes every launch: specialising on it (== 1, % 16 == 0) would compile three kernels.
@triton.jit(do_not_specialize=["step"])
def lstm_sequence_step_forward_kernel(
    projection_ptr, w_hh_ptr, bias_ptr, lengths_ptr, h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr,
    output_ptr, hidden_saved_ptr, gates_ptr, cell_output_ptr,
    step, B, H, P, T,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    PROJECTION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    offsets_ptr=None, cell_saved_ptr=None, PACKED: tl.constexpr = False,
):
    """Iteration ``step`` of the recurrence for one tile: h_prev W_hhᵀ fused with the gate update.

    With ``PROJECTION`` the recurrent state is r (B × P, W_hh is 4H × P) and this launch ends at
    m = σ(o)·tanh(c), written to ``cell_output_ptr`` (B × H); ``lstm_sequence_step_projection_kernel``
    then forms r = m·W_hrᵀ (it needs every hidden unit of m, which this grid splits over programs).

    ``PACKED`` (the packed layout, common.py): the batch is sorted by length and B is this step's active
    count batch_sizes[step], so the grid covers only active rows; projection, output, h before the step, the
    gates and (``cell_saved_ptr``) c before the step live at rows offsets[t] + b; ``lengths_ptr`` (sorted)
    gives each row's reversed time.
    """
    FREEZE: tl.constexpr = HAS_LENGTHS and not PACKED  # packed: every row of the launch is active
    SAVE_CELL: tl.constexpr = STORE_FOR_BACKWARD and PACKED
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    _, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
    rows = time_rows(time, offs_b, B, offsets_ptr, PACKED)
    if PACKED:
        gate_rows = rows  # gates in time order at the packed rows
    else:
        gate_rows = offs_b  # gates_ptr is this iteration's (B, 4H) slot
    pre_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    pre_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    pre_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    pre_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if PROJECTION:
        pre_i, pre_f, pre_g, pre_o = accumulate_gates(
            pre_i, pre_f, pre_g, pre_o, h_in_ptr, w_hh_ptr, P, H, offs_b, b_mask, offs_h, h_mask, BLOCK_K,
            DOT_PRECISION
        )
    else:
        pre_i, pre_f, pre_g, pre_o = accumulate_gates(
            pre_i, pre_f, pre_g, pre_o, h_in_ptr, w_hh_ptr, H, H, offs_b, b_mask, offs_h, h_mask, BLOCK_K,
            DOT_PRECISION
        )
    pre_i, pre_f, pre_g, pre_o = add_input_projection_at(
        pre_i, pre_f, pre_g, pre_o, projection_ptr, rows, H, offs_h, mask
    )
    if HAS_BIAS:
        pre_i, pre_f, pre_g, pre_o = add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask)
    if PROJECTION:
        projected_forward_epilogue_at(
            pre_i, pre_f, pre_g, pre_o, active, rows, gate_rows, offs_b, offs_h, mask, H, c_in_ptr, c_out_ptr,
            cell_output_ptr, gates_ptr, cell_saved_ptr, FREEZE, True, STORE_FOR_BACKWARD, SAVE_CELL,
        )
    else:
        forward_epilogue_at(
            pre_i, pre_f, pre_g, pre_o, active, rows, gate_rows, offs_b, offs_h, mask, H,
            h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr, output_ptr, hidden_saved_ptr, gates_ptr, cell_saved_ptr,
            FREEZE, True, STORE_FOR_BACKWARD, STORE_FOR_BACKWARD, SAVE_CELL,
        )


@triton.jit(do_not_specialize=["step"])
def lstm_sequence_step_projection_kernel(
    cell_output_ptr, w_hr_ptr, lengths_ptr, h_in_ptr, h_out_ptr, output_ptr, hidden_saved_ptr,
    step, B, H, P, T,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    offsets_ptr=None, PACKED: tl.constexpr = False,
):
    """The projection of iteration ``step`` for a (BLOCK_B × BLOCK_H) tile of r: r = m·W_hrᵀ (K = H), m written
    by this step's ``lstm_sequence_step_forward_kernel``; stores output, the next state and r_{t-1}
    (``PACKED``: B active rows, output and r_{t-1} at the packed rows, as the gate launch)."""
    FREEZE: tl.constexpr = HAS_LENGTHS and not PACKED
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_p = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_mask, p_mask = offs_b < B, offs_p < P
    _, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
    r = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    r = accumulate_a_wt(r, cell_output_ptr, offs_b, b_mask, H, w_hr_ptr, offs_p, p_mask, BLOCK_K, DOT_PRECISION)
    projection_epilogue_at(
        r, active, time_rows(time, offs_b, B, offsets_ptr, PACKED), offs_b, offs_p, b_mask[:, None] & p_mask[None, :],
        P, h_in_ptr, h_out_ptr, output_ptr, hidden_saved_ptr, FREEZE, STORE_FOR_BACKWARD,
    )


@triton.jit
def _persistent_step(
    h_prev, w_i, w_f, w_g, w_o, projection_ptr, bias_ptr, h_state_ptr, c_state_ptr, c_slots, output_ptr,
    hidden_saved_ptr, gates_ptr, cell_saved_ptr, step, active, rows, offs_b, offs_h, mask, h_mask, B, H,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One step of the persistent forwards: h_{t-1}·W_hhᵀ with W_hh on chip, then the fused gate update
    into the ping-pong h slots, the cell-state slots and (training) the saved gates (``PACKED``: gates and c
    before the step at the packed ``rows``; ``mask`` then holds only active rows)."""
    state_size = B * H
    pre_i = tl.dot(h_prev, w_i, input_precision=DOT_PRECISION)
    pre_f = tl.dot(h_prev, w_f, input_precision=DOT_PRECISION)
    pre_g = tl.dot(h_prev, w_g, input_precision=DOT_PRECISION)
    pre_o = tl.dot(h_prev, w_o, input_precision=DOT_PRECISION)
    pre_i, pre_f, pre_g, pre_o = add_input_projection_at(
        pre_i, pre_f, pre_g, pre_o, projection_ptr, rows, H, offs_h, mask
    )
    if HAS_BIAS:
        pre_i, pre_f, pre_g, pre_o = add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask)
    if PACKED:
        gates_step_ptr = gates_ptr
        gate_rows = rows
    else:
        gates_step_ptr = gates_ptr + tl.cast(step, tl.int64) * (4 * state_size)
        gate_rows = offs_b
    forward_epilogue_at(
        pre_i, pre_f, pre_g, pre_o, active, rows, gate_rows, offs_b, offs_h, mask, H,
        h_state_ptr + (step % 2) * state_size, c_state_ptr + tl.cast(step % c_slots, tl.int64) * state_size,
        h_state_ptr + ((step + 1) % 2) * state_size,
        c_state_ptr + tl.cast((step + 1) % c_slots, tl.int64) * state_size,
        output_ptr, hidden_saved_ptr, gates_step_ptr, cell_saved_ptr,
        HAS_LENGTHS and not PACKED, True, STORE_FOR_BACKWARD, STORE_FOR_BACKWARD, STORE_FOR_BACKWARD and PACKED,
    )


@triton.jit
def _persistent_projected_step(
    r_prev, w_i, w_f, w_g, w_o, w_hr, projection_ptr, bias_ptr, h_state_ptr, c_state_ptr, c_slots, output_ptr,
    hidden_saved_ptr, gates_ptr, cell_saved_ptr, step, active, rows, offs_b, offs_h, offs_p, mask, mask_p, h_mask,
    B, H, P,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr, PACKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One step of the persistent forward with a projection: r_{t-1}·W_hhᵀ, the gate update, then
    r_t = m_t·W_hrᵀ with both matrices on chip; m_t never leaves the program."""
    state_size = B * H
    recurrent_size = B * P
    pre_i = tl.dot(r_prev, w_i, input_precision=DOT_PRECISION)
    pre_f = tl.dot(r_prev, w_f, input_precision=DOT_PRECISION)
    pre_g = tl.dot(r_prev, w_g, input_precision=DOT_PRECISION)
    pre_o = tl.dot(r_prev, w_o, input_precision=DOT_PRECISION)
    pre_i, pre_f, pre_g, pre_o = add_input_projection_at(
        pre_i, pre_f, pre_g, pre_o, projection_ptr, rows, H, offs_h, mask
    )
    if HAS_BIAS:
        pre_i, pre_f, pre_g, pre_o = add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask)
    if PACKED:
        gates_step_ptr = gates_ptr
        gate_rows = rows
    else:
        gates_step_ptr = gates_ptr + tl.cast(step, tl.int64) * (4 * state_size)
        gate_rows = offs_b
    m = projected_forward_epilogue_at(
        pre_i, pre_f, pre_g, pre_o, active, rows, gate_rows, offs_b, offs_h, mask, H,
        c_state_ptr + tl.cast(step % c_slots, tl.int64) * state_size,
        c_state_ptr + tl.cast((step + 1) % c_slots, tl.int64) * state_size,
        gates_ptr, gates_step_ptr, cell_saved_ptr,
        HAS_LENGTHS and not PACKED, False, STORE_FOR_BACKWARD, STORE_FOR_BACKWARD and PACKED,
    )
    # m is rounded to the weights' dtype for the product, as h is between steps without a projection.
    r = tl.dot(m.to(w_hr.dtype), w_hr, input_precision=DOT_PRECISION)
    projection_epilogue_at(
        r, active, rows, offs_b, offs_p, mask_p, P, h_state_ptr + (step % 2) * recurrent_size,
        h_state_ptr + ((step + 1) % 2) * recurrent_size, output_ptr, hidden_saved_ptr,
        HAS_LENGTHS and not PACKED, STORE_FOR_BACKWARD,
    )


@triton.jit
def lstm_sequence_forward_persistent_kernel(
    projection_ptr, w_hh_ptr, w_hr_ptr, bias_ptr, lengths_ptr, h_state_ptr, c_state_ptr, c_slots,
    output_ptr, hidden_saved_ptr, gates_ptr,
    B, H, P, T,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    PROJECTION: tl.constexpr,
    BLOCK_B: tl.constexpr, HIDDEN: tl.constexpr, PROJ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    offsets_ptr=None, cell_saved_ptr=None, PACKED: tl.constexpr = False,
):
    """All T steps for one batch tile and every hidden unit, W_hhᵀ resident in registers.

    ``PACKED`` (the packed layout, common.py; rows sorted by length): the program runs only as many steps as
    its tile's longest row (its first), reversed each row from its own last step; a row past its length is
    masked out of every load and store (its state stays in the slot its last step wrote), and gates and
    (``cell_saved_ptr``) c before each step go to the packed rows, with ``c_slots`` = 2.

    A program only ever reads state rows it wrote itself, so no program waits for another; the
    barrier per step orders this program's global stores of h before its threads read them back.
    h ping-pongs between two slots; c uses ``c_slots`` slots (T + 1 when backward needs them all).
    With ``PROJECTION`` the state is r (B × P, padded to PROJ): W_hhᵀ (P × 4H) and W_hrᵀ (H × P) both
    stay on chip, and the slots and outputs are P wide; without it P and PROJ are unused.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, HIDDEN)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    if PROJECTION:
        offs_p = tl.arange(0, PROJ)
        mask_p = b_mask[:, None] & (offs_p < P)[None, :]
        # Gate q's (PROJ, HIDDEN) block of W_hhᵀ and the (HIDDEN, PROJ) W_hrᵀ, loaded once.
        w_i = load_weight_block(w_hh_ptr, 0, H, P, offs_p, offs_h, True)
        w_f = load_weight_block(w_hh_ptr, H, H, P, offs_p, offs_h, True)
        w_g = load_weight_block(w_hh_ptr, 2 * H, H, P, offs_p, offs_h, True)
        w_o = load_weight_block(w_hh_ptr, 3 * H, H, P, offs_p, offs_h, True)
        w_hr = load_weight_block(w_hr_ptr, 0, P, H, offs_h, offs_p, True)
        recurrent = offs_b[:, None] * P + offs_p[None, :]
        recurrent_size = B * P
    else:
        w_i = load_gate_block(w_hh_ptr, 0, H, offs_h, offs_h, True)
        w_f = load_gate_block(w_hh_ptr, H, H, offs_h, offs_h, True)
        w_g = load_gate_block(w_hh_ptr, 2 * H, H, offs_h, offs_h, True)
        w_o = load_gate_block(w_hh_ptr, 3 * H, H, offs_h, offs_h, True)
        state = offs_b[:, None] * H + offs_h[None, :]
        state_size = B * H
    steps = T
    if PACKED:
        steps = tl.load(lengths_ptr + tl.program_id(0) * BLOCK_B).to(tl.int32)  # the tile's longest row
    for step in range(0, steps):
        _, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        rows = time_rows(time, offs_b, B, offsets_ptr, PACKED)
        if PACKED:
            step_mask = mask & active[:, None]
        else:
            step_mask = mask
        if PROJECTION:
            if PACKED:
                step_mask_p = mask_p & active[:, None]
            else:
                step_mask_p = mask_p
            r_prev = tl.load(h_state_ptr + (step % 2) * recurrent_size + recurrent, mask=step_mask_p, other=0.0)
            _persistent_projected_step(
                r_prev, w_i, w_f, w_g, w_o, w_hr, projection_ptr, bias_ptr, h_state_ptr, c_state_ptr, c_slots,
                output_ptr, hidden_saved_ptr, gates_ptr, cell_saved_ptr, step, active, rows, offs_b, offs_h, offs_p,
                step_mask, step_mask_p, h_mask, B, H, P, HAS_BIAS, HAS_LENGTHS, STORE_FOR_BACKWARD, PACKED,
                DOT_PRECISION,
            )
        else:
            h_in_ptr = h_state_ptr + (step % 2) * state_size
            h_prev = tl.load(h_in_ptr + state, mask=step_mask, other=0.0)
            _persistent_step(
                h_prev, w_i, w_f, w_g, w_o, projection_ptr, bias_ptr, h_state_ptr, c_state_ptr, c_slots, output_ptr,
                hidden_saved_ptr, gates_ptr, cell_saved_ptr, step, active, rows, offs_b, offs_h, step_mask, h_mask,
                B, H, HAS_BIAS, HAS_LENGTHS, STORE_FOR_BACKWARD, PACKED, DOT_PRECISION,
            )
        tl.debug_barrier()


@triton.jit
def lstm_sequence_backward_persistent_kernel(
    dgates_ptr, dr_ptr, w_hh_ptr, w_hr_ptr, grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_state_ptr,
    lengths_ptr,
    B, H, P, T,
    HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    PROJECTION: tl.constexpr,
    BLOCK_B: tl.constexpr, HIDDEN: tl.constexpr, PROJ: tl.constexpr, DOT_PRECISION: tl.constexpr,
    offsets_ptr=None, PACKED: tl.constexpr = False,
):
    """All T steps of backward through time for one batch tile, W_hh resident in registers.

    ``PACKED`` (as the forward): the tile's own steps only, inactive rows masked out; dgates, the output
    gradient, the saved gates, ``c_state_ptr`` (c before each step) and dr at the packed rows.

    As in the forward, a program reads back only the dgates rows it wrote, after a barrier.
    With ``PROJECTION`` the recurrent product gives dr = dgates_{t+1}·W_hh (P wide); the output and h_n
    gradients join it there, it is stored per iteration (zero past a row's length) for dW_hr, and
    dm = dr·W_hr (W_hr on chip too) takes dh's place in the gate gradients.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, HIDDEN)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    if PROJECTION:
        offs_p = tl.arange(0, PROJ)
        mask_p = b_mask[:, None] & (offs_p < P)[None, :]
        # Gate q's (HIDDEN, PROJ) block of W_hh and the (PROJ, HIDDEN) W_hr, loaded once.
        w_i = load_weight_block(w_hh_ptr, 0, H, P, offs_h, offs_p, False)
        w_f = load_weight_block(w_hh_ptr, H, H, P, offs_h, offs_p, False)
        w_g = load_weight_block(w_hh_ptr, 2 * H, H, P, offs_h, offs_p, False)
        w_o = load_weight_block(w_hh_ptr, 3 * H, H, P, offs_h, offs_p, False)
        w_hr = load_weight_block(w_hr_ptr, 0, P, H, offs_p, offs_h, False)
        recurrent = offs_b[:, None] * P + offs_p[None, :]
    else:
        w_i = load_gate_block(w_hh_ptr, 0, H, offs_h, offs_h, False)
        w_f = load_gate_block(w_hh_ptr, H, H, offs_h, offs_h, False)
        w_g = load_gate_block(w_hh_ptr, 2 * H, H, offs_h, offs_h, False)
        w_o = load_gate_block(w_hh_ptr, 3 * H, H, offs_h, offs_h, False)
    state_size = B * H
    steps = T
    if PACKED:
        steps = tl.load(lengths_ptr + tl.program_id(0) * BLOCK_B).to(tl.int32)  # the tile's longest row
    for reverse_step in range(0, steps):
        step = steps - 1 - reverse_step
        length, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        _, active_next, time_next = row_schedule(step + 1, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        rows = time_rows(time, offs_b, B, offsets_ptr, PACKED)
        if PACKED:
            # Only rows active at step + 1 have dgates there; only rows active now are computed.
            next_mask = mask & active_next[:, None]
            step_mask = mask & active[:, None]
            gates_step_ptr = gates_ptr
            c_prev_ptr = c_state_ptr
            saved_rows = rows
        else:
            # The last step has no successor: its loads are masked off and dh starts at zero.
            next_mask = mask & (step + 1 < T)
            step_mask = mask
            gates_step_ptr = gates_ptr + tl.cast(step, tl.int64) * (4 * state_size)
            c_prev_ptr = c_state_ptr + tl.cast(step, tl.int64) * state_size
            saved_rows = offs_b
        row_next = time_rows(time_next, offs_b, B, offsets_ptr, PACKED)[:, None] * (4 * H) + offs_h[None, :]
        d_next = tl.load(dgates_ptr + row_next, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_i, input_precision=DOT_PRECISION)
        d_next = tl.load(dgates_ptr + row_next + H, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_f, dh, input_precision=DOT_PRECISION)
        d_next = tl.load(dgates_ptr + row_next + 2 * H, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_g, dh, input_precision=DOT_PRECISION)
        d_next = tl.load(dgates_ptr + row_next + 3 * H, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_o, dh, input_precision=DOT_PRECISION)
        if PROJECTION:
            if PACKED:
                step_mask_p = mask_p & active[:, None]
                dr_at = rows[:, None] * P + offs_p[None, :]
            else:
                step_mask_p = mask_p
                dr_at = tl.cast(step, tl.int64) * (B * P) + recurrent
            dr = add_output_gradients_at(dh, step, length, active, rows, offs_b, offs_p, step_mask_p, P,
                                         grad_output_ptr, grad_h_n_ptr, HAS_GRAD_OUTPUT, HAS_GRAD_H_N)
            # A row past its length has no m·W_hr product: its dr adds nothing to dW_hr.
            dr = tl.where(active[:, None], dr, 0.0)
            tl.store(dr_ptr + dr_at, dr, mask=step_mask_p)
            dm = tl.dot(dr.to(w_hr.dtype), w_hr, input_precision=DOT_PRECISION)
            backward_epilogue_at(
                dm, step, length, active, rows, saved_rows, offs_b, offs_h, step_mask, H,
                grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_step_ptr, c_prev_ptr, dgates_ptr,
                HAS_LENGTHS and not PACKED, False, False,
            )
        else:
            backward_epilogue_at(
                dh, step, length, active, rows, saved_rows, offs_b, offs_h, step_mask, H,
                grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_step_ptr, c_prev_ptr, dgates_ptr,
                HAS_LENGTHS and not PACKED, HAS_GRAD_OUTPUT, HAS_GRAD_H_N,
            )
        tl.debug_barrier()
