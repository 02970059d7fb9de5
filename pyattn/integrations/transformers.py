"""``attn_implementation="pyattn"`` for Hugging Face transformers: prefill on pyattn's flash attention, decode on
its KV-cache kernels, with transformers' own cache classes (DynamicCache, StaticCache, sliding-window layers).

    import pyattn.integrations.transformers as pyattn_hf
    pyattn_hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="pyattn")   # or set_attn_implementation
    model.generate(**inputs)                                                         # greedy tokens as "sdpa"/"eager"

transformers is optional (``pip install pyattn[transformers]``); nothing here imports it before ``register()``.

How a call is routed. transformers updates its cache itself and hands the attention function the whole key/value
tensors (B, Hk, S, D) — a DynamicCache's concatenation, or a StaticCache's preallocated buffer, of which only a
prefix is filled. What is valid comes from the mask, so ``register`` installs a mask function beside the
attention function:

* for the standard causal (or sliding-window causal) pattern without padding, the mask function returns an int32
  tensor (B, 1, 1, 1): the number of valid keys of each row (a prefix of the buffer, computed on the device from
  transformers' own offsets). Four dims, so that transformers passes it on as a prepared mask (generate() builds
  a StaticCache's masks ahead of the forward); int32, which no real mask is. Padding is checked on the host once per forward, as transformers' own SDPA mask
  does; under tracing (torch.compile) it is not read and the next case applies;
* anything else (padding, packed sequences, custom mask functions, bidirectional masks) gets transformers'
  boolean SDPA mask (B, 1, L, S), exact for any pattern.

The attention function then runs: with valid lengths and L == S (a prefill with no past),
``pyattn.flash_attention`` (causal, window, softcap); with valid lengths and L < S (decode, speculative decoding,
chunked prefill, a StaticCache prefill), ``pyattn.flash_attention_with_kvcache`` over the cache as it stands
(cache_seqlens = the valid lengths, nothing appended: transformers did that); with a 4-D mask,
``pyattn.functional.scaled_dot_product_attention`` (or, with softcap, which SDPA lacks, the eager formula in
plain PyTorch). Dropout (training) takes the SDPA path with the mask built from the lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

import pyattn
from pyattn.functional import scaled_dot_product_attention

NAME = "pyattn"

__all__ = ["register", "attention_forward", "attention_mask", "NAME"]


def register(name: str = NAME) -> str:
    """Register pyattn's attention and mask functions with transformers under ``name``; returns ``name``.

    Then ``from_pretrained(..., attn_implementation=name)`` and ``model.set_attn_implementation(name)`` use them.
    Raises ImportError (with the install hint) when transformers is missing.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError("pyattn.integrations.transformers needs transformers >= 5 with AttentionInterface and "
                          "AttentionMaskInterface: pip install 'pyattn[transformers]'") from error
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, attention_mask)
    return name


# ------------------------------------------------------------------------------------------------ the mask


