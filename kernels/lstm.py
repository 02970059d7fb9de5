"""Triton LSTM kernels: the fused cell step and the layer recurrence, forward and backward.

Every forward kernel is a GEMM whose epilogue is the LSTM update: a tile of hidden units j computes
the four gate tiles (rows j, H+j, 2H+j, 3H+j of the weights) side by side, so the 4H gate
pre-activations never reach memory. Every backward kernel is the mirror image: the recurrent GEMM
dh_{t-1} = dgates_t · W_hh with the gate-gradient pointwise math in its epilogue.

Layer (sequence) path: the input projection of all steps is one torch GEMM; the recurrence runs
  * per step: one launch of ``lstm_sequence_step_forward_kernel`` per time step (any size), or
  * persistent: ``lstm_sequence_forward_persistent_kernel`` loops over time inside one launch; each
    program owns a batch tile and every hidden unit with W_hh held in registers, so programs never
    wait for each other (it runs under the interpreter too). Selected for small hidden sizes.
  * grid: ``lstm_sequence_forward_grid_kernel`` loops over time inside one launch for large hidden
    sizes at small batch; each program owns a tile of hidden units (its rows of W_hh in registers)
    for every batch row, and all programs meet at a global-memory barrier after each step. Valid
    only when every program is resident at once (grid ≤ SM count), so never chosen on its own
    under the interpreter.
Backward through time runs the same two ways; dW_ih, dW_hh, dx and the bias gradient are one GEMM
(or sum) each over the stacked gate gradients at the end.

Layouts (all contiguous; the launchers make them so):
  gates pre-activation order (i, f, g, o) as torch; saved activated gates are per *iteration*
  (B, 4H) slots; output, gate gradients and the saved "hidden state before the step" are per *time*
  (T, B, ·). Iteration k of row b runs time step t_b(k) = k, or lengths[b]-1-k when reversed; past a
  row's length its state is frozen and it is parked at t = k, where its output and gate gradient are
  written as zeros, so every (t, b) is written exactly once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._aot import CompileSpec
from ._launch import on_input_device

# fp32 GEMMs in strict IEEE fp32, matching torch's default (TF32 off for matmul) and the fp32 bound.
_DOT_PRECISION = "ieee"

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
# so H = 1024 spreads over 64 SMs. Each program keeps 4 · GRID_BLOCK_H · H_padded of W_hh in
# registers: 128 KB at H = 1024 in 16-bit types; fp32 is chosen automatically only up to 512.
GRID_BLOCK_B = 16
GRID_BLOCK_H = 16
GRID_MAX_HIDDEN = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 512}

RECURRENCE_ENVIRONMENT_VARIABLE = "PYATTN_LSTM_TRITON_RECURRENCE"
RECURRENCES = ("auto", "persistent", "grid", "stepwise")


def step_config(batch: int) -> tuple[int, int, int, int, int]:
    for bucket in sorted(STEP_CONFIGS):
        if batch <= bucket:
            return STEP_CONFIGS[bucket]
    return STEP_CONFIGS[max(STEP_CONFIGS)]


def hidden_pad(hidden_size: int) -> int:
    return max(16, triton.next_power_of_2(hidden_size))


def persistent_supported(hidden_size: int, dtype: torch.dtype) -> bool:
    return hidden_pad(hidden_size) <= PERSISTENT_MAX_HIDDEN[dtype]


def _persistent_warps(padded_hidden: int, dtype: torch.dtype, block_h: int | None = None) -> int:
    # Spread the resident W_hh (4 · HIDDEN · block_h elements) so each thread holds at most ~64 registers of it.
    block_h = padded_hidden if block_h is None else block_h
    weight_bytes = 4 * padded_hidden * block_h * torch.finfo(dtype).bits // 8
    return 4 if weight_bytes <= 16384 else 8 if weight_bytes <= 32768 else 16


def recurrence_from_environment() -> str:
    """The forward recurrence kernel PYATTN_LSTM_TRITON_RECURRENCE asks for (default ``auto``)."""
    name = os.environ.get(RECURRENCE_ENVIRONMENT_VARIABLE, "auto")
    if name not in RECURRENCES:
        raise ValueError(f"{RECURRENCE_ENVIRONMENT_VARIABLE}={name!r}: expected one of {list(RECURRENCES)}")
    return name


def grid_programs(hidden_size: int, device: torch.device) -> int:
    """Programs the grid kernel launches: hidden tiles of GRID_BLOCK_H on a GPU, one under the interpreter.

    The interpreter runs programs one after another, so a program spinning at the barrier would wait
    forever for the next; a single program (owning every hidden unit) meets the barrier alone.
    """
    if device.type != "cuda":
        return 1
    return triton.cdiv(hidden_size, GRID_BLOCK_H)


def grid_supported(batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether auto picks the grid kernel: a real GPU, batch ≤ 16, H past the persistent kernel's reach,
    W_hh slices that fit registers, and a grid no larger than the SM count (so all programs are resident)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if batch > GRID_BLOCK_B or persistent_supported(hidden_size, dtype):
        return False
    if hidden_pad(hidden_size) > GRID_MAX_HIDDEN[dtype]:
        return False
    return grid_programs(hidden_size, device) <= torch.cuda.get_device_properties(device).multi_processor_count


def choose_recurrence(batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> str:
    """The forward recurrence kernel: the environment's choice, or by size when it says ``auto``."""
    name = recurrence_from_environment()
    if name != "auto":
        return name
    if persistent_supported(hidden_size, dtype):
        return "persistent"
    if grid_supported(batch, hidden_size, dtype, device):
        return "grid"
    return "stepwise"


# ----------------------------------------------------------------------------- shared device code


