"""``pyattn.nn.LSTM`` / ``LSTMCell`` and ``pyattn.functional.lstm*`` against torch's modules.

The plain tests run on the reference backend in float64 (so results do not depend on which kernels
are installed) and compare with ``torch.nn.LSTM`` / ``LSTMCell`` holding the same state_dict:
outputs, final states, and the gradients of the input, hx and every parameter. The tests at the end
run the same modules on the kernels: Triton on the CPU (``TRITON_INTERPRET=1 pytest -m interpreter``)
and whatever ``auto`` picks on a GPU (``requires_cuda``), against torch in float64.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.utils.parametrize
import torch.nn.utils.prune
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pyattn
from tests.conftest import RTOL, RTOL_TF32, assert_close, relative_error, random_tensor

F64 = torch.float64
STEPS, BATCH, INPUT_SIZE, HIDDEN_SIZE, PROJ_SIZE = 5, 3, 4, 6, 3
# One full-length sequence, the rest shorter, in an order whose sorting permutation is not its own
# inverse (so mixing up sorted_indices and unsorted_indices shows).
RAGGED_LENGTHS = torch.tensor([3, 1, STEPS])


@pytest.fixture(autouse=True)
def _reference_backend():
    with pyattn.use_backend("reference"):
        yield


def _module_pair(**kwargs):
    """(ours, torch's) built from the same seed, which must give identical parameters."""
    torch.manual_seed(1234)
    theirs = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=F64, **kwargs)
    torch.manual_seed(1234)
    ours = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=F64, **kwargs)
    for (name, a), (other_name, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert name == other_name and torch.equal(a, b), f"{name}: initialisation differs from torch's"
    return ours, theirs


def _make_input(kind: str, batch_first: bool):
    """(input for the module, leaf tensor to take the gradient of, batch size of hx)."""
    if kind == "unbatched":
        leaf = random_tensor(STEPS, INPUT_SIZE, dtype=F64, requires_grad=True)
        return leaf, leaf, None
    shape = (BATCH, STEPS, INPUT_SIZE) if batch_first else (STEPS, BATCH, INPUT_SIZE)
    leaf = random_tensor(*shape, dtype=F64, requires_grad=True)
    if kind == "dense":
        return leaf, leaf, BATCH
    lengths = RAGGED_LENGTHS.sort(descending=True).values if kind == "packed_sorted" else RAGGED_LENGTHS
    packed = pack_padded_sequence(leaf, lengths, batch_first=batch_first, enforce_sorted=kind == "packed_sorted")
    return packed, leaf, BATCH


def _loss(output, h_n, c_n, weights):
    data = output.data if isinstance(output, PackedSequence) else output
    return (data * weights[0]).sum() + (h_n * weights[1]).sum() + (c_n * weights[2]).sum()


def _assert_same_result(ours, theirs, ours_result, theirs_result):
    (output, (h_n, c_n)), (expected, (expected_h, expected_c)) = ours_result, theirs_result
    if isinstance(expected, PackedSequence):
        assert isinstance(output, PackedSequence), "a packed input must give a packed output"
        assert torch.equal(output.batch_sizes, expected.batch_sizes)
        for name in ("sorted_indices", "unsorted_indices"):
            got, want = getattr(output, name), getattr(expected, name)
            assert (got is None) == (want is None) and (got is None or torch.equal(got, want)), name
    assert_close(output.data if isinstance(output, PackedSequence) else output,
                 expected.data if isinstance(expected, PackedSequence) else expected, RTOL[F64], "output")
    assert_close(h_n, expected_h, RTOL[F64], "h_n")
    assert_close(c_n, expected_c, RTOL[F64], "c_n")


MODULE_GRID = list(
    itertools.product(
        [1, 2, 3],  # num_layers
        [False, True],  # bidirectional
        [False, True],  # batch_first
        [0, PROJ_SIZE],  # proj_size
        [True, False],  # bias
        ["dense", "unbatched", "packed_sorted", "packed_unsorted"],
        [False, True],  # hx given
    )
)


@pytest.mark.parametrize("num_layers,bidirectional,batch_first,proj_size,bias,input_kind,hx_given", MODULE_GRID)
def test_lstm_matches_torch(num_layers, bidirectional, batch_first, proj_size, bias, input_kind, hx_given):
    ours, theirs = _module_pair(
        num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, proj_size=proj_size, bias=bias
    )
    module_input, leaf, batch = _make_input(input_kind, batch_first)
    hx, hx_leaves = None, []
    if hx_given:
        layers = num_layers * (2 if bidirectional else 1)
        batch_axis = () if batch is None else (batch,)
        hx_leaves = [
            random_tensor(layers, *batch_axis, proj_size or HIDDEN_SIZE, dtype=F64, requires_grad=True),
            random_tensor(layers, *batch_axis, HIDDEN_SIZE, dtype=F64, requires_grad=True),
        ]
        hx = tuple(hx_leaves)

    ours_result, theirs_result = ours(module_input, hx), theirs(module_input, hx)
    _assert_same_result(ours, theirs, ours_result, theirs_result)

    output, (h_n, c_n) = theirs_result
    output_shape = (output.data if isinstance(output, PackedSequence) else output).shape
    upstream = [random_tensor(*shape, dtype=F64) for shape in (output_shape, h_n.shape, c_n.shape)]
    leaves = [leaf, *hx_leaves]
    # The packing step is shared by both graphs: keep it for the second backward.
    got = torch.autograd.grad(
        _loss(*ours_result[0:1], *ours_result[1], upstream), [*leaves, *ours.parameters()], retain_graph=True
    )
    want = torch.autograd.grad(_loss(*theirs_result[0:1], *theirs_result[1], upstream), [*leaves, *theirs.parameters()])
    names = ["input", "h_0", "c_0"][: len(leaves)] + [name for name, _ in theirs.named_parameters()]
    for name, got_grad, want_grad in zip(names, got, want, strict=True):
        assert_close(got_grad, want_grad, RTOL[F64], f"grad {name}")


def test_lstm_packed_equal_lengths_matches_torch():
    """Equal lengths are served as a dense batch (no "lengths" feature); the result must not change."""
    ours, theirs = _module_pair(num_layers=2, bidirectional=True)
    packed = pack_padded_sequence(random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64), torch.full((BATCH,), STEPS))
    _assert_same_result(ours, theirs, ours(packed), theirs(packed))


