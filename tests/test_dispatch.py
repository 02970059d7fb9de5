"""Dispatch: variants, forcing, automatic choice, explanations (also for an assumed GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pyattn
from pyattn import _dispatch, _registry
from pyattn._registry import Request, Support, Target

CPU = Target("cpu")


def test_available_backends_and_status_agree():
    backends = pyattn.available_backends()
    assert {"torch", "reference"} <= set(backends) <= set(_registry.BACKENDS)
    status = pyattn.backend_status()
    assert list(status) == list(_registry.BACKENDS)
    for name, text in status.items():
        assert (name in backends) == (text == "available")


def test_import_works_without_extension_and_without_triton():
    # A fresh interpreter where pyattn._C and triton cannot be imported (None in sys.modules blocks them).
    code = (
        "import sys\n"
        "for name in ('triton', 'triton.language', 'pyattn._C'):\n"
        "    sys.modules[name] = None\n"
        "import torch, pyattn\n"
        "print(pyattn.available_backends())\n"
        "print(pyattn.backend_status())\n"
        "q = torch.empty(2, 8, 4096, 128, device='meta', dtype=torch.bfloat16)\n"
        "print(pyattn.explain('scaled_dot_product_attention', q, q, q, assume='sm_90'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PATH": "/usr/bin", "TRITON_INTERPRET": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "['torch', 'reference']" in result.stdout
    assert "triton is not installed" in result.stdout
    assert "auto picks: torch" in result.stdout  # whole-backend checks still apply under assume


def test_forcing_a_backend_that_cannot_serve_raises_with_reasons():
    request = Request(op="lstm_cell", device=torch.device("cpu"), dtype=torch.float32)
    with pyattn.use_backend("cuda"), pytest.raises(pyattn.BackendUnavailableError, match="'cuda'"):
        _dispatch.choose(request)
    if not _dispatch.triton_interpreter_enabled() and not torch.cuda.is_available():
        with pyattn.use_backend("triton"), pytest.raises(pyattn.BackendUnavailableError, match="'triton'"):
            _dispatch.choose(request)


def test_auto_takes_torch_on_cpu_and_the_reference_for_float64_half_lstm():
    assert _dispatch.choose(Request("lstm_cell", torch.device("cpu"), torch.float32)).qualified_name == "torch"
    bf16 = _dispatch.choose(Request("lstm", torch.device("cpu"), torch.bfloat16, sizes={"batch": 2, "hidden_size": 8}))
    assert bf16.qualified_name == "reference"  # torch's CPU LSTM rounds bf16 gate math: not exact


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        with pyattn.use_backend("tritn"):
            pass
    with pytest.raises(ValueError, match="unknown variant 'triton/fast'"):
        with pyattn.use_backend("triton/fast"):
            pass
    monkeypatch.setenv("PYATTN_BACKEND", "nope")
    monkeypatch.setattr(_dispatch, "_environment_backend", [])  # PYATTN_BACKEND is read once per process
    with pytest.raises(ValueError, match="PYATTN_BACKEND"):
        _dispatch.default_backend()


def test_environment_names_a_variant(monkeypatch):
    monkeypatch.setenv("PYATTN_BACKEND", "triton/stepwise")
    monkeypatch.setattr(_dispatch, "_environment_backend", [])
    assert _dispatch.default_backend() == "triton/stepwise"
    with pyattn.use_backend("auto"):
        assert _dispatch.default_backend() == "auto"
    assert _dispatch.default_backend() == "triton/stepwise"


def test_support_reasons_name_what_is_missing():
    support = Support(devices=frozenset({"cuda"}), dtypes=frozenset({torch.float16}), features=frozenset({"mask"}),
                      max_head_dim=128, min_compute_capability=(9, 0),
                      checks=(lambda request, target: "needs 16-byte aligned strides",))
    request = Request("attention", torch.device("cpu"), torch.float32, head_dim=256, features=frozenset({"dropout"}))
    reasons = " | ".join(support.not_supported_reasons(request, CPU, forced=False))
    assert "device cpu" in reasons and "dtype float32" in reasons and "head dim 256 > 128" in reasons
    assert "dropout" in reasons
    assert "aligned" not in reasons  # checks run only once the basic facts hold
    ok = Request("attention", torch.device("cuda"), torch.float16, head_dim=64)
    hopper = Target("cuda", (9, 0), 132, 232448)
    assert support.not_supported_reasons(ok, hopper, forced=False) == ["needs 16-byte aligned strides"]
    ampere = Target("cuda", (8, 0), 108, 166912)
    assert "compute capability 8.0 < 9.0" in support.not_supported_reasons(ok, ampere, forced=False)


def test_interpreter_devices_serve_only_a_forced_backend():
    support = Support(devices=frozenset({"cuda"}), interpreter_devices=frozenset({"cpu"}),
                      dtypes=frozenset({torch.float32}))
    request = Request("attention", torch.device("cpu"), torch.float32)
    interpreter = Target("cpu", interpreter=True)
    assert support.not_supported_reasons(request, interpreter, forced=True) == []
    auto = support.not_supported_reasons(request, interpreter, forced=False)
    assert auto and "testing tool" in auto[0]
    plain = support.not_supported_reasons(request, CPU, forced=True)
    assert plain and "TRITON_INTERPRET=1" in plain[0]


def test_variants_are_tried_in_registration_order_and_a_variant_can_be_forced(monkeypatch):
    op = "toy_op"
    monkeypatch.setitem(_registry._VARIANTS, op, [])
    every = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}))
    picky = Support(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                    checks=(lambda request, target: None if request.size("n", 0) <= 8 else "n > 8",))
    _registry.register("reference", op, every)(lambda: "reference")
    _registry.register("torch", op, picky, variant="small")(lambda: "small")
    _registry.register("torch", op, every, variant="any")(lambda: "any")
    small = Request(op, torch.device("cpu"), torch.float32, sizes={"n": 4})
    large = Request(op, torch.device("cpu"), torch.float32, sizes={"n": 64})
    assert _dispatch.choose(small).qualified_name == "torch/small"
    assert _dispatch.choose(large).qualified_name == "torch/any"
    with pyattn.use_backend("torch"):
        assert _dispatch.choose(large).qualified_name == "torch/any"
    with pyattn.use_backend("torch/small"):
        with pytest.raises(pyattn.BackendUnavailableError, match="torch/small: n > 8"):
            _dispatch.choose(large)
    text = _dispatch.explain_request(large)
    assert "torch/small        no: n > 8" in text and "auto picks: torch/any" in text


def test_no_backend_error_lists_every_variant():
    request = Request(op="no_such_op", device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(pyattn.BackendUnavailableError) as info:
        _dispatch.choose(request)
    for name in _registry.BACKENDS:
        assert name in str(info.value)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def test_explain_sdpa_as_if_on_hopper_names_the_triton_variant():
    """The issue's check: bf16 meta (2, 8, 4096, 128), causal, assume="sm_90", on this GPU-less machine."""
    q = _meta(2, 8, 4096, 128)
    text = pyattn.explain("scaled_dot_product_attention", q, q, q, is_causal=True, assume="sm_90")
    lines = dict(line.split(None, 1) for line in text.splitlines()[1:] if not line.strip().startswith("auto"))
    picked = text.splitlines()[-1].split("auto picks: ")[1]
    if pyattn.backend_status()["triton"].startswith("triton is not installed"):
        pytest.skip("triton is not installed: no Triton variant can be named")
    assert lines["triton/tma"] == "serves", text
    for variant in ("triton/tma", "triton/pointer", "torch", "reference"):
        assert variant in lines, text
    cuda = [name for name in lines if name.startswith("cuda")]
    serving_cuda = [name for name in cuda if lines[name] == "serves"]
    # The first serving variant: a cuda one where the extension holds attention kernels, else the TMA forward.
    assert picked == (serving_cuda[0] if serving_cuda else "triton/tma"), text
    assert "[assuming sm_90: 132 SMs]" in text.splitlines()[0]


