"""LSTM layer launchers for a PackedSequence's own layout: the active batch shrinks step by step (cuDNN's way).

The batch is in the PackedSequence's sorted order (lengths non-increasing), so iteration k's active rows are
exactly b < batch_sizes[k], in either direction (reversed, row b runs time lengths[b] - 1 - k). Every per-time
array is the packed data's layout, (sum(lengths), ·) with (t, b) at row offsets[t] + b, offsets the exclusive
cumsum of batch_sizes: the input projection, output, h (r) before each step, gates, c before each step,
dgates, dr and the input gradient. So the input projection and every weight-gradient GEMM run over the
sum(lengths) packed rows, not T·B, and no padded (T, B, ·) copy of the input exists.

* stepwise: step k's launch covers only its batch_sizes[k] active rows, ⌈batch_sizes[k] / BLOCK_B⌉ batch
  tiles (the tiles of the full batch's bucket, so one compiled config serves every step);
* persistent: each batch-tile program runs as many steps as its longest row (its first), reversed from each
  row's own last step; rows past their length are masked out of every load and store.

A row past its length is never written again, so its final h and c sit in the ping-pong slot its last step
wrote (``lengths % 2``); h_n and c_n are gathered from there. Kernels and helpers: ``sequence.py``,
``cell.py``, ``common.py`` (``PACKED``). The grid kernels have no packed form.
"""

from __future__ import annotations

import torch
import triton

from .._launch import on_input_device
from .cell import lstm_step_backward_kernel, lstm_step_projection_backward_kernel
from .configs import PERSISTENT_BLOCK_B, persistent_meta, step_backward_meta, step_config, step_meta
from .launch import _check_recurrence, _step_grid, persistent_unsupported_reason
from .sequence import (lstm_sequence_backward_persistent_kernel, lstm_sequence_forward_persistent_kernel,
                       lstm_sequence_step_forward_kernel, lstm_sequence_step_projection_kernel)

PACKED_RECURRENCES = ("persistent", "stepwise")