def test_dropout_in_eval_is_exact():
    ours, theirs = _module_pair(num_layers=3, dropout=0.5)
    ours.eval()
    theirs.eval()
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64)
    _assert_same_result(ours, theirs, ours(x), theirs(x))


def test_dropout_one_in_training_matches_torch():
    """p = 1 zeroes every inner layer's output deterministically, so training can be compared exactly."""
    ours, theirs = _module_pair(num_layers=3, dropout=1.0, bidirectional=True)
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64)
    _assert_same_result(ours, theirs, ours(x), theirs(x))


def test_dropout_in_training_is_reproducible_and_drops_inner_layers_only(monkeypatch):
    probability, num_layers = 0.25, 3
    ours, _ = _module_pair(num_layers=num_layers, dropout=probability)
    x = random_tensor(8, 16, INPUT_SIZE, dtype=F64)

    torch.manual_seed(7)
    first, _ = ours(x)
    torch.manual_seed(7)
    again, _ = ours(x)
    torch.manual_seed(8)
    other, _ = ours(x)
    ours.eval()
    evaluated, _ = ours(x)
    assert torch.equal(first, again), "the same seed must give the same dropout masks"
    assert not torch.equal(first, other), "another seed must give other dropout masks"
    assert not torch.equal(first, evaluated), "training must apply dropout"

    dropped = []
    original_dropout = torch.nn.functional.dropout

    def recording_dropout(values, p, training, *args, **kwargs):
        result = original_dropout(values, p, training, *args, **kwargs)
        dropped.append((values.detach(), p, training, result.detach()))
        return result

    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    ours.train()
    ours(x)
    assert len(dropped) == num_layers - 1, "dropout goes after every layer but the last"
    for values, p, training, result in dropped:
        assert (p, training) == (probability, True)
        kept = result != 0
        fraction_dropped = 1.0 - kept.double().mean().item()
        elements = values.numel()
        sigma = (probability * (1 - probability) / elements) ** 0.5
        assert abs(fraction_dropped - probability) < 5 * sigma, f"dropped {fraction_dropped:.3f}, not {probability}"
        torch.testing.assert_close(result[kept], values[kept] / (1 - probability))


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_layers": 2, "bidirectional": True, "proj_size": 2, "bias": False, "batch_first": True}]
)
def test_state_dict_interchange_both_ways(kwargs):
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64)
    if kwargs.get("batch_first"):
        x = x.transpose(0, 1)
    theirs = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=F64, **kwargs)
    ours = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=F64, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _assert_same_result(ours, theirs, ours(x), theirs(x))

    theirs = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=F64, **kwargs)
    ours.reset_parameters()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    _assert_same_result(ours, theirs, ours(x), theirs(x))

    assert [[tuple(p.shape) for p in group] for group in ours.all_weights] == [
        [tuple(p.shape) for p in group] for group in theirs.all_weights
    ]
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]


