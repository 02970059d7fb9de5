"""Functional API: validates once (messages name the argument), builds a dispatch request, calls."""

from pyattn.functional.attention import (  # noqa: F401
    REQUEST_BUILDERS as _ATTENTION_REQUEST_BUILDERS,
    attention_with_weights,
    flash_attention,
    flash_attention_varlen,
    scaled_dot_product_attention,
)
from pyattn.functional.attention_backward import (  # noqa: F401
    REQUEST_BUILDERS as _ATTENTION_BACKWARD_REQUEST_BUILDERS,
    flash_attention_backward,
)
from pyattn.functional.kvcache import (  # noqa: F401
    REQUEST_BUILDERS as _KVCACHE_REQUEST_BUILDERS,
    flash_attention_with_kvcache,
)
from pyattn.functional.lstm import (  # noqa: F401
    REQUEST_BUILDERS as _LSTM_REQUEST_BUILDERS,
    lstm,
    lstm_cell,
    lstm_parameter_layout,
)

__all__ = ["scaled_dot_product_attention", "attention_with_weights", "flash_attention", "flash_attention_varlen",
           "flash_attention_backward", "flash_attention_with_kvcache", "lstm", "lstm_cell"]

# name -> function(*same args) returning the dispatch Request the call would make (pyattn.explain).
REQUEST_BUILDERS = {**_ATTENTION_REQUEST_BUILDERS, **_ATTENTION_BACKWARD_REQUEST_BUILDERS, **_KVCACHE_REQUEST_BUILDERS,
                    **_LSTM_REQUEST_BUILDERS}
