"""The LSTM API: ``pyattn.functional.lstm*`` validation (errors name the argument), requests, explain, forcing.

Forced onto the "reference" backend where a call runs; the semantics against torch are in
test_lstm_module.py (modules) and test_lstm_reference.py (the reference itself).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import pyattn
from tests.conftest import random_tensor
from tests.test_lstm_module import BATCH, HIDDEN_SIZE, INPUT_SIZE, RAGGED_LENGTHS, STEPS, _module_pair

F64 = torch.float64


@pytest.fixture(autouse=True)
def _reference_backend():
    with pyattn.use_backend("reference"):
        yield


def test_functional_errors_name_the_argument():
    x = random_tensor(STEPS, BATCH, INPUT_SIZE, dtype=F64)
    ours, _ = _module_pair(num_layers=2, bidirectional=True)
    params = list(ours.parameters())
    with pytest.raises(ValueError, match="params must hold 16 tensors"):
        pyattn.functional.lstm(x, None, params[:-1], num_layers=2, bidirectional=True)
    broken = list(params)
    broken[5] = random_tensor(4 * HIDDEN_SIZE, HIDDEN_SIZE + 1, dtype=F64)
    with pytest.raises(RuntimeError, match=r"params\[5\] \(weight_hh_l0_reverse\) must have shape \(24, 6\)"):
        pyattn.functional.lstm(x, None, broken, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"params\[3\] \(bias_hh_l0\) dtype"):
        mixed = params[:3] + [params[3].float()] + params[4:]
        pyattn.functional.lstm(x, None, mixed, num_layers=2, bidirectional=True)
    with pytest.raises(RuntimeError, match=r"hx\[0\] is on meta but input is on cpu"):
        h_0 = torch.empty(4, BATCH, HIDDEN_SIZE, dtype=F64, device="meta")
        c_0 = random_tensor(4, BATCH, HIDDEN_SIZE, dtype=F64)
        pyattn.functional.lstm(x, (h_0, c_0), params, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match="dropout should be a number in range"):
        pyattn.functional.lstm(x, None, params, num_layers=2, bidirectional=True, dropout=2.0)


def test_cell_errors_name_the_argument():
    cell = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    x = random_tensor(BATCH, INPUT_SIZE, dtype=F64)
    state = random_tensor(BATCH, HIDDEN_SIZE, dtype=F64)
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D"):
        cell(x[None])
    with pytest.raises(RuntimeError, match="input has inconsistent input_size: got 5 expected 4"):
        cell(random_tensor(BATCH, INPUT_SIZE + 1, dtype=F64))
    with pytest.raises(RuntimeError, match=r"hx\[0\] \(h\) must have shape .* = \(3, 6\), got \(4, 6\)"):
        cell(x, (random_tensor(BATCH + 1, HIDDEN_SIZE, dtype=F64), state))
    with pytest.raises(RuntimeError, match=r"hx\[1\] \(c\) must have shape .* = \(6,\), got \(1, 6\)"):
        cell(x[0], (state[0], state[:1]))
    with pytest.raises(ValueError, match=r"Expected hx\[1\] to be 1D or 2D, got 3D"):
        cell(x, (state, state[None]))
    with pytest.raises(ValueError, match=r"hx\[0\] dtype \(torch.float32\) does not match input dtype"):
        cell(x, (state.float(), state))
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape"):
        pyattn.functional.lstm_cell(x, None, cell.weight_ih, cell.weight_hh[:, :-1])



def test_cell_memo_is_keyed_on_every_operand(monkeypatch):
    """A step's plan is memoised; a later call that differs in any operand's shape, dtype or device, in
    a missing bias or in the forced backend is planned afresh (so its error names the argument)."""
    cell = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    x = random_tensor(BATCH, INPUT_SIZE, dtype=F64)
    h, c = random_tensor(BATCH, HIDDEN_SIZE, dtype=F64), random_tensor(BATCH, HIDDEN_SIZE, dtype=F64)
    weights = (cell.weight_ih, cell.weight_hh)
    cell(x, (h, c))  # memoised
    with pytest.raises(ValueError, match=r"hx\[1\] dtype \(torch.float32\) does not match input dtype"):
        cell(x, (h, c.float()))
    with pytest.raises(RuntimeError, match=r"hx\[1\] is on meta but input is on cpu"):
        cell(x, (h, torch.empty_like(c, device="meta")))
    with pytest.raises(RuntimeError, match=r"hx\[0\] \(h\) must have shape .* = \(3, 6\), got \(3, 7\)"):
        cell(x, (random_tensor(BATCH, HIDDEN_SIZE + 1, dtype=F64), c))
    with pytest.raises(ValueError, match=r"bias_hh dtype \(torch.float32\) does not match input dtype"):
        pyattn.functional.lstm_cell(x, (h, c), *weights, cell.bias_ih, cell.bias_hh.float())
    with pytest.raises(ValueError, match=r"bias_ih dtype \(torch.float32\) does not match input dtype"):
        pyattn.functional.lstm_cell(x, (h, c), *weights, cell.bias_ih.float(), cell.bias_hh)
    with pytest.raises(ValueError, match=r"weight_hh dtype \(torch.float32\) does not match input dtype"):
        pyattn.functional.lstm_cell(x, (h, c), cell.weight_ih, cell.weight_hh.float(), cell.bias_ih, cell.bias_hh)
    with pytest.raises(TypeError, match=r"hx\[1\] must be a Tensor"):
        pyattn.functional.lstm_cell(x, (h, c.tolist()), *weights, cell.bias_ih, cell.bias_hh)
    # A missing bias on one side is a different plan from both biases (and from none).
    with_both = pyattn.functional.lstm_cell(x, (h, c), *weights, cell.bias_ih, cell.bias_hh)
    only_ih = pyattn.functional.lstm_cell(x, (h, c), *weights, cell.bias_ih, None)
    expected = pyattn.reference.lstm.lstm_cell(x, h, c, *weights, cell.bias_ih, None)
    torch.testing.assert_close(only_ih, expected, rtol=0, atol=0)
    assert not torch.equal(with_both[0], only_ih[0])
    # The forced backend is part of the key: a memoised reference plan does not serve a forced triton.
    monkeypatch.setattr("pyattn._triton._INTERPRETER", False)
    if not torch.cuda.is_available():
        with pyattn.use_backend("triton"), pytest.raises(pyattn.BackendUnavailableError, match="'triton' cannot serve"):
            cell(x, (h, c))

def test_cpu_step_torch_serves_skips_planning_but_not_the_checks(monkeypatch):
    """Once auto has chosen torch's kernel for a batched CPU step of a dtype, later steps go straight to it (no
    plan: its Python would cost 5% of a B16 H256 step); torch's kernel checks the sizes, and a call it rejects,
    or a bias it would broadcast, still gets pyattn's error. A forced backend and explain plan as before."""
    functional_lstm = sys.modules["pyattn.functional.lstm"]  # the module (pyattn.functional.lstm is the function)
    with pyattn.use_backend("auto"):  # this file forces reference elsewhere
        _check_cpu_step_fast_path(functional_lstm, monkeypatch)


