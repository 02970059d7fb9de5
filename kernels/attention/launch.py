"""Attention launchers: input checks, output allocation, grids, the TMA eligibility rule, and the launches.

Nothing here chooses between kernels on its own: the caller (``pyattn`` dispatch) passes ``use_tma`` and
``deterministic``, and may ask :func:`tma_unsupported_reason` beforehand, on real or ``meta`` tensors.
Interpreter-only configs are chosen per launch from the tensors' device (see ``_launch.on_interpreter``).
"""

from __future__ import annotations

import contextvars

import torch
import triton
import triton.language as tl

from .._launch import on_input_device, on_interpreter
from .._layout import base_is_16_byte_aligned, new_attention_output
from . import configs
from .backward import attention_backward_dkdv_kernel, attention_backward_dq_kernel, attention_backward_preprocess_kernel
from .common import ADDITIVE_MASK, BOOL_MASK, NO_MASK, attention_dropout_keep_mask_kernel
from .forward import attention_forward_kernel
from .forward_ws import attention_forward_ws_kernel

try:  # host-side TMA descriptors: Triton >= 3.4 (users run 3.6)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TMA_DTYPES = (torch.float16, torch.bfloat16)
WARP_SPECIALIZED_HEAD_DIMS = (64, 128, 256)
# The interpreter emulates descriptor loads on CPU tensors as the sm_90 hardware performs them (zero-filled
# boxes included): launches on the interpreter are checked as if on this compute capability.
INTERPRETER_CAPABILITY = (9, 0)


