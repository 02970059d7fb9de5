"""LSTM functional API: ``torch.nn.LSTMCell`` / ``torch.nn.LSTM`` semantics on pyattn's dispatched ops.

    lstm_cell(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None) -> (h', c')
    lstm(input, hx, params, *, num_layers=1, bias=True, batch_first=False, dropout=0.0,
         training=False, bidirectional=False, proj_size=0) -> (output, (h_n, c_n))

Every argument is validated here, once, with messages that name it; the dispatch ops
(``lstm_cell``, ``lstm``, see ``pyattn/ops/lstm_common.py``) trust what they are given. Gate order and
math are torch's: (i, f, g, o); c' = σ(f)c + σ(i)tanh(g); h' = σ(o)tanh(c') (then h'·W_hrᵀ).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from pyattn import _dispatch

__all__ = ["lstm_cell", "lstm", "lstm_parameter_layout"]


def _size(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _require_tensor(value, name: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def _autocast_dtype(device: torch.device, op: str) -> torch.dtype | None:
    """The dtype torch's autocast would run this op in on ``device``, or None when it would not cast."""
    if device.type not in ("cpu", "cuda"):
        return None
    # Torch's CPU autocast lists the sequence LSTM but leaves lstm_cell in fp32; its CUDA one lists both.
    if op == "lstm_cell" and device.type == "cpu":
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _check_matches_input(input: torch.Tensor, named: list[tuple[str, torch.Tensor]], check_dtype: bool) -> None:
    for name, tensor in named:
        if check_dtype and tensor.dtype != input.dtype:
            raise ValueError(
                f"{name} dtype ({tensor.dtype}) does not match input dtype ({input.dtype}); "
                f"convert one of them (e.g. input.to({tensor.dtype}) or the module .to({input.dtype}))"
            )
        if tensor.device != input.device:
            raise RuntimeError(f"{name} is on {tensor.device} but input is on {input.device}; move them to one device")


def _cast_all(tensors, dtype: torch.dtype | None):
    if dtype is None:
        return tensors
    return [None if t is None else t.to(dtype) for t in tensors]


def _kernel_context(autocast_dtype: torch.dtype | None, device: torch.device):
    # The kernels choose their own precision (fp32 gate math); autocast must not re-cast inside them.
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------
# lstm_cell


@dataclass(frozen=True)
class _CellPlan:
    batched: bool
    batch: int
    hidden_size: int
    autocast_dtype: torch.dtype | None
    request: _dispatch.Request


def _plan_lstm_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh) -> _CellPlan:
    _require_tensor(input, "input")
    _require_tensor(weight_ih, "weight_ih")
    _require_tensor(weight_hh, "weight_hh")
    if input.dim() not in (1, 2):
        raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
    batched = input.dim() == 2
    if weight_ih.dim() != 2 or weight_ih.size(0) % 4 != 0:
        raise RuntimeError(f"weight_ih must have shape (4 * hidden_size, input_size), got {_size(weight_ih)}")
    hidden_size, input_size = weight_ih.size(0) // 4, weight_ih.size(1)
    if _size(weight_hh) != (4 * hidden_size, hidden_size):
        raise RuntimeError(
            f"weight_hh must have shape (4 * hidden_size, hidden_size) = {(4 * hidden_size, hidden_size)} "
            f"(hidden_size from weight_ih), got {_size(weight_hh)}"
        )
    named = [("weight_ih", weight_ih), ("weight_hh", weight_hh)]
    for name, bias in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if bias is None:
            continue
        _require_tensor(bias, name)
        if _size(bias) != (4 * hidden_size,):
            raise RuntimeError(f"{name} must have shape (4 * hidden_size,) = ({4 * hidden_size},), got {_size(bias)}")
        named.append((name, bias))
    if input.size(-1) != input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {input.size(-1)} expected {input_size}")
    batch = input.size(0) if batched else 1
    if hx is not None:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx must be None or a pair (h, c) of tensors, got {type(hx).__name__}")
        for index, (name, state) in enumerate(zip(("h", "c"), hx)):
            _require_tensor(state, f"hx[{index}]")
            if state.dim() not in (1, 2):
                raise ValueError(f"LSTMCell: Expected hx[{index}] to be 1D or 2D, got {state.dim()}D instead")
            expected = (batch, hidden_size) if batched else (hidden_size,)
            if _size(state) != expected:
                layout = "(batch, hidden_size)" if batched else "(hidden_size,) for unbatched input"
                raise RuntimeError(f"hx[{index}] ({name}) must have shape {layout} = {expected}, got {_size(state)}")
            named.append((f"hx[{index}]", state))
    autocast_dtype = _autocast_dtype(input.device, "lstm_cell")
    _check_matches_input(input, named, check_dtype=autocast_dtype is None)
    dtype = autocast_dtype if autocast_dtype is not None else input.dtype
    request = _dispatch.Request(op="lstm_cell", device=input.device, dtype=dtype,
                                sizes=dict(batch=batch, input_size=input_size, hidden_size=hidden_size))
    return _CellPlan(batched, batch, hidden_size, autocast_dtype, request)


