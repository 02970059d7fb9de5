"""The LSTM reference ops (``pyattn.reference.lstm``) against torch's LSTM in float64.

These are the ground truth every kernel is tested against, so they are checked here on their own:
values, final states and gradients against ``torch.nn.LSTM`` / ``LSTMCell`` (lengths via torch's
PackedSequence, reverse via its bidirectional layer), ``gradcheck`` on tiny cases, and half
precision against an upcast float64 run of the same inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tests.conftest import RTOL, assert_close, random_tensor
from pyattn.reference import lstm as reference

F64 = torch.float64


def _layer_weights(input_size, hidden_size, proj_size, dtype=F64, requires_grad=False):
    """weight_ih, weight_hh, bias_ih, bias_hh, weight_hr (or None) with fresh random values."""
    output_size = proj_size or hidden_size
    shapes = [(4 * hidden_size, input_size), (4 * hidden_size, output_size), (4 * hidden_size,), (4 * hidden_size,)]
    weights = [random_tensor(*shape, dtype=dtype, scale=0.5, requires_grad=requires_grad) for shape in shapes]
    projection = random_tensor(proj_size, hidden_size, dtype=dtype, scale=0.5, requires_grad=requires_grad)
    weights.append(projection if proj_size else None)
    return weights


def _torch_bidirectional(forward_weights, reverse_weights, proj_size, use_bias):
    """A one-layer bidirectional torch.nn.LSTM holding the given weights (its reverse half is our reverse=True)."""
    input_size, hidden_size = forward_weights[0].shape[1], forward_weights[0].shape[0] // 4
    module = torch.nn.LSTM(input_size, hidden_size, bias=use_bias, bidirectional=True, proj_size=proj_size, dtype=F64)
    with torch.no_grad():
        for suffix, weights in (("", forward_weights), ("_reverse", reverse_weights)):
            for name, value in zip(("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"), weights):
                if hasattr(module, f"{name}_l0{suffix}"):
                    getattr(module, f"{name}_l0{suffix}").copy_(value)
    return module


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("batch", [1, 5])
def test_cell_matches_torch(batch, use_bias):
    input_size, hidden_size = 7, 6
    x = random_tensor(batch, input_size, dtype=F64, requires_grad=True)
    h = random_tensor(batch, hidden_size, dtype=F64, requires_grad=True)
    c = random_tensor(batch, hidden_size, dtype=F64, requires_grad=True)
    weight_ih, weight_hh, bias_ih, bias_hh, _ = _layer_weights(input_size, hidden_size, 0, requires_grad=True)
    if not use_bias:
        bias_ih = bias_hh = None
    inputs = [t for t in (x, h, c, weight_ih, weight_hh, bias_ih, bias_hh) if t is not None]

    hy, cy = reference.lstm_cell(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
    expected_hy, expected_cy = torch.lstm_cell(x, (h, c), weight_ih, weight_hh, bias_ih, bias_hh)
    assert_close(hy, expected_hy, RTOL[F64], "hy")
    assert_close(cy, expected_cy, RTOL[F64], "cy")

    grad_h, grad_c = random_tensor(batch, hidden_size, dtype=F64), random_tensor(batch, hidden_size, dtype=F64)
    ours = torch.autograd.grad((hy, cy), inputs, (grad_h, grad_c))
    theirs = torch.autograd.grad((expected_hy, expected_cy), inputs, (grad_h, grad_c))
    for index, (got, want) in enumerate(zip(ours, theirs)):
        assert_close(got, want, RTOL[F64], f"grad of input {index}")


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_matches_torch_both_directions(ragged, proj_size, use_bias):
    steps, batch, input_size, hidden_size = 6, 4, 5, 6
    output_size = proj_size or hidden_size
    x = random_tensor(steps, batch, input_size, dtype=F64, requires_grad=True)
    h0 = random_tensor(2, batch, output_size, dtype=F64, requires_grad=True)
    c0 = random_tensor(2, batch, hidden_size, dtype=F64, requires_grad=True)
    directions = [_layer_weights(input_size, hidden_size, proj_size) for _ in range(2)]
    if not use_bias:
        for weights in directions:
            weights[2] = weights[3] = None
    # Lengths in no particular order, one full and one of a single step, to reach every masking edge.
    lengths = torch.tensor([3, steps, 1, 4]) if ragged else None

    outputs, h_n, c_n = [], [], []
    for index, weights in enumerate(directions):
        output, h, c = reference.lstm_layer(x, h0[index], c0[index], *weights, reverse=index == 1, lengths=lengths)
        outputs.append(output)
        h_n.append(h)
        c_n.append(c)
    output, h_n, c_n = torch.cat(outputs, -1), torch.stack(h_n), torch.stack(c_n)

    module = _torch_bidirectional(*directions, proj_size=proj_size, use_bias=use_bias)
    if ragged:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        expected_packed, (expected_h, expected_c) = module(packed, (h0, c0))
        expected, _ = pad_packed_sequence(expected_packed, total_length=steps)
    else:
        expected, (expected_h, expected_c) = module(x, (h0, c0))
    assert_close(output, expected, RTOL[F64], "output")
    assert_close(h_n, expected_h, RTOL[F64], "h_n")
    assert_close(c_n, expected_c, RTOL[F64], "c_n")
    if ragged:
        past_end = torch.arange(steps)[:, None] >= lengths[None, :]
        assert (output[past_end] == 0).all(), "output past a sequence's length must be exactly zero"

    upstream = [random_tensor(*t.shape, dtype=F64) for t in (output, h_n, c_n)]
    inputs = [x, h0, c0, *module.parameters()]
    ours = torch.autograd.grad((output, h_n, c_n), [x, h0, c0], upstream)
    theirs = torch.autograd.grad((expected, expected_h, expected_c), inputs, upstream)
    for name, got, want in zip(("input", "h0", "c0"), ours, theirs):
        assert_close(got, want, RTOL[F64], f"grad {name}")
    # Weight gradients: recompute ours with weights as leaves, against torch's parameter grads in its order.
    leaves = [[w.detach().requires_grad_() if w is not None else None for w in weights] for weights in directions]
    recomputed = [
        reference.lstm_layer(x, h0[index], c0[index], *leaves[index], reverse=index == 1, lengths=lengths)
        for index in range(2)
    ]
    output = torch.cat([r[0] for r in recomputed], -1)
    h_n, c_n = torch.stack([r[1] for r in recomputed]), torch.stack([r[2] for r in recomputed])
    leaf_list = [w for weights in leaves for w in weights if w is not None]
    ours = torch.autograd.grad((output, h_n, c_n), leaf_list, upstream)
    for index, (got, want) in enumerate(zip(ours, theirs[3:])):
        assert_close(got, want, RTOL[F64], f"grad of weight {index}")


@pytest.mark.parametrize("reverse", [False, True])
def test_layer_gradcheck_tiny(reverse):
    steps, batch, input_size, hidden_size, proj_size = 3, 2, 2, 3, 2
    x = random_tensor(steps, batch, input_size, dtype=F64, requires_grad=True)
    h0 = random_tensor(batch, proj_size, dtype=F64, requires_grad=True)
    c0 = random_tensor(batch, hidden_size, dtype=F64, requires_grad=True)
    weights = _layer_weights(input_size, hidden_size, proj_size, requires_grad=True)
    lengths = torch.tensor([2, 3])

    def layer(*tensors):
        return reference.lstm_layer(*tensors, reverse=reverse, lengths=lengths)

    assert torch.autograd.gradcheck(layer, (x, h0, c0, *weights))


def test_cell_gradcheck_tiny():
    x = random_tensor(2, 3, dtype=F64, requires_grad=True)
    h, c = (random_tensor(2, 4, dtype=F64, requires_grad=True) for _ in range(2))
    weights = _layer_weights(3, 4, 0, requires_grad=True)[:4]
    assert torch.autograd.gradcheck(reference.lstm_cell, (x, h, c, *weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_against_float64(dtype):
    """Low-precision inputs compute in fp32 and round only at the ends: within RTOL of float64 on the same values."""
    steps, batch, input_size, hidden_size, proj_size = 8, 3, 16, 32, 8
    x = random_tensor(steps, batch, input_size, dtype=dtype, requires_grad=True)
    h0 = random_tensor(batch, proj_size, dtype=dtype, requires_grad=True)
    c0 = random_tensor(batch, hidden_size, dtype=dtype, requires_grad=True)
    weights = _layer_weights(input_size, hidden_size, proj_size, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([8, 5, 2])
    upcast = [t.detach().to(F64).requires_grad_() for t in (x, h0, c0, *weights)]

    outputs = reference.lstm_layer(x, h0, c0, *weights, reverse=True, lengths=lengths)
    expected = reference.lstm_layer(*upcast, reverse=True, lengths=lengths)
    for name, got, want in zip(("output", "h_n", "c_n"), outputs, expected):
        assert got.dtype == dtype, f"{name} must keep the input dtype"
        assert_close(got, want, RTOL[dtype], name)

    upstream = [random_tensor(*t.shape, dtype=F64) for t in expected]
    grads = torch.autograd.grad(outputs, (x, h0, c0, *weights), [u.to(dtype) for u in upstream])
    expected_grads = torch.autograd.grad(expected, upcast, upstream)
    for index, (got, want) in enumerate(zip(grads, expected_grads)):
        assert got.dtype == dtype
        assert_close(got, want, RTOL[dtype], f"grad of input {index}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cell_half_precision_against_float64(dtype):
    batch, input_size, hidden_size = 5, 16, 32
    inputs = [
        random_tensor(batch, input_size, dtype=dtype),
        random_tensor(batch, hidden_size, dtype=dtype),
        random_tensor(batch, hidden_size, dtype=dtype),
        *_layer_weights(input_size, hidden_size, 0, dtype=dtype)[:4],
    ]
    hy, cy = reference.lstm_cell(*inputs)
    want_hy, want_cy = reference.lstm_cell(*(t.to(F64) for t in inputs))
    assert (hy.dtype, cy.dtype) == (dtype, dtype)
    assert_close(hy, want_hy, RTOL[dtype], "hy")
    assert_close(cy, want_cy, RTOL[dtype], "cy")
