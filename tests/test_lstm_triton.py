"""Triton LSTM backend vs the float64 reference: outputs and every gradient, every recurrence kernel.

Interpreter tests (CPU, TRITON_INTERPRET=1):
    TRITON_INTERPRET=1 python -m pytest -m interpreter tests/test_lstm_triton.py
GPU tests (``requires_cuda``) run in the plain process on a machine with a GPU, bf16 included
(the interpreter's bf16 arithmetic is wrong, so bf16 is only checked there).
"""

from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn._dispatch import BackendUnavailableError, Request, choose, default_backend
from pyattn.reference import lstm as reference
from tests.conftest import RTOL, assert_close, poison_, random_tensor, relative_error

RECURRENCES = ["persistent", "per_step"]


@pytest.fixture
def kernels():
    from pyattn.kernels import lstm

    return lstm


@pytest.fixture
def launch():
    from pyattn.kernels.lstm import launch

    return launch


@pytest.fixture
def poisoned_allocations(monkeypatch, launch):
    """Every tensor the launchers allocate with torch.empty starts as NaN: an unwritten element shows."""

    class PoisonedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*args, **kwargs):
            return poison_(torch.empty(*args, **kwargs))

    monkeypatch.setattr(launch, "torch", PoisonedTorch())


@pytest.fixture(params=RECURRENCES)
def recurrence(request):
    """Forces the layer's recurrence kernel (forward and backward) for the duration of a test: dispatch's
    variant ``triton/persistent`` or ``triton/stepwise``."""
    name = {"persistent": "persistent", "per_step": "stepwise"}[request.param]
    with pyattn.use_backend(f"triton/{name}"):
        yield request.param


class _RecordingKernel:
    """Wraps a JIT kernel: ``record(grid, launch keyword arguments)`` at every launch, then launches it."""

    def __init__(self, original, record):
        self.original, self.record = original, record

    def warmup(self, *args, **kwargs):  # the grid launcher's occupancy check compiles first (GPU only)
        return self.original.warmup(*args, **kwargs)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record(grid, kwargs)
            return self.original[grid](*args, **kwargs)

        return launch


def _record_grid_launches(monkeypatch, launch) -> list:
    """(direction, launch grid) of every grid-barrier kernel launch from now on, direction "forward" or "backward"
    (so a test sees that it ran)."""
    launched = []
    for direction in ("forward", "backward"):
        name = f"lstm_sequence_{direction}_grid_kernel"
        monkeypatch.setattr(launch, name, _RecordingKernel(
            getattr(launch, name), lambda grid, _, direction=direction: launched.append((direction, grid))))
    return launched


@pytest.fixture
def grid_recurrence(monkeypatch, launch):
    """Forces the grid-barrier recurrence (dispatch's variant ``triton/grid``: the grid forward, then the grid
    backward); returns its launches as (direction, grid)."""
    launched = _record_grid_launches(monkeypatch, launch)
    with pyattn.use_backend("triton/grid"):
        yield launched


def _layer_leaves(steps, batch, input_size, hidden_size, dtype, device="cpu", bias="both", proj_size=0):
    return {
        "input": random_tensor(steps, batch, input_size, dtype=dtype, device=device, requires_grad=True),
        "h0": random_tensor(batch, proj_size or hidden_size, dtype=dtype, device=device, requires_grad=True),
        "c0": random_tensor(batch, hidden_size, dtype=dtype, device=device, requires_grad=True),
        **_make_weights(input_size, hidden_size, dtype, device, bias, proj_size),
    }


def _layer_request(dtype, device="cpu", features=frozenset(), batch=2, hidden_size=8, proj_size=0):
    features = frozenset(features) | ({"projection"} if proj_size else set())
    return Request(op="lstm", device=torch.device(device), dtype=dtype, features=features,
                   sizes=dict(batch=batch, hidden_size=hidden_size, proj_size=proj_size))


def _triton_op(op, dtype, device="cpu", features=frozenset()):
    """The triton implementation of ``op`` ("lstm_cell", or one layer of "lstm"): the variant a test forces
    (``pyattn.use_backend("triton/...")``), else the first triton variant that serves the call's sizes."""
    forced = default_backend()
    backend = forced if forced.split("/")[0] == "triton" else "triton"
    if op == "lstm_cell":
        variant = choose(Request(op=op, device=torch.device(device), dtype=dtype, features=frozenset(features)),
                         backend)
        assert variant.backend == "triton"
        return variant.implementation

    def layer(input, h0, c0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None, reverse=False,
              lengths=None):
        request = _layer_request(dtype, device, features, batch=input.shape[1], hidden_size=c0.shape[1],
                                 proj_size=0 if weight_hr is None else weight_hr.shape[0])
        try:
            variant = choose(request, backend)
        except BackendUnavailableError as error:
            if "/" not in backend:
                raise
            pytest.skip(f"{backend} does not serve this shape (dispatch would not pick it): {error}")
        assert variant.backend == "triton"
        return variant.implementation.layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                                            lengths)

    return layer


def _make_weights(input_size, hidden_size, dtype, device, bias, proj_size=0):
    """bias: "both", "ih", "hh" or "none". Scaled like torch's init so gates are not saturated. With ``proj_size``
    W_hh is (4H, P) and a "weight_hr" (P, H) is added."""
    scale = hidden_size**-0.5
    state_size = proj_size or hidden_size
    weights = {
        "weight_ih": random_tensor(4 * hidden_size, input_size, dtype=dtype, device=device, scale=scale, requires_grad=True),
        "weight_hh": random_tensor(4 * hidden_size, state_size, dtype=dtype, device=device, scale=scale, requires_grad=True),
        "bias_ih": None,
        "bias_hh": None,
    }
    if proj_size:
        weights["weight_hr"] = random_tensor(proj_size, hidden_size, dtype=dtype, device=device, scale=scale,
                                             requires_grad=True)
    for name in ("bias_ih", "bias_hh"):
        if bias in ("both", name.removeprefix("bias_")):
            weights[name] = random_tensor(4 * hidden_size, dtype=dtype, device=device, scale=0.5, requires_grad=True)
    return weights


def _float64(tensors: dict) -> dict:
    return {name: None if t is None else t.detach().double().requires_grad_(t.requires_grad) for name, t in tensors.items()}


def _check_outputs_and_gradients(run_triton, run_reference, leaves: dict, dtype, output_names):
    """Forward (with and without grad) and the gradient of a random projection of every output."""
    with torch.no_grad():
        inference_outputs = run_triton(leaves)
    outputs = run_triton(leaves)
    reference_leaves = _float64(leaves)
    reference_outputs = run_reference(reference_leaves)
    rtol = RTOL[dtype]
    for name, out, inference_out, ref in zip(output_names, outputs, inference_outputs, reference_outputs):
        assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
        assert_close(out, ref, rtol, name)
        assert_close(inference_out, ref, rtol, f"{name} (no grad)")
    upstream = [random_tensor(*out.shape, dtype=torch.float64, device=out.device) for out in outputs]
    torch.autograd.backward(outputs, [grad.to(dtype) for grad in upstream])
    torch.autograd.backward(reference_outputs, upstream)
    for name, leaf in leaves.items():
        if leaf is None or not leaf.requires_grad:
            continue
        assert leaf.grad is not None, f"grad of {name} was not computed"
        assert leaf.grad.dtype == dtype, f"grad of {name}: dtype {leaf.grad.dtype} != {dtype}"
        assert_close(leaf.grad, reference_leaves[name].grad, rtol, f"grad of {name}")


