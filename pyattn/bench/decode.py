"""The decode suite: ``pyattn.flash_attention_with_kvcache`` per backend against torch's SDPA over the same KV cache.

One call is one decode step: every sequence of the batch holds ``cache_len − 1`` cached tokens, appends one new
key/value at position ``cache_len − 1`` and attends with one query per head to all ``cache_len`` keys (a step
repeated at the same position rewrites the same row, so every timed call does the same work). The cache is
contiguous (batch, cache_len, heads_k, head_dim) or paged (blocks of ``block_size`` positions scattered at random
over a pool, found through a block table).

Baselines, on the same cache and the same new token:

* ``sdpa``, the call the drop-in replaces: the new token written with an indexed assignment, then
  ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` over the cache seen as (batch, heads_k, S, D).
  A paged cache is first gathered into that layout (``k_cache[block_table]``), inside the timed call: it is what
  attending to a paged cache costs in plain PyTorch, and it moves the cache's bytes twice more;
* ``flex``: ``torch.compile(flex_attention)`` over the same (gathered) tensors, opt-in as in the attention suite.

The figure of merit is bandwidth: a decode step reads the whole K/V cache to do 2 FLOPs per byte per query head of
a group (docs/decode.md, "Floors"), so each case's ``bytes()`` counts the K and V bytes read (the model every
implementation must at least move) and a row's ``gbps`` and ``of roof`` are that over its time, against the
device's measured copy bandwidth. Tokens/s is batch / time: one new token per sequence per call.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import pyattn
from pyattn.bench import flops as work
from pyattn.bench.flops import FORWARD
from pyattn.bench.registry import DropIn, Plot, Suite, dtype_name, register_suite
from pyattn.bench.workload import (
    Unsupported,
    Workload,
    all_finite,
    bounds_from,
    errors,
    on_backend,
    poison_allocator,
    probe,
    random_tensor,
    seeded_generator,
)

DECODE_BASELINES = ("sdpa", "flex")
GPU_HEADS_Q, GPU_HEAD_DIM, GPU_BLOCK_SIZE = 32, 128, 256
FREE_MEMORY_MARGIN = 0.85  # a case whose tensors would take more of the free memory than this is skipped


@dataclass(frozen=True)
class DecodeCase:
    """One decode step: q (batch, 1, heads_q, head_dim) over ``cache_len`` keys per sequence (the last appended)."""

    batch: int
    cache_len: int
    heads_q: int
    heads_k: int
    head_dim: int
    block_size: int | None  # None: a contiguous cache
    dtype: torch.dtype
    mode: str = FORWARD
    op: ClassVar[str] = "decode"

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_k

    @property
    def layout(self) -> str:
        return "contiguous" if self.block_size is None else f"paged{self.block_size}"

    @property
    def shape(self) -> str:
        return f"B{self.batch} S{self.cache_len} Hq{self.heads_q} Hk{self.heads_k} D{self.head_dim} {self.layout}"

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def flops(self) -> float:
        # QKᵀ and PV of one query per head over every key: 4·B·Hq·S·D.
        return work.attention_flops(self.batch, self.heads_q, 1, self.cache_len, self.head_dim)

    def bytes(self) -> float:
        """K and V read once: 2·B·S·Hk·D elements. q, out, the new token and the block table are < 0.1 % of it
        from S = 1k on; the paged SDPA baseline's gather moves more, which is its cost, not the model's."""
        return float(2 * self.batch * self.cache_len * self.heads_k * self.head_dim * self.element_size)

    def tokens(self) -> int:
        return self.batch  # one new token per sequence

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": dtype_name(self.dtype), "group": self.group, "layout": self.layout}


# (batch, cache_len, heads_q, heads_k, head_dim, block_size) per shape set; GPU sets are batch × cache × GQA × layout.
def _gpu_grid(batches, cache_lens) -> list[tuple]:
    return [(batch, cache_len, GPU_HEADS_Q, GPU_HEADS_Q // group, GPU_HEAD_DIM, block_size)
            for group, block_size, batch, cache_len in itertools.product((1, 8), (None, GPU_BLOCK_SIZE), batches,
                                                                          cache_lens)]


SHAPES = {
    "tiny": [(2, 64, 4, 2, 16, None), (2, 64, 4, 2, 16, 16), (1, 96, 2, 2, 16, None), (1, 96, 2, 2, 16, 16)],
    "small": [(4, 2048, 8, 2, 64, None), (4, 2048, 8, 2, 64, 256)],
    "default": _gpu_grid((1, 16, 64), (8192, 32768)),
    "full": _gpu_grid((1, 16, 64, 256), (1024, 8192, 32768, 131072)),
}


def decode_cases(shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list[DecodeCase]:
    """Forward only (a decode step has no backward). ``tiny``: structure only, seconds on a CPU; ``small``: one
    realistic CPU shape; ``default``: batch {1, 16, 64} × cache {8k, 32k}; ``full``: batch {1, 16, 64, 256} ×
    cache {1k, 8k, 32k, 128k}; both × GQA {1, 8} (32 query heads, 32 or 4 KV heads, D128) × contiguous and paged
    (blocks of 256)."""
    if FORWARD not in modes:
        return []
    return [DecodeCase(*geometry, dtype=dtype) for dtype in dtypes for geometry in SHAPES[shapes]]


def _free_bytes(device: torch.device) -> float:
    if device.type != "cuda":
        return float("inf")
    free, _ = torch.cuda.mem_get_info(device)
    return float(free)


def cache_fits(needed: float, free: float) -> bool:
    return needed <= FREE_MEMORY_MARGIN * free


class DecodeData:
    """One case's cache, query and new token, shared by every backend, and the float64 reference of the first and
    last batch rows (rows are independent; the last catches offset overflows), one KV head at a time."""

    def __init__(self, case: DecodeCase, device: torch.device, seed: int = 0):
        self.case, self.device = case, device
        self.skip_reason: str | None = None
        self.gathered_fits = True
        blocks_per_seq = -(-case.cache_len // case.block_size) if case.block_size else 1
        rows = case.batch * blocks_per_seq if case.block_size else case.batch
        row_len = case.block_size or case.cache_len
        cache_bytes = 2.0 * rows * row_len * case.heads_k * case.head_dim * case.element_size
        free = _free_bytes(device)
        if not cache_fits(cache_bytes, free):
            self.skip_reason = (f"its K/V cache needs {cache_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free")
            return
        self.gathered_fits = case.block_size is None or cache_fits(2 * cache_bytes, free)
        generator = seeded_generator(device, seed)
        shape = (rows, row_len, case.heads_k, case.head_dim)
        self.k_cache = random_tensor(shape, case.dtype, device, generator)
        self.v_cache = random_tensor(shape, case.dtype, device, generator)
        self.q = random_tensor((case.batch, 1, case.heads_q, case.head_dim), case.dtype, device, generator)
        self.k = random_tensor((case.batch, 1, case.heads_k, case.head_dim), case.dtype, device, generator)
        self.v = random_tensor((case.batch, 1, case.heads_k, case.head_dim), case.dtype, device, generator)
        self.cache_seqlens = torch.full((case.batch,), case.cache_len - 1, dtype=torch.int32, device=device)
        self.block_table = None
        if case.block_size:
            order = torch.randperm(rows, generator=generator, device=device)
            self.block_table = order.reshape(case.batch, blocks_per_seq).to(torch.int32)
        self.scale = case.head_dim**-0.5
        self.checked_rows = sorted({0, case.batch - 1})
        self._reference: dict[str, torch.Tensor] | None = None
        self._bounds: dict[str, float] | None = None

    def sequence(self, cache: torch.Tensor, new: torch.Tensor, b: int) -> torch.Tensor:
        """(S, Hk, ·) keys or values of sequence b after the append, from the cache as it was given."""
        case = self.case
        if self.block_table is None:
            rows = cache[b, : case.cache_len - 1]
        else:
            rows = cache[self.block_table[b].long()].flatten(0, 1)[: case.cache_len - 1]
        return torch.cat([rows, new[b]])

    def _checked_rows_attention(self, dtype: torch.dtype) -> torch.Tensor:
        """out (rows, 1, Hq, D) of the checked rows by torch's math SDPA in ``dtype``, one KV head at a time."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        group, outputs = self.case.group, []
        for b in self.checked_rows:
            keys = self.sequence(self.k_cache, self.k, b)
            values = self.sequence(self.v_cache, self.v, b)
            heads = []
            for h in range(self.case.heads_k):
                q = self.q[b, 0, h * group : (h + 1) * group].to(dtype)[:, None]  # (group, 1, D)
                k, v = keys[:, h].to(dtype)[None], values[:, h].to(dtype)[None]  # (1, S, D)
                with sdpa_kernel(SDPBackend.MATH):
                    heads.append(F.scaled_dot_product_attention(q, k.expand(group, -1, -1),
                                                                v.expand(group, -1, -1), scale=self.scale))
            outputs.append(torch.cat(heads)[:, 0][None, None])  # (1, 1, Hq, D)
        return torch.cat(outputs)

    def reference(self) -> dict[str, torch.Tensor]:
        if self._reference is None:
            self._reference = {"output": self._checked_rows_attention(torch.float64)}
        return self._reference

    def bounds(self) -> dict[str, float]:
        if self._bounds is None:
            own = errors({"output": self._checked_rows_attention(self.case.dtype)}, self.reference())
            self._bounds = bounds_from(own, self.case.dtype, self.device)
        return self._bounds

    def check(self, function) -> tuple[dict[str, float], bool]:
        poison_allocator(self.device, 4 * self.q.numel() * self.q.element_size())
        out = function()
        checked = {"output": out[self.checked_rows]}
        return errors(checked, self.reference()), all_finite([out])


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _torch_cache_view(data: DecodeData):
    """() -> (k, v) of shape (B, Hk, S, D) over the cache: a view of a contiguous cache, a gather of a paged one."""
    case = data.case
    if data.block_table is None:
        return lambda: (data.k_cache.transpose(1, 2), data.v_cache.transpose(1, 2))
    if not data.gathered_fits:
        raise Unsupported("the gathered copy of the paged cache SDPA attends to would not fit in free memory")
    blocks = data.block_table.long()

    def gather():
        k = data.k_cache[blocks].flatten(1, 2)[:, : case.cache_len]
        v = data.v_cache[blocks].flatten(1, 2)[:, : case.cache_len]
        return k.transpose(1, 2), v.transpose(1, 2)

    return gather


