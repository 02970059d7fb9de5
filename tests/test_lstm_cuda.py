"""CUDA extension LSTM ops (pyattn._C) vs the float64 reference: outputs, every gradient, both recurrences.

Plain-process tests (no GPU needed): the extension loads, every op's schema and CUDA kernel are
registered, fake kernels give the right shapes, dispatch registration is what the ops serve; the
autograd wiring and the BPTT/ragged-batch scheme on CPU stand-in kernels (a torch model of the
CUDA algorithm) against the reference; and the CUDA kernels' own code, emulated on the CPU
(csrc/lstm/emulation), against a float64 model.
GPU tests (``requires_cuda``): every op in fp32/fp16/bf16 against ``pyattn.reference.lstm`` in
float64 with the RTOL table, outputs allocated in NaN-poisoned memory, all gradients, ragged
``lengths``, the persistent and the stepwise recurrence (the cuda/persistent and cuda/stepwise
variants' kernels, passed explicitly), cuDNN, opcheck, torch.compile.

    python -m pytest tests/test_lstm_cuda.py
"""

from __future__ import annotations

import copy
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pyattn
from pyattn import _dispatch, _extension, _registry
from pyattn.ops import lstm_cuda
from pyattn.reference import lstm as reference
from tests.conftest import RTOL, TOOLKIT_PRESENT, assert_close, poison_, random_tensor, relative_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP_NAMES = ["cuda_lstm_cell_fwd", "cuda_lstm_cell_bwd", "cuda_lstm_layer_fwd", "cuda_lstm_layer_bwd"]
# (batch, input_size, hidden_size): tiny, odd (no 16-byte vector path), a batch above 16 (BM = 64 tiles), H = 1024.
CELL_SHAPES = [(1, 3, 5), (5, 59, 97), (16, 64, 128), (33, 200, 256), (64, 512, 1024)]
# (steps, batch, input_size, hidden_size)
LAYER_SHAPES = [(1, 1, 3, 5), (9, 5, 59, 97), (64, 16, 128, 256), (64, 40, 96, 512), (1024, 4, 64, 128)]
RECURRENCES = ["persistent", "stepwise"]


def _extension_or_skip():
    try:
        return _extension.extension_module()
    except ImportError as error:
        if TOOLKIT_PRESENT:
            raise  # a toolkit is here, so the build should have produced the extension
        pytest.skip(f"no CUDA toolkit (or PYATTN_SKIP_CUDA_BUILD=1): the extension is not built ({error})")


@pytest.fixture
def ops():
    _extension_or_skip()
    return torch.ops.pyattn


@pytest.fixture(autouse=True)
def _exact_float32_matmul():
    """fp32 is held to 1e-5: keep torch's own GEMMs (backward, reference) off tf32 whatever the defaults."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture(params=RECURRENCES)
def recurrence(request):
    return request.param


def poison_cuda_allocator() -> None:
    """Fill the caching allocator's free blocks with NaN: tensors the ops allocate next start as NaN,
    so an element a kernel forgets to write fails the comparison."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # Small-pool blocks (<= 1 MiB, carved from 2 MiB segments) and one large block to split from.
    small = [poison_(torch.empty((1 << 18) - 256, device="cuda")) for _ in range(16)]
    large = poison_(torch.empty(1 << 28, device="cuda"))  # 1 GiB
    torch.cuda.synchronize()
    del small, large


# ---- plain process: registration and fake kernels ----


def test_extension_reports_cuda_kernels():
    assert _extension_or_skip().built_with_cuda is True


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_schema_and_cuda_kernel_are_registered(ops, name):
    op = getattr(ops, name).default
    assert op._schema.name == f"pyattn::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


def test_forward_ops_have_autograd_and_dispatch_registration(ops):
    assert lstm_cuda.EXTENSION_OPS_LOADED
    for name in ("cuda_lstm_cell_fwd", "cuda_lstm_layer_fwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyattn::{name}", "Autograd")
    cell = [v for v in _registry.variants("lstm_cell") if v.backend == "cuda"]
    layer = [v for v in _registry.variants("lstm") if v.backend == "cuda"]
    assert [v.qualified_name for v in cell] == ["cuda"] and cell[0].implementation is lstm_cuda.lstm_cell
    assert [v.qualified_name for v in layer] == ["cuda/persistent", "cuda/stepwise"]
    for variant in cell + layer:
        assert variant.support.devices == frozenset({"cuda"})
        assert variant.support.dtypes == frozenset(DTYPES)
        # the layer serves ragged batches and the projection (proj_size > 0), the cell has neither
        assert variant.support.features == (frozenset({"lengths", "projection"}) if variant.op == "lstm"
                                            else frozenset())


def test_module_registers_no_ops_without_the_extension(monkeypatch):
    def missing():
        raise ImportError("extension pyattn._C is not built")

    monkeypatch.setattr(_extension, "extension_module", missing)
    assert lstm_cuda._extension_ops_loaded() is False


def test_persistent_variant_refuses_what_cannot_be_co_resident():
    """The Python mirror of the kernels' footprint (the C++ side re-checks with the occupancy API)."""
    hopper = _registry.ASSUMABLE_TARGETS["sm_90"]
    assert lstm_cuda.persistent_unsupported_reason(16, 768, torch.bfloat16, hopper) is None
    too_big = lstm_cuda.persistent_unsupported_reason(2, 2048, torch.float16, hopper)
    assert too_big is not None and "co-resident" in too_big
    fp32_backward = lstm_cuda.persistent_unsupported_reason(4, 1024, torch.float32, hopper)
    assert fp32_backward is not None and fp32_backward.startswith("backward")
    unknown = lstm_cuda.persistent_unsupported_reason(4, 64, torch.float16, _registry.Target("cuda"))
    assert unknown == "the device's SM count and shared memory are unknown"
    # A projection adds W_hr's rows to each CTA: H = 1024, P = 512 in fp16 still fits; fp32 backward
    # (4H + P wide rows of 16 units) does not, and the reason names both matrices.
    assert lstm_cuda.persistent_unsupported_reason(16, 1024, torch.float16, hopper, proj_size=512) is None
    projected = lstm_cuda.persistent_unsupported_reason(4, 1024, torch.float32, hopper, proj_size=512)
    assert projected is not None and projected.startswith("backward") and "W_hh and W_hr" in projected


def test_dispatch_serves_projection_on_both_cuda_variants_and_sizes_persistent_with_it():
    """The cuda variants take a projection request; the persistent check counts W_hr (proj_size from the
    request) and refuses, naming both matrices, what only the projection pushes off the chip."""
    hopper = _registry.ASSUMABLE_TARGETS["sm_90"]

    def reasons(variant, dtype, batch, hidden, proj_size):
        request = _registry.Request("lstm", torch.device("cuda"), dtype, features=frozenset({"projection"}),
                                    sizes=dict(batch=batch, hidden_size=hidden, proj_size=proj_size))
        return variant.support.not_supported_reasons(request, hopper, forced=True)

    variants = {v.qualified_name: v for v in _registry.variants("lstm") if v.backend == "cuda"}
    assert reasons(variants["cuda/persistent"], torch.float16, 16, 768, 256) == []
    assert reasons(variants["cuda/stepwise"], torch.float32, 4, 1024, 512) == []
    # fp32 H = 700: W_hhᵀ rows alone fit the backward (16 × 2817 floats + ring + C: 199.0 KB), with W_hrᵀ's
    # P = 600 columns (16 × 641 more) they do not (240.1 KB > the 227 KiB a block may use).
    assert lstm_cuda.persistent_unsupported_reason(4, 700, torch.float32, hopper) is None
    (refusal,) = reasons(variants["cuda/persistent"], torch.float32, 4, 700, 600)
    assert refusal.startswith("backward") and "W_hh and W_hr slices" in refusal


def test_persistent_footprint_mirrors_the_kernel_layouts():
    """The Python mirror against PersistentForwardLayout / PersistentBackwardLayout, worked by hand for
    fp16, B <= 16, H = 40, P = 24: forward 32 rows × (64 + 8) + 16 rows × (64 + 8) halves, a ring of 16
    A slices of 16 × 72 halves, the larger C tile (gates: 4 splits × 16 × 36 floats); backward
    16 × (192 + 8) + 16 × (64 + 8) halves, the ring, C 4 × 16 × 20 floats. fp32 B = 20 (BM 64, 4 slices
    of 64 × 68 floats: A rows start 16-byte aligned for cp.async, no K split), H = 40: forward 32 × 65 floats,
    C 64 × 36; backward 16 × 193, C 64 × 20."""
    footprint = lstm_cuda.persistent_footprint(3, 40, 24, torch.float16)
    assert footprint["forward"] == (4608 + 2304 + 16 * 2304 + 9216, 5)
    assert footprint["backward"] == (6400 + 2304 + 16 * 2304 + 5120, 3)
    assert lstm_cuda.persistent_footprint(3, 40, 0, torch.float16)["forward"] == (4608 + 16 * 2304 + 9216, 5)
    fp32 = lstm_cuda.persistent_footprint(20, 40, 0, torch.float32)
    assert fp32["forward"] == (8320 + 4 * 17408 + 9216, 5) and fp32["backward"] == (12416 + 4 * 17408 + 5120, 3)



# ---- plain process: cuda/persistent asks the launchers' occupancy check before launching ----

REFUSAL = "forward: 256 CTAs must be co-resident for the grid sync, the occupancy API allows 0 per SM (test)"


def _persistent_variant():
    return next(v for v in _registry.variants("lstm") if v.qualified_name == "cuda/persistent")


@pytest.fixture
def launch_check(monkeypatch):
    """The launchers' check answers ``launch_check.refusal`` (None: launches) and lstm_layer records the recurrence it
    is asked for, computing on the reference: no extension or GPU needed."""

    class LaunchCheck:
        refusal: str | None = REFUSAL
        asked: list = []
        recurrences: list = []

    def refusal(input, c0, weight_hr):
        LaunchCheck.asked.append((input.shape[1], c0.shape[1], weight_hr))
        return LaunchCheck.refusal

    def recording_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, lengths, *,
                        recurrence):
        LaunchCheck.recurrences.append(recurrence)
        return reference.lstm_layer(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr=weight_hr,
                                    reverse=reverse, lengths=lengths)

    LaunchCheck.asked, LaunchCheck.recurrences = [], []
    monkeypatch.setattr(lstm_cuda, "persistent_launch_refusal", refusal)
    monkeypatch.setattr(lstm_cuda, "lstm_layer", recording_layer)
    monkeypatch.setattr(_registry, "_NOTES", {})  # this test's notes only, gone after it
    return LaunchCheck


