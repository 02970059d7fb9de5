"""What every op's benchmark shares: the prepared call, the check's measure and bound, input factories.

The check runs a backend's outputs (and gradients, when the mode has a backward) against float64 on
a slice whose rows are independent of the rest (first and last (batch, head) of attention, first and
last batch row of the LSTM), so it stays cheap at 16k tokens and is still exact. Its bound is
flash-attention's rule: error ≤ max(RTOL[dtype], 2 × the error of PyTorch's own computation in that
dtype), both against the same float64 reference.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

import pyattn

from pyattn.tolerances import RTOL, RTOL_TF32, relative_error  # noqa: F401  (re-exported for the suites)


class Unsupported(Exception):
    """This backend cannot run this case (the message says why): a skipped row, not an error."""


@dataclass
class Workload:
    """One backend on one case, ready to run. ``call`` is the measured call."""

    case: object
    backend: str
    device: torch.device
    call: Callable[[], object]
    check: Callable[[], tuple[dict[str, float], bool]]  # -> (relative error per tensor, all finite)
    bounds: Callable[[], dict[str, float]]  # -> the bound per tensor
    grad_to_none: list[torch.Tensor] = field(default_factory=list)
    cuda_graph: bool = False  # time inside a CUDA graph (inputs rotate so none is found in L2)
    correctness_only: str | None = None  # why its timings are no speed figure (the Triton interpreter)

    def synchronized_call(self) -> None:
        self.call()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def backend_context(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The context a pyattn row runs in, as a factory decided once when the row is prepared:
    ``use_backend(name)``, except for "auto" when nothing forces a backend, which runs bare, as a
    user's code does after changing one import (the environment is read here, not on every call)."""
    if name == "auto" and os.environ.get("PYATTN_BACKEND", "auto") in ("", "auto"):
        return contextlib.nullcontext
    return functools.partial(pyattn.use_backend, name)


def on_backend(name: str, function: Callable) -> Callable:
    """``function`` run in :func:`backend_context`; ``function`` itself where that is bare, so a timed
    call carries exactly the Python a user's call does."""
    context = backend_context(name)
    if context is contextlib.nullcontext:
        return function

    @functools.wraps(function)
    def run_on_backend(*args, **kwargs):
        with context():
            return function(*args, **kwargs)

    return run_on_backend


def errors(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: relative_error(outputs[name], reference[name]) for name in reference}


def bounds_from(torch_errors: dict[str, float], dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    floor = RTOL_TF32 if dtype == torch.float32 and device.type == "cuda" else RTOL[dtype]
    return {name: max(floor, 2.0 * error) for name, error in torch_errors.items()}


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def random_tensor(shape, dtype, device, generator, scale=1.0) -> torch.Tensor:
    """Fresh normal values (never zeros), drawn in float32 so every dtype sees the same numbers."""
    return (torch.randn(*shape, generator=generator, device=device) * scale).to(dtype)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Leave NaN-filled blocks in the caching allocator for the next allocations, so an output element
    a kernel never writes reads as NaN (caught by the finiteness check), not a stale plausible value."""
    if device.type == "cuda":
        torch.empty(nbytes // 4 + 1, dtype=torch.float32, device=device).fill_(float("nan"))


def probe(call: Callable[[], object]) -> None:
    """Call once (with the inputs the workload uses: kernel choice depends on requires_grad); "no
    kernel for these inputs" becomes :class:`Unsupported` with torch's or pyattn's reasons (SDPA
    explains in warnings why each of its kernels declined)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except pyattn.BackendUnavailableError as error:
            raise Unsupported(str(error)) from None
        except RuntimeError as error:
            message = str(error)
            if "No available kernel" not in message and "No viable backend" not in message:
                raise
            reasons = "; ".join(dict.fromkeys(str(w.message).strip() for w in caught))
            raise Unsupported(f"no kernel for these inputs: {reasons or message.splitlines()[0]}") from None
