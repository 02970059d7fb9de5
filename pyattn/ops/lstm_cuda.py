"""LSTM ops of the CUDA extension (pyattn._C): fake kernels, autograd, dispatch registration.

The ops are defined in C++ (csrc/registration.cpp); forward ops return, besides their results,
what backward needs when ``save_workspace`` is set (empty tensors otherwise):

  pyattn::cuda_lstm_cell_fwd(input, hx, cx, weight_ih, weight_hh, bias_ih?, bias_hh?, save_workspace)
      -> hy (B, H), cy (B, H), workspace (B, 4H) activated gates
  pyattn::cuda_lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, cy, workspace)
      -> grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias (4H,)
  pyattn::cuda_lstm_layer_fwd(input, h0, c0, weight_ih, weight_hh, bias_ih?, bias_hh?, reverse,
                              lengths?, save_workspace, recurrence)
      -> output (T, B, H), h_n, c_n, gates (T, B, 4H) activated, cell_states (T, B, H) float32
  pyattn::cuda_lstm_layer_bwd(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh,
                              output, gates, cell_states, reverse, lengths?, recurrence)
      -> grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias (4H,)

``recurrence`` picks the layer kernels: 0 auto (the persistent kernel when W_hh fits on chip, else
one launch per step), 1 persistent (raises when it does not fit), 2 stepwise. The dispatch-level
``lstm_layer`` reads it from the environment variable ``PYATTN_LSTM_CUDA_RECURRENCE``
(auto | persistent | stepwise). ``lengths`` (int64, (B,)) is served: rows past their length keep
their state and output zeros. Projection (``weight_hr``) is not: dispatch sends those calls to the
next backend.

Importing this module never fails: without the extension it registers nothing.
"""

from __future__ import annotations

import os

import torch

from pyattn._dispatch import Support, register

RECURRENCE_ENVIRONMENT_VARIABLE = "PYATTN_LSTM_CUDA_RECURRENCE"
RECURRENCE_CODES = {"auto": 0, "persistent": 1, "stepwise": 2}
_DEVICES = frozenset({"cuda"})
_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
_MIN_CAPABILITY = (8, 0)  # the extension is built for sm_80 and sm_90a
CELL_SUPPORT = Support(devices=_DEVICES, dtypes=_DTYPES, min_compute_capability=_MIN_CAPABILITY)
LAYER_SUPPORT = Support(
    devices=_DEVICES, dtypes=_DTYPES, features=frozenset({"lengths"}), min_compute_capability=_MIN_CAPABILITY
)


def recurrence_code() -> int:
    """The ``recurrence`` argument the layer ops get, from PYATTN_LSTM_CUDA_RECURRENCE."""
    name = os.environ.get(RECURRENCE_ENVIRONMENT_VARIABLE, "auto")
    if name not in RECURRENCE_CODES:
        raise ValueError(f"{RECURRENCE_ENVIRONMENT_VARIABLE}={name!r}: expected one of {list(RECURRENCE_CODES)}")
    return RECURRENCE_CODES[name]


def _extension_ops_loaded() -> bool:
    try:
        from pyattn import _extension

        _extension.extension_module()
    except ImportError:
        return False
    return hasattr(torch.ops.pyattn, "cuda_lstm_cell_fwd")