def _torch_append(data: DecodeData):
    """() -> None: the new token written at position cache_len − 1 of every sequence, as a PyTorch user would."""
    position = data.case.cache_len - 1
    if data.block_table is None:

        def append():
            data.k_cache[:, position] = data.k[:, 0]
            data.v_cache[:, position] = data.v[:, 0]

        return append
    block_size = data.case.block_size
    blocks, row = data.block_table[:, position // block_size].long(), position % block_size

    def append_paged():
        data.k_cache[blocks, row] = data.k[:, 0]
        data.v_cache[blocks, row] = data.v[:, 0]

    return append_paged


def decode_function(backend: str, data: DecodeData):
    """``() -> out (B, 1, Hq, D)`` of one decode step on ``backend`` (the append included)."""
    case = data.case
    kind, name = backend.split(":", 1)
    if kind == "pyattn":

        def run_pyattn():
            return pyattn.flash_attention_with_kvcache(
                data.q, data.k_cache, data.v_cache, data.k, data.v, cache_seqlens=data.cache_seqlens,
                block_table=data.block_table, causal=True)

        return on_backend(name, run_pyattn)
    if name not in DECODE_BASELINES:
        raise Unsupported(f"{backend} does not run decode")
    append, cache = _torch_append(data), _torch_cache_view(data)
    gqa = {"enable_gqa": True} if case.heads_q != case.heads_k else {}
    if name == "flex":
        try:
            flex_attention = _compiled_flex_attention()
        except ImportError as error:
            raise Unsupported(f"torch {torch.__version__} has no FlexAttention ({error})") from None

        def run_flex():
            append()
            k, v = cache()
            return flex_attention(data.q.transpose(1, 2), k, v, scale=data.scale, **gqa).transpose(1, 2)

        return run_flex

    def run_sdpa():  # decode's one query sees every key: no mask
        append()
        k, v = cache()
        return F.scaled_dot_product_attention(data.q.transpose(1, 2), k, v, scale=data.scale, **gqa).transpose(1, 2)

    return run_sdpa


def prepare_decode(case: DecodeCase, backend: str, data: DecodeData) -> Workload:
    if data.skip_reason is not None:
        raise Unsupported(data.skip_reason)
    function = decode_function(backend, data)
    with torch.no_grad():
        probe(function)

    def call():
        with torch.no_grad():
            return function()

    return Workload(case, backend, data.device, call, check=lambda: data.check(call), bounds=data.bounds)


def _served_by(case: DecodeCase, data: DecodeData) -> str | None:
    if data.skip_reason is not None:
        return None
    text = pyattn.explain("flash_attention_with_kvcache", data.q, data.k_cache, data.v_cache, data.k, data.v,
                          cache_seqlens=data.cache_seqlens, block_table=data.block_table, causal=True)
    found = re.search(r"auto picks:\s*(\S+)", text)
    return found.group(1) if found else None


def _panel(row: dict) -> tuple[tuple, str]:
    case = row["case"]
    title = f"B{case['batch']}, GQA {case['group']} (Hk {case['heads_k']}), {case['layout']}"
    return (case["layout"], case["group"], case["batch"]), title


def _cache_len(row: dict) -> int:
    return row["case"]["cache_len"]


SUITE = register_suite(
    Suite(
        name="decode",
        ops=(DecodeCase.op,),
        cases=decode_cases,
        data=DecodeData,
        prepare=prepare_decode,
        baselines=lambda case: DECODE_BASELINES,
        all_baselines=DECODE_BASELINES,
        dropin=lambda case: DropIn(
            "pyattn.flash_attention_with_kvcache", "torch.nn.functional.scaled_dot_product_attention", "sdpa"
        ),
        throughput="tokens_per_s",
        plots=(
            Plot("decode_bandwidth.png", "Decode step: K/V bytes read / time", lambda row: True, _panel, _cache_len,
                 "cached keys per sequence", "gbps"),
            Plot("decode_time.png", "Decode step time", lambda row: True, _panel, _cache_len,
                 "cached keys per sequence", "median_ms", log_y=True),
        ),
        gpu_only={"flex": "FlexAttention is benchmarked on a GPU (on a CPU it compiles for minutes per shape); "
                          "ask with --baselines"},
        opt_in={"flex": "FlexAttention compiles for every shape: it runs with --shapes full or --baselines ...,flex"},
        served_by=_served_by,
    )
)
