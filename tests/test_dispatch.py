"""Backend dispatch: availability, forcing, automatic fallback, explanations."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import pyattn
from pyattn import _dispatch
from pyattn._dispatch import Request, Support


def test_import_and_available_backends_lists_reference():
    backends = pyattn.available_backends()
    assert "reference" in backends
    assert set(backends) <= {"cuda", "triton", "reference"}
    status = pyattn.backend_status()
    assert status["reference"] == "available"
    for name, text in status.items():
        assert (name in backends) == (text == "available")


def test_import_works_without_extension_and_without_triton():
    # A fresh interpreter where both pyattn._C and triton fail to import.
    # A fresh interpreter where pyattn._C and triton cannot be imported (None in sys.modules blocks them).
    code = (
        "import sys\n"
        "for name in ('triton', 'triton.language', 'pyattn._C'):\n"
        "    sys.modules[name] = None\n"
        "import pyattn\n"
        "print(pyattn.available_backends())\n"
        "print(pyattn.backend_status())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin", "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    assert "['reference']" in result.stdout
    assert "triton is not installed" in result.stdout


def test_forcing_a_missing_backend_raises_named_error():
    request = Request(op="lstm_cell", device=torch.device("cpu"), dtype=torch.float32)
    if not _dispatch.triton_interpreter_enabled():
        with pyattn.use_backend("triton"), pytest.raises(pyattn.BackendUnavailableError, match="'triton'"):
            _dispatch.choose(request)
    with pyattn.use_backend("cuda"), pytest.raises(pyattn.BackendUnavailableError, match="'cuda'"):
        _dispatch.choose(request)


def test_auto_falls_back_to_reference_on_cpu():
    request = Request(op="lstm_cell", device=torch.device("cpu"), dtype=torch.float64)
    name, fn = _dispatch.choose(request)
    assert name == "reference"
    assert callable(fn)


def test_unknown_backend_name_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        with pyattn.use_backend("tritn"):
            pass
    monkeypatch.setenv("PYATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="PYATTN_BACKEND"):
        _dispatch.default_backend()


def test_environment_default_backend(monkeypatch):
    monkeypatch.setenv("PYATTN_BACKEND", "reference")
    assert _dispatch.default_backend() == "reference"
    with pyattn.use_backend("auto"):
        assert _dispatch.default_backend() == "auto"
    assert _dispatch.default_backend() == "reference"


def test_support_reasons_name_what_is_missing():
    backend = _dispatch.Backend("toy", lambda: None)
    support = Support(
        devices=frozenset({"cuda"}),
        dtypes=frozenset({torch.float16}),
        features=frozenset({"mask"}),
        max_head_dim=128,
    )
    backend.implementations["attention"] = (support, lambda: None)
    request = Request("attention", torch.device("cpu"), torch.float32, head_dim=256, features=frozenset({"dropout"}))
    reasons = " | ".join(backend.not_supported_reasons(request))
    assert "device cpu" in reasons
    assert "dtype float32" in reasons
    assert "head dim 256 > 128" in reasons
    assert "dropout" in reasons
    assert backend.not_supported_reasons(Request("lstm_cell", torch.device("cuda"), torch.float16)) == [
        "has no implementation of lstm_cell"
    ]


def test_no_backend_error_lists_every_backend():
    request = Request(op="no_such_op", device=torch.device("cpu"), dtype=torch.float32)
    with pytest.raises(pyattn.BackendUnavailableError) as info:
        _dispatch.choose(request)
    for name in ("cuda", "triton", "reference"):
        assert name in str(info.value)


def test_explain_request_names_the_pick():
    text = _dispatch.explain_request(Request(op="lstm_cell", device=torch.device("cpu"), dtype=torch.float32))
    assert "auto picks: reference" in text or "auto picks: triton" in text
    assert "cuda" in text
