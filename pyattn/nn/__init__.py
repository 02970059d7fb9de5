"""Drop-in modules: torch's constructor arguments, parameter names and forward signatures."""

from pyattn.nn.attention import MultiheadAttention  # noqa: F401
from pyattn.nn.kvcache import BlockAllocator, KVCache  # noqa: F401
from pyattn.nn.lstm import LSTM, LSTMCell  # noqa: F401

__all__ = ["LSTM", "LSTMCell", "MultiheadAttention", "KVCache", "BlockAllocator"]
