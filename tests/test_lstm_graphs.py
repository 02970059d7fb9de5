"""No per-step launches on any LSTM path ``auto`` may take: the stepwise loops replay as one CUDA graph.

Launches are counted at the launcher layer: every Triton kernel object of ``pyattn.kernels.lstm.launch`` is
wrapped by a counter, the CUDA extension's layer ops by CPU stand-ins that count what the C++ launcher launches
(T step kernels per stepwise call), and a fake graph backend (:class:`FakeGraphs`) stands in for CUDA graphs on
CPU: its capture runs the call once and records the launches it made; a replay reruns the call with the counter
paused (so its results are real, and the static-buffer copies are checked against the reference) and counts one
launch. Then, for every kernel variant of ``lstm`` registered with dispatch (so a new one is covered once
registered), forward and backward, the launches per call at T = 3 and T = 9 must be equal.

Plain process: the graph runner itself and the cuda variants (on the stand-ins); interpreter process
(``TRITON_INTERPRET=1 -m interpreter``): the triton variants' real kernels.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch

import pyattn
from pyattn import _dispatch, _registry
from pyattn.ops import graphs
from pyattn.reference import lstm as reference
from tests.conftest import RTOL, assert_close, random_tensor


class LaunchCounter:
    def __init__(self):
        self.launches = collections.Counter()
        self.paused = False

    def count(self, name: str, number: int = 1) -> None:
        if not self.paused:
            self.launches[name] += number

    @contextlib.contextmanager
    def pause(self):
        self.paused, before = True, self.paused
        try:
            yield
        finally:
            self.paused = before

    def total(self) -> int:
        return sum(self.launches.values())


class FakeGraph:
    def __init__(self, function, outputs, counter: LaunchCounter, recorded: int):
        self.function, self.outputs, self.counter, self.recorded = function, outputs, counter, recorded
        self.released = False

    def replay(self):
        assert not self.released, "a released graph was replayed"
        with self.counter.pause(), torch.no_grad():
            fresh = self.function()
        for static, value in zip(self.outputs, fresh):
            static.copy_(value)  # a replay rewrites the same static outputs
        self.counter.count("graph replay")

    def release(self):
        self.released = True


class FakeGraphs:
    """CUDA graphs on ``device_type`` tensors: capture runs the call (recording its launches), replay reruns it."""

    def __init__(self, counter: LaunchCounter, device_type: str = "cpu"):
        self.counter, self.device_type = counter, device_type
        self.captured: list[FakeGraph] = []
        self.capturing_now = False
        self.fail_capture = False
        self.memory = 2**40  # the device's memory, for the cache's budget
        self.pool_growth = 0  # what a capture adds to the allocator's reserve (beyond the outputs)
        self.reserved = 0

    def applies(self, device):
        return device.type == self.device_type

    def capturing(self, device):
        return self.capturing_now

    def stream(self, device):
        return 0

    def capture(self, device, function):
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        before = self.counter.total()
        outputs = function()
        graph = FakeGraph(function, outputs, self.counter, self.counter.total() - before)
        self.captured.append(graph)
        self.reserved += self.pool_growth
        return graph, outputs

    def pool_bytes(self, device):
        return self.reserved

    def total_memory(self, device):
        return self.memory


@pytest.fixture
def counter():
    return LaunchCounter()


@pytest.fixture
def fake_graphs(monkeypatch, counter):
    graphs.clear()
    _registry.clear_notes()
    fake = FakeGraphs(counter)
    monkeypatch.setattr(graphs, "backend", fake)
    yield fake
    graphs.clear()
    _registry.clear_notes()  # later tests read explain's last line


# ------------------------------------------------------------------------------------ the runner itself


def _affine(x, bias, weight):
    return (x @ weight + bias, (x * 2).sum(0))


def _run_affine(x, bias, weight, options=()):
    return graphs.run("affine", _affine, (x, bias), (weight,), options)


def test_first_call_eager_second_captures_then_replays(fake_graphs, counter):
    weight = torch.randn(4, 3)
    for call in range(5):
        x, bias = torch.randn(2, 4), torch.randn(3)
        out, total = _run_affine(x, bias, weight)
        torch.testing.assert_close(out, x @ weight + bias)
        torch.testing.assert_close(total, (x * 2).sum(0))
        assert len(fake_graphs.captured) == (0 if call == 0 else 1), f"call {call}"
        assert counter.launches["graph replay"] == max(call - 1, 0), f"call {call}"
    graph = fake_graphs.captured[0]
    # Fresh outputs: nothing the caller holds is a static output a later replay rewrites.
    out, _ = _run_affine(torch.randn(2, 4), torch.randn(3), weight)
    assert out.data_ptr() != graph.outputs[0].data_ptr()
    kept = out.clone()
    _run_affine(torch.randn(2, 4), torch.randn(3), weight)
    torch.testing.assert_close(out, kept)


def test_weights_are_read_at_their_address(fake_graphs):
    weight = torch.randn(4, 3)
    x, bias = torch.randn(2, 4), torch.randn(3)
    for _ in range(3):
        _run_affine(x, bias, weight)
    with torch.no_grad():
        weight.mul_(-3)  # an optimizer step: same tensor, new values, seen by the next replay
    torch.testing.assert_close(_run_affine(x, bias, weight)[0], x @ weight + bias)
    assert len(fake_graphs.captured) == 1
    other = weight.clone()  # same shape, another address: another key (eager first)
    torch.testing.assert_close(_run_affine(x, bias, other)[0], x @ other + bias)
    assert len(fake_graphs.captured) == 1 and graphs.cached_graphs() == 1


def test_key_holds_shapes_strides_dtypes_and_options(fake_graphs):
    weight = torch.randn(4, 3)
    calls = [
        lambda: _run_affine(torch.randn(2, 4), torch.randn(3), weight),
        lambda: _run_affine(torch.randn(5, 4), torch.randn(3), weight),  # shape
        lambda: _run_affine(torch.randn(4, 2).t(), torch.randn(3), weight),  # strides
        lambda: _run_affine(torch.randn(2, 4), torch.randn(3), weight, options=(True,)),  # options
    ]
    for call in calls:
        call()
    assert fake_graphs.captured == []  # each was a first call
    for call in calls:
        call()
    assert len(fake_graphs.captured) == 4


def test_cache_is_bounded_and_evicts_the_least_recently_used(fake_graphs, monkeypatch):
    monkeypatch.setattr(graphs, "CACHE_SIZE", 2)
    weight = torch.randn(4, 3)
    for rows in (1, 2, 3):
        for _ in range(2):
            _run_affine(torch.randn(rows, 4), torch.randn(3), weight)
    assert graphs.cached_graphs() == 2
    assert [graph.released for graph in fake_graphs.captured] == [True, False, False]


def test_cache_holds_at_most_its_share_of_device_memory(fake_graphs, monkeypatch):
    # Each graph holds 64 KiB of static x (+ 4 B of bias) and a 32 KiB pool (more than its 16 KiB of
    # outputs): a budget of 200 KiB keeps two of them, not three.
    monkeypatch.setattr(graphs, "CACHE_MEMORY_FRACTION", 0.5)
    fake_graphs.memory, fake_graphs.pool_growth = 400 * 2**10, 32 * 2**10
    weight = torch.randn(4096, 1)
    for shift in range(3):
        x = torch.randn(4, 4096)
        for _ in range(2):
            _run_affine(x, torch.randn(1), weight, options=(shift,))
    assert graphs.cached_graphs() == 2 and graphs.cached_bytes() == 2 * ((64 + 32) * 2**10 + 4)
    assert [graph.released for graph in fake_graphs.captured] == [True, False, False]


def test_a_call_over_the_cache_budget_stays_eager_with_a_note(fake_graphs, counter):
    fake_graphs.memory = 10 * 2**20  # budget: 1 MiB; x alone is 4 MiB
    x, bias, weight = torch.randn(1024, 1024), torch.randn(3), torch.randn(1024, 3)
    expected = _affine(x, bias, weight)
    for _ in range(3):
        torch.testing.assert_close(_run_affine(x, bias, weight), expected)
    assert fake_graphs.captured == [] and graphs.cached_graphs() == 0
    assert any("not captured" in note and "exceeds the graph cache's budget" in note for note in graphs.notes())


def test_a_graph_whose_pool_outgrows_the_budget_is_released(fake_graphs):
    fake_graphs.memory, fake_graphs.pool_growth = 10 * 2**20, 2 * 2**20  # budget 1 MiB; the pool alone 2 MiB
    x, bias, weight = torch.randn(8, 4), torch.randn(3), torch.randn(4, 3)
    for _ in range(3):
        torch.testing.assert_close(_run_affine(x, bias, weight), _affine(x, bias, weight))
    assert [graph.released for graph in fake_graphs.captured] == [True] and graphs.cached_graphs() == 0
    assert any("captured graph released" in note for note in graphs.notes())


def test_capture_failure_runs_eagerly_and_is_noted(fake_graphs, counter):
    fake_graphs.fail_capture = True
    weight = torch.randn(4, 3)
    for _ in range(4):
        x, bias = torch.randn(2, 4), torch.randn(3)
        torch.testing.assert_close(_run_affine(x, bias, weight)[0], x @ weight + bias)
    assert fake_graphs.captured == [] and counter.launches["graph replay"] == 0
    [note] = graphs.notes()
    assert "affine: CUDA-graph capture failed, the call runs eagerly" in note
    assert "operation not permitted" in note
    request = _dispatch.Request(op="lstm", device=torch.device("cpu"), dtype=torch.float32,
                                sizes=dict(batch=2, hidden_size=8))
    assert f"  note: {note}" in _dispatch.explain_request(request).splitlines()  # pyattn.explain shows it


@pytest.mark.parametrize("situation", ["compiling", "capturing", "inference_mode"])
def test_eager_where_a_graph_must_not_be_made(fake_graphs, monkeypatch, situation):
    if situation == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif situation == "capturing":
        fake_graphs.capturing_now = True  # the caller's own graph (or torch.compile's cudagraphs) is recording
    seen = []

    def function(x, weight):
        seen.append(x)
        return (x @ weight,)

    context = torch.inference_mode() if situation == "inference_mode" else contextlib.nullcontext()
    with context:
        x, weight = torch.randn(2, 4), torch.randn(4, 3)
        for _ in range(3):
            graphs.run("eager", function, (x,), (weight,))
    assert fake_graphs.captured == []
    assert all(value is x for value in seen), "an eager call must get the caller's own tensors"


def test_stay_eager_keeps_a_key_out_of_capture(fake_graphs):
    weight = torch.randn(4, 3)
    for _ in range(3):
        graphs.run("affine", _affine, (torch.randn(2, 4), torch.randn(3)), (weight,), stay_eager=lambda: True)
    assert fake_graphs.captured == []


def test_host_tensors_of_a_device_call_are_keyed_by_value(monkeypatch, counter):
    """A CPU tensor in a call on another device can steer launches (a host-side size list): its values are in the
    key, so a replay never runs a graph captured for other values. (The fake backend graphs "meta" calls.)"""
    graphs.clear()
    fake = FakeGraphs(counter, device_type="meta")
    monkeypatch.setattr(graphs, "backend", fake)

    def function(x, sizes):
        return (x[: int(sizes.sum())].clone(),)

    x = torch.empty(8, 3, device="meta")
    try:
        for sizes in ([1, 2], [1, 2], [1, 2], [2, 2], [2, 2]):
            out, = graphs.run("sizes", function, (x, torch.tensor(sizes)))
            assert out.shape == (sum(sizes), 3)
        assert len(fake.captured) == 2
    finally:
        graphs.clear()


# ------------------------------------------------------------------------------- launches per LSTM call

STEPS = (3, 9)
KERNEL_BACKENDS = ("triton", "cuda")
# Shapes a variant may serve, tried in order: (batch, input_size, hidden_size, proj_size).
CANDIDATE_SHAPES = [(2, 4, 8, 0), (3, 5, 24, 0), (2, 4, 40, 0)]
PROJECTION_SHAPE = (2, 4, 8, 4)


def _lstm_variants(backend: str) -> list:
    return [v for v in _registry.variants("lstm") if v.backend == backend]


def _shape_for(variant, device: str, dtype, projection: bool):
    """The first candidate shape dispatch lets ``variant`` serve when forced (None: none)."""
    candidates = [PROJECTION_SHAPE] if projection else CANDIDATE_SHAPES
    for batch, input_size, hidden_size, proj_size in candidates:
        request = _dispatch.Request(
            op="lstm", device=torch.device(device), dtype=dtype,
            features=frozenset({"projection"} if proj_size else ()),
            sizes=dict(batch=batch, hidden_size=hidden_size, proj_size=proj_size, input_size=input_size),
        )
        try:
            chosen = _dispatch.choose(request, variant.qualified_name)
        except _dispatch.BackendUnavailableError:
            continue
        if chosen.qualified_name == variant.qualified_name:
            return batch, input_size, hidden_size, proj_size
    return None


def _layer_leaves(steps, batch, input_size, hidden_size, proj_size, dtype=torch.float32):
    state = proj_size or hidden_size
    scale = hidden_size ** -0.5
    leaves = {
        "input": random_tensor(steps, batch, input_size, dtype=dtype, requires_grad=True),
        "h0": random_tensor(batch, state, dtype=dtype, requires_grad=True),
        "c0": random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True),
        "weight_ih": random_tensor(4 * hidden_size, input_size, dtype=dtype, scale=scale, requires_grad=True),
        "weight_hh": random_tensor(4 * hidden_size, state, dtype=dtype, scale=scale, requires_grad=True),
        "bias_ih": random_tensor(4 * hidden_size, dtype=dtype, scale=0.5, requires_grad=True),
        "bias_hh": random_tensor(4 * hidden_size, dtype=dtype, scale=0.5, requires_grad=True),
        "weight_hr": (random_tensor(proj_size, hidden_size, dtype=dtype, scale=scale, requires_grad=True)
                      if proj_size else None),
    }
    return leaves


def _launches_per_call(layer, counter, steps, shape, calls=3):
    """(forward, backward) launches of the last of ``calls`` calls, each on fresh inputs (the weights stay, as in
    training), every result checked against the float64 reference."""
    batch, input_size, hidden_size, proj_size = shape
    leaves = _layer_leaves(steps, batch, input_size, hidden_size, proj_size)
    weights = {name: leaves[name] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
    for call in range(calls):
        for name in ("input", "h0", "c0"):
            leaves[name] = random_tensor(*leaves[name].shape, requires_grad=True)
        for weight in weights.values():
            if weight is not None:
                weight.grad = None
        arguments = [leaves[name] for name in ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                               "weight_hr")]
        before = counter.total()
        outputs = layer(*arguments, False, None)
        forward = counter.total() - before
        upstream = [random_tensor(*out.shape) for out in outputs]
        before = counter.total()
        torch.autograd.backward(outputs, upstream)
        backward = counter.total() - before

        reference_leaves = {name: None if t is None else t.detach().double().requires_grad_() for name, t in
                            leaves.items()}
        expected = reference.lstm_layer(**reference_leaves)
        torch.autograd.backward(expected, [grad.double() for grad in upstream])
        for name, out, ref in zip(("output", "h_n", "c_n"), outputs, expected):
            assert_close(out, ref, RTOL[torch.float32], f"{name} (call {call}, T={steps})")
        for name, leaf in leaves.items():
            if leaf is not None:
                assert_close(leaf.grad, reference_leaves[name].grad, RTOL[torch.float32],
                             f"grad of {name} (call {call}, T={steps})")
    return forward, backward


def _check_launches_do_not_grow_with_steps(layer, counter, shape, name):
    counts = {steps: _launches_per_call(layer, counter, steps, shape) for steps in STEPS}
    (short, long) = (counts[steps] for steps in STEPS)
    assert short[0] == long[0], f"{name}: forward launches per call grow with T: {counts}"
    assert short[1] == long[1], f"{name}: backward launches per call grow with T: {counts}"
    assert max(short) <= 4, f"{name}: {counts}"  # one recurrence launch (or one replay) and a few constant ones
    assert min(short) >= 1, f"{name}: no launch counted: {counts}"  # the counters see the launches at all
    return counts


# ---- cuda variants on CPU stand-ins (plain process) ----


def _stand_in_kernels(counter):
    """The CUDA layer ops on CPU, modelled in torch (tests/test_lstm_cuda.py's stand-ins), counting what the C++
    launcher launches: T step kernels per stepwise call (forward or backward), one persistent kernel otherwise."""
    from tests.test_lstm_cuda import _model_layer_bwd, _model_layer_fwd

    def step_launches(steps, recurrence, weight_hr):
        return steps * (2 if weight_hr is not None else 1) if recurrence == "stepwise" else 1

    def forward(*args):
        counter.count("cuda layer forward", step_launches(args[0].shape[0], args[10], (*args, None)[11]))
        return _model_layer_fwd(*args)

    def backward(*args):
        counter.count("cuda layer backward", step_launches(args[3].shape[0], args[13], (*args, None)[14]))
        return _model_layer_bwd(*args)

    return forward, backward


@pytest.fixture
def cuda_stand_ins(counter, monkeypatch):
    from pyattn.ops import lstm_cuda

    if not lstm_cuda.EXTENSION_OPS_LOADED:
        pytest.skip("the CUDA extension's ops are not loaded (pyattn._C not built)")
    # The stand-ins run on the CPU, where the extension's residency query has no device to ask: it admits.
    monkeypatch.setattr(lstm_cuda, "persistent_launch_refusal", lambda input, c0, weight_hr: None)
    forward, backward = _stand_in_kernels(counter)
    library = torch.library.Library("pyattn", "IMPL")
    library.impl("cuda_lstm_layer_fwd", forward, "CPU")
    library.impl("cuda_lstm_layer_bwd", backward, "CPU")
    yield
    library._destroy()


def _cuda_layer(variant):
    layer = variant.implementation.layer

    def run(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths):
        return layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths)

    return run


def _cases(backend: str, projection: bool = True) -> list:
    cases = []
    for variant in _lstm_variants(backend):
        cases.append(pytest.param(variant.qualified_name, False, id=variant.qualified_name))
        if projection and "projection" in variant.support.features:
            cases.append(pytest.param(variant.qualified_name, True, id=f"{variant.qualified_name}-projection"))
    return cases


# The CPU stand-ins model no projection (the emulated kernels of test_lstm_cuda.py do).
@pytest.mark.parametrize(("variant_name", "projection"), _cases("cuda", projection=False))
def test_cuda_variant_launches_do_not_grow_with_steps(cuda_stand_ins, fake_graphs, counter, variant_name,
                                                      projection):
    variant = next(v for v in _lstm_variants("cuda") if v.qualified_name == variant_name)
    shape = PROJECTION_SHAPE if projection else CANDIDATE_SHAPES[0]
    counts = _check_launches_do_not_grow_with_steps(_cuda_layer(variant), counter, shape, variant_name)
    if variant.name == "stepwise":
        # Per step in eager mode: served by one replay, the step launches recorded in the captured graph.
        assert counts[3] == (1, 1), counts
        assert counter.launches["graph replay"] > 0
        assert sorted({graph.recorded for graph in fake_graphs.captured}) == sorted(
            {steps * (2 if projection else 1) for steps in STEPS})


def test_cuda_stepwise_is_eager_without_graphs(cuda_stand_ins, counter):
    """Off a CUDA target (the real backend: this CPU), the stepwise call is the op itself, T launches."""
    shape = CANDIDATE_SHAPES[0]
    layer = _cuda_layer(next(v for v in _lstm_variants("cuda") if v.name == "stepwise"))
    for steps in STEPS:
        forward, backward = _launches_per_call(layer, counter, steps, shape, calls=2)
        assert (forward, backward) == (steps, steps)


# ---- triton variants on the interpreter ----


@pytest.fixture
def counted_triton_kernels(monkeypatch, counter):
    """Every Triton kernel object in the namespace of every module of ``pyattn.kernels.lstm`` (the launchers
    launch through those names: launch.py, and any other launcher module such as a packed-rows one)."""
    import importlib
    import pkgutil

    from pyattn.kernels import lstm as package

    wrapped = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, kernel in list(vars(module).items()):
            if name.endswith("_kernel") and hasattr(kernel, "__getitem__") and hasattr(kernel, "fn"):
                monkeypatch.setattr(module, name, _CountingKernel(kernel, name, counter))
                wrapped.append(f"{info.name}.{name}")
    assert "launch.lstm_sequence_step_forward_kernel" in wrapped, wrapped
    return wrapped


class _CountingKernel:
    def __init__(self, kernel, name, counter):
        self.kernel, self.name, self.counter = kernel, name, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.counter.count(self.name)
            return launch(*args, **kwargs)

        return counted

    def __getattr__(self, attribute):
        return getattr(self.kernel, attribute)


@pytest.mark.interpreter
@pytest.mark.parametrize(("variant_name", "projection"), _cases("triton"))
def test_triton_variant_launches_do_not_grow_with_steps(counted_triton_kernels, fake_graphs, counter, variant_name,
                                                        projection):
    variant = next(v for v in _lstm_variants("triton") if v.qualified_name == variant_name)
    shape = _shape_for(variant, "cpu", torch.float32, projection)
    assert shape is not None, f"{variant_name} serves none of the candidate shapes: add one it serves"
    with pyattn.use_backend(variant_name):
        counts = _check_launches_do_not_grow_with_steps(variant.implementation.layer, counter, shape, variant_name)
    if variant.name == "stepwise":
        assert counts[3] == (1, 1), counts  # the step loops, forward and backward, each one replay
        assert sorted({graph.recorded for graph in fake_graphs.captured}) == sorted(
            {steps * (2 if projection else 1) for steps in STEPS})


@pytest.mark.interpreter
def test_triton_stepwise_launches_per_step_without_graphs(counted_triton_kernels, counter):
    """The baseline the graphs remove: off a CUDA target (no fake backend) the stepwise loop launches T times."""
    variant = next(v for v in _lstm_variants("triton") if v.name == "stepwise")
    shape = _shape_for(variant, "cpu", torch.float32, False)
    with pyattn.use_backend(variant.qualified_name):
        forward, backward = _launches_per_call(variant.implementation.layer, counter, 3, shape, calls=1)
    assert (forward, backward) == (3, 3)


# ------------------------------------------------- the grid kernel under auto: refused at launch -> stepwise


class _RefusingGridKernel:
    """A grid kernel whose compiled figures cannot be resident (10 MB of shared memory a program): the launcher's
    pre-launch check refuses it; a launch is recorded (none may happen)."""

    def __init__(self):
        from types import SimpleNamespace

        self.compiled = SimpleNamespace(n_regs=64, metadata=SimpleNamespace(shared=10_000_000, num_warps=8))
        self.warmed, self.launched = 0, []

    def warmup(self, *args, grid, **options):
        self.warmed += 1
        return self.compiled

    def __getitem__(self, grid):
        return lambda *args, **options: self.launched.append(grid)


@pytest.fixture
def refusing_grid(monkeypatch):
    """The launcher's GPU path on CPU tensors (the stepwise kernels still run, on the interpreter), a 12-SM sm_90
    whose dispatch-time table admits the grid kernel, and a compiled grid kernel (forward, and backward where there
    is one) that does not fit: the case of a Triton whose registers or shared memory exceed GRID_COMPILED."""
    from pyattn.kernels.lstm import configs, launch

    monkeypatch.setattr(launch, "on_interpreter", lambda device: False)
    monkeypatch.setattr(launch, "_sm_resources", lambda device: launch.SmResources.for_arch(90, 12))
    padded = configs.hidden_pad(GRID_SHAPE[2])
    monkeypatch.setitem(configs.GRID_COMPILED, (90, "fp32", padded), (64, 16384))
    if hasattr(configs, "GRID_BACKWARD_COMPILED"):
        monkeypatch.setitem(configs.GRID_BACKWARD_COMPILED, (90, "fp32", padded), (64, 16384))
    kernels = {}
    for name in ("lstm_sequence_forward_grid_kernel", "lstm_sequence_backward_grid_kernel"):
        if hasattr(launch, name):
            kernels[name] = _RefusingGridKernel()
            monkeypatch.setattr(launch, name, kernels[name])
    _registry.clear_notes()
    yield kernels
    _registry.clear_notes()


GRID_SHAPE = (2, 4, 16, 0)  # batch, input size, hidden size, proj size: one grid program


def _grid_variant():
    return next(v for v in _registry.variants("lstm") if v.qualified_name == "triton/grid")


@pytest.mark.interpreter
def test_auto_grid_refused_by_its_compiled_kernel_runs_stepwise_with_a_note(refusing_grid, fake_graphs, counter,
                                                                            counted_triton_kernels):
    auto_form = _registry.auto_form(_grid_variant())
    assert auto_form.implementation is not _grid_variant().implementation
    counts = _check_launches_do_not_grow_with_steps(auto_form.implementation.layer, counter, GRID_SHAPE, "auto grid")
    assert all(kernel.launched == [] for kernel in refusing_grid.values()), "a grid that cannot be resident launched"
    assert refusing_grid["lstm_sequence_forward_grid_kernel"].warmed > 0, "the compiled kernel was not checked"
    assert counts[3][0] == 1, counts  # the stepwise fallback of a seen key: one replay
    notes = _registry.notes("lstm")
    assert any("triton/grid: lstm_sequence_forward: recurrence='grid' cannot launch: the grid recurrence needs its "
               "1 programs resident at once" in note and "auto ran the call on the stepwise kernels" in note
               for note in notes), notes
    request = _dispatch.Request(op="lstm", device=torch.device("cpu"), dtype=torch.float32,
                                sizes=dict(batch=2, hidden_size=16))
    text = _dispatch.explain_request(request)
    assert "note: triton/grid: lstm_sequence_forward: recurrence='grid' cannot launch" in text, text


@pytest.mark.interpreter
def test_forced_grid_refused_by_its_compiled_kernel_raises(refusing_grid):
    batch, input_size, hidden_size, proj_size = GRID_SHAPE
    leaves = _layer_leaves(3, batch, input_size, hidden_size, proj_size)
    arguments = [leaves[name] for name in ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                           "weight_hr")]
    with pyattn.use_backend("triton/grid"), pytest.raises(
            _dispatch.BackendUnavailableError,
            match="pyattn backend 'triton/grid' cannot serve this call: lstm_sequence_forward: recurrence='grid' "
                  "cannot launch: the grid recurrence needs its 1 programs resident at once, but sm_90 with 12 SMs "
                  "holds 0"):
        _grid_variant().implementation.layer(*arguments, False, None)
    assert refusing_grid["lstm_sequence_forward_grid_kernel"].launched == []
    assert _registry.notes("lstm") == [], "a forced call must not fall back"


def test_auto_gets_the_grid_variant_auto_form_and_a_forced_name_the_plain_one(monkeypatch):
    """dispatch hands auto the variant's auto_implementation (falls back at launch) and a forced name the plain one
    (raises at launch): the grid kernel and the CUDA persistent kernels are the ones registered with one."""
    monkeypatch.setattr(_dispatch, "backend_unavailable_reason",
                        lambda backend, assumed=False: "off in this test" if backend == "cuda" else None)
    request = _dispatch.Request(op="lstm", device=torch.device("cuda"), dtype=torch.float16,
                                sizes=dict(batch=16, hidden_size=768))
    grid = _grid_variant()
    chosen = _dispatch.choose(request, assume="sm_90")
    assert chosen.qualified_name == "triton/grid", _dispatch.explain_request(request, assume="sm_90")
    assert chosen.implementation is _registry.auto_form(grid).implementation
    assert chosen.implementation is not grid.implementation and chosen == grid
    with pyattn.use_backend("triton/grid"):
        assert _dispatch.choose(request, assume="sm_90").implementation is grid.implementation
    assert _dispatch.choose(request, "triton", assume="sm_90").implementation is grid.implementation
    with_auto = [v.qualified_name for v in _registry.variants("lstm") if v.auto_implementation is not None]
    assert with_auto == ["cuda/persistent", "triton/grid"]


def test_grid_is_never_chosen_without_the_occupancy_check_passing(monkeypatch):
    """Dispatch's occupancy rule gates triton/grid on every GPU it may run on: with the SMs too few for its
    programs, or no compiled figures for the architecture, it is refused with the reason and auto goes on."""
    import dataclasses

    from pyattn.kernels.lstm import configs

    monkeypatch.setattr(_dispatch, "backend_unavailable_reason",
                        lambda backend, assumed=False: "off in this test" if backend == "cuda" else None)
    request = _dispatch.Request(op="lstm", device=torch.device("cuda"), dtype=torch.float16,
                                sizes=dict(batch=16, hidden_size=768))
    assert _dispatch.choose(request, assume="sm_90").qualified_name == "triton/grid"
    few = dataclasses.replace(_registry.ASSUMABLE_TARGETS["sm_90"], sm_count=40)  # 48 programs needed
    monkeypatch.setitem(_registry.ASSUMABLE_TARGETS, "sm_90", few)
    assert _dispatch.choose(request, assume="sm_90").qualified_name == "triton/stepwise"
    assert "resident at once" in _dispatch.explain_request(request, assume="sm_90")
    monkeypatch.undo()
    monkeypatch.setattr(_dispatch, "backend_unavailable_reason",
                        lambda backend, assumed=False: "off in this test" if backend == "cuda" else None)
    for key in [key for key in configs.GRID_COMPILED if key[0] == 90]:
        monkeypatch.delitem(configs.GRID_COMPILED, key)
    assert _dispatch.choose(request, assume="sm_90").qualified_name == "triton/stepwise"
    assert "no compiled figures of the grid" in _dispatch.explain_request(request, assume="sm_90")


# ------------------------------------------------------------- a ragged PackedSequence through the whole stack


def _packed_launches_per_call(lstm, counter, steps, hidden_size, proj_size, calls=3):
    """(forward, backward) launches of the last of ``calls`` calls of the dispatch-level ``lstm`` on a ragged
    PackedSequence (lengths T, T - 1, 2), each on fresh inputs, checked against the reference backend."""
    from torch.nn.utils.rnn import pack_sequence

    reference_lstm = next(v for v in _registry.variants("lstm") if v.backend == "reference").implementation
    input_size, state = 4, proj_size or hidden_size
    weights = _layer_leaves(1, 1, input_size, hidden_size, proj_size)
    params = [weights[name] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    params += [weights["weight_hr"]] if proj_size else []
    options = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0, training=False, bidirectional=False,
                   proj_size=proj_size)
    for call in range(calls):
        sequences = [random_tensor(length, input_size, requires_grad=True) for length in (steps, steps - 1, 2)]
        hx = (random_tensor(1, 3, state, requires_grad=True), random_tensor(1, 3, hidden_size, requires_grad=True))
        leaves = [*sequences, *hx, *params]
        for leaf in leaves:
            leaf.grad = None
        before = counter.total()
        output, (h_n, c_n) = lstm(pack_sequence(sequences, enforce_sorted=False), hx, params, **options)
        forward = counter.total() - before
        outputs = (output.data, h_n, c_n)
        upstream = [random_tensor(*out.shape) for out in outputs]
        before = counter.total()
        torch.autograd.backward(outputs, upstream)
        backward = counter.total() - before

        doubles = [leaf.detach().double().requires_grad_() for leaf in leaves]
        ref_sequences, ref_hx, ref_params = doubles[:3], tuple(doubles[3:5]), doubles[5:]
        ref_output, (ref_h, ref_c) = reference_lstm(pack_sequence(ref_sequences, enforce_sorted=False), ref_hx,
                                                    ref_params, **options)
        expected = (ref_output.data, ref_h, ref_c)
        torch.autograd.backward(expected, [grad.double() for grad in upstream])
        for name, out, ref in zip(("output", "h_n", "c_n"), outputs, expected):
            assert_close(out, ref, RTOL[torch.float32], f"{name} (call {call}, T={steps})")
        for index, (leaf, ref) in enumerate(zip(leaves, doubles)):
            assert_close(leaf.grad, ref.grad, RTOL[torch.float32], f"grad of leaf {index} (call {call}, T={steps})")
    return forward, backward


@pytest.mark.interpreter
@pytest.mark.parametrize(("variant_name", "projection"), _cases("triton"))
def test_triton_variant_on_a_ragged_packed_sequence_launches_do_not_grow_with_steps(
        counted_triton_kernels, fake_graphs, counter, variant_name, projection):
    """The same for a PackedSequence of unequal lengths through the whole dispatch-level ``lstm`` (whatever layout
    the variant runs it in: padded with lengths, or packed rows)."""
    variant = next(v for v in _lstm_variants("triton") if v.qualified_name == variant_name)
    _, _, hidden_size, proj_size = _shape_for(variant, "cpu", torch.float32, projection)
    with pyattn.use_backend(variant_name):
        counts = {steps: _packed_launches_per_call(variant.implementation, counter, steps, hidden_size, proj_size)
                  for steps in STEPS}
    assert counts[STEPS[0]] == counts[STEPS[1]], f"{variant_name}: launches per call grow with T: {counts}"
    assert min(counts[STEPS[0]]) >= 1, f"{variant_name}: no launch counted: {counts}"


# ----------------------------------------------------------------------------- on a GPU: real CUDA graphs


def _gpu_stepwise_variants() -> list:
    names = []
    for variant in _registry.variants("lstm"):
        if variant.name == "stepwise" and variant.backend in KERNEL_BACKENDS:
            names.append(variant.qualified_name)
    return names


@pytest.mark.requires_cuda
class TestGPU:
    @pytest.fixture(autouse=True)
    def _fresh_graphs(self):
        graphs.clear()
        _registry.clear_notes()
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 is held to 1e-5 against the reference
        yield
        torch.backends.cuda.matmul.allow_tf32 = previous
        graphs.clear()
        _registry.clear_notes()

    @pytest.mark.parametrize("variant_name", _gpu_stepwise_variants())
    def test_stepwise_replays_one_graph_per_call(self, variant_name):
        """Four calls of a stepwise layer, fresh inputs each: the first eager, the second captured, the last two
        replayed; every output and gradient against the float64 reference; no capture failed."""
        if pyattn.backend_status()[variant_name.split("/")[0]] != "available":
            pytest.skip(pyattn.backend_status()[variant_name.split("/")[0]])
        variant = next(v for v in _registry.variants("lstm") if v.qualified_name == variant_name)
        steps, batch, input_size, hidden_size = 16, 4, 24, 64
        leaves = {name: None if t is None else t.detach().cuda().requires_grad_()
                  for name, t in _layer_leaves(steps, batch, input_size, hidden_size, 0).items()}
        weights = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        for call in range(4):
            for name in ("input", "h0", "c0"):
                leaves[name] = random_tensor(*leaves[name].shape, device="cuda", requires_grad=True)
            for name in weights:
                leaves[name].grad = None
            arguments = [leaves[name] for name in ("input", "h0", "c0", *weights, "weight_hr")]
            with pyattn.use_backend(variant_name):
                outputs = variant.implementation.layer(*arguments, False, None)
            upstream = [random_tensor(*out.shape, device="cuda") for out in outputs]
            torch.autograd.backward(outputs, upstream)
            doubles = {name: None if t is None else t.detach().double().requires_grad_() for name, t in leaves.items()}
            expected = reference.lstm_layer(**doubles)
            torch.autograd.backward(expected, [grad.double() for grad in upstream])
            for name, out, ref in zip(("output", "h_n", "c_n"), outputs, expected):
                assert_close(out, ref, RTOL[torch.float32], f"{name} (call {call})")
            for name, leaf in leaves.items():
                if leaf is not None:
                    assert_close(leaf.grad, doubles[name].grad, RTOL[torch.float32], f"grad of {name} (call {call})")
            if call == 0:
                assert graphs.cached_graphs() == 0, "a key's first call must run eagerly"
        assert graphs.notes() == [], graphs.notes()
        assert graphs.cached_graphs() == 2, "the forward and the backward were not captured"
        assert [entry.replays for entry in graphs._state.graphs.values()] == [2, 2]

    def test_inside_the_callers_own_graph_the_layer_runs_eagerly(self):
        """While the caller captures a graph (its own, or torch.compile's cudagraphs), the stepwise launches belong
        to that graph: the runner must not capture (no nested capture) and the caller's replay must be right."""
        if pyattn.backend_status()["triton"] != "available":
            pytest.skip(pyattn.backend_status()["triton"])
        variant = next(v for v in _registry.variants("lstm") if v.qualified_name == "triton/stepwise")
        leaves = {name: None if t is None else t.detach().cuda()
                  for name, t in _layer_leaves(8, 4, 24, 64, 0).items()}
        arguments = [leaves[name] for name in ("input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh",
                                               "weight_hr")]
        with pyattn.use_backend("triton/stepwise"), torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up (compile, allocate) outside the caller's capture
                    variant.implementation.layer(*arguments, False, None)
            torch.cuda.current_stream().wait_stream(side)
            before = graphs.cached_graphs()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = variant.implementation.layer(*arguments, False, None)
            assert graphs.cached_graphs() == before, "the runner captured inside the caller's capture"
            leaves["input"].copy_(torch.randn_like(leaves["input"]))
            graph.replay()
            torch.cuda.synchronize()
            expected = reference.lstm_layer(**{name: None if t is None else t.double() for name, t in leaves.items()})
        for name, out, ref in zip(("output", "h_n", "c_n"), captured, expected):
            assert_close(out, ref, RTOL[torch.float32], f"{name} (the caller's replay)")
