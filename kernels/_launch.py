"""Launch helpers shared by the Triton kernel modules."""

from __future__ import annotations

import functools

import torch


def on_interpreter(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs in the Triton interpreter: Triton launches CPU tensors only there
    (TRITON_INTERPRET=1), and compiled kernels only CUDA tensors. Decided per launch from the data, so that
    no module reads the environment and interpreter-only configs are chosen at launch time."""
    return device.type == "cpu"


def on_input_device(launcher):
    """Run a launcher with its inputs' CUDA device current: Triton launches on the current device, not the
    tensors'. The device is the first tensor argument's, else the ``device`` keyword's (a launcher that
    allocates from scratch)."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        if first is not None:
            device = first.device
        elif "device" in kwargs:
            device = torch.device(kwargs["device"])
        else:
            raise TypeError(f"{launcher.__name__}: on_input_device needs a tensor argument or a device keyword")
        if device.type == "cuda":
            with torch.cuda.device(device):
                return launcher(*args, **kwargs)
        return launcher(*args, **kwargs)

    return launch
