"""What every LSTM backend shares: the dispatch-level signatures, gradient conventions, the stack driver.

Dispatch-level signatures (every backend's implementation has exactly these; the functional layer
has validated every argument, applied autocast, and given unbatched input a batch axis):

  lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh) -> (hy, cy)
      input (B, I), hx/cx (B, H), weight_ih (4H, I), weight_hh (4H, H), biases (4H,) or None.
  lstm(input, hx, params, *, num_layers, bias, batch_first, dropout, training, bidirectional,
       proj_size) -> (output, (h_n, c_n))
      input (T, B, I), (B, T, I) with batch_first, or a PackedSequence; hx = (h_0 (L·D, B, P),
      c_0 (L·D, B, H)) in the user's batch order; params in torch.nn.LSTM's flat order. The output
      has the input's form (a PackedSequence for packed input).

Kernel backends implement one layer, one direction, and :func:`stacked` turns it into ``lstm``:

  layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths)
      -> (output (T, B, P), h_n (B, P), c_n (B, H)); lengths int64 (B,) or None (rows past their
      length keep their state and output zeros).

and optionally either, for a PackedSequence of unequal lengths in its own layout (no padded copy):

  packed_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, batch_sizes)
      -> (output (N, P), h_n (B, P), c_n (B, H)); input (N, I) is the packed data (N = sum(lengths),
      time-major, step t's batch_sizes[t] rows in sorted order), batch_sizes the CPU int64 (T,), h0/c0
      and h_n/c_n in the sorted order; output in the packed layout;

or ``sorted_padding=True``: the packed rows are laid out padded (T, B) once for the whole stack, in the
PackedSequence's sorted order (lengths non-increasing, so the rows that have ended at a step are the last
ones), and ``layer`` runs on that with the sorted lengths; the output is gathered back to the packed rows.

Request features: "projection" (proj_size > 0), "lengths" (a PackedSequence of unequal lengths).
Request sizes: batch, steps, input_size, hidden_size, proj_size, num_layers, directions.

Gradient conventions, the same on every backend: b_ih and b_hh get equal gradients as two tensors
(never aliased: ``.grad`` of two parameters must not share memory); a forward saves for backward
only when an input requires grad (``save_for_backward``); an output that took no part in the loss
gets no gradient tensor materialised.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

ANY_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
EVERY_DEVICE = frozenset({"cpu", "cuda", "meta"})


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether the forward must save what backward needs: grad mode on and an input requiring grad."""
    return torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors)


def combined_bias(bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None) -> torch.Tensor | None:
    """b_ih + b_hh in float32: the kernels add one bias to the float32 gate accumulators."""
    present = [bias.float() for bias in (bias_ih, bias_hh) if bias is not None]
    if not present:
        return None
    return (present[0] + present[1] if len(present) == 2 else present[0]).contiguous()


def bias_gradients(grad_bias: torch.Tensor, has_bias_ih: bool, has_bias_hh: bool):
    """The same gradient for b_ih and b_hh (their sum enters the gates), as two tensors: .grad must not alias."""
    grad_bias_ih = grad_bias if has_bias_ih else None
    grad_bias_hh = (grad_bias.clone() if has_bias_ih else grad_bias) if has_bias_hh else None
    return grad_bias_ih, grad_bias_hh


def require_saved(saved: torch.Tensor, op: str) -> None:
    """The forward ops return a 1-D empty tensor for what they did not save (a saved one keeps its batch
    axis, so an empty batch is no false alarm)."""
    if saved.dim() == 1 and saved.numel() == 0:
        raise RuntimeError(
            f"{op}: backward called on a forward that saved nothing (save_for_backward=False); "
            "call the pyattn dispatch op, which saves when an input requires grad"
        )


def differentiable_gradients(function: Callable, arguments: dict, output_grads) -> dict:
    """Gradients of ``function(**arguments)`` w.r.t. every tensor argument that requires grad, as a graph.

    A kernel backward is not itself differentiable; when autograd asks for one with ``create_graph=True``
    (grad mode is on inside the backward then), the ops recompute the call with the reference's plain
    PyTorch and differentiate that, so a second backward works, as with torch's own LSTM.
    """
    with torch.enable_grad():
        outputs = function(**arguments)
        names = [name for name, value in arguments.items() if isinstance(value, torch.Tensor) and value.requires_grad]
        pairs = [(output, grad) for output, grad in zip(outputs, output_grads) if grad is not None]
        grads = torch.autograd.grad([output for output, _ in pairs], [arguments[name] for name in names],
                                    [grad for _, grad in pairs], create_graph=True, allow_unused=True)
    return dict(zip(names, grads))


