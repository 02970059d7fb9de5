"""``LSTM`` and ``LSTMCell``: drop-ins for torch's, on pyattn's kernels.

Same constructor arguments, parameter names, shapes, registration order and initialisation as
``torch.nn.LSTM`` / ``torch.nn.LSTMCell``, so a state_dict moves between them unchanged and the same
seed gives the same initial weights. ``forward`` calls :mod:`pyattn.functional` only.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from pyattn import functional

__all__ = ["LSTM", "LSTMCell"]


def _check_type(value, expected: type, name: str) -> None:
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise TypeError(f"{name} should be of type {expected.__name__}, got: {type(value).__name__}")


class LSTMCell(nn.Module):
    """One LSTM step, as :class:`torch.nn.LSTMCell`.

    Parameters ``weight_ih`` (4H, I), ``weight_hh`` (4H, H), ``bias_ih`` / ``bias_hh`` (4H,) (None when
    ``bias=False``), all uniform in ±1/√H. ``forward(input, hx=None)``: input (B, I) or (I,), hx ``(h, c)``
    each (B, H) or (H,), or None for zeros; returns ``(h', c')``.
    """

    __constants__ = ["input_size", "hidden_size", "bias"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((4 * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((4 * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            text += f", bias={self.bias}"
        return text

    def forward(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The weights straight from _parameters: nn.Module.__getattr__ costs ~1 µs a name, a third of what
        # pyattn's own Python costs a CPU step. A weight moved out of it (parametrize, prune, weight_norm)
        # is read as an attribute, as torch's LSTMCell reads it.
        parameters = self._parameters
        try:
            weights = parameters["weight_ih"], parameters["weight_hh"], parameters["bias_ih"], parameters["bias_hh"]
        except KeyError:
            weights = self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
        return functional.lstm_cell(input, hx, *weights)


class LSTM(nn.Module):
    """A multi-layer LSTM, as :class:`torch.nn.LSTM` (arguments, parameters, forward, PackedSequence).

    Parameters per layer ``k`` and direction (suffix ``_reverse`` for the backward one):
    ``weight_ih_l{k}`` (4H, I or D·P), ``weight_hh_l{k}`` (4H, P), ``bias_ih_l{k}`` / ``bias_hh_l{k}``
    (4H,) when ``bias``, ``weight_hr_l{k}`` (P, H) when ``proj_size > 0``; all uniform in ±1/√H.
    ``forward(input, hx=None)`` returns ``(output, (h_n, c_n))``; see :func:`pyattn.functional.lstm`.
    """

    __constants__ = [
        "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size",
    ]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        _check_type(bias, bool, "bias")
        _check_type(batch_first, bool, "batch_first")
        _check_type(bidirectional, bool, "bidirectional")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            _check_type(value, int, name)
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        _check_type(proj_size, int, "proj_size")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory_kwargs = {"device": device, "dtype": dtype}
        # Names in torch's flat order (layer, then direction), which is also the registration order,
        # so parameters(), state_dict() and reset_parameters' draws line up with torch's.
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        layout = functional.lstm_parameter_layout(input_size, hidden_size, num_layers, bias, bidirectional, proj_size)
        for group in layout:
            for name, shape in group:
                setattr(self, name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
            names = [name for name, _ in group]
            self._flat_weights_names.extend(names)
            self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """A no-op, kept so code written for torch.nn.LSTM runs unchanged.

        torch packs the weights into one cuDNN buffer here; pyattn's kernels read each parameter as it is.
        """

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per (layer, direction), in torch's order."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[nn.Parameter]:
        # Read at call time so torch.func.functional_call and reassigned parameters are honoured.
        return [getattr(self, name) for name in self._flat_weights_names]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            text += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if self.bias is not True:
            text += f", bias={self.bias}"
        if self.batch_first is not False:
            text += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            text += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            text += f", bidirectional={self.bidirectional}"
        return text

    def forward(
        self, input: torch.Tensor | PackedSequence, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | PackedSequence, tuple[torch.Tensor, torch.Tensor]]:
        return functional.lstm(
            input,
            hx,
            self._flat_weights,
            num_layers=self.num_layers,
            bias=self.bias,
            batch_first=self.batch_first,
            dropout=self.dropout,
            training=self.training,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
        )
