"""Flash attention in Triton: forward, backward (preprocess + dK/dV + dQ), dropout keep mask.

The algorithm and its invariants are in docs/attention.md; the option semantics are those of
``pyattn.reference.attention`` (the tests hold the two equal). In brief:

* forward: one program per (query tile, head, batch) streams key tiles with an online softmax in
  fp32 (``exp2``, log2(e) folded into the scale), and writes out and the natural-log LSE;
* with ``use_tma=True`` (Hopper; dense layout, fp16/bf16, power-of-two head dims, 16-byte-aligned
  strides: :func:`tma_unsupported_reason`) the same forward kernel loads its Q/K/V tiles through TMA
  tensor descriptors;
* with ``warp_specialize=True`` (Hopper; the TMA rule, head dims 64/128/256, plain or causal calls only:
  :func:`warp_specialized_unsupported_reason`) ``forward_ws.py`` runs instead: device-side descriptors and
  Triton's Hopper warp specialisation (a TMA producer warp group, two wgmma/softmax consumer groups);
* the key tiles a query tile can see are cut to the causal/sliding-window band before the loop;
  tiles wholly inside the band and the sequence run without any visibility arithmetic, only the
  band's edge tiles and the ragged last tile compute it;
* backward: delta = rowsum(dO·O), then one program per (key tile, batch·kv-head) accumulates
  dK/dV over the query heads of its GQA group (no atomics; when those programs cannot fill the GPU,
  slices of the group write fp32 partials summed after), and dQ is either added atomically by that
  same program (fast) or computed by its own kernel looping over key tiles (``deterministic=True``);
* under causal, query tiles run longest first (reversed index); plain scores keep raw q·k with
  scale·log2(e) folded into exp2's argument (one FFMA per score);
* dropout draws Philox numbers whose counter is (j, i, batch·heads + head): a pure function of the
  element, so the backward and :func:`attention_dropout_keep_mask` regenerate the forward's pattern.

Modules: ``common`` (jit helpers), ``forward``, ``forward_ws``, ``backward`` (kernels), ``configs`` (tile tables, autotune
key, pruning), ``launch`` (checks, launchers, TMA eligibility), ``aot`` (ahead-of-time compile specs).
"""

from .._layout import attention_output_order, new_attention_output  # noqa: F401
from .launch import (  # noqa: F401
    INTERPRETER_CAPABILITY,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    TMA_DTYPES,
    attention_backward,
    attention_dropout_keep_mask,
    attention_forward,
    tma_unsupported_reason,
    warp_specialized_unsupported_reason,
)