def _is_plain_causal(mask_function) -> bool:
    """transformers' causal mask function, or its sliding-window causal one (no padding, packing or extra rule)."""
    from transformers import masking_utils

    if mask_function is masking_utils.causal_mask_function:
        return True
    # sliding_window_causal_mask_function(w) = and_masks(sliding_window_overlay(w), causal_mask_function)
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask" or not mask_function.__closure__:
        return False
    parts = mask_function.__closure__[0].cell_contents
    return (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is masking_utils.causal_mask_function
            and getattr(parts[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask")


def _has_padding(padding_mask: Tensor | None, last_position) -> bool:
    """Whether any position before ``last_position`` (the last query's, + 1) is padding (one host read)."""
    if padding_mask is None:
        return False
    if torch.compiler.is_compiling():
        return True  # cannot read it: the boolean mask is exact for any content
    relevant = torch.arange(padding_mask.shape[-1], device=padding_mask.device) < last_position
    all_valid = (padding_mask.bool() | ~relevant).all()
    covers = padding_mask.shape[-1] >= last_position  # a shorter mask: transformers pads it with padding
    if isinstance(covers, Tensor):
        all_valid = all_valid & covers
    elif not covers:
        return True
    return not bool(all_valid)


def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Tensor | None = None, device="cpu", **kwargs):
    """transformers' mask interface: valid key lengths (int32 (B, 1, 1, 1)) where the pattern is plain causal and
    nothing is padded, else transformers' exact boolean SDPA mask (B, 1, L, S)."""
    from transformers import masking_utils

    mask_function = masking_utils.causal_mask_function if mask_function is None else mask_function
    last_position = q_offset + q_length  # keys at or past it are invisible to every query (causal)
    if _is_plain_causal(mask_function) and not _has_padding(attention_mask, last_position):
        lengths = last_position - kv_offset
        if isinstance(lengths, Tensor):
            lengths = lengths.to(device=device).clamp(0, kv_length).to(torch.int32).reshape(1, 1, 1, 1)
            return lengths.expand(batch_size, 1, 1, 1).contiguous()
        return torch.full((batch_size, 1, 1, 1), max(0, min(int(lengths), kv_length)), dtype=torch.int32,
                          device=device)
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                                   kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                                   allow_is_causal_skip=False, allow_is_bidirectional_skip=False, device=device,
                                   **kwargs)


# ------------------------------------------------------------------------------------------- the attention


def _lengths_mask(lengths: Tensor, seqlen_q: int, seqlen_k: int, window_left: int) -> Tensor:
    """(B, 1, L, S) bool: key j visible to query i of a row with ``lengths`` valid keys (bottom-right causal)."""
    keys = torch.arange(seqlen_k, device=lengths.device)
    positions = lengths.long()[:, None] - seqlen_q + torch.arange(seqlen_q, device=lengths.device)  # (B, L)
    visible = (keys[None, None, :] <= positions[:, :, None]) & (keys[None, None, :] < lengths.long()[:, None, None])
    if window_left >= 0:
        visible &= keys[None, None, :] >= positions[:, :, None] - window_left
    return visible[:, None]


def _eager_softcap(query, key, value, mask, scaling, softcap, dropout, training):
    """The eager formula with softcap and a mask (SDPA has no softcap), in float32 for half inputs."""
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, 1).to(compute)
    value = value.repeat_interleave(group, 1).to(compute)
    scores = (query.to(compute) @ key.transpose(-1, -2)) * scaling
    scores = softcap * torch.tanh(scores / softcap)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    else:
        scores = scores + mask.to(compute)
    weights = torch.ops.aten._safe_softmax(scores, -1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=training)
    return (weights @ value).to(query.dtype)


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention interface: query (B, H, L, D), key/value (B, Hk, S, ·) (the cache's full view) ->
    (attn_output (B, L, H, Dv), None). No attention weights (as "sdpa")."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, seqlen_q, head_dim = query.shape
    seqlen_k = key.shape[2]
    scaling = head_dim ** -0.5 if scaling is None else float(scaling)
    softcap = float(softcap or 0.0)
    # transformers' window of w keys includes the query's own position: w − 1 keys to its left.
    window_left = sliding_window - 1 if sliding_window else -1
    lengths = None
    if isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.int32:  # our valid lengths (B, 1, 1, 1)
        lengths = attention_mask.reshape(batch)
    if attention_mask is None and is_causal:
        lengths = seqlen_k  # every key valid (no mask function of ours ran, e.g. a model building no mask)
    if lengths is not None and dropout > 0:  # the kernels have no dropout: SDPA with the same visibility
        lengths = torch.full((batch,), lengths, dtype=torch.int32, device=query.device) if isinstance(
            lengths, int) else lengths
        attention_mask, lengths = _lengths_mask(lengths, seqlen_q, seqlen_k, window_left), None
    if lengths is not None:
        if seqlen_q == seqlen_k:  # a prefill with no past: every key is valid (lengths = S), the dense kernel
            out = pyattn.flash_attention(query, key, value, causal=True, window=(window_left, 0), softcap=softcap,
                                         scale=scaling, layout="bhsd")
            return out.transpose(1, 2).contiguous(), None
        out = pyattn.flash_attention_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                  cache_seqlens=lengths, causal=True, window=(window_left, 0),
                                                  softcap=softcap, scale=scaling)
        return out, None
    if attention_mask is None:  # not causal, no mask: every query sees every key
        out = pyattn.flash_attention(query, key, value, causal=False, softcap=softcap, scale=scaling,
                                     dropout_p=dropout, layout="bhsd")
        return out.transpose(1, 2).contiguous(), None
    mask = attention_mask[:, :, :, :seqlen_k]
    if mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    if softcap > 0:
        out = _eager_softcap(query, key, value, mask, scaling, softcap, dropout, module.training)
    else:
        out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                           enable_gqa=heads != key.shape[1])
    return out.transpose(1, 2).contiguous(), None
