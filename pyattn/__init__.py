"""pyattn: fused LSTM and flash-style attention kernels (Triton and CUDA C++) as drop-in PyTorch modules.

    import pyattn
    out = pyattn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    lstm = pyattn.nn.LSTM(512, 512, num_layers=2)        # same arguments and state_dict as torch.nn.LSTM

Backends: "cuda" (the compiled extension), "triton", "torch" (PyTorch's own kernels) and
"reference" (plain PyTorch, the float64 ground truth), each with one or more kernel variants;
"auto" picks the first variant that serves a call. See :func:`available_backends`,
:func:`use_backend`, :func:`explain`.
"""

from pyattn._dispatch import (  # noqa: F401
    BackendUnavailableError,
    available_backends,
    backend_status,
    use_backend,
)
from pyattn import ops  # noqa: F401  (fills the dispatch registry: the package loads the ops, not dispatch)
from pyattn import functional, nn  # noqa: F401
from pyattn.functional import flash_attention, flash_attention_varlen, flash_attention_with_kvcache  # noqa: F401
from pyattn._explain import explain  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_status",
    "use_backend",
    "explain",
    "functional",
    "nn",
    "flash_attention",
    "flash_attention_varlen",
    "flash_attention_with_kvcache",
]
