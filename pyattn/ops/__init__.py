"""The ops: each module registers one op family's variants on one backend (``<op>_<backend>.py``).

Importing this package fills :mod:`pyattn._registry`; ``pyattn/__init__.py`` does it, once, so
dispatch never imports the ops (imports point one way: functional → dispatch → registry ← ops).
"""

from pyattn.ops import (  # noqa: F401  (each registers its variants)
    attention_backward_reference,
    attention_backward_triton,
    attention_cuda,
    attention_reference,
    attention_torch,
    attention_triton,
    decode_reference,
    decode_torch,
    decode_triton,
    lstm_cuda,
    lstm_reference,
    lstm_torch,
    lstm_triton,
)
