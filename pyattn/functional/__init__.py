"""Functional API: validates once (messages name the argument), builds a dispatch request, calls."""

from pyattn.functional.attention import (  # noqa: F401
    flash_attention,
    flash_attention_varlen,
    scaled_dot_product_attention,
)
from pyattn.functional.lstm import lstm, lstm_cell, lstm_parameter_layout  # noqa: F401

__all__ = ["scaled_dot_product_attention", "flash_attention", "flash_attention_varlen", "lstm", "lstm_cell"]

import sys as _sys  # noqa: E402

# name -> function(*same args) returning the dispatch Request the call would make (for explain()).
# (Through sys.modules: the names `lstm` etc. here are the functions, not the submodules.)
REQUEST_BUILDERS = {
    **_sys.modules["pyattn.functional.attention"].REQUEST_BUILDERS,
    **_sys.modules["pyattn.functional.lstm"].REQUEST_BUILDERS,
}
