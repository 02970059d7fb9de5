"""The triton backend's packed LSTM layer: custom ops over ``pyattn.kernels.lstm.packed`` and their autograd.

A PackedSequence of unequal lengths runs in its own layout (``lstm_common.stacked``'s ``packed_layer``): the
input is the packed data (N, I), N = sum(lengths), batch_sizes the PackedSequence's (CPU int64), h0/c0 and
h_n/c_n in its sorted order, and every step computes only its batch_sizes[t] active rows (docs/lstm.md,
"PackedSequence"). Served by ``triton/persistent`` and ``triton/stepwise``; ``triton/grid`` takes it padded, in
its sorted order.
"""

from __future__ import annotations

import torch

from pyattn.ops import graphs
from pyattn.ops.lstm_common import (
    bias_gradients,
    combined_bias,
    differentiable_gradients,
    needs_grad,
    padded_packed_layer,
    require_saved,
)
from pyattn.reference import lstm as reference


def _run(recurrence: str, name: str, launcher, inputs: tuple, weights: tuple, options: tuple):
    """``launcher(*inputs, *weights)``; the stepwise recurrence (launches per step) through the CUDA-graph runner
    (``pyattn.ops.graphs``: batch_sizes, a host tensor among the inputs, keys the graph by value). The layout's
    device tensors are made before, so a capture copies nothing from the host."""
    if recurrence == "stepwise":
        return graphs.run(name, launcher, inputs, weights, (*options, recurrence))
    return launcher(*inputs, *weights)


@torch.library.custom_op("pyattn::triton_lstm_packed_layer_fwd", mutates_args=())
def triton_lstm_packed_layer_fwd(
    input: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None,
    bias_hh: torch.Tensor | None,
    weight_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor,
    reverse: bool,
    save_for_backward: bool,
    recurrence: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output (N, P), h_n, c_n, gates (N, 4H), cell_states (N, H) fp32, hidden_before (N, P)); the last three
    empty unless saving. ``recurrence``: "persistent" or "stepwise"."""
    from pyattn.kernels.lstm import packed

    def forward(input, h0, c0, bias, batch_sizes, offsets, lengths, weight_ih, weight_hh, weight_hr):
        return packed.lstm_packed_sequence_forward(
            input, h0, c0, weight_ih, weight_hh, bias, batch_sizes, reverse, save_for_backward,
            recurrence=recurrence, weight_hr=weight_hr, offsets=offsets, lengths=lengths,
        )

    _, offsets, lengths = packed.packed_layout(batch_sizes, input.device)
    inputs = (input, h0, c0, combined_bias(bias_ih, bias_hh), batch_sizes, offsets, lengths)
    return _run(recurrence, "triton_lstm_packed_layer_fwd", forward, inputs, (weight_ih, weight_hh, weight_hr),
                (reverse, save_for_backward))


@triton_lstm_packed_layer_fwd.register_fake
def _(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, reverse, save_for_backward,
      recurrence):
    rows = input.shape[0]
    hidden_size, state_size = c0.shape[1], h0.shape[1]
    if save_for_backward:
        gates = input.new_empty((rows, 4 * hidden_size))
        cell_states = input.new_empty((rows, hidden_size), dtype=torch.float32)
        hidden_before = input.new_empty((rows, state_size))
    else:
        gates, hidden_before = input.new_empty((0,)), input.new_empty((0,))
        cell_states = input.new_empty((0,), dtype=torch.float32)
    return (input.new_empty((rows, state_size)), h0.new_empty(h0.shape), c0.new_empty(c0.shape), gates, cell_states,
            hidden_before)


@torch.library.custom_op("pyattn::triton_lstm_packed_layer_bwd", mutates_args=())
def triton_lstm_packed_layer_bwd(
    grad_output: torch.Tensor | None,
    grad_h_n: torch.Tensor | None,
    grad_c_n: torch.Tensor | None,
    input: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    weight_hr: torch.Tensor | None,
    batch_sizes: torch.Tensor,
    gates: torch.Tensor,
    cell_states: torch.Tensor,
    hidden_before: torch.Tensor,
    reverse: bool,
    recurrence: str,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input (N, I), grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr); ``batch``
    (batch_sizes[0], for the fake kernel: a fake batch_sizes has no values)."""
    from pyattn.kernels.lstm import packed

    def backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, offsets, lengths, gates, cell_states,
                 hidden_before, weight_ih, weight_hh, weight_hr):
        return packed.lstm_packed_sequence_backward(
            grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, batch_sizes, reverse, gates, cell_states,
            hidden_before, recurrence=recurrence, weight_hr=weight_hr, offsets=offsets, lengths=lengths,
        )

    _, offsets, lengths = packed.packed_layout(batch_sizes, input.device)
    inputs = (grad_output, grad_h_n, grad_c_n, input, batch_sizes, offsets, lengths, gates, cell_states,
              hidden_before)
    return _run(recurrence, "triton_lstm_packed_layer_bwd", backward, inputs, (weight_ih, weight_hh, weight_hr),
                (reverse,))