def test_auto_persistent_refused_by_the_launch_check_runs_stepwise_with_a_note(launch_check):
    args = _layer_args(3, 2, 4, 16, torch.float32, "cpu")
    auto_form = _registry.auto_form(_persistent_variant())
    assert auto_form.implementation is not _persistent_variant().implementation
    output, h_n, c_n = auto_form.implementation.layer(*args, None, False, None)
    assert launch_check.asked == [(2, 16, None)] and launch_check.recurrences == ["stepwise"]
    expected = reference.lstm_layer(*args)
    torch.testing.assert_close(output, expected[0])
    note = f"cuda/persistent: {REFUSAL}; auto ran the call on the stepwise kernels (cuda/stepwise)"
    assert _registry.notes("lstm") == [note]
    request = _dispatch.Request(op="lstm", device=torch.device("cuda"), dtype=torch.float32,
                                sizes=dict(batch=2, hidden_size=16))
    text = _dispatch.explain_request(request, assume="sm_90")
    assert f"note: {note}" in text, text


def test_auto_persistent_the_launch_check_admits_runs_persistent_without_a_note(launch_check):
    launch_check.refusal = None
    args = _layer_args(3, 2, 4, 16, torch.float32, "cpu")
    _registry.auto_form(_persistent_variant()).implementation.layer(*args, None, False, None)
    assert launch_check.recurrences == ["persistent"]
    assert _registry.notes("lstm") == []


def test_forced_persistent_refused_by_the_launch_check_raises(launch_check):
    args = _layer_args(3, 2, 4, 16, torch.float32, "cpu")
    with pytest.raises(_registry.BackendUnavailableError,
                       match=re.escape(f"pyattn backend 'cuda/persistent' cannot serve this call: {REFUSAL}")):
        _persistent_variant().implementation.layer(*args, None, False, None)
    assert launch_check.recurrences == []
    assert _registry.notes("lstm") == [], "a forced call must not fall back"


def test_auto_gets_the_persistent_variant_auto_form_and_a_forced_name_the_plain_one(monkeypatch):
    monkeypatch.setattr(_dispatch, "backend_unavailable_reason", lambda backend, assumed=False: None)
    request = _dispatch.Request(op="lstm", device=torch.device("cuda"), dtype=torch.float16,
                                sizes=dict(batch=16, hidden_size=256))
    persistent = _persistent_variant()
    chosen = _dispatch.choose(request, assume="sm_90")
    assert chosen == persistent, _dispatch.explain_request(request, assume="sm_90")
    assert chosen.implementation is _registry.auto_form(persistent).implementation is not persistent.implementation
    with pyattn.use_backend("cuda/persistent"):
        assert _dispatch.choose(request, assume="sm_90").implementation is persistent.implementation


def test_launch_check_asks_the_extension_query_once_per_layer_shape(monkeypatch):
    """The query gets the layer's batch, hidden and proj size, dtype and device index; its answer is kept ("" is
    no refusal). Without the query in the extension (an older build) nothing is asked."""
    asked = []

    def query(batch, hidden, proj_size, dtype, device_index):
        asked.append((batch, hidden, proj_size, dtype, device_index))
        return "" if hidden < 100 else "backward: a CTA needs 262144 B of shared memory (test)"

    monkeypatch.setattr(torch.ops.pyattn, "cuda_lstm_persistent_resident", query, raising=False)
    monkeypatch.setattr(lstm_cuda, "_PERSISTENT_REFUSALS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    input, c0 = torch.empty(5, 2, 7, device="meta", dtype=torch.float16), torch.empty(2, 40, device="meta")
    weight_hr = torch.empty(24, 40, device="meta")
    monkeypatch.setattr(lstm_cuda, "_RESIDENCY_QUERY_LOADED", False)
    assert lstm_cuda.persistent_launch_refusal(input, c0, weight_hr) is None and asked == []
    monkeypatch.setattr(lstm_cuda, "_RESIDENCY_QUERY_LOADED", True)
    for _ in range(2):
        assert lstm_cuda.persistent_launch_refusal(input, c0, weight_hr) is None
    big = torch.empty(2, 400, device="meta")
    assert lstm_cuda.persistent_launch_refusal(input, big, None).startswith("backward: a CTA needs")
    assert asked == [(2, 40, 24, torch.float16, 3), (2, 400, 0, torch.float16, 3)]


def _cell_args(batch, input_size, hidden, dtype, device, bias=True, requires_grad=False):
    def make(*shape, scale=1.0):
        return random_tensor(*shape, dtype=dtype, device=device, scale=scale, requires_grad=requires_grad)

    weight_scale = hidden**-0.5
    return [
        make(batch, input_size),
        make(batch, hidden),
        make(batch, hidden),
        make(4 * hidden, input_size, scale=weight_scale),
        make(4 * hidden, hidden, scale=weight_scale),
        make(4 * hidden, scale=weight_scale) if bias else None,
        make(4 * hidden, scale=weight_scale) if bias else None,
    ]


def _layer_args(steps, batch, input_size, hidden, dtype, device, bias=True, requires_grad=False):
    cell = _cell_args(batch, input_size, hidden, dtype, device, bias, requires_grad)
    sequence = random_tensor(steps, batch, input_size, dtype=dtype, device=device, requires_grad=requires_grad)
    return [sequence, *cell[1:]]


@pytest.mark.parametrize("device", ["meta", "fake-cuda"])
@pytest.mark.parametrize("save_for_backward", [True, False])
def test_fake_cell_ops_give_shapes(ops, device, save_for_backward):
    batch, input_size, hidden = 3, 7, 5

    def run(device_name):
        args = _cell_args(batch, input_size, hidden, torch.float16, device_name)
        hy, cy, workspace = ops.cuda_lstm_cell_fwd(*args, save_for_backward)
        assert hy.shape == cy.shape == (batch, hidden) and hy.dtype == torch.float16
        assert workspace.shape == ((batch, 4 * hidden) if save_for_backward else (0, 4 * hidden))
        grads = ops.cuda_lstm_cell_bwd(hy, cy, *args[:5], cy, args[0].new_empty(batch, 4 * hidden))
        assert [tuple(g.shape) for g in grads] == [
            (batch, input_size), (batch, hidden), (batch, hidden), (4 * hidden, input_size), (4 * hidden, hidden), (4 * hidden,)
        ]

    if device == "meta":
        run("meta")
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            run("cuda")


@pytest.mark.parametrize("device", ["meta", "fake-cuda"])
@pytest.mark.parametrize("save_for_backward", [True, False])
def test_fake_layer_ops_give_shapes(ops, device, save_for_backward):
    steps, batch, input_size, hidden = 4, 3, 7, 5

    def run(device_name):
        args = _layer_args(steps, batch, input_size, hidden, torch.bfloat16, device_name)
        output, h_n, c_n, gates, cell_states = ops.cuda_lstm_layer_fwd(*args, False, None, save_for_backward, "stepwise")
        assert output.shape == (steps, batch, hidden) and output.dtype == torch.bfloat16
        assert h_n.shape == c_n.shape == (batch, hidden)
        saved = steps if save_for_backward else 0
        assert gates.shape == (saved, batch, 4 * hidden) and cell_states.shape == (saved, batch, hidden)
        assert cell_states.dtype == torch.float32
        workspace_gates = args[0].new_empty(steps, batch, 4 * hidden)
        workspace_cells = args[0].new_empty(steps, batch, hidden, dtype=torch.float32)
        grads = ops.cuda_lstm_layer_bwd(output, h_n, c_n, *args[:5], output, workspace_gates, workspace_cells, False, None, "stepwise")
        assert [tuple(g.shape) for g in grads] == [
            (steps, batch, input_size), (batch, hidden), (batch, hidden), (4 * hidden, input_size), (4 * hidden, hidden),
            (4 * hidden,), (0,),
        ]
        # With a projection (P = 3): h0, output, h_n and weight_hh's columns are P wide, c stays H wide.
        proj = 3
        sequence, _, c0, weight_ih, _, bias_ih, bias_hh = args
        h0 = sequence.new_empty(batch, proj)
        weight_hh, weight_hr = sequence.new_empty(4 * hidden, proj), sequence.new_empty(proj, hidden)
        projected = (sequence, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh)
        output, h_n, c_n, gates, cell_states = ops.cuda_lstm_layer_fwd(*projected, True, None, save_for_backward,
                                                                       "persistent", weight_hr)
        assert output.shape == (steps, batch, proj) and h_n.shape == (batch, proj) and c_n.shape == (batch, hidden)
        assert gates.shape == (saved, batch, 4 * hidden) and cell_states.shape == (saved, batch, hidden)
        grads = ops.cuda_lstm_layer_bwd(output, h_n, c_n, *projected[:5], output, workspace_gates, workspace_cells, True,
                                        None, "persistent", weight_hr)
        assert [tuple(g.shape) for g in grads] == [
            (steps, batch, input_size), (batch, proj), (batch, hidden), (4 * hidden, input_size), (4 * hidden, proj),
            (4 * hidden,), (proj, hidden),
        ]

    if device == "meta":
        run("meta")
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            run("cuda")


# ---- plain process: the autograd wiring, on CPU stand-ins that model the CUDA algorithm ----
#
# CPU kernels for the four ops, written in torch the way csrc/lstm computes: activated gates and
# float32 cell states saved forward; backward through time in the kernels' order (dh from the
# step processed just before, dc carried) with the weight gradients as stacked GEMMs, as
# lstm_api.cpp does. They let the Python glue (setup_context, backward argument order, bias and
# None gradients, torch.compile) and the BPTT indexing run and be checked without a GPU.


def _model_gate_gradients(dh, dc, gates, c_prev, c_cur):
    i, f, g, o = gates.float().chunk(4, dim=-1)
    tanh_c = torch.tanh(c_cur.float())
    dc = dc.float() + dh.float() * o * (1 - tanh_c * tanh_c)
    grad_gates = torch.cat([dc * g * i * (1 - i), dc * c_prev.float() * f * (1 - f), dc * i * (1 - g * g),
                            dh.float() * tanh_c * o * (1 - o)], dim=-1)
    return grad_gates, dc * f


def _model_cell_fwd(input, hx, cx, weight_ih, weight_hh, bias_ih, bias_hh, save_for_backward):
    pre = input.float() @ weight_ih.float().t() + hx.float() @ weight_hh.float().t()
    for bias in (bias_ih, bias_hh):
        if bias is not None:
            pre = pre + bias.float()
    i, f, g, o = pre.chunk(4, dim=-1)
    gates = torch.cat([torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)], dim=-1)
    i, f, g, o = gates.chunk(4, dim=-1)
    cy = f * cx.float() + i * g
    hy = o * torch.tanh(cy)
    workspace = gates if save_for_backward else gates[:0]
    return hy.to(input.dtype), cy.to(input.dtype), workspace.to(input.dtype).clone()


