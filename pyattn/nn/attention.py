"""``MultiheadAttention``: a drop-in for :class:`torch.nn.MultiheadAttention` on pyattn's attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from pyattn import _dispatch
from pyattn._registry import Request, Support, register
from pyattn.functional.attention import attention_with_weights, scaled_dot_product_attention

_NAME = "MultiheadAttention"


def _check_mask(name: str, mask, shapes: tuple[tuple[int, ...], ...], query: Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{_NAME}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{_NAME}: {name} must be bool (True = not allowed to attend) or float (added to the "
                        f"scores), got {mask.dtype}")
    if tuple(mask.shape) not in shapes:
        expected = " or ".join(str(shape) for shape in shapes)
        raise ValueError(f"{_NAME}: {name} must have shape {expected}, got {tuple(mask.shape)}")
    if mask.device != query.device:
        raise ValueError(f"{_NAME}: {name} is on {mask.device} but query is on {query.device}")


def _pad_keys(mask: Tensor | None, extra_keys: int) -> Tensor | None:
    """Append ``extra_keys`` columns that every query may attend (bias_k/v and the zero key)."""
    if mask is None or extra_keys == 0:
        return mask
    return F.pad(mask, (0, extra_keys), value=False if mask.dtype == torch.bool else 0.0)


def _as_sdpa_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch MHA's convention (bool True = masked out) to SDPA's (bool True = attends); floats in ``dtype``."""
    return mask.logical_not() if mask.dtype == torch.bool else mask.to(dtype)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))