class TestInterpreter:
    pytestmark = pytest.mark.interpreter

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize(
        "batch,input_size,hidden_size,bias",
        [(1, 8, 8, "both"), (5, 12, 24, "none"), (3, 20, 40, "ih"), (2, 16, 64, "both"), (4, 70, 24, "hh")],
    )
    def test_cell(self, poisoned_allocations, dtype, batch, input_size, hidden_size, bias):
        leaves = {
            "input": random_tensor(batch, input_size, dtype=dtype, requires_grad=True),
            "hx": random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True),
            "cx": random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True),
            **_make_weights(input_size, hidden_size, dtype, "cpu", bias),
        }
        lstm_cell = _triton_op("lstm_cell", dtype)
        _check_outputs_and_gradients(
            lambda t: lstm_cell(**t), lambda t: reference.lstm_cell(**t), leaves, dtype, ["hy", "cy"]
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
    @pytest.mark.parametrize(
        "steps,batch,input_size,hidden_size,bias",
        [(1, 1, 8, 8, "both"), (4, 3, 12, 24, "none"), (9, 5, 20, 40, "both"), (3, 2, 16, 64, "ih"), (5, 17, 6, 16, "hh")],
    )
    def test_layer(self, poisoned_allocations, recurrence, dtype, reverse, steps, batch, input_size, hidden_size, bias):
        leaves = {
            "input": random_tensor(steps, batch, input_size, dtype=dtype, requires_grad=True),
            "h0": random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True),
            "c0": random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True),
            **_make_weights(input_size, hidden_size, dtype, "cpu", bias),
        }
        lstm_layer = _triton_op("lstm_layer", dtype)
        _check_outputs_and_gradients(
            lambda t: lstm_layer(**t, reverse=reverse),
            lambda t: reference.lstm_layer(**t, reverse=reverse),
            leaves, dtype, ["output", "h_n", "c_n"],
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
    def test_layer_ragged_lengths(self, poisoned_allocations, recurrence, dtype, reverse):
        steps, batch, input_size, hidden_size = 7, 5, 10, 24
        lengths = torch.tensor([3, 7, 1, 0, 5])  # any order; a row of length 0 keeps its initial state
        leaves = {
            "input": random_tensor(steps, batch, input_size, dtype=dtype, requires_grad=True),
            "h0": random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True),
            "c0": random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True),
            **_make_weights(input_size, hidden_size, dtype, "cpu", "both"),
        }
        lstm_layer = _triton_op("lstm_layer", dtype, features={"lengths"})
        _check_outputs_and_gradients(
            lambda t: lstm_layer(**t, reverse=reverse, lengths=lengths),
            lambda t: reference.lstm_layer(**t, reverse=reverse, lengths=lengths),
            leaves, dtype, ["output", "h_n", "c_n"],
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
    @pytest.mark.parametrize(
        "steps,batch,input_size,hidden_size,bias,lengths",
        [(1, 1, 8, 8, "both", None), (6, 3, 12, 24, "none", None), (9, 16, 20, 40, "ih", None),
         (7, 5, 10, 24, "both", [3, 7, 1, 0, 5]), (5, 2, 16, 64, "hh", [5, 2]), (4, 37, 8, 24, "both", None),
         (6, 20, 6, 16, "both", [6, 0, 2, 5, 1, 6, 3, 0, 4, 6, 1, 2, 5, 3, 6, 0, 1, 4, 2, 6]),
         # Sorted, as a PackedSequence arrives: the second tile ends after 2 steps and the third never runs, so the
         # kernels skip their products from then on (only the carry runs).
         (6, 37, 6, 16, "both", [6] * 16 + [2] * 16 + [0] * 5)],
        ids=["tiny", "dense", "full-tile", "ragged", "ragged-64", "three-batch-tiles", "ragged-two-batch-tiles",
             "sorted-frozen-tiles"],
    )
    def test_layer_grid(self, poisoned_allocations, grid_recurrence, dtype, reverse, steps, batch, input_size, hidden_size, bias, lengths):
        """The grid-barrier forward and backward as one program (the interpreter runs programs in turn), batches of
        more than 16 rows as 16-row tiles inside each step, every gradient against float64."""
        lengths = None if lengths is None else torch.tensor(lengths)
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, dtype, bias=bias)
        lstm_layer = _triton_op("lstm_layer", dtype, features={"lengths"} if lengths is not None else set())
        _check_outputs_and_gradients(
            lambda t: lstm_layer(**t, reverse=reverse, lengths=lengths),
            lambda t: reference.lstm_layer(**t, reverse=reverse, lengths=lengths),
            leaves, dtype, ["output", "h_n", "c_n"],
        )
        assert grid_recurrence == [("forward", (1,))] * 2 + [("backward", (1,))], \
            "the grid kernels did not run (the forward with and without grad, then the backward)"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
    @pytest.mark.parametrize(
        "batch,input_size,hidden_size,bias,lengths",
        [(3, 12, 40, "both", None), (16, 20, 70, "ih", None), (5, 10, 33, "both", [1, 0, 1, 1, 0]), (2, 8, 16, "none", None),
         (35, 6, 24, "both", [1, 0] * 17 + [1])],
        ids=["odd-3-tiles", "full-batch-5-tiles", "ragged-odd", "one-tile", "ragged-three-batch-tiles"],
    )
    def test_layer_grid_tiles(self, poisoned_allocations, grid_recurrence, dtype, reverse, batch, input_size,
                              hidden_size, bias, lengths):
        """One step crosses no barrier, so the interpreter runs the GPU's tiling (a program per 16 hidden units,
        the last one partial for odd H), forward and backward: every tile's gate rows (forward) and W_hh columns
        (backward), masks and stores, against float64."""
        steps = 1
        lengths = None if lengths is None else torch.tensor(lengths)
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, dtype, bias=bias)
        lstm_layer = _triton_op("lstm_layer", dtype, features={"lengths"} if lengths is not None else set())
        _check_outputs_and_gradients(
            lambda t: lstm_layer(**t, reverse=reverse, lengths=lengths),
            lambda t: reference.lstm_layer(**t, reverse=reverse, lengths=lengths),
            leaves, dtype, ["output", "h_n", "c_n"],
        )
        programs = -(-hidden_size // 16)
        assert grid_recurrence == [("forward", (programs,))] * 2 + [("backward", (programs,))], \
            "the grid kernels did not run with the GPU's tiling"

    def test_recurrence_eligibility(self, kernels):
        """The eligibility rules are pure functions of sizes, dtype and the GPU's figures (None: the interpreter,
        where the grid kernel runs as one program); their reasons name the argument."""
        hopper = kernels.SmResources.for_arch(90, 132)
        assert kernels.persistent_unsupported_reason(64, torch.float16) is None
        assert kernels.persistent_unsupported_reason(64, torch.float32) is None
        assert "weight_hh: hidden size 768" in kernels.persistent_unsupported_reason(768, torch.float16)
        assert "hidden size 65" in kernels.persistent_unsupported_reason(65, torch.float32)
        assert kernels.grid_unsupported_reason(16, 768, torch.float16, device=hopper) is None
        assert kernels.grid_unsupported_reason(16, 768, torch.float16, device=None) is None
        assert kernels.grid_programs(768, interpreter=False) == 48 and kernels.grid_programs(768, interpreter=True) == 1
        assert kernels.grid_programs(40, interpreter=True, steps=1) == 3  # one step: no barrier, the GPU's tiling
        small = kernels.SmResources.for_arch(90, 32)
        assert "48 programs" in kernels.grid_unsupported_reason(16, 768, torch.float16, device=small)
        assert kernels.grid_unsupported_reason(48, 768, torch.float16, device=hopper) is None  # 3 batch tiles
        assert "input: batch 49 > 48" in kernels.grid_unsupported_reason(49, 768, torch.float16, device=hopper)
        assert kernels.grid_backward_unsupported_reason(48, 768, torch.float16, device=hopper) is None
        assert "input: batch 49 > 48" in kernels.grid_backward_unsupported_reason(49, 768, torch.float16, device=hopper)
        assert "48 programs" in kernels.grid_backward_unsupported_reason(16, 768, torch.float16, device=small)
        assert "grid backward's on-chip W_hh limit" in kernels.grid_backward_unsupported_reason(
            1, 520, torch.float32, device=hopper)
        assert "hidden size 520" in kernels.grid_unsupported_reason(1, 520, torch.float32, device=hopper)
        turing = kernels.SmResources.for_arch(75, 40)
        assert "sm_75" in kernels.grid_unsupported_reason(16, 768, torch.float16, device=turing)

    def test_grid_residency_rule(self, kernels):
        """Programs resident at once = SMs × the least of what registers (per warp, in units of 256), shared
        memory (plus the driver's 1 KB per block), warps and the block limit allow per SM."""
        hopper = kernels.SmResources.for_arch(90, 132)
        assert (hopper.registers_per_sm, hopper.shared_bytes_per_sm, hopper.max_warps_per_sm) == (65536, 233472, 64)
        # 128 registers × 8 warps = 32768 per block: 2 by registers; 100 KB + 1 KB: 2 by shared memory.
        assert kernels.resident_programs(hopper, registers=128, shared_bytes=100 * 1024, num_warps=8) == 264
        # 250 registers round up to 256: one 8-warp block fills the register file.
        assert kernels.resident_programs(hopper, registers=250, shared_bytes=1024, num_warps=8) == 132
        assert kernels.resident_programs(hopper, registers=32, shared_bytes=0, num_warps=8) == 132 * 8  # warps
        assert kernels.resident_programs(hopper, registers=16, shared_bytes=0, num_warps=1) == 132 * 32  # blocks
        assert kernels.resident_programs(hopper, registers=64, shared_bytes=240_000, num_warps=4) == 0
        assert kernels.grid_residency_reason(132, hopper, registers=250, shared_bytes=1024, num_warps=8) is None
        reason = kernels.grid_residency_reason(133, hopper, registers=250, shared_bytes=1024, num_warps=8)
        assert "133 programs" in reason and "132 SMs holds 132" in reason and "250 registers × 8 warps" in reason
        # The SM's own shared memory, where it differs from its architecture's (an sm_86 SM has 100 KB).
        ampere_consumer = kernels.SmResources.for_arch(86, 84, 102400)
        assert kernels.resident_programs(ampere_consumer, registers=64, shared_bytes=140_000, num_warps=8) == 0
        # The table dispatch reads holds every padded size auto may run the grid kernel at, on both archs.
        from pyattn.kernels.lstm import configs

        for capability in (90, 80):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for padded in configs.grid_hidden_sizes(dtype):
                    assert (capability, configs.element_kind(dtype), padded) in configs.GRID_COMPILED
                    assert (capability, configs.element_kind(dtype), padded) in configs.GRID_BACKWARD_COMPILED

    def test_recurrence_is_required_and_checked(self, kernels):
        """The launchers take the recurrence the caller chose: no default, no environment, bad names fail."""
        leaves = {name: t.detach() for name, t in _layer_leaves(2, 3, 4, 8, torch.float32).items()}
        weight_ih, weight_hh = leaves["weight_ih"], leaves["weight_hh"]
        args = (leaves["input"], leaves["h0"], leaves["c0"], weight_ih, weight_hh, None, None, False, True)
        with pytest.raises(TypeError, match="recurrence"):
            kernels.lstm_sequence_forward(*args)
        for bad in ("barrier", "auto", None):
            with pytest.raises(ValueError, match=f"recurrence={bad!r}: expected one of"):
                kernels.lstm_sequence_forward(*args, recurrence=bad)
        _, _, _, gates, cell_states, hidden_before = kernels.lstm_sequence_forward(*args, recurrence="stepwise")
        backward_args = (random_tensor(2, 3, 8), None, None, leaves["input"], weight_ih, weight_hh, None, False, gates,
                         cell_states, hidden_before)
        for bad in ("barrier", "auto", None):
            with pytest.raises(ValueError, match=f"recurrence={bad!r}: expected one of \\['persistent', 'grid', "
                                                 "'stepwise'\\]"):
                kernels.lstm_sequence_backward(*backward_args, recurrence=bad)
        stepwise = kernels.lstm_sequence_backward(*backward_args, recurrence="stepwise")
        for recurrence in ("persistent", "grid"):
            other = kernels.lstm_sequence_backward(*backward_args, recurrence=recurrence)
            for a, b in zip(stepwise, other):
                assert_close(a, b.double(), RTOL[torch.float32])

    @pytest.mark.parametrize("forward_recurrence,backward_recurrence",
                             [("persistent", "persistent"), ("grid", "grid"), ("grid", "stepwise"), ("stepwise", "stepwise"),
                              ("stepwise", "persistent"), ("stepwise", "grid")])
    @pytest.mark.parametrize("reverse,lengths", [(False, None), (True, [3, 7, 1, 0, 5])], ids=["dense", "ragged"])
    def test_launchers_every_recurrence(self, kernels, poisoned_allocations, forward_recurrence, backward_recurrence,
                                        reverse, lengths):
        """The launchers alone (no dispatch): each forward recurrence, then each backward one, against the
        float64 reference's outputs and autograd gradients."""
        steps, batch, input_size, hidden_size = 7, 5, 10, 24
        lengths = None if lengths is None else torch.tensor(lengths)
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, torch.float32)
        detached = {name: t.detach() for name, t in leaves.items()}
        bias = (detached["bias_ih"] + detached["bias_hh"]).float()
        output, h_n, c_n, gates, cell_states, hidden_before = kernels.lstm_sequence_forward(
            detached["input"], detached["h0"], detached["c0"], detached["weight_ih"], detached["weight_hh"], bias,
            lengths, reverse, True, recurrence=forward_recurrence)
        reference_leaves = _float64(leaves)
        references = reference.lstm_layer(**reference_leaves, reverse=reverse, lengths=lengths)
        for name, out, ref in zip(("output", "h_n", "c_n"), (output, h_n, c_n), references):
            assert_close(out, ref, RTOL[torch.float32], name)
        upstream = [random_tensor(*out.shape, dtype=torch.float64) for out in references]
        torch.autograd.backward(references, upstream)
        grads = kernels.lstm_sequence_backward(
            upstream[0].float(), upstream[1].float(), upstream[2].float(), detached["input"], detached["weight_ih"],
            detached["weight_hh"], lengths, reverse, gates, cell_states, hidden_before, recurrence=backward_recurrence)
        for name, grad in zip(("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih"), grads):
            assert_close(grad, reference_leaves[name].grad, RTOL[torch.float32], f"grad of {name}")

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
    def test_step_backward_launches_carry_the_register_cap_of_their_specs(self, kernels, launch, monkeypatch, dtype):
        """Every launch of the step backward (layer, packed layer, cell) passes the element kind's register cap
        (``maxnreg``, a compile option the interpreter ignores); tests/test_triton_compile.py checks that the AOT
        specs carry the same cap, so the spill-free kernel the report shows is the one that runs."""
        from pyattn.kernels.lstm import configs, packed

        caps = []
        for module in (launch, packed):
            monkeypatch.setattr(module, "lstm_step_backward_kernel", _RecordingKernel(
                module.lstm_step_backward_kernel, lambda grid, kwargs: caps.append(kwargs.get("maxnreg"))))
        expected = configs.STEP_BACKWARD_MAXNREG.get(configs.element_kind(dtype))
        steps, batch, input_size, hidden_size = 3, 4, 6, 16
        lstm = pyattn.nn.LSTM(input_size, hidden_size, dtype=dtype)
        inputs = random_tensor(steps, batch, input_size, dtype=dtype, requires_grad=True)
        sequences = torch.nn.utils.rnn.pack_padded_sequence(inputs, torch.tensor([3, 3, 2, 1]))
        cell = pyattn.nn.LSTMCell(input_size, hidden_size, dtype=dtype)
        with pyattn.use_backend("triton/stepwise"):
            lstm(inputs)[0].sum().backward()
            launched_dense = len(caps)
            lstm(sequences)[0].data.sum().backward()
            launched_packed = len(caps) - launched_dense
        with pyattn.use_backend("triton"):
            launched_before_cell = len(caps)
            sum(cell(inputs[0])).sum().backward()
        assert launched_dense == steps and launched_packed == steps and len(caps) == launched_before_cell + 1, caps
        assert caps == [expected] * len(caps)

    def test_layer_grid_rejects_what_it_cannot_run(self, kernels, grid_recurrence):
        # The launcher's own safety check, called directly with recurrence="grid" ...
        for (batch, hidden_size), message in (((49, 8), "batch 49"), ((1, 520), "weight_hh: hidden size 520")):
            leaves = {name: t.detach() for name, t in _layer_leaves(2, batch, 4, hidden_size, torch.float32).items()}
            with pytest.raises(ValueError, match=message):
                kernels.lstm_sequence_forward(leaves["input"], leaves["h0"], leaves["c0"], leaves["weight_ih"],
                                              leaves["weight_hh"], None, None, False, False, recurrence="grid")
        # ... and dispatch, where triton/grid is forced: the same reason, before any launch.
        with pytest.raises(BackendUnavailableError, match="batch 49"):
            choose(_layer_request(torch.float32, batch=49, hidden_size=8), "triton/grid")
        # The backward launcher's: the same limits, and no projection.
        leaves = {name: t.detach() for name, t in _layer_leaves(2, 49, 4, 8, torch.float32).items()}
        _, _, _, gates, cell_states, hidden_before = kernels.lstm_sequence_forward(
            leaves["input"], leaves["h0"], leaves["c0"], leaves["weight_ih"], leaves["weight_hh"], None, None, False,
            True, recurrence="stepwise")
        with pytest.raises(ValueError, match="lstm_sequence_backward: recurrence='grid' cannot run this call: input: "
                                             "batch 49 > 48"):
            kernels.lstm_sequence_backward(random_tensor(2, 49, 8), None, None, leaves["input"], leaves["weight_ih"],
                                           leaves["weight_hh"], None, False, gates, cell_states, hidden_before,
                                           recurrence="grid")
        assert grid_recurrence == []

    def test_grid_backward_fallback_is_decided_at_the_forward(self, kernels, grid_recurrence, monkeypatch):
        """After a grid forward the backward's kernel comes from the grid backward's rule, asked once when the forward
        runs (the call's batch, hidden size, dtype and device); where it refuses, the backward runs stepwise and the
        grid backward is never launched."""
        asked = []

        def refuse(batch, hidden_size, dtype, device):
            asked.append((batch, hidden_size, dtype, device.type))
            return "stepwise", "weight_hh: the grid backward cannot hold its programs (test)"

        from pyattn import _registry

        monkeypatch.setattr(kernels, "backward_after_grid", refuse)
        monkeypatch.setattr(_registry, "_NOTES", {})  # this test's note only, gone after it
        steps, batch, input_size, hidden_size = 5, 3, 6, 24
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, torch.float32)
        lstm_layer = _triton_op("lstm_layer", torch.float32)
        _check_outputs_and_gradients(lambda t: lstm_layer(**t), lambda t: reference.lstm_layer(**t), leaves,
                                     torch.float32, ["output", "h_n", "c_n"])
        assert asked == [(batch, hidden_size, torch.float32, "cpu")]
        assert grid_recurrence == [("forward", (1,))] * 2, "the grid backward ran where its rule refused"
        assert ("triton/grid: the backward runs on the stepwise kernels: weight_hh: the grid backward cannot hold its "
                "programs (test)") in _registry.notes("lstm")

    def test_backward_after_grid_uses_the_backward_kernels_figures(self, kernels, launch, monkeypatch):
        """The grid backward has its own compiled figures: a GPU that holds the forward's grid but not the
        backward's gets the grid forward and a stepwise backward, with the backward's occupancy reason."""
        from pyattn.kernels.lstm import configs

        device = launch.SmResources.for_arch(90, 60)  # 48 programs of H = 768 at 1 per SM: the forward fits
        monkeypatch.setitem(configs.GRID_BACKWARD_COMPILED, (90, "16-bit", 1024), (128, 240_000))
        assert kernels.grid_unsupported_reason(16, 768, torch.float16, device=device) is None
        reason = kernels.grid_backward_unsupported_reason(16, 768, torch.float16, device=device)
        assert "needs its 48 programs resident at once, but sm_90 with 60 SMs holds 0" in reason
        monkeypatch.setattr(launch, "on_interpreter", lambda device: False)
        monkeypatch.setattr(launch, "_sm_resources", lambda _: device)
        assert kernels.backward_after_grid(16, 768, torch.float16, torch.device("cpu")) == ("stepwise", reason)
        monkeypatch.undo()
        assert kernels.backward_after_grid(16, 768, torch.float16, torch.device("cpu")) == ("grid", None)

    @pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
    def test_layer_gradient_of_one_output(self, recurrence, used):
        """Only one output reaches the loss: the others' gradients arrive as None, not zeros."""
        steps, batch, input_size, hidden_size = 4, 3, 6, 16
        leaves = {
            "input": random_tensor(steps, batch, input_size, requires_grad=True),
            "h0": random_tensor(batch, hidden_size, requires_grad=True),
            "c0": random_tensor(batch, hidden_size, requires_grad=True),
            **_make_weights(input_size, hidden_size, torch.float32, "cpu", "both"),
        }
        reference_leaves = _float64(leaves)
        index = ["output", "h_n", "c_n"].index(used)
        with pyattn.use_backend("triton"):
            out = _triton_op("lstm_layer", torch.float32)(**leaves)[index]
        ref = reference.lstm_layer(**reference_leaves)[index]
        upstream = random_tensor(*out.shape, dtype=torch.float64)
        out.backward(upstream.float())
        ref.backward(upstream)
        for name, leaf in leaves.items():
            assert_close(leaf.grad, reference_leaves[name].grad, RTOL[torch.float32], f"grad of {name}")

    @pytest.mark.parametrize("used", ["hy", "cy"])
    def test_cell_gradient_of_one_output(self, used):
        batch, input_size, hidden_size = 3, 5, 16
        leaves = {
            "input": random_tensor(batch, input_size, requires_grad=True),
            "hx": random_tensor(batch, hidden_size, requires_grad=True),
            "cx": random_tensor(batch, hidden_size, requires_grad=True),
            **_make_weights(input_size, hidden_size, torch.float32, "cpu", "both"),
        }
        reference_leaves = _float64(leaves)
        index = ["hy", "cy"].index(used)
        out = _triton_op("lstm_cell", torch.float32)(**leaves)[index]
        ref = reference.lstm_cell(**reference_leaves)[index]
        upstream = random_tensor(*out.shape, dtype=torch.float64)
        out.backward(upstream.float())
        ref.backward(upstream)
        for name, leaf in leaves.items():
            assert_close(leaf.grad, reference_leaves[name].grad, RTOL[torch.float32], f"grad of {name}")

    def test_inference_saves_nothing(self):
        """Without grad the forward op returns empty saved tensors and keeps only two cell-state slots."""
        steps, batch, input_size, hidden_size = 3, 2, 4, 8
        weights = _make_weights(input_size, hidden_size, torch.float32, "cpu", "both")
        with torch.no_grad():
            outputs = torch.ops.pyattn.triton_lstm_layer_fwd(
                random_tensor(steps, batch, input_size), random_tensor(batch, hidden_size),
                random_tensor(batch, hidden_size), *weights.values(), None, False, False, "stepwise",
            )
        assert [t.numel() for t in outputs[3:]] == [0, 0, 0]

    def test_layer_dispatch_declares_support(self):
        with pyattn.use_backend("triton"):
            assert choose(_layer_request(torch.float16, features={"lengths"})).backend == "triton"
            with pytest.raises(BackendUnavailableError, match="float64"):
                choose(_layer_request(torch.float64))
            # A projection: the persistent kernel where W_hh and W_hr fit on chip, else stepwise; never grid.
            assert choose(_layer_request(torch.float32, features={"lengths"}, hidden_size=32, proj_size=16)).qualified_name \
                == "triton/persistent"
            assert choose(_layer_request(torch.float32, hidden_size=64, proj_size=48)).qualified_name \
                == "triton/stepwise"
        with pyattn.use_backend("triton/grid"), pytest.raises(BackendUnavailableError,
                                                              match="unsupported features: projection"):
            choose(_layer_request(torch.float32, hidden_size=32, proj_size=16))
        # Automatic choice falls back (to torch's own LSTM on a CPU) for what the triton backend does not serve.
        assert choose(_layer_request(torch.float32, proj_size=4), "auto").qualified_name == "torch"

    def test_projection_eligibility(self, kernels):
        """The persistent kernels hold W_hh (4H × P) and W_hr (P × H) on chip: within the elements W_hh alone takes
        at the hidden-size limit, and with the unaligned limit when P is not a multiple of 16."""
        assert kernels.persistent_unsupported_reason(128, torch.float16, 64) is None
        assert kernels.persistent_unsupported_reason(64, torch.float32, 32) is None
        assert kernels.persistent_unsupported_reason(16, torch.float32, 3) is None
        assert "weight_hr: hidden size 128 with proj_size 112" in kernels.persistent_unsupported_reason(
            128, torch.float16, 112)
        assert "weight_hr: hidden size 64 with proj_size 48" in kernels.persistent_unsupported_reason(
            64, torch.float32, 48)
        assert "proj_size (24) that is not a multiple of 16" in kernels.persistent_unsupported_reason(
            64, torch.float32, 24)
        assert "weight_hh: hidden size 256" in kernels.persistent_unsupported_reason(256, torch.float16, 16)

    def test_grid_refuses_projection(self, kernels, grid_recurrence):
        """The grid kernel has no projection: the launcher raises naming weight_hr, before any launch."""
        leaves = {name: t.detach() for name, t in _layer_leaves(2, 1, 4, 8, torch.float32, proj_size=4).items()}
        with pytest.raises(ValueError, match="weight_hr: the grid recurrence has no projection"):
            kernels.lstm_sequence_forward(leaves["input"], leaves["h0"], leaves["c0"], leaves["weight_ih"],
                                          leaves["weight_hh"], None, None, False, False, recurrence="grid",
                                          weight_hr=leaves["weight_hr"])
        assert grid_recurrence == []

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
    @pytest.mark.parametrize(
        "steps,batch,input_size,hidden_size,proj_size,bias,lengths",
        [(1, 1, 8, 8, 4, "both", None), (4, 3, 12, 24, 10, "none", None), (6, 17, 20, 32, 16, "ih", None),
         (7, 5, 10, 32, 16, "both", [3, 7, 1, 0, 5]), (5, 2, 16, 64, 48, "hh", [5, 2])],
        ids=["tiny", "odd", "two-tiles", "ragged", "ragged-wide"],
    )
    def test_layer_projection(self, poisoned_allocations, recurrence, dtype, reverse, steps, batch, input_size,
                              hidden_size, proj_size, bias, lengths):
        """proj_size > 0: r_t = (σ(o)·tanh(c_t))·W_hrᵀ is the recurrent state and the output; outputs and every
        gradient (weight_hr included) against float64. fp32 H=64, P=48 is past the persistent kernel's budget
        (skipped there with the reason)."""
        lengths = None if lengths is None else torch.tensor(lengths)
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, dtype, bias=bias, proj_size=proj_size)
        lstm_layer = _triton_op("lstm_layer", dtype, features={"lengths"} if lengths is not None else set())
        _check_outputs_and_gradients(
            lambda t: lstm_layer(**t, reverse=reverse, lengths=lengths),
            lambda t: reference.lstm_layer(**t, reverse=reverse, lengths=lengths),
            leaves, dtype, ["output", "h_n", "c_n"],
        )

    @pytest.mark.parametrize("forward_recurrence,backward_recurrence",
                             [("persistent", "persistent"), ("stepwise", "stepwise"), ("stepwise", "persistent"),
                              ("persistent", "stepwise")])
    @pytest.mark.parametrize("reverse,lengths", [(False, None), (True, [3, 7, 1, 0, 5])], ids=["dense", "ragged"])
    def test_launchers_projection(self, kernels, poisoned_allocations, forward_recurrence, backward_recurrence,
                                  reverse, lengths):
        """The launchers alone with a projection: either forward's saved tensors serve either backward, whose
        seventh result is dW_hr (= Σ drᵀ·m, m rebuilt from the saved gates and cell states)."""
        steps, batch, input_size, hidden_size, proj_size = 7, 5, 10, 32, 16
        lengths = None if lengths is None else torch.tensor(lengths)
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, torch.float32, proj_size=proj_size)
        detached = {name: t.detach() for name, t in leaves.items()}
        bias = (detached["bias_ih"] + detached["bias_hh"]).float()
        output, h_n, c_n, gates, cell_states, hidden_before = kernels.lstm_sequence_forward(
            detached["input"], detached["h0"], detached["c0"], detached["weight_ih"], detached["weight_hh"], bias,
            lengths, reverse, True, recurrence=forward_recurrence, weight_hr=detached["weight_hr"])
        assert output.shape == (steps, batch, proj_size) and h_n.shape == (batch, proj_size)
        assert c_n.shape == (batch, hidden_size) and hidden_before.shape == (steps, batch, proj_size)
        reference_leaves = _float64(leaves)
        references = reference.lstm_layer(**reference_leaves, reverse=reverse, lengths=lengths)
        for name, out, ref in zip(("output", "h_n", "c_n"), (output, h_n, c_n), references):
            assert_close(out, ref, RTOL[torch.float32], name)
        upstream = [random_tensor(*out.shape, dtype=torch.float64) for out in references]
        torch.autograd.backward(references, upstream)
        grads = kernels.lstm_sequence_backward(
            upstream[0].float(), upstream[1].float(), upstream[2].float(), detached["input"], detached["weight_ih"],
            detached["weight_hh"], lengths, reverse, gates, cell_states, hidden_before, recurrence=backward_recurrence,
            weight_hr=detached["weight_hr"])
        names = ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "weight_hr")
        for name, grad in zip(names, grads, strict=True):
            assert_close(grad, reference_leaves[name].grad, RTOL[torch.float32], f"grad of {name}")

    @pytest.mark.parametrize("op", ["lstm_cell", "lstm_layer"])
    def test_torch_compile_fullgraph(self, op):
        """The ops trace into one graph (fake kernels, autograd) and match eager, gradients included."""
        steps, batch, input_size, hidden_size = 3, 2, 5, 16
        prefix = (steps,) if op == "lstm_layer" else ()
        leaves = {
            "input": random_tensor(*prefix, batch, input_size, requires_grad=True),
            "h0" if op == "lstm_layer" else "hx": random_tensor(batch, hidden_size, requires_grad=True),
            "c0" if op == "lstm_layer" else "cx": random_tensor(batch, hidden_size, requires_grad=True),
            **_make_weights(input_size, hidden_size, torch.float32, "cpu", "both"),
        }
        implementation = _triton_op(op, torch.float32)
        compiled = torch.compile(implementation, backend="aot_eager", fullgraph=True)
        results = []
        for run in (implementation, compiled):
            outputs = run(**leaves)
            torch.autograd.backward(outputs, [torch.ones_like(out) for out in outputs])
            results.append(([out.detach() for out in outputs], {name: leaf.grad for name, leaf in leaves.items()}))
            for leaf in leaves.values():
                leaf.grad = None
        (eager_outputs, eager_grads), (compiled_outputs, compiled_grads) = results
        for eager, compiled_out in zip(eager_outputs, compiled_outputs):
            torch.testing.assert_close(compiled_out, eager, rtol=0, atol=0)
        for name in leaves:
            torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=0, atol=0, msg=f"grad of {name}")

    def test_opcheck_cell_ops(self):
        batch, input_size, hidden_size = 2, 5, 16
        args = [
            random_tensor(batch, input_size, requires_grad=True),
            random_tensor(batch, hidden_size, requires_grad=True),
            random_tensor(batch, hidden_size, requires_grad=True),
            *_make_weights(input_size, hidden_size, torch.float32, "cpu", "both").values(),
        ]
        torch.library.opcheck(torch.ops.pyattn.triton_lstm_cell_fwd, (*args, True))
        torch.library.opcheck(torch.ops.pyattn.triton_lstm_cell_fwd, (*[a.detach() for a in args], False))
        input, hx, cx, weight_ih, weight_hh, _, _ = [a.detach() for a in args]
        _, _, gates = torch.ops.pyattn.triton_lstm_cell_fwd(*[a.detach() for a in args], True)
        grad_hy, grad_cy = random_tensor(batch, hidden_size), random_tensor(batch, hidden_size)
        torch.library.opcheck(
            torch.ops.pyattn.triton_lstm_cell_bwd, (grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, gates)
        )
        torch.library.opcheck(
            torch.ops.pyattn.triton_lstm_cell_bwd, (None, grad_cy, input, hx, cx, weight_ih, weight_hh, gates)
        )

    @pytest.mark.parametrize("recurrence_name", ["stepwise", "grid"])
    @pytest.mark.parametrize("lengths", [None, torch.tensor([2, 3])], ids=["dense", "ragged"])
    def test_opcheck_layer_ops(self, lengths, recurrence_name):
        steps, batch, input_size, hidden_size = 3, 2, 5, 16
        args = [
            random_tensor(steps, batch, input_size, requires_grad=True),
            random_tensor(batch, hidden_size, requires_grad=True),
            random_tensor(batch, hidden_size, requires_grad=True),
            *_make_weights(input_size, hidden_size, torch.float32, "cpu", "both").values(),
        ]
        torch.library.opcheck(torch.ops.pyattn.triton_lstm_layer_fwd, (*args, lengths, True, True, recurrence_name))
        detached = [a.detach() for a in args]
        torch.library.opcheck(torch.ops.pyattn.triton_lstm_layer_fwd,
                              (*detached, lengths, False, False, recurrence_name))
        _, _, _, gates, cell_states, hidden_before = torch.ops.pyattn.triton_lstm_layer_fwd(
            *detached, lengths, True, True, recurrence_name
        )
        input, _, _, weight_ih, weight_hh, _, _ = detached
        grads = (random_tensor(steps, batch, hidden_size), random_tensor(batch, hidden_size), random_tensor(batch, hidden_size))
        saved = (lengths, gates, cell_states, hidden_before, True, recurrence_name)
        torch.library.opcheck(torch.ops.pyattn.triton_lstm_layer_bwd, (*grads, input, weight_ih, weight_hh, *saved))
        torch.library.opcheck(
            torch.ops.pyattn.triton_lstm_layer_bwd, (grads[0], None, None, input, weight_ih, weight_hh, *saved)
        )

    @pytest.mark.parametrize("recurrence_name", ["persistent", "stepwise"])
    def test_opcheck_layer_ops_with_projection(self, recurrence_name):
        """weight_hr is the ops' last (defaulted) argument: schema, fake kernels and autograd with it given."""
        steps, batch, input_size, hidden_size, proj_size = 3, 2, 5, 16, 8
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, torch.float32, proj_size=proj_size)
        weight_hr = leaves.pop("weight_hr")
        args = list(leaves.values())
        lengths = torch.tensor([2, 3])
        torch.library.opcheck(torch.ops.pyattn.triton_lstm_layer_fwd,
                              (*args, lengths, True, True, recurrence_name, weight_hr))
        detached = [a.detach() for a in args]
        _, _, _, gates, cell_states, hidden_before = torch.ops.pyattn.triton_lstm_layer_fwd(
            *detached, lengths, True, True, recurrence_name, weight_hr.detach()
        )
        input, _, _, weight_ih, weight_hh, _, _ = detached
        grads = (random_tensor(steps, batch, proj_size), random_tensor(batch, proj_size),
                 random_tensor(batch, hidden_size))
        saved = (lengths, gates, cell_states, hidden_before, True, recurrence_name, weight_hr.detach())
        torch.library.opcheck(torch.ops.pyattn.triton_lstm_layer_bwd, (*grads, input, weight_ih, weight_hh, *saved))


