"""The multi-head attention suite: ``pyattn.nn.MultiheadAttention`` per backend against
``torch.nn.MultiheadAttention`` (baseline ``mha``), self-attention, batch_first, with the same weights
in both modules (one state_dict loaded into each).

``need_weights=True`` is torch's default: both modules then also return the head-averaged attention
weights (torch's fast path in inference, its plain path in training; pyattn's module computes them
in plain PyTorch). ``need_weights=False`` is the fused path. Forward runs in ``eval()`` under
``no_grad`` (where torch takes its fast path, as a user's inference does), forward+backward in ``train()``
(dropout 0, so both modes compute the same function).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

import pyattn
from pyattn.bench import flops as work
from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD, MODES
from pyattn.bench.registry import DropIn, Plot, Suite, dtype_name, register_suite
from pyattn.bench.workload import (
    Unsupported,
    Workload,
    all_finite,
    backend_context,
    bounds_from,
    errors,
    poison_allocator,
    probe,
    random_tensor,
    seeded_generator,
)

MHA_BASELINES = ("mha",)
ROW_SLICED = ("output", "weights", "grad_input")  # per batch row; weight gradients are whole


@dataclass(frozen=True)
class MHACase:
    """Self-attention on x of shape (batch, seq_len, embed_dim), ``heads`` heads of embed_dim / heads."""

    batch: int
    seq_len: int
    embed_dim: int
    heads: int
    need_weights: bool
    dtype: torch.dtype
    mode: str
    op: ClassVar[str] = "mha"

    @property
    def shape(self) -> str:
        return f"B{self.batch} L{self.seq_len} E{self.embed_dim} H{self.heads} need_weights={self.need_weights}"

    def flops(self) -> float:
        return work.mha_flops(self.batch, self.seq_len, self.embed_dim, self.mode)

    def bytes(self) -> float | None:
        return None

    def tokens(self) -> int:
        return self.batch * self.seq_len

    def as_dict(self) -> dict:
        return {**asdict(self), "dtype": dtype_name(self.dtype)}


def mha_cases(shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list[MHACase]:
    """Forward and forward+backward, need_weights True (torch's default) and False."""
    modes = [mode for mode in modes if mode in (FORWARD, FORWARD_BACKWARD)]
    geometry = {
        "tiny": [(2, 16, 32, 2)],
        "small": [(4, 512, 256, 4)],
        "default": [(16, 1024, 1024, 16), (4, 4096, 1024, 16)],
        "full": [(16, 1024, 1024, 16), (4, 4096, 1024, 16), (8, 2048, 2048, 16)],
    }[shapes]
    return [
        MHACase(*g, need_weights=need_weights, dtype=dtype, mode=mode)
        for dtype in dtypes
        for g in geometry
        for need_weights in (True, False)
        for mode in modes
    ]


class MHAData:
    """One case's input and weights, and its float64 reference (torch's module in float64) on the first
    and last batch row (rows are independent; the last catches offset overflows)."""

    def __init__(self, case: MHACase, device: torch.device, seed: int = 0):
        self.case, self.device = case, device
        generator = seeded_generator(device, seed)
        embed = case.embed_dim

        def uniform(shape, bound):
            return ((torch.rand(shape, generator=generator, device=device) * 2 - 1) * bound).to(case.dtype)

        # torch's initialisation for the weights (xavier-uniform in, 1/sqrt(E) out); biases random, not
        # torch's zeros, so a bias a backend ignores shows in the check.
        self.state = {
            "in_proj_weight": uniform((3 * embed, embed), math.sqrt(6.0 / (4 * embed))),
            "in_proj_bias": uniform((3 * embed,), 0.1),
            "out_proj.weight": uniform((embed, embed), 1.0 / math.sqrt(embed)),
            "out_proj.bias": uniform((embed,), 0.1),
        }
        self.x = random_tensor((case.batch, case.seq_len, embed), case.dtype, device, generator)
        self.dout = random_tensor((case.batch, case.seq_len, embed), case.dtype, device, generator)
        self.rows = torch.tensor(sorted({0, case.batch - 1}), device=device)
        self._reference: dict[str, torch.Tensor] | None = None
        self._bounds: dict[str, float] | None = None

    @property
    def training(self) -> bool:
        return self.case.mode != FORWARD

    def run(self, module: torch.nn.Module, rows_only: bool) -> dict[str, torch.Tensor]:
        """Outputs of ``module`` on x (or on the checked rows) and, when training, the gradients of x and
        of the weights, for an output gradient that is zero outside the checked rows."""
        dtype = module.in_proj_weight.dtype
        x, dout = self.x, self.dout
        if rows_only:
            x, dout = x.index_select(0, self.rows), dout.index_select(0, self.rows)
        else:
            keep = torch.zeros(self.case.batch, dtype=torch.bool, device=self.device)
            keep[self.rows] = True
            dout = torch.where(keep[:, None, None], dout, torch.zeros_like(dout))
        x = x.detach().to(dtype).requires_grad_(self.training)
        with torch.set_grad_enabled(self.training):
            out, weights = module(x, x, x, need_weights=self.case.need_weights)
        named = {"output": out}
        if weights is not None:
            named["weights"] = weights
        if self.training:
            parameters = dict(module.named_parameters())
            grads = torch.autograd.grad(out, [x, *parameters.values()], dout.to(dtype))
            named["grad_input"] = grads[0]
            named.update({"grad_" + name.replace(".", "_"): grad for name, grad in zip(parameters, grads[1:])})
        return {name: value.detach() for name, value in named.items()}

    def reference(self) -> dict[str, torch.Tensor]:
        if self._reference is None:
            self._reference = self.run(torch_module(self.case, self.state, torch.float64), True)
        return self._reference

    def bounds(self) -> dict[str, float]:
        if self._bounds is None:
            own = errors(self.run(torch_module(self.case, self.state), True), self.reference())
            self._bounds = bounds_from(own, self.case.dtype, self.device)
        return self._bounds

    def check(self, module: torch.nn.Module, context) -> tuple[dict[str, float], bool]:
        poison_allocator(self.device, 8 * self.x.numel() * self.x.element_size())
        with context():
            outputs = self.run(module, False)
        checked = {
            name: value.index_select(0, self.rows) if name in ROW_SLICED else value for name, value in outputs.items()
        }
        return errors(checked, self.reference()), all_finite(outputs.values())


def torch_module(case: MHACase, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    return _loaded(torch.nn.MultiheadAttention, case, state, dtype)


def _loaded(module_type, case: MHACase, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    device = state["in_proj_weight"].device
    module = module_type(case.embed_dim, case.heads, batch_first=True).to(device=device, dtype=dtype or case.dtype)
    module.load_state_dict(state)
    return module.train(case.mode != FORWARD)


def prepare_mha(case: MHACase, backend: str, data: MHAData) -> Workload:
    kind, name = backend.split(":", 1)
    if kind == "pyattn":
        module, context = _loaded(pyattn.nn.MultiheadAttention, case, data.state), backend_context(name)
    else:
        if name != "mha":
            raise Unsupported(f"{backend} does not run {case.op}")
        module, context = torch_module(case, data.state), contextlib.nullcontext
    need_weights, x, dout = case.need_weights, data.x, data.dout

    def forward(leaf):
        with context():
            return module(leaf, leaf, leaf, need_weights=need_weights)

    if case.mode == FORWARD:
        with torch.no_grad():
            probe(lambda: forward(x))

        def call():
            with torch.no_grad():
                return forward(x)

        grad_to_none = []
    else:
        leaf = x.detach().requires_grad_()
        probe(lambda: forward(leaf))

        def call():
            out, _ = forward(leaf)
            out.backward(dout)

        grad_to_none = [leaf, *module.parameters()]
    return Workload(
        case,
        backend,
        data.device,
        call,
        check=lambda: data.check(module, context),
        bounds=data.bounds,
        grad_to_none=grad_to_none,
    )


def _served_by(case: MHACase, data: MHAData) -> str | None:
    """What pyattn's auto choice serves the module's attention with, from ``pyattn.explain(module, ...)``."""
    module = _loaded(pyattn.nn.MultiheadAttention, case, data.state)
    x = data.x[:1]  # the choice does not depend on the batch; explain runs the projections
    with torch.no_grad():
        text = pyattn.explain(module, x, x, x, need_weights=case.need_weights)
    found = re.search(r"auto picks:\s*(\S+)", text)
    return found.group(1) if found else None


def _panel(row: dict) -> tuple[tuple, str]:
    case = row["case"]
    title = f"{row['mode']}, E{case['embed_dim']} H{case['heads']}, need_weights={case['need_weights']}"
    return (MODES.index(row["mode"]), case["embed_dim"], case["heads"], case["need_weights"]), title


SUITE = register_suite(
    Suite(
        name="mha",
        ops=(MHACase.op,),
        cases=mha_cases,
        data=MHAData,
        prepare=prepare_mha,
        baselines=lambda case: MHA_BASELINES,
        all_baselines=MHA_BASELINES,
        dropin=lambda case: DropIn("pyattn.nn.MultiheadAttention", "torch.nn.MultiheadAttention", "mha"),
        throughput="tflops",
        plots=(
            Plot(
                "mha_time.png",
                "MultiheadAttention time per call",
                lambda row: True,
                _panel,
                lambda row: row["case"]["seq_len"],
                "sequence length",
                "median_ms",
                log_y=True,
            ),
        ),
        served_by=_served_by,
    )
)