def _empty(shape, dtype, device):
    """Every buffer a kernel must write in full; the tests swap in NaN-filled ones to catch gaps."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(caller, q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  dropout_p, softcap, seed):
    """Validate the layout; returns (batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v)."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{caller}: {name} must be a tensor, got {type(tensor).__name__}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{caller}: {name} has dtype {tensor.dtype}; expected float16, bfloat16 or float32")
        if tensor.device != q.device:
            raise ValueError(f"{caller}: {name} is on {tensor.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{caller}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "(total, heads, head_dim)" if varlen else "(batch, heads, seqlen, head_dim)"
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != rank:
            raise ValueError(f"{caller}: {name} must be {layout}, got shape {tuple(tensor.shape)}")
    head_axis, row_axis = (1, 0) if varlen else (1, 2)
    heads, kv_heads = q.shape[head_axis], k.shape[head_axis]
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{caller}: k has head dim {k.shape[-1]} but q has {head_dim}")
    if v.shape[head_axis] != kv_heads or v.shape[row_axis] != k.shape[row_axis]:
        raise ValueError(f"{caller}: v {tuple(v.shape)} must match k {tuple(k.shape)} except in the last dim")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"{caller}: q's {heads} heads must be a multiple of k/v's {kv_heads} heads (GQA/MQA)")
    if max(head_dim, head_dim_v) > MAX_HEAD_DIM or min(head_dim, head_dim_v) < 1:
        raise ValueError(f"{caller}: head dims {head_dim} (q, k) and {head_dim_v} (v) must be in 1..{MAX_HEAD_DIM}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{caller}: dropout_p must be in [0, 1), got {dropout_p}")
    if softcap < 0:
        raise ValueError(f"{caller}: softcap must be >= 0 (0 disables it), got {softcap}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{caller}: seed must be in [0, 2**63), got {seed}")
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if cu is None:
                raise ValueError(f"{caller}: the varlen layout needs both cu_seqlens_q and cu_seqlens_k; {name} is None")
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
                raise ValueError(f"{caller}: {name} must be a 1-D int32 tensor on {q.device}, got {cu.dtype} "
                                 f"{tuple(cu.shape)} on {cu.device}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel() or cu_seqlens_q.numel() < 2:
            raise ValueError(f"{caller}: cu_seqlens_q and cu_seqlens_k must both have batch + 1 >= 2 entries, got "
                             f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            if value <= 0:
                raise ValueError(f"{caller}: {name} must be > 0 in the varlen layout (it bounds the grid), got {value}")
        if mask is not None:
            raise ValueError(f"{caller}: mask is supported only in the dense layout, not with cu_seqlens")
        batch, seqlen_q, seqlen_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[2], k.shape[2]
        if k.shape[0] != batch or v.shape[0] != batch:
            raise ValueError(f"{caller}: batch sizes differ: q {batch}, k {k.shape[0]}, v {v.shape[0]}")
    if mask is not None:
        full = (batch, heads, seqlen_q, seqlen_k)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or any(
                size not in (1, want) for size, want in zip(mask.shape, full)):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{caller}: mask must have 4 dims, each 1 or the size of (batch, heads, seqlen_q, "
                             f"seqlen_k) = {full}; got {shape}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{caller}: mask must be bool (True = takes part) or floating (additive), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"{caller}: mask is on {mask.device} but q is on {q.device}")
    if alibi_slopes is not None:
        if (alibi_slopes.dtype != torch.float32 or alibi_slopes.device != q.device
                or tuple(alibi_slopes.shape) not in ((heads,), (batch, heads))):
            raise ValueError(f"{caller}: alibi_slopes must be float32 of shape ({heads},) or ({batch}, {heads}) on "
                             f"{q.device}, got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)} on "
                             f"{alibi_slopes.device}")
    return batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v


def _bhmd_strides(tensor, varlen):
    """Strides in (batch, head, row, feature) order; varlen tensors (total, heads, dim) have no batch stride."""
    if varlen:
        return 0, tensor.stride(1), tensor.stride(0), tensor.stride(2)
    return tensor.stride(0), tensor.stride(1), tensor.stride(2), tensor.stride(3)


def _row_stat_strides(stat, varlen):
    """Strides of lse/delta in (batch, head, row) order: dense (B, H, L), varlen (H, total)."""
    if varlen:
        return 0, stat.stride(0), stat.stride(1)
    return stat.stride(0), stat.stride(1), stat.stride(2)


def _mask_arguments(mask):
    """(pointer tensor, kind, strides): broadcast dims get stride 0 so the kernel reads in bounds."""
    if mask is None:
        return None, NO_MASK, (0, 0, 0, 0)
    strides = tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), BOOL_MASK, strides
    return mask, ADDITIVE_MASK, strides


def _alibi_strides(alibi_slopes):
    if alibi_slopes is None:
        return 0, 0
    if alibi_slopes.dim() == 1:
        return 0, alibi_slopes.stride(0)
    return alibi_slopes.stride(0), alibi_slopes.stride(1)


def _feature_constexprs(q, v, mask_kind, varlen, softcap, alibi_slopes, window_left, window_right, dropout_p,
                        align_to_end):
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=max(16, triton.next_power_of_2(head_dim)),
        HEAD_DIM_V=head_dim_v, HEAD_DIM_V_PADDED=max(16, triton.next_power_of_2(head_dim_v)),
        IS_VARLEN=varlen, MASK_KIND=mask_kind, HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi_slopes is not None,
        HAS_WINDOW_LEFT=window_left >= 0, HAS_WINDOW_RIGHT=window_right >= 0, HAS_DROPOUT=dropout_p > 0,
        ALIGN_TO_END=bool(align_to_end), DOT_PRECISION=_dot_precision(q.dtype),
    )


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in strict IEEE fp32 unless torch allows TF32 for matmuls (its default does not), as torch's
    own fp32 attention does; 16-bit dots ignore the setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def tma_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, varlen: bool,
                           capability: tuple[int, int] | None) -> str | None:
    """Why the descriptor (TMA) forward cannot run this call, or None if it can.

    Reads only tensor metadata (dtype, shape, strides, the data pointer's alignment: ``meta`` tensors work,
    their views' pointers carrying the storage offset) and ``capability``, the compute capability of the GPU
    the call runs on or is assumed to run on (None: not a CUDA GPU).
    """
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no triton.tools.tensor_descriptor (Triton >= 3.4 has)"
    if varlen:
        return "the varlen layout is not supported (a tile crossing a sequence end would read the next sequence)"
    if q.dtype not in TMA_DTYPES:
        return f"dtype {q.dtype} is not supported (float16 and bfloat16 are)"
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        dim = tensor.shape[-1]
        if dim < 16 or dim & (dim - 1):
            return f"{name} has head dim {dim}; the TMA path needs a power of two >= 16"
        if tensor.numel() == 0:
            return f"{name} is empty (shape {tuple(tensor.shape)})"
        if tensor.stride(-1) != 1:
            return f"{name} has feature stride {tensor.stride(-1)}; the last dim must be contiguous"
        if not base_is_16_byte_aligned(tensor) or any(stride * tensor.element_size() % 16 for stride in tensor.stride()[:-1]):
            return (f"{name} is not 16-byte aligned (storage offset {tensor.storage_offset()}, strides {tuple(tensor.stride())} "
                    f"in {tensor.element_size()}-byte elements)")
    if capability is None or tuple(capability) < (9, 0):
        where = "not a CUDA GPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
        return f"the tensor memory accelerator needs a CUDA GPU of compute capability >= 9.0 ({where})"
    return None