_TENSOR = torch.Tensor
# The operands' usual types: `type(x) in` costs a fifth of isinstance (Tensor's metaclass hooks isinstance).
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
# One call answers "is autocast on for any device" (the common answer is no); torch has had it since 2.1.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_is_compiling = torch.compiler.is_compiling


def _is_tensor(value) -> bool:
    return type(value) in _PLAIN_TENSOR_TYPES or isinstance(value, _TENSOR)


def _cell_key(input, hx, weight_ih, weight_hh, bias_ih, bias_hh) -> tuple | None:
    """What the plan of a cell step depends on: each operand's (shape, dtype, device), the autocast
    state, the forced backend and the interpreter switch. None when an operand is not a tensor (or hx
    not a pair): planning then raises the error, so such a call is never memoised. Every step runs it
    and it is most of pyattn's own cost there (≈5 µs warm on a 2-core VM), so it reads each attribute
    once and checks types with `type(x) in` before isinstance."""
    if hx is None:
        h = c = None
    elif type(hx) in (tuple, list) and len(hx) == 2:
        h, c = hx
        if not (_is_tensor(h) and _is_tensor(c)):
            return None
    else:
        return None
    if not (_is_tensor(input) and _is_tensor(weight_ih) and _is_tensor(weight_hh)
            and (bias_ih is None or _is_tensor(bias_ih)) and (bias_hh is None or _is_tensor(bias_hh))):
        return None
    device = input.device
    autocast = _any_autocast_enabled() and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
    return (input.shape, input.dtype, device,
            None if h is None else (h.shape, h.dtype, h.device), None if c is None else (c.shape, c.dtype, c.device),
            weight_ih.shape, weight_ih.dtype, weight_ih.device, weight_hh.shape, weight_hh.dtype, weight_hh.device,
            None if bias_ih is None else (bias_ih.shape, bias_ih.dtype, bias_ih.device),
            None if bias_hh is None else (bias_hh.shape, bias_hh.dtype, bias_hh.device),
            autocast and torch.get_autocast_dtype(device.type), _dispatch.default_backend(),
            _dispatch.triton_interpreter_enabled())


# A cell step is short (tens of microseconds on a GPU, a few hundred on a CPU), so validation and the
# choice must cost little: both depend only on what _cell_key holds, which keys this memo (plain dict:
# bounded, cleared when full; bypassed while torch.compile traces and while explain captures requests).
_CELL_PLANS: dict[tuple, tuple] = {}
_CELL_PLANS_LIMIT = 256