def test_explain_sdpa_as_if_on_ampere_takes_the_pointer_variant():
    q = _meta(2, 8, 4096, 128)
    text = pyattn.explain("scaled_dot_product_attention", q, q, q, is_causal=True, assume="sm_80")
    if pyattn.backend_status()["triton"].startswith("triton is not installed"):
        pytest.skip("triton is not installed")
    assert "triton/tma         no: compute capability 8.0 < 9.0" in text
    assert "triton/pointer     serves" in text
    assert text.endswith("auto picks: triton/pointer") or "auto picks: cuda" in text


def test_explain_lstm_as_if_on_hopper_lists_every_variant_with_reasons():
    lstm = pyattn.nn.LSTM(768, 768).to("meta", torch.bfloat16)
    text = pyattn.explain(lstm, _meta(1024, 16, 768), assume="sm_90")
    for variant in ("cuda/persistent", "cuda/stepwise", "triton/persistent", "triton/grid", "triton/stepwise",
                    "torch", "reference"):
        assert f"  {variant} " in text, text
    if pyattn.backend_status()["triton"].startswith("triton is not installed"):
        return
    assert "triton/persistent  no:" in text  # H = 768 does not fit registers


def test_explain_accepts_modules_and_functionals_and_rejects_others():
    x = torch.randn(3, 2, 8)
    text = pyattn.explain(pyattn.nn.LSTM(8, 16), x)
    assert text.startswith("op=lstm device=cpu dtype=float32") and text.endswith("auto picks: torch")
    text = pyattn.explain(pyattn.functional.lstm_cell, x[0], None, torch.randn(64, 8), torch.randn(64, 16))
    assert text.startswith("op=lstm_cell")
    mha = pyattn.nn.MultiheadAttention(16, 4)
    y = torch.randn(5, 2, 16)
    assert pyattn.explain(mha, y, y, y).startswith("op=multihead_attention")
    assert "features=need_weights" in pyattn.explain(mha, y, y, y).splitlines()[0]
    with pytest.raises(ValueError, match="not a pyattn module"):
        pyattn.explain(torch.nn.LSTM(8, 16), x)
    with pytest.raises(ValueError, match="not a pyattn functional"):
        pyattn.explain("softmax", x)


