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
