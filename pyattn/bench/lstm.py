"""The LSTM suite: pyattn.nn.LSTM / LSTMCell per backend against nn.LSTM (cuDNN on a GPU) and nn.LSTMCell.

Every backend is the module a user would run, loaded from one torch module's state_dict, so all of
them compute with the same weights. Baselines: a sequence (op ``lstm``) against ``lstm`` (nn.LSTM,
the drop-in's counterpart) and ``lstmcell-loop`` (nn.LSTMCell over the steps); one step (op
``lstm_cell``) against ``lstmcell`` (nn.LSTMCell, the counterpart) and ``lstm`` (nn.LSTM over one step).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import asdict, dataclass

import torch

import pyattn
from pyattn.bench import flops as work
from pyattn.bench.flops import FORWARD, FORWARD_BACKWARD, MODES
from pyattn.bench.measure import rotation_copies
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
from pyattn.reference import lstm as lstm_reference

LSTM_SEQUENCE_BASELINES = ("lstm", "lstmcell-loop")
LSTM_CELL_BASELINES = ("lstmcell", "lstm")
LSTM_BASELINES = tuple(dict.fromkeys(LSTM_SEQUENCE_BASELINES + LSTM_CELL_BASELINES))


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


def lstm_cases(shapes: str, dtypes: list[torch.dtype], modes: list[str]) -> list[LSTMCase]:
    """Sequences of T steps and single cell steps, forward and forward+backward (a backward alone is
    no use of an LSTM). ``small`` is the CPU set: one realistic sequence and one cell step."""
    modes = [mode for mode in modes if mode in (FORWARD, FORWARD_BACKWARD)]
    if shapes == "tiny":
        sequence, cell = [(2, 8, 16), (4, 8, 16)], [(1, 16), (4, 16)]
    elif shapes == "small":
        sequence, cell = [(16, 128, 256)], [(16, 256)]
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


def lstm_baselines(case: LSTMCase) -> tuple[str, ...]:
    return LSTM_CELL_BASELINES if case.cell else LSTM_SEQUENCE_BASELINES


PARAMETER_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # torch's, without nn.LSTM's "_l0"
ROW_SLICED = ("output", "h_n", "c_n", "grad_input")  # per batch row; weight gradients are whole


class LSTMData:
    """One case's inputs and weights (torch's initialisation), and its float64 reference on the first
    and last batch row (rows are independent; the last catches offset overflows)."""

    def __init__(self, case: LSTMCase, device: torch.device, seed: int = 0):
        self.case, self.device = case, device
        generator = seeded_generator(device, seed)
        hidden, inputs, batch = case.hidden_size, case.input_size, case.batch
        bound = 1.0 / math.sqrt(hidden)  # torch's LSTM initialisation: U(-1/√H, 1/√H)
        shapes = {
            "weight_ih": (4 * hidden, inputs),
            "weight_hh": (4 * hidden, hidden),
            "bias_ih": (4 * hidden,),
            "bias_hh": (4 * hidden,),
        }
        self.parameters = {
            name: ((torch.rand(shape, generator=generator, device=device) * 2 - 1) * bound).to(case.dtype)
            for name, shape in shapes.items()
        }
        self.x = random_tensor(
            (batch, inputs) if case.cell else (case.steps, batch, inputs), case.dtype, device, generator
        )
        self.h0, self.c0 = (random_tensor((batch, hidden), case.dtype, device, generator, scale=0.5) for _ in range(2))
        output_shape = (batch, hidden) if case.cell else (case.steps, batch, hidden)
        self.douts = [random_tensor(output_shape, case.dtype, device, generator)]
        if case.cell:  # a step inside a loop receives gradients for both h' and c'
            self.douts.append(random_tensor((batch, hidden), case.dtype, device, generator))
        self.rows = torch.tensor(sorted({0, batch - 1}), device=device)
        self.modules: dict = {}  # torch modules over ``parameters``, shared by every backend (lstm_function)
        self._reference: dict[str, torch.Tensor] | None = None
        self._bounds: dict[str, float] | None = None

    @property
    def training(self) -> bool:
        return self.case.mode != FORWARD

    def batch_dim(self, name: str) -> int:
        return 1 if name in ("output", "grad_input") and not self.case.cell else 0

    def _rows(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.index_select(self.batch_dim(name), self.rows)

    def run(self, function, parameters: dict[str, torch.Tensor], rows_only: bool, douts) -> dict[str, torch.Tensor]:
        """Outputs of ``function(x, h0, c0)`` and, when training, the gradients of x and ``parameters``."""
        x, h0, c0 = self.x, self.h0, self.c0
        if rows_only:
            x = self._rows("grad_input", x)
            h0, c0 = h0.index_select(0, self.rows), c0.index_select(0, self.rows)
        dtype = next(iter(parameters.values())).dtype
        x = x.detach().to(dtype).requires_grad_(self.training)
        with torch.set_grad_enabled(self.training):
            output, h_n, c_n = function(x, h0.to(dtype), c0.to(dtype))
        named = {"output": output, "h_n": h_n, "c_n": c_n}
        if self.training:
            targets = [output, c_n] if self.case.cell else [output]
            grads = torch.autograd.grad(targets, [x, *parameters.values()], [d.to(dtype) for d in douts])
            named["grad_input"] = grads[0]
            named.update({f"grad_{name}": grad for name, grad in zip(parameters, grads[1:])})
        return {name: value.detach() for name, value in named.items()}

    def _checked_douts(self, rows_only: bool) -> list[torch.Tensor]:
        """The output gradients of the checked rows; full size and zero on the other rows unless
        ``rows_only``, so a full-batch backward's weight gradients are those of the checked rows."""
        if rows_only:
            return [self._rows("output", d) for d in self.douts]
        keep = torch.zeros(self.case.batch, dtype=torch.bool, device=self.device)
        keep[self.rows] = True
        shape = [1] * self.douts[0].dim()
        shape[self.batch_dim("output")] = -1
        return [torch.where(keep.view(shape), d, torch.zeros_like(d)) for d in self.douts]

    def reference(self) -> dict[str, torch.Tensor]:
        if self._reference is None:
            leaves = {name: p.to(torch.float64).requires_grad_(self.training) for name, p in self.parameters.items()}
            function = _reference_lstm(self.case.cell, list(leaves.values()))
            self._reference = self.run(function, leaves, True, self._checked_douts(True))
        return self._reference

    def bounds(self) -> dict[str, float]:
        if self._bounds is None:
            try:
                own = self._torch_errors()
            except RuntimeError:  # cuDNN declines some dtypes: torch's native LSTM is the yardstick then
                with torch.backends.cudnn.flags(enabled=False):
                    own = self._torch_errors()
            self._bounds = bounds_from(own, self.case.dtype, self.device)
        return self._bounds

    def _torch_errors(self) -> dict[str, float]:
        """The error of torch's own LSTM (cuDNN on a GPU) in the case's dtype, on the checked rows."""
        baseline = "torch:lstmcell" if self.case.cell else "torch:lstm"
        function, parameters = lstm_function(baseline, self.case, self.parameters, self.modules)
        return errors(self.run(function, parameters, True, self._checked_douts(True)), self.reference())

    def check(self, function, parameters: dict[str, torch.Tensor]) -> tuple[dict[str, float], bool]:
        poison_allocator(self.device, 8 * self.x.numel() * self.x.element_size())
        outputs = self.run(function, parameters, False, self._checked_douts(False))
        checked = {name: self._rows(name, value) if name in ROW_SLICED else value for name, value in outputs.items()}
        return errors(checked, self.reference()), all_finite(outputs.values())


