"""LSTM on the triton backend: the custom ops over ``pyattn.kernels.lstm``, with their autograd.

The launchers are imported inside the op bodies, so ``import pyattn`` needs no Triton. The forward
ops also return what their backward needs (empty tensors at inference), so the saved state is
visible to torch.compile like any other output. Three variants serve ``lstm``, tried in order:

* ``triton/persistent`` — one program per batch tile runs every step, W_hh in registers (small H; with a
  projection W_hr too, both within one on-chip budget);
* ``triton/grid`` — W_hh split over co-resident programs, a grid barrier per step (B ≤ 48 as 16-row tiles, larger
  H; only where the compiled kernel's occupancy holds every program at once), forward and backward (the backward
  stepwise where the grid backward's own rule refuses the call);
* ``triton/stepwise`` — one fused launch per step (any size; a second, r = m·W_hrᵀ, with a projection).

``proj_size > 0`` (feature "projection") is served by ``triton/persistent`` and ``triton/stepwise``.
"""

from __future__ import annotations

import torch

from pyattn._registry import BackendUnavailableError, Request, Support, Target, record_note, register
from pyattn.ops import graphs
from pyattn.ops.lstm_common import (
    bias_gradients,
    combined_bias,
    differentiable_gradients,
    needs_grad,
    require_saved,
    stacked,
)
from pyattn.ops.lstm_triton_packed import packed_layer
from pyattn.reference import lstm as reference

_TRITON_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
# Recurrences whose launcher launches once per step (twice with a projection): on a GPU their calls run as one
# CUDA-graph replay (pyattn.ops.graphs; docs/lstm.md, "CUDA graphs of the stepwise loops").
_PER_STEP_LAUNCHES = frozenset({"stepwise"})
_BACKWARD_RECURRENCE = {"persistent": "persistent", "stepwise": "stepwise"}


def _backward_recurrence(arguments: dict) -> str:
    """The backward's kernel, decided when the forward runs: the forward's own recurrence, except after a grid
    forward: the grid backward where its rule (``grid_backward_unsupported_reason``, with the backward kernel's
    compiled figures) admits the call, else stepwise with a note (``pyattn.explain`` prints it) — decided from
    that rule, never after a failed launch."""
    if arguments["recurrence"] != "grid":
        return _BACKWARD_RECURRENCE[arguments["recurrence"]]
    from pyattn.kernels import lstm as kernels

    input, c0 = arguments["input"], arguments["c0"]
    recurrence, reason = kernels.backward_after_grid(input.shape[1], c0.shape[1], input.dtype, input.device)
    if reason is not None:
        record_note("lstm", f"triton/grid: the backward runs on the stepwise kernels: {reason}")
    return recurrence


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
        input, hx, cx, weight_ih, weight_hh, combined_bias(bias_ih, bias_hh), save_for_backward
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
    arguments = dict(zip(_CELL_FORWARD_PARAMETERS, inputs))
    _, _, gates = output
    ctx.save_for_backward(*(arguments[name] for name in _CELL_DIFFERENTIABLE), gates)
    ctx.has_bias_ih, ctx.has_bias_hh = arguments["bias_ih"] is not None, arguments["bias_hh"] is not None
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zeros tensor


