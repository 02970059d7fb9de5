"""Ahead-of-time compilation of Triton kernels for a GPU target, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) accepts code the compiler rejects, so each kernel package lists its
specialisations (``attention.aot.aot_specs()``, ``lstm.aot.aot_specs()``): one :class:`CompileSpec` per
kernel × dtype × head dim or hidden size × option set × config × variant that a launch can produce.
``tests/test_triton_compile.py`` and ``python -m pyattn.kernels.report`` compile each for sm_90 and sm_80
through :func:`compile_results`, which compiles a (spec, arch) once and keeps its figures on disk.

**The compiled kernel is the one that runs.** At launch the JIT specialises the arguments it is given:
pointers whose address is 16-byte aligned and integers divisible by 16 get ``tt.divisibility = 16`` (which
lets the compiler vectorise loads and use ``cp.async``), and integers equal to 1 become constants. A spec
is therefore built from the *arguments of a launch* (``meta`` tensors laid out as the launcher lays them
out, and the integers it passes) run through the JIT's own binder, so it carries the signature, constants
and attributes that launch would compile with. ``variant`` names the launch modelled: "aligned"
(contiguous inputs, lengths and sizes multiples of 16) and "unaligned" (odd sizes, views whose strides
and offsets are not multiples of 16: no divisibility hint at all).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

# Per-arch limits (bytes / counts): dynamic shared memory a block may opt in to, shared memory per SM, the
# driver's reservation per block, registers per SM, resident warps and blocks per SM.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}
SHARED_MEMORY_PER_SM = {90: 233472, 80: 167936}
SHARED_MEMORY_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = {90: 65536, 80: 65536}
MAX_WARPS_PER_SM = {90: 64, 80: 64}
MAX_BLOCKS_PER_SM = {90: 32, 80: 32}
CAPABILITIES = (90, 80)
VARIANTS = ("aligned", "unaligned")

# Bump when the figures kept per compile change meaning.
_RESULT_FORMAT = 2  # 2: warp_specialized


@dataclass(frozen=True)
class CompileSpec:
    op: str  # "attention" or "lstm"
    kernel_name: str  # e.g. "attention_forward"
    case: str  # what the launch computes, e.g. "bf16,d128,plain"
    variant: str  # "aligned" or "unaligned": the launch's alignment (see the module docstring)
    config: str  # the tiles and launch options, e.g. "BM128,BN64,w4,s3"
    kernel: object = field(repr=False)  # the @triton.jit function (not an autotune wrapper)
    signature: dict = field(repr=False)  # argument name -> Triton type ("*fp16", "i32", "constexpr", ...)
    constexprs: dict = field(repr=False)  # path (argument index,) -> value, constants and specialised 1/None
    attrs: dict = field(repr=False)  # path -> [["tt.divisibility", 16]] or [], as the JIT computes them
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None  # the PTX register cap (``.maxnreg``) the config sets, if any
    auto_may_pick: bool = True  # whether autotuning/dispatch can choose this config for such a call
    min_capability: int = 80  # skip targets below this (e.g. the Hopper-only TMA path)
    table_entry: tuple | None = None  # (table name, entry key, "aligned"/"unaligned") the config was taken from
    # capability -> {argument name: value}: constexprs the launcher passes differently on that GPU (e.g. the
    # attention dK/dV kernel's TRANSPOSED_DQ, True from sm_90 on); compiled for that target only.
    capability_constexprs: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return f"{self.kernel_name}[{self.case},{self.variant},{self.config}]"

    def constexprs_for(self, capability: int) -> dict:
        """The constexprs a launch on ``sm_<capability>`` compiles with."""
        overrides = self.capability_constexprs.get(capability, {})
        return {**self.constexprs, **{(self.kernel.arg_names.index(name),): value for name, value in overrides.items()}}


def _binder(kernel):
    """The JIT's own argument binder for ``kernel`` (Triton 3.x: ``create_function_from_signature``), or None
    where this Triton has none of that shape."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError:
        return None, None
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return create_function_from_signature(kernel.signature, kernel.params, backend), backend


