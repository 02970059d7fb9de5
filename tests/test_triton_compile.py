"""Every Triton kernel compiles for real GPUs (sm_90, sm_80), not only in the interpreter.

The interpreter accepts code the compiler rejects; this compiles each kernel module's AOT_SPECS
(every kernel × dtype × autotune config users can reach) with ``triton.compile`` for a GPUTarget,
on this GPU-less machine, and checks shared memory against the device limit. The compiles run in a
process pool (one worker per core) up front, since a cold compile of the whole set is minutes long;
each parametrised test then checks its own result.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import multiprocessing
import os

import pytest

from tests.conftest import INTERPRET

triton = pytest.importorskip("triton", reason="triton is not installed")

pytestmark = pytest.mark.skipif(INTERPRET, reason="compiles for GPU targets; the interpreter run skips it")

KERNEL_MODULES = ["pyattn.kernels.attention", "pyattn.kernels.lstm"]
CAPABILITIES = [90, 80]


def _module_specs(module_name):
    specs = getattr(importlib.import_module(module_name), "AOT_SPECS", None)
    assert specs, f"{module_name} defines no AOT_SPECS"
    return specs


# (module name, index in its AOT_SPECS, spec): the index lets a worker process find the same spec.
CASES = [(module_name, index, spec) for module_name in KERNEL_MODULES for index, spec in enumerate(_module_specs(module_name))]


def _compile_in_worker(module_name: str, index: int, capability: int) -> dict:
    """Compile one spec; returns what the test checks (an error text instead of raising)."""
    from pyattn.kernels._aot import compile_spec

    spec = _module_specs(module_name)[index]
    try:
        compiled = compile_spec(spec, capability)
    except Exception as error:  # the test reports it with the spec's name
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": None, "shared": compiled.metadata.shared, "has_cubin": bool(compiled.asm.get("cubin"))}


@pytest.fixture(scope="module")
def compiled_results():
    jobs = [(module_name, index, capability) for module_name, index, spec in CASES for capability in CAPABILITIES
            if capability >= spec.min_capability]
    context = multiprocessing.get_context("spawn")  # no fork after torch/triton have started threads
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {job: pool.submit(_compile_in_worker, *job) for job in jobs}
        return {job: future.result() for job, future in futures.items()}


@pytest.mark.parametrize("capability", CAPABILITIES, ids=[f"sm{c}" for c in CAPABILITIES])
@pytest.mark.parametrize("case", CASES, ids=[spec.name for _, _, spec in CASES])
def test_kernel_compiles_for_gpu(case, capability, compiled_results):
    from pyattn.kernels._aot import SHARED_MEMORY_LIMIT

    module_name, index, spec = case
    if capability < spec.min_capability:
        pytest.skip(f"{spec.name} targets sm_{spec.min_capability}+")
    result = compiled_results[(module_name, index, capability)]
    assert result["error"] is None, f"{spec.name} does not compile for sm_{capability}: {result['error']}"
    assert result["has_cubin"], f"{spec.name}: no cubin for sm_{capability}"
    assert result["shared"] <= SHARED_MEMORY_LIMIT[capability], (
        f"{spec.name}: {result['shared']} bytes of shared memory > sm_{capability} limit "
        f"{SHARED_MEMORY_LIMIT[capability]}"
    )


def test_hopper_forward_uses_wgmma():
    """The sm_90 half-precision attention forward must use Hopper's warpgroup MMA, not only mma.sync."""
    from pyattn.kernels._aot import compile_spec

    spec = next(spec for module_name, _, spec in CASES
                if module_name == "pyattn.kernels.attention" and spec.name.startswith("attention_forward[bf16,d128"))
    assert "wgmma" in compile_spec(spec, 90).asm["ptx"], f"{spec.name}: no wgmma in the sm_90 PTX"
