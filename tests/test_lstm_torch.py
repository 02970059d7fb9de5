"""LSTM on the torch backend (PyTorch's own _VF.lstm / lstm_cell) against the float64 reference.

The torch backend is what `auto` runs on a CPU: the wrapper must hand torch every form of call —
packed (sorted and not), batch_first, unbatched, projection, no bias, given states, dropout — and
get the reference's numbers, gradients included; half precision on a CPU is refused (torch rounds
its gate math there), so dispatch sends it to the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import pyattn
from pyattn import _dispatch
from tests.conftest import assert_close, random_tensor

F64 = torch.float64
INPUT, HIDDEN, STEPS, BATCH = 5, 6, 4, 3


def _grads(module, inputs):
    return [p.grad for p in module.parameters()] + [t.grad for t in inputs]


def _run(backend, module, make_input, hx=None, dtype=torch.float32):
    module = module.to(dtype)
    for p in module.parameters():
        p.grad = None
    x = make_input(dtype)
    state = None if hx is None else tuple(h.to(dtype).detach().requires_grad_() for h in hx)
    with pyattn.use_backend(backend):
        output, (h_n, c_n) = module(x, state)
    data = output.data if hasattr(output, "batch_sizes") else output
    loss = (data * torch.linspace(-1, 1, data.numel(), dtype=dtype).view_as(data)).sum() + h_n.square().sum() \
        + c_n.sin().sum()
    loss.backward()
    leaves = [x.data if hasattr(x, "batch_sizes") else x] + list(state or [])
    return [data.detach(), h_n.detach(), c_n.detach()] + [p.grad for p in module.parameters()] + \
        [leaf.grad for leaf in leaves if leaf.requires_grad]


CASES = {
    "plain": (dict(), False, False),
    "two-layer-bidirectional": (dict(num_layers=2, bidirectional=True), False, False),
    "projection": (dict(num_layers=2, proj_size=3), False, False),
    "no-bias-batch-first": (dict(bias=False, batch_first=True), False, False),
    "given-state": (dict(num_layers=2), True, False),
    "packed-unsorted": (dict(num_layers=2, bidirectional=True), False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lstm_on_torch_equals_reference(case):
    options, given_state, packed = CASES[case]
    module = pyattn.nn.LSTM(INPUT, HIDDEN, **options)
    directions = 2 if options.get("bidirectional") else 1
    layers = options.get("num_layers", 1) * directions
    out_size = options.get("proj_size") or HIDDEN
    hx = (random_tensor(layers, BATCH, out_size), random_tensor(layers, BATCH, HIDDEN)) if given_state else None
    base = random_tensor(BATCH, STEPS, INPUT) if options.get("batch_first") else random_tensor(STEPS, BATCH, INPUT)
    lengths = torch.tensor([2, STEPS, 1])

    def make_input(dtype):
        x = base.detach().to(dtype).requires_grad_()
        if packed:
            return pack_padded_sequence(x, lengths, enforce_sorted=False)
        return x

    if packed:  # the leaf is the padded tensor; compare gradients of the parameters and outputs
        ours = _run("torch", module, make_input, hx)[:3 + len(list(module.parameters()))]
        reference = _run("reference", module, make_input, hx, dtype=F64)[:len(ours)]
    else:
        ours = _run("torch", module, make_input, hx)
        reference = _run("reference", module, make_input, hx, dtype=F64)
    assert len(ours) == len(reference)
    for index, (got, want) in enumerate(zip(ours, reference)):
        assert_close(got, want, 1e-5, f"result {index}")


def test_unbatched_lstm_and_cells_on_torch_equal_reference():
    module = pyattn.nn.LSTM(INPUT, HIDDEN, num_layers=2)
    x = random_tensor(STEPS, INPUT)
    with pyattn.use_backend("torch"):
        output, (h_n, c_n) = module(x)
    with pyattn.use_backend("reference"):
        expected, (h_ref, c_ref) = module.double()(x.double())
    for got, want in ((output, expected), (h_n, h_ref), (c_n, c_ref)):
        assert_close(got, want, 1e-5)
    for bias in (True, False):
        cell = pyattn.nn.LSTMCell(INPUT, HIDDEN, bias=bias)
        inputs = random_tensor(BATCH, INPUT), (random_tensor(BATCH, HIDDEN), random_tensor(BATCH, HIDDEN))
        with pyattn.use_backend("torch"):
            hy, cy = cell(*inputs)
        with pyattn.use_backend("reference"):
            hy64, cy64 = cell.double()(inputs[0].double(), tuple(h.double() for h in inputs[1]))
        assert_close(hy, hy64, 1e-5, "h'")
        assert_close(cy, cy64, 1e-5, "c'")


def test_dropout_between_layers_runs_torchs_dropout():
    module = pyattn.nn.LSTM(INPUT, HIDDEN, num_layers=3, dropout=0.5).train()
    x = random_tensor(STEPS, BATCH, INPUT)
    with pyattn.use_backend("torch"):
        torch.manual_seed(3)
        first, _ = module(x)
        torch.manual_seed(3)
        second, _ = module(x)
    assert torch.equal(first, second)  # torch's generator drives it: seeded runs repeat
    module.eval()
    with pyattn.use_backend("torch"):
        evaluation, _ = module(x)
    with pyattn.use_backend("reference"):
        expected, _ = module(x)
    assert_close(evaluation, expected, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_on_cpu_goes_to_the_reference(dtype):
    module = pyattn.nn.LSTM(INPUT, HIDDEN).to(dtype)
    x = random_tensor(STEPS, BATCH, INPUT, dtype=dtype)
    text = pyattn.explain(module, x)
    assert "on CPU: torch's LSTM rounds its gate math" in text and text.endswith("auto picks: reference")
    cell_request = pyattn.functional.REQUEST_BUILDERS["lstm_cell"](x[0], None, *list(
        pyattn.nn.LSTMCell(INPUT, HIDDEN).to(dtype).parameters())[:2])
    assert _dispatch.choose(cell_request).qualified_name == "reference"


def test_auto_on_cpu_runs_the_torch_backend_for_both_modules():
    assert pyattn.explain(pyattn.nn.LSTM(INPUT, HIDDEN), random_tensor(STEPS, BATCH, INPUT)).endswith("auto picks: torch")
    assert pyattn.explain(pyattn.nn.LSTMCell(INPUT, HIDDEN), random_tensor(BATCH, INPUT)).endswith("auto picks: torch")
