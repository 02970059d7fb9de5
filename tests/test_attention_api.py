"""The attention API: each bad argument gets an error naming it; requests, explain and dispatch options.

Forced onto the "reference" backend where a call runs; the semantics are in test_attention_reference.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.functional import attention as functional
from pyattn.functional import flash_attention, flash_attention_varlen, scaled_dot_product_attention
from tests.conftest import RTOL, assert_close, random_tensor

F64 = torch.float64
RTOL64 = RTOL[F64]


@pytest.fixture(autouse=True)
def _reference_backend():
    with pyattn.use_backend("reference"):
        yield


def _packed(lengths_q, lengths_k, heads=4, heads_k=2, head_dim=8, head_dim_v=6):
    q = random_tensor(sum(lengths_q), heads, head_dim, dtype=F64)
    k = random_tensor(sum(lengths_k), heads_k, head_dim, dtype=F64)
    v = random_tensor(sum(lengths_k), heads_k, head_dim_v, dtype=F64)
    cu_q = torch.tensor([0, *itertools.accumulate(lengths_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def _qkv(q_shape, k_shape, v_shape, dtype=F64, requires_grad=False):
    return tuple(random_tensor(*shape, dtype=dtype, requires_grad=requires_grad)
                 for shape in (q_shape, k_shape, v_shape))


def _torch_sdpa(*args, **kwargs):
    """torch's result, with its NaN rows (no key takes part) replaced by pyattn's documented 0."""
    return torch.nan_to_num(F.scaled_dot_product_attention(*args, **kwargs), nan=0.0)


# ---------------------------------------------------------------------------------------------
# validation: each bad argument gets an error naming it


def _bad_calls():
    q, k, v = _qkv((2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 8))
    sdpa = scaled_dot_product_attention

    def flash(*args, **kwargs):  # these cases build (batch, nheads, seqlen, headdim) tensors
        return flash_attention(*args, **{"layout": "bhsd", **kwargs})
    packed_q, packed_k, packed_v, cu_q, cu_k = _packed([2, 3], [4, 3])
    varlen = flash_attention_varlen
    return [
        ("key dtype", lambda: sdpa(q, k.float(), v), TypeError, "key has dtype torch.float32"),
        ("value device", lambda: sdpa(q, k, v.to("meta")), ValueError, "value is on meta"),
        ("not a tensor", lambda: sdpa(q, k.tolist(), v), TypeError, "key must be a torch.Tensor"),
        ("integer query", lambda: sdpa(q.long(), k.long(), v.long()), TypeError, "query must be a floating-point"),
        ("query dims", lambda: sdpa(q[0, 0, 0], k, v), ValueError, "query must have at least 2 dims"),
        ("key dims", lambda: sdpa(q, k[0], v), ValueError, "key has 3 dims"),
        ("head dim", lambda: sdpa(q, k[..., :4], v), ValueError, "key's last dim 4"),
        ("value length", lambda: sdpa(q, k, v[..., :3, :]), ValueError, "value's sequence length"),
        ("batch dims", lambda: sdpa(q, k[:1], v[:1]), ValueError, "key's batch dims"),
        ("no keys", lambda: sdpa(q, k[..., :0, :], v[..., :0, :]), ValueError, "key and value have sequence length 0"),
        ("flash no keys", lambda: flash(q, k[:, :, :0], v[:, :, :0]), ValueError, "k and v have sequence length 0"),
        ("gqa off", lambda: sdpa(q, k[:, :2], v[:, :2]), ValueError, "set enable_gqa=True"),
        ("gqa ratio", lambda: sdpa(q, k[:, :3], v[:, :3], enable_gqa=True), ValueError, "multiple of key/value's 3"),
        ("value heads", lambda: sdpa(q, k[:, :2], v, enable_gqa=True), ValueError, "value has 4 heads"),
        ("mask shape", lambda: sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool)), ValueError,
         "attn_mask of shape (5, 6) is not broadcastable"),
        ("mask dims", lambda: sdpa(q, k, v, attn_mask=torch.ones(1, 2, 4, 5, 7, dtype=torch.bool)), ValueError,
         "attn_mask of shape"),
        ("mask dtype int", lambda: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int64)), TypeError,
         "attn_mask must be bool"),
        ("mask dtype float", lambda: sdpa(q, k, v, attn_mask=torch.ones(5, 7)), TypeError, "attn_mask must be bool"),
        ("mask device", lambda: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device="meta")),
         ValueError, "attn_mask is on meta"),
        ("mask and causal", lambda: sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True),
         ValueError, "attn_mask should not be set when is_causal=True"),
        ("dropout", lambda: sdpa(q, k, v, dropout_p=1.0), ValueError, "dropout_p must be a number in [0, 1)"),
        ("scale", lambda: sdpa(q, k, v, scale=float("nan")), ValueError, "scale must be a finite number"),
        ("layout", lambda: flash(q, k, v, layout="sbhd"), ValueError, "layout must be one of"),
        ("flash dims", lambda: flash(q[0], k, v), ValueError, "q must have 4 dims"),
        ("flash batch", lambda: flash(q, k[:1], v[:1]), ValueError, "k has batch size 1"),
        ("flash window", lambda: flash(q, k, v, window=(-2, 0)), ValueError, "window must be a pair"),
        ("flash window type", lambda: flash(q, k, v, window=3), ValueError, "window must be a pair"),
        ("softcap", lambda: flash(q, k, v, softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
        ("alibi dtype", lambda: flash(q, k, v, alibi_slopes=torch.ones(4, dtype=F64)), TypeError,
         "alibi_slopes must be float32"),
        ("alibi shape", lambda: flash(q, k, v, alibi_slopes=torch.ones(3)), ValueError,
         "alibi_slopes must have shape (nheads,) = (4,)"),
        ("varlen dims", lambda: varlen(q, k, v, cu_q, cu_k, 3, 4), ValueError, "q must have 3 dims"),
        ("cu_seqlens dtype", lambda: varlen(packed_q, packed_k, packed_v, cu_q.long(), cu_k, 3, 4), ValueError,
         "cu_seqlens_q must be a 1-dim int32 tensor"),
        ("cu_seqlens count", lambda: varlen(packed_q, packed_k, packed_v, cu_q[:2], cu_k, 3, 4), ValueError,
         "cu_seqlens_q has 2 entries"),
        ("max_seqlen", lambda: varlen(packed_q, packed_k, packed_v, cu_q, cu_k, -1, 4), ValueError,
         "max_seqlen_q must be an int >= 1"),
        ("varlen v rows", lambda: varlen(packed_q, packed_k, packed_v[:3], cu_q, cu_k, 3, 4), ValueError,
         "v has 3 rows"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[case[0] for case in _bad_calls()])
def test_validation_error_names_the_argument(case):
    _, call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call()


def test_forced_triton_without_gpu_or_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setattr("pyattn._triton._INTERPRETER", False)
    q, k, v = _qkv((1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8))
    with pyattn.use_backend("triton"), pytest.raises(pyattn.BackendUnavailableError, match="'triton'"):
        scaled_dot_product_attention(q.float(), k.float(), v.float())


def test_reference_serves_head_dims_over_256_and_triton_says_why_not(monkeypatch):
    monkeypatch.setattr("pyattn._triton._INTERPRETER", True)  # Triton available on CPU, so its per-call reasons show
    q, k, v = _qkv((1, 1, 3, 300), (1, 1, 4, 300), (1, 1, 4, 300))
    assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), RTOL64)
    report = pyattn.explain("scaled_dot_product_attention", *(x.float().to("meta") for x in (q, k, v)))
    assert "head dim 300 > 256" in report


# ---------------------------------------------------------------------------------------------
# requests and explain (on meta tensors: nothing is computed)


def _meta(*shapes, dtype=torch.float16):
    return tuple(torch.empty(shape, dtype=dtype, device="meta") for shape in shapes)


def test_request_builders_report_features():
    q, k, v = _meta((2, 4, 5, 64), (2, 2, 7, 64), (2, 2, 7, 32))
    mask = torch.empty(5, 7, dtype=torch.float16, device="meta", requires_grad=True)
    request = functional.REQUEST_BUILDERS["scaled_dot_product_attention"](q, k, v, mask, 0.1, enable_gqa=True)
    assert request.op == "attention" and request.head_dim == 64 and request.dtype == torch.float16
    assert request.features == {"mask", "mask_grad", "dropout", "gqa"}
    slopes = torch.empty(4, device="meta")
    request = functional.REQUEST_BUILDERS["flash_attention"](q, k, v, causal=True, window=(8, -1), softcap=5.0,
                                                              layout="bhsd",
                                                              alibi_slopes=slopes)
    assert request.features == {"causal", "window", "softcap", "alibi", "gqa"}
    packed_q, packed_k, packed_v = _meta((12, 4, 64), (10, 2, 64), (10, 2, 64))
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    request = functional.REQUEST_BUILDERS["flash_attention_varlen"](packed_q, packed_k, packed_v, cu, cu, 8, 6,
                                                                     dropout_p=0.1)
    assert request.op == "attention_varlen" and request.features == {"dropout", "gqa"}


def test_explain_on_meta_tensors_prints_each_variant(monkeypatch):
    monkeypatch.setattr("pyattn._triton._INTERPRETER", True)
    q, k, v = _meta((2, 4, 128, 64), (2, 4, 128, 64), (2, 4, 128, 64))
    with pyattn.use_backend("auto"):
        report = pyattn.explain(pyattn.functional.scaled_dot_product_attention, q, k, v, is_causal=True)
    lines = report.splitlines()
    assert lines[0] == ("op=attention device=meta dtype=float16 head_dim=64 features=causal batch=2 heads_q=4 "
                        "heads_k=4 seqlen_q=128 seqlen_k=128 diagonal_offset=0")
    names = [line.split()[0] for line in lines[1:-1]]
    assert names[0].startswith("cuda") and names[-4:] == ["triton/tma", "triton/pointer", "torch", "reference"]
    if pyattn.backend_status()["triton"] == "available":
        assert "triton/pointer     no: device meta not in ['cuda']" in report
    assert lines[-1] == "  auto picks: torch"
    assert "flash_attention_varlen" in pyattn.functional.REQUEST_BUILDERS


def test_request_carries_sizes_and_operands_for_the_variants_checks():
    q, k, v = _meta((2, 6, 5, 64), (2, 3, 7, 64), (2, 3, 7, 64))
    request = functional.REQUEST_BUILDERS["flash_attention"](q, k, v, causal=True, return_lse=True, layout="bhsd")
    assert request.sizes == dict(batch=2, heads_q=6, heads_k=3, seqlen_q=5, seqlen_k=7, diagonal_offset=2)
    assert set(request.operands) == {"q", "k", "v"} and request.operands["k"].shape == (2, 3, 7, 64)
    assert "lse" in request.features  # so the torch backend (which returns no lse) refuses it


def test_deterministic_algorithms_make_every_backward_deterministic():
    q, k, v = _meta((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))
    assert functional._plan_sdpa(q, k, v).options["deterministic"] is False
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert functional._plan_sdpa(q, k, v).options["deterministic"] is True
        assert functional._plan_flash(q, k, v, layout="bhsd").options["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(previous)
    assert functional._plan_flash(q, k, v, deterministic=True, layout="bhsd").options["deterministic"] is True


# ---------------------------------------------------------------------------------------------
# flash-attn's interface: its layout by default, its argument order and spellings


def test_flash_attention_defaults_to_flash_attns_bshd_layout():
    q, k, v = _qkv((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8))  # (batch, seqlen, nheads, headdim)
    out = flash_attention(q, k, v, causal=True)
    assert out.shape == (2, 5, 4, 8)
    expected = flash_attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=True, layout="bhsd").transpose(1, 2)
    assert_close(out, expected, RTOL64)
    packed = random_tensor(12, 4, 8, dtype=F64)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    varlen = flash_attention_varlen(packed, packed, packed, cu, cu, 7, 7, 0.0, None, True)  # positional, as flash-attn
    assert varlen.shape == (12, 4, 8)


def test_flash_attention_takes_flash_attns_positional_order_and_names():
    q, k, v = _qkv((1, 6, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8))
    by_position = flash_attention(q, k, v, 0.0, 0.3, True, (2, 0), 0.0, None, False)
    by_name = flash_attention(q, k, v, softmax_scale=0.3, causal=True, window_size=(2, 0))
    pyattn_names = flash_attention(q, k, v, scale=0.3, causal=True, window=(2, 0))
    assert_close(by_position, by_name, 0.0)
    assert_close(pyattn_names, by_name, 0.0)
    out, lse, probabilities = flash_attention(q, k, v, return_attn_probs=True)
    assert probabilities is None and lse.shape == (1, 2, 6) and out.shape == q.shape
    with pytest.raises(ValueError, match="softmax_scale .* or scale, not both"):
        flash_attention(q, k, v, softmax_scale=0.3, scale=0.3)
    with pytest.raises(ValueError, match="window_size .* or window, not both"):
        flash_attention(q, k, v, window_size=(1, 1), window=(1, 1))
