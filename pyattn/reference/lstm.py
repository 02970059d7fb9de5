"""LSTM reference: one cell step and one layer in one direction, in plain PyTorch.

Gate order and math are torch's: gates = x W_ihᵀ + b_ih + h W_hhᵀ + b_hh split as (i, f, g, o);
c' = σ(f)·c + σ(i)·tanh(g); h' = σ(o)·tanh(c'), then h' W_hrᵀ when a projection is given.
Half-precision inputs are computed in float32 and cast back, as the kernels do.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gates_to_state(gates: torch.Tensor, cx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, dim=-1)
    cy = torch.sigmoid(forget_gate) * cx + torch.sigmoid(input_gate) * torch.tanh(cell_gate)
    hy = torch.sigmoid(output_gate) * torch.tanh(cy)
    return hy, cy


def lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    """One step. input (B, I), hx (B, H), cx (B, H), weight_ih (4H, I), weight_hh (4H, H) -> (hy, cy)."""
    dtype = input.dtype
    compute = _compute_dtype(dtype)
    gates = input.to(compute) @ weight_ih.to(compute).t() + hx.to(compute) @ weight_hh.to(compute).t()
    if bias_ih is not None:
        gates = gates + bias_ih.to(compute)
    if bias_hh is not None:
        gates = gates + bias_hh.to(compute)
    hy, cy = _gates_to_state(gates, cx.to(compute))
    return hy.to(dtype), cy.to(dtype)


def lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, reverse=False, lengths=None):
    """One layer, one direction over a padded sequence.

    input (T, B, I), h0 (B, P), c0 (B, H), weight_ih (4H, I), weight_hh (4H, P), weight_hr (P, H) or
    None (then P = H). ``lengths`` (B,) int64 or None: sequence b has ``lengths[b]`` valid steps; past
    them its state is frozen and its output is zero, and ``reverse`` starts at its own last step.
    Returns output (T, B, P), h_n (B, P), c_n (B, H).
    """
    dtype = input.dtype
    compute = _compute_dtype(dtype)
    steps = input.shape[0]
    # The input projection of every step at once: one GEMM, as the kernels do.
    projected = input.to(compute) @ weight_ih.to(compute).t()
    if bias_ih is not None:
        projected = projected + bias_ih.to(compute)
    if bias_hh is not None:
        projected = projected + bias_hh.to(compute)
    w_hh, w_hr = weight_hh.to(compute), None if weight_hr is None else weight_hr.to(compute)
    h, c = h0.to(compute), c0.to(compute)
    if lengths is None:
        valid = None
    else:
        lengths = lengths.to(device=input.device)
        valid = torch.arange(steps, device=input.device)[:, None] < lengths[None, :]  # (T, B)
    outputs = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    if reverse and valid is not None:
        # Align each sequence's own end with step T-1 so one reversed loop serves ragged lengths.
        shift = steps - lengths
        source_step = (torch.arange(steps, device=input.device)[:, None] - shift[None, :])  # (T, B)
        gather_index = source_step.clamp(min=0)
        projected = projected.gather(0, gather_index[:, :, None].expand(-1, -1, projected.shape[-1]))
        valid = source_step >= 0
    for t in order:
        gates = projected[t] + h @ w_hh.t()
        h_new, c_new = _gates_to_state(gates, c)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        if valid is not None:
            keep = valid[t][:, None]
            h = torch.where(keep, h_new, h)
            c = torch.where(keep, c_new, c)
            outputs[t] = torch.where(keep, h_new, torch.zeros_like(h_new))
        else:
            h, c = h_new, c_new
            outputs[t] = h_new
    output = torch.stack(outputs)
    if reverse and valid is not None:
        # Undo the alignment: output step s of sequence b sits at aligned step s + shift[b].
        target = torch.arange(steps, device=input.device)[:, None] + shift[None, :]
        in_range = target < steps
        output = output.gather(0, target.clamp(max=steps - 1)[:, :, None].expand(-1, -1, output.shape[-1]))
        output = torch.where(in_range[:, :, None], output, torch.zeros_like(output))
    return output.to(dtype), h.to(dtype), c.to(dtype)