def warp_specialized_unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, varlen: bool,
                                        capability: tuple[int, int] | None, scale: float = 1.0, mask=None,
                                        window_left: int = -1, softcap: float = 0.0, alibi_slopes=None,
                                        dropout_p: float = 0.0) -> str | None:
    """Why the warp-specialised forward (``forward_ws.py``) cannot run this call, or None if it can: the TMA
    rule (dense, fp16/bf16, 16-byte-aligned strides, sm_90+), head dims 64, 128 or 256, and none of the
    per-score options (mask, left window, softcap, ALiBi, dropout) nor a non-positive scale (folded into exp2).
    Metadata only, as :func:`tma_unsupported_reason`."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor (Triton >= 3.4 has)"
    reason = tma_unsupported_reason(q, k, v, varlen=varlen, capability=capability)
    if reason is not None:
        return reason
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.shape[-1] not in WARP_SPECIALIZED_HEAD_DIMS:
            return (f"{name} has head dim {tensor.shape[-1]}; the warp-specialised forward serves "
                    f"{', '.join(map(str, WARP_SPECIALIZED_HEAD_DIMS))}")
    options = [("a mask", mask is not None), ("a left window", window_left >= 0), ("softcap", softcap > 0),
               ("ALiBi", alibi_slopes is not None), ("dropout", dropout_p > 0),
               (f"scale {scale} (exp2 folds a positive scale)", not float(scale) > 0)]
    used = [name for name, on in options if on]
    if used:
        return f"the call uses {', '.join(used)}; the warp-specialised forward serves plain and causal calls only"
    return None


def _run_with_descriptor_scratch(device: torch.device, launch) -> None:
    """Run ``launch`` with an allocator for the global scratch that device-side tensor descriptors live in.
    Triton keeps its allocator in a ContextVar (``triton.set_allocator`` sets the current context's): set
    in a copy of the caller's context, it serves these launches and leaves the caller's own untouched. The
    scratch comes from torch's caching allocator on the launch's stream, so its reuse is stream-ordered."""

    def allocate(size: int, alignment: int, stream):
        del alignment, stream  # torch's blocks are 512-byte aligned; the launch runs on torch's current stream
        return torch.empty(size, dtype=torch.int8, device=device)

    def run():
        triton.set_allocator(allocate)
        launch()

    contextvars.copy_context().run(run)


def _launch_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability a launch on ``device`` runs with (the interpreter: ``INTERPRETER_CAPABILITY``)."""
    if on_interpreter(device):
        return INTERPRETER_CAPABILITY
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def _tma_descriptor(tensor):
    """A (B, H, rows, D) descriptor; its block shape is a placeholder until the autotuner's pre_hook sets it."""
    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [1, 1, 16, tensor.shape[-1]])


def _set_tma_block_shapes(arguments):
    """A descriptor's box is part of its type: set it to the tiles of the config about to run."""
    block_m, block_n = arguments["BLOCK_M"], arguments["BLOCK_N"]
    arguments["Q"].block_shape = [1, 1, block_m, arguments["HEAD_DIM_PADDED"]]
    arguments["K"].block_shape = [1, 1, block_n, arguments["HEAD_DIM_PADDED"]]
    arguments["V"].block_shape = [1, 1, block_n, arguments["HEAD_DIM_V_PADDED"]]


