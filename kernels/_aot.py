"""Ahead-of-time compilation of Triton kernels for a GPU target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) accepts code the compiler rejects, so every kernel module
lists ``AOT_SPECS``: one :class:`CompileSpec` per kernel specialisation (dtype, head dim, autotune
config) that users can reach. ``tests/test_triton_compile.py`` compiles each for sm_90 and sm_80.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Dynamic shared memory per block that a kernel may use (bytes): H100 / A100 opt-in limits.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}


@dataclass(frozen=True)
class CompileSpec:
    name: str  # readable id for test output, e.g. "attention_forward[fp16,d128,BM128,BN64]"
    kernel: object  # the @triton.jit function (unwrap autotune/heuristics wrappers: pass `.fn`)
    signature: dict  # argument name -> Triton type string ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 3
    min_capability: int = 80  # skip targets below this (e.g. a Hopper-only TMA path)


def compile_spec(spec: CompileSpec, capability: int):
    """Compile ``spec`` for ``sm_<capability>``; returns Triton's compiled kernel (asm + metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    return triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
