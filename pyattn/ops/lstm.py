"""LSTM ops: the reference registration, and the Triton custom ops with their autograd.

Dispatch-level signatures (every backend's implementation has exactly these):
  lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh) -> (hy, cy)
  lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths)
      -> (output, h_n, c_n)
Request features: "projection" (weight_hr given), "lengths" (ragged batch).
"""

from __future__ import annotations

import torch

from pyattn._dispatch import Support, register
from pyattn.reference import lstm as reference

_ANY_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_EVERY_DEVICE = frozenset({"cpu", "cuda", "meta"})

register("reference", "lstm_cell", Support(devices=_EVERY_DEVICE, dtypes=_ANY_FLOAT))(reference.lstm_cell)
register(
    "reference", "lstm_layer", Support(devices=_EVERY_DEVICE, dtypes=_ANY_FLOAT, features=frozenset({"projection", "lengths"}))
)(reference.lstm_layer)


# ----------------------------------------------------------------------------- triton backend
# Custom ops wrap the launchers of pyattn.kernels.lstm, imported inside the op bodies so that
# ``import pyattn`` needs no Triton. The forward ops also return what their backward needs (empty
# tensors at inference), so the saved state is visible to torch.compile like any other output.

_TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def _combined_bias(bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None) -> torch.Tensor | None:
    """b_ih + b_hh in float32: the kernels add one bias to the float32 gate accumulators."""
    present = [bias.float() for bias in (bias_ih, bias_hh) if bias is not None]
    if not present:
        return None
    return (present[0] + present[1] if len(present) == 2 else present[0]).contiguous()


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors)