def test_cell_state_dict_interchange_both_ways():
    x = random_tensor(BATCH, INPUT_SIZE, dtype=F64)
    theirs = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    ours = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for got, want in zip(ours(x), theirs(x)):
        assert_close(got, want, RTOL[F64])
    ours.reset_parameters()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for got, want in zip(ours(x), theirs(x)):
        assert_close(got, want, RTOL[F64])


def test_parameters_follow_reassignment():
    """functional_call and assigned parameters are read at call time, as torch's LSTM does."""
    ours, theirs = _module_pair(num_layers=2)
    replacement = {name: random_tensor(*p.shape, dtype=F64, scale=0.3) for name, p in theirs.named_parameters()}
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64)
    got = torch.func.functional_call(ours, replacement, (x,))
    want = torch.func.functional_call(theirs, replacement, (x,))
    _assert_same_result(ours, theirs, got, want)


@pytest.mark.parametrize("rewrite", ["functional_call", "parametrize", "prune", "assigned"])
def test_cell_reads_its_weights_wherever_they_live(rewrite):
    """The cell reads its weights from ``_parameters`` when they are there (cheap) and as attributes when a
    tool moved them out (parametrize, prune), so every such rewrite gives torch's LSTMCell's result."""
    torch.manual_seed(5)
    theirs = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    ours = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor(BATCH, INPUT_SIZE, dtype=F64)
    hx = tuple(random_tensor(BATCH, HIDDEN_SIZE, dtype=F64) for _ in range(2))
    ours(x, hx)  # a memoised plan from the untouched module must not shadow the rewrite
    if rewrite == "functional_call":
        replacement = {name: random_tensor(*p.shape, dtype=F64, scale=0.3) for name, p in theirs.named_parameters()}
        got = torch.func.functional_call(ours, replacement, (x, hx))
        want = torch.func.functional_call(theirs, replacement, (x, hx))
    else:
        for module in (ours, theirs):
            torch.manual_seed(6)  # the same pruning mask for both
            if rewrite == "parametrize":
                torch.nn.utils.parametrize.register_parametrization(module, "weight_hh", _Halved())
            elif rewrite == "prune":
                torch.nn.utils.prune.random_unstructured(module, "weight_ih", amount=0.5)
            else:
                module.weight_hh = torch.nn.Parameter(module.weight_hh.detach() * 0.5)
        got, want = ours(x, hx), theirs(x, hx)
    for name, g, w in zip(("h'", "c'"), got, want):
        assert_close(g, w, RTOL[F64], name)
    assert not torch.allclose(got[0], _untouched_copy()(x, hx)[0])  # the rewrite took effect


class _Halved(torch.nn.Module):
    def forward(self, weight):
        return weight * 0.5