def _planned_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh) -> tuple[_CellPlan, object]:
    key = None if _is_compiling() else _cell_key(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    cached = None if key is None else _CELL_PLANS.get(key)
    if cached is None or _dispatch.capturing():  # explain must see the request, not a memo hit
        plan = _plan_lstm_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
        variant = _dispatch.choose(plan.request)
        cached = plan, variant.implementation
        if key is not None:
            if len(_CELL_PLANS) >= _CELL_PLANS_LIMIT:
                _CELL_PLANS.clear()
            _CELL_PLANS[key] = cached
            _remember_torch_cpu_step(plan, variant)
    return cached


# The CPU step that torch's own kernel serves, by dtype. Once the full path above has chosen the torch
# backend for a batched CPU step of a dtype under plain auto, later such steps skip pyattn's planning and
# go straight to that implementation: on a CPU the choice depends on the dtype alone (the torch and
# reference backends have no size checks), and torch's kernel checks the sizes, dtypes and devices itself,
# in C++. Planning's Python costs ≈ 7 µs a step warm, but 20–30 µs after a B16 H256 step's GEMMs have
# evicted the interpreter's working set: 5% of such a step, which pyattn.nn.LSTMCell must not add to
# torch.nn.LSTMCell. A call torch's kernel rejects runs the full path, which raises pyattn's error.
_TORCH_CPU_STEPS: dict[torch.dtype, object] = {}


def _remember_torch_cpu_step(plan: _CellPlan, variant) -> None:
    request = plan.request
    if (variant.backend == "torch" and request.device.type == "cpu" and plan.batched and plan.autocast_dtype is None
            and _dispatch.default_backend() == _dispatch.AUTO and not _dispatch.triton_interpreter_enabled()):
        _TORCH_CPU_STEPS[request.dtype] = variant.implementation


def _torch_cpu_step(input, hx, weight_ih, weight_hh, bias_ih, bias_hh):
    """The implementation of ``_TORCH_CPU_STEPS`` for this call, or None where the full path must run: not a
    plain batched CPU tensor step with (h, c), a forced backend, explain or autocast on, or operands whose
    types, dtypes and sizes do not all agree (torch's kernel checks the batch and the input size)."""
    if type(input) not in _PLAIN_TENSOR_TYPES or type(hx) is not tuple or len(hx) != 2:
        return None
    implementation = _TORCH_CPU_STEPS.get(input.dtype)
    if (implementation is None or not input.is_cpu or input.dim() != 2 or _dispatch.capturing()
            or _any_autocast_enabled() or _dispatch.default_backend() != _dispatch.AUTO):
        return None
    # Only plain 2-D operands of the input's dtype whose gate sizes agree: what torch's kernel might broadcast,
    # promote (c), or (before torch 2.10) not check at all, takes the full path and its error.
    h, c = hx
    plain = _PLAIN_TENSOR_TYPES
    if type(h) not in plain or type(c) not in plain or type(weight_ih) not in plain or type(weight_hh) not in plain:
        return None
    dtype = input.dtype
    if h.dtype != dtype or c.dtype != dtype or h.dim() != 2 or c.shape != h.shape or weight_ih.dim() != 2:
        return None
    gates, hidden = weight_ih.shape[0], h.shape[1]
    if weight_hh.shape != (gates, hidden) or gates != 4 * hidden or weight_ih.shape[1] != input.shape[1]:
        return None
    for bias in (bias_ih, bias_hh):
        if bias is not None and (type(bias) not in plain or bias.shape != (gates,) or bias.dtype != dtype):
            return None
    return implementation


def lstm_cell_request(input, hx, weight_ih, weight_hh, bias_ih=None, bias_hh=None) -> _dispatch.Request:
    """The dispatch request :func:`lstm_cell` would make (validates; reads no tensor data)."""
    return _plan_lstm_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh).request