def _model_cell_bwd(grad_hy, grad_cy, input, hx, cx, weight_ih, weight_hh, cy, workspace):
    grad_gates, grad_cx = _model_gate_gradients(grad_hy, grad_cy, workspace, cx, cy)
    grad_gates = grad_gates.to(input.dtype)
    return (grad_gates @ weight_ih, grad_gates @ weight_hh, grad_cx.to(input.dtype), grad_gates.t() @ input,
            grad_gates.t() @ hx, grad_gates.float().sum(0).to(input.dtype))


MODEL_RECURRENCES: list[str] = []  # the recurrence argument of every layer op the CPU model ran


def _model_layer_fwd(input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths, save_for_backward, recurrence,
                     weight_hr=None):
    assert weight_hr is None, "the CPU model has no projection (the emulated kernels below do)"
    MODEL_RECURRENCES.append(recurrence)
    steps, batch, hidden = input.shape[0], input.shape[1], h0.shape[1]
    output = input.new_empty(steps, batch, hidden)
    gates = input.new_empty(steps, batch, 4 * hidden)
    cell_states = input.new_empty(steps, batch, hidden, dtype=torch.float32)
    h, c = h0, c0.float()
    for s in range(steps):
        t = steps - 1 - s if reverse else s
        h_new, _, step_gates = _model_cell_fwd(input[t], h, c, weight_ih, weight_hh, bias_ih, bias_hh, True)
        i, f, g, _ = step_gates.float().chunk(4, dim=-1)
        c_new = f * c + i * g
        # Rows past their length keep their state; their output row carries the frozen h.
        past = (t >= lengths)[:, None] if lengths is not None else torch.zeros(batch, 1, dtype=torch.bool)
        h, c = torch.where(past, h, h_new), torch.where(past, c, c_new)
        output[t], cell_states[t], gates[t] = h, c, step_gates.masked_fill(past, 0)
    h_n = output[0 if reverse else steps - 1].clone()
    if lengths is not None:
        output.masked_fill_((torch.arange(steps)[:, None] >= lengths[None, :])[:, :, None], 0)
    saved = steps if save_for_backward else 0
    return output, h_n, c.to(input.dtype), gates[:saved].clone(), cell_states[:saved].clone()


def _model_layer_bwd(grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates, cell_states,
                     reverse, lengths, recurrence, weight_hr=None):
    MODEL_RECURRENCES.append(recurrence)
    steps, batch, hidden = input.shape[0], input.shape[1], h0.shape[1]
    lengths_or_all = lengths if lengths is not None else torch.full((batch,), steps)
    last_valid = torch.zeros(batch, dtype=torch.int64) if reverse else lengths_or_all.clamp(max=steps) - 1
    grad_gates = input.new_empty(steps, batch, 4 * hidden)
    grad_cell = grad_c_n.float()
    for s in range(steps):
        t = s if reverse else steps - 1 - s
        t_next, t_prev = (t - 1, t + 1) if reverse else (t + 1, t - 1)
        dh = grad_output[t].float() + torch.where((last_valid == t)[:, None], grad_h_n.float(), 0.0)
        if s > 0:
            dh = dh + grad_gates[t_next].float() @ weight_hh.float()
        c_prev = c0.float() if s == steps - 1 else cell_states[t_prev]
        step_grad, grad_cell_new = _model_gate_gradients(dh, grad_cell, gates[t], c_prev, cell_states[t])
        past = (t >= lengths_or_all)[:, None]
        grad_gates[t] = step_grad.masked_fill(past, 0).to(input.dtype)
        grad_cell = torch.where(past, grad_cell, grad_cell_new)
    if reverse and lengths is not None:
        first = grad_gates[(lengths - 1).clamp(0, steps - 1), torch.arange(batch)]
    else:
        first = grad_gates[steps - 1 if reverse else 0]
    rest = grad_gates.narrow(0, 0 if reverse else 1, steps - 1).reshape(-1, 4 * hidden)
    previous_h = output.narrow(0, 1 if reverse else 0, steps - 1).reshape(-1, hidden)
    flat = grad_gates.reshape(-1, 4 * hidden)
    grad_h0 = first @ weight_hh
    if lengths is not None:
        grad_h0 = grad_h0 + grad_h_n.masked_fill((lengths != 0)[:, None], 0)
    return (flat @ weight_ih).view_as(input), grad_h0, grad_cell.to(input.dtype), \
        flat.t() @ input.reshape(-1, input.shape[-1]), first.t() @ h0 + rest.t() @ previous_h, \
        flat.float().sum(0).to(input.dtype), input.new_empty(0)


@pytest.fixture
def cpu_model_kernels(ops):
    library = torch.library.Library("pyattn", "IMPL")
    for name, kernel in [("cuda_lstm_cell_fwd", _model_cell_fwd), ("cuda_lstm_cell_bwd", _model_cell_bwd),
                         ("cuda_lstm_layer_fwd", _model_layer_fwd), ("cuda_lstm_layer_bwd", _model_layer_bwd)]:
        library.impl(name, kernel, "CPU")
    yield
    library._destroy()


def test_cell_autograd_wiring_on_cpu_model(cpu_model_kernels):
    args = _cell_args(3, 6, 5, torch.float32, "cpu", requires_grad=True)
    args64 = _float64(args)
    grad_hy, grad_cy = torch.randn(3, 5), torch.randn(3, 5)
    torch.autograd.backward(reference.lstm_cell(*args64), (grad_hy.double(), grad_cy.double()))
    torch.autograd.backward(lstm_cuda.lstm_cell(*args), (grad_hy, grad_cy))
    for name, grad, expected in zip(GRAD_NAMES, _grads(args), _grads(args64)):
        assert_close(grad, expected, RTOL[torch.float32], f"grad {name}")


def test_cell_without_bias_returns_no_bias_gradient_on_cpu_model(cpu_model_kernels):
    args = _cell_args(3, 6, 5, torch.float32, "cpu", bias=False, requires_grad=True)
    lstm_cuda.lstm_cell(*args)[1].sum().backward()  # hy unused: its gradient arrives as None
    args64 = _float64(args)
    reference.lstm_cell(*args64)[1].sum().backward()
    for name, grad, expected in zip(GRAD_NAMES[:5], _grads(args[:5]), _grads(args64[:5])):
        assert_close(grad, expected, RTOL[torch.float32], f"grad {name}")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("steps", "lengths"), [(1, None), (5, None), (5, [5, 2, 0, 3]), (4, [1, 4, 4, 2])])
def test_layer_autograd_wiring_and_bptt_order_on_cpu_model(cpu_model_kernels, reverse, steps, lengths):
    """Also the ragged-batch scheme: frozen rows carry h in the output until it is zeroed, h_n is the
    last step's row, the reversed first-step gradients are gathered per row, length 0 passes h0 on."""
    batch = 4
    lengths = None if lengths is None else torch.tensor(lengths)
    args = _layer_args(steps, batch, 6, 5, torch.float32, "cpu", requires_grad=True)
    upstream = [torch.randn(steps, batch, 5), torch.randn(batch, 5), torch.randn(batch, 5)]
    args64 = _float64(args)
    expected = reference.lstm_layer(*args64, reverse=reverse, lengths=lengths)
    torch.autograd.backward(expected, [g.double() for g in upstream])
    results = lstm_cuda.lstm_layer(*args, reverse=reverse, lengths=lengths, recurrence="stepwise")
    for name, result, expected in zip(("output", "h_n", "c_n"), results, expected):
        assert_close(result, expected, RTOL[torch.float32], name)
    torch.autograd.backward(results, upstream)
    for name, grad, expected in zip(LAYER_GRAD_NAMES, _grads(args), _grads(args64)):
        assert_close(grad, expected, RTOL[torch.float32], f"grad {name}")


def test_workspace_is_saved_only_when_grad_is_needed_on_cpu_model(cpu_model_kernels, monkeypatch):
    save_flags = []
    forward = torch.ops.pyattn.cuda_lstm_layer_fwd
    monkeypatch.setattr(torch.ops.pyattn, "cuda_lstm_layer_fwd", lambda *args: save_flags.append(args[9]) or forward(*args))
    args = _layer_args(4, 2, 3, 5, torch.float32, "cpu")
    lstm_cuda.lstm_layer(*args, recurrence="stepwise")  # nothing requires grad
    for tensor in args:
        tensor.requires_grad_()
    with torch.no_grad():
        lstm_cuda.lstm_layer(*args, recurrence="stepwise")
    lstm_cuda.lstm_layer(*args, recurrence="stepwise")
    assert save_flags == [False, False, True]


def _assert_grads_match_eager_stepwise(args, reverse=False):
    """The gradients a compiled run left on ``args`` equal an eager stepwise run's of the same loss."""
    compiled_grads = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    lstm_cuda.lstm_layer(*args, reverse=reverse, recurrence="stepwise")[0].square().sum().backward()
    for name, compiled_grad, eager_grad in zip(LAYER_GRAD_NAMES, compiled_grads, _grads(args)):
        assert_close(compiled_grad, eager_grad, 1e-6, f"compiled grad {name}")


