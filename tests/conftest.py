"""Shared test machinery: the tolerance table, input factories, poisoning, GPU/interpreter markers.

Two pytest processes make up the suite (``make test`` runs both):
  * plain: everything not marked ``interpreter``; GPU tests run where a GPU is, else skip with a reason;
  * ``TRITON_INTERPRET=1 pytest -m interpreter``: the Triton kernels on CPU tensors. The variable must
    be set before Triton is imported, which is why it is a separate process, not a fixture.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
IS_SM90 = HAS_CUDA and torch.cuda.get_device_capability() >= (9, 0)

# Relative error bound ‖out − ref‖ / ‖ref‖ against a float64 reference, per input dtype.
# fp16/bf16 kernels accumulate in fp32, so their error is dominated by rounding of inputs/outputs.
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
# fp32 through tensor cores (tf32) or the interpreter's dot: looser than strict fp32.
RTOL_TF32 = 3e-4


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are exactly zero)."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denominator = ref64.norm().item()
    difference = (out64 - ref64).norm().item()
    if denominator == 0.0:
        return difference
    return difference / denominator


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