def _untouched_copy():
    """A pyattn cell with the weights torch's module had before any rewrite (to show a rewrite took effect)."""
    torch.manual_seed(5)
    fresh = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    copy = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    copy.load_state_dict(fresh.state_dict())
    return copy


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_layers": 2, "bias": False},
        {"proj_size": 2, "batch_first": True, "dropout": 0.5, "num_layers": 3, "bidirectional": True},
    ],
)
def test_repr_matches_torch(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert repr(pyattn.nn.LSTM(3, 4, **kwargs)) == repr(torch.nn.LSTM(3, 4, **kwargs))
    assert repr(pyattn.nn.LSTMCell(3, 4)) == repr(torch.nn.LSTMCell(3, 4))
    assert repr(pyattn.nn.LSTMCell(3, 4, bias=False)) == repr(torch.nn.LSTMCell(3, 4, bias=False))


def test_flatten_parameters_is_a_harmless_no_op():
    ours, theirs = _module_pair(num_layers=2)
    ours.flatten_parameters()
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64)
    _assert_same_result(ours, theirs, ours(x), theirs(x))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"dropout": 1.5}, ValueError, "dropout should be a number in range"),
        ({"dropout": True}, ValueError, "dropout should be a number in range"),
        ({"proj_size": HIDDEN_SIZE}, ValueError, "proj_size has to be smaller than hidden_size"),
        ({"proj_size": -1}, ValueError, "proj_size should be a positive integer"),
        ({"num_layers": 0}, ValueError, "num_layers must be greater than zero"),
        ({"bias": 1}, TypeError, "bias should be of type bool"),
        ({"batch_first": None}, TypeError, "batch_first should be of type bool"),
    ],
)
def test_constructor_errors_match_torch(kwargs, error, message):
    with pytest.raises(error, match=message):
        torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **kwargs)
    with pytest.raises(error, match=message):
        pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **kwargs)


def test_dropout_with_one_layer_warns_as_torch():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dropout=0.5)


def _bad_lstm_calls():
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64)
    h = random_tensor(2, BATCH, HIDDEN_SIZE, dtype=F64)
    wide = random_tensor(STEPS, BATCH, INPUT_SIZE + 1, dtype=F64)
    return [
        ("input 4-D", (x[None],), ValueError, "Expected input to be 2D or 3D, got 4D"),
        ("input size", (wide,), RuntimeError, r"input.size\(-1\) must be equal to input_size"),
        ("no steps", (x[:0],), RuntimeError, "sequence length to be larger than 0"),
        ("input dtype", (x.float(),), ValueError, r"input dtype \(torch.float32\) does not match weight dtype"),
        ("h_0 batch", (x, (torch.cat([h, h[:, :1]], 1), h)), RuntimeError, r"hidden\[0\].*\(2, 3, 6\)"),
        ("c_0 layers", (x, (h, h[:1])), RuntimeError, r"hidden\[1\].*\(2, 3, 6\)"),
        ("hx 2-D", (x, (h[0], h)), RuntimeError, "hx and cx should also be 3-D but got"),
        ("hx unbatched 3-D", (x[:, 0], (h, h)), RuntimeError, "hx and cx should also be 2-D but got"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_lstm_calls())))
def test_forward_errors_name_the_argument_as_torch(case):
    description, args, error, message = _bad_lstm_calls()[case]
    ours, theirs = _module_pair(num_layers=2)
    with pytest.raises(error, match=message):
        ours(*args)
    with pytest.raises(error):
        theirs(*args)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("hx_given", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_torch(batched, hx_given, bias):
    torch.manual_seed(99)
    theirs = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, bias=bias, dtype=F64)
    torch.manual_seed(99)
    ours = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, bias=bias, dtype=F64)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), "initialisation differs from torch's"
    batch_axis = (BATCH,) if batched else ()
    x = random_tensor(*batch_axis, INPUT_SIZE, dtype=F64, requires_grad=True)
    leaves = [x]
    hx = None
    if hx_given:
        hx = tuple(random_tensor(*batch_axis, HIDDEN_SIZE, dtype=F64, requires_grad=True) for _ in range(2))
        leaves += list(hx)
    got, want = ours(x, hx), theirs(x, hx)
    upstream = [random_tensor(*batch_axis, HIDDEN_SIZE, dtype=F64) for _ in range(2)]
    for name, g, w in zip(("h'", "c'"), got, want):
        assert_close(g, w, RTOL[F64], name)
    got_grads = torch.autograd.grad(got, [*leaves, *ours.parameters()], upstream)
    want_grads = torch.autograd.grad(want, [*leaves, *theirs.parameters()], upstream)
    for index, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert_close(g, w, RTOL[F64], f"grad {index}")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_lstm_under_autocast_runs_in_the_autocast_dtype(backend):
    """pyattn under CPU bf16 autocast, against the float64 reference: runs on every CPU (auto must not pick
    torch's own bf16 LSTM, which some CPUs' oneDNN lacks)."""
    ours, _ = _module_pair(num_layers=2)
    ours.float()
    x = random_tensor(STEPS, BATCH, INPUT_SIZE)
    with pyattn.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        output, (h_n, c_n) = ours(x)
    assert output.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    ours.double()
    reference, _ = ours(x.double())
    assert_close(output, reference, RTOL[torch.bfloat16], "output under autocast")