_CELL_DIFFERENTIABLE = ("input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _cell_backward(ctx, grad_hy, grad_cy, _grad_gates):
    *saved, gates = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (see differentiable_gradients)
        gradients = dict.fromkeys(_CELL_FORWARD_PARAMETERS)
        gradients.update(differentiable_gradients(reference.lstm_cell, dict(zip(_CELL_DIFFERENTIABLE, saved)),
                                                  (grad_hy, grad_cy)))
        return tuple(gradients.values())
    input, hx, cx, weight_ih, weight_hh, _, _ = saved
    require_saved(gates, "pyattn::triton_lstm_cell_fwd")
    grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias = triton_lstm_cell_bwd(
        grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, gates
    )
    gradients = dict.fromkeys(_CELL_FORWARD_PARAMETERS)
    gradients.update(input=grad_input, hx=grad_hx, cx=grad_cx, weight_ih=grad_weight_ih, weight_hh=grad_weight_hh)
    gradients["bias_ih"], gradients["bias_hh"] = bias_gradients(grad_bias, ctx.has_bias_ih, ctx.has_bias_hh)
    return tuple(gradients.values())


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
    recurrence: str,
    weight_hr: torch.Tensor | None = None,
    grid_fallback: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, h_n, c_n, gates, cell_states, hidden_before); the last three are empty unless saving.
    ``recurrence``: the forward's kernel, "persistent", "grid" or "stepwise" (dispatch's variant).
    ``weight_hr`` (P, H): the projection (proj_size > 0); then h0, output, h_n and hidden_before are P wide.
    ``grid_fallback`` (auto picked triton/grid): where the compiled grid kernel cannot be resident the stepwise
    kernels serve the call, with a note; without it that raises BackendUnavailableError."""
    from pyattn.kernels import lstm as kernels

    def forward(input, h0, c0, bias, lengths, weight_ih, weight_hh, weight_hr, grid_fallback=None):
        return kernels.lstm_sequence_forward(input, h0, c0, weight_ih, weight_hh, bias, lengths, reverse,
                                             save_for_backward, recurrence=recurrence, weight_hr=weight_hr,
                                             grid_fallback=grid_fallback)

    inputs, weights = (input, h0, c0, combined_bias(bias_ih, bias_hh), lengths), (weight_ih, weight_hh, weight_hr)
    return _run_recurrence("triton_lstm_layer_fwd", forward, recurrence, grid_fallback, inputs, weights,
                           (reverse, save_for_backward))


@triton_lstm_layer_fwd.register_fake
def _(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, save_for_backward, recurrence,
      weight_hr=None, grid_fallback=False):
    steps, batch, _ = input.shape
    hidden_size, state_size = c0.shape[1], h0.shape[1]  # state_size: P with a projection, else H
    if save_for_backward:
        gates = input.new_empty((steps, batch, 4 * hidden_size))
        cell_states = input.new_empty((steps + 1, batch, hidden_size), dtype=torch.float32)
        hidden_before = input.new_empty((steps, batch, state_size))
    else:
        gates, hidden_before = input.new_empty((0,)), input.new_empty((0,))
        cell_states = input.new_empty((0,), dtype=torch.float32)
    output = input.new_empty((steps, batch, state_size))
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
    recurrence: str,
    weight_hr: torch.Tensor | None = None,
    grid_fallback: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr); ``recurrence``:
    the backward's kernel, "persistent", "grid" or "stepwise"; grad_weight_hr is empty without a projection."""
    from pyattn.kernels import lstm as kernels

    def backward(grad_output, grad_h_n, grad_c_n, input, lengths, gates, cell_states, hidden_before, weight_ih,
                 weight_hh, weight_hr, grid_fallback=None):
        return kernels.lstm_sequence_backward(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths,
                                              reverse, gates, cell_states, hidden_before, recurrence=recurrence,
                                              weight_hr=weight_hr, grid_fallback=grid_fallback)

    inputs = (grad_output, grad_h_n, grad_c_n, input, lengths, gates, cell_states, hidden_before)
    weights = (weight_ih, weight_hh, weight_hr)
    return _run_recurrence("triton_lstm_layer_bwd", backward, recurrence, grid_fallback, inputs, weights, (reverse,))


@triton_lstm_layer_bwd.register_fake
def _(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths, gates, cell_states, hidden_before, reverse,
      recurrence, weight_hr=None, grid_fallback=False):
    batch, hidden_size, state_size = input.shape[1], weight_hh.shape[0] // 4, weight_hh.shape[1]
    grad_weight_hr = weight_hh.new_empty((0,) if weight_hr is None else weight_hr.shape)
    return (
        input.new_empty(input.shape), input.new_empty((batch, state_size)), input.new_empty((batch, hidden_size)),
        weight_ih.new_empty(weight_ih.shape), weight_hh.new_empty(weight_hh.shape),
        weight_hh.new_empty((weight_hh.shape[0],)), grad_weight_hr,
    )


