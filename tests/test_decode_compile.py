"""The decode kernels compile for real GPUs (sm_90, sm_80) without spilling registers or overflowing shared memory.

Every AOT spec of ``pyattn.kernels.decode.aot`` (each a launch's specialisation, built through the launcher's own
argument builder) is compiled with ``triton.compile`` for a GPUTarget on this GPU-less machine, once per (spec,
arch), in a process pool before the first test; figures are kept under Triton's cache directory (a cold run takes
minutes). ``python -m pyattn.kernels.decode.aot`` prints the same figures as a table (docs/decode.md holds it).
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import INTERPRET

pytest.importorskip("triton", reason="triton is not installed")

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles for GPU targets; the interpreter run skips it")

CAPABILITIES = [90, 80]


def _names():
    if INTERPRET:  # under the interpreter there are no JIT functions to specialise
        return []
    from pyattn.kernels.decode import aot

    return list(aot.specs_by_name())


NAMES = _names()


@pytest.fixture(scope="module")
def compiled():
    from pyattn.kernels import _aot
    from pyattn.kernels.decode import aot

    return aot.compile_all(CAPABILITIES, progress=_aot.progress_stream())


@pytest.mark.parametrize("capability", CAPABILITIES, ids=[f"sm{c}" for c in CAPABILITIES])
@pytest.mark.parametrize("name", NAMES)
def test_decode_kernel_compiles_without_spills(name, capability, compiled):
    from pyattn.kernels._aot import SHARED_MEMORY_LIMIT

    result = compiled[(name, capability)]
    assert result["error"] is None, f"{name} does not compile for sm_{capability}: {result['error']}"
    assert result["has_cubin"] and result["spill_bytes"] is not None, f"{name}: no cubin or no register figures"
    assert result["spill_bytes"] == 0, (f"{name} spills {result['spill_bytes']} bytes per thread on sm_{capability} "
                                        f"({result['registers']} registers)")
    assert result["shared_bytes"] <= SHARED_MEMORY_LIMIT[capability], f"{name}: {result['shared_bytes']} bytes"


def test_specs_model_distinct_launches():
    from pyattn.kernels import _aot
    from pyattn.kernels.decode import aot

    keys = {}
    for spec in aot.aot_specs():
        key = _aot.spec_key(spec, 90)
        assert key not in keys, f"{spec.name} and {keys[key]} compile the same kernel"
        keys[key] = spec.name


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_a_call_without_new_tokens_compiles_the_same_kernel(paged):
    """Without k/v the launcher passes q in their place: the same specialisation as a decode step's."""
    from pyattn.kernels import _aot
    from pyattn.kernels.decode import aot

    appending = aot._attention_spec(torch.bfloat16, 128, 16, paged=paged, split=True)
    attending = aot._attention_spec(torch.bfloat16, 128, 16, paged=paged, split=True, append=False)
    assert _aot.spec_key(appending, 90) == _aot.spec_key(attending, 90)
