"""Attention workloads: pyattn's SDPA per backend against torch's SDPA kernels and FlexAttention."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import pyattn
from pyattn.bench.flops import BACKWARD, FORWARD, FORWARD_BACKWARD
from pyattn.bench.suites import SDPA_BASELINES, AttentionCase
from pyattn.bench.workload import (
    Unsupported,
    Workload,
    all_finite,
    bounds_from,
    errors,
    poison_allocator,
    probe,
    random_tensor,
    seeded_generator,
)

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
            with pyattn.use_backend(name):
                return pyattn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

        return run_pyattn
    if name == "flex":
        return _flex_function(case, mask, device)
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