class _FakeGridKernel:
    """Stands in for the grid kernel on a CPU: ``warmup`` returns a compiled kernel with the given figures,
    a launch is recorded (grid, launch options) and computes nothing."""

    def __init__(self, registers, shared_bytes, num_warps):
        from types import SimpleNamespace

        self.compiled = SimpleNamespace(n_regs=registers, metadata=SimpleNamespace(shared=shared_bytes,
                                                                                   num_warps=num_warps))
        self.warmed, self.launched = [], []

    def warmup(self, *args, grid, **options):
        self.warmed.append((grid, options))
        return self.compiled

    def __getitem__(self, grid):
        return lambda *args, **options: self.launched.append((grid, options))


class TestGridLaunch:
    """The grid launcher's own occupancy check, on the GPU path with the compiled kernel and the device mocked
    (plain process: no interpreter, no GPU)."""

    HIDDEN_SIZE = 256  # 16 programs of 16 units

    @pytest.fixture
    def gpu_path(self, monkeypatch, launch):
        """The launcher takes its GPU branch for CPU tensors; the device is a 12-SM sm_90 and the dispatch table
        says the kernel is small (so only the launcher's re-check with the compiled figures can refuse)."""
        from pyattn.kernels.lstm import configs

        monkeypatch.setattr(launch, "on_interpreter", lambda device: False)
        monkeypatch.setattr(launch, "_sm_resources", lambda device: launch.SmResources.for_arch(90, 12))
        monkeypatch.setitem(configs.GRID_COMPILED, (90, "fp32", self.HIDDEN_SIZE), (64, 16384))
        monkeypatch.setitem(configs.GRID_BACKWARD_COMPILED, (90, "fp32", self.HIDDEN_SIZE), (64, 16384))

        def use(kernel, direction="forward"):
            monkeypatch.setattr(launch, f"lstm_sequence_{direction}_grid_kernel", kernel)
            return kernel

        return use

    def _forward(self, kernels):
        leaves = {name: t.detach() for name, t in _layer_leaves(3, 4, 8, self.HIDDEN_SIZE, torch.float32).items()}
        return kernels.lstm_sequence_forward(leaves["input"], leaves["h0"], leaves["c0"], leaves["weight_ih"],
                                             leaves["weight_hh"], None, None, False, False, recurrence="grid")

    def _backward(self, kernels):
        """The grid backward launcher on stand-in saved tensors (the fake kernel computes nothing)."""
        steps, batch, input_size, hidden_size = 3, 4, 8, self.HIDDEN_SIZE
        leaves = {name: t.detach() for name, t in _layer_leaves(steps, batch, input_size, hidden_size,
                                                                 torch.float32).items()}
        gates = random_tensor(steps, batch, 4 * hidden_size)
        cell_states, hidden_before = random_tensor(steps + 1, batch, hidden_size), random_tensor(steps, batch, hidden_size)
        return kernels.lstm_sequence_backward(random_tensor(steps, batch, hidden_size), None, None, leaves["input"],
                                              leaves["weight_ih"], leaves["weight_hh"], None, False, gates, cell_states,
                                              hidden_before, recurrence="grid")

    def test_backward_refuses_when_the_compiled_kernel_does_not_fit(self, kernels, gpu_path):
        kernel = gpu_path(_FakeGridKernel(registers=255, shared_bytes=150_000, num_warps=8), "backward")
        with pytest.raises(RuntimeError, match="lstm_sequence_backward: recurrence='grid' cannot launch: the grid "
                                               "recurrence needs its 16 programs resident at once, but sm_90 with 12 "
                                               "SMs holds 12"):
            self._backward(kernels)
        assert len(kernel.warmed) == 1 and kernel.launched == [], "the launcher launched a grid that could hang"

    def test_backward_launches_cooperatively_when_it_fits(self, kernels, launch, gpu_path):
        kernel = gpu_path(_FakeGridKernel(registers=96, shared_bytes=70_000, num_warps=8), "backward")
        self._backward(kernels)
        [(grid, options)] = kernel.launched
        assert grid == (16,) and options["num_warps"] == options["K_SPLIT"] == 4  # fp32 at H_pad 256: 4 warps
        assert options["launch_cooperative_grid"] is True
        assert kernel.warmed == [((16,), options)], "the occupancy was not checked on the kernel that launches"

    def test_backward_dispatch_table_refuses_before_compiling(self, kernels, gpu_path, launch, monkeypatch):
        from pyattn.kernels.lstm import configs

        monkeypatch.setitem(configs.GRID_BACKWARD_COMPILED, (90, "fp32", self.HIDDEN_SIZE), (64, 240_000))
        kernel = gpu_path(_FakeGridKernel(registers=96, shared_bytes=70_000, num_warps=8), "backward")
        with pytest.raises(ValueError, match="recurrence='grid' cannot run this call: weight_hh: hidden size 256"):
            self._backward(kernels)
        assert kernel.warmed == [] and kernel.launched == []

    def test_refuses_when_the_compiled_kernel_does_not_fit(self, kernels, gpu_path):
        # 255 registers × 8 warps fill an SM's register file: 12 SMs hold 12 programs, the grid needs 16.
        kernel = gpu_path(_FakeGridKernel(registers=255, shared_bytes=150_000, num_warps=8))
        with pytest.raises(RuntimeError, match="needs its 16 programs resident at once, but sm_90 with 12 SMs holds 12 "
                                               "\\(255 registers × 8 warps and 150000 bytes"):
            self._forward(kernels)
        assert len(kernel.warmed) == 1 and kernel.launched == [], "the launcher launched a grid that could hang"

    def test_launches_cooperatively_when_it_fits(self, kernels, launch, gpu_path):
        kernel = gpu_path(_FakeGridKernel(registers=96, shared_bytes=70_000, num_warps=8))  # 2 per SM: 24 >= 16
        self._forward(kernels)
        [(grid, options)] = kernel.launched
        assert grid == (16,) and options["num_warps"] == 8 and options["K_SPLIT"] == 8
        # Triton has launched cooperatively since 3.3; the installed one must (the GPU machine runs 3.6).
        assert launch._cooperative_launch_supported()
        assert options["launch_cooperative_grid"] is True
        assert kernel.warmed == [((16,), options)], "the occupancy was not checked on the kernel that launches"

    def test_dispatch_table_refuses_before_compiling(self, kernels, gpu_path, launch, monkeypatch):
        monkeypatch.setattr(launch, "_sm_resources", lambda device: launch.SmResources.for_arch(90, 2))
        kernel = gpu_path(_FakeGridKernel(registers=96, shared_bytes=70_000, num_warps=8))
        with pytest.raises(ValueError, match="recurrence='grid' cannot run this call: weight_hh: hidden size 256"):
            self._forward(kernels)
        assert kernel.warmed == [] and kernel.launched == []

    def test_explain_gives_the_occupancy_reason(self, monkeypatch):
        """For an assumed GPU, dispatch applies the same rule to the compile report's figures: explain says why
        the grid kernel is not chosen when the GPU cannot hold every program."""
        import dataclasses

        from pyattn import _registry

        lstm = pyattn.nn.LSTM(768, 768).to("meta", torch.bfloat16)
        x = torch.empty(64, 16, 768, device="meta", dtype=torch.bfloat16)
        if pyattn.backend_status()["triton"].startswith("triton is not installed"):
            pytest.skip("triton is not installed")
        text = pyattn.explain(lstm, x, assume="sm_90")
        assert "triton/grid        serves" in text, text
        small = dataclasses.replace(_registry.ASSUMABLE_TARGETS["sm_90"], sm_count=40)
        monkeypatch.setitem(_registry.ASSUMABLE_TARGETS, "sm_90", small)
        text = pyattn.explain(lstm, x, assume="sm_90")
        line = next(line for line in text.splitlines() if line.strip().startswith("triton/grid"))
        assert "no: weight_hh: hidden size 768: the grid recurrence needs its 48 programs resident at once, but " \
               "sm_90 with 40 SMs holds 40" in line, text
        assert "auto picks: triton/grid" not in text