def _bias_gradients(ctx, grad_bias: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The same gradient for b_ih and b_hh (their sum enters the gates), as two tensors: .grad must not alias."""
    grad_bias_ih = grad_bias if ctx.has_bias_ih else None
    grad_bias_hh = (grad_bias.clone() if ctx.has_bias_ih else grad_bias) if ctx.has_bias_hh else None
    return grad_bias_ih, grad_bias_hh


def _require_saved(saved: torch.Tensor, op: str) -> None:
    if saved.numel() == 0:
        raise RuntimeError(
            f"{op}: backward called on a forward that saved nothing (save_for_backward=False); "
            "call the pyattn dispatch op, which saves when an input requires grad"
        )


@torch.library.custom_op("pyattn::triton_lstm_cell_fwd", mutates_args=())
def triton_lstm_cell_fwd(
    input: torch.Tensor,
    hx: torch.Tensor,
    cx: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None,
    bias_hh: torch.Tensor | None,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hy, cy, gates): gates are the activated (i, f, g, o) (B, 4H) if ``save_for_backward``, else empty."""
    from pyattn.kernels import lstm as kernels

    return kernels.lstm_cell_forward(
        input, hx, cx, weight_ih, weight_hh, _combined_bias(bias_ih, bias_hh), save_for_backward
    )


@triton_lstm_cell_fwd.register_fake
def _(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, save_for_backward):
    batch, hidden_size = hx.shape
    gates = input.new_empty((batch, 4 * hidden_size) if save_for_backward else (0,))
    return hx.new_empty(hx.shape), cx.new_empty(cx.shape), gates


@torch.library.custom_op("pyattn::triton_lstm_cell_bwd", mutates_args=())
def triton_lstm_cell_bwd(
    grad_hy: torch.Tensor | None,
    grad_cy: torch.Tensor | None,
    input: torch.Tensor,
    hx: torch.Tensor,
    cx: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias)."""
    from pyattn.kernels import lstm as kernels

    return kernels.lstm_cell_backward(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, gates)


@triton_lstm_cell_bwd.register_fake
def _(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, gates):
    return (
        input.new_empty(input.shape), hx.new_empty(hx.shape), cx.new_empty(cx.shape),
        weight_ih.new_empty(weight_ih.shape), weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty((weight_hh.shape[0],)),
    )


def _cell_setup_context(ctx, inputs, output):
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, _ = inputs
    _, _, gates = output
    ctx.save_for_backward(input, hx, cx, weight_ih, weight_hh, gates)
    ctx.has_bias_ih, ctx.has_bias_hh = bias_ih is not None, bias_hh is not None
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zeros tensor


def _cell_backward(ctx, grad_hy, grad_cy, _grad_gates):
    input, hx, cx, weight_ih, weight_hh, gates = ctx.saved_tensors
    _require_saved(gates, "pyattn::triton_lstm_cell_fwd")
    grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias = triton_lstm_cell_bwd(
        grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, gates
    )
    return (grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, *_bias_gradients(ctx, grad_bias), None)


triton_lstm_cell_fwd.register_autograd(_cell_backward, setup_context=_cell_setup_context)


@torch.library.custom_op("pyattn::triton_lstm_layer_fwd", mutates_args=())
def triton_lstm_layer_fwd(
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None,
    bias_hh: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    save_for_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, h_n, c_n, gates, cell_states, hidden_before); the last three are empty unless saving."""
    from pyattn.kernels import lstm as kernels

    return kernels.lstm_sequence_forward(
        input, h0, c0, weight_ih, weight_hh, _combined_bias(bias_ih, bias_hh), lengths, reverse, save_for_backward
    )


@triton_lstm_layer_fwd.register_fake
def _(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, save_for_backward):
    steps, batch, _ = input.shape
    hidden_size = h0.shape[1]
    if save_for_backward:
        gates = input.new_empty((steps, batch, 4 * hidden_size))
        cell_states = input.new_empty((steps + 1, batch, hidden_size), dtype=torch.float32)
        hidden_before = input.new_empty((steps, batch, hidden_size))
    else:
        gates, hidden_before = input.new_empty((0,)), input.new_empty((0,))
        cell_states = input.new_empty((0,), dtype=torch.float32)
    output = input.new_empty((steps, batch, hidden_size))
    return output, h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, cell_states, hidden_before


@torch.library.custom_op("pyattn::triton_lstm_layer_bwd", mutates_args=())
def triton_lstm_layer_bwd(
    grad_output: torch.Tensor | None,
    grad_h_n: torch.Tensor | None,
    grad_c_n: torch.Tensor | None,
    input: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    gates: torch.Tensor,
    cell_states: torch.Tensor,
    hidden_before: torch.Tensor,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias)."""
    from pyattn.kernels import lstm as kernels

    return kernels.lstm_sequence_backward(
        grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths, reverse,
        gates, cell_states, hidden_before,
    )


@triton_lstm_layer_bwd.register_fake
def _(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths, gates, cell_states, hidden_before, reverse):
    batch, hidden_size = input.shape[1], weight_hh.shape[1]
    return (
        input.new_empty(input.shape), input.new_empty((batch, hidden_size)), input.new_empty((batch, hidden_size)),
        weight_ih.new_empty(weight_ih.shape), weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty((weight_hh.shape[0],)),
    )


def _layer_setup_context(ctx, inputs, output):
    input, _, _, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, _ = inputs
    _, _, _, gates, cell_states, hidden_before = output
    ctx.save_for_backward(input, weight_ih, weight_hh, lengths, gates, cell_states, hidden_before)
    ctx.has_bias_ih, ctx.has_bias_hh = bias_ih is not None, bias_hh is not None
    ctx.reverse = reverse
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zeros tensor


def _layer_backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_saved):
    input, weight_ih, weight_hh, lengths, gates, cell_states, hidden_before = ctx.saved_tensors
    _require_saved(cell_states, "pyattn::triton_lstm_layer_fwd")
    grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias = triton_lstm_layer_bwd(
        grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths,
        gates, cell_states, hidden_before, ctx.reverse,
    )
    return (
        grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, *_bias_gradients(ctx, grad_bias),
        None, None, None,
    )


triton_lstm_layer_fwd.register_autograd(_layer_backward, setup_context=_layer_setup_context)


_TRITON_DEVICES = dict(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}), dtypes=_TRITON_DTYPES)


@register("triton", "lstm_cell", Support(**_TRITON_DEVICES))
def triton_lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    save = _needs_grad(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    hy, cy, _ = triton_lstm_cell_fwd(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, save)
    return hy, cy


@register("triton", "lstm_layer", Support(**_TRITON_DEVICES, features=frozenset({"lengths"})))
def triton_lstm_layer(
    input, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, reverse=False, lengths=None
):
    if weight_hr is not None:
        raise ValueError(
            "weight_hr: the triton LSTM has no projection (proj_size > 0); use the cuda or reference backend"
        )
    if lengths is not None:
        lengths = lengths.to(device=input.device, dtype=torch.int64)
    save = _needs_grad(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    output, h_n, c_n, *_ = triton_lstm_layer_fwd(
        input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, save
    )
    return output, h_n, c_n