def lstm_cell(
    input: torch.Tensor,
    hx: tuple[torch.Tensor, torch.Tensor] | None,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step, as ``torch.nn.LSTMCell``.

    Args:
        input: (B, I) or unbatched (I,).
        hx: ``(h, c)`` each (B, H) (or (H,) when unbatched), or None for zeros.
        weight_ih: (4H, I); weight_hh: (4H, H); bias_ih, bias_hh: (4H,) or None. Gate order (i, f, g, o).

    Returns:
        ``(h', c')`` each (B, H) (or (H,)), in the input dtype; fp16/bf16 gate math runs in fp32.
        Under autocast on CUDA the step runs in the autocast dtype, as torch's does.
    """
    implementation = None  # torch.compile asked first: tracing must not guard on _TORCH_CPU_STEPS
    if not _is_compiling() and _TORCH_CPU_STEPS:
        implementation = _torch_cpu_step(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    if implementation is not None:
        try:
            return implementation(input, hx[0], hx[1], weight_ih, weight_hh, bias_ih, bias_hh)
        except (RuntimeError, TypeError, IndexError):
            pass  # the full path raises pyattn's message for what torch's kernel rejected
    shape, implementation = _planned_cell(input, hx, weight_ih, weight_hh, bias_ih, bias_hh)
    if shape.batched and hx is not None and shape.autocast_dtype is None:  # the common step: nothing to adapt
        return implementation(input, hx[0], hx[1], weight_ih, weight_hh, bias_ih, bias_hh)
    if not shape.batched:
        input = input.unsqueeze(0)
    if hx is None:
        zeros = input.new_zeros(shape.batch, shape.hidden_size, dtype=shape.request.dtype)
        h, c = zeros, zeros
    else:
        h, c = hx if shape.batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
    input, h, c, weight_ih, weight_hh, bias_ih, bias_hh = _cast_all(
        [input, h, c, weight_ih, weight_hh, bias_ih, bias_hh], shape.autocast_dtype
    )
    with _kernel_context(shape.autocast_dtype, input.device):
        hy, cy = implementation(input, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
    if not shape.batched:
        hy, cy = hy.squeeze(0), cy.squeeze(0)
    return hy, cy


# ---------------------------------------------------------------------------------------------------
# lstm (multi-layer, bidirectional, packed)


@dataclass(frozen=True)
class _LSTMPlan:
    batched: bool
    steps: int
    batch: int
    hidden_size: int
    output_size: int  # P: proj_size when projecting, else hidden_size
    directions: int
    per_direction: int  # tensors in params per (layer, direction)
    ragged: bool  # a PackedSequence whose lengths differ: the "lengths" feature
    autocast_dtype: torch.dtype | None
    request: _dispatch.Request


def _parameter_kinds(bias: bool, proj_size: int) -> list[str]:
    """The tensors of one (layer, direction) in torch's flat order."""
    biases = ["bias_ih", "bias_hh"] if bias else []
    return ["weight_ih", "weight_hh", *biases] + (["weight_hr"] if proj_size > 0 else [])


def lstm_parameter_layout(input_size, hidden_size, num_layers, bias, bidirectional, proj_size):
    """[[(name, shape) of each tensor] per (layer, direction)] in torch.nn.LSTM's flat order.

    The one definition of the parameter names and shapes: nn.LSTM registers from it and
    :func:`lstm` validates ``params`` against it.
    """
    directions = 2 if bidirectional else 1
    output_size = proj_size if proj_size > 0 else hidden_size
    kinds = _parameter_kinds(bias, proj_size)
    layout = []
    for layer in range(num_layers):
        shapes = {
            "weight_ih": (4 * hidden_size, input_size if layer == 0 else output_size * directions),
            "weight_hh": (4 * hidden_size, output_size),
            "bias_ih": (4 * hidden_size,),
            "bias_hh": (4 * hidden_size,),
            "weight_hr": (proj_size, hidden_size),
        }
        for direction in range(directions):
            suffix = "_reverse" if direction == 1 else ""
            layout.append([(f"{kind}_l{layer}{suffix}", shapes[kind]) for kind in kinds])
    return layout


def _validate_options(num_layers, bias, batch_first, dropout, training, bidirectional, proj_size) -> None:
    flags = (("bias", bias), ("batch_first", batch_first), ("training", training), ("bidirectional", bidirectional))
    for name, flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"{name} should be of type bool, got: {type(flag).__name__}")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise ValueError(f"num_layers must be an int greater than zero, got {num_layers!r}")
    if not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(f"proj_size should be a positive integer or zero to disable projections, got {proj_size!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout should be a number in range [0, 1], got {dropout!r}")


def _sequence_extent(input, batch_first: bool) -> tuple[torch.Tensor, bool, int, int]:
    """(data tensor, batched, steps, batch) of a padded, unbatched or packed input."""
    if isinstance(input, PackedSequence):
        _require_tensor(input.data, "input.data")
        if input.data.dim() != 2:
            raise RuntimeError(f"input (PackedSequence) data must have 2 dimensions, got {input.data.dim()}")
        return input.data, True, input.batch_sizes.numel(), int(input.batch_sizes[0])
    _require_tensor(input, "input")
    if input.dim() not in (2, 3):
        raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
    if input.dim() == 2:
        return input, False, input.size(0), 1
    steps, batch = (input.size(1), input.size(0)) if batch_first else (input.size(0), input.size(1))
    return input, True, steps, batch


