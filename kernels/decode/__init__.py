"""Decode attention over a KV cache (flash-decoding): split-K, GQA-packed tiles, paged reads, in-place append
fused into the attention launch.

``attention_with_kvcache`` is the launcher. Modules: ``kernels`` (the split-K attention kernel, which also
appends, and the merge kernel), ``configs`` (launch tables and the split heuristic, as data), ``launch``
(launchers and the argument builders), ``aot`` (ahead-of-time compile specs: ``aot.aot_specs()``).
docs/decode.md has the algorithm.
"""

from .configs import num_splits_heuristic  # noqa: F401
from .launch import MAX_HEAD_DIM, attention_with_kvcache, cache_capacity, plan  # noqa: F401

__all__ = ["attention_with_kvcache", "plan", "num_splits_heuristic", "cache_capacity", "MAX_HEAD_DIM"]