def test_layer_compiles_fullgraph_on_cpu_model(cpu_model_kernels):
    args = _layer_args(4, 2, 3, 5, torch.float32, "cpu", requires_grad=True)
    compiled = torch.compile(lambda *a: lstm_cuda.lstm_layer(*a, reverse=True, recurrence="stepwise")[0].square().sum(),
                             fullgraph=True, backend="aot_eager")
    compiled(*args).backward()
    _assert_grads_match_eager_stepwise(args, reverse=True)



@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_auto_persistent_under_compile_leaves_the_check_to_the_launchers_on_cpu_model(cpu_model_kernels, monkeypatch,
                                                                                      dynamic):
    """While torch.compile traces, sizes may be symbols (dynamic shapes, or the automatic dynamic of a recompile),
    and a launch check asked then would hold for the traced sizes only: auto passes recurrence
    "persistent_or_stepwise", and the launchers check each call's own sizes (stepwise where the persistent kernel
    would not be resident), forward and backward, without a graph break and without asking while tracing."""
    asked = []
    # Patched in Python (a lambda in torch.ops.pyattn would break torch's walk over the namespace's ops).
    monkeypatch.setattr(lstm_cuda, "persistent_launch_refusal", lambda *a: asked.append(a) or None)
    monkeypatch.setattr(lstm_cuda, "_RESIDENCY_QUERY_LOADED", True)
    layer = _registry.auto_form(_persistent_variant()).implementation.layer
    compiled = torch.compile(lambda *a: layer(*a, None, False, None)[0].square().sum(), dynamic=dynamic,
                             fullgraph=True, backend="aot_eager")
    for batch in (2, 3):
        args = _layer_args(4, batch, 3, 5, torch.float32, "cpu", requires_grad=True)
        MODEL_RECURRENCES.clear()
        compiled(*args).backward()
        assert MODEL_RECURRENCES == ["persistent_or_stepwise"] * 2, batch  # forward, backward
        _assert_grads_match_eager_stepwise(args)
    assert asked == []


@pytest.mark.parametrize("refused", [False, True], ids=["resident", "refused"])
def test_forced_persistent_under_compile_checks_at_run_time_on_cpu_model(cpu_model_kernels, monkeypatch, refused):
    """Forced cuda/persistent under torch.compile runs through pyattn::cuda_lstm_layer_fwd_checked: the launchers'
    check is asked when the graph runs, with the call's own sizes (never while tracing), and a refusal raises
    BackendUnavailableError naming the reason, as the eager call does, not the launch's RuntimeError."""
    asked = []

    def refusal(input, c0, weight_hr):  # the launchers' check, as persistent_launch_refusal asks it
        asked.append((input.shape[1], c0.shape[1]))
        return REFUSAL if refused else None

    monkeypatch.setattr(lstm_cuda, "persistent_launch_refusal", refusal)
    monkeypatch.setattr(lstm_cuda, "_RESIDENCY_QUERY_LOADED", True)
    layer = _persistent_variant().implementation.layer
    compiled = torch.compile(lambda *a: layer(*a, None, False, None)[0].square().sum(), fullgraph=True,
                             backend="aot_eager")
    args = _layer_args(4, 3, 3, 5, torch.float32, "cpu", requires_grad=True)
    MODEL_RECURRENCES.clear()
    if refused:
        with pytest.raises(_registry.BackendUnavailableError,
                           match=re.escape(f"pyattn backend 'cuda/persistent' cannot serve this call: {REFUSAL}")):
            compiled(*args)
        assert MODEL_RECURRENCES == [] and asked == [(3, 5)]
        return
    compiled(*args).backward()
    assert MODEL_RECURRENCES == ["persistent"] * 2 and asked == [(3, 5)]  # forward and backward kernels, one check
    # Its schema, fake kernel and autograd registration, as torch checks a custom op's.
    input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh = args
    torch.library.opcheck(torch.ops.pyattn.cuda_lstm_layer_fwd_checked.default,
                          (input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, False, None, True, "persistent"))
    _assert_grads_match_eager_stepwise(args)


# ---- plain process: the kernels themselves, emulated on the CPU ----

CSRC = Path(__file__).resolve().parents[1] / "csrc"
EMULATION = CSRC / "lstm" / "emulation"
SHARED_DECLARATION = "extern __shared__ __align__(128) unsigned char shared[];"
LAUNCHERS_MARKER = "// Launchers."