def _packed_layout(packed: PackedSequence, device: torch.device):
    """Where each packed row lives in the padded (T, B) grid, and each sequence's length, in user order.

    Packed rows are time-major; within step t the first ``batch_sizes[t]`` sequences in sorted order
    take part, and sorted position j is the user's sequence ``sorted_indices[j]``.
    """
    batch_sizes = packed.batch_sizes  # always an int64 CPU tensor
    steps, rows = batch_sizes.numel(), int(batch_sizes.sum())
    time_index = torch.repeat_interleave(torch.arange(steps), batch_sizes)
    step_start = torch.cumsum(batch_sizes, 0) - batch_sizes
    sorted_position = torch.arange(rows) - torch.repeat_interleave(step_start, batch_sizes)
    sorted_lengths = (batch_sizes[None, :] > torch.arange(int(batch_sizes[0]))[:, None]).sum(1)
    # The permutations live on the data's device: index there rather than copy them back (a sync).
    sorted_position, sorted_lengths = sorted_position.to(device), sorted_lengths.to(device)
    if packed.sorted_indices is None:
        batch_index, lengths = sorted_position, sorted_lengths
    else:
        batch_index = packed.sorted_indices[sorted_position]
        lengths = sorted_lengths[packed.unsorted_indices]
    return time_index.to(device), batch_index, lengths


LayerFunction = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _run_layers(run_layer: Callable, sequence, h_0, c_0, params, *, num_layers, bias, dropout, training,
                directions, proj_size):
    """Every (layer, direction) of the stack: ``run_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
    weight_hr, reverse)``; the directions' outputs concatenated on the last axis, dropout between layers in
    training, as torch does. Returns (last layer's output, h_n, c_n), the states stacked per (layer, direction)."""
    per_direction = len(params) // (num_layers * directions)
    final_h, final_c = [], []
    layer_input = sequence
    for index_layer in range(num_layers):
        direction_outputs = []
        for direction in range(directions):
            index = index_layer * directions + direction
            weights = params[index * per_direction:(index + 1) * per_direction]
            bias_ih, bias_hh = (weights[2], weights[3]) if bias else (None, None)
            weight_hr = weights[-1] if proj_size > 0 else None
            output, h_n, c_n = run_layer(layer_input, h_0[index].contiguous(), c_0[index].contiguous(), weights[0],
                                         weights[1], bias_ih, bias_hh, weight_hr, direction == 1)
            direction_outputs.append(output)
            final_h.append(h_n)
            final_c.append(c_n)
        layer_input = direction_outputs[0] if directions == 1 else torch.cat(direction_outputs, dim=-1)
        if dropout > 0 and training and index_layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    return layer_input, torch.stack(final_h), torch.stack(final_c)


def _lstm_on_packed_rows(layer: LayerFunction, packed_layer: LayerFunction, input: PackedSequence, hx, params,
                         **options):
    """A PackedSequence run in its own layout and sorted order: unequal lengths through ``packed_layer`` on the
    packed rows (the active batch shrinks per step), equal lengths through ``layer`` on the data viewed as
    (T, B, I) (a PackedSequence of equal lengths is that, in sorted order). hx in and h_n/c_n out are permuted
    between the user's order and the sorted one, as torch does."""
    batch_sizes, sorted_indices, unsorted_indices = input.batch_sizes, input.sorted_indices, input.unsorted_indices
    steps, batch = batch_sizes.numel(), int(batch_sizes[0])
    h_0, c_0 = _sorted_order(hx, sorted_indices)
    if int(batch_sizes[-1]) != batch:
        def run_layer(sequence, *arguments):
            return packed_layer(sequence, *arguments, batch_sizes)
    else:
        def run_layer(sequence, *arguments):
            output, h_n, c_n = layer(sequence.reshape(steps, batch, sequence.size(-1)), *arguments, None)
            return output.reshape(steps * batch, output.size(-1)), h_n, c_n
    output, h_n, c_n = _run_layers(run_layer, input.data.contiguous(), h_0, c_0, params, **options)
    if unsorted_indices is not None:
        h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
    return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)


def _sorted_order(hx, sorted_indices):
    h_0, c_0 = hx
    if sorted_indices is None:
        return h_0, c_0
    return h_0.index_select(1, sorted_indices), c_0.index_select(1, sorted_indices)


