"""LSTM on the torch backend: PyTorch's own kernels (``_VF.lstm`` — cuDNN on a GPU — and ``_VF.lstm_cell``).

Where no pyattn kernel runs (a CPU, say), changing one import must not make a user's code slower:
these variants hand the whole call to the kernels ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` run,
packed sequences and projections included. They refuse, with the reason, half precision on a CPU:
there torch rounds the gate math to the input dtype (pyattn computes it in fp32), and its oneDNN
bf16 LSTM primitive is missing on some CPUs.
"""

from __future__ import annotations

import torch
from torch import _VF
from torch.nn.utils.rnn import PackedSequence

from pyattn._registry import Request, Support, Target, register
from pyattn.ops.lstm_common import ANY_FLOAT

_HALF = frozenset({torch.float16, torch.bfloat16})


def _check_precision(request: Request, target: Target) -> str | None:
    if request.dtype in _HALF and target.device_type == "cpu":
        return (f"{str(request.dtype).removeprefix('torch.')} on CPU: torch's LSTM rounds its gate math to that "
                "dtype (pyattn: fp32)")
    return None


def _check_traceable(request: Request, target: Target) -> str | None:
    # torch 2.14's _VF.lstm does not trace with a module's parameters (aot_eager: "expected all
    # tensors_saved_with_vc_check to be Tensors"; inductor: aten.mkldnn_rnn_layer); torch.nn.LSTM escapes
    # only through a graph break. Compiled code takes the reference instead: plain, traceable PyTorch.
    if request.op == "lstm" and torch.compiler.is_compiling():
        return "torch.compile cannot trace _VF.lstm (torch.nn.LSTM graph-breaks there); compiled code runs the reference"
    return None


_SUPPORT = dict(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=ANY_FLOAT,
                checks=(_check_precision, _check_traceable))


@register("torch", "lstm_cell", Support(**_SUPPORT), summary="torch's lstm_cell (what torch.nn.LSTMCell runs)")
def torch_lstm_cell(input, hx, cx, weight_ih, weight_hh, bias_ih=None, bias_hh=None):
    return _VF.lstm_cell(input, (hx, cx), weight_ih, weight_hh, bias_ih, bias_hh)


@register("torch", "lstm", Support(**_SUPPORT, features=frozenset({"projection", "lengths"})),
          summary="torch's _VF.lstm (what torch.nn.LSTM runs: cuDNN on a GPU)")
def torch_lstm(input, hx, params, *, num_layers, bias, batch_first, dropout, training, bidirectional, proj_size):
    del proj_size  # torch infers the projection from h_0's last dim, as torch.nn.LSTM does
    h_0, c_0 = hx
    if isinstance(input, PackedSequence):
        # torch's packed kernel walks sequences in sorted order; hx and the final states are in the user's.
        if input.sorted_indices is not None:
            h_0, c_0 = h_0.index_select(1, input.sorted_indices), c_0.index_select(1, input.sorted_indices)
        data, h_n, c_n = _VF.lstm(input.data, input.batch_sizes, (h_0, c_0), params, bias, num_layers, dropout,
                                  training, bidirectional)
        if input.unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, input.unsorted_indices), c_n.index_select(1, input.unsorted_indices)
        output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        return output, (h_n, c_n)
    output, h_n, c_n = _VF.lstm(input, (h_0, c_0), params, bias, num_layers, dropout, training, bidirectional,
                                batch_first)
    return output, (h_n, c_n)