def test_explain_rejects_an_unknown_assumed_device():
    q = _meta(1, 1, 16, 64)
    with pytest.raises(ValueError, match="assume must be one of"):
        pyattn.explain("scaled_dot_product_attention", q, q, q, assume="sm_75")


def test_capture_stops_the_call_before_any_kernel_runs():
    lstm = pyattn.nn.LSTM(8, 16)
    with _dispatch.capture_request(), pytest.raises(_dispatch.RequestCaptured) as captured:
        lstm(torch.randn(3, 2, 8))
    assert captured.value.request.op == "lstm"
    lstm(torch.randn(3, 2, 8))  # capture is over: the call runs


@pytest.mark.interpreter
def test_auto_never_picks_the_triton_interpreter_but_a_forced_triton_does():
    """Under TRITON_INTERPRET=1 an ordinary CPU call still runs PyTorch's kernels; only a forced triton
    (the tests' way in) runs the interpreter."""
    q = torch.randn(1, 2, 8, 16)
    text = pyattn.explain("scaled_dot_product_attention", q, q, q, is_causal=True)
    assert "triton/pointer     no: device cpu: the Triton interpreter is a testing tool" in text
    assert text.endswith("auto picks: torch")
    with pyattn.use_backend("triton"):
        assert pyattn.explain("scaled_dot_product_attention", q, q, q).endswith("'triton' (forced) runs: triton/pointer")


def test_a_forced_variant_name_an_op_lacks_falls_to_its_backend():
    q = _meta(2, 8, 4096, 128)
    request = pyattn.functional.REQUEST_BUILDERS["scaled_dot_product_attention"](q, q, q, is_causal=True)
    if pyattn.backend_status()["triton"].startswith("triton is not installed"):
        pytest.skip("triton is not installed")
    # "triton/grid" is an LSTM kernel: on attention it means the triton backend
    assert _dispatch.choose(request, "triton/grid", assume="sm_90").backend == "triton"
    assert _dispatch.choose(request, "triton/pointer", assume="sm_90").qualified_name == "triton/pointer"


def test_checks_without_operands_or_sizes_give_reasons_not_errors():
    bare_attention = Request("attention", torch.device("cuda"), torch.float16, head_dim=64)
    text = _dispatch.explain_request(bare_attention, assume="sm_90")
    bare_lstm = Request("lstm", torch.device("cuda"), torch.float16)
    text += _dispatch.explain_request(bare_lstm, assume="sm_90")
    if pyattn.backend_status()["triton"] != "triton is not installed":
        assert "unknown" in text


def test_explain_after_a_memoised_cell_call_still_sees_the_request():
    cell = pyattn.nn.LSTMCell(5, 6)
    x = torch.randn(3, 5)
    first = pyattn.explain(cell, x)
    cell(x)  # fills the cell's plan memo
    assert pyattn.explain(cell, x) == first