class Tuners:
    """One kernel autotuned twice: over the GPU tables, and over the interpreter's single small config.
    A launch takes the one for its tensors' device. ``table_name`` None: the warp-specialised forward's own
    table (``configs.FORWARD_WS_CONFIGS``)."""

    def __init__(self, kernel, table_name: str | None, **options):
        if table_name is None:
            self.gpu = configs.autotuned_ws(kernel, interpreter=False)
            self.interpreter = configs.autotuned_ws(kernel, interpreter=True)
            return
        self.gpu = configs.autotuned(kernel, table_name, interpreter=False, **options)
        self.interpreter = configs.autotuned(kernel, table_name, interpreter=True, **options)

    def on(self, device: torch.device):
        return self.interpreter if on_interpreter(device) else self.gpu


FORWARD = Tuners(attention_forward_kernel, "forward")
# The same kernel with USE_TMA: descriptors have no dtype, but Out (in the tuning key) carries it.
FORWARD_TMA = Tuners(attention_forward_kernel, "forward", pre_hook=_set_tma_block_shapes)
FORWARD_WS = Tuners(attention_forward_ws_kernel, None)
BACKWARD_DKDV = Tuners(attention_backward_dkdv_kernel, "dkdv")
# Benchmarking a config adds into DQ: zero it before each trial and before the final run.
BACKWARD_DKDV_FUSED_DQ = Tuners(attention_backward_dkdv_kernel, "dkdv", reset_to_zero=["DQ"])
BACKWARD_DQ = Tuners(attention_backward_dq_kernel, "dq")


def _alignment(*tensors) -> int:
    """``configs.ALIGNED`` when every tensor's address is 16-byte aligned and its strides (but the last, 1)
    are multiples of 16 elements — what the JIT's divisibility hints need for vector loads and cp.async —,
    else ``configs.UNALIGNED``. Metadata only: it works on meta tensors."""
    for tensor in tensors:
        if not base_is_16_byte_aligned(tensor) or any(stride % 16 for stride in tensor.stride()[:-1]):
            return configs.UNALIGNED
    return configs.ALIGNED


def _forward_outputs(q, v, shape, varlen):
    """(out, lse) as the forward allocates them: out laid out like q (dense) or (total_q, Hq, Dv), lse fp32."""
    batch, heads, _, seqlen_q, _, _, head_dim_v = shape
    if varlen:
        return (_empty((q.shape[0], heads, head_dim_v), q.dtype, q.device),
                _empty((heads, q.shape[0]), torch.float32, q.device))
    return new_attention_output(q, head_dim_v, empty=_empty), _empty((batch, heads, seqlen_q), torch.float32, q.device)


def _band_arguments(q, v, shape, *, scale, mask, window_left, window_right, diagonal_offset, align_to_end, softcap,
                    alibi_slopes, dropout_p, seed, varlen, alignment):
    """What every band kernel takes after its tensors' strides: (mask tensor, mask and ALiBi strides, the
    scalars from num_heads to seed, the feature constexprs)."""
    _, heads, kv_heads, seqlen_q, seqlen_k, _, _ = shape
    mask_arg, mask_kind, mask_strides = _mask_arguments(mask)
    scalars = (heads, heads // kv_heads, seqlen_q, seqlen_k, configs.seqlen_bucket(seqlen_q),
               configs.seqlen_bucket(seqlen_k), alignment, float(scale), float(softcap), int(window_left),
               int(window_right), int(diagonal_offset), float(dropout_p), int(seed))
    features = _feature_constexprs(q, v, mask_kind, varlen, softcap, alibi_slopes, window_left, window_right,
                                   dropout_p, align_to_end)
    return mask_arg, (*mask_strides, *_alibi_strides(alibi_slopes), *scalars), features


def head_blocks(head_dim: int) -> tuple[int, int]:
    """(first, tail): the power-of-two column blocks (each >= 16, tail 0 for one) the forward covers a head dim
    with. Two where they are narrower than one padded block, which the tensor cores would multiply in full:
    96 -> 64 + 32 (not 128), 80 -> 64 + 16, 192 -> 128 + 64; 112 stays one block of 128 (64 + 64 is no
    narrower), as do the powers of two (docs/attention.md, "Head dims that are not powers of two")."""
    padded = max(16, triton.next_power_of_2(head_dim))
    first = padded // 2
    tail = max(16, triton.next_power_of_2(max(head_dim - first, 1)))
    return (first, tail) if first >= 16 and first + tail < padded else (padded, 0)