def packed_layout(batch_sizes: torch.Tensor, device: torch.device) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(active rows per step as host ints, offsets (T + 1,) int64, sorted lengths (B,) int64) of a PackedSequence's
    ``batch_sizes`` (a CPU int64 tensor, as torch keeps it); offsets and lengths on ``device``."""
    counts = batch_sizes.tolist()
    if not counts or any(later > earlier for earlier, later in zip(counts, counts[1:])) or counts[-1] <= 0:
        raise ValueError(f"batch_sizes must be positive and non-increasing (a PackedSequence's), got {counts}")
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    torch.cumsum(batch_sizes.to(torch.int64), 0, out=offsets[1:])
    lengths = (batch_sizes.to(torch.int64)[None, :] > torch.arange(counts[0])[:, None]).sum(1)
    return counts, offsets.to(device), lengths.to(device)


def _layout(batch_sizes, device, offsets, lengths):
    if offsets is None or lengths is None:
        return packed_layout(batch_sizes, device)
    return batch_sizes.tolist(), offsets, lengths


def _check(caller: str, recurrence: str, hidden_size: int, dtype: torch.dtype, proj_size: int) -> None:
    _check_recurrence(caller, recurrence, PACKED_RECURRENCES)
    if recurrence == "persistent":
        reason = persistent_unsupported_reason(hidden_size, dtype, proj_size)
        if reason is not None:
            raise ValueError(f"{caller}: recurrence='persistent' cannot run this call: {reason}")


@on_input_device
def lstm_packed_sequence_forward(
    input, h0, c0, weight_ih, weight_hh, bias, batch_sizes, reverse: bool, save_for_backward: bool, *,
    recurrence: str, weight_hr=None, offsets=None, lengths=None,
):
    """One layer, one direction over packed rows. ``input`` (N, I) is a PackedSequence's data (N = sum(lengths)),
    ``batch_sizes`` its CPU int64 (T,); h0 (B, P), c0 (B, H) in its sorted order; ``bias`` b_ih + b_hh in fp32 or
    None; ``weight_hr`` (P, H) or None. ``recurrence``: "persistent" or "stepwise".

    Returns (output (N, P), h_n (B, P), c_n (B, H), gates (N, 4H), cell_states (N, H) fp32 = c before each step,
    hidden_before (N, P)); h_n/c_n in the sorted order; the last three empty unless ``save_for_backward``.
    ``offsets``, ``lengths``: :func:`packed_layout`'s device tensors, where the caller has them (a CUDA-graph
    capture of this call must not copy from the host); else computed here.
    """
    rows_total, input_size = input.shape
    hidden_size = c0.shape[1]
    proj_size = 0 if weight_hr is None else weight_hr.shape[0]
    state_size = proj_size or hidden_size
    dtype, device = input.dtype, input.device
    _check("lstm_packed_sequence_forward", recurrence, hidden_size, dtype, proj_size)
    counts, offsets, lengths = _layout(batch_sizes, device, offsets, lengths)
    steps, batch = len(counts), counts[0]
    # The input projection of every packed row: one GEMM over sum(lengths) rows.
    projection = torch.matmul(input, weight_ih.t())
    weight_hh = weight_hh.contiguous()
    weight_hr_arg = weight_hh if weight_hr is None else weight_hr.contiguous()
    output = torch.empty((rows_total, state_size), dtype=dtype, device=device)
    h_state = torch.empty((2, batch, state_size), dtype=dtype, device=device)
    h_state[0].copy_(h0)
    c_state = torch.empty((2, batch, hidden_size), dtype=torch.float32, device=device)
    c_state[0].copy_(c0)
    if save_for_backward:
        gates = torch.empty((rows_total, 4 * hidden_size), dtype=dtype, device=device)
        cell_states = torch.empty((rows_total, hidden_size), dtype=torch.float32, device=device)
        hidden_before = torch.empty((rows_total, state_size), dtype=dtype, device=device)
    else:
        gates = torch.empty((0,), dtype=dtype, device=device)
        cell_states = torch.empty((0,), dtype=torch.float32, device=device)
        hidden_before = torch.empty((0,), dtype=dtype, device=device)
    flags = dict(HAS_BIAS=bias is not None, HAS_LENGTHS=True, REVERSE=reverse, STORE_FOR_BACKWARD=save_for_backward)
    packed = dict(offsets_ptr=offsets, PACKED=True)
    bias_arg = output if bias is None else bias
    gates_arg = gates if save_for_backward else output
    hidden_arg = hidden_before if save_for_backward else output
    cell_arg = cell_states if save_for_backward else c_state
    if recurrence == "persistent":
        lstm_sequence_forward_persistent_kernel[(triton.cdiv(batch, PERSISTENT_BLOCK_B),)](
            projection, weight_hh, weight_hr_arg, bias_arg, lengths, h_state, c_state, 2,
            output, hidden_arg, gates_arg, batch, hidden_size, state_size, steps,
            **flags, **persistent_meta(hidden_size, dtype, proj_size, packed=True), cell_saved_ptr=cell_arg, **packed,
        )
    else:
        config = step_config(batch, dtype, projection=proj_size > 0)
        cell_output = torch.empty((batch, hidden_size) if proj_size else (0,), dtype=dtype, device=device)
        cell_output_arg = cell_output if proj_size else output
        for step, active in enumerate(counts):
            # Only the active rows: B is this step's batch_sizes[step] (rows 0 .. active - 1 in sorted order).
            lstm_sequence_step_forward_kernel[_step_grid(active, hidden_size, config)](
                projection, weight_hh, bias_arg, lengths,
                h_state[step % 2], c_state[step % 2], h_state[(step + 1) % 2], c_state[(step + 1) % 2],
                output, hidden_arg, gates_arg, cell_output_arg,
                step, active, hidden_size, state_size, steps,
                **flags, PROJECTION=proj_size > 0, **step_meta(config), cell_saved_ptr=cell_arg, **packed,
            )
            if proj_size:
                lstm_sequence_step_projection_kernel[_step_grid(active, proj_size, config)](
                    cell_output, weight_hr_arg, lengths, h_state[step % 2], h_state[(step + 1) % 2], output,
                    hidden_arg, step, active, hidden_size, proj_size, steps,
                    HAS_LENGTHS=True, REVERSE=reverse, STORE_FOR_BACKWARD=save_for_backward,
                    **step_meta(config), **packed,
                )
    # A row's last step wrote its final state into slot lengths % 2, and nothing wrote it after.
    rows = torch.arange(batch, device=device)
    parity = lengths % 2
    h_n = h_state[parity, rows]
    c_n = c_state[parity, rows].to(dtype)
    return output, h_n, c_n, gates, cell_states, hidden_before


@on_input_device
def lstm_packed_sequence_backward(
    grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, batch_sizes, reverse: bool,
    gates, cell_states, hidden_before, *, recurrence: str, weight_hr=None, offsets=None, lengths=None,
):
    """Backward through time from what :func:`lstm_packed_sequence_forward` saved (output gradients may be None;
    grad_output (N, P) packed, grad_h_n/grad_c_n (B, ·) sorted). ``recurrence``: "persistent" or "stepwise";
    ``offsets``, ``lengths`` as the forward's.

    Returns (grad_input (N, I), grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr), the
    last empty without a projection.
    """
    rows_total, input_size = input.shape
    hidden_size = weight_hh.shape[0] // 4
    proj_size = 0 if weight_hr is None else weight_hr.shape[0]
    state_size = proj_size or hidden_size
    dtype, device = input.dtype, input.device
    _check("lstm_packed_sequence_backward", recurrence, hidden_size, dtype, proj_size)
    counts, offsets, lengths = _layout(batch_sizes, device, offsets, lengths)
    steps, batch = len(counts), counts[0]
    weight_hh = weight_hh.contiguous()
    weight_hr_arg = weight_hh if weight_hr is None else weight_hr.contiguous()
    dgates = torch.empty((rows_total, 4 * hidden_size), dtype=dtype, device=device)
    dr = torch.empty((rows_total, proj_size) if proj_size else (0,), dtype=dtype, device=device)
    if grad_c_n is None:
        dc = torch.zeros((batch, hidden_size), dtype=torch.float32, device=device)
    else:
        dc = grad_c_n.float().contiguous().clone()
    grad_output_arg = dc if grad_output is None else grad_output.contiguous()
    grad_h_n_arg = dc if grad_h_n is None else grad_h_n.contiguous()
    flags = dict(HAS_GRAD_OUTPUT=grad_output is not None, HAS_GRAD_H_N=grad_h_n is not None, HAS_LENGTHS=True,
                 REVERSE=reverse)
    packed = dict(offsets_ptr=offsets, PACKED=True)
    dr_arg = dr if proj_size else dc
    if recurrence == "persistent":
        lstm_sequence_backward_persistent_kernel[(triton.cdiv(batch, PERSISTENT_BLOCK_B),)](
            dgates, dr_arg, weight_hh, weight_hr_arg, grad_output_arg, grad_h_n_arg, dc, gates, cell_states,
            lengths, batch, hidden_size, state_size, steps,
            **flags, **persistent_meta(hidden_size, dtype, proj_size, packed=True), **packed,
        )
    else:
        config = step_config(batch, dtype, projection=proj_size > 0)
        for step in range(steps - 1, -1, -1):
            active = counts[step]
            if proj_size:
                lstm_step_projection_backward_kernel[_step_grid(active, proj_size, config)](
                    dgates, weight_hh, grad_output_arg, grad_h_n_arg, dr, lengths,
                    step, active, hidden_size, proj_size, steps,
                    HAS_NEXT=step < steps - 1, **flags, **step_meta(config), **packed,
                )
                step_flags = dict(flags, HAS_NEXT=False, HAS_GRAD_OUTPUT=False, HAS_GRAD_H_N=False)
            else:
                step_flags = dict(flags, HAS_NEXT=step < steps - 1)
            lstm_step_backward_kernel[_step_grid(active, hidden_size, config)](
                dgates, dr_arg, weight_hh, weight_hr_arg, grad_output_arg, grad_h_n_arg, dc,
                gates, cell_states, lengths,
                step, active, hidden_size, state_size, steps,
                PROJECTION=proj_size > 0, **step_flags, **step_backward_meta(config, dtype), **packed,
            )
    # Every weight gradient is one GEMM over the sum(lengths) packed rows.
    grad_input = torch.matmul(dgates, weight_ih)
    grad_weight_ih = dgates.t() @ input
    grad_weight_hh = dgates.t() @ hidden_before
    grad_bias = dgates.sum(0, dtype=torch.float32).to(dtype)
    if proj_size:
        # dW_hr = Σ drᵀ·m, m = σ(o)·tanh(c) with c = σ(f)·c_prev + σ(i)·tanh(g) rebuilt from the saved gates and
        # c before each step (as the backward kernels rebuild tanh c).
        activated = gates.float()
        input_gate, forget_gate, cell_gate, output_gate = activated.split(hidden_size, dim=1)
        cell = forget_gate * cell_states + input_gate * cell_gate
        grad_weight_hr = dr.t() @ (output_gate * torch.tanh(cell)).to(dtype)
    else:
        grad_weight_hr = torch.empty((0,), dtype=dtype, device=device)
    # h0 fed each row's first iteration: time 0 (packed rows 0 .. B-1), or reversed its own last step.
    if reverse:
        first_dgates = dgates[offsets[lengths - 1] + torch.arange(batch, device=device)]
    else:
        first_dgates = dgates[:batch]
    grad_h0 = first_dgates @ weight_hh
    return grad_input, grad_h0, dc.to(dtype), grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr
