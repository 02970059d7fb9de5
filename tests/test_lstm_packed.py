"""PackedSequence on the Triton kernels in the packed layout: the active batch shrinks per step (cuDNN's way).

Interpreter tests (CPU, TRITON_INTERPRET=1):
    TRITON_INTERPRET=1 python -m pytest -m interpreter tests/test_lstm_packed.py

What they check: ``pyattn.functional.lstm`` on a PackedSequence of unequal lengths (a length-1 sequence among
them, ``enforce_sorted`` True and False, 1-2 layers, bidirectional, proj_size 0 and > 0) through
``triton/persistent`` and ``triton/stepwise`` equals ``torch.nn.LSTM`` (run in float64 with the same weights)
within 1e-4, forward and backward (the gradients of the packed data, h_0, c_0 and every weight), with every
buffer the packed launchers allocate poisoned (NaN); that the packed launchers ran (not the scatter to a padded
batch); and the shrink itself: each stepwise launch has ⌈batch_sizes[t] / BLOCK_B⌉ batch tiles and B =
batch_sizes[t] rows (sum(lengths) rows in all, not T·B), and each persistent program runs only as many steps as
its tile's longest row.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pyattn
from pyattn.kernels.lstm import common as kernel_common
from tests.conftest import assert_close, poison_, random_tensor

pytestmark = pytest.mark.interpreter

# fp32 against torch's LSTM in float64 (the bound for the interpreter).
PACKED_RTOL = 1e-4
STEPS, INPUT_SIZE, HIDDEN_SIZE = 6, 7, 12
LENGTHS = torch.tensor([4, 6, 1, 3, 6])  # user order; a length-1 sequence; two of the longest


@pytest.fixture
def packed_launch(monkeypatch):
    """The packed launchers' module with every torch.empty poisoned (NaN) and their calls counted."""
    from pyattn.kernels.lstm import packed

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return poison_(torch.empty(*args, **kwargs))

    monkeypatch.setattr(packed, "torch", PoisonedTorch())
    calls = {"forward": 0, "backward": 0}
    for name, kind in (("lstm_packed_sequence_forward", "forward"), ("lstm_packed_sequence_backward", "backward")):
        original = getattr(packed, name)

        def counted(*args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(packed, name, counted)
    return calls


def _torch_lstm(num_layers, bidirectional, proj_size):
    torch.manual_seed(1234)
    return torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=num_layers, bidirectional=bidirectional,
                         proj_size=proj_size)


def _run(forward, leaves, parameters, lengths, enforce_sorted, upstream):
    """(output data, h_n, c_n, grads of the packed data leaf, h_0, c_0 and every parameter)."""
    data, h_0, c_0 = leaves
    packed = pack_padded_sequence(data, lengths, enforce_sorted=enforce_sorted)
    output, (h_n, c_n) = forward(packed, (h_0, c_0))
    assert isinstance(output, PackedSequence)
    assert torch.equal(output.batch_sizes, packed.batch_sizes)
    results = [output.data, h_n, c_n]
    grads = torch.autograd.grad(results, [data, h_0, c_0, *parameters], upstream)
    return [result.detach() for result in results] + list(grads)


