"""LSTM / LSTMCell drop-ins (in progress)."""

import torch


class LSTM(torch.nn.Module):
    pass


class LSTMCell(torch.nn.Module):
    pass