def _merge_masks(attn_mask: Tensor | None, padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One SDPA mask broadcastable to (N, H, L, S): bool (True = attends) when both are bool, else float."""
    if attn_mask is None or padding_mask is None:
        return attn_mask if padding_mask is None else padding_mask
    if attn_mask.dtype == torch.bool and padding_mask.dtype == torch.bool:
        return attn_mask & padding_mask
    return _additive(attn_mask, dtype) + _additive(padding_mask, dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention`: same arguments, parameter names, init and state_dict.

    Shapes: query (L, N, E) ((N, L, E) with batch_first, (L, E) unbatched), key (S, N, kdim),
    value (S, N, vdim) -> output in query's layout with E features; weights (N, L, S) (averaged over
    heads) or (N, num_heads, L, S), unbatched without N, or None when need_weights=False.
    key_padding_mask (N, S) / (S,) and attn_mask (L, S) or (N * num_heads, L, S): bool (True = not
    allowed to attend) or float (added to the scores). They are merged into one mask broadcast over
    (N, num_heads, L, S) (only the broadcast of the two masks' own shapes is materialised).

    need_weights=False runs pyattn's fused attention (:func:`pyattn.functional.scaled_dot_product_attention`,
    on whichever variant dispatch picks). need_weights=True (torch's default) must return the
    (N, num_heads, L, S) weights, which no fused kernel forms: dispatch serves it with
    :func:`pyattn.functional.attention_with_weights` on the torch backend (torch's own math, as
    torch.nn.MultiheadAttention computes it) or the reference; pass need_weights=False for speed.
    Dropout acts only in training mode. is_causal is a hint that attn_mask is causal, as in torch:
    attn_mask is required with it, and it is used (top-left aligned) only when need_weights=False
    and no key_padding_mask is given. A query that may attend no key gives output 0 (torch: NaN).
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"{_NAME}: embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"{_NAME}: embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{_NAME}: dropout must be in [0, 1), got {dropout}")
        factory_kwargs = {"device": device, "dtype": dtype}
        torch.nn.Module.__init__(self)  # the parameters below are torch's, built here with pyattn's argument checks
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
            xavier_normal_(self.bias_v)

    def reset_parameters(self) -> None:
        """Re-draw every parameter (torch's ``_reset_parameters`` leaves out_proj's weight as it is)."""
        self.out_proj.reset_parameters()
        self._reset_parameters()

    def __setstate__(self, state):
        # Checkpoints pickled by torch <= 1.1 lack the flag (as torch's own module handles).
        state.setdefault("_qkv_same_embed_dim", True)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        text = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if not self._qkv_same_embed_dim:
            text += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.in_proj_bias is None:
            text += ", bias=False"
        if self.bias_k is not None:
            text += ", add_bias_kv=True"
        if self.add_zero_attn:
            text += ", add_zero_attn=True"
        if self.batch_first:
            text += ", batch_first=True"
        return text

    def _projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, tensor in (("query", query), ("key", key), ("value", value)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{_NAME}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"{_NAME}: query must be unbatched 2-D (L, E) or batched 3-D, got shape "
                             f"{tuple(query.shape)}")
        batched = query.dim() == 3
        for name, tensor in (("key", key), ("value", value)):
            if tensor.dim() != query.dim():
                raise ValueError(f"{_NAME}: query is {query.dim()}-D, so {name} must be {query.dim()}-D too, got "
                                 f"shape {tuple(tensor.shape)}")
        for name, tensor, features in (("query", query, self.embed_dim), ("key", key, self.kdim),
                                       ("value", value, self.vdim)):
            if tensor.shape[-1] != features:
                raise ValueError(f"{_NAME}: {name} must have {features} features (last dim), got "
                                 f"shape {tuple(tensor.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{_NAME}: key's shape {tuple(key.shape)} and value's {tuple(value.shape)} must match "
                             "except in the last dim")
        sequence_dim = 1 if batched and self.batch_first else 0
        seqlen_q, seqlen_k = query.shape[sequence_dim], key.shape[sequence_dim]
        if batched:
            batch = query.shape[1 - sequence_dim]
            if key.shape[1 - sequence_dim] != batch:
                raise ValueError(f"{_NAME}: key has batch size {key.shape[1 - sequence_dim]} but query has {batch}")
            padding_shapes = ((batch, seqlen_k),)
            attn_shapes = ((seqlen_q, seqlen_k), (batch * self.num_heads, seqlen_q, seqlen_k))
        else:
            padding_shapes = ((seqlen_k,),)
            attn_shapes = ((seqlen_q, seqlen_k), (self.num_heads, seqlen_q, seqlen_k))
        _check_mask("key_padding_mask", key_padding_mask, padding_shapes, query)
        _check_mask("attn_mask", attn_mask, attn_shapes, query)
        return batched

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise ValueError(f"{_NAME}: is_causal=True is a hint that attn_mask is the causal mask, so attn_mask is "
                             "required with it (as in torch), e.g. from "
                             "torch.nn.Transformer.generate_square_subsequent_mask")
        sequence_dim = 1 if batched and self.batch_first else 0
        features = {name for name, used in (
            ("mask", key_padding_mask is not None or attn_mask is not None), ("need_weights", need_weights),
            ("dropout", self.training and self.dropout > 0)) if used}
        request = Request(op="multihead_attention", device=query.device, dtype=query.dtype, head_dim=self.head_dim,
                          features=frozenset(features),
                          sizes=dict(batch=query.shape[1 - sequence_dim] if batched else 1,
                                     seqlen_q=query.shape[sequence_dim], seqlen_k=key.shape[sequence_dim],
                                     heads=self.num_heads))
        return _dispatch.choose(request).implementation(self, query, key, value, key_padding_mask, need_weights,
                                                        attn_mask, average_attn_weights, is_causal)


def _multihead_attention(module: MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                         key_padding_mask: Tensor | None, need_weights: bool, attn_mask: Tensor | None,
                         average_attn_weights: bool, is_causal: bool) -> tuple[Tensor, Tensor | None]:
    """pyattn's own module path: the projections in PyTorch, the attention through dispatch (fused kernels,
    torch's SDPA where it computes pyattn's semantics, else the reference); inputs already validated."""
    batched = query.dim() == 3
    self_attention = query is key and key is value
    # Work batch-first: (N, L, E).
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, seqlen_q, _ = query.shape
    heads, dtype, embed_dim = module.num_heads, query.dtype, module.embed_dim

    if module._qkv_same_embed_dim and self_attention:
        # Self-attention: one GEMM for the three projections, as torch does (views of its result).
        q, k, v = F.linear(query, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    else:
        weight_q, weight_k, weight_v = module._projection_weights()
        bias_q, bias_k, bias_v = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
        q = F.linear(query, weight_q, bias_q)
        k = F.linear(key, weight_k, bias_k)
        v = F.linear(value, weight_v, bias_v)
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.expand(batch, 1, embed_dim)], dim=1)
        v = torch.cat([v, module.bias_v.expand(batch, 1, embed_dim)], dim=1)
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, 1, embed_dim)], dim=1)
        v = torch.cat([v, v.new_zeros(batch, 1, embed_dim)], dim=1)
    extra_keys = k.shape[1] - key.shape[1]
    # (N, H, L, head_dim) as views of the projections: the kernels take any strides.
    q, k, v = (x.unflatten(-1, (heads, module.head_dim)).transpose(1, 2) for x in (q, k, v))

    use_causal = is_causal and key_padding_mask is None and not need_weights
    mask = None
    if not use_causal:
        if attn_mask is not None:
            attn_mask = attn_mask.reshape(-1, heads, *attn_mask.shape[-2:]) if attn_mask.dim() == 3 else attn_mask
            attn_mask = _as_sdpa_mask(_pad_keys(attn_mask, extra_keys), dtype)
        if key_padding_mask is not None:
            key_padding_mask = _as_sdpa_mask(_pad_keys(key_padding_mask, extra_keys), dtype)[:, None, None, :]
        mask = _merge_masks(attn_mask, key_padding_mask, dtype)
    dropout_p = module.dropout if module.training else 0.0

    if need_weights:
        out, weights = attention_with_weights(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal)
        weights = None

    if batched and not module.batch_first:
        out = module.out_proj(out.permute(2, 0, 1, 3).reshape(seqlen_q, batch, embed_dim))
    else:
        out = module.out_proj(out.transpose(1, 2).reshape(batch, seqlen_q, embed_dim))
    if not batched:
        out = out.squeeze(0)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights


# The module's own op (dispatch-level signature: multihead_attention(module, query, key, value,
# key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal) -> (out, weights)). pyattn's
# path is registered where its inner attention runs fused (triton), after torch's own forward on the torch
# backend (torch/module, pyattn/ops/attention_torch.py: torch.nn.MultiheadAttention.forward, fast path
# included, for the calls it computes exactly) as torch/sdpa, and as the reference (inner calls forced there
# run the reference). The inner attention call obeys the same forced name.
_EVERY_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
register("triton", "multihead_attention",
         Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}),
                 dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), max_head_dim=256,
                 features=frozenset({"mask", "dropout"})),
         summary="projections in PyTorch, attention on the fused kernels")(_multihead_attention)
def _check_torch_masks(request: Request, target) -> str | None:
    if "mask" in request.features and target.device_type == "cuda":  # as the inner torch SDPA variant refuses
        return "masks: torch's CUDA SDPA kernels do not all give 0 for a query that sees no key (pyattn does)"
    return None


register("torch", "multihead_attention",
         Support(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=_EVERY_FLOAT,
                 features=frozenset({"mask", "need_weights", "dropout"}), checks=(_check_torch_masks,)),
         variant="sdpa", summary="projections in PyTorch, attention on torch's SDPA / weights math where exact")(
    _multihead_attention)
register("reference", "multihead_attention",
         Support(devices=frozenset({"cpu", "cuda", "meta"}), dtypes=_EVERY_FLOAT,
                 features=frozenset({"mask", "need_weights", "dropout"})),
         summary="projections in PyTorch, attention through dispatch (torch's SDPA where exact, else the reference)")(
    _multihead_attention)