def _fallback_specialization(kernel, arguments: dict) -> list[tuple[str, object]]:
    """The JIT's rules, spelled out, for a Triton without ``create_function_from_signature``."""
    import torch

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int64: "i64",
             torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}
    specialization = []
    for param in kernel.params:
        value = arguments[param.name]
        if param.is_constexpr or value is None:
            specialization.append(("constexpr", value))
        elif isinstance(value, bool):
            specialization.append(("u1", None))
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                specialization.append(("constexpr", 1))
            else:
                kind = "i32" if -2**31 <= value < 2**31 else "i64"
                aligned = value % 16 == 0 and not param.do_not_specialize
                specialization.append((kind, "D" if aligned else ""))
        elif isinstance(value, float):
            specialization.append(("fp32", None))
        elif isinstance(value, torch.Tensor):
            specialization.append((f"*{names[value.dtype]}", "D" if value.data_ptr() % 16 == 0 else ""))
        else:  # a tensor descriptor
            dtype = names[value.base.dtype]
            specialization.append((f"tensordesc<{dtype}{list(value.block_shape)}>", None))
    return specialization


def jit_specialization(kernel, arguments: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) that the JIT derives when ``kernel`` is launched with ``arguments`` (every
    parameter by name: tensors — ``meta`` ones do, their data pointer carrying the storage offset —, tensor
    descriptors, ints, floats, None, constexpr values), in the form ``triton.compiler.ASTSource`` takes."""
    # A parameter with a default (an optional feature's pointer or flag) takes it when a spec leaves it out.
    arguments = {**{param.name: param.default for param in kernel.params if param.has_default}, **arguments}
    missing = [param.name for param in kernel.params if param.name not in arguments]
    if missing:
        raise TypeError(f"{kernel.__name__}: launch arguments lack {missing}")
    binder, backend = _binder(kernel)
    if binder is not None:
        _, specialization, _ = binder(**{param.name: arguments[param.name] for param in kernel.params})
        parse_attr = backend.parse_attr
    else:
        specialization = _fallback_specialization(kernel, arguments)
        parse_attr = lambda desc: [["tt.divisibility", 16]] if "D" in desc else []  # noqa: E731
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, (kind, value)) in enumerate(zip(kernel.params, specialization)):
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = arguments[param.name]
        elif isinstance(value, str):  # as JITFunction._pack_args: an attribute entry for every specialised argument
            attrs[(index,)] = parse_attr(value)
    return signature, constexprs, attrs


def launch_spec(op: str, kernel_name: str, case: str, variant: str, kernel, arguments: dict, *, config: str,
                num_warps: int, num_stages: int, auto_may_pick: bool, min_capability: int = 80,
                table_entry: tuple | None = None, maxnreg: int | None = None) -> CompileSpec:
    """The spec of ``kernel`` launched with ``arguments`` (see :func:`jit_specialization`); a register cap
    (``maxnreg``) is a launch option and shows in the config's name as ``,r<cap>``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    signature, constexprs, attrs = jit_specialization(kernel, arguments)
    config = config + (f",r{maxnreg}" if maxnreg is not None else "")
    return CompileSpec(op=op, kernel_name=kernel_name, case=case, variant=variant, config=config, kernel=kernel,
                       signature=signature, constexprs=constexprs, attrs=attrs, num_warps=num_warps,
                       num_stages=num_stages, maxnreg=maxnreg, auto_may_pick=auto_may_pick,
                       min_capability=min_capability, table_entry=table_entry)


def compile_spec(spec: CompileSpec, capability: int):
    """Compile ``spec`` for ``sm_<capability>``; returns Triton's compiled kernel (asm + metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs_for(capability),
                       attrs=spec.attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


# ----------------------------------------------------------------------------- figures of a compiled kernel


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump (``knobs.nvidia.cuobjdump``), else the CUDA toolkit's, else None."""
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    for candidate in ("/usr/local/cuda-13.0/bin/cuobjdump", "/usr/local/cuda/bin/cuobjdump"):
        if os.path.exists(candidate):
            return candidate
    return None