def _gpu_tolerance(dtype, torch_error: float) -> float:
    """flash-attention's rule on GPU: within RTOL, or within 2× PyTorch's own error in that dtype.

    Capped at 4× RTOL so that a baseline gone wrong cannot loosen the bound without limit.
    """
    return min(max(RTOL[dtype], 2.0 * torch_error), 4.0 * RTOL[dtype])


def _cudnn_layer(leaves: dict, reverse: bool, upstream: list) -> tuple[list, dict]:
    """torch.nn.LSTM (cuDNN) in the leaves' dtype on the same values: outputs and input/state/weight grads.

    cuDNN carries h in the input dtype between steps, as the kernels do, so it is PyTorch's own error
    in that dtype for flash-attention's 2× rule (the float32-internal reference is stricter).
    """
    input_size, hidden_size = leaves["weight_ih"].shape[1], leaves["weight_hh"].shape[1]
    module = torch.nn.LSTM(input_size, hidden_size).to(device=leaves["input"].device, dtype=leaves["input"].dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(module, f"{name}_l0").copy_(leaves[name])
    state = {name: leaves[name].detach().clone().requires_grad_() for name in ("input", "h0", "c0")}
    sequence = state["input"].flip(0) if reverse else state["input"]
    output, (h_n, c_n) = module(sequence, (state["h0"][None], state["c0"][None]))
    outputs = [output.flip(0) if reverse else output, h_n[0], c_n[0]]
    dtype = leaves["input"].dtype
    torch.autograd.backward(outputs, [grad.to(dtype) for grad in upstream])
    grads = {name: tensor.grad for name, tensor in state.items()}
    grads.update({name: getattr(module, f"{name}_l0").grad for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    return outputs, grads


@pytest.mark.requires_cuda
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    @pytest.mark.parametrize("batch,input_size,hidden_size", [(16, 96, 40), (70, 200, 256), (5, 64, 768)])
    def test_cell(self, poisoned_allocations, dtype, batch, input_size, hidden_size):
        device = "cuda"
        leaves = {
            "input": random_tensor(batch, input_size, dtype=dtype, device=device, requires_grad=True),
            "hx": random_tensor(batch, hidden_size, dtype=dtype, device=device, requires_grad=True),
            "cx": random_tensor(batch, hidden_size, dtype=dtype, device=device, requires_grad=True),
            **_make_weights(input_size, hidden_size, dtype, device, "both"),
        }
        _check_outputs_and_gradients(
            lambda t: _triton_op("lstm_cell", dtype, device)(**t), lambda t: reference.lstm_cell(**t), leaves, dtype,
            ["hy", "cy"],
        )

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    @pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
    @pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
    @pytest.mark.parametrize("steps,batch,input_size,hidden_size", [(33, 16, 96, 40), (17, 70, 200, 256), (9, 5, 64, 768)])
    def test_layer(self, kernels, poisoned_allocations, recurrence, dtype, reverse, ragged, steps, batch, input_size, hidden_size):
        reason = kernels.persistent_unsupported_reason(hidden_size, dtype)
        if recurrence == "persistent" and reason is not None:
            pytest.skip(f"the persistent kernel cannot run this call: {reason}")
        device = "cuda"
        lengths = torch.randint(0, steps + 1, (batch,), device=device) if ragged else None
        leaves = {
            "input": random_tensor(steps, batch, input_size, dtype=dtype, device=device, requires_grad=True),
            "h0": random_tensor(batch, hidden_size, dtype=dtype, device=device, requires_grad=True),
            "c0": random_tensor(batch, hidden_size, dtype=dtype, device=device, requires_grad=True),
            **_make_weights(input_size, hidden_size, dtype, device, "both"),
        }
        features = {"lengths"} if ragged else set()
        lstm_layer = _triton_op("lstm_layer", dtype, device, features)
        outputs = lstm_layer(**leaves, reverse=reverse, lengths=lengths)
        reference_leaves = _float64(leaves)
        reference_outputs = reference.lstm_layer(**reference_leaves, reverse=reverse, lengths=lengths)
        torch_outputs = reference.lstm_layer(**leaves, reverse=reverse, lengths=lengths)
        upstream = [random_tensor(*out.shape, dtype=torch.float64, device=device) for out in outputs]
        torch.autograd.backward(outputs, [grad.to(dtype) for grad in upstream])
        triton_grads = {name: leaf.grad.clone() for name, leaf in leaves.items()}
        for leaf in leaves.values():
            leaf.grad = None
        torch.autograd.backward(torch_outputs, [grad.to(dtype) for grad in upstream])
        torch.autograd.backward(reference_outputs, upstream)
        output_names = ["output", "h_n", "c_n"]
        # PyTorch's own error in this dtype: its reference, and cuDNN where it serves the call.
        torch_errors = {name: relative_error(out, ref) for name, out, ref in zip(output_names, torch_outputs, reference_outputs)}
        torch_errors.update({name: relative_error(leaf.grad, reference_leaves[name].grad) for name, leaf in leaves.items()})
        if not ragged and dtype != torch.float32:
            cudnn_outputs, cudnn_grads = _cudnn_layer(leaves, reverse, upstream)
            for name, out, ref in zip(output_names, cudnn_outputs, reference_outputs):
                torch_errors[name] = max(torch_errors[name], relative_error(out, ref))
            for name, grad in cudnn_grads.items():
                torch_errors[name] = max(torch_errors[name], relative_error(grad, reference_leaves[name].grad))
        for name, out, ref in zip(output_names, outputs, reference_outputs):
            assert_close(out, ref, _gpu_tolerance(dtype, torch_errors[name]), name)
        for name in leaves:
            ref_grad = reference_leaves[name].grad
            rtol = _gpu_tolerance(dtype, torch_errors[name])
            assert_close(triton_grads[name], ref_grad, rtol, f"grad of {name}")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    @pytest.mark.parametrize("batch", [1, 8, 16, 40, 48])
    @pytest.mark.parametrize("hidden_size", [256, 512, 1024])
    @pytest.mark.parametrize("reverse,ragged", [(False, False), (True, True)], ids=["forward-dense", "reverse-ragged"])
    def test_layer_grid(self, kernels, launch, poisoned_allocations, grid_recurrence, dtype, batch, hidden_size, reverse,
                        ragged):
        """The grid-barrier forward and backward with a real multi-program grid (hidden tiles across SMs), batches of
        more than 16 rows as tiles, gradients included."""
        device, steps, input_size = "cuda", 64, 128
        programs = kernels.grid_programs(hidden_size, interpreter=False)
        if programs > torch.cuda.get_device_properties(device).multi_processor_count:
            pytest.skip(f"H={hidden_size} needs {programs} co-resident programs, more than this GPU's SMs")
        if kernels.hidden_pad(hidden_size) <= kernels.GRID_MAX_HIDDEN[dtype]:
            reason = kernels.grid_unsupported_reason(batch, hidden_size, dtype, device=launch._sm_resources(device))
            assert reason is None, reason
            reason = kernels.grid_backward_unsupported_reason(batch, hidden_size, dtype,
                                                              device=launch._sm_resources(device))
            assert reason is None, reason
        lengths = torch.randint(0, steps + 1, (batch,), device=device) if ragged else None
        leaves = _layer_leaves(steps, batch, input_size, hidden_size, dtype, device)
        lstm_layer = _triton_op("lstm_layer", dtype, device, {"lengths"} if ragged else set())
        if kernels.hidden_pad(hidden_size) > kernels.GRID_MAX_HIDDEN[dtype]:
            # fp32 H ≥ 512: past the no-spill limit (GRID_MAX_HIDDEN); a clear error, no launch.
            with pytest.raises(BackendUnavailableError, match="weight_hh"):
                lstm_layer(**leaves, reverse=reverse, lengths=lengths)
            assert grid_recurrence == []
            return
        outputs = lstm_layer(**leaves, reverse=reverse, lengths=lengths)
        assert grid_recurrence == [("forward", (programs,))], "the grid kernel did not run"
        reference_leaves = _float64(leaves)
        reference_outputs = reference.lstm_layer(**reference_leaves, reverse=reverse, lengths=lengths)
        torch_outputs = reference.lstm_layer(**leaves, reverse=reverse, lengths=lengths)
        upstream = [random_tensor(*out.shape, dtype=torch.float64, device=device) for out in outputs]
        torch.autograd.backward(outputs, [grad.to(dtype) for grad in upstream])
        assert grid_recurrence == [("forward", (programs,)), ("backward", (programs,))], "no grid backward"
        triton_grads = {name: leaf.grad.clone() for name, leaf in leaves.items()}
        for leaf in leaves.values():
            leaf.grad = None
        torch.autograd.backward(torch_outputs, [grad.to(dtype) for grad in upstream])
        torch.autograd.backward(reference_outputs, upstream)
        for name, out, torch_out, ref in zip(["output", "h_n", "c_n"], outputs, torch_outputs, reference_outputs):
            assert_close(out, ref, _gpu_tolerance(dtype, relative_error(torch_out, ref)), name)
        for name, leaf in leaves.items():
            ref_grad = reference_leaves[name].grad
            rtol = _gpu_tolerance(dtype, relative_error(leaf.grad, ref_grad))
            assert_close(triton_grads[name], ref_grad, rtol, f"grad of {name}")

    def test_auto_picks_grid(self, kernels, launch, monkeypatch):
        """B=16, H=768 in fp16: past the register-resident kernel, so the triton backend takes the grid kernel
        given 48 SMs (dispatch tries persistent, grid, stepwise in that order); in training (B = 40: three batch
        tiles) its backward is the grid backward."""
        device = torch.device("cuda")
        needed = kernels.grid_programs(768, interpreter=False)
        assert needed == 48
        gpu = launch._sm_resources(device)
        if gpu.sm_count < needed:
            pytest.skip(f"needs {needed} SMs")
        assert kernels.persistent_unsupported_reason(768, torch.float16) is not None
        assert kernels.grid_unsupported_reason(16, 768, torch.float16, device=gpu) is None
        assert kernels.grid_unsupported_reason(49, 768, torch.float16, device=gpu) is not None
        assert kernels.grid_backward_unsupported_reason(40, 768, torch.float16, device=gpu) is None
        assert kernels.persistent_unsupported_reason(128, torch.float16) is None
        launched = _record_grid_launches(monkeypatch, launch)
        leaves = _layer_leaves(8, 16, 32, 768, torch.float16, "cuda")
        with torch.no_grad():
            output, _, _ = _triton_op("lstm_layer", torch.float16, "cuda")(**leaves)
        assert launched == [("forward", (needed,))]
        reference_output, _, _ = reference.lstm_layer(**_float64(leaves))
        assert_close(output, reference_output, RTOL[torch.float16], "output")
        launched.clear()
        leaves = _layer_leaves(8, 40, 32, 768, torch.float16, "cuda")
        outputs = _triton_op("lstm_layer", torch.float16, "cuda")(**leaves)
        sum(out.float().sum() for out in outputs).backward()
        assert launched == [("forward", (needed,)), ("backward", (needed,))]
