"""LSTM on the reference backend: plain PyTorch, float64-capable, every option (the ground truth)."""

from __future__ import annotations

from pyattn._registry import Support, register
from pyattn.ops.lstm_common import ANY_FLOAT, EVERY_DEVICE, stacked
from pyattn.reference import lstm as reference

_SUMMARY = "plain PyTorch, every option, float64-capable: the ground truth"

register("reference", "lstm_cell", Support(devices=EVERY_DEVICE, dtypes=ANY_FLOAT),
         summary=_SUMMARY)(reference.lstm_cell)
register("reference", "lstm", Support(devices=EVERY_DEVICE, dtypes=ANY_FLOAT,
                                      features=frozenset({"projection", "lengths"})),
         summary=_SUMMARY)(stacked(reference.lstm_layer))
