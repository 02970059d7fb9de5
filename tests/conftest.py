"""Shared test machinery: the tolerance table, input factories, poisoning, GPU/interpreter markers.

Two pytest processes make up the suite (``make test`` runs both):
  * plain: everything not marked ``interpreter``; GPU tests run where a GPU is, else skip with a reason;
  * ``TRITON_INTERPRET=1 pytest -m interpreter``: the Triton kernels on CPU tensors. The variable must
    be set before Triton is imported, which is why it is a separate process, not a fixture.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
# Whether `make` built the extension: a CUDA toolkit is here (nvcc on PATH or CUDA_HOME) and the build was
# not skipped on purpose. Where it holds, a missing extension is a failure, not a skip.
TOOLKIT_PRESENT = (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))) and os.environ.get(
    "PYATTN_SKIP_CUDA_BUILD", "0") != "1"
IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() >= (9, 0)

from pyattn.tolerances import RTOL, RTOL_TF32, relative_error  # noqa: F401  (one table for tests and bench)


def deadline(seconds: float) -> float:
    """A test's wall-clock limit, loosened on a loaded or small machine (never tightened): a hang must fail,
    a slow CI machine must not. PYATTN_TEST_TIMEOUT_SCALE multiplies it further."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] / cores if hasattr(os, "getloadavg") else 1.0
    scale = min(4.0, max(1.0, 2.0 / cores, load)) * float(os.environ.get("PYATTN_TEST_TIMEOUT_SCALE", "1"))
    return seconds * scale


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float, name: str = "output") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    error = relative_error(out, ref)
    assert error <= rtol, f"{name}: relative error {error:.3e} > {rtol:.1e}"


def random_tensor(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False, generator=None):
    """Fresh normal values (never zeros), made in float32 and cast, so dtypes see the same numbers."""
    values = torch.randn(*shape, generator=generator, dtype=torch.float32, device=device) * scale
    return values.to(dtype).requires_grad_(requires_grad)


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so an element a kernel forgets to write fails the comparison."""
    if tensor.is_floating_point():
        tensor.fill_(float("nan"))
    else:
        tensor.fill_(-12345)
    return tensor


def pytest_configure(config):
    # A PYATTN_BACKEND in the environment would force every call and flip every "auto picks" assertion:
    # the suite tests auto and forces backends itself.
    if os.environ.pop("PYATTN_BACKEND", None) is not None:
        from pyattn import _dispatch

        _dispatch._environment_backend.clear()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch on this machine")
    skip_sm90 = pytest.mark.skip(reason="needs a Hopper GPU (sm_90)")
    skip_interpreter = pytest.mark.skip(
        reason="Triton interpreter test: run in its own process with TRITON_INTERPRET=1 (make test does)"
    )
    for item in items:
        if "requires_cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "requires_sm90" in item.keywords and not IS_SM90:
            item.add_marker(skip_sm90)
        if "interpreter" in item.keywords and not INTERPRET:
            item.add_marker(skip_interpreter)
