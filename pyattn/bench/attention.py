"""The attention suite: ``pyattn.functional.scaled_dot_product_attention`` per backend against torch's
SDPA (as a user calls it, and under each of its kernels) and FlexAttention.

Baselines: ``sdpa`` is ``F.scaled_dot_product_attention`` left to choose its own kernel, the call the
drop-in replaces; ``sdpa-<kernel>`` forces one kernel with ``sdpa_kernel`` (on a CPU, ``sdpa-flash``
is torch's CPU flash kernel, not the CUDA one); ``flex`` is ``torch.compile(flex_attention)``.
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
from pyattn.bench.flops import BACKWARD, FORWARD, FORWARD_BACKWARD, MODES
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

SDPA_BASELINES = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
ATTENTION_BASELINES = ("sdpa", *SDPA_BASELINES, "flex")


@dataclass(frozen=True)
class AttentionCase:
    """Self-attention (L = S): q, k, v of shape (batch, heads, seq_len, head_dim)."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool
    masked: bool  # a boolean attn_mask: key padding, and the causal triangle when ``causal``
    dtype: torch.dtype
    mode: str
    op: ClassVar[str] = "attention"

    @property
    def shape(self) -> str:
        flags = (" causal" if self.causal else "") + (" mask" if self.masked else "")
        return f"B{self.batch} H{self.heads} L{self.seq_len} D{self.head_dim}{flags}"

    def flops(self) -> float:
        # A boolean mask is counted dense: a kernel computes every tile the mask does not let it skip.
        causal = self.causal and not self.masked
        return work.attention_flops(
            self.batch, self.heads, self.seq_len, self.seq_len, self.head_dim, causal=causal, mode=self.mode
        )

    def bytes(self) -> float | None:
        return None  # compute-bound: its figure is TFLOP/s

    def tokens(self) -> int:
        return self.batch * self.seq_len

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": dtype_name(self.dtype)}