def _check_cpu_step_fast_path(functional_lstm, monkeypatch):

    cell = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    torch_cell = torch.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, dtype=F64)
    torch_cell.load_state_dict(cell.state_dict())
    x = random_tensor(BATCH, INPUT_SIZE, dtype=F64)
    h, c = random_tensor(BATCH, HIDDEN_SIZE, dtype=F64), random_tensor(BATCH, HIDDEN_SIZE, dtype=F64)
    cell(x, (h, c))  # planned: auto chose torch's kernel
    planned = []
    real_plan = functional_lstm._plan_lstm_cell
    monkeypatch.setattr(functional_lstm, "_plan_lstm_cell", lambda *a: planned.append(a) or real_plan(*a))
    functional_lstm._CELL_PLANS.clear()
    got = cell(x, (h, c))
    assert planned == []  # served without planning
    torch.testing.assert_close(got, torch_cell(x, (h, c)), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"hx\[0\] \(h\) must have shape .* = \(3, 6\), got \(3, 7\)"):
        cell(x, (random_tensor(BATCH, HIDDEN_SIZE + 1, dtype=F64), c))
    wide = random_tensor(BATCH, HIDDEN_SIZE + 1, dtype=F64)  # h and c agree: torch's kernel itself rejects them
    with pytest.raises(RuntimeError, match=r"hx\[0\] \(h\) must have shape .* = \(3, 6\), got \(3, 7\)"):
        cell(x, (wide, wide))
    with pytest.raises(TypeError, match=r"hx\[0\] must be a Tensor"):
        cell(x, (None, c))
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape"):  # 4 gate rows for H = 6: never run
        pyattn.functional.lstm_cell(x, (h, c), cell.weight_ih[:4], cell.weight_hh[:4])
    # torch's kernel would promote an fp32 c and broadcast a (1, H) c or a (1,) bias: pyattn's checks run first.
    with pytest.raises(ValueError, match=r"hx\[1\] dtype \(torch.float32\) does not match input dtype"):
        cell(x, (h, c.float()))
    with pytest.raises(RuntimeError, match=r"hx\[1\] \(c\) must have shape .* = \(3, 6\), got \(1, 6\)"):
        cell(x, (h, c[:1]))
    with pytest.raises(RuntimeError, match=r"bias_hh must have shape .* = \(24,\), got \(1,\)"):
        pyattn.functional.lstm_cell(x, (h, c), cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh[:1])
    planned.clear()
    with pyattn.use_backend("reference"):
        cell(x, (h, c))
    assert len(planned) == 1