def _lstm_on_sorted_padding(layer: LayerFunction, input: PackedSequence, hx, params, **options):
    """A PackedSequence laid out padded (T, B) in its sorted order, once for the whole stack: each layer's
    output is already in that layout (rows past their length are zeros) and feeds the next as it is. The
    padded rows still cost the input projection; the recurrence skips what the kernels skip. hx in and
    h_n/c_n out are permuted between the user's order and the sorted one, as torch does."""
    batch_sizes, sorted_indices, unsorted_indices = input.batch_sizes, input.sorted_indices, input.unsorted_indices
    steps, batch = batch_sizes.numel(), int(batch_sizes[0])
    data = input.data
    if int(batch_sizes[-1]) == batch:  # equal lengths: the packed data is (T, B, ·) in sorted order, no mask
        layout, lengths = None, None
        sequence = data.reshape(steps, batch, data.size(-1))
    else:
        time_index, position, lengths = _packed_layout(PackedSequence(data, batch_sizes), data.device)
        layout = (time_index, position)
        sequence = data.new_zeros(steps, batch, data.size(-1)).index_put(layout, data)

    def run_layer(*arguments):
        return layer(*arguments, lengths)

    output, h_n, c_n = _run_layers(run_layer, sequence.contiguous(), *_sorted_order(hx, sorted_indices), params,
                                   **options)
    output = output.reshape(steps * batch, output.size(-1)) if layout is None else output[layout]
    if unsorted_indices is not None:
        h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
    return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)


def padded_packed_layer(layer: LayerFunction) -> LayerFunction:
    """One layer over packed rows, from a ``layer`` that takes the padded (T, B) layout with lengths: the rows
    laid out padded in the PackedSequence's sorted order, the output gathered back (``packed_layer``'s
    signature). What ``stacked(layer, sorted_padding=True)`` does once for a whole stack, for one layer (the
    reference's differentiable recomputation of a packed layer op).
    """

    def layer_on_sorted_rows(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, batch_sizes):
        steps, batch = batch_sizes.numel(), int(batch_sizes[0])
        time_index, position, lengths = _packed_layout(PackedSequence(input, batch_sizes), input.device)
        padded = input.new_zeros(steps, batch, input.size(-1)).index_put((time_index, position), input)
        output, h_n, c_n = layer(padded, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths)
        return output[time_index, position], h_n, c_n

    return layer_on_sorted_rows


def stacked(layer: LayerFunction, packed_layer: LayerFunction | None = None, *,
            sorted_padding: bool = False) -> Callable:
    """The dispatch-level ``lstm`` of a backend that implements one layer, one direction.

    Packed input goes to ``packed_layer`` in its own layout when the backend has one (see the module's
    docstring, :func:`_lstm_on_packed_rows`); with ``sorted_padding`` it is laid out padded once for the
    stack in its sorted order (:func:`_lstm_on_sorted_padding`: kernels that skip a batch tile whose rows
    have all ended, the CUDA kernels' ``tile_frozen``, then shrink each step's work with the active batch,
    a tile at a time, as cuDNN's do); otherwise it is laid out padded (T, B) in the user's batch order
    with per-row lengths when they differ. Each layer runs its directions, concatenates them, and applies
    dropout between layers in training, as torch does.
    """
    if packed_layer is not None and sorted_padding:
        raise ValueError("stacked: a backend takes packed input either in its packed layout or padded, not both")

    def lstm(input, hx, params, *, num_layers, bias, batch_first, dropout, training, bidirectional, proj_size):
        options = dict(num_layers=num_layers, bias=bias, dropout=dropout, training=training,
                       directions=2 if bidirectional else 1, proj_size=proj_size)
        packed = isinstance(input, PackedSequence)
        if packed and packed_layer is not None:
            return _lstm_on_packed_rows(layer, packed_layer, input, hx, params, **options)
        if packed and sorted_padding:
            return _lstm_on_sorted_padding(layer, input, hx, params, **options)
        lengths = None
        if packed:
            data = input.data
            steps, batch = input.batch_sizes.numel(), int(input.batch_sizes[0])
            time_index, batch_index, sequence_lengths = _packed_layout(input, data.device)
            sequence = data.new_zeros(steps, batch, data.size(-1)).index_put((time_index, batch_index), data)
            if int(input.batch_sizes[-1]) != batch:  # equal lengths need no masking
                lengths = sequence_lengths
        else:
            sequence = input.transpose(0, 1) if batch_first else input
        sequence = sequence.contiguous()

        def run_layer(*arguments):
            return layer(*arguments, lengths)

        output, h_n, c_n = _run_layers(run_layer, sequence, *hx, params, **options)
        if packed:
            output = PackedSequence(output[time_index, batch_index], input.batch_sizes, input.sorted_indices,
                                    input.unsorted_indices)
        elif batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    lstm.layer = layer  # the one-layer function, for tests and for a backend that wants to drive it itself
    lstm.packed_layer = packed_layer  # None where packed input is scattered to padded
    lstm.sorted_padding = sorted_padding
    return lstm