def _emulation_compiler(tmp_path_factory) -> str:
    """g++ when it can build and run C++20 <barrier> with threads (the emulation's needs), else skip."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the CPU emulation of the CUDA kernels")
    probe_dir = tmp_path_factory.mktemp("cxx20_probe")
    (probe_dir / "probe.cc").write_text("#include <barrier>\n#include <thread>\nint main() { std::barrier b(1); "
                                        "b.arrive_and_wait(); std::thread t([] {}); t.join(); }\n")
    probe = subprocess.run([compiler, "-std=c++20", "-pthread", str(probe_dir / "probe.cc"), "-o",
                            str(probe_dir / "probe")], capture_output=True, text=True)
    if probe.returncode != 0 or subprocess.run([str(probe_dir / "probe")]).returncode != 0:
        pytest.skip(f"this g++ cannot build or run C++20 <barrier> with threads, which the emulation needs: "
                    f"{probe.stderr.strip()[-300:]}")
    return compiler


def _build_emulation(tmp_path_factory, source: str, output: str, *extra: str) -> Path:
    """``source`` (in csrc/lstm/emulation) built with g++ against lstm_kernels.cuh as it is now: its dynamic
    shared-memory declaration pointed at the CTA's buffer, its launchers (host CUDA API) cut."""
    compiler = _emulation_compiler(tmp_path_factory)
    kernels = (CSRC / "lstm" / "lstm_kernels.cuh").read_text()
    assert SHARED_DECLARATION in kernels and LAUNCHERS_MARKER in kernels, "lstm_kernels.cuh changed shape: update the emulation"
    emulated = kernels.replace(SHARED_DECLARATION, "unsigned char* shared = emu::cta_shared;")
    emulated = emulated[: emulated.index(LAUNCHERS_MARKER)] + "}  // namespace pyattn::lstm\n"
    build = tmp_path_factory.mktemp("lstm_emulation")
    (build / "lstm_kernels_emulated.cuh").write_text(emulated)
    target = build / output
    command = [compiler, "-std=c++20", "-O1", "-pthread", "-w", *extra, f"-I{EMULATION / 'include'}", f"-I{CSRC}",
               f"-I{build}", str(EMULATION / source), "-o", str(target)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"emulation build failed:\n{result.stderr[-4000:]}"
    return target


@pytest.fixture(scope="module")
def emulation_binary(tmp_path_factory):
    """csrc/lstm/emulation/lstm_emulation.cc: the kernels against its float64 model (an executable)."""
    return _build_emulation(tmp_path_factory, "lstm_emulation.cc", "lstm_emulation")


@pytest.mark.parametrize("suite", ["fp32", "fp16", "bf16", "ragged", "pipeline"])
def test_kernels_match_float64_model_in_cpu_emulation(emulation_binary, suite):
    """Every kernel and tile configuration vs a float64 model, outputs NaN-poisoned (see lstm_emulation.cc)."""
    result = subprocess.run([str(emulation_binary), suite], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "0 failure(s)" in result.stdout, result.stdout + result.stderr


# ---- plain process: whole torch.nn.LSTMs on the emulated kernels ----
#
# csrc/lstm/emulation/lstm_emulation_api.cc exposes the emulated recurrences (what lstm_api.cpp launches
# for one layer: persistent kernel or stepwise loop, the launchers' tile choices) through a C interface.
# The CPU implementations of the layer ops below do lstm_api.cpp's host work in torch — the input
# projection GEMM, allocation (NaN-poisoned), h_n/c_n and the ragged-row zeroing forward; after the
# emulated BPTT the weight-gradient GEMMs, dh0 and dW_hr = dRᵀ·M with M rebuilt from the saved o gates
# and cell states — so a whole module (layers, directions, packed input, projection) runs forward and
# backward on the kernels' own code, through pyattn/ops/lstm_cuda.py's autograd, against torch.nn.LSTM.

_EMULATED_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def emulation_library(tmp_path_factory):
    library = ctypes.CDLL(str(_build_emulation(tmp_path_factory, "lstm_emulation_api.cc", "liblstm_emulation.so",
                                               "-shared", "-fPIC")))
    library.emu_layer_forward.restype = library.emu_layer_backward.restype = ctypes.c_int
    library.emu_products_counted.restype = ctypes.c_long
    return library


def _pointer(tensor):
    if tensor is None or tensor.numel() == 0:
        return None
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    return ctypes.c_void_p(tensor.data_ptr())


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _emulated_layer_fwd(library, input, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, reverse, lengths,
                        save_for_backward, recurrence, weight_hr=None):
    """lstm_api.cpp's lstm_layer_forward with the recurrence on the emulated kernels."""
    assert recurrence in ("persistent", "stepwise")
    steps, batch, input_size = input.shape
    dtype, hidden = input.dtype, c0.shape[1]
    proj = 0 if weight_hr is None else weight_hr.shape[0]
    width = proj or hidden
    saved = steps if save_for_backward else 0
    output = _nan(steps, batch, width, dtype=dtype)
    gates, cell_states = _nan(saved, batch, 4 * hidden, dtype=dtype), _nan(saved, batch, hidden, dtype=torch.float32)
    if steps == 0 or batch == 0:
        return output, h0.clone(), c0.clone(), gates, cell_states
    biases = [b.float() for b in (bias_ih, bias_hh) if b is not None]
    flat_input = input.reshape(steps * batch, input_size)
    projection = (torch.addmm(sum(biases).to(dtype), flat_input, weight_ih.t()) if biases
                  else flat_input @ weight_ih.t()).contiguous()
    state = cell_states if save_for_backward else _nan(1, batch, hidden, dtype=torch.float32)
    m_scratch = _nan(batch if proj else 0, hidden, dtype=dtype)
    status = library.emu_layer_forward(
        _EMULATED_DTYPES[dtype], recurrence == "persistent", _pointer(projection), _pointer(weight_hh),
        _pointer(weight_hr), _pointer(h0), _pointer(c0), _pointer(output), _pointer(state), save_for_backward,
        _pointer(gates), _pointer(m_scratch), _pointer(lengths), steps, batch, hidden, proj, bool(reverse))
    assert status == 0
    last = 0 if reverse else steps - 1
    h_n = output[last].clone()
    c_n = state[last if save_for_backward else 0].to(dtype)
    if lengths is not None:
        output.masked_fill_((torch.arange(steps)[:, None] >= lengths[None, :])[:, :, None], 0)
    return output, h_n, c_n, gates, cell_states


def _emulated_layer_bwd(library, grad_output, grad_h_n, grad_c_n, input, h0, c0, weight_ih, weight_hh, output, gates,
                        cell_states, reverse, lengths, recurrence, weight_hr=None):
    """lstm_api.cpp's lstm_layer_backward with BPTT on the emulated kernels."""
    steps, batch, input_size = input.shape
    dtype, hidden = input.dtype, c0.shape[1]
    proj = 0 if weight_hr is None else weight_hr.shape[0]
    width = proj or hidden
    grad_gates = _nan(steps, batch, 4 * hidden, dtype=dtype)
    grad_cell = _nan(batch, hidden, dtype=torch.float32)
    grad_recurrent = _nan(steps if proj else 0, batch, proj, dtype=dtype)
    weight_hh_t = weight_hh.t().contiguous()  # held here: the pointers below must outlive the call
    weight_hr_t = None if weight_hr is None else weight_hr.t().contiguous()
    status = library.emu_layer_backward(
        _EMULATED_DTYPES[dtype], recurrence == "persistent", _pointer(weight_hh_t), _pointer(weight_hr_t),
        _pointer(grad_output),
        _pointer(grad_h_n), _pointer(grad_c_n), _pointer(gates), _pointer(cell_states), _pointer(c0),
        _pointer(grad_gates), _pointer(grad_cell), _pointer(grad_recurrent), _pointer(lengths), steps, batch, hidden,
        proj, bool(reverse))
    assert status == 0
    flat = grad_gates.view(steps * batch, 4 * hidden)
    if reverse and lengths is not None:
        first_step = (lengths - 1).clamp(0, steps - 1).view(1, batch, 1).expand(1, batch, 4 * hidden)
        first = grad_gates.gather(0, first_step).squeeze(0)
    else:
        first = grad_gates[steps - 1 if reverse else 0]
    rest = grad_gates.narrow(0, 0 if reverse else 1, steps - 1).reshape(-1, 4 * hidden)
    previous_h = output.narrow(0, 1 if reverse else 0, steps - 1).reshape(-1, width)
    grad_h0 = first @ weight_hh
    if lengths is not None:
        grad_h0 = grad_h0 + grad_h_n.masked_fill((lengths != 0)[:, None], 0)
    grad_weight_hr = input.new_empty(0)
    if proj:
        m = (gates[..., 3 * hidden:].float() * torch.tanh(cell_states)).to(dtype).view(steps * batch, hidden)
        grad_weight_hr = grad_recurrent.view(steps * batch, proj).t() @ m
    return ((flat @ weight_ih).view(steps, batch, input_size), grad_h0, grad_cell.to(dtype),
            flat.t() @ input.reshape(steps * batch, input_size), torch.addmm(first.t() @ h0, rest.t(), previous_h),
            flat.float().sum(0).to(dtype), grad_weight_hr)


@pytest.fixture
def emulated_kernels(ops, emulation_library):
    library = torch.library.Library("pyattn", "IMPL")
    library.impl("cuda_lstm_layer_fwd", lambda *a, **k: _emulated_layer_fwd(emulation_library, *a, **k), "CPU")
    library.impl("cuda_lstm_layer_bwd", lambda *a, **k: _emulated_layer_bwd(emulation_library, *a, **k), "CPU")
    yield
    library._destroy()


# (dtype, bound vs torch.nn.LSTM in float64): fp32 to 1e-4 (the bound for whole modules), 16-bit
# by the dtype's table entry.
EMULATED_MODULE_DTYPES = [(torch.float32, 1e-4), (torch.float16, RTOL[torch.float16]),
                          (torch.bfloat16, RTOL[torch.bfloat16])]
# (input_size, hidden_size, proj_size, num_layers, bidirectional, batch, packed lengths or None): odd sizes
# (scalar loads), a batch above 16 (BM = 64 tiles), proj_size 0 through the same path.
EMULATED_MODULE_CASES = [
    (7, 20, 12, 2, True, 3, None),
    (9, 37, 5, 1, False, 4, [5, 1, 3, 5]),
    (8, 24, 16, 2, True, 3, [4, 5, 2]),
    (6, 20, 0, 1, True, 3, [5, 2, 4]),
    (5, 16, 9, 1, False, 18, None),
    # Two BM = 64 tiles, rows sorted by length: the second tile's rows end after one step, so the
    # kernels skip its products from then on (tile_frozen), with and without a projection.
    (5, 16, 0, 1, True, 70, [5 - i % 5 for i in range(70)]),
    (4, 16, 7, 1, False, 70, [5 - i % 5 for i in range(70)]),
]


@pytest.mark.parametrize("recurrence", RECURRENCES)
@pytest.mark.parametrize(("dtype", "bound"), EMULATED_MODULE_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", EMULATED_MODULE_CASES,
                         ids=lambda c: f"I{c[0]}H{c[1]}P{c[2]}L{c[3]}{'bi' if c[4] else 'uni'}B{c[5]}"
                                       f"{'packed' if c[6] else ''}")
def test_module_with_projection_on_emulated_kernels_matches_torch_lstm(emulated_kernels, recurrence, dtype, bound,
                                                                       case):
    """torch.nn.LSTM (proj_size, layers, directions, packed input) against its float64 copy, and the same
    weights through lstm_cuda's layer (autograd included) on the emulated kernels: output, h_n, c_n and
    the gradients of input, h0, c0 and every weight."""
    input_size, hidden, proj, layers, bidirectional, batch, lengths = case
    if dtype != torch.float32 and (layers > 1 or batch > 16):
        pytest.skip("16-bit: one layer at B <= 16 is enough to check the rounding; the shapes run in fp32")
    steps, directions, width = 5, 2 if bidirectional else 1, proj or hidden
    module = torch.nn.LSTM(input_size, hidden, num_layers=layers, bidirectional=bidirectional, proj_size=proj)
    module = module.to(dtype)
    module64 = copy.deepcopy(module).double()
    sequence = random_tensor(steps, batch, input_size, dtype=dtype)
    h0 = random_tensor(layers * directions, batch, width, dtype=dtype, scale=0.5)
    c0 = random_tensor(layers * directions, batch, hidden, dtype=dtype, scale=0.5)
    leaves = [t.requires_grad_() for t in (sequence, h0, c0)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]

    def packed(x):
        return x if lengths is None else torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths),
                                                                                enforce_sorted=False)

    layer = lstm_cuda._layer(recurrence)
    run = lstm_cuda.cuda_lstm(layer)
    output, (h_n, c_n) = run(packed(leaves[0]), (leaves[1], leaves[2]), module._flat_weights, num_layers=layers,
                             bias=True, batch_first=False, dropout=0.0, training=False, bidirectional=bidirectional,
                             proj_size=proj)
    output64, (h_n64, c_n64) = module64(packed(leaves64[0]), (leaves64[1], leaves64[2]))
    if lengths is not None:
        output, output64 = output.data, output64.data
    for name, got, want in (("output", output, output64), ("h_n", h_n, h_n64), ("c_n", c_n, c_n64)):
        assert got.dtype == dtype, name
        assert_close(got, want, bound, name)

    upstream = [random_tensor(*t.shape, dtype=dtype) for t in (output, h_n, c_n)]
    torch.autograd.backward((output, h_n, c_n), upstream)
    torch.autograd.backward((output64, h_n64, c_n64), [g.double() for g in upstream])
    for name, got, want in zip(("input", "h0", "c0"), leaves, leaves64):
        assert_close(got.grad, want.grad, bound, f"grad {name}")
    for name in module._flat_weights_names:
        assert_close(getattr(module, name).grad, getattr(module64, name).grad, bound, f"grad {name}")


def _active_tile_steps(lengths, steps, tile_rows, skipped_time=None):
    """Σ over times t (but ``skipped_time``) of the batch tiles with a row still running at t (t < length)."""
    tiles = [lengths[start:start + tile_rows] for start in range(0, len(lengths), tile_rows)]
    return sum(any(t < length for length in tile) for t in range(steps) if t != skipped_time for tile in tiles)