def test_lstm_under_autocast_matches_torchs_dtype():
    """torch.nn.LSTM under the same autocast gives the same dtype — where this CPU can run torch's bf16 LSTM."""
    ours, theirs = _module_pair(num_layers=2)
    ours.float()
    theirs.float()
    x = random_tensor(STEPS, BATCH, INPUT_SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = ours(x)
        try:
            expected, _ = theirs(x)
        except RuntimeError as error:  # e.g. oneDNN: "could not create a primitive descriptor for the LSTM ..."
            pytest.skip(f"torch.nn.LSTM cannot run under CPU bf16 autocast on this machine ({error}); "
                        "pyattn's result is checked by test_lstm_under_autocast_runs_in_the_autocast_dtype")
    assert output.dtype == expected.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("module_kind", ["cell", "lstm"])
def test_compiles_without_graph_breaks(module_kind, backend):
    """fullgraph: no graph break in pyattn's code, on the forced reference and under auto (the torch backend
    on a CPU, which hands a compiled LSTM to the reference: torch's _VF.lstm does not trace)."""
    if module_kind == "cell":
        module = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
        args = (random_tensor(BATCH, INPUT_SIZE, dtype=F64),
                (random_tensor(BATCH, HIDDEN_SIZE, dtype=F64), random_tensor(BATCH, HIDDEN_SIZE, dtype=F64)))
    else:
        module = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, bidirectional=True, dtype=F64)
        args = (random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64),)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with pyattn.use_backend(backend):
        got, want = compiled(*args), module(*args)
    if module_kind == "lstm":
        got, want = (got[0], *got[1]), (want[0], *want[1])
    for got_tensor, want_tensor in zip(got, want, strict=True):
        assert_close(got_tensor, want_tensor, RTOL[F64])


# ---- the same modules on the kernels: Triton in the interpreter (CPU), every backend on a GPU ----


def _run_with_gradients(module, values, packed, upstream):
    """Output, final states, and the gradients of the input and every parameter, all as float64 on the CPU."""
    leaf = values.detach().requires_grad_()
    module_input = pack_padded_sequence(leaf, RAGGED_LENGTHS, enforce_sorted=False) if packed else leaf
    output, (h_n, c_n) = module(module_input)
    data = output.data if packed else output
    loss = sum((t.double() * u.to(t.device)).sum() for t, u in zip((data, h_n, c_n), upstream))
    grads = torch.autograd.grad(loss, [leaf, *module.parameters()])
    return [t.detach().cpu().double() for t in (data, h_n, c_n, *grads)]


def _run_three_ways(device, dtype, packed, bidirectional, proj_size=0):
    """(names, ours in dtype on device, torch's in dtype on device, torch's in float64 on the CPU).

    All three hold the same weights, rounded to ``dtype``, and see the same rounded input.
    """
    kwargs = dict(num_layers=2, bidirectional=bidirectional, proj_size=proj_size)
    baseline = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **kwargs).to(dtype)
    ours = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **kwargs, device=device, dtype=dtype)
    ours.load_state_dict(baseline.state_dict())
    torch_in_dtype = baseline.to(device)
    expected = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **kwargs, dtype=F64)
    expected.load_state_dict(baseline.state_dict())
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=dtype, device=device)
    output_rows = int(RAGGED_LENGTHS.sum()) if packed else STEPS
    directions = 2 if bidirectional else 1
    output_shape = (output_rows,) + (() if packed else (BATCH,)) + (directions * (proj_size or HIDDEN_SIZE),)
    layers = 2 * directions
    upstream = [
        random_tensor(*output_shape, dtype=F64),
        random_tensor(layers, BATCH, proj_size or HIDDEN_SIZE, dtype=F64),
        random_tensor(layers, BATCH, HIDDEN_SIZE, dtype=F64),
    ]
    names = ["output", "h_n", "c_n", "grad input"] + [f"grad {name}" for name, _ in expected.named_parameters()]
    return (
        names,
        _run_with_gradients(ours, x, packed, upstream),
        _run_with_gradients(torch_in_dtype, x, packed, upstream),
        _run_with_gradients(expected, x.cpu().double(), packed, upstream),
    )