def _layer_setup_context(ctx, inputs, output):
    arguments = dict(zip(_LAYER_FORWARD_PARAMETERS, inputs))
    arguments.setdefault("weight_hr", None)  # a defaulted trailing argument may not be among the inputs
    _, _, _, gates, cell_states, hidden_before = output
    ctx.save_for_backward(*(arguments[name] for name in _LAYER_SAVED_INPUTS), gates, cell_states, hidden_before)
    ctx.num_inputs = len(inputs)
    ctx.has_bias_ih, ctx.has_bias_hh = arguments["bias_ih"] is not None, arguments["bias_hh"] is not None
    ctx.reverse = arguments["reverse"]
    ctx.grid_fallback = arguments.get("grid_fallback", False)
    ctx.recurrence = _backward_recurrence(arguments)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zeros tensor


_LAYER_SAVED_INPUTS = ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "lengths")


def _layer_backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_saved):
    *inputs, gates, cell_states, hidden_before = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (see differentiable_gradients)
        arguments = dict(zip(_LAYER_SAVED_INPUTS, inputs), reverse=ctx.reverse)
        gradients = dict.fromkeys(_LAYER_FORWARD_PARAMETERS)
        gradients.update(differentiable_gradients(reference.lstm_layer, arguments, (grad_output, grad_h_n, grad_c_n)))
        return tuple(gradients.values())[:ctx.num_inputs]
    input, _, _, weight_ih, weight_hh, _, _, weight_hr, lengths = inputs
    require_saved(cell_states, "pyattn::triton_lstm_layer_fwd")
    grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias, grad_weight_hr = triton_lstm_layer_bwd(
        grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, lengths,
        gates, cell_states, hidden_before, ctx.reverse, ctx.recurrence, weight_hr, ctx.grid_fallback,
    )
    gradients = dict.fromkeys(_LAYER_FORWARD_PARAMETERS)
    gradients.update(input=grad_input, h0=grad_h0, c0=grad_c0, weight_ih=grad_weight_ih, weight_hh=grad_weight_hh)
    gradients["bias_ih"], gradients["bias_hh"] = bias_gradients(grad_bias, ctx.has_bias_ih, ctx.has_bias_hh)
    gradients["weight_hr"] = None if weight_hr is None else grad_weight_hr
    # One gradient per input the op received (a defaulted trailing weight_hr may not be one of them).
    return tuple(gradients.values())[:ctx.num_inputs]


_CELL_FORWARD_PARAMETERS = tuple(a.name for a in torch.ops.pyattn.triton_lstm_cell_fwd.default._schema.arguments)
_LAYER_FORWARD_PARAMETERS = tuple(a.name for a in torch.ops.pyattn.triton_lstm_layer_fwd.default._schema.arguments)
triton_lstm_layer_fwd.register_autograd(_layer_backward, setup_context=_layer_setup_context)


def _run_recurrence(name: str, launcher, recurrence: str, grid_fallback: bool, inputs: tuple, weights: tuple,
                    options: tuple):
    """``launcher(*inputs, *weights)``: through the graph runner where it launches per step (the stepwise
    recurrence, and a grid call auto picked whose compiled kernel refused it: its key's first call showed that;
    a key whose first call launched the grid, one launch, stays eager); a grid refusal without ``grid_fallback``
    (triton/grid forced) is BackendUnavailableError."""
    options = (*options, recurrence, grid_fallback)
    if recurrence in _PER_STEP_LAUNCHES:
        return graphs.run(name, launcher, inputs, weights, options)
    if recurrence != "grid":
        return launcher(*inputs, *weights)
    from pyattn.kernels.lstm.launch import GridResidencyError

    if not grid_fallback:
        try:
            return launcher(*inputs, *weights)
        except GridResidencyError as error:
            raise BackendUnavailableError(f"pyattn backend 'triton/grid' cannot serve this call: {error}") from error
    refusals = []

    def fall_back(reason: str) -> None:
        refusals.append(reason)
        record_note("lstm", f"triton/grid: {reason}; auto ran the call on the stepwise kernels (triton/stepwise)")

    def launch(*arguments):
        return launcher(*arguments, grid_fallback=fall_back)

    return graphs.run(name, launch, inputs, weights, options, stay_eager=lambda: not refusals)