def _expected_products(lengths, steps, tile_rows, recurrence, hidden, proj, reverse):
    """accumulate_product calls of one direction, (forward, backward), from the launchers' tiles: per active
    tile-step, forward the gates' CTAs (8 units each persistent, 16 stepwise) and the projection's (16 columns
    of r), backward dr's CTAs (16 columns; none on the first processed step, which has no incoming dgates) and
    dh's or dm's (16 units; dh has none on the first processed step either, dm does)."""
    def ceil(a, b):
        return -(-a // b)

    first_processed = 0 if reverse else steps - 1
    every_step = _active_tile_steps(lengths, steps, tile_rows)
    but_first = _active_tile_steps(lengths, steps, tile_rows, first_processed)
    gate_units = 8 if recurrence == "persistent" else 16
    forward = every_step * (ceil(hidden, gate_units) + (ceil(proj, 16) if proj else 0))
    backward = ceil(proj, 16) * but_first + ceil(hidden, 16) * (every_step if proj else but_first)
    return forward, backward


@pytest.mark.parametrize("proj", [0, 7], ids=["no_projection", "projection"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_frozen_batch_tiles_skip_their_products_in_emulation(emulated_kernels, emulation_library, recurrence,
                                                             bidirectional, proj):
    """cuda_lstm lays a PackedSequence out padded in its sorted order, so the rows that have ended fill the last
    tiles, whose products the kernels skip: the emulation counts accumulate_product calls (one per CTA and
    product), and a ragged batch runs exactly the products of its active tile-steps, the projection's too,
    as does the same batch at full length."""
    steps, batch, input_size, hidden, tile_rows = 5, 70, 3, 16, 64  # BM = 64 above 16 rows
    ragged = [5 - i % 5 for i in range(batch)]  # in user order; sorted, the second tile's rows end after a step
    run = lstm_cuda.cuda_lstm(lstm_cuda._layer(recurrence))
    weights = torch.nn.LSTM(input_size, hidden, bidirectional=bidirectional, proj_size=proj)._flat_weights
    directions, width = 1 + bidirectional, proj or hidden
    for lengths in ([steps] * batch, ragged):
        packed = torch.nn.utils.rnn.pack_padded_sequence(random_tensor(steps, batch, input_size, requires_grad=True),
                                                         torch.tensor(lengths), enforce_sorted=False)
        hx = (random_tensor(directions, batch, width), random_tensor(directions, batch, hidden))
        emulation_library.emu_products_counted(1)
        output, (h_n, c_n) = run(packed, hx, weights, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                                 training=True, bidirectional=bidirectional, proj_size=proj)
        forward_products = emulation_library.emu_products_counted(1)
        torch.autograd.backward((output.data, h_n, c_n), [random_tensor(*t.shape) for t in (output.data, h_n, c_n)])
        counted = forward_products, emulation_library.emu_products_counted(1)
        in_sorted_order = sorted(lengths, reverse=True)
        expected = [sum(pair) for pair in zip(*(
            _expected_products(in_sorted_order, steps, tile_rows, recurrence, hidden, proj, reverse)
            for reverse in (False, True)[:directions]))]
        assert counted == tuple(expected), (lengths is ragged, counted, expected)


# ---- GPU: accuracy against the float64 reference ----


def _float64(tensors):
    return [None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad) for t in tensors]


def _grads(tensors):
    return [None if t is None else t.grad for t in tensors]


GRAD_NAMES = ["input", "hx", "cx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CELL_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cell_forward_matches_reference(dtype, shape, bias):
    args = _cell_args(*shape, dtype, "cuda", bias)
    expected_hy, expected_cy = reference.lstm_cell(*_float64(args))
    with torch.no_grad():
        poison_cuda_allocator()
        hy, cy = lstm_cuda.lstm_cell(*args)
    assert hy.dtype == cy.dtype == dtype
    assert_close(hy, expected_hy, RTOL[dtype], "hy")
    assert_close(cy, expected_cy, RTOL[dtype], "cy")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CELL_SHAPES)
def test_cell_gradients_match_reference(dtype, shape):
    args = _cell_args(*shape, dtype, "cuda", bias=True, requires_grad=True)
    grad_hy = random_tensor(shape[0], shape[2], dtype=dtype, device="cuda")
    grad_cy = random_tensor(shape[0], shape[2], dtype=dtype, device="cuda")
    args64 = _float64(args)
    hy64, cy64 = reference.lstm_cell(*args64)
    torch.autograd.backward((hy64, cy64), (grad_hy.double(), grad_cy.double()))

    poison_cuda_allocator()
    hy, cy = lstm_cuda.lstm_cell(*args)
    torch.autograd.backward((hy, cy), (grad_hy, grad_cy))
    for name, grad, expected in zip(GRAD_NAMES, _grads(args), _grads(args64)):
        assert grad is not None and grad.dtype == dtype, name
        assert_close(grad, expected, RTOL[dtype], f"grad {name}")


@pytest.mark.requires_cuda
def test_cell_gradient_of_one_output_only():
    """Autograd passes no gradient for an unused output; the backward must treat it as zero."""
    args = _cell_args(4, 8, 16, torch.float32, "cuda", requires_grad=True)
    args64 = _float64(args)
    reference.lstm_cell(*args64)[0].sum().backward()
    lstm_cuda.lstm_cell(*args)[0].sum().backward()  # an expanded (stride 0) gradient, cy unused
    for name, grad, expected in zip(GRAD_NAMES, _grads(args), _grads(args64)):
        assert_close(grad, expected, RTOL[torch.float32], f"grad {name}")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_forward_matches_reference(dtype, shape, reverse, recurrence):
    args = _layer_args(*shape, dtype, "cuda")
    expected = reference.lstm_layer(*_float64(args), reverse=reverse)
    with torch.no_grad():
        poison_cuda_allocator()
        results = lstm_cuda.lstm_layer(*args, reverse=reverse, recurrence=recurrence)
    for name, result, want in zip(("output", "h_n", "c_n"), results, expected):
        assert result.dtype == dtype
        assert_close(result, want, RTOL[dtype], name)


LAYER_GRAD_NAMES = ["input", "h0", "c0", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_gradients_match_reference(dtype, shape, reverse, recurrence):
    steps, batch, _, hidden = shape
    args = _layer_args(*shape, dtype, "cuda", requires_grad=True)
    upstream = [
        random_tensor(steps, batch, hidden, dtype=dtype, device="cuda"),
        random_tensor(batch, hidden, dtype=dtype, device="cuda"),
        random_tensor(batch, hidden, dtype=dtype, device="cuda"),
    ]
    args64 = _float64(args)
    torch.autograd.backward(reference.lstm_layer(*args64, reverse=reverse), [g.double() for g in upstream])

    poison_cuda_allocator()
    results = lstm_cuda.lstm_layer(*args, reverse=reverse, recurrence=recurrence)
    # Poison again: the backward's own outputs must not inherit the forward's freed values.
    poison_cuda_allocator()
    torch.autograd.backward(results, upstream)
    for name, grad, expected in zip(LAYER_GRAD_NAMES, _grads(args), _grads(args64)):
        assert grad is not None and grad.dtype == dtype, name
        assert_close(grad, expected, RTOL[dtype], f"grad {name}")


# (steps, batch, input_size, hidden_size, lengths): a length 0, full lengths, any order, a batch above 16.
RAGGED_CASES = [
    (6, 4, 8, 16, [6, 1, 0, 3]),
    (33, 5, 24, 97, [33, 7, 20, 1, 32]),
    (64, 20, 32, 128, [64, 3, 17, 64, 1, 40, 9, 63, 2, 64, 30, 31, 5, 8, 12, 50, 64, 44, 1, 20]),
]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda case: f"T{case[0]}B{case[1]}H{case[3]}")
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_with_lengths_matches_reference(dtype, case, reverse, recurrence):
    steps, batch, input_size, hidden, lengths = case
    lengths = torch.tensor(lengths, device="cuda")
    args = _layer_args(steps, batch, input_size, hidden, dtype, "cuda", requires_grad=True)
    upstream = [
        random_tensor(steps, batch, hidden, dtype=dtype, device="cuda"),
        random_tensor(batch, hidden, dtype=dtype, device="cuda"),
        random_tensor(batch, hidden, dtype=dtype, device="cuda"),
    ]
    args64 = _float64(args)
    expected = reference.lstm_layer(*args64, reverse=reverse, lengths=lengths)
    torch.autograd.backward(expected, [g.double() for g in upstream])

    poison_cuda_allocator()
    results = lstm_cuda.lstm_layer(*args, reverse=reverse, lengths=lengths, recurrence=recurrence)
    for name, result, want in zip(("output", "h_n", "c_n"), results, expected):
        assert_close(result, want, RTOL[dtype], name)
    poison_cuda_allocator()
    torch.autograd.backward(results, upstream)
    for name, grad, want in zip(LAYER_GRAD_NAMES, _grads(args), _grads(args64)):
        assert_close(grad, want, RTOL[dtype], f"grad {name}")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1024])
def test_layer_hidden_1024_persistent_and_stepwise_agree_with_reference(dtype, hidden, recurrence):
    """The on-chip limit case of the issue: H = 1024 in 16-bit fits the persistent kernels on an H100."""
    args = _layer_args(64, 8, 256, hidden, dtype, "cuda", requires_grad=True)
    upstream = random_tensor(64, 8, hidden, dtype=dtype, device="cuda")
    args64 = _float64(args)
    expected = reference.lstm_layer(*args64)
    expected[0].backward(upstream.double())
    output, _, _ = lstm_cuda.lstm_layer(*args, recurrence=recurrence)
    output.backward(upstream)
    assert_close(output, expected[0], RTOL[dtype], "output")
    for name, grad, want in zip(LAYER_GRAD_NAMES, _grads(args), _grads(args64)):
        assert_close(grad, want, RTOL[dtype], f"grad {name}")


