"""Work counts for every benchmarked op, in one place: floating-point operations and bytes moved.

A multiply-add counts as 2 FLOPs. Only the matrix products are counted (softmax, gate
nonlinearities and other elementwise work are a few percent and vary by implementation), which is
the convention of flash-attention's and cuDNN's published figures, so TFLOP/s compare across them.

Attention, one head, ``L`` queries, ``S`` keys, head dims ``D`` (Q·Kᵀ) and ``Dv`` (P·V):
    forward  = 2·B·H·pairs·(D + Dv),   pairs = L·S without a causal mask (= 4·B·H·L·S·D when Dv = D)
    backward = 2.5 × forward           (dV, dP, dS→dQ, dK: five products against the forward's two)
A causal mask counts the (query, key) pairs actually visible, not a flat half, so L ≠ S is exact.
A boolean ``attn_mask`` is counted dense: kernels compute every tile the mask does not let them skip.

Multi-head self-attention (``nn.MultiheadAttention``), batch B, length L, embed dim E = H·D:
    forward  = 8·B·L·E² + 4·B·L²·E     (q, k, v and out projections; attention over L = S)
    backward = 2 × the projections + 2.5 × the attention

LSTM, batch B, T steps, input size I, hidden size H (gates are 4H wide):
    forward  = 8·B·T·H·(I + H)        (x·W_ihᵀ and h·W_hhᵀ, each 2·B·4H·(I or H) per step)
    backward ≈ 2 × forward             (the input and the weight gradient of each product)
One cell step is T = 1. The step reads all of W_ih and W_hh to do 2 FLOPs per weight per batch
row, so at small batches it is bound by memory bandwidth: :func:`lstm_cell_bytes` counts its traffic.
"""

from __future__ import annotations

FORWARD = "forward"
BACKWARD = "backward"
FORWARD_BACKWARD = "forward+backward"
MODES = (FORWARD, BACKWARD, FORWARD_BACKWARD)

ATTENTION_BACKWARD_FACTOR = 2.5
LSTM_BACKWARD_FACTOR = 2.0


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def _direction_factor(mode: str, backward_factor: float) -> float:
    _check_mode(mode)
    return {FORWARD: 1.0, BACKWARD: backward_factor, FORWARD_BACKWARD: 1.0 + backward_factor}[mode]


def _sum_clamped_range(first: int, count: int, upper: int) -> int:
    """Σ clamp(v, 0, upper) for v = first, first + 1, ..., first + count − 1."""
    low, high = max(first, 1), min(first + count - 1, upper)
    inside = (low + high) * (high - low + 1) // 2 if high >= low else 0
    saturated = max(0, first + count - 1 - max(upper, first - 1))  # values above ``upper``
    return inside + upper * saturated


def attention_visible_pairs(q_len: int, kv_len: int, causal: bool, diagonal_offset: int = 0) -> int:
    """(query, key) pairs a head attends to.

    Causal: query ``i`` sees keys ``j ≤ i + diagonal_offset``. Offset 0 is torch's ``is_causal``
    (top-left aligned); ``kv_len − q_len`` is flash-attention's bottom-right alignment.
    """
    if q_len < 0 or kv_len < 0:
        raise ValueError(f"lengths must be non-negative, got q_len={q_len}, kv_len={kv_len}")
    if not causal:
        return q_len * kv_len
    return _sum_clamped_range(diagonal_offset + 1, q_len, kv_len)


def attention_flops(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    head_dim: int,
    head_dim_v: int | None = None,
    causal: bool = False,
    mode: str = FORWARD,
    diagonal_offset: int = 0,
) -> float:
    """FLOPs of one attention call (see the module docstring for the formula)."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    pairs = attention_visible_pairs(q_len, kv_len, causal, diagonal_offset)
    forward = 2.0 * batch * heads * pairs * (head_dim + head_dim_v)
    return forward * _direction_factor(mode, ATTENTION_BACKWARD_FACTOR)


def mha_flops(batch: int, seq_len: int, embed_dim: int, mode: str = FORWARD) -> float:
    """FLOPs of one multi-head self-attention call: projections plus attention (module docstring)."""
    projections = 8.0 * batch * seq_len * embed_dim**2
    attention = 4.0 * batch * seq_len**2 * embed_dim
    return projections * _direction_factor(mode, 2.0) + attention * _direction_factor(mode, ATTENTION_BACKWARD_FACTOR)


def lstm_flops(batch: int, steps: int, input_size: int, hidden_size: int, mode: str = FORWARD) -> float:
    """FLOPs of ``steps`` LSTM steps of one layer, one direction (T = 1 for one cell step)."""
    forward = 8.0 * batch * steps * hidden_size * (input_size + hidden_size)
    return forward * _direction_factor(mode, LSTM_BACKWARD_FACTOR)


def lstm_cell_bytes(batch: int, input_size: int, hidden_size: int, element_size: int, mode: str = FORWARD) -> float:
    """Bytes one fused LSTM cell step must move at least (each tensor read or written once).

    forward:  read W_ih, W_hh, b_ih, b_hh, x, h, c; write h', c'.
    backward: read W_ih, W_hh, x, h, c, the saved gates (4H per row), dh', dc';
              write dW_ih, dW_hh, db (one bias gradient: both biases get the same values), dx, dh, dc.
    """
    _check_mode(mode)
    weights = 4 * hidden_size * (input_size + hidden_size)
    biases = 2 * 4 * hidden_size
    rows_in = batch * (input_size + 2 * hidden_size)  # x, h, c
    forward = weights + biases + rows_in + 2 * batch * hidden_size
    backward = (
        weights
        + rows_in
        + 4 * batch * hidden_size
        + 2 * batch * hidden_size  # reads
        + weights
        + 4 * hidden_size
        + rows_in  # writes: dW, db, dx, dh, dc
    )
    elements = {FORWARD: forward, BACKWARD: backward, FORWARD_BACKWARD: forward + backward}[mode]
    return float(elements * element_size)