_RESOURCE_USAGE = re.compile(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(binary_path: str) -> list[dict]:
    """``cuobjdump -res-usage`` of a cubin or a library: one dict per (arch, function) with its registers,
    stack (spill) bytes, static shared memory and local memory."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("no cuobjdump: neither Triton's bundled one nor a CUDA toolkit's was found")
    text = subprocess.run([tool, "-res-usage", binary_path], capture_output=True, text=True, check=True).stdout
    # Each function's figures follow its name, under its section's "arch = sm_XX" line.
    rows, arch = [], None
    flat = " ".join(line.strip() for line in text.splitlines())
    for match in re.finditer(r"arch = sm_(\w+)|" + _RESOURCE_USAGE.pattern, flat):
        if match.group(1) is not None:
            arch = match.group(1)
            continue
        name, registers, stack, shared, local = match.groups()[1:]
        rows.append(dict(arch=arch, function=name, registers=int(registers), stack_bytes=int(stack),
                         static_shared_bytes=int(shared), local_bytes=int(local)))
    return rows


def blocks_per_sm(capability: int, registers: int, shared_bytes: int | None, num_warps: int) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256), shared memory and warps."""
    registers_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM[capability] // (registers_per_warp * num_warps)
    by_warps = MAX_WARPS_PER_SM[capability] // num_warps
    limits = [by_registers, by_warps, MAX_BLOCKS_PER_SM[capability]]
    if shared_bytes is not None:
        limits.append(SHARED_MEMORY_PER_SM[capability] // (shared_bytes + SHARED_MEMORY_RESERVED_PER_BLOCK))
    return max(0, min(limits))


def kernel_figures(compiled, capability: int, num_warps: int) -> dict:
    """What the test gates and the report prints, read from a compiled kernel's cubin and PTX."""
    cubin = compiled.asm.get("cubin")
    ptx = compiled.asm.get("ptx", "")
    figures = dict(has_cubin=bool(cubin), wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx,
                   # Triton's warp specialisation: partitions with their register budgets set by setmaxnreg.
                   warp_specialized="setmaxnreg" in ptx,
                   cp_async=re.search(r"cp\.async\.c[ag]\.", ptx) is not None,
                   # Static count of tensor-core MMA instructions (per warp; per iteration where the loop that
                   # holds them is not unrolled, as the LSTM grid kernel's time loop). Absent from older caches.
                   mma_instructions=len(re.findall(r"\b(?:mma\.sync\.aligned|wgmma\.mma_async)\.", ptx)))
    registers = stack = static_shared = local = None
    if cubin:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
            handle.write(cubin)
        try:
            usage = resource_usage(handle.name)
        finally:
            os.unlink(handle.name)
        if usage:
            registers, stack = usage[0]["registers"], usage[0]["stack_bytes"]
            static_shared, local = usage[0]["static_shared_bytes"], usage[0]["local_bytes"]
    if registers is None:  # no cuobjdump: what the compiled kernel knows (set only once loaded on a GPU)
        registers, stack, static_shared, local = getattr(compiled, "n_regs", None), None, 0, None
    shared = compiled.metadata.shared + (static_shared or 0)
    # A warp-specialised kernel runs more warps than its config asks for (its producer partition's and the
    # consumers'): the compiled kernel's own count decides residency.
    num_warps = max(num_warps, getattr(compiled.metadata, "num_warps", num_warps))
    figures.update(registers=registers, spill_bytes=None if stack is None else stack + (local or 0),
                   shared_bytes=shared,
                   ctas_per_sm=None if registers is None else blocks_per_sm(capability, registers, shared, num_warps))
    return figures


# ----------------------------------------------------------------------------- one compile per (spec, arch)


def cache_dir() -> str:
    """``pyattn-aot`` under Triton's cache directory (``triton.knobs.cache.dir``: TRITON_CACHE_DIR or ~/.triton)."""
    try:
        from triton import knobs

        base = knobs.cache.dir
    except (ImportError, AttributeError):
        from triton.runtime.cache import default_cache_dir

        base = default_cache_dir()
    return os.path.join(base, "pyattn-aot")


def spec_key(spec: CompileSpec, capability: int) -> str:
    """A hash of everything that decides the compiled kernel: the kernel's source and its callees (the JIT's
    ``cache_key``), the specialisation, the launch options, the target and the Triton version."""
    import triton

    text = json.dumps([_RESULT_FORMAT, triton.__version__, capability, spec.kernel.cache_key,
                       sorted(spec.signature.items()), repr(sorted(spec.constexprs_for(capability).items())),
                       repr(sorted(spec.attrs.items())), spec.num_warps, spec.num_stages]
                      + ([spec.maxnreg] if spec.maxnreg is not None else []))  # keeps older keys valid
    return hashlib.sha256(text.encode()).hexdigest()


def _cached(key: str) -> dict | None:
    try:
        with open(os.path.join(cache_dir(), f"{key}.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _store(key: str, result: dict) -> None:
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(result, handle)
    os.replace(handle.name, os.path.join(directory, f"{key}.json"))  # atomic: concurrent runs never read halves


def compile_result(spec: CompileSpec, capability: int) -> dict:
    """The figures of ``spec`` compiled for ``sm_<capability>``, compiled at most once per kernel version (kept
    in :func:`cache_dir`). A failed compile is not kept: ``error`` holds its message."""
    key = spec_key(spec, capability)
    cached = _cached(key)
    if cached is not None:
        return dict(cached, cached=True)
    start = time.perf_counter()
    try:
        compiled = compile_spec(spec, capability)
    except Exception as error:  # reported by the caller with the spec's name
        return dict(error=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - start, cached=False)
    result = dict(error=None, **kernel_figures(compiled, capability, spec.num_warps),
                  seconds=round(time.perf_counter() - start, 2))
    _store(key, result)
    return dict(result, cached=False)


# Spec lists by module, built once per process (workers rebuild them: kernels do not pickle).
_SPEC_MODULES = {"attention": "pyattn.kernels.attention.aot", "lstm": "pyattn.kernels.lstm.aot",
                 "decode": "pyattn.kernels.decode.aot"}  # decode's compile gate: tests/test_decode_compile.py
_spec_lists: dict[str, dict[str, CompileSpec]] = {}


def specs(op: str) -> dict[str, CompileSpec]:
    """Every spec of ``op`` ("attention" or "lstm") by name."""
    if op not in _spec_lists:
        import importlib

        listed = importlib.import_module(_SPEC_MODULES[op]).aot_specs()
        by_name = {spec.name: spec for spec in listed}
        if len(by_name) != len(listed):
            raise AssertionError(f"{op}: AOT spec names are not unique")
        _spec_lists[op] = by_name
    return _spec_lists[op]


def _compile_job(op: str, name: str, capability: int) -> dict:
    return compile_result(specs(op)[name], capability)


def _expected_cost(spec: CompileSpec, capability: int) -> float:
    """A rough order for the pool (longest first, so that no long compile is left alone at the end): Philox,
    masks and the strict-fp32 FMA dots make the big kernels; ptxas takes longer for sm_80."""
    named = {spec.kernel.arg_names[path[0]]: value for path, value in spec.constexprs.items()}
    cost = 1.0 + 4.0 * bool(named.get("HAS_DROPOUT")) + 2.0 * bool(named.get("MASK_KIND"))
    cost += bool(named.get("HAS_SOFTCAP")) + bool(named.get("HAS_ALIBI"))
    if named.get("DOT_PRECISION") == "ieee" and any("fp32" in kind for kind in spec.signature.values()):
        cost *= 3.0
    return cost * (1.3 if capability == 80 else 1.0)


def compile_results(jobs: list[tuple[str, str, int]], *, workers: int | None = None, progress=None) -> dict:
    """Figures of every (op, spec name, capability) job: cached ones read back, the rest compiled in a process
    pool, each exactly once. ``progress``: a text stream that gets one line per finished compile."""
    results, todo = {}, []
    for job in dict.fromkeys(jobs):
        op, name, capability = job
        cached = _cached(spec_key(specs(op)[name], capability))
        if cached is not None:
            results[job] = dict(cached, cached=True)
        else:
            todo.append(job)
    if progress is not None:
        print(f"[pyattn aot] {len(results)}/{len(results) + len(todo)} (spec, arch) compiles cached in {cache_dir()};"
              f" compiling {len(todo)}", file=progress, flush=True)
    if not todo:
        return results
    todo.sort(key=lambda job: -_expected_cost(specs(job[0])[job[1]], job[2]))
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # no fork after torch/triton have started threads
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_compile_job, *job): job for job in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            job = futures[future]
            results[job] = future.result()
            if progress is not None:
                op, name, capability = job
                seconds = results[job].get("seconds", 0.0)
                status = "FAILED" if results[job].get("error") else f"{seconds:.1f} s"
                print(f"[pyattn aot] {done}/{len(todo)} compiled ({time.perf_counter() - start:.0f} s): {name} "
                      f"sm_{capability} {status}", file=progress, flush=True)
    return results


def all_jobs(ops=("attention", "lstm"), capabilities=CAPABILITIES) -> list[tuple[str, str, int]]:
    return [(op, name, capability) for op in ops for name, spec in specs(op).items() for capability in capabilities
            if capability >= spec.min_capability]


def describe(spec: CompileSpec) -> dict:
    """The spec's identity as plain data (what the report prints beside the figures)."""
    return dict(op=spec.op, kernel=spec.kernel_name, case=spec.case, variant=spec.variant, config=spec.config,
                num_warps=spec.num_warps, num_stages=spec.num_stages, maxnreg=spec.maxnreg,
                auto_may_pick=spec.auto_may_pick)


def progress_stream():
    """The process's original stderr. Under pytest's default fd capture it is captured too: a test shows
    progress live by suspending capture around the compiles (``capturemanager.global_and_fixture_disabled``,
    as tests/test_triton_compile.py does)."""
    return sys.__stderr__
