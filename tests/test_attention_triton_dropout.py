"""Attention dropout: the Philox bit layout docs/attention.md documents, drawn the same by every kernel whatever
its tiles, at the rate and scale the quantised probability gives.

Run: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -m interpreter tests/test_attention_triton_dropout.py``.
The layout is checked against an independent Philox4x32-10 written here from its definition (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC'11), not against the kernels' own helper.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import RTOL, random_tensor, relative_error

pytest.importorskip("triton", reason="triton is not installed")

import triton  # noqa: E402

from pyattn.kernels import attention as kernels  # noqa: E402
from pyattn.kernels.attention import configs, launch  # noqa: E402
from pyattn.kernels.attention.common import quantised_dropout_p  # noqa: E402
from pyattn.reference.attention import attention as reference_attention  # noqa: E402
from tests.test_attention_kernels import check_against_reference, make_inputs  # noqa: E402

DTYPES = [torch.float32, torch.float16]  # bf16 arithmetic is wrong in the interpreter
DROPOUT = dict(dropout_p=0.3, seed=1234)

_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """The four 32-bit output words of Philox4x32 with 10 rounds for ``counter`` (four uint32 arrays) and ``key``
    (two 32-bit ints). A round: (hi, lo) of M0·c0 and M1·c2; c ← (hi₁ ⊕ c1 ⊕ k0, lo₁, hi₀ ⊕ c3 ⊕ k1, lo₀); the key
    then advances by the Weyl constants."""
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) for word in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1 = (np.uint64(m) for m in _PHILOX_MULTIPLIERS)
    for _ in range(10):
        product0, product1 = m0 * c0, m1 * c2  # 32 × 32 bits: exact in uint64
        c0, c1, c2, c3 = ((product1 >> np.uint64(32)) ^ c1 ^ k0, product1 & _LOW32,
                          (product0 >> np.uint64(32)) ^ c3 ^ k1, product0 & _LOW32)
        k0 = (k0 + np.uint64(_PHILOX_WEYL[0])) & _LOW32
        k1 = (k1 + np.uint64(_PHILOX_WEYL[1])) & _LOW32
    return c0, c1, c2, c3


def documented_keep(batch_heads, rows, cols, *, dropout_p, seed):
    """docs/attention.md's definition, (len(batch_heads), len(rows), len(cols)): score (bh, i, j) is kept iff the
    16-bit half (j mod 2) of Philox output word (j mod 8) div 2, counter (j div 8, i, bh, 0), key (seed low 32
    bits, seed high 32 bits), is ≥ round(p · 65536)."""
    bh, i, j = np.meshgrid(np.asarray(batch_heads), np.asarray(rows), np.asarray(cols), indexing="ij")
    words = philox4x32_10((j // 8, i, bh, np.zeros_like(j)), (seed & 0xFFFFFFFF, seed >> 32))
    lane = j % 8
    word = np.choose(lane // 2, words)
    uniform16 = (word >> (np.uint64(16) * (lane % 2).astype(np.uint64))) & np.uint64(0xFFFF)
    threshold = round(quantised_dropout_p(dropout_p) * 65536)
    return torch.from_numpy(uniform16 >= threshold)


def documented_keep_pattern(batch, heads, seqlen_q, seqlen_k, *, dropout_p, seed):
    """The (B, H, L, S) keep pattern of :func:`documented_keep` (batch_head = b · H + h)."""
    keep = documented_keep(range(batch * heads), range(seqlen_q), range(seqlen_k), dropout_p=dropout_p, seed=seed)
    return keep.reshape(batch, heads, seqlen_q, seqlen_k)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    def poisoned_empty(shape, dtype, device):
        tensor = torch.empty(shape, dtype=dtype, device=device)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(-7)

    monkeypatch.setattr(launch, "_empty", poisoned_empty)


def use_interpreter_tiles(monkeypatch, block_m, block_n):
    """Every band kernel (forward, dK/dV, dQ) runs (block_m, block_n) tiles in the interpreter, and the keep-mask
    kernel block_m × block_m ones; each autotuner keeps its own pre-hook (the TMA boxes follow the tiles)."""
    for tuners in vars(launch).values():
        if isinstance(tuners, launch.Tuners):
            (only,) = tuners.interpreter.configs
            tiles = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=1, num_stages=1,
                                  pre_hook=only.pre_hook)
            monkeypatch.setattr(tuners.interpreter, "configs", [tiles])
    monkeypatch.setattr(configs, "INTERPRETER_KEEP_MASK_BLOCK", block_m)


TILES = [(16, 16), (32, 16), (16, 32), (64, 32)]


# ----------------------------------------------------------------------------- the bits


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", [7, 2**40 + 99], ids=["seed<2^32", "seed>=2^32"])
def test_keep_mask_is_the_documented_philox_layout(seed):
    # 37 keys: a last run of 8 cut at 5, so the lanes past the sequence are drawn but never written.
    keep = kernels.attention_dropout_keep_mask(2, 3, 9, 37, dropout_p=0.3, seed=seed, device="cpu")
    assert torch.equal(keep, documented_keep_pattern(2, 3, 9, 37, dropout_p=0.3, seed=seed))


@pytest.mark.interpreter
@pytest.mark.parametrize("block", [8, 16, 32])
def test_keep_mask_does_not_depend_on_its_tiles(block, monkeypatch):
    expected = documented_keep_pattern(1, 2, 40, 72, **DROPOUT)
    use_interpreter_tiles(monkeypatch, block, block)
    assert torch.equal(kernels.attention_dropout_keep_mask(1, 2, 40, 72, **DROPOUT, device="cpu"), expected)


@pytest.mark.interpreter
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_keep_rate_is_binomial_in_every_lane_and_neighbours_are_independent(dropout_p):
    keep = kernels.attention_dropout_keep_mask(2, 3, 64, 128, dropout_p=dropout_p, seed=11, device="cpu").double()
    rate = 1 - quantised_dropout_p(dropout_p)

    def within_5_sigma(fraction, probability, count, what):
        sigma = math.sqrt(probability * (1 - probability) / count)
        assert abs(fraction - probability) < 5 * sigma, (f"{what}: {fraction:.4f}, expected {probability:.4f} "
                                                         f"± {5 * sigma:.4f}")

    within_5_sigma(keep.mean().item(), rate, keep.numel(), "keep rate")
    # Each lane of a Philox call (a 16-bit half of one of its four words) keeps at the same rate...
    lanes = keep.reshape(-1, 8)
    for lane in range(8):
        within_5_sigma(lanes[:, lane].mean().item(), rate, lanes.shape[0], f"lane {lane}")
    # ... and independently of its neighbours: the two halves of a word, adjacent words, adjacent calls.
    for lane in range(8):
        both = (lanes[:, lane] * lanes[:, (lane + 1) % 8]).mean().item()
        within_5_sigma(both, rate * rate, lanes.shape[0], f"lanes {lane} and {(lane + 1) % 8} both kept")
    adjacent_rows = (keep[:, :, 1:] * keep[:, :, :-1]).mean().item()
    within_5_sigma(adjacent_rows, rate * rate, keep[:, :, 1:].numel(), "rows i and i + 1 both kept")


def test_dropout_probability_is_quantised_to_1_in_65536():
    assert quantised_dropout_p(0.3) == 19661 / 65536  # 0.3 · 65536 = 19660.8
    assert quantised_dropout_p(0.5) == 0.5
    assert quantised_dropout_p(1e-6) == 0.0  # below 1/131072: nothing is dropped
    assert quantised_dropout_p(1 - 1e-7) == 65535 / 65536  # capped: some score always survives on average
    # Half a step, plus p's own rounding to fp32 (the kernel argument's type).
    assert all(abs(quantised_dropout_p(p) - p) <= 2**-17 + 2**-24 for p in np.linspace(0, 0.9999, 997))


@pytest.mark.interpreter
def test_a_probability_that_quantises_to_zero_keeps_every_score_unscaled():
    q, k, v = make_inputs(1, 2, 1, 33, 40, 16, 16, torch.float32)
    plain = kernels.attention_forward(q, k, v, scale=0.25)
    dropped = kernels.attention_forward(q, k, v, scale=0.25, dropout_p=1e-6, seed=5)
    assert torch.equal(plain[0], dropped[0]) and torch.equal(plain[1], dropped[1])


# ----------------------------------------------------------------------------- every kernel draws the same bits


@pytest.mark.interpreter
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: "BM{}xBN{}".format(*t))
def test_forward_and_dkdv_draw_exactly_the_keep_mask_for_any_tiles(tiles, monkeypatch):
    """With one-hot values out[i, j] = P̃_ij and with one-hot dO, dV[j, i] = P̃_ij (P̃ = P · keep / (1 − p)):
    their zeros are the dropped scores, compared bit for bit with the keep mask (P > 0 everywhere here)."""
    batch, heads, seqlen_q, seqlen_k = 1, 2, 33, 40
    expected = documented_keep_pattern(batch, heads, seqlen_q, seqlen_k, **DROPOUT)
    use_interpreter_tiles(monkeypatch, *tiles)
    q = random_tensor(batch, heads, seqlen_q, 16)
    k = random_tensor(batch, heads, seqlen_k, 16)
    v = torch.eye(seqlen_k, 64).expand(batch, heads, seqlen_k, 64).contiguous()
    out, lse = kernels.attention_forward(q, k, v, scale=0.25, **DROPOUT)
    assert torch.equal(out[..., :seqlen_k] != 0, expected), "forward: a different keep pattern"
    assert torch.equal(kernels.attention_dropout_keep_mask(batch, heads, seqlen_q, seqlen_k, **DROPOUT, device="cpu"),
                       expected)
    grad_out = torch.eye(seqlen_q, 64).expand(batch, heads, seqlen_q, 64).contiguous()
    for deterministic in (False, True):
        _, _, dv = kernels.attention_backward(grad_out, q, k, v, out, lse, scale=0.25, deterministic=deterministic,
                                              **DROPOUT)
        assert torch.equal(dv[..., :seqlen_q].transpose(-1, -2) != 0, expected), "dK/dV: a different keep pattern"


@pytest.mark.interpreter
@pytest.mark.parametrize("tiles", TILES, ids=lambda t: "BM{}xBN{}".format(*t))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_the_reference_given_the_keep_mask_for_any_tiles(dtype, tiles, monkeypatch):
    # The reference drops with the keep mask and scales by 1/(1 − p_q): dQ (its own kernel or the fused atomics),
    # dK and dV agree with it only if every kernel redrew the forward's bits.
    keep = kernels.attention_dropout_keep_mask(2, 2, 33, 47, **DROPOUT, device="cpu")
    use_interpreter_tiles(monkeypatch, *tiles)
    q, k, v = make_inputs(2, 2, 1, 33, 47, 32, 32, dtype)
    check_against_reference(q, k, v, scale=0.3, dropout_keep_mask=keep, window_left=20, window_right=3,
                            diagonal_offset=14, **DROPOUT)
    check_against_reference(q, k, v, scale=0.3, dropout_keep_mask=keep, deterministic=True, softcap=2.0, **DROPOUT)


@pytest.mark.interpreter
def test_the_rescale_uses_the_quantised_probability():
    # p · 65536 = 64880.49 rounds to 64880: 1 − p_q = 656/65536, and 1/(1 − p) would differ from the exact
    # 1/(1 − p_q) by 0.49/656 = 7.5e-4, far outside the fp32 bound. Both forward and backward use p_q.
    dropout_p = (64880 + 0.49) / 65536
    assert quantised_dropout_p(dropout_p) == 64880 / 65536
    q, k, v = make_inputs(1, 2, 2, 33, 64, 16, 16, torch.float32)
    keep = kernels.attention_dropout_keep_mask(1, 2, 33, 64, dropout_p=dropout_p, seed=3, device="cpu")
    out = check_against_reference(q, k, v, scale=0.25, dropout_keep_mask=keep, dropout_p=dropout_p, seed=3)[0]
    unquantised, _ = reference_attention(q.double(), k.double(), v.double(), scale=0.25, dropout_p=dropout_p,
                                         dropout_keep_mask=keep)
    assert relative_error(out, unquantised) > 30 * RTOL[torch.float32]  # 7.5e-4 against a 1e-5 bound