# (steps, batch, input_size, hidden_size, proj_size): odd sizes, B = 16 (BM 16 tiles, K split), a batch
# above 16 (BM 64), and H = 1024 / P = 256 (the persistent kernels' W_hh + W_hr slices at scale).
PROJECTION_CASES = [(9, 5, 59, 97, 31), (64, 16, 128, 256, 128), (33, 20, 32, 128, 64), (32, 8, 64, 1024, 256)]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PROJECTION_CASES, ids=lambda c: f"T{c[0]}B{c[1]}H{c[3]}P{c[4]}")
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_layer_with_projection_matches_reference(dtype, case, reverse, ragged, recurrence):
    """proj_size > 0: outputs (P wide), c_n, and every gradient including weight_hr's, poisoned allocations."""
    steps, batch, input_size, hidden, proj = case
    args = _layer_args(steps, batch, input_size, hidden, dtype, "cuda", requires_grad=True)
    h0 = random_tensor(batch, proj, dtype=dtype, device="cuda", requires_grad=True)
    weight_hh = random_tensor(4 * hidden, proj, dtype=dtype, device="cuda", scale=proj**-0.5, requires_grad=True)
    weight_hr = random_tensor(proj, hidden, dtype=dtype, device="cuda", scale=hidden**-0.5, requires_grad=True)
    args[1], args[4] = h0, weight_hh
    lengths = torch.randint(0, steps + 1, (batch,), device="cuda") if ragged else None
    upstream = [random_tensor(steps, batch, proj, dtype=dtype, device="cuda"),
                random_tensor(batch, proj, dtype=dtype, device="cuda"),
                random_tensor(batch, hidden, dtype=dtype, device="cuda")]
    leaves = [*args, weight_hr]
    leaves64 = _float64(leaves)
    expected = reference.lstm_layer(*leaves64[:7], weight_hr=leaves64[7], reverse=reverse, lengths=lengths)
    torch.autograd.backward(expected, [g.double() for g in upstream])

    poison_cuda_allocator()
    results = lstm_cuda.lstm_layer(*args, weight_hr=weight_hr, reverse=reverse, lengths=lengths, recurrence=recurrence)
    for name, result, want in zip(("output", "h_n", "c_n"), results, expected):
        assert result.dtype == dtype
        assert_close(result, want, RTOL[dtype], name)
    poison_cuda_allocator()
    torch.autograd.backward(results, upstream)
    for name, grad, want in zip([*LAYER_GRAD_NAMES, "weight_hr"], _grads(leaves), _grads(leaves64)):
        assert grad is not None and grad.dtype == dtype, name
        assert_close(grad, want, RTOL[dtype], f"grad {name}")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_with_projection_matches_torch_lstm(dtype):
    """A 2-layer bidirectional torch.nn.LSTM with proj_size through pyattn.functional.lstm on the cuda backend."""
    module = torch.nn.LSTM(24, 96, num_layers=2, bidirectional=True, proj_size=40).to(device="cuda", dtype=dtype)
    module64 = copy.deepcopy(module).double()
    sequence = random_tensor(17, 6, 24, dtype=dtype, device="cuda", requires_grad=True)
    sequence64 = sequence.detach().double().requires_grad_()
    with pyattn.use_backend("cuda"):
        output, (h_n, c_n) = pyattn.functional.lstm(sequence, None, module._flat_weights, num_layers=2,
                                                    bidirectional=True, proj_size=40)
    output64, (h_n64, c_n64) = module64(sequence64)
    bound = 1e-4 if dtype == torch.float32 else RTOL[dtype]
    for name, got, want in (("output", output, output64), ("h_n", h_n, h_n64), ("c_n", c_n, c_n64)):
        assert_close(got, want, bound, name)
    (output.float().square().sum() + h_n.float().sum()).backward()
    (output64.square().sum() + h_n64.sum()).backward()
    assert_close(sequence.grad, sequence64.grad, bound, "grad input")
    for name in module._flat_weights_names:
        assert_close(getattr(module, name).grad, getattr(module64, name).grad, bound, f"grad {name}")


@pytest.mark.requires_cuda
@pytest.mark.parametrize(
    ("argument", "change", "message"),
    [
        ("weight_hr", lambda t: t[:, :-1].contiguous(), "weight_hr must have shape"),
        ("weight_hr", lambda t: t[0], "weight_hr must be 2-D"),
        ("weight_hr", lambda t: t.double(), "weight_hr must have dtype"),
        ("h0", lambda t: torch.cat([t, t], 1), "h0 must have shape"),
        ("weight_hh", lambda t: torch.cat([t, t], 1), "weight_hh must have shape"),
    ],
)
def test_layer_with_projection_rejects_bad_arguments_naming_them(argument, change, message):
    steps, batch, input_size, hidden, proj = 4, 3, 8, 16, 5
    args = dict(zip(LAYER_GRAD_NAMES, _layer_args(steps, batch, input_size, hidden, torch.float32, "cuda")))
    args["h0"] = random_tensor(batch, proj, device="cuda")
    args["weight_hh"] = random_tensor(4 * hidden, proj, device="cuda")
    weight_hr = random_tensor(proj, hidden, device="cuda")
    if argument == "weight_hr":
        weight_hr = change(weight_hr)
    else:
        args[argument] = change(args[argument])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyattn.cuda_lstm_layer_fwd(*args.values(), False, None, False, "stepwise", weight_hr)


def _chosen_cuda_variant(args) -> str:
    input, h0 = args[0], args[1]
    request = _registry.Request("lstm", input.device, input.dtype, features=frozenset(),
                                sizes=dict(batch=input.shape[1], hidden_size=h0.shape[1]))
    with pyattn.use_backend("cuda"):
        return _dispatch.choose(request).qualified_name


@pytest.mark.requires_cuda
def test_persistent_recurrence_that_does_not_fit_raises_and_dispatch_takes_stepwise():
    # fp16 H = 2048: 256 CTAs of 8 units with 130 KiB of W_hh each cannot all be resident.
    args = _layer_args(3, 2, 16, 2048, torch.float16, "cuda")
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not fit on chip"):
        lstm_cuda.lstm_layer(*args, recurrence="persistent")
    assert _chosen_cuda_variant(args) == "cuda/stepwise"
    expected = reference.lstm_layer(*_float64(args))
    with torch.no_grad():
        output, h_n, c_n = lstm_cuda.lstm_layer(*args, recurrence="stepwise")
    assert_close(output, expected[0], RTOL[torch.float16], "output")
    assert_close(c_n, expected[2], RTOL[torch.float16], "c_n")



@pytest.mark.requires_cuda
@pytest.mark.parametrize(("hidden", "fits"), [(64, True), (2048, False)], ids=["fits", "does_not_fit"])
def test_persistent_or_stepwise_decides_at_launch_and_matches_reference(hidden, fits):
    """recurrence="persistent_or_stepwise" (what auto passes under torch.compile): the launchers' residency check
    on each call's own sizes picks the persistent kernel where it fits and the per-step loop where it does not
    (fp16 H = 2048: 256 forward CTAs with 128.5 KiB of W_hh rows each cannot all be resident; the backward's 16
    rows of W_hhᵀ alone are 256 KiB), forward and backward, both equal to the reference; the profiler names the
    kernels that ran."""
    args = _layer_args(3, 2, 16, hidden, torch.float16, "cuda")
    assert (lstm_cuda.persistent_launch_refusal(args[0], args[2], None) is None) == fits
    inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in args]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        output, h_n, c_n = lstm_cuda.lstm_layer(*inputs, recurrence="persistent_or_stepwise")
        upstream = [random_tensor(*t.shape, dtype=t.dtype, device=t.device) for t in (output, h_n, c_n)]
        torch.autograd.backward((output, h_n, c_n), upstream)
        torch.cuda.synchronize()
    ran = " ".join(event.key for event in profile.key_averages())
    for direction in ("forward", "backward"):
        assert (f"lstm_persistent_{direction}_kernel" in ran) == fits, (direction, ran)
        assert (f"lstm_step_{direction}_kernel" in ran) != fits, (direction, ran)
    inputs64 = _float64(inputs)
    expected = reference.lstm_layer(*inputs64)
    for name, got, want in zip(("output", "h_n", "c_n"), (output, h_n, c_n), expected):
        assert_close(got, want, RTOL[torch.float16], name)
    torch.autograd.backward(expected, [g.double() for g in upstream])
    for index, (got, want) in enumerate(zip(inputs, inputs64)):
        if isinstance(got, torch.Tensor) and got.requires_grad:
            assert_close(got.grad, want.grad, RTOL[torch.float16], f"grad of argument {index}")


@pytest.mark.requires_cuda
def test_launch_check_on_the_device_admits_what_launches_and_refuses_with_figures():
    """The extension's query (the launchers' own occupancy computation) on the real device: a small layer fits;
    fp16 H = 2048 cannot be co-resident; fp32 H = 1024's backward needs more shared memory than a block may use."""
    assert lstm_cuda._RESIDENCY_QUERY_LOADED, "the extension has no cuda_lstm_persistent_resident: rebuild it"
    index = torch.cuda.current_device()
    query = torch.ops.pyattn.cuda_lstm_persistent_resident
    assert query(16, 256, 0, torch.float16, index) == ""
    assert query(0, 4096, 0, torch.float32, index) == "", "an empty batch launches nothing"
    co_resident = query(2, 2048, 0, torch.float16, index)
    assert co_resident.startswith("forward: 256 CTAs must be co-resident for the grid sync"), co_resident
    assert "registers per thread" in co_resident
    shared = query(4, 1024, 0, torch.float32, index)
    assert shared.startswith("backward: a CTA needs") and "B a block may use" in shared, shared
    args = _layer_args(3, 16, 32, 256, torch.float16, "cuda")
    assert lstm_cuda.persistent_launch_refusal(args[0], args[2], None) is None


@pytest.mark.requires_cuda
def test_auto_persistent_on_the_device_falls_back_where_the_launch_check_refuses(monkeypatch):
    """fp16 H = 2048 through cuda/persistent's auto form: stepwise runs it with the query's reason as a note, matching
    the reference; forced, the same call raises with that reason."""
    monkeypatch.setattr(_registry, "_NOTES", {})
    args = _layer_args(3, 2, 16, 2048, torch.float16, "cuda")
    with torch.no_grad():
        output, _h_n, c_n = _registry.auto_form(_persistent_variant()).implementation.layer(*args, None, False, None)
    expected = reference.lstm_layer(*_float64(args))
    assert_close(output, expected[0], RTOL[torch.float16], "output")
    assert_close(c_n, expected[2], RTOL[torch.float16], "c_n")
    [note] = _registry.notes("lstm")
    assert note.startswith("cuda/persistent: forward: 256 CTAs must be co-resident") and "(cuda/stepwise)" in note
    with torch.no_grad(), pytest.raises(_registry.BackendUnavailableError, match="256 CTAs must be co-resident"):
        _persistent_variant().implementation.layer(*args, None, False, None)


@pytest.mark.requires_cuda
def test_float32_backward_at_hidden_1024_falls_back_to_stepwise():
    """fp32 W_hhᵀ slices for backward need 256 KiB per CTA (> 227 KiB): dispatch must take stepwise."""
    args = _layer_args(8, 4, 32, 1024, torch.float32, "cuda", requires_grad=True)
    assert _chosen_cuda_variant(args) == "cuda/stepwise"
    args64 = _float64(args)
    reference.lstm_layer(*args64)[0].sum().backward()
    lstm_cuda.lstm_layer(*args, recurrence="stepwise")[0].sum().backward()
    for name, grad, want in zip(LAYER_GRAD_NAMES, _grads(args), _grads(args64)):
        assert_close(grad, want, RTOL[torch.float32], f"grad {name}")


