"""Device helpers shared by the LSTM kernels: the row schedule of ragged/reversed batches, the four-gate
GEMM, and the fused epilogues (the LSTM update forward, the gate gradients backward).

Layouts: gates pre-activation order (i, f, g, o) as torch; saved activated gates are per *iteration*
(B, 4H) slots; output, gate gradients and the saved "hidden state before the step" are per *time*
(T, B, ·). Iteration k of row b runs time step t_b(k) = k, or lengths[b]-1-k when reversed; past a
row's length its state is frozen and it is parked at t = k, where its output and gate gradient are
written as zeros, so every (t, b) is written exactly once.

Packed layout (``PACKED``, a PackedSequence's own rows): the batch is in the PackedSequence's sorted order
(lengths non-increasing), so iteration k's active rows are exactly b < batch_sizes[k], and every per-time
array is (sum(lengths), ·) with (t, b) at row offsets[t] + b (offsets = exclusive cumsum of batch_sizes,
T + 1 entries): no padded rows exist, and a row past its length is never read or written (the kernels mask
it out), so its state is left where its last step put it. The ``*_at`` helpers take those rows
(``time_rows``); the others keep the padded (T, B, ·) addressing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tanh(x) = 2σ(2x) − 1: one exp, saturates cleanly at ±1, and the interpreter runs it.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def row_schedule(step, offs_b, b_mask, lengths_ptr, num_steps, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Per batch row at iteration ``step``: its length, whether it is active, and its time index."""
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + offs_b, mask=b_mask, other=0).to(tl.int32)
    else:
        length = tl.zeros_like(offs_b) + num_steps
    active = step < length
    if REVERSE:
        time = tl.where(active, length - 1 - step, step)
    else:
        time = tl.zeros_like(offs_b) + step
    return length, active, time.to(tl.int64)


@triton.jit
def time_rows(time, offs_b, B, offsets_ptr, PACKED: tl.constexpr):
    """The row of (time[b], b) in a time-major (·, width) array: time·B + b in the padded (T, B, ·) layout,
    offsets[time] + b in the packed one (``time`` ≤ T, so offsets' T + 1 entries cover every load)."""
    if PACKED:
        return tl.load(offsets_ptr + time) + offs_b
    return time * B + offs_b