@pytest.mark.interpreter
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_on_triton_interpreter_matches_torch(packed):
    with pyattn.use_backend("triton"):
        names, got, _, expected = _run_three_ways("cpu", torch.float32, packed, bidirectional=True)
    for name, g, e in zip(names, got, expected, strict=True):
        assert_close(g, e, RTOL_TF32, name)


@pytest.mark.interpreter
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_on_triton_grid_interpreter_matches_torch(monkeypatch, packed):
    """A whole torch.nn.LSTM (two layers, both directions, dense and ragged-packed) on the grid-barrier forward and
    backward kernels (one program each under the interpreter), against torch in float64."""
    from pyattn.kernels.lstm import launch

    launched = []

    def recording(direction):
        kernel = getattr(launch, f"lstm_sequence_{direction}_grid_kernel")

        class Recording:
            def __getitem__(self, grid):
                launched.append(direction)
                return kernel[grid]

        return Recording()

    for direction in ("forward", "backward"):
        monkeypatch.setattr(launch, f"lstm_sequence_{direction}_grid_kernel", recording(direction))
    with pyattn.use_backend("triton/grid"):
        names, got, _, expected = _run_three_ways("cpu", torch.float32, packed, bidirectional=True)
    for name, g, e in zip(names, got, expected, strict=True):
        assert_close(g, e, RTOL_TF32, name)
    assert launched == ["forward"] * 4 + ["backward"] * 4, launched  # 2 layers × 2 directions each way


# The bound for the projection on the Triton interpreter (fp32 against torch in float64).
PROJECTION_RTOL = 1e-4