def attention_cases(shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list[AttentionCase]:
    """Head dims 64 and 128 over lengths (and d96 at one length in ``default``), with batch·seq_len = 16k tokens and heads·head_dim = 2048
    (flash-attention's benchmark convention: every length does the same work per token). ``small`` is
    the CPU set: one realistic shape, causal, not, and with a key-padding mask."""
    if shapes == "tiny":
        geometry = [(1, 2, length, 16, causal, False) for length in (32, 64) for causal in (False, True)]
        geometry.append((1, 2, 64, 16, False, True))
    elif shapes == "small":
        geometry = [(2, 8, 1024, 64, causal, False) for causal in (False, True)]
        geometry.append((2, 8, 1024, 64, False, True))
    else:
        lengths = (1024, 4096, 16384) if shapes == "default" else (512, 1024, 2048, 4096, 8192, 16384)
        masks = (False,) if shapes == "default" else (False, True)
        geometry = [
            (16384 // length, 2048 // head_dim, length, head_dim, causal, masked)
            for head_dim, length, causal, masked in itertools.product((64, 128), lengths, (False, True), masks)
        ]
        if shapes == "default":
            geometry += [(4, 16, 4096, 128, causal, True) for causal in (False, True)]
            # A head dim the forward splits into two column blocks (64 + 32), beside d128 at the same shape.
            geometry += [(4, 16, 4096, 96, causal, False) for causal in (False, True)]
    return [AttentionCase(*g, dtype=dtype, mode=mode) for dtype in dtypes for g in geometry for mode in modes]


# How many fp32 L×S matrices the dense paths keep alive at their peak (from reading their code): torch's
# math SDPA holds scores and probabilities, pyattn's reference also its masked and exponentiated
# scores; a backward about doubles either. Used to skip a case that would not fit, with the reason.
DENSE_SCORE_COPIES = {
    "torch:sdpa-math": {FORWARD: 2, BACKWARD: 4, FORWARD_BACKWARD: 4},
    "pyattn:reference": {FORWARD: 4, BACKWARD: 8, FORWARD_BACKWARD: 8},
}
FREE_MEMORY_MARGIN = 0.85
GRADIENT_NAMES = ("grad_query", "grad_key", "grad_value")


class AttentionData:
    """One case's inputs, shared by every backend, and its float64 reference on the checked heads."""

    def __init__(self, case: AttentionCase, device: torch.device, seed: int = 0):
        self.case, self.device = case, device
        generator = seeded_generator(device, seed)
        shape = (case.batch, case.heads, case.seq_len, case.head_dim)
        self.q, self.k, self.v, self.dout = (random_tensor(shape, case.dtype, device, generator) for _ in range(4))
        self.mask = self._make_mask(generator) if case.masked else None
        # First and last (batch, head): heads are independent, and the last catches offset overflows.
        self.checked_heads = sorted({(0, 0), (case.batch - 1, case.heads - 1)})
        self._reference: dict[str, torch.Tensor] | None = None
        self._bounds: dict[str, float] | None = None

    @property
    def training(self) -> bool:
        return self.case.mode != FORWARD

    def _make_mask(self, generator: torch.Generator) -> torch.Tensor:
        """(B, 1, L, L) key padding: each sequence keeps a random prefix of at least L/2 keys. Key 0 is
        always kept, so no query row is fully masked (where torch's SDPA returns NaN)."""
        length = self.case.seq_len
        kept = torch.randint(length // 2, length + 1, (self.case.batch,), generator=generator, device=self.device)
        keys = torch.arange(length, device=self.device)
        mask = (keys[None, :] < kept[:, None])[:, None, None, :].expand(-1, 1, length, -1)
        if self.case.causal:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        return mask.contiguous()

    def _torch_math(self, q, k, v, mask):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.case.causal and mask is None)

    def _checked_heads_math(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """torch's math SDPA in ``dtype``, one checked head at a time (at 16k a head's scores are 2 GiB)."""
        results: dict[str, list[torch.Tensor]] = {}
        for b, h in self.checked_heads:
            q, k, v = (
                t[b : b + 1, h : h + 1].to(dtype).requires_grad_(self.training) for t in (self.q, self.k, self.v)
            )
            out = self._torch_math(q, k, v, None if self.mask is None else self.mask[b : b + 1])
            named = {"output": out}
            if self.training:
                grads = torch.autograd.grad(out, (q, k, v), self.dout[b : b + 1, h : h + 1].to(dtype))
                named.update(zip(GRADIENT_NAMES, grads))
            for name, value in named.items():
                results.setdefault(name, []).append(value.detach())
        return {name: torch.cat(values) for name, values in results.items()}

    def reference(self) -> dict[str, torch.Tensor]:
        if self._reference is None:
            self._reference = self._checked_heads_math(torch.float64)
        return self._reference

    def bounds(self) -> dict[str, float]:
        if self._bounds is None:
            own = errors(self._checked_heads_math(self.case.dtype), self.reference())
            self._bounds = bounds_from(own, self.case.dtype, self.device)
        return self._bounds

    def check(self, function) -> tuple[dict[str, float], bool]:
        q, k, v = (t.detach().requires_grad_(self.training) for t in (self.q, self.k, self.v))
        poison_allocator(self.device, 4 * q.numel() * q.element_size())
        out = function(q, k, v)
        outputs = {"output": out}
        if self.training:
            outputs.update(zip(GRADIENT_NAMES, torch.autograd.grad(out, (q, k, v), self.dout)))
        checked = {
            name: torch.cat([value[b : b + 1, h : h + 1] for b, h in self.checked_heads])
            for name, value in outputs.items()
        }
        return errors(checked, self.reference()), all_finite(outputs.values())


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_function(case: AttentionCase, mask: torch.Tensor | None, device: torch.device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as error:
        raise Unsupported(f"torch {torch.__version__} has no FlexAttention ({error})") from None
    length = case.seq_len
    if mask is not None:

        def dense_mask(b, h, q_idx, kv_idx):
            return mask[b, 0, q_idx, kv_idx]

        block_mask = create_block_mask(dense_mask, case.batch, None, length, length, device=device)
    elif case.causal:

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, length, length, device=device)
    else:
        block_mask = None
    flex_attention = _compiled_flex_attention()
    return lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask)


def _require_dense_scores_fit(backend: str, case: AttentionCase, device: torch.device) -> None:
    if backend not in DENSE_SCORE_COPIES or device.type != "cuda":
        return
    needed = case.batch * case.heads * case.seq_len**2 * 4 * DENSE_SCORE_COPIES[backend][case.mode]
    free, _ = torch.cuda.mem_get_info(device)
    if needed > FREE_MEMORY_MARGIN * free:
        raise Unsupported(
            f"its dense {case.seq_len}x{case.seq_len} score matrices need ~{needed / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB is free"
        )


def attention_function(backend: str, case: AttentionCase, mask: torch.Tensor | None, device: torch.device):
    """``(q, k, v) -> out`` on one backend (a mask already holds the causal triangle)."""
    is_causal = case.causal and mask is None
    kind, name = backend.split(":", 1)
    _require_dense_scores_fit(backend, case, device)
    if kind == "pyattn":

        def run_pyattn(q, k, v):
            return pyattn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

        return on_backend(name, run_pyattn)
    if name == "flex":
        return _flex_function(case, mask, device)
    if name == "sdpa":  # as a user calls it: torch picks the kernel

        def run_torch_sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

        return run_torch_sdpa
    if name not in SDPA_BASELINES:
        raise Unsupported(f"{backend} does not run attention")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, SDPA_BASELINES[name], None)
    if kernel is None:
        raise Unsupported(f"torch {torch.__version__} has no SDPBackend.{SDPA_BASELINES[name]}")

    def run_sdpa(q, k, v):
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    return run_sdpa


def prepare_attention(case: AttentionCase, backend: str, data: AttentionData) -> Workload:
    function = attention_function(backend, case, data.mask, data.device)
    training = case.mode != FORWARD
    leaves = [t.detach().requires_grad_(training) for t in (data.q, data.k, data.v)]
    probe(lambda: function(*leaves))
    dout = data.dout
    if case.mode == FORWARD:

        def call():
            with torch.no_grad():
                return function(*leaves)
    elif case.mode == FORWARD_BACKWARD:

        def call():
            function(*leaves).backward(dout)
    else:
        out = function(*leaves)  # the forward stays out of a backward-only figure

        def call():
            out.backward(dout, retain_graph=True)

    return Workload(
        case,
        backend,
        data.device,
        call,
        check=lambda: data.check(function),
        bounds=data.bounds,
        grad_to_none=leaves if training else [],
    )


def _served_by(case: AttentionCase, data: AttentionData) -> str | None:
    """What pyattn's auto choice serves the case with, from ``pyattn.explain`` (None if it cannot say)."""
    text = pyattn.explain(
        "scaled_dot_product_attention",
        data.q,
        data.k,
        data.v,
        attn_mask=data.mask,
        is_causal=case.causal and data.mask is None,
    )
    found = re.search(r"auto picks:\s*(\S+)", text)
    return found.group(1) if found else None


def _panel(row: dict) -> tuple[tuple, str]:
    case = row["case"]
    title = f"{row['mode']}, D{case['head_dim']}{', causal' if case['causal'] else ''}"
    return (MODES.index(row["mode"]), case["head_dim"], case["causal"]), title


def _memory_panel(row: dict) -> tuple[tuple, str]:
    (key, title), masked = _panel(row), row["case"]["masked"]
    return (*key, masked), title + (", mask" if masked else "")


def _seq_len(row: dict) -> int:
    return row["case"]["seq_len"]


SUITE = register_suite(
    Suite(
        name="attention",
        ops=(AttentionCase.op,),
        cases=attention_cases,
        data=AttentionData,
        prepare=prepare_attention,
        baselines=lambda case: ATTENTION_BASELINES,
        all_baselines=ATTENTION_BASELINES,
        dropin=lambda case: DropIn(
            "pyattn.functional.scaled_dot_product_attention", "torch.nn.functional.scaled_dot_product_attention", "sdpa"
        ),
        throughput="tflops",
        plots=(
            Plot(
                "attention_tflops.png",
                "Attention throughput (no mask)",
                lambda row: not row["case"]["masked"],
                _panel,
                _seq_len,
                "sequence length",
                "tflops",
            ),
            Plot(
                "attention_tflops_masked.png",
                "Attention throughput (boolean attn_mask: key padding, and the causal triangle when causal)",
                lambda row: row["case"]["masked"],
                _panel,
                _seq_len,
                "sequence length",
                "tflops",
            ),
            Plot(
                "attention_memory.png",
                "Attention peak memory over the call",
                lambda row: True,
                _memory_panel,
                _seq_len,
                "sequence length",
                "peak_mib",
                log_y=True,
            ),
        ),
        gpu_only={
            "sdpa-efficient": "torch's memory-efficient SDPA kernel runs on CUDA only",
            "sdpa-cudnn": "torch's cuDNN SDPA kernel runs on CUDA only",
            "flex": "FlexAttention is benchmarked on a GPU (on a CPU it compiles for minutes per shape); "
            "ask with --baselines",
        },
        opt_in={
            "flex": "FlexAttention compiles for every shape (minutes in all): "
            "it runs with --shapes full or --baselines ...,flex",
        },
        served_by=_served_by,
    )
)