@triton_lstm_packed_layer_bwd.register_fake
def _(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, batch_sizes, gates, cell_states,
      hidden_before, reverse, recurrence, batch):
    hidden_size, state_size = weight_hh.shape[0] // 4, weight_hh.shape[1]
    grad_weight_hr = weight_hh.new_empty((0,) if weight_hr is None else weight_hr.shape)
    return (
        input.new_empty(input.shape), input.new_empty((batch, state_size)), input.new_empty((batch, hidden_size)),
        weight_ih.new_empty(weight_ih.shape), weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty((weight_hh.shape[0],)), grad_weight_hr,
    )


def _reference_packed_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, reverse):
    """The reference's layer over packed rows (padded in sorted order and gathered back): the differentiable
    recomputation a double backward uses (named like the op's inputs: differentiable_gradients passes them so)."""
    return padded_packed_layer(reference.lstm_layer)(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                                     reverse, batch_sizes)


_FORWARD_PARAMETERS = ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr",
                       "batch_sizes", "reverse", "save_for_backward", "recurrence")
_SAVED_INPUTS = ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "batch_sizes")


def _setup_context(ctx, inputs, output):
    arguments = dict(zip(_FORWARD_PARAMETERS, inputs))
    _, _, _, gates, cell_states, hidden_before = output
    ctx.save_for_backward(*(arguments[name] for name in _SAVED_INPUTS), gates, cell_states, hidden_before)
    ctx.has_bias_ih, ctx.has_bias_hh = arguments["bias_ih"] is not None, arguments["bias_hh"] is not None
    ctx.reverse = arguments["reverse"]
    ctx.recurrence = arguments["recurrence"]
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zeros tensor


def _backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_saved):
    *inputs, gates, cell_states, hidden_before = ctx.saved_tensors
    gradients = dict.fromkeys(_FORWARD_PARAMETERS)
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (see differentiable_gradients)
        arguments = dict(zip(_SAVED_INPUTS, inputs), reverse=ctx.reverse)
        gradients.update(differentiable_gradients(_reference_packed_layer, arguments,
                                                  (grad_output, grad_h_n, grad_c_n)))
        gradients["batch_sizes"] = None
        return tuple(gradients.values())
    input, h0, _, weight_ih, weight_hh, _, _, weight_hr, batch_sizes = inputs
    require_saved(cell_states, "pyattn::triton_lstm_packed_layer_fwd")
    grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr = (
        triton_lstm_packed_layer_bwd(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr,
                                     batch_sizes, gates, cell_states, hidden_before, ctx.reverse, ctx.recurrence,
                                     h0.shape[0]))
    gradients.update(input=grad_input, h0=grad_h0, c0=grad_c0, weight_ih=grad_weight_ih, weight_hh=grad_weight_hh)
    gradients["bias_ih"], gradients["bias_hh"] = bias_gradients(grad_bias, ctx.has_bias_ih, ctx.has_bias_hh)
    gradients["weight_hr"] = None if weight_hr is None else grad_weight_hr
    return tuple(gradients.values())


triton_lstm_packed_layer_fwd.register_autograd(_backward, setup_context=_setup_context)


def packed_layer(recurrence: str):
    """``stacked``'s packed_layer for one recurrence ("persistent" or "stepwise")."""

    def triton_lstm_packed_layer(input, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None,
                                 reverse=False, batch_sizes=None):
        save = needs_grad(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
        output, h_n, c_n, *_ = triton_lstm_packed_layer_fwd(
            input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, batch_sizes, reverse, save, recurrence
        )
        return output, h_n, c_n

    return triton_lstm_packed_layer