@pytest.mark.parametrize("make_module", ["lstm", "cell"])
def test_forcing_triton_without_a_gpu_or_interpreter_raises(make_module, monkeypatch):
    monkeypatch.setattr("pyattn._triton._INTERPRETER", False)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: Triton can run here")
    if make_module == "lstm":
        module, x = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE), random_tensor(STEPS, BATCH, INPUT_SIZE)
    else:
        module, x = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE), random_tensor(BATCH, INPUT_SIZE)
    with pyattn.use_backend("triton"), pytest.raises(pyattn.BackendUnavailableError, match="'triton' cannot serve"):
        module(x)


def test_explain_on_meta_tensors():
    module = pyattn.nn.LSTM(INPUT_SIZE, HIDDEN_SIZE, num_layers=2, proj_size=2, device="meta")
    padded = torch.empty(STEPS, BATCH, INPUT_SIZE, device="meta")
    packed = pack_padded_sequence(padded, RAGGED_LENGTHS, enforce_sorted=False)
    report = pyattn.explain("lstm", packed, None, module._flat_weights, num_layers=2, proj_size=2)
    assert "op=lstm device=meta dtype=float32 features=lengths,projection" in report
    assert "reference serves" in " ".join(report.split())
    assert report.endswith("'reference' (forced) runs: reference")  # the autouse fixture forces it

    cell = pyattn.nn.LSTMCell(INPUT_SIZE, HIDDEN_SIZE, device="meta")
    report = pyattn.explain(pyattn.functional.lstm_cell, torch.empty(BATCH, INPUT_SIZE, device="meta"), None,
                            cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    assert "op=lstm_cell device=meta dtype=float32" in report
    with pytest.raises(RuntimeError, match="input has inconsistent input_size"):
        wide = torch.empty(BATCH, INPUT_SIZE + 1, device="meta")
        pyattn.explain("lstm_cell", wide, None, cell.weight_ih, cell.weight_hh)
