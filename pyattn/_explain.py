"""``pyattn.explain``: which backend would serve a call, and why each other one would not."""

from __future__ import annotations

from typing import Callable

from pyattn import _dispatch


def explain(function: Callable | str, *args, **kwargs) -> str:
    """Report, for a functional call, each backend's verdict and what ``auto`` picks.

    ``function`` is a pyattn functional (``pyattn.functional.scaled_dot_product_attention``) or its
    name; the arguments are those of the call. Nothing is computed: inputs may be ``meta`` tensors.

        >>> print(pyattn.explain("scaled_dot_product_attention", q, k, v, is_causal=True))
    """
    from pyattn import functional

    name = function if isinstance(function, str) else function.__name__
    builder = getattr(functional, "REQUEST_BUILDERS", {}).get(name)
    if builder is None:
        raise ValueError(f"explain: {name!r} is not a pyattn functional; expected one of {sorted(functional.REQUEST_BUILDERS)}")
    return _dispatch.explain_request(builder(*args, **kwargs))