@pytest.fixture
def poisoned_triton_allocations(monkeypatch):
    """Every tensor the Triton LSTM launchers allocate with torch.empty starts as NaN."""
    from pyattn.kernels.lstm import launch

    from tests.conftest import poison_

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return poison_(torch.empty(*args, **kwargs))

    monkeypatch.setattr(launch, "torch", PoisonedTorch())


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton/persistent", "triton/stepwise"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_projection_on_triton_interpreter_matches_torch(poisoned_triton_allocations, backend, bidirectional,
                                                             packed):
    """proj_size > 0 through pyattn.nn.LSTM on the Triton kernels: 2 layers (layer 2 reads the P-wide outputs),
    outputs, h_n, c_n and the gradients of input, h_0, c_0 and every parameter (weight_hr included) equal to
    torch.nn.LSTM in float64 holding the same weights."""
    kwargs = dict(num_layers=2, bidirectional=bidirectional, proj_size=PROJ_SIZE)
    ours = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **kwargs)
    theirs = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, **kwargs, dtype=F64)
    theirs.load_state_dict(ours.state_dict())  # float64 copies of the float32 weights
    layers = 2 * (2 if bidirectional else 1)
    values = [random_tensor(STEPS, BATCH, INPUT_SIZE), random_tensor(layers, BATCH, PROJ_SIZE),
              random_tensor(layers, BATCH, HIDDEN_SIZE)]
    rows = int(RAGGED_LENGTHS.sum()) if packed else STEPS
    output_shape = (rows,) + (() if packed else (BATCH,)) + (layers // 2 * PROJ_SIZE,)
    upstream = [random_tensor(*output_shape, dtype=F64), random_tensor(layers, BATCH, PROJ_SIZE, dtype=F64),
                random_tensor(layers, BATCH, HIDDEN_SIZE, dtype=F64)]

    def run(module, dtype):
        leaves = [value.to(dtype).requires_grad_() for value in values]
        module_input = pack_padded_sequence(leaves[0], RAGGED_LENGTHS, enforce_sorted=False) if packed else leaves[0]
        output, (h_n, c_n) = module(module_input, (leaves[1], leaves[2]))
        data = output.data if packed else output
        loss = sum((t.double() * u).sum() for t, u in zip((data, h_n, c_n), upstream))
        grads = torch.autograd.grad(loss, [*leaves, *module.parameters()])
        return [t.detach().double() for t in (data, h_n, c_n, *grads)]

    with pyattn.use_backend(backend):
        got = run(ours, torch.float32)
    expected = run(theirs, F64)
    names = ["output", "h_n", "c_n", "grad input", "grad h_0", "grad c_0"] + [
        f"grad {name}" for name, _ in theirs.named_parameters()]
    assert any(name.startswith("grad weight_hr") for name in names)
    for name, g, e in zip(names, got, expected, strict=True):
        assert_close(g, e, PROJECTION_RTOL, name)


@pytest.mark.interpreter
def test_cell_on_triton_interpreter_matches_torch():
    theirs = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    ours = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())  # float64 copies of the float32 weights
    x = random_tensor(BATCH, INPUT_SIZE)
    state = (random_tensor(BATCH, HIDDEN_SIZE), random_tensor(BATCH, HIDDEN_SIZE))
    with pyattn.use_backend("triton"):
        got = ours(x, state)
    for name, g, e in zip(("h'", "c'"), got, theirs(x.double(), tuple(s.double() for s in state))):
        assert_close(g, e, RTOL_TF32, name)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "packed, bidirectional, proj_size",
    # dense (served by the cuda kernels where built), ragged (lengths), projection: each path auto takes
    [(False, True, 0), (True, True, 0), (True, False, 2)],
)
def test_lstm_on_gpu_auto_backend_matches_torch(dtype, packed, bidirectional, proj_size):
    with pyattn.use_backend("auto"):
        names, got, torch_in_dtype, expected = _run_three_ways("cuda", dtype, packed, bidirectional, proj_size)
    table_bound = RTOL_TF32 if dtype == torch.float32 else RTOL[dtype]
    for name, g, t, e in zip(names, got, torch_in_dtype, expected, strict=True):
        # flash-attention's rule: within twice the error of torch's own LSTM in this dtype, or the table's bound.
        assert_close(g, e, max(table_bound, 2 * relative_error(t, e)), name)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cell_on_gpu_auto_backend_matches_torch(dtype):
    baseline = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE).to(dtype)
    ours = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, device="cuda", dtype=dtype)
    ours.load_state_dict(baseline.state_dict())
    expected_cell = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    expected_cell.load_state_dict(baseline.state_dict())
    x = random_tensor(BATCH, INPUT_SIZE, dtype=dtype, device="cuda")
    state = tuple(random_tensor(BATCH, HIDDEN_SIZE, dtype=dtype, device="cuda") for _ in range(2))
    with pyattn.use_backend("auto"):
        got = ours(x, state)
    torch_in_dtype = baseline.cuda()(x, state)
    expected = expected_cell(x.cpu().double(), tuple(s.cpu().double() for s in state))
    table_bound = RTOL_TF32 if dtype == torch.float32 else RTOL[dtype]
    for name, g, t, e in zip(("h'", "c'"), got, torch_in_dtype, expected):
        assert g.dtype == dtype
        assert_close(g.cpu(), e, max(table_bound, 2 * relative_error(t.cpu(), e)), name)


@pytest.mark.requires_cuda
def test_autocast_on_gpu_runs_in_the_autocast_dtype_as_torch():
    torch.manual_seed(3)
    theirs = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, device="cuda")
    ours = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, device="cuda")
    ours.load_state_dict(theirs.state_dict())
    their_cell = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, device="cuda")
    our_cell = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, device="cuda")
    our_cell.load_state_dict(their_cell.state_dict())
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, device="cuda")
    with pyattn.use_backend("auto"), torch.autocast("cuda", dtype=torch.float16):
        output, (h_n, c_n) = ours(x)
        expected, _ = theirs(x)
        hy, cy = our_cell(x[0])
        expected_hy, _ = their_cell(x[0])
    assert output.dtype == h_n.dtype == c_n.dtype == expected.dtype == torch.float16
    assert hy.dtype == cy.dtype == expected_hy.dtype == torch.float16
    assert_close(output, theirs.double()(x.double())[0], RTOL[torch.float16], "output under autocast")
    assert_close(hy, their_cell.double()(x[0].double())[0], RTOL[torch.float16], "cell h' under autocast")


