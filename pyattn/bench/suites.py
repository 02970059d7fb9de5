"""What is benchmarked: the cases (one op, shape, dtype and direction each), the shape sets, and the
backends that may run each case.

Backends are named ``pyattn:<name>`` (a pyattn backend forced with ``use_backend``) or
``torch:<name>`` (a PyTorch baseline: SDPA per kernel, FlexAttention, nn.LSTM, nn.LSTMCell).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import ClassVar, Union

import torch

from pyattn.bench import flops as work
from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD

PYATTN_BACKENDS = ("cuda", "triton", "reference")
SDPA_BASELINES = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}
ATTENTION_BASELINES = (*SDPA_BASELINES, "flex")
LSTM_SEQUENCE_BASELINES = ("lstm", "lstmcell-loop")  # nn.LSTM (cuDNN on a GPU); nn.LSTMCell over the steps
LSTM_CELL_BASELINES = ("lstmcell", "lstm")  # nn.LSTMCell; nn.LSTM over one step
BASELINES = tuple(dict.fromkeys(ATTENTION_BASELINES + LSTM_SEQUENCE_BASELINES + LSTM_CELL_BASELINES))
SUITE_BASELINES = {
    "attention": ATTENTION_BASELINES,
    "lstm": tuple(dict.fromkeys(LSTM_SEQUENCE_BASELINES + LSTM_CELL_BASELINES)),
}
SHAPE_SETS = ("small", "default", "full")
SUITES = ("attention", "lstm")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return {value: key for key, value in DTYPES.items()}[dtype]


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


@dataclass(frozen=True)
class LSTMCase:
    """One layer, one direction, input size = hidden size; ``cell``: a single step (``steps`` = 1)."""

    cell: bool
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    dtype: torch.dtype
    mode: str

    @property
    def op(self) -> str:
        return "lstm_cell" if self.cell else "lstm"

    @property
    def shape(self) -> str:
        steps = "" if self.cell else f" T{self.steps}"
        return f"B{self.batch}{steps} I{self.input_size} H{self.hidden_size}"

    def flops(self) -> float:
        return work.lstm_flops(self.batch, self.steps, self.input_size, self.hidden_size, self.mode)

    def bytes(self) -> float | None:
        if not self.cell:
            return None  # a sequence reuses its weights every step: not bound by memory traffic
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return work.lstm_cell_bytes(self.batch, self.input_size, self.hidden_size, element_size, self.mode)

    def tokens(self) -> int:
        return self.batch * self.steps

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": dtype_name(self.dtype)}


Case = Union[AttentionCase, LSTMCase]


def attention_cases(shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list[AttentionCase]:
    """Head dims 64 and 128 over lengths, with batch·seq_len = 16k tokens and heads·head_dim = 2048
    (flash-attention's benchmark convention: every length does the same work per token)."""
    if shapes == "small":
        geometry = [(1, 2, length, 64, causal, False) for length in (128, 256) for causal in (False, True)]
        geometry.append((1, 2, 128, 64, False, True))
    else:
        lengths = (1024, 4096, 16384) if shapes == "default" else (512, 1024, 2048, 4096, 8192, 16384)
        masks = (False,) if shapes == "default" else (False, True)
        geometry = [
            (16384 // length, 2048 // head_dim, length, head_dim, causal, masked)
            for head_dim, length, causal, masked in itertools.product((64, 128), lengths, (False, True), masks)
        ]
        if shapes == "default":
            geometry += [(4, 16, 4096, 128, causal, True) for causal in (False, True)]
    return [AttentionCase(*g, dtype=dtype, mode=mode) for dtype in dtypes for g in geometry for mode in modes]


def lstm_cases(shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list[LSTMCase]:
    """Sequences of T steps and single cell steps, forward and forward+backward (a backward alone is
    no use of an LSTM)."""
    modes = [mode for mode in modes if mode in (FORWARD, FORWARD_BACKWARD)]
    if shapes == "small":
        sequence, cell = [(1, 16, 64), (4, 16, 64)], [(1, 64), (8, 64)]
    elif shapes == "default":
        sequence = [(b, 1024, h) for b in (1, 16, 64, 256) for h in (256, 1024)] + [(16, 1024, 768)]
        cell = [(b, h) for b in (1, 16, 256) for h in (256, 1024)] + [(16, 768)]
    else:
        batches, hiddens = (1, 8, 16, 64, 256), (256, 512, 768, 1024)
        sequence = [(b, t, h) for t in (128, 1024) for b in batches for h in hiddens]  # holds B16 T1024 H768
        cell = [(b, h) for b in batches for h in hiddens]
    cases: list[LSTMCase] = []
    for dtype in dtypes:
        for mode in modes:
            cases += [LSTMCase(False, b, t, h, h, dtype, mode) for b, t, h in sequence]
            cases += [LSTMCase(True, b, 1, h, h, dtype, mode) for b, h in cell]
    return cases


def build_cases(suite: str, shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list[Case]:
    if shapes not in SHAPE_SETS:
        raise ValueError(f"shapes: expected one of {SHAPE_SETS}, got {shapes!r}")
    if suite == "attention":
        return attention_cases(shapes, dtypes, modes)
    if suite == "lstm":
        return lstm_cases(shapes, dtypes, modes)
    raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")


def baselines_for(case: Case) -> tuple[str, ...]:
    if isinstance(case, AttentionCase):
        return ATTENTION_BASELINES
    return LSTM_CELL_BASELINES if case.cell else LSTM_SEQUENCE_BASELINES