@triton.jit
def _tanh(x):
    # tanh(x) = 2σ(2x) − 1: one exp, saturates cleanly at ±1, and the interpreter runs it.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _row_schedule(step, offs_b, b_mask, lengths_ptr, num_steps, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr):
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
def _accumulate_gates(
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
def _add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask):
    pre_i += tl.load(bias_ptr + offs_h, mask=h_mask, other=0.0)[None, :]
    pre_f += tl.load(bias_ptr + H + offs_h, mask=h_mask, other=0.0)[None, :]
    pre_g += tl.load(bias_ptr + 2 * H + offs_h, mask=h_mask, other=0.0)[None, :]
    pre_o += tl.load(bias_ptr + 3 * H + offs_h, mask=h_mask, other=0.0)[None, :]
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def _add_input_projection(pre_i, pre_f, pre_g, pre_o, projection_ptr, time, B, H, offs_b, offs_h, mask):
    """Adds x_t · W_ihᵀ, precomputed for all steps as (T, B, 4H), at each row's own time index."""
    row = (time[:, None] * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
    pre_i += tl.load(projection_ptr + row, mask=mask, other=0.0).to(tl.float32)
    pre_f += tl.load(projection_ptr + row + H, mask=mask, other=0.0).to(tl.float32)
    pre_g += tl.load(projection_ptr + row + 2 * H, mask=mask, other=0.0).to(tl.float32)
    pre_o += tl.load(projection_ptr + row + 3 * H, mask=mask, other=0.0).to(tl.float32)
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def _forward_epilogue(
    pre_i, pre_f, pre_g, pre_o, active, time, offs_b, offs_h, mask, B, H,
    h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr, output_ptr, hidden_saved_ptr, gates_ptr,
    HAS_LENGTHS: tl.constexpr, HAS_OUTPUT: tl.constexpr, SAVE_HIDDEN: tl.constexpr, SAVE_GATES: tl.constexpr,
):
    """The LSTM update of one (batch rows × hidden units) tile and every store that follows from it."""
    state = offs_b[:, None] * H + offs_h[None, :]
    c_prev = tl.load(c_in_ptr + state, mask=mask, other=0.0).to(tl.float32)
    input_gate = tl.sigmoid(pre_i)
    forget_gate = tl.sigmoid(pre_f)
    cell_gate = _tanh(pre_g)
    output_gate = tl.sigmoid(pre_o)
    c = forget_gate * c_prev + input_gate * cell_gate
    h = output_gate * _tanh(c)
    if HAS_LENGTHS or SAVE_HIDDEN:
        h_prev = tl.load(h_in_ptr + state, mask=mask, other=0.0)
    at_time = (time[:, None] * B + offs_b[:, None]) * H + offs_h[None, :]
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
        gate = offs_b[:, None] * (4 * H) + offs_h[None, :]
        tl.store(gates_ptr + gate, input_gate, mask=mask)
        tl.store(gates_ptr + gate + H, forget_gate, mask=mask)
        tl.store(gates_ptr + gate + 2 * H, cell_gate, mask=mask)
        tl.store(gates_ptr + gate + 3 * H, output_gate, mask=mask)


@triton.jit
def _backward_epilogue(
    dh, step, length, active, time, offs_b, offs_h, mask, B, H,
    grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, dgates_ptr,
    HAS_LENGTHS: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
):
    """Gate gradients of one tile from dh (its recurrent part) and the carried dc (updated in place)."""
    state = offs_b[:, None] * H + offs_h[None, :]
    at_time = (time[:, None] * B + offs_b[:, None]) * H + offs_h[None, :]
    if HAS_GRAD_H_N:
        # h_n is the state after a row's last active step, so its gradient enters there.
        last = (step + 1) >= length
        dh += tl.where(last[:, None], tl.load(grad_h_n_ptr + state, mask=mask, other=0.0).to(tl.float32), 0.0)
    if HAS_GRAD_OUTPUT:
        dh += tl.where(active[:, None], tl.load(grad_output_ptr + at_time, mask=mask, other=0.0).to(tl.float32), 0.0)
    dc_next = tl.load(dc_ptr + state, mask=mask, other=0.0)
    gate = offs_b[:, None] * (4 * H) + offs_h[None, :]
    input_gate = tl.load(gates_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    forget_gate = tl.load(gates_ptr + gate + H, mask=mask, other=0.0).to(tl.float32)
    cell_gate = tl.load(gates_ptr + gate + 2 * H, mask=mask, other=0.0).to(tl.float32)
    output_gate = tl.load(gates_ptr + gate + 3 * H, mask=mask, other=0.0).to(tl.float32)
    c_prev = tl.load(c_prev_ptr + state, mask=mask, other=0.0).to(tl.float32)
    tanh_c = _tanh(forget_gate * c_prev + input_gate * cell_gate)
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
    tl.store(dc_ptr + state, dc_prev, mask=mask)
    gate_at_time = (time[:, None] * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
    tl.store(dgates_ptr + gate_at_time, d_input_gate, mask=mask)
    tl.store(dgates_ptr + gate_at_time + H, d_forget_gate, mask=mask)
    tl.store(dgates_ptr + gate_at_time + 2 * H, d_cell_gate, mask=mask)
    tl.store(dgates_ptr + gate_at_time + 3 * H, d_output_gate, mask=mask)


# ----------------------------------------------------------------------------- kernels


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
    acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
        acc_i, acc_f, acc_g, acc_o, x_ptr, w_ih_ptr, I, H, offs_b, b_mask, offs_h, h_mask, BLOCK_K, DOT_PRECISION
    )
    acc_i, acc_f, acc_g, acc_o = _accumulate_gates(
        acc_i, acc_f, acc_g, acc_o, h_ptr, w_hh_ptr, H, H, offs_b, b_mask, offs_h, h_mask, BLOCK_K, DOT_PRECISION
    )
    if HAS_BIAS:
        acc_i, acc_f, acc_g, acc_o = _add_bias(acc_i, acc_f, acc_g, acc_o, bias_ptr, H, offs_h, h_mask)
    active = offs_b >= 0
    time = tl.zeros_like(offs_b).to(tl.int64)
    _forward_epilogue(
        acc_i, acc_f, acc_g, acc_o, active, time, offs_b, offs_h, b_mask[:, None] & h_mask[None, :], B, H,
        h_ptr, c_ptr, h_out_ptr, c_out_ptr, h_out_ptr, h_out_ptr, gates_ptr,
        False, False, False, STORE_FOR_BACKWARD,
    )


@triton.jit
def lstm_sequence_step_forward_kernel(
    projection_ptr, w_hh_ptr, bias_ptr, lengths_ptr, h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr,
    output_ptr, hidden_saved_ptr, gates_ptr,
    step, B, H, T,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Iteration ``step`` of the recurrence for one tile: h_prev W_hhᵀ fused with the gate update."""
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    _, active, time = _row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
    pre_i = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    pre_f = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    pre_g = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    pre_o = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    pre_i, pre_f, pre_g, pre_o = _accumulate_gates(
        pre_i, pre_f, pre_g, pre_o, h_in_ptr, w_hh_ptr, H, H, offs_b, b_mask, offs_h, h_mask, BLOCK_K, DOT_PRECISION
    )
    pre_i, pre_f, pre_g, pre_o = _add_input_projection(
        pre_i, pre_f, pre_g, pre_o, projection_ptr, time, B, H, offs_b, offs_h, mask
    )
    if HAS_BIAS:
        pre_i, pre_f, pre_g, pre_o = _add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask)
    _forward_epilogue(
        pre_i, pre_f, pre_g, pre_o, active, time, offs_b, offs_h, mask, B, H,
        h_in_ptr, c_in_ptr, h_out_ptr, c_out_ptr, output_ptr, hidden_saved_ptr, gates_ptr,
        HAS_LENGTHS, True, STORE_FOR_BACKWARD, STORE_FOR_BACKWARD,
    )


@triton.jit
def _load_gate_block(w_ptr, row_start, H, offs_row, offs_col, TRANSPOSE: tl.constexpr):
    """Gate block W[row_start + r, c] (r, c < H) of W (4H, H), zero-padded; transposed to [c, r] if asked."""
    mask = (offs_row[:, None] < H) & (offs_col[None, :] < H)
    if TRANSPOSE:
        return tl.load(w_ptr + (row_start + offs_col[None, :]) * H + offs_row[:, None], mask=mask, other=0.0)
    return tl.load(w_ptr + (row_start + offs_row[:, None]) * H + offs_col[None, :], mask=mask, other=0.0)


@triton.jit
def _persistent_step(
    h_prev, w_i, w_f, w_g, w_o, projection_ptr, bias_ptr, h_state_ptr, c_state_ptr, c_slots, output_ptr,
    hidden_saved_ptr, gates_ptr, step, active, time, offs_b, offs_h, mask, h_mask, B, H,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One step of the persistent forwards: h_{t-1}·W_hhᵀ with W_hh on chip, then the fused gate update
    into the ping-pong h slots, the cell-state slots and (training) the saved gates."""
    state_size = B * H
    pre_i = tl.dot(h_prev, w_i, input_precision=DOT_PRECISION)
    pre_f = tl.dot(h_prev, w_f, input_precision=DOT_PRECISION)
    pre_g = tl.dot(h_prev, w_g, input_precision=DOT_PRECISION)
    pre_o = tl.dot(h_prev, w_o, input_precision=DOT_PRECISION)
    pre_i, pre_f, pre_g, pre_o = _add_input_projection(
        pre_i, pre_f, pre_g, pre_o, projection_ptr, time, B, H, offs_b, offs_h, mask
    )
    if HAS_BIAS:
        pre_i, pre_f, pre_g, pre_o = _add_bias(pre_i, pre_f, pre_g, pre_o, bias_ptr, H, offs_h, h_mask)
    _forward_epilogue(
        pre_i, pre_f, pre_g, pre_o, active, time, offs_b, offs_h, mask, B, H,
        h_state_ptr + (step % 2) * state_size, c_state_ptr + tl.cast(step % c_slots, tl.int64) * state_size,
        h_state_ptr + ((step + 1) % 2) * state_size,
        c_state_ptr + tl.cast((step + 1) % c_slots, tl.int64) * state_size,
        output_ptr, hidden_saved_ptr, gates_ptr + tl.cast(step, tl.int64) * (4 * state_size),
        HAS_LENGTHS, True, STORE_FOR_BACKWARD, STORE_FOR_BACKWARD,
    )


@triton.jit
def lstm_sequence_forward_persistent_kernel(
    projection_ptr, w_hh_ptr, bias_ptr, lengths_ptr, h_state_ptr, c_state_ptr, c_slots,
    output_ptr, hidden_saved_ptr, gates_ptr,
    B, H, T,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    BLOCK_B: tl.constexpr, HIDDEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """All T steps for one batch tile and every hidden unit, W_hhᵀ resident in registers.

    A program only ever reads state rows it wrote itself, so no program waits for another; the
    barrier per step orders this program's global stores of h before its threads read them back.
    h ping-pongs between two slots; c uses ``c_slots`` slots (T + 1 when backward needs them all).
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, HIDDEN)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    w_i = _load_gate_block(w_hh_ptr, 0, H, offs_h, offs_h, True)
    w_f = _load_gate_block(w_hh_ptr, H, H, offs_h, offs_h, True)
    w_g = _load_gate_block(w_hh_ptr, 2 * H, H, offs_h, offs_h, True)
    w_o = _load_gate_block(w_hh_ptr, 3 * H, H, offs_h, offs_h, True)
    state = offs_b[:, None] * H + offs_h[None, :]
    state_size = B * H
    for step in range(0, T):
        _, active, time = _row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        h_in_ptr = h_state_ptr + (step % 2) * state_size
        h_prev = tl.load(h_in_ptr + state, mask=mask, other=0.0)
        _persistent_step(
            h_prev, w_i, w_f, w_g, w_o, projection_ptr, bias_ptr, h_state_ptr, c_state_ptr, c_slots, output_ptr,
            hidden_saved_ptr, gates_ptr, step, active, time, offs_b, offs_h, mask, h_mask, B, H,
            HAS_BIAS, HAS_LENGTHS, STORE_FOR_BACKWARD, DOT_PRECISION,
        )
        tl.debug_barrier()


@triton.jit
def lstm_sequence_forward_grid_kernel(
    projection_ptr, w_hh_ptr, bias_ptr, lengths_ptr, h_state_ptr, c_state_ptr, c_slots,
    output_ptr, hidden_saved_ptr, gates_ptr, barrier_ptr,
    B, H, T,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, STORE_FOR_BACKWARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, HIDDEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """All T steps for every batch row and one tile of hidden units, its W_hhᵀ columns in registers.

    Step t needs all of h_{t-1}, written by every program: h ping-pongs between two global slots and
    the programs meet at a barrier after each step (a counter in global memory, zeroed before launch,
    that reaches (t + 1) · programs once every program has stored step t). Two slots suffice: a
    program writes slot t % 2 again only after that barrier, when every read of it has completed.
    Correct for any grid, but a program spins until all others arrive: the launcher must keep the
    grid ≤ the programs resident at once (≤ SM count), and launch one program under the interpreter.
    """
    num_programs = tl.num_programs(0)
    offs_b = tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, HIDDEN)
    b_mask, h_mask, k_mask = offs_b < B, offs_h < H, offs_k < H
    mask = b_mask[:, None] & h_mask[None, :]
    # Gate q's (HIDDEN, BLOCK_H) block of W_hhᵀ: W_hh[q·H + offs_h, offs_k], loaded once.
    w_mask = k_mask[:, None] & h_mask[None, :]
    w_columns = w_hh_ptr + offs_h[None, :] * H + offs_k[:, None]
    w_i = tl.load(w_columns, mask=w_mask, other=0.0)
    w_f = tl.load(w_columns + H * H, mask=w_mask, other=0.0)
    w_g = tl.load(w_columns + 2 * H * H, mask=w_mask, other=0.0)
    w_o = tl.load(w_columns + 3 * H * H, mask=w_mask, other=0.0)
    every_unit = offs_b[:, None] * H + offs_k[None, :]
    every_unit_mask = b_mask[:, None] & k_mask[None, :]
    state_size = B * H
    for step in range(0, T):
        _, active, time = _row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        h_in_ptr = h_state_ptr + (step % 2) * state_size
        # Other SMs wrote most of h_{t-1}: read it from L2 (.cg), never from a stale L1 line.
        h_prev = tl.load(h_in_ptr + every_unit, mask=every_unit_mask, other=0.0, cache_modifier=".cg")
        _persistent_step(
            h_prev, w_i, w_f, w_g, w_o, projection_ptr, bias_ptr, h_state_ptr, c_state_ptr, c_slots, output_ptr,
            hidden_saved_ptr, gates_ptr, step, active, time, offs_b, offs_h, mask, h_mask, B, H,
            HAS_BIAS, HAS_LENGTHS, STORE_FOR_BACKWARD, DOT_PRECISION,
        )
        # Grid barrier. The CTA barrier orders every thread's stores of h_t before the (one-thread,
        # scalar) release increment; the acquire that sees the target orders the next step's loads.
        tl.debug_barrier()
        target = (step + 1) * num_programs
        arrived = tl.atomic_add(barrier_ptr, 1, sem="acq_rel", scope="gpu") + 1
        while arrived < target:
            # A compare-and-swap that never swaps (the count is never negative) reads the counter
            # atomically; an atomic add of 0 is folded away by the compiler, leaving a loop that never ends.
            arrived = tl.atomic_cas(barrier_ptr, -1, -1, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def lstm_step_backward_kernel(
    dgates_ptr, w_hh_ptr, grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, lengths_ptr,
    step, B, H, T,
    HAS_NEXT: tl.constexpr, HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Iteration ``step`` of backward through time for one tile (the cell is T = 1, step 0).

    dh = dgates_{step+1} · W_hh (K = 4H, read at each row's own time) + the output and h_n gradients;
    the epilogue writes dgates_step (time order) and the carried dc in place.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    length, active, time = _row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
    dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if HAS_NEXT:
        _, _, time_next = _row_schedule(step + 1, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = dgates_ptr + (time_next[:, None] * B + offs_b[:, None]) * (4 * H) + offs_k[None, :]
        w_ptrs = w_hh_ptr + offs_k[:, None] * H + offs_h[None, :]
        for k_start in range(0, 4 * H, BLOCK_K):
            k_mask = (k_start + offs_k) < 4 * H
            a = tl.load(a_ptrs, mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            dh = tl.dot(a, w, dh, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * H
    _backward_epilogue(
        dh, step, length, active, time, offs_b, offs_h, mask, B, H,
        grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_prev_ptr, dgates_ptr,
        HAS_LENGTHS, HAS_GRAD_OUTPUT, HAS_GRAD_H_N,
    )


@triton.jit
def lstm_sequence_backward_persistent_kernel(
    dgates_ptr, w_hh_ptr, grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr, c_state_ptr, lengths_ptr,
    B, H, T,
    HAS_GRAD_OUTPUT: tl.constexpr, HAS_GRAD_H_N: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_B: tl.constexpr, HIDDEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """All T steps of backward through time for one batch tile, W_hh resident in registers.

    As in the forward, a program reads back only the dgates rows it wrote, after a barrier.
    """
    offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_h = tl.arange(0, HIDDEN)
    b_mask, h_mask = offs_b < B, offs_h < H
    mask = b_mask[:, None] & h_mask[None, :]
    w_i = _load_gate_block(w_hh_ptr, 0, H, offs_h, offs_h, False)
    w_f = _load_gate_block(w_hh_ptr, H, H, offs_h, offs_h, False)
    w_g = _load_gate_block(w_hh_ptr, 2 * H, H, offs_h, offs_h, False)
    w_o = _load_gate_block(w_hh_ptr, 3 * H, H, offs_h, offs_h, False)
    state_size = B * H
    for reverse_step in range(0, T):
        step = T - 1 - reverse_step
        length, active, time = _row_schedule(step, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        _, _, time_next = _row_schedule(step + 1, offs_b, b_mask, lengths_ptr, T, REVERSE, HAS_LENGTHS)
        # The last step has no successor: its loads are masked off and dh starts at zero.
        next_mask = mask & (step + 1 < T)
        row_next = (time_next[:, None] * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
        d_next = tl.load(dgates_ptr + row_next, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_i, input_precision=DOT_PRECISION)
        d_next = tl.load(dgates_ptr + row_next + H, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_f, dh, input_precision=DOT_PRECISION)
        d_next = tl.load(dgates_ptr + row_next + 2 * H, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_g, dh, input_precision=DOT_PRECISION)
        d_next = tl.load(dgates_ptr + row_next + 3 * H, mask=next_mask, other=0.0)
        dh = tl.dot(d_next, w_o, dh, input_precision=DOT_PRECISION)
        _backward_epilogue(
            dh, step, length, active, time, offs_b, offs_h, mask, B, H,
            grad_output_ptr, grad_h_n_ptr, dc_ptr, gates_ptr + tl.cast(step, tl.int64) * (4 * state_size),
            c_state_ptr + tl.cast(step, tl.int64) * state_size, dgates_ptr,
            HAS_LENGTHS, HAS_GRAD_OUTPUT, HAS_GRAD_H_N,
        )
        tl.debug_barrier()


# ----------------------------------------------------------------------------- launchers


def _step_grid(batch: int, hidden_size: int, config: tuple[int, int, int, int, int]) -> tuple[int, int]:
    block_b, block_h = config[0], config[1]
    return triton.cdiv(batch, block_b), triton.cdiv(hidden_size, block_h)


def _step_meta(config: tuple[int, int, int, int, int]) -> dict:
    block_b, block_h, block_k, num_warps, num_stages = config
    return dict(
        BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, DOT_PRECISION=_DOT_PRECISION,
        num_warps=num_warps, num_stages=num_stages,
    )


def _grid_meta(padded_hidden: int, block_h: int, dtype: torch.dtype) -> dict:
    # num_stages=1 for the same reason as the persistent kernel: no load may move above the barrier.
    return dict(
        BLOCK_B=GRID_BLOCK_B, BLOCK_H=block_h, HIDDEN=padded_hidden, DOT_PRECISION=_DOT_PRECISION,
        num_warps=_persistent_warps(padded_hidden, dtype, block_h), num_stages=1,
    )


def _check_grid_launch(batch: int, hidden_size: int, dtype: torch.dtype, programs: int, device: torch.device) -> None:
    """The grid kernel's preconditions, as errors: past them it would be wrong (batch), not launch
    (W_hh slices past shared memory) or hang (more programs than can be resident)."""
    if batch > GRID_BLOCK_B:
        raise ValueError(f"input: batch {batch} > {GRID_BLOCK_B}, the grid recurrence's one batch tile; use another recurrence")
    if hidden_pad(hidden_size) > GRID_MAX_HIDDEN[dtype]:
        raise ValueError(
            f"weight_hh: hidden size {hidden_size} in {dtype} is past the grid recurrence's on-chip W_hh limit "
            f"(padded {GRID_MAX_HIDDEN[dtype]}); use another recurrence"
        )
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        if programs > sm_count:
            raise ValueError(
                f"weight_hh: hidden size needs {programs} programs for the grid recurrence, more than the "
                f"{sm_count} SMs that can hold them all at once (its barrier would never complete)"
            )


def _persistent_meta(hidden_size: int, dtype: torch.dtype) -> dict:
    padded = hidden_pad(hidden_size)
    # num_stages=1: the software pipeliner would prefetch next step's h (or dgates) before this
    # step's stores and the barrier, reading a stale state.
    return dict(
        BLOCK_B=PERSISTENT_BLOCK_B, HIDDEN=padded, DOT_PRECISION=_DOT_PRECISION,
        num_warps=_persistent_warps(padded, dtype), num_stages=1,
    )


@on_input_device
def lstm_cell_forward(input, hx, cx, weight_ih, weight_hh, bias, save_gates: bool):
    """One fused step. ``bias`` is b_ih + b_hh in float32 (4H,) or None.

    Returns (hy, cy, gates): gates are the activated (i, f, g, o) as (B, 4H) when ``save_gates``
    (backward needs them), else an empty tensor.
    """
    batch, input_size = input.shape
    hidden_size = hx.shape[1]
    dtype, device = input.dtype, input.device
    hy = torch.empty((batch, hidden_size), dtype=dtype, device=device)
    cy = torch.empty((batch, hidden_size), dtype=dtype, device=device)
    gates = torch.empty((batch, 4 * hidden_size) if save_gates else (0,), dtype=dtype, device=device)
    config = step_config(batch)
    lstm_cell_forward_kernel[_step_grid(batch, hidden_size, config)](
        input.contiguous(), hx.contiguous(), cx.contiguous(), weight_ih.contiguous(), weight_hh.contiguous(),
        hy if bias is None else bias, hy, cy, gates if save_gates else hy,
        batch, input_size, hidden_size,
        HAS_BIAS=bias is not None, STORE_FOR_BACKWARD=save_gates, **_step_meta(config),
    )
    return hy, cy, gates


@on_input_device
def lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, gates):
    """Gradients of one step from its saved activated gates (either output gradient may be None).

    Returns (grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias).
    """
    batch, hidden_size = hx.shape
    dc = torch.zeros(hx.shape, dtype=torch.float32, device=hx.device) if grad_cy is None else grad_cy.float().contiguous().clone()
    dgates = torch.empty((batch, 4 * hidden_size), dtype=input.dtype, device=input.device)
    config = step_config(batch)
    lstm_step_backward_kernel[_step_grid(batch, hidden_size, config)](
        dgates, weight_hh, dc, dc if grad_hy is None else grad_hy.contiguous(), dc, gates, cx.contiguous(), dc,
        0, batch, hidden_size, 1,
        HAS_NEXT=False, HAS_GRAD_OUTPUT=False, HAS_GRAD_H_N=grad_hy is not None, HAS_LENGTHS=False, REVERSE=False,
        **_step_meta(config),
    )
    grad_bias = dgates.sum(0, dtype=torch.float32).to(input.dtype)
    return (
        dgates @ weight_ih, dgates @ weight_hh, dc.to(cx.dtype),
        dgates.t() @ input, dgates.t() @ hx, grad_bias,
    )


@on_input_device
def lstm_sequence_forward(
    input, h0, c0, weight_ih, weight_hh, bias, lengths, reverse: bool, save_for_backward: bool,
    recurrence: str | None = None,
):
    """One layer, one direction. ``bias``: b_ih + b_hh in float32 or None; ``lengths``: int64 (B,) or None.

    ``recurrence`` picks the recurrence kernel: "persistent", "grid", "stepwise", or "auto"/None
    (``choose_recurrence``, which honours PYATTN_LSTM_TRITON_RECURRENCE).
    Returns (output, h_n, c_n, gates, cell_states, hidden_before); the last three are what backward
    needs (empty unless ``save_for_backward``): activated gates per iteration (T, B, 4H), the float32
    cell state before each iteration and after the last (T + 1, B, H), and h before each step in
    time order (T, B, H).
    """
    steps, batch, input_size = input.shape
    hidden_size = h0.shape[1]
    dtype, device = input.dtype, input.device
    # The input projection of every step at once: one GEMM, off the sequential path.
    projection = torch.matmul(input.reshape(steps * batch, input_size), weight_ih.t()).view(steps, batch, 4 * hidden_size)
    weight_hh = weight_hh.contiguous()
    output = torch.empty((steps, batch, hidden_size), dtype=dtype, device=device)
    h_state = torch.empty((2, batch, hidden_size), dtype=dtype, device=device)
    h_state[0].copy_(h0)
    c_slots = steps + 1 if save_for_backward else 2
    c_state = torch.empty((c_slots, batch, hidden_size), dtype=torch.float32, device=device)
    c_state[0].copy_(c0)
    if save_for_backward:
        gates = torch.empty((steps, batch, 4 * hidden_size), dtype=dtype, device=device)
        hidden_before = torch.empty((steps, batch, hidden_size), dtype=dtype, device=device)
    else:
        gates = torch.empty((0,), dtype=dtype, device=device)
        hidden_before = torch.empty((0,), dtype=dtype, device=device)
    flags = dict(
        HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None, REVERSE=reverse,
        STORE_FOR_BACKWARD=save_for_backward,
    )
    bias_arg = output if bias is None else bias
    lengths_arg = output if lengths is None else lengths
    gates_arg = gates if save_for_backward else output
    hidden_arg = hidden_before if save_for_backward else output
    if recurrence is None or recurrence == "auto":
        recurrence = choose_recurrence(batch, hidden_size, dtype, device)
    if recurrence not in RECURRENCES:
        raise ValueError(f"recurrence={recurrence!r}: expected one of {list(RECURRENCES)}")
    if recurrence == "grid":
        programs = grid_programs(hidden_size, device)
        _check_grid_launch(batch, hidden_size, dtype, programs, device)
        padded = hidden_pad(hidden_size)
        block_h = GRID_BLOCK_H if programs > 1 else padded
        barrier = torch.zeros((1,), dtype=torch.int32, device=device)
        lstm_sequence_forward_grid_kernel[(programs,)](
            projection, weight_hh, bias_arg, lengths_arg, h_state, c_state, c_slots,
            output, hidden_arg, gates_arg, barrier, batch, hidden_size, steps,
            **flags, **_grid_meta(padded, block_h, dtype),
        )
    elif recurrence == "persistent":
        lstm_sequence_forward_persistent_kernel[(triton.cdiv(batch, PERSISTENT_BLOCK_B),)](
            projection, weight_hh, bias_arg, lengths_arg, h_state, c_state, c_slots,
            output, hidden_arg, gates_arg, batch, hidden_size, steps,
            **flags, **_persistent_meta(hidden_size, dtype),
        )
    else:
        config = step_config(batch)
        grid = _step_grid(batch, hidden_size, config)
        for step in range(steps):
            lstm_sequence_step_forward_kernel[grid](
                projection, weight_hh, bias_arg, lengths_arg,
                h_state[step % 2], c_state[step % c_slots], h_state[(step + 1) % 2], c_state[(step + 1) % c_slots],
                output, hidden_arg, gates_arg[step] if save_for_backward else gates_arg,
                step, batch, hidden_size, steps,
                **flags, **_step_meta(config),
            )
    h_n = h_state[steps % 2].clone()
    c_n = c_state[steps % c_slots].to(dtype, copy=True)
    cell_states = c_state if save_for_backward else torch.empty((0,), dtype=torch.float32, device=device)
    return output, h_n, c_n, gates, cell_states, hidden_before


@on_input_device
def lstm_sequence_backward(
    grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths, reverse: bool,
    gates, cell_states, hidden_before, persistent: bool | None = None,
):
    """Backward through time from the tensors ``lstm_sequence_forward`` saved (output gradients may be None).

    ``persistent`` picks the recurrence kernel; None: PYATTN_LSTM_TRITON_RECURRENCE's "persistent" or
    "stepwise" if set, else (auto, or grid, which has no backward form) the persistent one where W_hh
    fits registers.
    Returns (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias).
    """
    steps, batch, input_size = input.shape
    hidden_size = weight_hh.shape[1]
    dtype, device = input.dtype, input.device
    weight_hh = weight_hh.contiguous()
    dgates = torch.empty((steps, batch, 4 * hidden_size), dtype=dtype, device=device)
    if grad_c_n is None:
        dc = torch.zeros((batch, hidden_size), dtype=torch.float32, device=device)
    else:
        dc = grad_c_n.float().contiguous().clone()
    grad_output_arg = dc if grad_output is None else grad_output.contiguous()
    grad_h_n_arg = dc if grad_h_n is None else grad_h_n.contiguous()
    lengths_arg = dc if lengths is None else lengths
    flags = dict(
        HAS_GRAD_OUTPUT=grad_output is not None, HAS_GRAD_H_N=grad_h_n is not None,
        HAS_LENGTHS=lengths is not None, REVERSE=reverse,
    )
    if persistent is None:
        name = recurrence_from_environment()
        persistent = name == "persistent" or (name != "stepwise" and persistent_supported(hidden_size, dtype))
    if persistent:
        lstm_sequence_backward_persistent_kernel[(triton.cdiv(batch, PERSISTENT_BLOCK_B),)](
            dgates, weight_hh, grad_output_arg, grad_h_n_arg, dc, gates, cell_states, lengths_arg,
            batch, hidden_size, steps,
            **flags, **_persistent_meta(hidden_size, dtype),
        )
    else:
        config = step_config(batch)
        grid = _step_grid(batch, hidden_size, config)
        for step in range(steps - 1, -1, -1):
            lstm_step_backward_kernel[grid](
                dgates, weight_hh, grad_output_arg, grad_h_n_arg, dc, gates[step], cell_states[step], lengths_arg,
                step, batch, hidden_size, steps,
                HAS_NEXT=step < steps - 1, **flags, **_step_meta(config),
            )
    # Every weight gradient is one GEMM over all steps of the stacked gate gradients.
    flat_dgates = dgates.view(steps * batch, 4 * hidden_size)
    grad_input = torch.matmul(flat_dgates, weight_ih).view(steps, batch, input_size)
    grad_weight_ih = flat_dgates.t() @ input.reshape(steps * batch, input_size)
    grad_weight_hh = flat_dgates.t() @ hidden_before.view(steps * batch, hidden_size)
    grad_bias = flat_dgates.sum(0, dtype=torch.float32).to(dtype)
    # h0 fed each row's first iteration: at time 0, or at its own last step when reversed.
    if not reverse:
        first_dgates = dgates[0]
    elif lengths is None:
        first_dgates = dgates[steps - 1]
    else:
        first_time = (lengths - 1).clamp(min=0)
        first_dgates = dgates[first_time, torch.arange(batch, device=device)]
    grad_h0 = first_dgates @ weight_hh
    if grad_h_n is not None and lengths is not None:
        # A row of length 0 never steps: h_n is h0.
        grad_h0 = grad_h0 + torch.where((lengths == 0)[:, None], grad_h_n, torch.zeros_like(grad_h_n))
    return grad_input, grad_h0, dc.to(dtype), grad_weight_ih, grad_weight_hh, grad_bias


# ----------------------------------------------------------------------------- ahead-of-time specs

_TRITON_TYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _aot_specs() -> list[CompileSpec]:
    """Every kernel × dtype × config users reach, with every optional feature switched on."""
    specs = []
    for dtype, name in _TRITON_TYPE.items():
        t, f32, i64 = f"*{name}", "*fp32", "*i64"
        for config in STEP_CONFIGS.values():
            block_b, block_h, block_k, num_warps, num_stages = config
            blocks = dict(BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, DOT_PRECISION=_DOT_PRECISION)
            tag = f"{name},BB{block_b},BH{block_h},BK{block_k}"
            launch = dict(num_warps=num_warps, num_stages=num_stages)
            specs.append(CompileSpec(
                f"lstm_cell_forward[{tag}]", lstm_cell_forward_kernel,
                dict(x_ptr=t, h_ptr=t, c_ptr=t, w_ih_ptr=t, w_hh_ptr=t, bias_ptr=f32, h_out_ptr=t, c_out_ptr=t,
                     gates_ptr=t, B="i32", I="i32", H="i32", HAS_BIAS="constexpr", STORE_FOR_BACKWARD="constexpr",
                     **dict.fromkeys(blocks, "constexpr")),
                dict(HAS_BIAS=True, STORE_FOR_BACKWARD=True, **blocks), **launch,
            ))
            specs.append(CompileSpec(
                f"lstm_sequence_step_forward[{tag}]", lstm_sequence_step_forward_kernel,
                dict(projection_ptr=t, w_hh_ptr=t, bias_ptr=f32, lengths_ptr=i64, h_in_ptr=t, c_in_ptr=f32,
                     h_out_ptr=t, c_out_ptr=f32, output_ptr=t, hidden_saved_ptr=t, gates_ptr=t,
                     step="i32", B="i32", H="i32", T="i32", HAS_BIAS="constexpr", HAS_LENGTHS="constexpr",
                     REVERSE="constexpr", STORE_FOR_BACKWARD="constexpr", **dict.fromkeys(blocks, "constexpr")),
                dict(HAS_BIAS=True, HAS_LENGTHS=True, REVERSE=True, STORE_FOR_BACKWARD=True, **blocks), **launch,
            ))
            # The cell's backward reads c_prev in the input dtype; the layer's from the float32 states.
            for variant, c_prev_type, has_next in (("layer", f32, True), ("cell", t, False)):
                specs.append(CompileSpec(
                    f"lstm_step_backward[{variant},{tag}]", lstm_step_backward_kernel,
                    dict(dgates_ptr=t, w_hh_ptr=t, grad_output_ptr=t, grad_h_n_ptr=t, dc_ptr=f32, gates_ptr=t,
                         c_prev_ptr=c_prev_type, lengths_ptr=i64, step="i32", B="i32", H="i32", T="i32",
                         HAS_NEXT="constexpr", HAS_GRAD_OUTPUT="constexpr", HAS_GRAD_H_N="constexpr",
                         HAS_LENGTHS="constexpr", REVERSE="constexpr", **dict.fromkeys(blocks, "constexpr")),
                    dict(HAS_NEXT=has_next, HAS_GRAD_OUTPUT=has_next, HAS_GRAD_H_N=True, HAS_LENGTHS=has_next,
                         REVERSE=has_next, **blocks),
                    **launch,
                ))
        padded = 16
        while padded <= PERSISTENT_MAX_HIDDEN[dtype]:
            meta = _persistent_meta(padded, dtype)
            launch = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
            tag = f"{name},H{padded}"
            specs.append(CompileSpec(
                f"lstm_sequence_forward_persistent[{tag}]", lstm_sequence_forward_persistent_kernel,
                dict(projection_ptr=t, w_hh_ptr=t, bias_ptr=f32, lengths_ptr=i64, h_state_ptr=t, c_state_ptr=f32,
                     c_slots="i32", output_ptr=t, hidden_saved_ptr=t, gates_ptr=t, B="i32", H="i32", T="i32",
                     HAS_BIAS="constexpr", HAS_LENGTHS="constexpr", REVERSE="constexpr",
                     STORE_FOR_BACKWARD="constexpr", **dict.fromkeys(meta, "constexpr")),
                dict(HAS_BIAS=True, HAS_LENGTHS=True, REVERSE=True, STORE_FOR_BACKWARD=True, **meta), **launch,
            ))
            specs.append(CompileSpec(
                f"lstm_sequence_backward_persistent[{tag}]", lstm_sequence_backward_persistent_kernel,
                dict(dgates_ptr=t, w_hh_ptr=t, grad_output_ptr=t, grad_h_n_ptr=t, dc_ptr=f32, gates_ptr=t,
                     c_state_ptr=f32, lengths_ptr=i64, B="i32", H="i32", T="i32", HAS_GRAD_OUTPUT="constexpr",
                     HAS_GRAD_H_N="constexpr", HAS_LENGTHS="constexpr", REVERSE="constexpr",
                     **dict.fromkeys(meta, "constexpr")),
                dict(HAS_GRAD_OUTPUT=True, HAS_GRAD_H_N=True, HAS_LENGTHS=True, REVERSE=True, **meta), **launch,
            ))
            padded *= 2
        # Grid kernel: the hidden sizes auto reaches (past the persistent kernel, up to GRID_MAX_HIDDEN),
        # at the GPU's tile of GRID_BLOCK_H units (the single-program BLOCK_H = HIDDEN is interpreter-only).
        padded = 2 * PERSISTENT_MAX_HIDDEN[dtype]
        while padded <= GRID_MAX_HIDDEN[dtype]:
            meta = _grid_meta(padded, GRID_BLOCK_H, dtype)
            launch = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
            specs.append(CompileSpec(
                f"lstm_sequence_forward_grid[{name},H{padded},BH{GRID_BLOCK_H}]", lstm_sequence_forward_grid_kernel,
                dict(projection_ptr=t, w_hh_ptr=t, bias_ptr=f32, lengths_ptr=i64, h_state_ptr=t, c_state_ptr=f32,
                     c_slots="i32", output_ptr=t, hidden_saved_ptr=t, gates_ptr=t, barrier_ptr="*i32",
                     B="i32", H="i32", T="i32", HAS_BIAS="constexpr", HAS_LENGTHS="constexpr", REVERSE="constexpr",
                     STORE_FOR_BACKWARD="constexpr", **dict.fromkeys(meta, "constexpr")),
                dict(HAS_BIAS=True, HAS_LENGTHS=True, REVERSE=True, STORE_FOR_BACKWARD=True, **meta), **launch,
            ))
            padded *= 2
    return specs


AOT_SPECS = _aot_specs()