def _validate_params(params, num_layers, directions, bias, proj_size) -> tuple[int, int, list]:
    """(hidden_size, input_size, [(label, tensor)]) after checking every parameter's shape."""
    kinds = _parameter_kinds(bias, proj_size)
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    expected_count = num_layers * directions * len(kinds)
    if len(params) != expected_count:
        raise ValueError(
            f"params must hold {expected_count} tensors (num_layers={num_layers} x directions={directions} x "
            f"{len(kinds)} per direction for bias={bias}, proj_size={proj_size}), got {len(params)}"
        )
    first = params[0]
    _require_tensor(first, "params[0] (weight_ih_l0)")
    if first.dim() != 2 or first.size(0) % 4 != 0 or first.size(0) == 0:
        raise RuntimeError(
            f"params[0] (weight_ih_l0) must have shape (4 * hidden_size, input_size), got {_size(first)}"
        )
    hidden_size, input_size = first.size(0) // 4, first.size(1)
    if proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size ({hidden_size}), got {proj_size}")
    named = []
    layout = lstm_parameter_layout(input_size, hidden_size, num_layers, bias, directions == 2, proj_size)
    flat = [entry for group in layout for entry in group]
    for index, ((name, expected), tensor) in enumerate(zip(flat, params)):
        label = f"params[{index}] ({name})"
        _require_tensor(tensor, label)
        if _size(tensor) != expected:
            raise RuntimeError(f"{label} must have shape {expected}, got {_size(tensor)}")
        named.append((label, tensor))
    return hidden_size, input_size, named


def _validate_hx(hx, batched: bool, layers: int, batch: int, hidden_size: int, output_size: int) -> list:
    """[(label, tensor)] of h_0 and c_0 after checking their shapes (empty when hx is None)."""
    if hx is None:
        return []
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"hx must be None or a pair (h_0, c_0) of tensors, got {type(hx).__name__}")
    _require_tensor(hx[0], "hx[0]")
    _require_tensor(hx[1], "hx[1]")
    state_dims = 3 if batched else 2
    if hx[0].dim() != state_dims or hx[1].dim() != state_dims:
        kind = "batched 3-D" if batched else "unbatched 2-D"
        raise RuntimeError(
            f"For {kind} input, hx and cx should also be {state_dims}-D but got "
            f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
        )
    states = (("h_0", output_size, "proj_size or hidden_size"), ("c_0", hidden_size, "hidden_size"))
    for index, (name, size, size_name) in enumerate(states):
        expected = (layers, batch, size) if batched else (layers, size)
        layout = "(num_layers * num_directions" + (", batch" if batched else "") + f", {size_name})"
        if _size(hx[index]) != expected:
            raise RuntimeError(
                f"Expected hidden[{index}] ({name}) size {layout} = {expected}, got {_size(hx[index])}"
            )
    return [("hx[0]", hx[0]), ("hx[1]", hx[1])]


def _plan_lstm(
    input, hx, params, num_layers, bias, batch_first, dropout, training, bidirectional, proj_size
) -> _LSTMPlan:
    _validate_options(num_layers, bias, batch_first, dropout, training, bidirectional, proj_size)
    data, batched, steps, batch = _sequence_extent(input, batch_first)
    if steps == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN (input has 0 time steps)")
    directions = 2 if bidirectional else 1
    hidden_size, input_size, named = _validate_params(params, num_layers, directions, bias, proj_size)
    output_size = proj_size if proj_size > 0 else hidden_size
    if data.size(-1) != input_size:
        raise RuntimeError(
            "input.size(-1) must be equal to input_size (weight_ih_l0.size(1)). "
            f"Expected {input_size}, got {data.size(-1)}"
        )
    named += _validate_hx(hx, batched, num_layers * directions, batch, hidden_size, output_size)
    autocast_dtype = _autocast_dtype(data.device, "lstm")
    if autocast_dtype is None and params[0].dtype != data.dtype:
        raise ValueError(
            f"RNN input dtype ({data.dtype}) does not match weight dtype ({params[0].dtype}). "
            f"Convert input: input.to({params[0].dtype}), or convert model: model.to({data.dtype})"
        )
    _check_matches_input(data, named, check_dtype=autocast_dtype is None)

    # Equal lengths need no masking: such a PackedSequence is served as a dense batch.
    ragged = isinstance(input, PackedSequence) and int(input.batch_sizes[-1]) != batch
    features = ({"projection"} if proj_size > 0 else set()) | ({"lengths"} if ragged else set())
    dtype = autocast_dtype if autocast_dtype is not None else data.dtype
    sizes = dict(batch=batch, steps=steps, input_size=input_size, hidden_size=hidden_size, proj_size=proj_size,
                 num_layers=num_layers, directions=directions)
    request = _dispatch.Request(op="lstm", device=data.device, dtype=dtype, features=frozenset(features), sizes=sizes)
    per_direction = len(params) // (num_layers * directions)
    return _LSTMPlan(
        batched, steps, batch, hidden_size, output_size, directions, per_direction, ragged, autocast_dtype, request
    )