def _reference_lstm(cell: bool, weights: list[torch.Tensor]):
    """pyattn.reference.lstm as ``(x, h0, c0) -> (output, h_n, c_n)``."""

    def run(x, h0, c0):
        if cell:
            h, c = lstm_reference.lstm_cell(x, h0, c0, *weights)
            return h, h, c
        return lstm_reference.lstm_layer(x, h0, c0, *weights)

    return run


def _torch_module(module_type, case: LSTMCase, parameters: dict[str, torch.Tensor], modules: dict) -> torch.nn.Module:
    """A torch module of ``module_type`` holding ``parameters`` (copied in), built once per ``modules``."""
    if module_type not in modules:
        module = module_type(case.input_size, case.hidden_size).to(device=parameters["weight_ih"].device,
                                                                    dtype=case.dtype)
        suffix = "_l0" if module_type is torch.nn.LSTM else ""
        module.load_state_dict({name + suffix: value for name, value in parameters.items()})
        modules[module_type] = module
    return modules[module_type]


def _canonical_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters())
    return {name: named.get(name, named.get(name + "_l0")) for name in PARAMETER_NAMES}


def lstm_function(backend: str, case: LSTMCase, parameters: dict[str, torch.Tensor], modules: dict):
    """``(x, h0, c0) -> (output, h_n, c_n)`` on one backend (a cell step gives (h', h', c')) and the
    module's parameters by torch's LSTMCell names. ``modules`` caches the torch modules built over
    ``parameters``: pyattn's module holds the very Parameters of the torch module it replaces, so the two
    sides of a ratio run on the same memory (on a CPU, where the allocator put two copies of the weights
    moved one step's time by up to 10%) and, on a GPU, on torch's flattened cuDNN weights."""
    kind, name = backend.split(":", 1)
    if kind == "pyattn":
        torch_module = _torch_module(torch.nn.LSTMCell if case.cell else torch.nn.LSTM, case, parameters, modules)
        module = (pyattn.nn.LSTMCell if case.cell else pyattn.nn.LSTM)(case.input_size, case.hidden_size,
                                                                       device="meta")
        for parameter_name, parameter in torch_module.named_parameters():
            setattr(module, parameter_name, parameter)
        inner = _cell_call(module) if case.cell else _sequence_call(module, case)
        return on_backend(name, inner), _canonical_parameters(module)
    if name == "lstm":
        module = _torch_module(torch.nn.LSTM, case, parameters, modules)
        return _sequence_call(module, case), _canonical_parameters(module)
    if name == "lstmcell" and case.cell:
        module = _torch_module(torch.nn.LSTMCell, case, parameters, modules)
        return _cell_call(module), _canonical_parameters(module)
    if name == "lstmcell-loop" and not case.cell:
        module = _torch_module(torch.nn.LSTMCell, case, parameters, modules)

        def run_loop(x, h0, c0):
            h, c, outputs = h0, c0, []
            for step in x.unbind(0):
                h, c = module(step, (h, c))
                outputs.append(h)
            return torch.stack(outputs), h, c

        return run_loop, _canonical_parameters(module)
    raise Unsupported(f"{backend} does not run {case.op}")


