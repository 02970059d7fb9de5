"""``pyattn.explain``: which kernel variant would serve a call, and why each other one would not."""

from __future__ import annotations

from typing import Callable

import torch

from pyattn import _dispatch


def explain(function: Callable | str | torch.nn.Module, *args, assume: str | None = None, **kwargs) -> str:
    """Report, for one call, every variant's verdict with its reasons, and which one runs.

    ``function``: a pyattn functional (``pyattn.functional.scaled_dot_product_attention``) or its
    name, or a pyattn module (``pyattn.nn.LSTM(...)``); the arguments are those of the call. Nothing
    is computed by a functional (inputs may be ``meta`` tensors); a module runs its forward up to its
    first dispatched call (its validation, for the pyattn modules), so give it inputs on its own
    device, or meta inputs to a module moved with ``.to("meta")``.

    ``assume="sm_90"`` (or ``"sm_80"``) answers for that GPU instead of this machine's device, on any
    machine: whole-backend checks (extension built, Triton installed) still apply; "no GPU visible"
    does not.

        >>> print(pyattn.explain("scaled_dot_product_attention", q, k, v, is_causal=True, assume="sm_90"))
    """
    if isinstance(function, torch.nn.Module):
        request = _module_request(function, args, kwargs)
    else:
        from pyattn import functional

        builders = functional.REQUEST_BUILDERS
        name = function if isinstance(function, str) else getattr(function, "__name__", None)
        if name not in builders:
            raise ValueError(f"explain: {function!r} is not a pyattn functional or module; pass a pyattn.nn module, "
                             f"a pyattn.functional function or one of the names {sorted(builders)}")
        request = builders[name](*args, **kwargs)
    return _dispatch.explain_request(request, assume=assume)


def _module_request(module: torch.nn.Module, args, kwargs) -> _dispatch.Request:
    if not type(module).__module__.startswith("pyattn."):
        raise ValueError(f"explain: {type(module).__name__} is not a pyattn module; pass a pyattn.nn module (e.g. "
                         "pyattn.nn.LSTM) or a pyattn.functional function")
    try:
        with _dispatch.capture_request():
            module(*args, **kwargs)
    except _dispatch.RequestCaptured as captured:
        return captured.request
    raise ValueError(f"explain: {type(module).__name__}'s forward reached no pyattn dispatch for these inputs")