@pytest.mark.parametrize("backend", ["triton/persistent", "triton/stepwise"])
@pytest.mark.parametrize(
    "num_layers,bidirectional,proj_size,enforce_sorted",
    [(1, False, 0, False), (1, True, 0, True), (2, True, 0, False), (2, False, 4, True), (2, True, 4, False),
     (1, False, 5, False)],
    ids=["1-layer", "bidirectional-sorted", "2-layer-bidirectional", "2-layer-proj-sorted",
         "2-layer-bidirectional-proj", "odd-proj"],
)
def test_packed_matches_torch(packed_launch, backend, num_layers, bidirectional, proj_size, enforce_sorted):
    lengths = LENGTHS.sort(descending=True).values if enforce_sorted else LENGTHS
    batch, directions = lengths.numel(), 2 if bidirectional else 1
    state_size = proj_size or HIDDEN_SIZE
    expected_module = _torch_lstm(num_layers, bidirectional, proj_size).double()
    ours_module = _torch_lstm(num_layers, bidirectional, proj_size)  # the same weights in fp32
    leaves = [random_tensor(STEPS, batch, INPUT_SIZE, dtype=torch.float32, requires_grad=True),
              random_tensor(num_layers * directions, batch, state_size, requires_grad=True),
              random_tensor(num_layers * directions, batch, HIDDEN_SIZE, requires_grad=True)]
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    rows = int(lengths.sum())
    upstream = [random_tensor(rows, directions * state_size, dtype=torch.float64),
                random_tensor(num_layers * directions, batch, state_size, dtype=torch.float64),
                random_tensor(num_layers * directions, batch, HIDDEN_SIZE, dtype=torch.float64)]

    def ours(packed, hx):
        return pyattn.functional.lstm(packed, hx, ours_module._flat_weights, num_layers=num_layers,
                                      bidirectional=bidirectional, proj_size=proj_size)

    with pyattn.use_backend(backend):
        got = _run(ours, leaves, list(ours_module.parameters()), lengths, enforce_sorted,
                   [grad.float() for grad in upstream])
    expected = _run(expected_module, leaves64, list(expected_module.parameters()), lengths, enforce_sorted, upstream)
    names = ["output", "h_n", "c_n", "grad input", "grad h_0", "grad c_0"]
    names += [f"grad {name}" for name, _ in expected_module.named_parameters()]
    for name, value, reference in zip(names, got, expected, strict=True):
        assert value.dtype == torch.float32, name
        assert_close(value, reference, PACKED_RTOL, name)
    layer_runs = num_layers * directions
    assert packed_launch == {"forward": layer_runs, "backward": layer_runs}, "the packed launchers did not run"


def test_packed_equal_lengths_run_dense_in_sorted_order(packed_launch):
    """Equal lengths: the packed data is (T, B, I) in sorted order; served as a dense batch (no packed launch)."""
    module = _torch_lstm(1, True, 0)
    data = random_tensor(STEPS, 4, INPUT_SIZE, requires_grad=True)
    packed = pack_padded_sequence(data, torch.full((4,), STEPS), enforce_sorted=False)
    hx = (random_tensor(2, 4, HIDDEN_SIZE), random_tensor(2, 4, HIDDEN_SIZE))
    with pyattn.use_backend("triton/stepwise"):
        output, (h_n, c_n) = pyattn.functional.lstm(packed, hx, module._flat_weights, bidirectional=True)
    expected, (expected_h, expected_c) = module(packed, hx)
    for name, value, reference in (("output", output.data, expected.data), ("h_n", h_n, expected_h),
                                   ("c_n", c_n, expected_c)):
        assert_close(value, reference, PACKED_RTOL, name)
    assert packed_launch == {"forward": 0, "backward": 0}


def _packed_problem(lengths, proj_size=0, input_size=5, hidden_size=16):
    """Leaves of one packed layer call in sorted order: data (N, I), h0, c0, weights, batch_sizes."""
    steps = int(lengths.max())
    batch_sizes = (lengths[None, :] > torch.arange(steps)[:, None]).sum(1)
    state_size = proj_size or hidden_size
    scale = hidden_size ** -0.5
    return dict(input=random_tensor(int(lengths.sum()), input_size), h0=random_tensor(len(lengths), state_size),
                c0=random_tensor(len(lengths), hidden_size),
                weight_ih=random_tensor(4 * hidden_size, input_size, scale=scale),
                weight_hh=random_tensor(4 * hidden_size, state_size, scale=scale),
                weight_hr=random_tensor(proj_size, hidden_size, scale=scale) if proj_size else None,
                batch_sizes=batch_sizes)