@triton.jit
def accumulate_gates(
    acc_i, acc_f, acc_g, acc_o, a_ptr, w_ptr, K, H, offs_b, b_mask, offs_h, h_mask,
    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """acc_q += A · W_qᵀ over K, where W_q is gate q's block (rows q·H + j) of W (4H, K), A is (B, K)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_b[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_h[None, :] * K + offs_k[:, None]  # a (BLOCK_K, BLOCK_H) tile of W_iᵀ
    gate_stride = H * K
    for k_start in range(0, K, BLOCK_K):
        k_mask = (k_start + offs_k) < K
        a = tl.load(a_ptrs, mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & h_mask[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc_i = tl.dot(a, w, acc_i, input_precision=DOT_PRECISION)
        w = tl.load(w_ptrs + gate_stride, mask=w_mask, other=0.0)
        acc_f = tl.dot(a, w, acc_f, input_precision=DOT_PRECISION)
        w = tl.load(w_ptrs + 2 * gate_stride, mask=w_mask, other=0.0)
        acc_g = tl.dot(a, w, acc_g, input_precision=DOT_PRECISION)
        w = tl.load(w_ptrs + 3 * gate_stride, mask=w_mask, other=0.0)
        acc_o = tl.dot(a, w, acc_o, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask):
    pre_i += tl.load(bias_ptr + offs_h, mask=h_mask, other=0.0)[None, :]
    pre_f += tl.load(bias_ptr + H + offs_h, mask=h_mask, other=0.0)[None, :]
    pre_g += tl.load(bias_ptr + 2 * H + offs_h, mask=h_mask, other=0.0)[None, :]
    pre_o += tl.load(bias_ptr + 3 * H + offs_h, mask=h_mask, other=0.0)[None, :]
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def add_input_projection(pre_i, pre_f, pre_g, pre_o, projection_ptr, time, B, H, offs_b, offs_h, mask):
    """Adds x_t · W_ihᵀ, precomputed for all steps as (T, B, 4H), at each row's own time index."""
    return add_input_projection_at(pre_i, pre_f, pre_g, pre_o, projection_ptr, time * B + offs_b, H, offs_h, mask)


@triton.jit
def add_input_projection_at(pre_i, pre_f, pre_g, pre_o, projection_ptr, rows, H, offs_h, mask):
    """Adds x_t · W_ihᵀ, precomputed for all steps as (rows, 4H), at each batch row's own time ``rows``."""
    row = rows[:, None] * (4 * H) + offs_h[None, :]
    pre_i += tl.load(projection_ptr + row, mask=mask, other=0.0).to(tl.float32)
    pre_f += tl.load(projection_ptr + row + H, mask=mask, other=0.0).to(tl.float32)
    pre_g += tl.load(projection_ptr + row + 2 * H, mask=mask, other=0.0).to(tl.float32)
    pre_o += tl.load(projection_ptr + row + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def lstm_update(pre_i, pre_f, pre_g, pre_o, c_prev):
    """The activated gates, c' = σ(f)·c + σ(i)·tanh(g) and h' = σ(o)·tanh(c') (before any projection)."""
    input_gate = tl.sigmoid(pre_i)
    forget_gate = tl.sigmoid(pre_f)
    cell_gate = tanh(pre_g)
    output_gate = tl.sigmoid(pre_o)
    c = forget_gate * c_prev + input_gate * cell_gate
    h = output_gate * tanh(c)
    return input_gate, forget_gate, cell_gate, output_gate, c, h


@triton.jit
def store_gates(gates_ptr, input_gate, forget_gate, cell_gate, output_gate, offs_b, offs_h, mask, H):
    gate = offs_b[:, None] * (4 * H) + offs_h[None, :]
    tl.store(gates_ptr + gate, input_gate, mask=mask)
    tl.store(gates_ptr + gate + H, forget_gate, mask=mask)
    tl.store(gates_ptr + gate + 2 * H, cell_gate, mask=mask)
    tl.store(gates_ptr + gate + 3 * H, output_gate, mask=mask)


@triton.jit
def forward_epilogue(
    pre_i, pre_f, pre_g, pre_o, active, time, offs_b, offs_h, mask, B, H,
    h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr, output_ptr, hidden_saved_ptr, gates_ptr,
    HAS_LENGTHS: tl.constexpr, HAS_OUTPUT: tl.constexpr, SAVE_HIDDEN: tl.constexpr, SAVE_GATES: tl.constexpr,
):
    """The LSTM update of one (batch rows × hidden units) tile and every store that follows from it."""
    forward_epilogue_at(
        pre_i, pre_f, pre_g, pre_o, active, time * B + offs_b, offs_b, offs_b, offs_h, mask, H,
        h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr, output_ptr, hidden_saved_ptr, gates_ptr, c_in_ptr,
        HAS_LENGTHS, HAS_OUTPUT, SAVE_HIDDEN, SAVE_GATES, False,
    )


@triton.jit
def forward_epilogue_at(
    pre_i, pre_f, pre_g, pre_o, active, rows, gate_rows, offs_b, offs_h, mask, H,
    h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr, output_ptr, hidden_saved_ptr, gates_ptr, cell_saved_ptr,
    HAS_LENGTHS: tl.constexpr, HAS_OUTPUT: tl.constexpr, SAVE_HIDDEN: tl.constexpr, SAVE_GATES: tl.constexpr,
    SAVE_CELL: tl.constexpr,
):
    """``forward_epilogue`` at explicit rows: output and h before the step at ``rows`` (time order), the gates at
    ``gate_rows`` of ``gates_ptr``; ``SAVE_CELL`` also stores c before the step at ``rows`` of ``cell_saved_ptr``
    (the packed layout's saved cell states; the padded one keeps a slot per iteration instead)."""
    state = offs_b[:, None] * H + offs_h[None, :]
    c_prev = tl.load(c_in_ptr + state, mask=mask, other=0.0).to(tl.float32)
    if SAVE_CELL:  # stored at once: c_prev's registers are free after the update (no freeze in the packed layout)
        tl.store(cell_saved_ptr + rows[:, None] * H + offs_h[None, :], c_prev, mask=mask)
    input_gate, forget_gate, cell_gate, output_gate, c, h = lstm_update(pre_i, pre_f, pre_g, pre_o, c_prev)
    if HAS_LENGTHS or SAVE_HIDDEN:
        h_prev = tl.load(h_in_ptr + state, mask=mask, other=0.0)
    at_time = rows[:, None] * H + offs_h[None, :]
    if HAS_OUTPUT:
        # A row past its length outputs zeros (at its parked time index) and keeps its state.
        tl.store(output_ptr + at_time, tl.where(active[:, None], h, 0.0), mask=mask)
    if HAS_LENGTHS:
        h = tl.where(active[:, None], h, h_prev.to(tl.float32))
        c = tl.where(active[:, None], c, c_prev)
    tl.store(h_out_ptr + state, h, mask=mask)
    tl.store(c_out_ptr + state, c, mask=mask)
    if SAVE_HIDDEN:
        # dW_hh = Σ_t dgates_tᵀ · h_before_t is one GEMM over time order: keep h_before there.
        tl.store(hidden_saved_ptr + at_time, h_prev, mask=mask)
    if SAVE_GATES:
        store_gates(gates_ptr, input_gate, forget_gate, cell_gate, output_gate, gate_rows, offs_h, mask, H)


@triton.jit
def projected_forward_epilogue(
    pre_i, pre_f, pre_g, pre_o, active, offs_b, offs_h, mask, H,
    c_in_ptr, c_out_ptr, cell_output_ptr, gates_ptr,
    HAS_LENGTHS: tl.constexpr, STORE_CELL_OUTPUT: tl.constexpr, SAVE_GATES: tl.constexpr,
):
    """The LSTM update of a tile when a projection follows: stores c and the gates as ``forward_epilogue``, and
    returns m = σ(o)·tanh(c) (fp32) for r = m·W_hrᵀ; ``STORE_CELL_OUTPUT`` also writes m to (B, H) for a product
    that runs in another launch. A row past its length keeps c (its r is frozen by ``projection_epilogue``)."""
    return projected_forward_epilogue_at(
        pre_i, pre_f, pre_g, pre_o, active, offs_b, offs_b, offs_b, offs_h, mask, H, c_in_ptr, c_out_ptr,
        cell_output_ptr, gates_ptr, c_in_ptr, HAS_LENGTHS, STORE_CELL_OUTPUT, SAVE_GATES, False,
    )


@triton.jit
def projected_forward_epilogue_at(
    pre_i, pre_f, pre_g, pre_o, active, rows, gate_rows, offs_b, offs_h, mask, H,
    c_in_ptr, c_out_ptr, cell_output_ptr, gates_ptr, cell_saved_ptr,
    HAS_LENGTHS: tl.constexpr, STORE_CELL_OUTPUT: tl.constexpr, SAVE_GATES: tl.constexpr, SAVE_CELL: tl.constexpr,
):
    """``projected_forward_epilogue`` with the gates at ``gate_rows`` and (``SAVE_CELL``) c before the step stored
    at ``rows`` (time order) of ``cell_saved_ptr``."""
    state = offs_b[:, None] * H + offs_h[None, :]
    c_prev = tl.load(c_in_ptr + state, mask=mask, other=0.0).to(tl.float32)
    if SAVE_CELL:  # stored at once, as forward_epilogue_at
        tl.store(cell_saved_ptr + rows[:, None] * H + offs_h[None, :], c_prev, mask=mask)
    input_gate, forget_gate, cell_gate, output_gate, c, m = lstm_update(pre_i, pre_f, pre_g, pre_o, c_prev)
    if HAS_LENGTHS:
        c = tl.where(active[:, None], c, c_prev)
    tl.store(c_out_ptr + state, c, mask=mask)
    if STORE_CELL_OUTPUT:
        tl.store(cell_output_ptr + state, m, mask=mask)
    if SAVE_GATES:
        store_gates(gates_ptr, input_gate, forget_gate, cell_gate, output_gate, gate_rows, offs_h, mask, H)
    return m


@triton.jit
def projection_epilogue(
    r, active, time, offs_b, offs_p, mask, B, P, h_in_ptr, h_out_ptr, output_ptr, hidden_saved_ptr,
    HAS_LENGTHS: tl.constexpr, SAVE_HIDDEN: tl.constexpr,
):
    """The stores of r = m·W_hrᵀ (B × P), the recurrent state and output of a projected LSTM, as
    ``forward_epilogue`` stores h: output (zeros past a row's length), the next state (frozen past it), and
    (training) the state before the step in time order, for dW_hh = Σ dgatesᵀ·r_{t-1}."""
    projection_epilogue_at(r, active, time * B + offs_b, offs_b, offs_p, mask, P, h_in_ptr, h_out_ptr, output_ptr,
                           hidden_saved_ptr, HAS_LENGTHS, SAVE_HIDDEN)


@triton.jit
def projection_epilogue_at(
    r, active, rows, offs_b, offs_p, mask, P, h_in_ptr, h_out_ptr, output_ptr, hidden_saved_ptr,
    HAS_LENGTHS: tl.constexpr, SAVE_HIDDEN: tl.constexpr,
):
    """``projection_epilogue`` with output and the saved state at ``rows`` (time order)."""
    state = offs_b[:, None] * P + offs_p[None, :]
    if HAS_LENGTHS or SAVE_HIDDEN:
        r_prev = tl.load(h_in_ptr + state, mask=mask, other=0.0)
    at_time = rows[:, None] * P + offs_p[None, :]
    tl.store(output_ptr + at_time, tl.where(active[:, None], r, 0.0), mask=mask)
    if HAS_LENGTHS:
        r = tl.where(active[:, None], r, r_prev.to(tl.float32))
    tl.store(h_out_ptr + state, r, mask=mask)
    if SAVE_HIDDEN:
        tl.store(hidden_saved_ptr + at_time, r_prev, mask=mask)


@triton.jit
def add_output_gradients(
    dh, step, length, active, time, offs_b, offs_n, mask, B, N, grad_output_ptr, grad_h_n_ptr,
    HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
):
    """dh (B × N, the recurrent state's width) plus the gradients of the output and of h_n that reach it."""
    return add_output_gradients_at(dh, step, length, active, time * B + offs_b, offs_b, offs_n, mask, N,
                                   grad_output_ptr, grad_h_n_ptr, HAS_GRAD_OUTPUT, HAS_GRAD_H_N)


@triton.jit
def add_output_gradients_at(
    dh, step, length, active, rows, offs_b, offs_n, mask, N, grad_output_ptr, grad_h_n_ptr,
    HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
):
    """``add_output_gradients`` with the output gradient read at ``rows`` (time order)."""
    if HAS_GRAD_H_N:
        # h_n is the state after a row's last active step, so its gradient enters there.
        last = (step + 1) >= length
        state = offs_b[:, None] * N + offs_n[None, :]
        dh += tl.where(last[:, None], tl.load(grad_h_n_ptr + state, mask=mask, other=0.0).to(tl.float32), 0.0)
    if HAS_GRAD_OUTPUT:
        at_time = rows[:, None] * N + offs_n[None, :]
        dh += tl.where(active[:, None], tl.load(grad_output_ptr + at_time, mask=mask, other=0.0).to(tl.float32), 0.0)
    return dh


@triton.jit
def gate_gradients(
    dh, dc_next, input_gate, forget_gate, cell_gate, output_gate, c_prev, tanh_c, active, HAS_LENGTHS: tl.constexpr,
):
    """The LSTM update's backward: the gradients of the four pre-activations and dc_{t-1}, from dh_t, the carried
    dc_t (``dc_next``), the activated gates, c_{t-1} and tanh(c_t) (each caller has its own source for c_t)."""
    dc = dc_next + dh * output_gate * (1.0 - tanh_c * tanh_c)
    d_input_gate = dc * cell_gate * input_gate * (1.0 - input_gate)
    d_forget_gate = dc * c_prev * forget_gate * (1.0 - forget_gate)
    d_cell_gate = dc * input_gate * (1.0 - cell_gate * cell_gate)
    d_output_gate = dh * tanh_c * output_gate * (1.0 - output_gate)
    dc_prev = dc * forget_gate
    if HAS_LENGTHS:
        # A frozen step passes dc through and has no gate gradient.
        keep = active[:, None]
        dc_prev = tl.where(keep, dc_prev, dc_next)
        d_input_gate = tl.where(keep, d_input_gate, 0.0)
        d_forget_gate = tl.where(keep, d_forget_gate, 0.0)
        d_cell_gate = tl.where(keep, d_cell_gate, 0.0)
        d_output_gate = tl.where(keep, d_output_gate, 0.0)
    return d_input_gate, d_forget_gate, d_cell_gate, d_output_gate, dc_prev


@triton.jit
def backward_epilogue(
    dh, step, length, active, time, offs_b, offs_h, mask, B, H,
    grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, dgates_ptr,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
):
    """Gate gradients of one tile from dh (its recurrent part) and the carried dc (updated in place)."""
    backward_epilogue_at(
        dh, step, length, active, time * B + offs_b, offs_b, offs_b, offs_h, mask, H,
        grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, dgates_ptr,
        HAS_LENGTHS, HAS_GRAD_OUTPUT, HAS_GRAD_H_N,
    )


@triton.jit
def backward_epilogue_at(
    dh, step, length, active, rows, saved_rows, offs_b, offs_h, mask, H,
    grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, dgates_ptr,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
):
    """``backward_epilogue`` with the output gradient and dgates at ``rows`` (time order) and the saved gates and
    cell state read at ``saved_rows`` of ``gates_ptr`` / ``c_prev_ptr``."""
    state = offs_b[:, None] * H + offs_h[None, :]
    dh = add_output_gradients_at(dh, step, length, active, rows, offs_b, offs_h, mask, H, grad_output_ptr,
                                 grad_h_n_ptr, HAS_GRAD_OUTPUT, HAS_GRAD_H_N)
    dc_next = tl.load(dc_ptr + state, mask=mask, other=0.0)
    gate = saved_rows[:, None] * (4 * H) + offs_h[None, :]
    input_gate = tl.load(gates_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    forget_gate = tl.load(gates_ptr + gate + H, mask=mask, other=0.0).to(tl.float32)
    cell_gate = tl.load(gates_ptr + gate + 2 * H, mask=mask, other=0.0).to(tl.float32)
    output_gate = tl.load(gates_ptr + gate + 3 * H, mask=mask, other=0.0).to(tl.float32)
    c_prev = tl.load(c_prev_ptr + saved_rows[:, None] * H + offs_h[None, :], mask=mask, other=0.0).to(tl.float32)
    tanh_c = tanh(forget_gate * c_prev + input_gate * cell_gate)
    d_input_gate, d_forget_gate, d_cell_gate, d_output_gate, dc_prev = gate_gradients(
        dh, dc_next, input_gate, forget_gate, cell_gate, output_gate, c_prev, tanh_c, active, HAS_LENGTHS
    )
    tl.store(dc_ptr + state, dc_prev, mask=mask)
    store_gates(dgates_ptr, d_input_gate, d_forget_gate, d_cell_gate, d_output_gate, rows, offs_h, mask, H)


@triton.jit
def load_gate_block(w_ptr, row_start, H, offs_row, offs_col, TRANSPOSE: tl.constexpr):
    """Gate block W[row_start + r, c] (r, c < H) of W (4H, H), zero-padded; transposed to [c, r] if asked."""
    mask = (offs_row[:, None] < H) & (offs_col[None, :] < H)
    if TRANSPOSE:
        return tl.load(w_ptr + (row_start + offs_col[None, :]) * H + offs_row[:, None], mask=mask, other=0.0)
    return tl.load(w_ptr + (row_start + offs_row[:, None]) * H + offs_col[None, :], mask=mask, other=0.0)


@triton.jit
def load_weight_block(w_ptr, row_start, num_rows, num_columns, offs_row, offs_col, TRANSPOSE: tl.constexpr):
    """Block W[row_start + r, c] (r < num_rows, c < num_columns) of a row-major W with num_columns columns,
    zero-padded, as a (len(offs_row), len(offs_col)) tile: tile[a, b] = W[row_start + offs_row[a], offs_col[b]],
    or with TRANSPOSE tile[a, b] = W[row_start + offs_col[b], offs_row[a]] (offs_row then walks W's columns)."""
    if TRANSPOSE:
        mask = (offs_col[None, :] < num_rows) & (offs_row[:, None] < num_columns)
        return tl.load(w_ptr + (row_start + offs_col[None, :]) * num_columns + offs_row[:, None], mask=mask, other=0.0)
    mask = (offs_row[:, None] < num_rows) & (offs_col[None, :] < num_columns)
    return tl.load(w_ptr + (row_start + offs_row[:, None]) * num_columns + offs_col[None, :], mask=mask, other=0.0)


@triton.jit
def accumulate_a_w(acc, a_ptr, a_rows, a_row_mask, K, w_ptr, N, offs_n, n_mask,
                   BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += A[a_rows, :K] · W[:K, offs_n], A row-major with K columns, W row-major (K, N)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_k[:, None] * N + offs_n[None, :]
    for k_start in range(0, K, BLOCK_K):
        k_mask = (k_start + offs_k) < K
        a = tl.load(a_ptrs, mask=a_row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * N
    return acc


@triton.jit
def accumulate_a_wt(acc, a_ptr, a_rows, a_row_mask, K, w_ptr, offs_n, n_mask,
                    BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += A[a_rows, :K] · W[offs_n, :K]ᵀ, A and W row-major with K columns."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * K + offs_k[:, None]  # a (BLOCK_K, BLOCK_N) tile of Wᵀ
    for k_start in range(0, K, BLOCK_K):
        k_mask = (k_start + offs_k) < K
        a = tl.load(a_ptrs, mask=a_row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc
