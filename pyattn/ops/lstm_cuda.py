"""LSTM on the cuda backend: the ops of the CUDA extension (pyattn._C) — fake kernels, autograd, variants.

The ops are defined in C++ (csrc/registration.cpp), but the one marked Python; forward ops return, besides
their results, what backward needs when ``save_for_backward`` is set (empty tensors otherwise):

  pyattn::cuda_lstm_cell_fwd(input, hx, cx, weight_ih, weight_hh, bias_ih?, bias_hh?, save_for_backward)
      -> hy (B, H), cy (B, H), workspace (B, 4H) activated gates
  pyattn::cuda_lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, cy, workspace)
      -> grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias (4H,)
  pyattn::cuda_lstm_layer_fwd(input, h0, c0, weight_ih, weight_hh, bias_ih?, bias_hh?, reverse,
                              lengths?, save_for_backward, recurrence, weight_hr?=None)
      -> output (T, B, P), h_n (B, P), c_n (B, H), gates (T, B, 4H) activated, cell_states (T, B, H) float32
  pyattn::cuda_lstm_layer_fwd_checked(the same arguments)  (a Python custom op: the launchers' residency check at
                              run time, BackendUnavailableError on a refusal, then cuda_lstm_layer_fwd; what a
                              forced cuda/persistent runs under torch.compile)
  pyattn::cuda_lstm_layer_bwd(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                              output, gates, cell_states, reverse, lengths?, recurrence, weight_hr?=None)
      -> grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias (4H,),
         grad_weight_hr ((P, H); empty without weight_hr)

P = proj_size with ``weight_hr`` (P, H) (h_t = W_hr·(σ(o)·tanh(c_t)); h0, weight_hh's columns, output and
h_n are P wide), else P = H.

A PackedSequence reaches the layer ops padded in its sorted order, laid out once for the whole stack
(``cuda_lstm``: ``lstm_common.stacked(..., sorted_padding=True)``), so the kernels' ``tile_frozen`` skips the
batch tiles that have ended.

``recurrence`` is the variant's kernel: "persistent" (one cooperative kernel, W_hh slices resident in
shared memory, a grid-wide sync per step; raises when the layer does not fit on chip),
"stepwise" (one launch per step), or "persistent_or_stepwise" (the launchers decide by their residency
check: auto's choice where dispatch cannot ask that check first, under torch.compile).
``lengths`` (int64, (B,)) is served: rows past their length keep
their state and output zeros. Projection (``weight_hr``, feature "projection") is served by both
recurrences: the persistent kernels keep W_hr's rows on chip too and cross a second grid barrier per
step (m_t forward, dr_t backward); stepwise runs two launches per step.

Importing this module never fails: without the extension the variants say so in ``explain``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyattn._registry import BackendUnavailableError, Request, Support, Target, record_note, register
from pyattn.ops import graphs
from pyattn.ops.lstm_common import bias_gradients, differentiable_gradients, needs_grad, stacked
from pyattn.reference import lstm as reference

_DEVICES = frozenset({"cuda"})
_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
_MIN_CAPABILITY = (8, 0)  # the extension is built for sm_80 and sm_90a


def _extension_ops_loaded() -> bool:
    try:
        from pyattn import _extension

        _extension.extension_module()
    except ImportError:
        return False
    return hasattr(torch.ops.pyattn, "cuda_lstm_cell_fwd")


def _contiguous_or_none(tensor):
    return None if tensor is None else tensor.contiguous()


def _gradient(grad, like):
    """Autograd hands None for an output that took no part in the loss; the kernels want zeros."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _require_workspace(workspace: torch.Tensor, op: str) -> None:
    if workspace.numel() == 0:
        raise RuntimeError(
            f"{op}: backward needs the workspace the forward saves only with save_for_backward=True "
            "(the dispatch-level functions set it whenever an input requires grad)"
        )


# ---- fake kernels (shapes only, never data) ----


def _fake_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, save_for_backward):
    batch, hidden = hx.shape
    workspace = input.new_empty((batch if save_for_backward else 0, 4 * hidden))
    return input.new_empty((batch, hidden)), input.new_empty((batch, hidden)), workspace


def _fake_cell_backward(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, cy, workspace):
    return (
        torch.empty_like(input),
        torch.empty_like(hx),
        torch.empty_like(cx),
        torch.empty_like(weight_ih),
        torch.empty_like(weight_hh),
        input.new_empty((weight_ih.shape[0],)),
    )


def _fake_layer_forward(
    input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths, save_for_backward, recurrence,
    weight_hr=None,
):
    steps, batch = input.shape[0], input.shape[1]
    width, hidden = h0.shape[1], c0.shape[1]  # width: proj_size with weight_hr, else hidden_size
    saved_steps = steps if save_for_backward else 0
    return (
        input.new_empty((steps, batch, width)),
        input.new_empty((batch, width)),
        input.new_empty((batch, hidden)),
        input.new_empty((saved_steps, batch, 4 * hidden)),
        input.new_empty((saved_steps, batch, hidden), dtype=torch.float32),
    )


def _fake_layer_backward(
    grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates, cell_states, reverse, lengths,
    recurrence, weight_hr=None,
):
    return (
        torch.empty_like(input),
        torch.empty_like(h0),
        torch.empty_like(c0),
        torch.empty_like(weight_ih),
        torch.empty_like(weight_hh),
        input.new_empty((weight_ih.shape[0],)),
        input.new_empty((0,)) if weight_hr is None else torch.empty_like(weight_hr),
    )


# ---- autograd ----


def _skip_workspace_gradients(ctx, *workspace):
    """Workspace outputs carry no gradient; without this autograd would build zero tensors as big as
    them for every backward (and zeros for unused results, which _gradient makes only when needed)."""
    ctx.mark_non_differentiable(*workspace)
    ctx.set_materialize_grads(False)


# Argument names of the forward ops' schemas (filled once the extension is loaded, below), so that
# setup_context reads inputs by name.
_SCHEMA_NAMES: dict[str, tuple[str, ...]] = {}


def _schema_names(op: str) -> tuple[str, ...]:
    return _SCHEMA_NAMES[op]


def _cell_setup_context(ctx, inputs, output):
    arguments = dict(zip(_schema_names("cuda_lstm_cell_fwd"), inputs))
    _hy, cy, workspace = output
    ctx.save_for_backward(*(arguments[name] for name in _CELL_INPUTS), cy, workspace)
    _skip_workspace_gradients(ctx, workspace)
    ctx.has_bias_ih, ctx.has_bias_hh = arguments["bias_ih"] is not None, arguments["bias_hh"] is not None


_CELL_INPUTS = ("input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")
_LAYER_INPUTS = ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "lengths", "weight_hr")


def _cell_backward(ctx, grad_hy, grad_cy, _grad_workspace):
    *inputs, cy, workspace = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (see differentiable_gradients)
        gradients = dict.fromkeys(_schema_names("cuda_lstm_cell_fwd"))
        gradients.update(differentiable_gradients(reference.lstm_cell, dict(zip(_CELL_INPUTS, inputs)),
                                                  (grad_hy, grad_cy)))
        return tuple(gradients.values())
    input, hx, cx, weight_ih, weight_hh, _, _ = inputs
    if input.shape[0] > 0:  # an empty batch saves an empty workspace and needs none
        _require_workspace(workspace, "pyattn::cuda_lstm_cell_fwd")
    grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias = torch.ops.pyattn.cuda_lstm_cell_bwd(
        _gradient(grad_hy, cy), _gradient(grad_cy, cy), input, hx, cx, weight_ih, weight_hh, cy, workspace
    )
    gradients = dict.fromkeys(_schema_names("cuda_lstm_cell_fwd"))
    gradients.update(input=grad_input, hx=grad_hx, cx=grad_cx, weight_ih=grad_weight_ih, weight_hh=grad_weight_hh)
    gradients["bias_ih"], gradients["bias_hh"] = bias_gradients(grad_bias, ctx.has_bias_ih, ctx.has_bias_hh)
    return tuple(gradients.values())


def _layer_setup_context(ctx, inputs, output):
    arguments = dict(zip(_schema_names("cuda_lstm_layer_fwd"), inputs))
    arguments.setdefault("weight_hr", None)  # a defaulted trailing argument may not be among the inputs
    layer_output, _h_n, _c_n, gates, cell_states = output
    ctx.save_for_backward(*(arguments[name] for name in _LAYER_INPUTS), layer_output, gates, cell_states)
    ctx.num_inputs = len(inputs)
    _skip_workspace_gradients(ctx, gates, cell_states)
    ctx.has_bias_ih, ctx.has_bias_hh = arguments["bias_ih"] is not None, arguments["bias_hh"] is not None
    ctx.reverse, ctx.recurrence = arguments["reverse"], arguments["recurrence"]


def _layer_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cell_states):
    *inputs, layer_output, gates, cell_states = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (see differentiable_gradients)
        arguments = dict(zip(_LAYER_INPUTS, inputs), reverse=ctx.reverse)
        gradients = dict.fromkeys(_schema_names("cuda_lstm_layer_fwd"))
        gradients.update(differentiable_gradients(reference.lstm_layer, arguments, (grad_output, grad_h_n, grad_c_n)))
        return tuple(gradients.values())[:ctx.num_inputs]
    input, h0, c0, weight_ih, weight_hh, _, _, lengths, weight_hr = inputs
    if input.shape[0] > 0 and input.shape[1] > 0:  # no steps or an empty batch: nothing to save, none needed
        _require_workspace(gates, "pyattn::cuda_lstm_layer_fwd")
    grads = _layer_backward_op(
        _gradient(grad_output, layer_output), _gradient(grad_h_n, h0), _gradient(grad_c_n, c0), input, h0, c0,
        weight_ih, weight_hh, layer_output, gates, cell_states, ctx.reverse, lengths, ctx.recurrence,
        weight_hr=weight_hr,
    )
    grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr = grads
    gradients = dict.fromkeys(_schema_names("cuda_lstm_layer_fwd"))
    gradients.update(input=grad_input, h0=grad_h0, c0=grad_c0, weight_ih=grad_weight_ih, weight_hh=grad_weight_hh)
    gradients["bias_ih"], gradients["bias_hh"] = bias_gradients(grad_bias, ctx.has_bias_ih, ctx.has_bias_hh)
    gradients["weight_hr"] = None if weight_hr is None else grad_weight_hr
    # One gradient per input the op received (a defaulted trailing weight_hr may not be one of them).
    return tuple(gradients.values())[:ctx.num_inputs]


# ---- CUDA graphs of the stepwise recurrence (T launches per call; docs/lstm.md, "CUDA graphs") ----


def _layer_forward_op(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths, save_for_backward,
                      recurrence, weight_hr=None):
    """``cuda_lstm_layer_fwd``; with recurrence "stepwise" through one CUDA-graph replay where graphs apply."""
    op = torch.ops.pyattn.cuda_lstm_layer_fwd

    def forward(input, h0, c0, lengths, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr):
        projection = () if weight_hr is None else (weight_hr,)  # the op's trailing default
        return op(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths, save_for_backward,
                  recurrence, *projection)

    inputs, weights = (input, h0, c0, lengths), (weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    if recurrence != "stepwise":
        return forward(*inputs, *weights)
    return graphs.run("cuda_lstm_layer_fwd", forward, inputs, weights, (reverse, save_for_backward, recurrence))


def _layer_backward_op(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates,
                       cell_states, reverse, lengths, recurrence, *, weight_hr=None):
    """``cuda_lstm_layer_bwd``; with recurrence "stepwise" through one CUDA-graph replay where graphs apply."""
    op = torch.ops.pyattn.cuda_lstm_layer_bwd

    def backward(grad_output, grad_h_n, grad_c_n, input, h0, c0, output, gates, cell_states, lengths, weight_ih,
                 weight_hh, weight_hr):
        projection = () if weight_hr is None else (weight_hr,)
        return op(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates, cell_states,
                  reverse, lengths, recurrence, *projection)

    inputs = (grad_output, grad_h_n, grad_c_n, input, h0, c0, output, gates, cell_states, lengths)
    weights = (weight_ih, weight_hh, weight_hr)
    if recurrence != "stepwise":
        return backward(*inputs, *weights)
    return graphs.run("cuda_lstm_layer_bwd", backward, inputs, weights, (reverse, recurrence))


class _GraphedStepwiseLayer(torch.autograd.Function):
    """``cuda_lstm_layer_fwd`` through the graph runner, with the op's own autograd (setup_context, backward):
    the runner calls the op on detached static buffers, so the graph must sit below autograd, not inside it."""

    @staticmethod
    def forward(*arguments):
        return _layer_forward_op(*arguments)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _layer_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, *grads):
        return _layer_backward(ctx, *grads)


# ---- dispatch variants (the signatures every backend shares) ----


def lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    """One LSTM step on the CUDA kernels: (B, I), (B, H), (B, H), (4H, I), (4H, H) -> hy, cy."""
    save_for_backward = needs_grad(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    hy, cy, _workspace = torch.ops.pyattn.cuda_lstm_cell_fwd(
        input.contiguous(), hx.contiguous(), cx.contiguous(), weight_ih.contiguous(), weight_hh.contiguous(),
        _contiguous_or_none(bias_ih), _contiguous_or_none(bias_hh), save_for_backward,
    )
    return hy, cy


def lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, reverse=False,
               lengths=None, *, recurrence: str, checked: bool = False):
    """One LSTM layer, one direction, on the CUDA kernels: input (T, B, I) -> output (T, B, P), h_n (B, P),
    c_n (B, H); P = proj_size with ``weight_hr`` (P, H), else H.

    ``recurrence``: "persistent", "stepwise" or "persistent_or_stepwise" (the variant's kernel; dispatch passes it).
    ``checked`` (recurrence "persistent"): through ``pyattn::cuda_lstm_layer_fwd_checked``, which asks the launchers'
    residency check at run time and raises BackendUnavailableError with its reason (forced cuda/persistent under
    torch.compile, where the check cannot be asked while tracing).
    """
    save_for_backward = needs_grad(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
    arguments = (
        input.contiguous(), h0.contiguous(), c0.contiguous(), weight_ih.contiguous(), weight_hh.contiguous(),
        _contiguous_or_none(bias_ih), _contiguous_or_none(bias_hh), bool(reverse),
        None if lengths is None else lengths.to(device=input.device, dtype=torch.int64).contiguous(),
        save_for_backward, recurrence,
    )
    if weight_hr is not None:
        arguments += (weight_hr.contiguous(),)
    if recurrence == "stepwise" and graphs.applies(arguments):
        output, h_n, c_n, _gates, _cell_states = _GraphedStepwiseLayer.apply(*arguments)
    elif checked:
        output, h_n, c_n, _gates, _cell_states = cuda_lstm_layer_fwd_checked(*arguments)
    else:
        output, h_n, c_n, _gates, _cell_states = torch.ops.pyattn.cuda_lstm_layer_fwd(*arguments)
    return output, h_n, c_n


def _layer(recurrence: str):
    def cuda_lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths):
        return lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths,
                          recurrence=recurrence)

    return cuda_lstm_layer


# ---- the persistent kernels' launch check, asked before launching ----

# (batch, hidden, proj_size, dtype, device index) -> the launchers' refusal ("" when they launch): the occupancy
# API's answer for one device never changes. Asked eagerly only (see _checked_persistent_layer for compile).
_PERSISTENT_REFUSALS: dict[tuple, str] = {}


def _persistent_refusal(batch: int, hidden: int, proj_size: int, dtype: torch.dtype, device_index: int) -> str:
    key = (batch, hidden, proj_size, dtype, device_index)
    refusal = _PERSISTENT_REFUSALS.get(key)
    if refusal is None:
        refusal = torch.ops.pyattn.cuda_lstm_persistent_resident(batch, hidden, proj_size, dtype, device_index)
        _PERSISTENT_REFUSALS[key] = refusal
    return refusal


def persistent_launch_refusal(input: torch.Tensor, c0: torch.Tensor, weight_hr) -> str | None:
    """Why ``cuda_lstm_layer_fwd``/``_bwd`` with recurrence "persistent" would refuse this layer: the launchers'
    own check (the occupancy API with the kernels' registers as compiled, shared memory, SMs), asked without
    launching; None when both kernels launch. None also where the check cannot be asked: an extension built
    before it had the query (the launch then raises as it always did)."""
    if not _RESIDENCY_QUERY_LOADED:
        return None
    batch, hidden = input.shape[1], c0.shape[1]
    proj_size = 0 if weight_hr is None else weight_hr.shape[0]
    device = input.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _persistent_refusal(batch, hidden, proj_size, input.dtype, index) or None


def _persistent_refusal_message(refusal: str) -> str:
    return f"pyattn backend 'cuda/persistent' cannot serve this call: {refusal}"


@torch.library.custom_op("pyattn::cuda_lstm_layer_fwd_checked", mutates_args=())
def cuda_lstm_layer_fwd_checked(
    input: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor], reverse: bool, lengths: Optional[Tensor], save_for_backward: bool, recurrence: str,
    weight_hr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``cuda_lstm_layer_fwd`` (the same schema, recurrence "persistent") after the launchers' residency check for
    these sizes, asked when the op runs: a refusal raises BackendUnavailableError naming the reason (the check
    covers the backward's kernel too). What a forced cuda/persistent runs under torch.compile: a Python op, so the
    check runs with each call's real sizes and the error keeps its type through the compiled graph."""
    refusal = persistent_launch_refusal(input, c0, weight_hr)
    if refusal is not None:
        raise BackendUnavailableError(_persistent_refusal_message(refusal))
    projection = () if weight_hr is None else (weight_hr,)
    # The C++ op's outputs are fresh tensors (h_n a clone of output's last row): none aliases an input or another.
    return tuple(torch.ops.pyattn.cuda_lstm_layer_fwd(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse,
                                                      lengths, save_for_backward, recurrence, *projection))


def _checked_persistent_layer(fallback: bool):
    """cuda/persistent with the launchers' check asked first. ``fallback`` (auto picked the variant): a refusal runs
    the layer on the stepwise kernels with a note; otherwise (cuda/persistent forced) it raises
    BackendUnavailableError with the reason."""
    persistent, stepwise = _layer("persistent"), _layer("stepwise")
    decided_at_launch = _layer("persistent_or_stepwise")

    def cuda_lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths):
        if torch.compiler.is_compiling() and _RESIDENCY_QUERY_LOADED:
            # While tracing, sizes may be symbols (dynamic shapes; dynamo shows them as ints), and an answer asked
            # then would be baked into a graph that serves other sizes: the launchers check each call's own sizes
            # instead, auto's falling back to stepwise.
            # Forced, the check runs inside the graph (cuda_lstm_layer_fwd_checked), so a refusal raises
            # BackendUnavailableError as it does eagerly, not the launch's RuntimeError.
            if fallback:
                return decided_at_launch(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                                         lengths)
            return lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths,
                              recurrence="persistent", checked=True)
        refusal = persistent_launch_refusal(input, c0, weight_hr)
        if refusal is None:
            return persistent(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths)
        if not fallback:
            raise BackendUnavailableError(_persistent_refusal_message(refusal))
        record_note("lstm", f"cuda/persistent: {refusal}; auto ran the call on the stepwise kernels (cuda/stepwise)")
        return stepwise(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths)

    return cuda_lstm_layer


# The persistent kernels' on-chip footprint, mirrored from csrc/lstm/lstm_kernels.cuh (TileShape and
# the launch_persistent_* tile choices), for dispatch (and explain's assumed GPUs). The launchers re-check
# with the occupancy API, which also counts registers: before launching, the variant asks that check
# (persistent_launch_refusal); auto then runs stepwise with a note, forced raises.
_BLOCK_K, _THREADS = 64, 128


def _align128(size: int) -> int:
    return (size + 127) // 128 * 128


def _c_bytes(tensor_cores: bool, bm: int, bn: int, splits: int) -> int:
    return _align128((splits if tensor_cores else 1) * bm * (bn + 4) * 4)


def _a_bytes(element: int, bm: int) -> int:
    """TileShape::kABytes: an A slice, its rows padded to start 16-byte aligned (kARowPad: 4 floats or 8 halves)."""
    return _align128(bm * (_BLOCK_K + (4 if element == 4 else 8)) * element)


def _resident_bytes(element: int, rows: int, k_size: int) -> int:
    """TileShape::w_bytes(k_size, resident=true): rows × K rounded up to whole slices, plus the row pad."""
    w_ld = (k_size + _BLOCK_K - 1) // _BLOCK_K * _BLOCK_K + (1 if element == 4 else 8)
    return _align128(rows * w_ld * element)


def persistent_footprint(batch: int, hidden: int, proj_size: int, dtype: torch.dtype) -> dict[str, tuple[int, int]]:
    """(shared bytes per CTA, CTAs) of the persistent forward and backward kernels with the least cp.async
    ring, as the launchers size them to decide residency (PersistentForwardLayout / PersistentBackwardLayout
    and the tile constants of lstm_kernels.cuh); where that fits, the launchers grow the ring into the
    shared memory left over (grown_ring_slices), which never costs residency."""
    element = torch.finfo(dtype).bits // 8
    tensor_cores = element == 2
    bm = 16 if batch <= 16 else 64
    width = proj_size if proj_size > 0 else hidden  # the width of h: the recurrent product's K
    forward_units, backward_units, projection_columns = 8, 16, 16
    forward_splits, backward_splits, projection_splits = (4, 4, 4) if bm == 16 else (1, 1, 1)
    stages = 16 if bm == 16 and element == 2 else 4  # kPipelineStages: the least cp.async ring of A slices
    ring = stages * _a_bytes(element, bm)
    forward = (_resident_bytes(element, 4 * forward_units, width)
               + (_resident_bytes(element, projection_columns, hidden) if proj_size > 0 else 0)
               + ring
               + max(_c_bytes(tensor_cores, bm, 4 * forward_units, forward_splits),
                     _c_bytes(tensor_cores, bm, projection_columns, projection_splits)))
    backward = (_resident_bytes(element, backward_units, 4 * hidden)
                + (_resident_bytes(element, backward_units, proj_size) if proj_size > 0 else 0)
                + ring + _c_bytes(tensor_cores, bm, backward_units, backward_splits))
    return {
        "forward": (forward, max(-(-hidden // forward_units), -(-proj_size // projection_columns))),
        "backward": (backward, -(-max(hidden, proj_size) // backward_units)),
    }


def persistent_unsupported_reason(batch: int, hidden: int, dtype: torch.dtype, target: Target,
                                  proj_size: int = 0) -> str | None:
    """Why the persistent kernels (forward and backward) cannot hold this layer on ``target``'s chip."""
    if target.sm_count is None or target.shared_memory_per_block is None:
        return "the device's SM count and shared memory are unknown"
    per_sm = target.shared_memory_per_sm or target.shared_memory_per_block
    weights = "W_hh and W_hr slices" if proj_size > 0 else "W_hh slice"
    for direction, (shared, ctas) in persistent_footprint(batch, hidden, proj_size, dtype).items():
        if shared > target.shared_memory_per_block:
            return (f"{direction}: a CTA needs {shared} B of shared memory for its {weights}, over the "
                    f"{target.shared_memory_per_block} B a block may use")
        resident = target.sm_count * max(1, per_sm // (shared + 1024))  # 1 KB reserved per block
        if ctas > resident:
            return (f"{direction}: {ctas} CTAs must be co-resident for the grid sync, the chip holds about "
                    f"{resident} ({target.sm_count} SMs, {shared} B each)")
    return None


def _check_persistent(request: Request, target: Target) -> str | None:
    if request.size("hidden_size") is None or request.size("batch") is None:
        return "the batch and hidden size are unknown"
    proj_size = request.size("proj_size", 0) if "projection" in request.features else 0
    return persistent_unsupported_reason(request.size("batch"), request.size("hidden_size"), request.dtype, target,
                                         proj_size=proj_size or 0)


_CELL_SUPPORT = Support(devices=_DEVICES, dtypes=_DTYPES, min_compute_capability=_MIN_CAPABILITY)


def _layer_support(*checks) -> Support:
    return Support(devices=_DEVICES, dtypes=_DTYPES, features=frozenset({"lengths", "projection"}),
                   min_compute_capability=_MIN_CAPABILITY, checks=checks)


register("cuda", "lstm_cell", _CELL_SUPPORT, summary="WMMA fused cell")(lstm_cell)


def cuda_lstm(layer):
    """A variant's dispatch-level lstm: packed input padded in its sorted order once for the stack, so that the
    kernels skip the batch tiles that have ended (lstm_common.stacked's sorted_padding)."""
    return stacked(layer, sorted_padding=True)


register("cuda", "lstm", _layer_support(_check_persistent), variant="persistent",
         summary="cooperative kernel, W_hh in shared memory, grid sync per step",
         # auto: where the launchers' occupancy check refuses what the footprint above admitted (registers, a
         # device the mirror did not foresee), stepwise serves the call with a note; forced, that raises.
         auto_implementation=cuda_lstm(_checked_persistent_layer(fallback=True)))(
             cuda_lstm(_checked_persistent_layer(fallback=False)))
register("cuda", "lstm", _layer_support(), variant="stepwise",
         summary="one launch per step")(cuda_lstm(_layer("stepwise")))

EXTENSION_OPS_LOADED = _extension_ops_loaded()
# An extension built before the query existed has the layer ops without it: the launch alone then decides.
_RESIDENCY_QUERY_LOADED = EXTENSION_OPS_LOADED and hasattr(torch.ops.pyattn, "cuda_lstm_persistent_resident")

if EXTENSION_OPS_LOADED:
    for _op in ("cuda_lstm_cell_fwd", "cuda_lstm_layer_fwd"):
        _SCHEMA_NAMES[_op] = tuple(a.name for a in getattr(torch.ops.pyattn, _op).default._schema.arguments)
    torch.library.register_fake("pyattn::cuda_lstm_cell_fwd")(_fake_cell_forward)
    torch.library.register_fake("pyattn::cuda_lstm_cell_bwd")(_fake_cell_backward)
    torch.library.register_fake("pyattn::cuda_lstm_layer_fwd")(_fake_layer_forward)
    torch.library.register_fake("pyattn::cuda_lstm_layer_bwd")(_fake_layer_backward)
    torch.library.register_autograd("pyattn::cuda_lstm_cell_fwd", _cell_backward, setup_context=_cell_setup_context)
    torch.library.register_autograd("pyattn::cuda_lstm_layer_fwd", _layer_backward, setup_context=_layer_setup_context)
    torch.library.register_fake("pyattn::cuda_lstm_layer_fwd_checked")(_fake_layer_forward)
    torch.library.register_autograd("pyattn::cuda_lstm_layer_fwd_checked", _layer_backward,
                                    setup_context=_layer_setup_context)