def _needs_workspace(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _contiguous_or_none(tensor):
    return None if tensor is None else tensor.contiguous()


def _gradient(grad, like):
    """Autograd hands None for an output that took no part in the loss; the kernels want zeros."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _require_workspace(workspace: torch.Tensor, op: str) -> None:
    if workspace.numel() == 0:
        raise RuntimeError(
            f"{op}: backward needs the workspace the forward saves only with save_workspace=True "
            "(the dispatch-level functions set it whenever an input requires grad)"
        )


# ---- fake kernels (shapes only, never data) ----


def _fake_cell_forward(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, save_workspace):
    batch, hidden = hx.shape
    workspace = input.new_empty((batch if save_workspace else 0, 4 * hidden))
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
    input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths, save_workspace, recurrence
):
    steps, batch = input.shape[0], input.shape[1]
    hidden = h0.shape[1]
    saved_steps = steps if save_workspace else 0
    return (
        input.new_empty((steps, batch, hidden)),
        input.new_empty((batch, hidden)),
        input.new_empty((batch, hidden)),
        input.new_empty((saved_steps, batch, 4 * hidden)),
        input.new_empty((saved_steps, batch, hidden), dtype=torch.float32),
    )


def _fake_layer_backward(
    grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates, cell_states, reverse, lengths,
    recurrence,
):
    return (
        torch.empty_like(input),
        torch.empty_like(h0),
        torch.empty_like(c0),
        torch.empty_like(weight_ih),
        torch.empty_like(weight_hh),
        input.new_empty((weight_ih.shape[0],)),
    )


# ---- autograd ----


def _skip_workspace_gradients(ctx, *workspace):
    """Workspace outputs carry no gradient; without this autograd would build zero tensors as big as
    them for every backward (and zeros for unused results, which _gradient makes only when needed)."""
    ctx.mark_non_differentiable(*workspace)
    ctx.set_materialize_grads(False)


def _cell_setup_context(ctx, inputs, output):
    input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, _save_workspace = inputs
    _hy, cy, workspace = output
    ctx.save_for_backward(input, hx, cx, weight_ih, weight_hh, cy, workspace)
    _skip_workspace_gradients(ctx, workspace)
    ctx.has_bias_ih, ctx.has_bias_hh = bias_ih is not None, bias_hh is not None


def _cell_backward(ctx, grad_hy, grad_cy, _grad_workspace):
    input, hx, cx, weight_ih, weight_hh, cy, workspace = ctx.saved_tensors
    _require_workspace(workspace, "pyattn::cuda_lstm_cell_fwd")
    grad_input, grad_hx, grad_cx, grad_weight_ih, grad_weight_hh, grad_bias = torch.ops.pyattn.cuda_lstm_cell_bwd(
        _gradient(grad_hy, cy), _gradient(grad_cy, cy), input, hx, cx, weight_ih, weight_hh, cy, workspace
    )
    return (
        grad_input,
        grad_hx,
        grad_cx,
        grad_weight_ih,
        grad_weight_hh,
        grad_bias if ctx.has_bias_ih else None,
        grad_bias if ctx.has_bias_hh else None,
        None,  # save_workspace
    )


def _layer_setup_context(ctx, inputs, output):
    input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths, _save_workspace, recurrence = inputs
    layer_output, _h_n, _c_n, gates, cell_states = output
    ctx.save_for_backward(input, h0, c0, weight_ih, weight_hh, layer_output, gates, cell_states, lengths)
    _skip_workspace_gradients(ctx, gates, cell_states)
    ctx.has_bias_ih, ctx.has_bias_hh = bias_ih is not None, bias_hh is not None
    ctx.reverse, ctx.recurrence = reverse, recurrence


def _layer_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cell_states):
    input, h0, c0, weight_ih, weight_hh, layer_output, gates, cell_states, lengths = ctx.saved_tensors
    if input.shape[0] > 0:
        _require_workspace(gates, "pyattn::cuda_lstm_layer_fwd")
    grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh, grad_bias = torch.ops.pyattn.cuda_lstm_layer_bwd(
        _gradient(grad_output, layer_output),
        _gradient(grad_h_n, h0),
        _gradient(grad_c_n, c0),
        input,
        h0,
        c0,
        weight_ih,
        weight_hh,
        layer_output,
        gates,
        cell_states,
        ctx.reverse,
        lengths,
        ctx.recurrence,
    )
    return (
        grad_input,
        grad_h0,
        grad_c0,
        grad_weight_ih,
        grad_weight_hh,
        grad_bias if ctx.has_bias_ih else None,
        grad_bias if ctx.has_bias_hh else None,
        None,  # reverse
        None,  # lengths
        None,  # save_workspace
        None,  # recurrence
    )


# ---- dispatch-level functions (the signatures every backend shares) ----


def lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    """One LSTM step on the CUDA kernels: (B, I), (B, H), (B, H), (4H, I), (4H, H) -> hy, cy."""
    save_workspace = _needs_workspace(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh)
    hy, cy, _workspace = torch.ops.pyattn.cuda_lstm_cell_fwd(
        input.contiguous(),
        hx.contiguous(),
        cx.contiguous(),
        weight_ih.contiguous(),
        weight_hh.contiguous(),
        _contiguous_or_none(bias_ih),
        _contiguous_or_none(bias_hh),
        save_workspace,
    )
    return hy, cy


def lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, reverse=False, lengths=None):
    """One LSTM layer, one direction, on the CUDA kernels: input (T, B, I) -> output (T, B, H), h_n, c_n.

    ``lengths`` (B,) or None: row b is valid for its first ``lengths[b]`` steps (see the module docstring).
    """
    if weight_hr is not None:
        raise ValueError("the cuda LSTM backend does not serve weight_hr (projection); dispatch routes such calls elsewhere")
    save_workspace = _needs_workspace(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
    output, h_n, c_n, _gates, _cell_states = torch.ops.pyattn.cuda_lstm_layer_fwd(
        input.contiguous(),
        h0.contiguous(),
        c0.contiguous(),
        weight_ih.contiguous(),
        weight_hh.contiguous(),
        _contiguous_or_none(bias_ih),
        _contiguous_or_none(bias_hh),
        bool(reverse),
        None if lengths is None else lengths.to(device=input.device, dtype=torch.int64).contiguous(),
        save_workspace,
        recurrence_code(),
    )
    return output, h_n, c_n


EXTENSION_OPS_LOADED = _extension_ops_loaded()

if EXTENSION_OPS_LOADED:
    torch.library.register_fake("pyattn::cuda_lstm_cell_fwd")(_fake_cell_forward)
    torch.library.register_fake("pyattn::cuda_lstm_cell_bwd")(_fake_cell_backward)
    torch.library.register_fake("pyattn::cuda_lstm_layer_fwd")(_fake_layer_forward)
    torch.library.register_fake("pyattn::cuda_lstm_layer_bwd")(_fake_layer_backward)
    torch.library.register_autograd("pyattn::cuda_lstm_cell_fwd", _cell_backward, setup_context=_cell_setup_context)
    torch.library.register_autograd("pyattn::cuda_lstm_layer_fwd", _layer_backward, setup_context=_layer_setup_context)
    register("cuda", "lstm_cell", CELL_SUPPORT)(lstm_cell)
    register("cuda", "lstm_layer", LAYER_SUPPORT)(lstm_layer)