def _forward_arguments(tiles, out, lse, shape, *, q, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, use_tma, **options):
    """(positional arguments, constexprs) of ``attention_forward_kernel`` for a launch, less the config's tiles.
    ``tiles``: q, k, v, or their descriptors with ``use_tma``. ``aot.py`` builds its specs from the same."""
    varlen = cu_seqlens_q is not None
    q_, k_, v_ = (tile.base if use_tma else tile for tile in tiles)
    mask_arg, trailing, features = _band_arguments(q, v, shape, alibi_slopes=alibi_slopes, varlen=varlen,
                                                   alignment=_alignment(q_, k_, v_), **options)
    positional = [*tiles, out, lse, mask_arg, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                  *_bhmd_strides(q_, varlen), *_bhmd_strides(k_, varlen), *_bhmd_strides(v_, varlen),
                  *_bhmd_strides(out, varlen), *_row_stat_strides(lse, varlen), *trailing]
    (head_block, head_tail), (head_block_v, head_tail_v) = head_blocks(q.shape[-1]), head_blocks(v.shape[-1])
    return positional, dict(features, HEAD_BLOCK=head_block, HEAD_TAIL=head_tail, HEAD_BLOCK_V=head_block_v,
                            HEAD_TAIL_V=head_tail_v, FOLD_SCALE=_folds_scale(options["scale"], features),
                            USE_TMA=use_tma)


def _folds_scale(scale: float, features: dict) -> bool:
    """Whether the forward keeps raw q·k scores and folds scale·log2(e) into exp2's argument: a positive scale
    (it must commute with the row max and keep −inf) and no softcap, ALiBi or additive mask (each transforms
    the scaled score)."""
    return (float(scale) > 0 and not features["HAS_SOFTCAP"] and not features["HAS_ALIBI"]
            and features["MASK_KIND"] != ADDITIVE_MASK)


def _forward_ws_arguments(q, k, v, out, lse, shape, *, scale, window_right, diagonal_offset):
    """(positional arguments, constexprs) of ``attention_forward_ws_kernel``, less the config's tiles. Keys are
    masked per score (MASK_KEYS) unless the length is a multiple of 128, and so of every BLOCK_N it may run."""
    _, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v = shape
    if not base_is_16_byte_aligned(out) or any(stride * out.element_size() % 16 for stride in out.stride()[:-1]):
        raise AssertionError(f"the forward's output is laid out off the 16-byte grid: strides {out.stride()}")
    positional = [q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                  *lse.stride()[:2], heads, heads // kv_heads, seqlen_q, seqlen_k, configs.seqlen_bucket(seqlen_q),
                  configs.seqlen_bucket(seqlen_k), float(scale), int(window_right), int(diagonal_offset)]
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, HAS_WINDOW_RIGHT=window_right >= 0,
                      MASK_KEYS=seqlen_k % 128 != 0, WARP_SPECIALIZE=True)
    return positional, constexprs


