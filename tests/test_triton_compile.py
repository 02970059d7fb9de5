"""Every Triton kernel compiles for real GPUs (sm_90, sm_80), not only in the interpreter.

The interpreter accepts code the compiler rejects; this compiles each kernel module's AOT_SPECS
(every kernel × dtype × autotune config users can reach) with ``triton.compile`` for a GPUTarget,
on this GPU-less machine, and checks shared memory against the device limit.
"""

from __future__ import annotations

import importlib

import pytest

from tests.conftest import INTERPRET

triton = pytest.importorskip("triton", reason="triton is not installed")

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles for GPU targets; the interpreter run skips it")

KERNEL_MODULES = ["pyattn.kernels.attention", "pyattn.kernels.lstm"]


def _all_specs():
    specs = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        module_specs = getattr(module, "AOT_SPECS", None)
        assert module_specs, f"{module_name} defines no AOT_SPECS"
        specs.extend(module_specs)
    return specs


SPECS = _all_specs()


@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("spec", SPECS, ids=[spec.name for spec in SPECS])
def test_kernel_compiles_for_gpu(spec, capability):
    from pyattn.kernels._aot import SHARED_MEMORY_LIMIT, compile_spec

    if capability < spec.min_capability:
        pytest.skip(f"{spec.name} targets sm_{spec.min_capability}+")
    compiled = compile_spec(spec, capability)
    assert compiled.asm.get("cubin"), f"{spec.name}: no cubin for sm_{capability}"
    shared = compiled.metadata.shared
    assert shared <= SHARED_MEMORY_LIMIT[capability], (
        f"{spec.name}: {shared} bytes of shared memory > sm_{capability} limit {SHARED_MEMORY_LIMIT[capability]}"
    )