# ----------------------------------------------------------------------------- dispatch variants


@register("triton", "lstm_cell", Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}),
                                         dtypes=_TRITON_DTYPES),
          summary="one fused launch: both GEMMs and the gate epilogue")
def triton_lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    save = needs_grad(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    hy, cy, _ = triton_lstm_cell_fwd(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, save)
    return hy, cy


def _layer(recurrence: str, grid_fallback: bool = False):
    def triton_lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None,
                          reverse=False, lengths=None):
        if lengths is not None:
            lengths = lengths.to(device=input.device, dtype=torch.int64)
        save = needs_grad(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr)
        output, h_n, c_n, *_ = triton_lstm_layer_fwd(
            input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reverse, save, recurrence, weight_hr,
            grid_fallback,
        )
        return output, h_n, c_n

    return triton_lstm_layer


def _check_persistent(request: Request, target: Target) -> str | None:
    from pyattn.kernels.lstm import persistent_unsupported_reason

    if request.size("hidden_size") is None:
        return "the hidden size is unknown"
    proj_size = 0
    if "projection" in request.features:
        proj_size = request.size("proj_size")
        if proj_size is None:
            return "the projection size (proj_size) is unknown"
    return persistent_unsupported_reason(request.size("hidden_size"), request.dtype, proj_size)


def _check_grid(request: Request, target: Target) -> str | None:
    from pyattn.kernels.lstm import SmResources, grid_unsupported_reason

    if request.size("hidden_size") is None or request.size("batch") is None:
        return "the batch and hidden size are unknown"
    device = None  # the interpreter: one program, nothing to co-schedule
    if target.device_type == "cuda":
        if target.capability is None or target.sm_count is None:
            return "the GPU's compute capability and SM count are unknown (the grid's occupancy cannot be checked)"
        major, minor = target.capability
        device = SmResources.for_arch(major * 10 + minor, target.sm_count, target.shared_memory_per_sm)
    return grid_unsupported_reason(request.size("batch"), request.size("hidden_size"), request.dtype, device=device)


def _layer_support(*checks, projection: bool = True) -> Support:
    features = frozenset({"lengths", "projection"} if projection else {"lengths"})
    return Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}), dtypes=_TRITON_DTYPES,
                   features=features, checks=checks)


register("triton", "lstm", _layer_support(_check_persistent), variant="persistent",
         summary="one program per batch tile runs every step, W_hh (and W_hr) in registers")(
             stacked(_layer("persistent"), packed_layer("persistent")))
# The grid kernel has no projection: dispatch refuses proj_size > 0 there ("unsupported features: projection").
# Packed input is padded in its sorted order, so that the kernels skip the batch tiles whose rows have all ended.
register("triton", "lstm", _layer_support(_check_grid, projection=False), variant="grid",
         summary="W_hh split over co-resident programs, a grid barrier per step",
         # auto: where the compiled kernel cannot be resident (figures the table did not foresee), stepwise serves
         # the call with a note; forced, that raises.
         auto_implementation=stacked(_layer("grid", grid_fallback=True), sorted_padding=True))(
             stacked(_layer("grid"), sorted_padding=True))
register("triton", "lstm", _layer_support(), variant="stepwise",
         summary="one fused launch per step (two with a projection)")(
             stacked(_layer("stepwise"), packed_layer("stepwise")))