def _cell_call(module):
    def run_cell(x, h0, c0):
        h, c = module(x, (h0, c0))
        return h, h, c

    return run_cell


def _sequence_call(module, case: LSTMCase):
    """An nn.LSTM-style module; on a cell case, over a one-step sequence."""

    def run_sequence(x, h0, c0):
        output, (h_n, c_n) = module(x[None] if case.cell else x, (h0[None], c0[None]))
        return (output[0] if case.cell else output), h_n[0], c_n[0]

    return run_sequence


def prepare_lstm(case: LSTMCase, backend: str, data: LSTMData) -> Workload:
    device = data.device
    function, parameters = lstm_function(backend, case, data.parameters, data.modules)
    check = lambda: data.check(function, parameters)
    if case.mode != FORWARD:
        x = data.x.detach().requires_grad_()
        probe(lambda: function(x, data.h0, data.c0))

        def call():
            output, _, c_n = function(x, data.h0, data.c0)
            torch.autograd.backward([output, c_n] if case.cell else [output], data.douts)

        return Workload(case, backend, device, call, check, data.bounds, grad_to_none=[x, *parameters.values()])
    with torch.no_grad():
        probe(lambda: function(data.x, data.h0, data.c0))
    # A forward cell step takes microseconds: timed in a CUDA graph, cycling through enough copies of
    # its weights and inputs that no call finds them in L2 (the graph does not flush it).
    graphed = case.cell and device.type == "cuda"
    sets = [(function, data.x, data.h0, data.c0)]
    for _ in range(rotation_copies(int(case.bytes()), device) - 1 if graphed else 0):
        copy_function, _ = lstm_function(backend, case, {n: p.clone() for n, p in data.parameters.items()}, {})
        sets.append((copy_function, data.x.clone(), data.h0.clone(), data.c0.clone()))
    rotation = itertools.cycle(sets)

    def call():
        run, x, h0, c0 = next(rotation)
        with torch.no_grad():
            return run(x, h0, c0)

    return Workload(case, backend, device, call, check, data.bounds, cuda_graph=graphed)


def _served_by(case: LSTMCase, data: LSTMData) -> str | None:
    """What pyattn's auto choice serves the case with, from ``pyattn.explain`` (None if it cannot say)."""
    weights = [data.parameters[name] for name in PARAMETER_NAMES]
    if case.cell:
        text = pyattn.explain("lstm_cell", data.x, (data.h0, data.c0), *weights)
    else:
        text = pyattn.explain("lstm", data.x, (data.h0[None], data.c0[None]), weights)
    found = re.search(r"auto picks:\s*(\S+)", text)
    return found.group(1) if found else None


def _dropin(case: LSTMCase) -> DropIn:
    if case.cell:
        return DropIn("pyattn.nn.LSTMCell", "torch.nn.LSTMCell", "lstmcell")
    return DropIn("pyattn.nn.LSTM", "torch.nn.LSTM", "lstm")


def _panel(row: dict) -> tuple[tuple, str]:
    case = row["case"]
    kind = "cell step" if case["cell"] else f"T{case['steps']}"
    title = f"{kind}, H{case['hidden_size']}, {row['mode']}"
    return (MODES.index(row["mode"]), case["cell"], case["steps"], case["hidden_size"]), title


SUITE = register_suite(
    Suite(
        name="lstm",
        ops=("lstm", "lstm_cell"),
        cases=lstm_cases,
        data=LSTMData,
        prepare=prepare_lstm,
        baselines=lstm_baselines,
        all_baselines=LSTM_BASELINES,
        dropin=_dropin,
        throughput="tokens_per_s",
        plots=(
            Plot(
                "lstm_time.png",
                "LSTM time per call",
                lambda row: True,
                _panel,
                lambda row: row["case"]["batch"],
                "batch",
                "median_ms",
                log_y=True,
            ),
        ),
        served_by=_served_by,
    )
)
