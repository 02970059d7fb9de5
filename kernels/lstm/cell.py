"""One LSTM step as one launch: the fused cell forward (both GEMMs and the gate update) and the step
backward (the recurrent GEMM dh = dgates_{t+1} · W_hh with the gate gradients in its epilogue), which serves
the cell (T = 1) and the stepwise backward through time, and the projection's part of a projected step's
backward (dr = dgates_{t+1} · W_hh, before dm = dr · W_hr)."""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (accumulate_a_w, accumulate_gates, add_bias, add_output_gradients_at, backward_epilogue_at,
                     forward_epilogue, row_schedule, time_rows)


@triton.jit
def lstm_cell_forward_kernel(
    x_ptr, h_ptr, c_ptr, w_ih_ptr, w_hh_ptr, bias_ptr, h_out_ptr, c_out_ptr, gates_ptr,
    B, I, H,
    HAS_BIAS: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step: gates = x W_ihᵀ + h W_hhᵀ + b in registers, then (h', c') for a (BLOCK_B, BLOCK_H) tile."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_mask, h_mask = offs_b < B, offs_h < H
    acc_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_i, acc_f, acc_g, acc_o = accumulate_gates(
        acc_i, acc_f, acc_g, acc_o, x_ptr, w_ih_ptr, I, H, offs_b, b_mask, offs_h, h_mask, BLOCK_K, DOT_PRECISION
    )
    acc_i, acc_f, acc_g, acc_o = accumulate_gates(
        acc_i, acc_f, acc_g, acc_o, h_ptr, w_hh_ptr, H, H, offs_b, b_mask, offs_h, h_mask, BLOCK_K, DOT_PRECISION
    )
    if HAS_BIAS:
        acc_i, acc_f, acc_g, acc_o = add_bias(acc_i, acc_f, acc_g, acc_o, bias_ptr, H, offs_h, h_mask)
    active = offs_b >= 0
    time = tl.zeros_like(offs_b).to(tl.int64)
    forward_epilogue(
        acc_i, acc_f, acc_g, acc_o, active, time, offs_b, offs_h, b_mask[:, None] & h_mask[None, :], B, H,
        h_ptr, c_ptr, h_out_ptr, c_out_ptr, h_out_ptr, h_out_ptr, gates_ptr,
        False, False, False, STORE_FOR_BACKWARD,
    )


# ``step`` changes every launch: specialising on it (== 1, % 16 == 0) would compile three kernels.
@triton.jit(do_not_specialize=["step"])
def lstm_step_backward_kernel(
    dgates_ptr, dr_ptr, w_hh_ptr, w_hr_ptr, grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, lengths_ptr,
    step, B, H, P, T,
    HAS_NEXT: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, PROJECTION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    offsets_ptr=None, PACKED: tl.constexpr = False,
):
    """Iteration ``step`` of backward through time for one tile (the cell is T = 1, step 0).

    dh = dgates_{step+1} · W_hh (K = 4H, read at each row's own time) + the output and h_n gradients;
    the epilogue writes dgates_step (time order) and the carried dc in place. With ``PROJECTION``,
    dh is dm = dr_step · W_hr (K = P), dr_step (B × P) written by this step's
    ``lstm_step_projection_backward_kernel`` with dgates_{step+1} and the output and h_n gradients already
    in it (the launcher sets HAS_NEXT, HAS_GRAD_OUTPUT and HAS_GRAD_H_N off).

    ``PACKED`` (the packed layout, common.py): B is this iteration's active count, and dgates, the output
    gradient, dr, the saved gates and c before the step (``gates_ptr``, ``c_prev_ptr``: whole arrays, not
    a slot) are at the packed rows; dgates_{step+1} is read only for rows active at step + 1.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    length, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
    rows = time_rows(time, offs_b, B, offsets_ptr, PACKED)
    if PACKED:
        saved_rows = rows
    else:
        saved_rows = offs_b  # gates_ptr and c_prev_ptr are this iteration's slots
    dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if PROJECTION:
        dh = accumulate_a_w(dh, dr_ptr, saved_rows, b_mask, P, w_hr_ptr, H, offs_h, h_mask, BLOCK_K, DOT_PRECISION)
    elif HAS_NEXT:
        _, active_next, time_next = row_schedule(step + 1, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        if PACKED:
            next_mask = b_mask & active_next
        else:
            next_mask = b_mask
        dh = accumulate_a_w(dh, dgates_ptr, time_rows(time_next, offs_b, B, offsets_ptr, PACKED), next_mask, 4 * H,
                            w_hh_ptr, H, offs_h, h_mask, BLOCK_K, DOT_PRECISION)
    backward_epilogue_at(
        dh, step, length, active, rows, saved_rows, offs_b, offs_h, mask, H,
        grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, dgates_ptr,
        HAS_LENGTHS and not PACKED, HAS_GRAD_OUTPUT, HAS_GRAD_H_N,
    )


@triton.jit(do_not_specialize=["step"])
def lstm_step_projection_backward_kernel(
    dgates_ptr, w_hh_ptr, grad_output_ptr, grad_h_n_ptr, dr_ptr, lengths_ptr,
    step, B, H, P, T,
    HAS_NEXT: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    offsets_ptr=None, PACKED: tl.constexpr = False,
):
    """The first half of a projected LSTM's backward step, for a (BLOCK_B × BLOCK_H) tile of r's P units:
    dr = dgates_{step+1} · W_hh (W_hh 4H × P) + the output and h_n gradients, stored for iteration ``step``
    (zero past a row's length, so that dW_hr = Σ drᵀ·m gets nothing from a frozen step). ``PACKED``: B active
    rows, dgates, the output gradient and dr (the whole (rows, P) array) at the packed rows."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_p = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_mask, p_mask = offs_b < B, offs_p < P
    mask = b_mask[:, None] & p_mask[None, :]
    length, active, time = row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
    rows = time_rows(time, offs_b, B, offsets_ptr, PACKED)
    dr = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_NEXT:
        _, active_next, time_next = row_schedule(step + 1, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        if PACKED:
            next_mask = b_mask & active_next
        else:
            next_mask = b_mask
        dr = accumulate_a_w(dr, dgates_ptr, time_rows(time_next, offs_b, B, offsets_ptr, PACKED), next_mask, 4 * H,
                            w_hh_ptr, P, offs_p, p_mask, BLOCK_K, DOT_PRECISION)
    dr = add_output_gradients_at(dr, step, length, active, rows, offs_b, offs_p, mask, P, grad_output_ptr,
                                 grad_h_n_ptr, HAS_GRAD_OUTPUT, HAS_GRAD_H_N)
    if PACKED:
        dr_rows = rows
    else:
        dr_rows = offs_b  # dr_ptr is this iteration's slot
    tl.store(dr_ptr + dr_rows[:, None] * P + offs_p[None, :], tl.where(active[:, None], dr, 0.0), mask=mask)