@pytest.mark.requires_cuda
def test_poisoned_allocator_really_poisons():
    """The poisoning above is what makes unwritten outputs visible: check it does."""
    poison_cuda_allocator()
    assert torch.isnan(torch.empty(1000, device="cuda")).all()
    assert torch.isnan(torch.empty(1 << 22, device="cuda")).all()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_against_cudnn(dtype, reverse):
    """Error vs float64 within twice cuDNN's own (or a tenth of the table bound), outputs and gradients."""
    steps, batch, input_size, hidden = 128, 16, 64, 256
    module = torch.nn.LSTM(input_size, hidden, bidirectional=reverse).to(device="cuda", dtype=dtype)
    suffix = "_reverse" if reverse else ""
    weights = [getattr(module, f"{name}_l0{suffix}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    sequence = random_tensor(steps, batch, input_size, dtype=dtype, device="cuda", requires_grad=True)
    h0 = random_tensor(batch, hidden, dtype=dtype, device="cuda")
    c0 = random_tensor(batch, hidden, dtype=dtype, device="cuda")
    upstream = random_tensor(steps, batch, hidden, dtype=dtype, device="cuda")

    def run(fn, tensors):
        for t in tensors:
            t.grad = None
        output = fn()
        output.backward(upstream.to(output.dtype))
        return [output.detach()] + [t.grad.clone() for t in tensors]

    inputs64 = [t.detach().double().requires_grad_() for t in [sequence, *weights]]
    ours = run(lambda: lstm_cuda.lstm_layer(sequence, h0, c0, *weights, reverse=reverse, recurrence="stepwise")[0],
               [sequence, *weights])
    expected = run(
        lambda: reference.lstm_layer(inputs64[0], h0.double(), c0.double(), *inputs64[1:], reverse=reverse)[0], inputs64
    )

    def cudnn_output():
        zeros = torch.zeros(2 if reverse else 1, batch, hidden, dtype=dtype, device="cuda")
        h, c = zeros.clone(), zeros.clone()
        h[-1], c[-1] = h0, c0
        output = module(sequence, (h, c))[0]
        return output[..., hidden:] if reverse else output

    try:
        cudnn = run(cudnn_output, [sequence, *weights])
    except RuntimeError as error:  # a torch/cuDNN build without this dtype's RNN: nothing to compare with
        pytest.skip(f"torch.nn.LSTM cannot run {dtype} on this GPU: {error}")
    for name, mine, theirs, want in zip(["output", "grad input", *GRAD_NAMES[3:]], ours, cudnn, expected):
        bound = max(2 * relative_error(theirs, want), RTOL[dtype] / 10)
        assert relative_error(mine, want) <= bound, f"{name}: {relative_error(mine, want):.2e} > {bound:.2e} (cuDNN 2x)"


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_every_op(dtype):
    cell = _cell_args(5, 24, 32, dtype, "cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.pyattn.cuda_lstm_cell_fwd.default, (*cell, True))
    plain_cell = [t.detach() for t in cell]
    hy, cy, workspace = torch.ops.pyattn.cuda_lstm_cell_fwd(*plain_cell, True)
    torch.library.opcheck(
        torch.ops.pyattn.cuda_lstm_cell_bwd.default, (torch.randn_like(hy), torch.randn_like(cy), *plain_cell[:5], cy, workspace)
    )

    layer = _layer_args(6, 5, 24, 32, dtype, "cuda", requires_grad=True)
    lengths = torch.tensor([6, 1, 3, 6, 2], device="cuda")
    for recurrence in ("persistent", "stepwise"):
        for ragged in (None, lengths):
            torch.library.opcheck(torch.ops.pyattn.cuda_lstm_layer_fwd.default, (*layer, True, ragged, True, recurrence))
    plain_layer = [t.detach() for t in layer]
    for ragged in (None, lengths):
        output, h_n, c_n, gates, cell_states = torch.ops.pyattn.cuda_lstm_layer_fwd(*plain_layer, False, ragged, True, "stepwise")
        torch.library.opcheck(
            torch.ops.pyattn.cuda_lstm_layer_bwd.default,
            (torch.randn_like(output), torch.randn_like(h_n), torch.randn_like(c_n), *plain_layer[:5], output, gates,
             cell_states, False, ragged, "stepwise"),
        )
    # With a projection (weight_hr (P, H), h0 and weight_hh's columns P wide).
    proj = 7
    projected = list(layer)
    projected[1] = random_tensor(5, proj, dtype=dtype, device="cuda", requires_grad=True)
    projected[4] = random_tensor(4 * 32, proj, dtype=dtype, device="cuda", scale=proj**-0.5, requires_grad=True)
    weight_hr = random_tensor(proj, 32, dtype=dtype, device="cuda", scale=32**-0.5, requires_grad=True)
    for recurrence in ("persistent", "stepwise"):
        for ragged in (None, lengths):
            torch.library.opcheck(torch.ops.pyattn.cuda_lstm_layer_fwd.default,
                                  (*projected, True, ragged, True, recurrence, weight_hr))


@pytest.mark.requires_cuda
def test_compiles_with_fullgraph():
    args = _layer_args(5, 3, 8, 16, torch.float16, "cuda", requires_grad=True)
    compiled = torch.compile(lambda *a: lstm_cuda.lstm_layer(*a)[0].float().square().sum(), fullgraph=True)
    compiled(*args).backward()
    grads = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    lstm_cuda.lstm_layer(*args)[0].float().square().sum().backward()
    for name, compiled_grad, eager_grad in zip(LAYER_GRAD_NAMES, grads, _grads(args)):
        assert_close(compiled_grad, eager_grad, 1e-6, f"compiled grad {name}")


@pytest.mark.requires_cuda
def test_backward_without_saved_workspace_raises_clearly():
    args = _cell_args(2, 4, 8, torch.float32, "cuda", requires_grad=True)
    hy, _, _ = torch.ops.pyattn.cuda_lstm_cell_fwd(*args, False)
    with pytest.raises(RuntimeError, match="save_for_backward"):
        hy.sum().backward()


@pytest.mark.requires_cuda
@pytest.mark.parametrize(
    ("argument", "change", "message"),
    [
        ("hx", lambda t: t.half(), "hx must have dtype"),
        ("cx", lambda t: t[:, :-1].contiguous(), "cx must have shape"),
        ("weight_ih", lambda t: t[:-4].contiguous(), "weight_ih must have shape"),
        ("weight_hh", lambda t: t.t(), "weight_hh must"),
        ("bias_hh", lambda t: t[:-1].contiguous(), "bias_hh must have shape"),
        ("input", lambda t: t.double(), "input: dtype"),
        ("hx", lambda t: t.cpu(), "hx must be on"),
    ],
)
def test_cell_rejects_bad_arguments_naming_them(argument, change, message):
    args = dict(zip(GRAD_NAMES, _cell_args(3, 8, 8, torch.float32, "cuda")))
    args[argument] = change(args[argument])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyattn.cuda_lstm_cell_fwd(*args.values(), False)


@pytest.mark.requires_cuda
@pytest.mark.parametrize(
    ("argument", "change", "message"),
    [
        ("h0", lambda t: t.bfloat16(), "h0 must have dtype"),
        ("c0", lambda t: t[:-1].contiguous(), "c0 must have shape"),
        ("weight_hh", lambda t: t[:, :-1].contiguous(), "weight_hh must have shape"),
        ("input", lambda t: t[0], "input must be 3-D"),
    ],
)
def test_layer_rejects_bad_arguments_naming_them(argument, change, message):
    args = dict(zip(LAYER_GRAD_NAMES, _layer_args(4, 3, 8, 8, torch.float32, "cuda")))
    args[argument] = change(args[argument])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pyattn.cuda_lstm_layer_fwd(*args.values(), False, None, False, "stepwise")
    good = _layer_args(4, 3, 8, 8, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="recurrence must be"):
        torch.ops.pyattn.cuda_lstm_layer_fwd(*good, False, None, False, "auto")
    with pytest.raises(RuntimeError, match="lengths must be int64"):
        torch.ops.pyattn.cuda_lstm_layer_fwd(*good, False, torch.ones(3, device="cuda", dtype=torch.int32), False,
                                             "stepwise")
    with pytest.raises(RuntimeError, match="lengths must have shape"):
        torch.ops.pyattn.cuda_lstm_layer_fwd(*good, False, torch.ones(2, device="cuda", dtype=torch.int64), False,
                                             "stepwise")


def test_double_backward_through_the_cuda_ops_on_cpu_model(cpu_model_kernels):
    """create_graph=True then a second backward: the ops' backward recomputes with the reference's autograd."""
    args = _layer_args(4, 2, 3, 5, torch.float64, "cpu", requires_grad=True)
    args64 = [t.detach().clone().requires_grad_() if t is not None else None for t in args]
    results = []
    for layer, inputs in ((lambda *a: lstm_cuda.lstm_layer(*a, recurrence="stepwise"), args),
                          (reference.lstm_layer, args64)):
        output, h_n, _ = layer(*inputs)
        first = torch.autograd.grad(output.square().sum() + h_n.sum(), inputs[0], create_graph=True)[0]
        first.sin().sum().backward()
        results.append([first.detach()] + [t.grad for t in inputs if t is not None])
    for index, (got, want) in enumerate(zip(*results, strict=True)):
        assert_close(got, want, 1e-6, f"result {index}")  # the CPU model computes its gates in fp32
    cell = _cell_args(3, 6, 5, torch.float64, "cpu", requires_grad=True)
    hy, cy = lstm_cuda.lstm_cell(*cell)
    (grad_hx,) = torch.autograd.grad(hy.square().sum() + cy.sum(), cell[1], create_graph=True)
    grad_hx.sum().backward()
    cell64 = [t.detach().clone().requires_grad_() for t in cell]
    hy64, cy64 = reference.lstm_cell(*cell64)
    (grad_hx64,) = torch.autograd.grad(hy64.square().sum() + cy64.sum(), cell64[1], create_graph=True)
    grad_hx64.sum().backward()
    for got, want in zip(cell, cell64):
        assert_close(got.grad, want.grad, 1e-6)