# ---- degenerate sizes and double backward, on every backend that runs here ----

# (backend, device): the plain process runs torch and the reference; the interpreter process the Triton
# kernels; a GPU every backend that serves it.
EVERY_BACKEND = [
    pytest.param("torch", "cpu", id="torch"),
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("triton", "cpu", marks=pytest.mark.interpreter, id="triton-interpreter"),
    pytest.param("auto", "cuda", marks=pytest.mark.requires_cuda, id="auto-cuda"),
]
# Sizes torch accepts: an empty batch, one hidden unit; for the cell also input_size 0 (torch.nn.LSTM refuses
# input_size 0 at construction, and so does pyattn.nn.LSTM; a sequence of length 0 raises in both).
DEGENERATE = [dict(batch=0, input_size=INPUT_SIZE, hidden=HIDDEN_SIZE), dict(batch=BATCH, input_size=INPUT_SIZE, hidden=1)]


@pytest.mark.parametrize("backend, device", EVERY_BACKEND)
@pytest.mark.parametrize("sizes", DEGENERATE, ids=["batch0", "hidden1"])
def test_lstm_degenerate_sizes_match_torch(backend, device, sizes):
    theirs = torch.nn.LSTM(sizes["input_size"], sizes["hidden"], num_layers=2, dtype=F64)
    ours = pyattn.nn.LSTM(sizes["input_size"], sizes["hidden"], num_layers=2, device=device)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor(STEPS, sizes["batch"], sizes["input_size"], device=device, requires_grad=True)
    x64 = x.detach().cpu().double().requires_grad_()
    with pyattn.use_backend(backend):
        output, (h_n, c_n) = ours(x)
        (output.sum() + h_n.square().sum() + c_n.sum()).backward()
    expected, (h64, c64) = theirs(x64)
    (expected.sum() + h64.square().sum() + c64.sum()).backward()
    for name, got, want in (("output", output, expected), ("h_n", h_n, h64), ("c_n", c_n, c64), ("grad input", x.grad, x64.grad)):
        assert got.shape == want.shape, name
        if want.numel():
            assert_close(got.cpu(), want, RTOL_TF32, name)


@pytest.mark.parametrize("backend, device", EVERY_BACKEND)
@pytest.mark.parametrize("input_size", [0, INPUT_SIZE])
def test_cell_degenerate_sizes_match_torch(backend, device, input_size):
    theirs = torch.nn.LSTMCell(input_size, 1, dtype=F64)
    ours = pyattn.nn.LSTMCell(input_size, 1, device=device)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor(BATCH, input_size, device=device)
    state = (random_tensor(BATCH, 1, device=device), random_tensor(BATCH, 1, device=device))
    with pyattn.use_backend(backend):
        got = ours(x, state)
    for name, g, e in zip(("h'", "c'"), got, theirs(x.cpu().double(), tuple(s.cpu().double() for s in state))):
        assert_close(g.cpu(), e, RTOL_TF32, name)


@pytest.mark.parametrize("backend, device", EVERY_BACKEND)
def test_double_backward_matches_torch(backend, device):
    """create_graph=True then a second backward (torch's CPU LSTM supports it, so must the drop-in)."""
    theirs = torch.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    ours = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, device=device)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, device=device, requires_grad=True)
    x64 = x.detach().cpu().double().requires_grad_()
    results = []
    for module, inputs, context in ((ours, x, pyattn.use_backend(backend)), (theirs, x64, pyattn.use_backend("auto"))):
        with context:
            output, _ = module(inputs)
            (grad_input,) = torch.autograd.grad(output.square().sum(), inputs, create_graph=True)
            grad_input.sin().sum().backward()
        results.append([grad_input.detach().cpu(), inputs.grad.cpu()]
                       + [p.grad.cpu() for p in module.parameters()])
    for index, (got, want) in enumerate(zip(*results, strict=True)):
        assert_close(got, want, RTOL_TF32, f"result {index}")
