"""The accuracy measure and bounds shared by the tests and the benchmark's checks (one table).

Error is ‖out − ref‖ / ‖ref‖ against a float64 reference. fp16/bf16 kernels accumulate in fp32, so
their error is dominated by rounding of inputs and outputs.
"""

from __future__ import annotations

import torch

RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
# fp32 through tensor cores (tf32) or the interpreter's dot: looser than strict fp32.
RTOL_TF32 = 3e-4


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the plain difference norm when ref is exactly zero)."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    denominator = ref64.norm().item()
    difference = (out64 - ref64).norm().item()
    return difference / denominator if denominator else difference
