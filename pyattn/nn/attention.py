"""MultiheadAttention drop-in (in progress)."""

import torch


class MultiheadAttention(torch.nn.Module):
    pass