@on_input_device
def attention_forward(q, k, v, *, scale, mask=None, window_left=-1, window_right=-1, diagonal_offset=0,
                      align_to_end=False, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, use_tma: bool = False,
                      warp_specialize: bool = False):
    """Flash-attention forward; returns ``(out, lse)``. Shapes and semantics: ``pyattn.reference.attention``.

    ``align_to_end``: sequence b's diagonal offset is ``diagonal_offset + S_b - L_b``, counted from its own
    bottom-right corner (flash-attn's varlen alignment); varlen lengths are read on the device, never the host.

    Dense: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv) -> out (B, Hq, L, Dv), lse (B, Hq, L) fp32.
    Varlen: q (total_q, Hq, D), k/v (total_k, Hk, ·) -> out (total_q, Hq, Dv), lse (Hq, total_q) fp32.
    Inputs may have any strides; nothing is copied.

    ``use_tma=True`` loads the Q/K/V tiles through Hopper TMA descriptors (:func:`tma_unsupported_reason`
    says when a call can); a call that cannot raises ``ValueError`` with the reason, and a failing TMA launch
    raises its own error: there is no fallback to the pointer path.

    ``warp_specialize=True`` runs the warp-specialised Hopper forward (``forward_ws.py``: device-side
    descriptors, a TMA producer warp group and two wgmma/softmax consumer groups) where
    :func:`warp_specialized_unsupported_reason` allows; otherwise ``ValueError`` with the reason, as for
    ``use_tma`` (the two exclude each other).
    """
    for name, flag in (("use_tma", use_tma), ("warp_specialize", warp_specialize)):
        if not isinstance(flag, bool):
            raise TypeError(f"attention_forward: {name} must be a bool, got {flag!r}")
    if use_tma and warp_specialize:
        raise ValueError("attention_forward: use_tma and warp_specialize exclude each other (the warp-specialised "
                         "forward builds its own descriptors)")
    shape = _check_inputs("attention_forward", q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, dropout_p, softcap, seed)
    batch, heads, _, seqlen_q, _, _, _ = shape
    varlen = cu_seqlens_q is not None
    if use_tma:
        reason = tma_unsupported_reason(q, k, v, varlen=varlen, capability=_launch_capability(q.device))
        if reason is not None:
            raise ValueError(f"attention_forward: use_tma=True, but {reason}")
    if warp_specialize:
        reason = warp_specialized_unsupported_reason(
            q, k, v, varlen=varlen, capability=_launch_capability(q.device), scale=scale, mask=mask,
            window_left=window_left, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p)
        if reason is not None:
            raise ValueError(f"attention_forward: warp_specialize=True, but {reason}")
    out, lse = _forward_outputs(q, v, shape, varlen)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    if warp_specialize:
        positional, constexprs = _forward_ws_arguments(q, k, v, out, lse, shape, scale=scale,
                                                       window_right=window_right, diagonal_offset=diagonal_offset)
        grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
        _run_with_descriptor_scratch(q.device, lambda: FORWARD_WS.on(q.device)[grid](*positional, **constexprs))
        return out, lse
    tiles = [_tma_descriptor(x) for x in (q, k, v)] if use_tma else [q, k, v]
    positional, constexprs = _forward_arguments(
        tiles, out, lse, shape, q=q, v=v, scale=scale, mask=mask, window_left=window_left, window_right=window_right,
        diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap, alibi_slopes=alibi_slopes,
        dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, use_tma=use_tma)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    (FORWARD_TMA if use_tma else FORWARD).on(q.device)[grid](*positional, **constexprs)
    return out, lse


def _preprocess_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages) of the delta kernel: the GPU's, or small tiles in the interpreter."""
    if on_interpreter(device):
        return configs.INTERPRETER_PREPROCESS_BLOCK_M, 1, 1
    return configs.PREPROCESS_CONFIG


def _preprocess_arguments(out, grad_out, delta, shape, *, cu_seqlens_q):
    """(positional arguments, constexprs) of the delta kernel, less BLOCK_M."""
    varlen = cu_seqlens_q is not None
    head_dim_v = shape[6]
    positional = [out, grad_out, delta, cu_seqlens_q, *_bhmd_strides(out, varlen), *_bhmd_strides(grad_out, varlen),
                  *_row_stat_strides(delta, varlen), shape[3]]
    return positional, dict(HEAD_DIM_V=head_dim_v, HEAD_DIM_V_PADDED=max(16, triton.next_power_of_2(head_dim_v)),
                            IS_VARLEN=varlen)