class _RecordedKernel:
    """Stands in for a JIT kernel in the packed launchers: records each launch's grid and B, then launches."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            step, batch = args[self.kernel.arg_names.index("step")], args[self.kernel.arg_names.index("B")]
            self.launches.append((self.name, step, batch, tuple(grid)))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize("proj_size", [0, 4], ids=["plain", "projection"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_stepwise_launches_cover_only_the_active_rows(monkeypatch, proj_size, reverse):
    """Step t's launches have B = batch_sizes[t] and ⌈batch_sizes[t] / BLOCK_B⌉ batch tiles, forward and backward:
    sum(lengths) rows computed per launch kind, not T·B. The batch (20 rows) spans two 16-row tiles at first."""
    from pyattn.kernels.lstm import packed
    from pyattn.kernels.lstm.configs import step_config

    launches = []
    for name in ("lstm_sequence_step_forward_kernel", "lstm_sequence_step_projection_kernel",
                 "lstm_step_backward_kernel", "lstm_step_projection_backward_kernel"):
        monkeypatch.setattr(packed, name, _RecordedKernel(getattr(packed, name), name, launches))
    lengths = torch.tensor([7] * 3 + [5] * 10 + [3] * 4 + [1] * 3)
    problem = _packed_problem(lengths, proj_size)
    batch_sizes = problem["batch_sizes"].tolist()
    output, h_n, c_n, gates, cell_states, hidden_before = packed.lstm_packed_sequence_forward(
        problem["input"], problem["h0"], problem["c0"], problem["weight_ih"], problem["weight_hh"], None,
        problem["batch_sizes"], reverse, True, recurrence="stepwise", weight_hr=problem["weight_hr"])
    rows = int(lengths.sum())
    assert output.shape[0] == gates.shape[0] == cell_states.shape[0] == hidden_before.shape[0] == rows
    packed.lstm_packed_sequence_backward(
        random_tensor(*output.shape), random_tensor(*h_n.shape), None, problem["input"], problem["weight_ih"],
        problem["weight_hh"], problem["batch_sizes"], reverse, gates, cell_states, hidden_before,
        recurrence="stepwise", weight_hr=problem["weight_hr"])
    block_b = step_config(len(lengths), torch.float32, projection=proj_size > 0)[0]
    kinds = ["lstm_sequence_step_forward_kernel", "lstm_step_backward_kernel"]
    if proj_size:
        kinds += ["lstm_sequence_step_projection_kernel", "lstm_step_projection_backward_kernel"]
    for kind in kinds:
        recorded = [(step, batch, grid) for name, step, batch, grid in launches if name == kind]
        order = range(len(batch_sizes)) if "backward" not in kind else range(len(batch_sizes) - 1, -1, -1)
        assert [step for step, _, _ in recorded] == list(order), kind
        for step, batch, grid in recorded:
            assert batch == batch_sizes[step], f"{kind} step {step}: B = {batch}, active {batch_sizes[step]}"
            assert grid[0] == triton.cdiv(batch_sizes[step], block_b), f"{kind} step {step}: grid {grid}"
        assert sum(batch for _, batch, _ in recorded) == rows < len(batch_sizes) * len(lengths)


_ROW_SCHEDULE_CALLS: list[int] = []


@triton.jit
def _counted_row_schedule(step, offs_b, b_mask, lengths_ptr, num_steps, REVERSE: tl.constexpr,
                          HAS_LENGTHS: tl.constexpr):
    """``row_schedule`` that records the calling program (the interpreter runs it as Python)."""
    _ROW_SCHEDULE_CALLS.append(int(tl.program_id(0)))
    return kernel_common.row_schedule(step, offs_b, b_mask, lengths_ptr, num_steps, REVERSE, HAS_LENGTHS)


@pytest.mark.parametrize("proj_size", [0, 4], ids=["plain", "projection"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_persistent_programs_run_only_their_tiles_steps(monkeypatch, proj_size, reverse):
    """Each batch-tile program of the persistent kernels runs as many steps as its tile's longest row: with rows
    sorted 7, 5, ... and a second 16-row tile whose longest is 2, program 1 runs 2 steps of the 7 (forward and
    backward), counted through the row schedule the kernels call once per step (twice in backward)."""
    from pyattn.kernels.lstm import packed, sequence

    calls = _ROW_SCHEDULE_CALLS
    calls.clear()
    monkeypatch.setattr(sequence, "row_schedule", _counted_row_schedule)
    lengths = torch.tensor([7] * 3 + [5] * 13 + [2] * 4)
    problem = _packed_problem(lengths, proj_size)
    output, h_n, c_n, gates, cell_states, hidden_before = packed.lstm_packed_sequence_forward(
        problem["input"], problem["h0"], problem["c0"], problem["weight_ih"], problem["weight_hh"], None,
        problem["batch_sizes"], reverse, True, recurrence="persistent", weight_hr=problem["weight_hr"])
    assert (calls.count(0), calls.count(1)) == (7, 2)
    calls.clear()
    packed.lstm_packed_sequence_backward(
        random_tensor(*output.shape), random_tensor(*h_n.shape), random_tensor(*c_n.shape), problem["input"],
        problem["weight_ih"], problem["weight_hh"], problem["batch_sizes"], reverse, gates, cell_states,
        hidden_before, recurrence="persistent", weight_hr=problem["weight_hr"])
    assert (calls.count(0), calls.count(1)) == (14, 4)


@pytest.mark.parametrize("recurrence", ["persistent", "stepwise"])
def test_packed_layer_op_matches_reference_with_double_backward(recurrence):
    """The packed layer op against the reference on the padded, sorted batch, and create_graph=True (a double
    backward recomputes with the reference over the packed rows)."""
    from pyattn.ops.lstm_triton_packed import _reference_packed_layer, packed_layer

    problem = _packed_problem(torch.tensor([5, 5, 3, 1]), input_size=6, hidden_size=8)
    batch_sizes = problem.pop("batch_sizes")
    leaves = {name: None if value is None else value.requires_grad_() for name, value in problem.items()}
    layer = packed_layer(recurrence)
    arguments = dict(leaves, bias_ih=None, bias_hh=None, reverse=True, batch_sizes=batch_sizes)
    got = layer(**arguments)
    expected = _reference_packed_layer(**arguments)
    for name, value, reference in zip(["output", "h_n", "c_n"], got, expected, strict=True):
        assert_close(value, reference, PACKED_RTOL, name)
    inputs = [value for value in leaves.values() if value is not None]
    first = torch.autograd.grad(sum(value.square().sum() for value in got), inputs, create_graph=True)
    first_expected = torch.autograd.grad(sum(value.square().sum() for value in expected), inputs, create_graph=True)
    second = torch.autograd.grad(sum(grad.sum() for grad in first), inputs)
    second_expected = torch.autograd.grad(sum(grad.sum() for grad in first_expected), inputs)
    for grad, reference in zip([*first, *second], [*first_expected, *second_expected], strict=True):
        assert_close(grad, reference, PACKED_RTOL, "gradient")


@pytest.mark.parametrize("recurrence", ["persistent", "stepwise"])
@pytest.mark.parametrize("proj_size", [0, 4], ids=["plain", "projection"])
def test_opcheck_packed_layer_ops(recurrence, proj_size):
    """Schema, fake kernels (output shapes from the packed rows, batch from h0) and autograd registration."""
    problem = _packed_problem(torch.tensor([3, 2, 2, 1]), proj_size, input_size=5, hidden_size=8)
    batch_sizes = problem.pop("batch_sizes")
    leaves = [None if value is None else value.requires_grad_() for value in problem.values()]
    input, h0, c0, weight_ih, weight_hh, weight_hr = leaves
    bias = random_tensor(4 * 8, requires_grad=True)
    forward = torch.ops.pyattn.triton_lstm_packed_layer_fwd
    torch.library.opcheck(forward, (input, h0, c0, weight_ih, weight_hh, bias, None, weight_hr, batch_sizes, True,
                                    True, recurrence))
    detached = [None if value is None else value.detach() for value in (input, h0, c0, weight_ih, weight_hh)]
    weight_hr = None if weight_hr is None else weight_hr.detach()
    torch.library.opcheck(forward, (*detached, None, None, weight_hr, batch_sizes, False, False, recurrence))
    output, h_n, c_n, gates, cell_states, hidden_before = forward(*detached, None, None, weight_hr, batch_sizes, True,
                                                                   True, recurrence)
    input, _, _, weight_ih, weight_hh = detached
    saved = (batch_sizes, gates, cell_states, hidden_before, True, recurrence, h0.shape[0])
    backward = torch.ops.pyattn.triton_lstm_packed_layer_bwd
    torch.library.opcheck(backward, (random_tensor(*output.shape), random_tensor(*h_n.shape),
                                     random_tensor(*c_n.shape), input, weight_ih, weight_hh, weight_hr, *saved))
    torch.library.opcheck(backward, (random_tensor(*output.shape), None, None, input, weight_ih, weight_hh,
                                     weight_hr, *saved))