def lstm_request(
    input, hx, params, *, num_layers=1, bias=True, batch_first=False, dropout=0.0, training=False,
    bidirectional=False, proj_size=0,
) -> _dispatch.Request:
    """The dispatch request :func:`lstm` would make (validates; reads no tensor data)."""
    return _plan_lstm(
        input, hx, params, num_layers, bias, batch_first, dropout, training, bidirectional, proj_size
    ).request


def lstm(
    input: torch.Tensor | PackedSequence,
    hx: tuple[torch.Tensor, torch.Tensor] | None,
    params: list[torch.Tensor],
    *,
    num_layers: int = 1,
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    proj_size: int = 0,
) -> tuple[torch.Tensor | PackedSequence, tuple[torch.Tensor, torch.Tensor]]:
    """A multi-layer LSTM over a sequence, as ``torch.nn.LSTM`` (whose module calls this with its parameters).

    Args:
        input: (T, B, I), or (B, T, I) with ``batch_first``, or unbatched (T, I), or a
            :class:`~torch.nn.utils.rnn.PackedSequence` (lengths in any order; ``enforce_sorted=False`` fine).
        hx: ``(h_0, c_0)`` with h_0 (L·D, B, P) and c_0 (L·D, B, H) (no B axis when unbatched), batch in the
            user's order also for packed input; or None for zeros. L = num_layers, D = 2 if bidirectional
            else 1, H = hidden size (``params[0].size(0) // 4``), P = ``proj_size`` or H.
        params: flat list in torch's order, per layer then direction (forward, reverse):
            ``weight_ih (4H, I or D·P), weight_hh (4H, P)``, then ``bias_ih, bias_hh (4H,)`` if ``bias``,
            then ``weight_hr (P, H)`` if ``proj_size > 0`` (``torch.nn.LSTM._flat_weights`` order).
        dropout: applied with :func:`torch.nn.functional.dropout` to every layer's output except the last,
            only when ``training``.

    Returns:
        ``(output, (h_n, c_n))``: output (T, B, D·P) (batch_first/unbatched/packed as the input), h_n
        (L·D, B, P), c_n (L·D, B, H). A packed input gives a packed output with the same ``batch_sizes``,
        ``sorted_indices`` and ``unsorted_indices``; h_n/c_n are in the user's batch order, as torch's.
        Half-precision inputs run their gate math in fp32 and return the input dtype; under autocast the
        call runs in the autocast dtype, as torch's does.
    """
    shape = _plan_lstm(
        input, hx, params, num_layers, bias, batch_first, dropout, training, bidirectional, proj_size
    )
    implementation = _dispatch.choose(shape.request).implementation
    packed = isinstance(input, PackedSequence)
    sequence = input.data if packed else input
    if not packed and not shape.batched:
        sequence = input.unsqueeze(1)
    layers = num_layers * shape.directions
    if hx is None:
        dtype = shape.request.dtype
        h_0 = sequence.new_zeros(layers, shape.batch, shape.output_size, dtype=dtype)
        c_0 = sequence.new_zeros(layers, shape.batch, shape.hidden_size, dtype=dtype)
    elif shape.batched:
        h_0, c_0 = hx
    else:
        h_0, c_0 = hx[0].unsqueeze(1), hx[1].unsqueeze(1)
    sequence, h_0, c_0 = _cast_all([sequence, h_0, c_0], shape.autocast_dtype)
    params = _cast_all(list(params), shape.autocast_dtype)
    if packed:
        sequence = PackedSequence(sequence, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    with _kernel_context(shape.autocast_dtype, h_0.device):
        output, (h_n, c_n) = implementation(
            sequence, (h_0, c_0), params, num_layers=num_layers, bias=bias,
            batch_first=batch_first and shape.batched, dropout=float(dropout), training=training,
            bidirectional=bidirectional, proj_size=proj_size,
        )
    if not packed and not shape.batched:
        output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
    return output, (h_n, c_n)


# name -> function of the functional's arguments returning the Request it would dispatch (pyattn.explain).
REQUEST_BUILDERS = {"lstm_cell": lstm_cell_request, "lstm": lstm_request}