def _backward_buffers(q, k, v, lse, *, deterministic):
    """(delta, dq, dk, dv) as the backward allocates them; dq is the zeroed fp32 accumulator unless deterministic."""
    delta = _empty(lse.shape, torch.float32, lse.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    if deterministic:
        dq = _empty(q.shape, q.dtype, q.device)
    else:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    return delta, dq, dk, dv


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return configs.NOMINAL_SM_COUNT  # the interpreter, meta tensors (AOT specs)


def _gqa_heads_per_program(shape, device, requested) -> int:
    """Query heads of a GQA group each dK/dV program sums: ``requested``, else ``configs.dkdv_heads_per_program``."""
    batch, heads, kv_heads, _, seqlen_k, _, _ = shape
    group = heads // kv_heads
    if requested is None:
        return configs.dkdv_heads_per_program(group, batch, kv_heads, seqlen_k, _sm_count(device))
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= group:
        raise ValueError(f"attention_backward: gqa_heads_per_program must be an int in 1..{group} (the GQA group "
                         f"size), got {requested!r}")
    return requested


def _dkdv_targets(dk, dv, shape, heads_per_program, varlen):
    """(DK, DV, partials) the dK/dV kernel writes. One program per whole GQA group writes dk and dv (partials
    None); slices of the group write fp32 partials, (B, Hk, splits, S, D) or (total, Hk, splits, D), passed to
    the kernel with slot kv_head · splits + split on the head axis and summed over the splits afterwards."""
    _, heads, kv_heads, _, _, _, _ = shape
    splits = triton.cdiv(heads // kv_heads, heads_per_program)
    if splits == 1:
        return dk, dv, None
    partials = []
    for grad in (dk, dv):
        split_shape = (*grad.shape[:-1 if varlen else -2], splits, *grad.shape[-1 if varlen else -2:])
        partials.append(_empty(split_shape, torch.float32, grad.device))
    flat = [partial.flatten(1, 2) for partial in partials]  # the (Hk, splits) axes as one head axis of slots
    return flat[0], flat[1], partials


def _transposes_fused_dq(dtype: torch.dtype, head_dim_padded: int, capability: tuple[int, int] | None) -> bool:
    """Whether the fused dQ term is formed as (Kᵀ dSᵀ)ᵀ rather than dS K: on sm_90 for 16-bit inputs with a padded
    head dim of 64 or more. wgmma needs M to be a multiple of 64: Kᵀ dSᵀ has M = head dim, dS K has M = BLOCK_M
    (16-32 rows in most dK/dV entries: mma.sync). On sm_80 both are mma.sync and the transposed one spills (184 B
    at bf16 d128 on 32×64 tiles), so it keeps dS K; fp32 dots are FMA (no tensor cores) on both."""
    return (capability is not None and tuple(capability) >= (9, 0) and dtype != torch.float32
            and head_dim_padded >= 64)


def _backward_arguments(kernel_kind, grad_out, q, k, v, lse, delta, dq, dk, dv, shape, *, cu_seqlens_q, cu_seqlens_k,
                        alibi_slopes, deterministic, heads_per_program=1, capability=None, **options):
    """(positional arguments, constexprs) of the dK/dV kernel (``kernel_kind`` "dkdv") or the dQ kernel ("dq"),
    less the config's tiles. ``dq``: the deterministic dQ output, or the fused kernel's fp32 accumulator;
    ``dk``/``dv`` and ``heads_per_program``: the dK/dV kernel's targets and GQA slice (``_dkdv_targets``);
    ``capability``: the GPU's compute capability (the fused dQ's orientation, ``_transposes_fused_dq``)."""
    varlen = cu_seqlens_q is not None
    mask_arg, trailing, features = _band_arguments(q, v, shape, alibi_slopes=alibi_slopes, varlen=varlen,
                                                   alignment=_alignment(q, k, v, grad_out), **options)
    strides = [*_bhmd_strides(q, varlen), *_bhmd_strides(k, varlen), *_bhmd_strides(v, varlen),
               *_bhmd_strides(grad_out, varlen), *_row_stat_strides(lse, varlen), *_bhmd_strides(dq, varlen)]
    if kernel_kind == "dkdv":
        positional = [q, k, v, grad_out, lse, delta, None if deterministic else dq, dk, dv, mask_arg, alibi_slopes,
                      cu_seqlens_q, cu_seqlens_k, *strides, *_bhmd_strides(dk, varlen), *_bhmd_strides(dv, varlen),
                      *trailing, heads_per_program]
        transposed = not deterministic and _transposes_fused_dq(q.dtype, features["HEAD_DIM_PADDED"], capability)
        return positional, dict(features, FUSED_DQ=not deterministic, TRANSPOSED_DQ=transposed)
    positional = [q, k, v, grad_out, lse, delta, dq, mask_arg, alibi_slopes, cu_seqlens_q, cu_seqlens_k, *strides,
                  *trailing]
    return positional, features


@on_input_device
def attention_backward(grad_out, q, k, v, out, lse, *, scale, mask=None, window_left=-1, window_right=-1,
                       diagonal_offset=0, align_to_end=False, softcap=0.0, alibi_slopes=None, dropout_p=0.0, seed=0,
                       cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                       deterministic=False, gqa_heads_per_program=None):
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward` given its ``out`` and ``lse``, in q's dtype.

    ``deterministic=False`` adds dQ with fp32 atomics from the dK/dV kernel (one pass over the band);
    ``True`` computes dQ in its own kernel instead (two passes, bit-reproducible).
    ``gqa_heads_per_program``: query heads of a GQA group each dK/dV program sums (1..group); fewer than the
    group splits it over programs whose fp32 partials are summed after. None: enough programs to fill the GPU
    (``configs.dkdv_heads_per_program``). Every choice gives the same gradients up to fp32 summation order.
    """
    shape = _check_inputs("attention_backward", q, k, v, mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, dropout_p, softcap, seed)
    batch, heads, kv_heads, seqlen_q, seqlen_k, _, head_dim_v = shape
    varlen = cu_seqlens_q is not None
    for name, tensor in (("grad_out", grad_out), ("out", out)):
        if tuple(tensor.shape) != tuple(q.shape[:-1]) + (head_dim_v,):
            raise ValueError(f"attention_backward: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(q.shape[:-1]) + (head_dim_v,)}")
    expected_lse = (heads, q.shape[0]) if varlen else (batch, heads, seqlen_q)
    if tuple(lse.shape) != expected_lse or lse.dtype != torch.float32:
        raise ValueError(f"attention_backward: lse must be float32 of shape {expected_lse}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    lse = lse.contiguous()  # delta is allocated like lse and the kernels share their strides
    delta, dq, dk, dv = _backward_buffers(q, k, v, lse, deterministic=deterministic)
    if grad_out.numel() == 0 or dk.numel() == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()

    block_m, num_warps, num_stages = _preprocess_config(q.device)
    positional, constexprs = _preprocess_arguments(out, grad_out, delta, shape, cu_seqlens_q=cu_seqlens_q)
    attention_backward_preprocess_kernel[(triton.cdiv(seqlen_q, block_m), heads, batch)](
        *positional, **constexprs, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages)
    options = dict(scale=scale, mask=mask, window_left=window_left, window_right=window_right,
                   diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap,
                   alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k, deterministic=deterministic)
    heads_per_program = _gqa_heads_per_program(shape, q.device, gqa_heads_per_program)
    dk_target, dv_target, partials = _dkdv_targets(dk, dv, shape, heads_per_program, varlen)
    positional, constexprs = _backward_arguments("dkdv", grad_out, q, k, v, lse, delta, dq, dk_target, dv_target,
                                                 shape, heads_per_program=heads_per_program,
                                                 capability=_launch_capability(q.device), **options)
    dkdv = (BACKWARD_DKDV if deterministic else BACKWARD_DKDV_FUSED_DQ).on(q.device)
    slots = kv_heads * triton.cdiv(heads // kv_heads, heads_per_program)
    dkdv[lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), slots, batch)](*positional, **constexprs)
    if partials is not None:
        dk.copy_(partials[0].sum(2))
        dv.copy_(partials[1].sum(2))
    if not deterministic:
        return dq.to(q.dtype), dk, dv
    positional, constexprs = _backward_arguments("dq", grad_out, q, k, v, lse, delta, dq, dk, dv, shape, **options)
    BACKWARD_DQ.on(q.device)[lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)](
        *positional, **constexprs)
    return dq, dk, dv


@on_input_device
def attention_dropout_keep_mask(batch, heads, seqlen_q, seqlen_k, *, dropout_p, seed, device):
    """The (batch, heads, seqlen_q, seqlen_k) bool pattern of kept probabilities the kernels draw for
    ``seed`` (varlen: seqlen_* are max_seqlen_* and sequence b uses [b, :, :L_b, :S_b])."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention_dropout_keep_mask: dropout_p must be in [0, 1), got {dropout_p}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"attention_dropout_keep_mask: seed must be in [0, 2**63), got {seed}")
    keep = _empty((batch, heads, seqlen_q, seqlen_k), torch.int8, device)
    if keep.numel() == 0:
        return keep.bool()
    if on_interpreter(torch.device(device)):
        block_m = block_n = configs.INTERPRETER_KEEP_MASK_BLOCK
        num_warps, num_stages = 1, 1
    else:
        block_m, block_n, num_warps, num_stages = configs.KEEP_MASK_CONFIG
    grid = (triton.cdiv(seqlen_q, block_m), heads, batch)
    attention_dropout_keep_mask_kernel[grid](keep, heads, seqlen_q, seqlen_k, float(dropout_p), int(seed),
                                             BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                                             num_stages=num_stages)
    return keep.bool()
