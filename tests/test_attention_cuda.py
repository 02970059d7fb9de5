"""CUDA extension attention ops (pyattn._C, csrc/attention) vs the float64 reference and the Triton kernels.

Plain-process tests (no GPU needed):
  * the extension's ops, schemas, CUDA kernels, fake kernels on meta tensors, autograd registration, and the
    dispatch variants' Support (``pyattn.explain`` with ``assume="sm_90"``/``"sm_80"``: cuda/sm80 serves
    SDPA, flash_attention and flash_attention_varlen for fp16/bf16 at head dims 64 and 128, and says why not
    for the rest);
  * the kernels themselves, lane by lane on the CPU: csrc/attention/emulation built with g++ from the same
    headers nvcc compiles, driven through the same launch sequence (attention_run.cuh), forward and backward
    against ``pyattn.reference.attention`` in float64 across causal, windows, GQA/MQA, masks, softcap,
    ALiBi, odd lengths, bhsd/bshd/padded strides, fp16 and bf16, both dQ paths; the varlen layout (ragged
    packed sequences with lengths 0 and 1, L_b != S_b, out/lse/dQ/dK/dV); and planted bugs — each a
    one-line edit of a copy of the kernel sources — that the emulation must catch (a wrong answer, an
    emulator error, or bank conflicts), four of them in the varlen indexing only a varlen case can catch.
GPU tests (``requires_cuda``): every option against the reference, CUDA against Triton directly (out, lse,
dQ/dK/dV, dense and varlen), deterministic dQ bit-reproducible, opcheck, torch.compile(fullgraph=True).

    python -m pytest tests/test_attention_cuda.py
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import pyattn
from pyattn import _extension, _registry
from pyattn.functional import flash_attention, flash_attention_varlen, scaled_dot_product_attention
from pyattn.ops import attention_cuda
from pyattn.reference import attention as reference
from tests.conftest import RTOL, TOOLKIT_PRESENT, assert_close, poison_, random_tensor, relative_error

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
OP_NAMES = ["cuda_attention_fwd", "cuda_attention_bwd", "cuda_attention_varlen_fwd", "cuda_attention_varlen_bwd"]
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _extension_or_skip():
    try:
        return _extension.extension_module()
    except ImportError as error:
        if TOOLKIT_PRESENT:
            raise  # a toolkit is here, so the build should have produced the extension
        pytest.skip(f"no CUDA toolkit (or PYATTN_SKIP_CUDA_BUILD=1): the extension is not built ({error})")


@pytest.fixture
def ops():
    _extension_or_skip()
    return torch.ops.pyattn


def _qkv(batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim, dtype, device="cpu", layout="bhsd"):
    """q, k, v as (B, H, seqlen, D) views: contiguous (bhsd), transposed from (B, seqlen, H, D) (bshd), or
    sliced out of rows twice as wide (padded: row stride 2D)."""
    def make(heads, seqlen):
        if layout == "bshd":
            return random_tensor(batch, seqlen, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
        if layout == "padded":
            return random_tensor(batch, heads, seqlen, 2 * head_dim, dtype=dtype, device=device)[..., :head_dim]
        return random_tensor(batch, heads, seqlen, head_dim, dtype=dtype, device=device)

    return make(heads_q, seqlen_q), make(heads_k, seqlen_k), make(heads_k, seqlen_k)


# ---- plain process: registration, fake kernels, dispatch ----


def test_extension_holds_the_attention_ops(ops):
    assert attention_cuda.EXTENSION_OPS_LOADED


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_schema_and_cuda_kernel_are_registered(ops, name):
    op = getattr(ops, name).default
    assert op._schema.name == f"pyattn::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


def test_schemas_name_their_arguments(ops):
    forward = [a.name for a in ops.cuda_attention_fwd.default._schema.arguments]
    assert forward == ["q", "k", "v", "mask", "alibi_slopes", "scale", "window_left", "window_right",
                       "diagonal_offset", "softcap", "deterministic"]
    backward = [a.name for a in ops.cuda_attention_bwd.default._schema.arguments]
    assert backward == ["grad_out", "q", "k", "v", "out", "lse", "mask", "alibi_slopes", "scale", "window_left",
                        "window_right", "diagonal_offset", "softcap", "deterministic"]
    assert [r.name for r in ops.cuda_attention_fwd.default._schema.returns] == ["out", "lse"]
    assert [r.name for r in ops.cuda_attention_bwd.default._schema.returns] == ["grad_q", "grad_k", "grad_v"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyattn::cuda_attention_fwd", "Autograd")
    varlen_options = ["max_seqlen_q", "max_seqlen_k", "scale", "window_left", "window_right", "diagonal_offset",
                      "align_to_end", "softcap", "deterministic"]
    forward = [a.name for a in ops.cuda_attention_varlen_fwd.default._schema.arguments]
    assert forward == ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", *varlen_options]
    backward = [a.name for a in ops.cuda_attention_varlen_bwd.default._schema.arguments]
    assert backward == ["grad_out", "q", "k", "v", "out", "lse", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes",
                        *varlen_options]
    assert [r.name for r in ops.cuda_attention_varlen_fwd.default._schema.returns] == ["out", "lse"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pyattn::cuda_attention_varlen_fwd", "Autograd")


def test_module_registers_no_ops_without_the_extension(monkeypatch):
    def missing():
        raise ImportError("extension pyattn._C is not built")

    monkeypatch.setattr(_extension, "extension_module", missing)
    assert attention_cuda._extension_ops_loaded() is False


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_fake_kernels_give_shapes_and_layouts_on_meta(ops, layout):
    q, k, v = _qkv(2, 4, 2, 9, 13, 64, torch.bfloat16, device="meta", layout=layout)
    out, lse = ops.cuda_attention_fwd(q, k, v, None, None, 0.125, -1, 0, 4, 0.0, False)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    assert (out.stride(1) < out.stride(2)) == (layout == "bshd")  # laid out like q: out.transpose(1, 2) is a view
    grads = ops.cuda_attention_bwd(out, q, k, v, out, lse, None, None, 0.125, -1, 0, 4, 0.0, True)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    assert all((g.stride(1) < g.stride(2)) == (layout == "bshd") for g in grads)


def test_varlen_fake_kernels_give_the_triton_varlen_layouts_on_meta(ops):
    q = torch.empty(300, 4, 128, dtype=torch.float16, device="meta")
    k = v = torch.empty(250, 2, 128, dtype=torch.float16, device="meta")
    cu_q, cu_k = (torch.empty(4, dtype=torch.int32, device="meta") for _ in range(2))
    out, lse = ops.cuda_attention_varlen_fwd(q, k, v, cu_q, cu_k, None, 150, 120, 0.1, -1, 0, 0, True, 0.0, False)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (4, 300) and lse.dtype == torch.float32
    grads = ops.cuda_attention_varlen_bwd(out, q, k, v, out, lse, cu_q, cu_k, None, 150, 120, 0.1, -1, 0, 0, True,
                                          0.0, False)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all(g.is_contiguous() for g in grads)


def test_variants_and_what_they_serve():
    for op in ("attention", "attention_backward"):
        cuda = [v for v in _registry.variants(op) if v.backend == "cuda"]
        assert [v.qualified_name for v in cuda] == ["cuda/sm80"]
        support = cuda[0].support
        assert support.devices == frozenset({"cuda"})
        assert support.dtypes == frozenset(DTYPES)
        assert support.min_compute_capability == (8, 0) and support.max_head_dim == 128
    attention = next(v for v in _registry.variants("attention") if v.backend == "cuda").support
    assert attention.features == frozenset({"mask", "causal", "window", "softcap", "alibi", "gqa", "lse"})
    varlen = [v for v in _registry.variants("attention_varlen") if v.backend == "cuda"]
    assert [v.qualified_name for v in varlen] == ["cuda/sm80"]
    assert varlen[0].support.features == frozenset({"causal", "window", "softcap", "alibi", "gqa", "lse"})
    assert varlen[0].support.dtypes == frozenset(DTYPES) and varlen[0].support.max_head_dim == 128


def test_operand_reasons_name_head_dims_and_strides():
    reason = attention_cuda.operands_unsupported_reason
    q, k, v = _qkv(1, 2, 2, 8, 8, 64, torch.float16, device="meta")
    assert reason(q, k, v) is None
    assert reason(*_qkv(1, 2, 2, 8, 8, 64, torch.float16, device="meta", layout="bshd")) is None
    assert reason(*_qkv(1, 2, 2, 8, 8, 64, torch.float16, device="meta", layout="padded")) is None
    assert "head dim 96" in reason(*_qkv(1, 2, 2, 8, 8, 96, torch.float16, device="meta"))
    assert "differ" in reason(q, k, torch.empty(1, 2, 8, 128, dtype=torch.float16, device="meta"))
    odd_rows = torch.empty(1, 2, 8, 68, dtype=torch.float16, device="meta")[..., :64]  # row stride 68
    assert "cp.async" in reason(odd_rows, k, v)
    last_dim_strided = torch.empty(1, 2, 64, 8, dtype=torch.float16, device="meta").transpose(2, 3)
    assert "cp.async" in reason(last_dim_strided, k, v)


def test_shared_memory_mirror_matches_the_kernels(tmp_path):
    """attention_cuda.SHARED_MEMORY_BYTES (the Support check) is the largest kernel's shared memory per head dim."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++")
    program = tmp_path / "shared_bytes.cc"
    program.write_text(
        '#include <cstdio>\n#include "attention/attention_run.cuh"\nusing namespace pyattn::attention;\n'
        "template <int D> unsigned most() { unsigned m = ForwardShape<D>::kSharedBytes; "
        "if (DkDvShape<D>::kSharedBytes > m) m = DkDvShape<D>::kSharedBytes; "
        "if (DqShape<D>::kSharedBytes > m) m = DqShape<D>::kSharedBytes; return m; }\n"
        'int main() { std::printf("%u %u\\n", most<64>(), most<128>()); }\n')
    binary = tmp_path / "shared_bytes"
    build = subprocess.run([compiler, "-std=c++20", "-w", "-DPYATTN_EMULATION", f"-I{CSRC}",
                            f"-I{CSRC / 'attention' / 'emulation' / 'include'}", str(program), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    sizes = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.split()
    assert {64: int(sizes[0]), 128: int(sizes[1])} == attention_cuda.SHARED_MEMORY_BYTES


def test_support_refuses_a_gpu_with_too_little_shared_memory(ops):
    q, k, v = _qkv(1, 2, 2, 8, 8, 128, torch.float16, device="meta")
    request = _registry.Request(op="attention", device=q.device, dtype=q.dtype, head_dim=128,
                                operands=dict(q=q, k=k, v=v))
    ada = _registry.Target("cuda", (8, 9), 128, 101376, 102400, assumed=True)  # RTX 4090: 99 KB per block
    assert "shared memory" in attention_cuda._check_operands(request, ada)
    assert attention_cuda._check_operands(request, _registry.ASSUMABLE_TARGETS["sm_80"]) is None


def _explain(function, *args, assume, **kwargs):
    return pyattn.explain(function, *args, assume=assume, **kwargs)


def _verdict(text: str, variant: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(variant)).split(None, 1)[1]


@pytest.mark.parametrize("assume", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_explain_shows_cuda_serving_sdpa_flash_attention_and_varlen(ops, assume, dtype, head_dim):
    q, k, v = _qkv(2, 8, 2, 97, 33, head_dim, dtype, device="meta")
    packed_q = torch.empty(300, 8, head_dim, dtype=dtype, device="meta")
    packed_kv = torch.empty(250, 2, head_dim, dtype=dtype, device="meta")
    cu_q, cu_k = (torch.empty(4, dtype=torch.int32, device="meta") for _ in range(2))
    calls = [
        ("flash_attention_varlen", (packed_q, packed_kv, packed_kv, cu_q, cu_k, 200, 150), dict(causal=True)),
        ("flash_attention_varlen", (packed_q, packed_kv, packed_kv, cu_q, cu_k, 200, 150),
         dict(window_size=(32, 8), softcap=20.0, alibi_slopes=torch.empty(3, 8, device="meta"), return_lse=True)),
        ("scaled_dot_product_attention", (q, k, v), dict(is_causal=True, enable_gqa=True)),
        ("scaled_dot_product_attention", (q, k, v),
         dict(attn_mask=torch.empty(97, 33, dtype=torch.bool, device="meta"), enable_gqa=True)),
        ("flash_attention", (q, k, v), dict(causal=True, layout="bhsd", return_lse=True)),
        ("flash_attention", (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
         dict(window=(16, 0), softcap=30.0, alibi_slopes=torch.empty(8, device="meta"))),
    ]
    for name, args, kwargs in calls:
        text = _explain(name, *args, assume=assume, **kwargs)
        assert _verdict(text, "cuda/sm80") == "serves", text
        assert text.splitlines()[-1].strip() == "auto picks: cuda/sm80", text


@pytest.mark.parametrize("assume", ["sm_90", "sm_80"])
def test_explain_says_why_cuda_does_not_serve_the_rest(ops, assume):
    def cuda_verdict(name, *args, **kwargs):
        return _verdict(_explain(name, *args, assume=assume, **kwargs), "cuda/sm80")

    q, k, v = _qkv(2, 4, 4, 64, 64, 64, torch.float16, device="meta")
    assert cuda_verdict("flash_attention", q, k, v, dropout_p=0.1, layout="bhsd") == "no: unsupported features: dropout"
    assert "head dim 96" in cuda_verdict("flash_attention", *_qkv(1, 2, 2, 8, 8, 96, torch.float16, device="meta"),
                                         layout="bhsd")
    assert "head dim 256 > 128" in cuda_verdict("flash_attention", *_qkv(1, 2, 2, 8, 8, 256, torch.bfloat16,
                                                                         device="meta"), layout="bhsd")
    assert "dtype float32" in cuda_verdict("flash_attention", *_qkv(1, 2, 2, 8, 8, 64, torch.float32, device="meta"),
                                           layout="bhsd")
    odd = torch.empty(2, 4, 64, 68, dtype=torch.float16, device="meta")[..., :64]  # row stride 68
    assert "cp.async" in cuda_verdict("flash_attention", odd, k, v, layout="bhsd")
    float_mask = torch.empty(64, 64, dtype=torch.float16, device="meta", requires_grad=True)
    assert "mask_grad" in cuda_verdict("scaled_dot_product_attention", q, k, v, attn_mask=float_mask)

    def packed(total, heads, head_dim, dtype=torch.float16):
        return torch.empty(total, heads, head_dim, dtype=dtype, device="meta")

    cu = torch.empty(3, dtype=torch.int32, device="meta")
    q3, kv3 = packed(64, 4, 64), packed(64, 2, 64)
    assert cuda_verdict("flash_attention_varlen", q3, kv3, kv3, cu, cu, 59, 59) == "serves"
    assert cuda_verdict("flash_attention_varlen", q3, kv3, kv3, cu, cu, 59, 59,
                        dropout_p=0.1) == "no: unsupported features: dropout"
    assert "head dim 96" in cuda_verdict("flash_attention_varlen", packed(64, 4, 96), packed(64, 2, 96),
                                         packed(64, 2, 96), cu, cu, 59, 59)
    assert "head dim 256 > 128" in cuda_verdict("flash_attention_varlen", packed(64, 4, 256), packed(64, 2, 256),
                                                packed(64, 2, 256), cu, cu, 59, 59)
    assert "dtype float32" in cuda_verdict("flash_attention_varlen", packed(64, 4, 64, torch.float32),
                                           packed(64, 2, 64, torch.float32), packed(64, 2, 64, torch.float32),
                                           cu, cu, 59, 59)
    odd_rows = torch.empty(64, 4, 68, dtype=torch.float16, device="meta")[..., :64]  # head stride 68
    assert "cp.async" in cuda_verdict("flash_attention_varlen", odd_rows, kv3, kv3, cu, cu, 59, 59)
    slopes = torch.empty(4, device="meta", requires_grad=True)
    assert "alibi_grad" in cuda_verdict("flash_attention_varlen", q3, kv3, kv3, cu, cu, 59, 59, alibi_slopes=slopes)
    many = torch.empty(70001, dtype=torch.int32, device="meta")  # 70000 sequences: more than the grid's z
    assert "batch 70000 > 65535" in cuda_verdict("flash_attention_varlen", q3, kv3, kv3, many, many, 59, 59)


# ---- plain process: the kernels, lane by lane on the CPU ----

EMULATION = CSRC / "attention" / "emulation"
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _build_emulation(source_root: Path, binary: Path, *extra: str) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the CPU emulation of the CUDA kernels")
    command = [compiler, "-std=c++20", "-O1", "-w", "-DPYATTN_EMULATION", *extra, f"-I{source_root}",
               f"-I{source_root / 'attention' / 'emulation' / 'include'}",
               str(source_root / "attention" / "emulation" / "attention_emulation.cc"), "-o", str(binary)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"emulation build failed:\n{result.stderr[-4000:]}"
    return binary


@pytest.fixture(scope="module")
def emulation_binary(tmp_path_factory):
    """csrc/attention/emulation/attention_emulation.cc built with g++ against the kernels as they are now."""
    return _build_emulation(CSRC, tmp_path_factory.mktemp("attention_emulation") / "attention_emulation")


def _storage_from_offset(tensor: torch.Tensor) -> tuple[bytes, int]:
    item = tensor.element_size()
    raw = bytes(tensor.untyped_storage())[tensor.storage_offset() * item:]
    return raw, len(raw) // item


def _write_case(folder: Path, q, k, v, grad_out, *, scale, window_left, window_right, diagonal_offset, softcap,
                alibi_slopes, mask, deterministic, schedule, varlen=None):
    """The case file and raw tensors. Dense: q (B, Hq, L, D) views. ``varlen``: (cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, align_to_end), q/k/v/grad_out packed (total, H, D), passed as batch stride 0."""
    operands = {name: t for name, t in (("q", q), ("k", k), ("v", v), ("grad_out", grad_out)) if t is not None}
    if varlen is None:
        sizes = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2])
        strides = {name: (t.stride(0), t.stride(1), t.stride(2)) for name, t in operands.items()}
    else:  # (total, H, D): (batch, head, row) strides (0, stride(1), stride(0))
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, _ = varlen
        sizes = (cu_seqlens_q.numel() - 1, q.shape[1], k.shape[1], max_seqlen_q, max_seqlen_k)
        strides = {name: (0, t.stride(1), t.stride(0)) for name, t in operands.items()}
    lines = [f"dtype {_DTYPE_NAMES[q.dtype]}", f"head_dim {q.shape[-1]}"]
    lines += [f"{name} {size}" for name, size in zip(("batch", "heads_q", "heads_k", "seqlen_q", "seqlen_k"), sizes)]
    if varlen is not None:
        lines += ["varlen 1", f"total_q {q.shape[0]}", f"total_k {k.shape[0]}", f"align_to_end {int(varlen[4])}",
                  "cu_seqlens_q " + " ".join(map(str, varlen[0].tolist())),
                  "cu_seqlens_k " + " ".join(map(str, varlen[1].tolist()))]
    for name, tensor in operands.items():
        raw, count = _storage_from_offset(tensor)
        (folder / f"{name}.bin").write_bytes(raw)
        lines += [f"{name}_storage {count}", f"{name}_strides " + " ".join(map(str, strides[name]))]
    lines += [f"scale {scale!r}", f"window_left {window_left}", f"window_right {window_right}",
              f"diagonal_offset {diagonal_offset}", f"softcap {softcap!r}"]
    if alibi_slopes is None:
        lines.append("alibi 0")
    else:
        slopes = alibi_slopes.contiguous()
        (folder / "alibi.bin").write_bytes(slopes.numpy().tobytes())
        lines += ["alibi 1", f"alibi_count {slopes.numel()}",
                  f"alibi_batch_stride {slopes.shape[1] if slopes.dim() == 2 else 0}"]
    if mask is None:
        lines.append("mask none")
    else:
        raw, count = _storage_from_offset(mask)
        (folder / "mask.bin").write_bytes(raw)
        strides = [0 if mask.shape[d] == 1 else mask.stride(d) for d in range(4)]
        lines += [f"mask {'bool' if mask.dtype == torch.bool else 'additive'}", f"mask_storage {count}",
                  "mask_strides " + " ".join(map(str, strides))]
    lines += [f"backward {int(grad_out is not None)}", f"deterministic {int(deterministic)}", f"schedule {schedule}"]
    (folder / "case.txt").write_text("\n".join(lines) + "\n")


def _read(folder: Path, name: str, shape, dtype) -> torch.Tensor:
    raw = bytearray((folder / f"{name}.bin").read_bytes())
    if dtype == torch.float32:
        return torch.frombuffer(raw, dtype=torch.float32).reshape(shape)
    return torch.frombuffer(raw, dtype=torch.int16).view(dtype).reshape(shape)


def run_emulated(binary: Path, folder: Path, q, k, v, grad_out=None, *, scale, window_left=-1, window_right=-1,
                 diagonal_offset=0, softcap=0.0, alibi_slopes=None, mask=None, deterministic=False,
                 schedule="forward"):
    """Runs the kernels in the emulation: (returncode, stderr, results: out, lse[, dq, dk, dv], stats)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_case(folder, q, k, v, grad_out, scale=scale, window_left=window_left, window_right=window_right,
                diagonal_offset=diagonal_offset, softcap=softcap, alibi_slopes=alibi_slopes, mask=mask,
                deterministic=deterministic, schedule=schedule)
    result = subprocess.run([str(binary), str(folder)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return result.returncode, result.stderr, None
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_k, seqlen_k = k.shape[1], k.shape[2]
    results = {"out": _read(folder, "out", (batch, heads_q, seqlen_q, head_dim), q.dtype),
               "lse": _read(folder, "lse", (batch, heads_q, seqlen_q), torch.float32)}
    if grad_out is not None:
        results["dq"] = _read(folder, "dq", (batch, heads_q, seqlen_q, head_dim), q.dtype)
        results["dk"] = _read(folder, "dk", (batch, heads_k, seqlen_k, head_dim), q.dtype)
        results["dv"] = _read(folder, "dv", (batch, heads_k, seqlen_k, head_dim), q.dtype)
    results["stats"] = {line.split()[0]: int(line.split()[1])
                        for line in (folder / "stats.txt").read_text().splitlines() if line.strip()}
    return 0, result.stderr, results


def reference_results(q, k, v, grad_out, *, scale, window_left=-1, window_right=-1, diagonal_offset=0, softcap=0.0,
                      alibi_slopes=None, mask=None, **_):
    """out, lse and (with grad_out) dq, dk, dv of pyattn.reference.attention in float64."""
    q64, k64, v64 = (t.detach().double().requires_grad_(grad_out is not None) for t in (q, k, v))
    mask64 = None if mask is None else (mask if mask.dtype == torch.bool else mask.double())
    out, lse = reference.attention(q64, k64, v64, scale=scale, mask=mask64, window_left=window_left,
                                   window_right=window_right, diagonal_offset=diagonal_offset, softcap=softcap,
                                   alibi_slopes=alibi_slopes)
    expected = {"out": out.detach(), "lse": lse.detach()}
    if grad_out is not None:
        expected["dq"], expected["dk"], expected["dv"] = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return expected


def assert_matches_reference(results, expected, dtype):
    rtol = RTOL[dtype]
    assert_close(results["out"], expected["out"], rtol, "out")
    lse, want = results["lse"], expected["lse"]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want)), "lse: -inf (rows that see no key) differ"
    finite = torch.isfinite(want)
    assert_close(lse[finite], want[finite], 1e-5, "lse")
    for name in ("dq", "dk", "dv"):
        if name in expected:
            assert_close(results[name], expected[name], rtol, name)


# (name, dtype, head_dim, batch, heads_q, heads_k, seqlen_q, seqlen_k, layout, options); options as the
# dispatch-level signature's, mask/alibi by kind: built in _emulation_case.
EMULATION_CASES = [
    ("plain odd lengths padded rows", torch.float16, 64, 1, 2, 2, 97, 33, "padded", {}),
    ("causal bottom-right gqa bshd", torch.bfloat16, 128, 1, 4, 2, 97, 200, "bshd", dict(causal=True)),
    ("causal L>S: rows that see no key", torch.bfloat16, 64, 2, 2, 1, 97, 33, "bhsd", dict(causal=True)),
    ("window softcap alibi deterministic", torch.float16, 128, 1, 2, 1, 70, 150, "bhsd",
     dict(window_left=20, window_right=7, softcap=5.0, alibi="batch", deterministic=True)),
    ("bool mask broadcast, a fully masked row", torch.bfloat16, 64, 2, 2, 2, 97, 33, "bhsd", dict(mask="bool")),
    ("additive mask causal top-left deterministic", torch.float16, 64, 1, 2, 2, 97, 130, "bshd",
     dict(mask="additive", window_right=0, deterministic=True)),
    ("mqa alibi per head, S > L", torch.float16, 128, 1, 4, 1, 33, 97, "bhsd", dict(alibi="heads")),
    ("sliding window skips tiles", torch.bfloat16, 64, 1, 1, 1, 300, 300, "bhsd",
     dict(window_left=16, window_right=16)),
    ("bool mask with softcap, bf16 hd128", torch.bfloat16, 128, 1, 2, 2, 40, 70, "padded",
     dict(mask="bool", softcap=10.0)),
]


def _emulation_case(dtype, head_dim, batch, heads_q, heads_k, seqlen_q, seqlen_k, layout, options, seed=0):
    generator = torch.manual_seed(seed)
    q, k, v = _qkv(batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim, dtype, layout=layout)
    grad_out = random_tensor(batch, heads_q, seqlen_q, head_dim, dtype=dtype)
    options = dict(options)
    kwargs = dict(scale=head_dim ** -0.5, deterministic=options.pop("deterministic", False))
    if options.pop("causal", False):
        kwargs.update(window_right=0, diagonal_offset=seqlen_k - seqlen_q)  # flash_attention's alignment
    alibi = options.pop("alibi", None)
    if alibi == "batch":
        kwargs["alibi_slopes"] = torch.rand(batch, heads_q, generator=generator)
    elif alibi == "heads":
        kwargs["alibi_slopes"] = torch.rand(heads_q, generator=generator)
    mask = options.pop("mask", None)
    if mask == "bool":
        visible = torch.rand(batch, 1, seqlen_q, seqlen_k, generator=generator) > 0.3
        visible[:, :, 5] = False  # a row that sees no key: out 0, lse -inf, no NaN
        kwargs["mask"] = visible.expand(batch, heads_q, seqlen_q, seqlen_k)
    elif mask == "additive":
        kwargs["mask"] = (torch.randn(1, heads_q, 1, seqlen_k, generator=generator) * 2).to(dtype).expand(
            batch, heads_q, seqlen_q, seqlen_k)
    kwargs.update(options)
    return q, k, v, grad_out, kwargs


@pytest.mark.parametrize("case", EMULATION_CASES, ids=[case[0] for case in EMULATION_CASES])
def test_kernels_match_float64_reference_in_cpu_emulation(emulation_binary, tmp_path, case):
    """Forward (out, lse) and backward (dq, dk, dv) of the kernels, every lane emulated, outputs NaN-poisoned."""
    _name, dtype, *shape = case
    q, k, v, grad_out, kwargs = _emulation_case(dtype, *shape)
    status, stderr, results = run_emulated(emulation_binary, tmp_path, q, k, v, grad_out, **kwargs)
    assert status == 0, stderr
    assert_matches_reference(results, reference_results(q, k, v, grad_out, **kwargs), dtype)
    assert results["stats"]["ldmatrix_conflict_wavefronts"] == 0, "the swizzle leaves ldmatrix bank conflicts"
    assert results["stats"]["mma"] > 0


def test_fully_masked_rows_give_zero_output_and_gradient_in_emulation(emulation_binary, tmp_path):
    q, k, v, grad_out, kwargs = _emulation_case(torch.float16, 64, 1, 2, 2, 97, 33, "bhsd", dict(causal=True))
    status, stderr, results = run_emulated(emulation_binary, tmp_path, q, k, v, grad_out, **kwargs)
    assert status == 0, stderr
    blind = slice(0, 97 - 33)  # bottom-right causal with L > S: the first L - S rows see no key
    assert torch.equal(results["out"][:, :, blind], torch.zeros_like(results["out"][:, :, blind]))
    assert torch.isneginf(results["lse"][:, :, blind]).all()
    assert torch.equal(results["dq"][:, :, blind], torch.zeros_like(results["dq"][:, :, blind]))


def test_deterministic_backward_is_bitwise_the_same_under_another_schedule(emulation_binary, tmp_path):
    """CTAs and threads run in the opposite order: the deterministic dQ pass (no atomics) must not change a bit."""
    q, k, v, grad_out, kwargs = _emulation_case(torch.bfloat16, 64, 1, 4, 2, 130, 150, "bhsd",
                                                dict(causal=True, deterministic=True))
    runs = []
    for schedule in ("forward", "reverse"):
        status, stderr, results = run_emulated(emulation_binary, tmp_path / schedule, q, k, v, grad_out,
                                               schedule=schedule, **kwargs)
        assert status == 0, stderr
        runs.append(results)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert torch.equal(_bits(runs[0][name]), _bits(runs[1][name])), name


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32 if tensor.dtype == torch.float32 else torch.int16)


# ---- plain process: the varlen layout, lane by lane on the CPU ----


def run_emulated_varlen(binary: Path, folder: Path, q, k, v, grad_out, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q,
                        max_seqlen_k, scale, window_left=-1, window_right=-1, diagonal_offset=0, align_to_end=True,
                        softcap=0.0, alibi_slopes=None, deterministic=False, schedule="forward"):
    """The kernels on packed (total, H, D) sequences: (returncode, stderr, results: out (total_q, Hq, D),
    lse (Hq, total_q)[, dq, dk, dv], stats), the layouts attention_api.cpp's varlen ops return."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_case(folder, q, k, v, grad_out, scale=scale, window_left=window_left, window_right=window_right,
                diagonal_offset=diagonal_offset, softcap=softcap, alibi_slopes=alibi_slopes, mask=None,
                deterministic=deterministic, schedule=schedule,
                varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, align_to_end))
    result = subprocess.run([str(binary), str(folder)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return result.returncode, result.stderr, None
    (total_q, heads_q, head_dim), (total_k, heads_k, _) = q.shape, k.shape
    results = {"out": _read(folder, "out", (total_q, heads_q, head_dim), q.dtype),
               "lse": _read(folder, "lse", (heads_q, total_q), torch.float32)}
    if grad_out is not None:
        results["dq"] = _read(folder, "dq", (total_q, heads_q, head_dim), q.dtype)
        results["dk"] = _read(folder, "dk", (total_k, heads_k, head_dim), q.dtype)
        results["dv"] = _read(folder, "dv", (total_k, heads_k, head_dim), q.dtype)
    results["stats"] = {line.split()[0]: int(line.split()[1])
                        for line in (folder / "stats.txt").read_text().splitlines() if line.strip()}
    return 0, result.stderr, results


def reference_varlen_results(q, k, v, grad_out, cu_seqlens_q, cu_seqlens_k, *, scale, window_left=-1,
                             window_right=-1, diagonal_offset=0, align_to_end=True, softcap=0.0, alibi_slopes=None,
                             **_):
    """out, lse (Hq, total_q) and (with grad_out) dq, dk, dv of the reference in float64, sequence by sequence as
    the varlen reference defines it; a sequence with no keys (which the reference's varlen loop cannot reduce
    over) gives out 0 and lse -inf, the rule for rows that see no key."""
    q64, k64, v64 = (t.detach().double().requires_grad_(grad_out is not None) for t in (q, k, v))
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(starts_q) - 1):
        q_b = q64[starts_q[b]:starts_q[b + 1]]
        if starts_k[b + 1] == starts_k[b]:
            outs.append(q_b * 0)  # keeps the autograd graph: zero gradient for these rows
            lses.append(torch.full((q.shape[1], q_b.shape[0]), float("-inf"), dtype=torch.float64))
            continue
        slopes_b = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1])
        cu_b = [torch.tensor([0, n], dtype=torch.int32) for n in (q_b.shape[0], starts_k[b + 1] - starts_k[b])]
        out_b, lse_b = reference.attention(
            q_b, k64[starts_k[b]:starts_k[b + 1]], v64[starts_k[b]:starts_k[b + 1]], scale=scale,
            window_left=window_left, window_right=window_right, diagonal_offset=diagonal_offset,
            align_to_end=align_to_end, softcap=softcap, alibi_slopes=slopes_b, cu_seqlens_q=cu_b[0],
            cu_seqlens_k=cu_b[1])
        outs.append(out_b)
        lses.append(lse_b)
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    expected = {"out": out.detach(), "lse": lse.detach()}
    if grad_out is not None:
        expected["dq"], expected["dk"], expected["dv"] = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return expected


# (name, dtype, head_dim, heads_q, heads_k, lengths_q, lengths_k, layout, options): every case holds a sequence of
# length 0 and one of length 1 (in q or k), sequences whose L_b != S_b (bottom-right causal differs from top-left),
# and lengths that end mid-tile, so a tile that ran past its sequence's end would read or write its neighbour's rows.
# "padded": q/k/v rows sliced out of rows twice as wide. options: causal, window, softcap, alibi, deterministic,
# extra_grid (max_seqlen above the longest sequence: CTAs past every end).
VARLEN_CASES = [
    ("causal gqa, lengths 0 and 1, L != S", torch.float16, 64, 4, 2, [37, 0, 1, 130, 70], [50, 3, 1, 129, 0], "packed",
     dict(causal=True)),
    ("bf16 causal, fused dQ, grid past every end", torch.bfloat16, 64, 2, 1, [1, 65, 0, 97], [20, 65, 9, 40], "padded",
     dict(causal=True, extra_grid=70)),
    ("bf16 hd128 window softcap alibi deterministic", torch.bfloat16, 128, 2, 2, [45, 1, 0, 80], [60, 1, 4, 33],
     "packed", dict(window=(17, 5), softcap=8.0, alibi="batch", deterministic=True)),
    ("fp16 hd128 mqa plain, per-head alibi", torch.float16, 128, 4, 1, [0, 33, 1, 66], [40, 1, 70, 66], "padded",
     dict(alibi="heads")),
]


def _varlen_case(dtype, head_dim, heads_q, heads_k, lengths_q, lengths_k, layout, options, seed=0):
    """Packed q, k, v, grad_out (total, H, D), cu_seqlens (int32), and the varlen op's options."""
    generator = torch.manual_seed(seed)

    def packed(total, heads):
        if layout == "padded":
            return random_tensor(total, heads, 2 * head_dim, dtype=dtype)[..., :head_dim]
        return random_tensor(total, heads, head_dim, dtype=dtype)

    q, k, v = packed(sum(lengths_q), heads_q), packed(sum(lengths_k), heads_k), packed(sum(lengths_k), heads_k)
    grad_out = random_tensor(sum(lengths_q), heads_q, head_dim, dtype=dtype)
    cu_seqlens_q, cu_seqlens_k = (torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
                                  for lengths in (lengths_q, lengths_k))
    options = dict(options)
    extra = options.pop("extra_grid", 0)
    kwargs = dict(scale=head_dim ** -0.5, deterministic=options.pop("deterministic", False), align_to_end=True,
                  max_seqlen_q=max(lengths_q) + extra, max_seqlen_k=max(lengths_k) + extra)
    if options.pop("causal", False):
        kwargs["window_right"] = 0
    window_left, window_right = options.pop("window", (-1, kwargs.get("window_right", -1)))
    kwargs.update(window_left=window_left, window_right=window_right)
    alibi = options.pop("alibi", None)
    if alibi == "batch":
        kwargs["alibi_slopes"] = torch.rand(len(lengths_q), heads_q, generator=generator)
    elif alibi == "heads":
        kwargs["alibi_slopes"] = torch.rand(heads_q, generator=generator)
    kwargs.update(options)
    return q, k, v, grad_out, cu_seqlens_q, cu_seqlens_k, kwargs


@pytest.mark.parametrize("case", VARLEN_CASES, ids=[case[0] for case in VARLEN_CASES])
def test_varlen_kernels_match_float64_reference_in_cpu_emulation(emulation_binary, tmp_path, case):
    """out, lse (Hq, total_q), dq, dk, dv of packed ragged sequences, every lane emulated, outputs NaN-poisoned:
    a row never written, or written from another sequence, misses the reference."""
    _name, dtype, *shape = case
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_case(dtype, *shape)
    status, stderr, results = run_emulated_varlen(emulation_binary, tmp_path, q, k, v, grad_out, cu_q, cu_k, **kwargs)
    assert status == 0, stderr
    assert_matches_reference(results, reference_varlen_results(q, k, v, grad_out, cu_q, cu_k, **kwargs), dtype)
    assert results["stats"]["ldmatrix_conflict_wavefronts"] == 0
    assert results["stats"]["mma"] > 0


def test_varlen_empty_and_blind_sequences_give_zeros_in_emulation(emulation_binary, tmp_path):
    """A query sequence with no keys: out 0, lse -inf, dq 0; keys no query sees: dk = dv = 0 (exactly)."""
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_case(torch.float16, 64, 2, 2, [5, 0, 20], [0, 7, 20], "packed",
                                                         dict(causal=True))
    status, stderr, results = run_emulated_varlen(emulation_binary, tmp_path, q, k, v, grad_out, cu_q, cu_k, **kwargs)
    assert status == 0, stderr
    assert torch.equal(results["out"][:5], torch.zeros_like(results["out"][:5]))
    assert torch.isneginf(results["lse"][:, :5]).all()
    assert torch.equal(results["dq"][:5], torch.zeros_like(results["dq"][:5]))
    assert torch.equal(results["dk"][:7], torch.zeros_like(results["dk"][:7]))
    assert torch.equal(results["dv"][:7], torch.zeros_like(results["dv"][:7]))
    expected = reference_varlen_results(q, k, v, grad_out, cu_q, cu_k, **kwargs)
    assert_matches_reference(results, expected, torch.float16)


# Planted bugs that only the varlen layout can catch (the dense path never reads cu_seqlens): as PLANTED_BUGS.
VARLEN_PLANTED_BUGS = [
    ("cu_seqlens_k off by one: a sequence sees its neighbour's first key", "attention/attention_common.cuh",
     "seq.seqlen_k = ld_global(p.cu_seqlens_k + batch + 1) - static_cast<int>(seq.k_start);",
     "seq.seqlen_k = ld_global(p.cu_seqlens_k + batch + 1) + 1 - static_cast<int>(seq.k_start);",
     "error: lies outside every buffer"),  # the last sequence's dK row past the end
    ("forward's Q rows not offset by the sequence's start", "attention/attention_forward.cuh",
     "head * p.q_head_stride +\n                      seq.q_start * p.q_row_stride;", "head * p.q_head_stride;",
     "wrong"),
    ("causal aligned top-left per sequence (no S_b - L_b)", "attention/attention_common.cuh",
     "  if (p.align_to_end) seq.diagonal_offset += seq.seqlen_k - seq.seqlen_q;\n", "", "wrong"),
    ("workspace rows without per-sequence padding", "attention/attention_backward.cuh",
     "varlen_row_values(seq.q_start, batch)", "seq.q_start", "error: is not 16-byte aligned"),
]


def _varlen_probe_case():
    """fp16 hd 64, GQA, causal bottom-right, fused-atomic dQ; lengths 0 and 1, L_b != S_b, tiles ending mid-sequence.
    q, k and v keep a spare row after the last sequence (as a GPU allocation would hold other data there), so a read
    past the last sequence gives a wrong answer rather than an out-of-buffer error."""
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_case(torch.float16, 64, 2, 1, [37, 0, 1, 70], [50, 3, 1, 64],
                                                         "packed", dict(causal=True))
    q, k, v = (torch.cat([t, random_tensor(1, *t.shape[1:], dtype=t.dtype)])[:-1] for t in (q, k, v))
    return q, k, v, grad_out, cu_q, cu_k, kwargs


def test_varlen_probe_case_passes_unmutated(emulation_binary, tmp_path):
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_probe_case()
    status, stderr, results = run_emulated_varlen(emulation_binary, tmp_path, q, k, v, grad_out, cu_q, cu_k, **kwargs)
    assert status == 0, stderr
    expected = reference_varlen_results(q, k, v, grad_out, cu_q, cu_k, **kwargs)
    assert _misses_reference(results, expected, q.dtype) == []


@pytest.mark.parametrize("bug", VARLEN_PLANTED_BUGS, ids=[bug[0] for bug in VARLEN_PLANTED_BUGS])
def test_emulation_catches_planted_varlen_bug(tmp_path, bug):
    name, path, original, planted, catch = bug
    sources = tmp_path / "csrc"
    shutil.copytree(CSRC / "attention", sources / "attention")
    text = (sources / path).read_text()
    assert text.count(original) == 1, f"{path} changed shape: {original!r} is no longer there once; update the bug"
    (sources / path).write_text(text.replace(original, planted))
    binary = _build_emulation(sources, tmp_path / "mutant", "-DPYATTN_EMULATION_HEAD_DIM_64_ONLY")
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_probe_case()
    status, stderr, results = run_emulated_varlen(binary, tmp_path / "case", q, k, v, grad_out, cu_q, cu_k, **kwargs)
    if catch.startswith("error: "):
        assert status == 3 and "emulator error" in stderr and catch[len("error: "):] in stderr, (
            f"{name}: expected an emulator error ({catch}), got status {status}: {stderr[-2000:]}")
        return
    assert status == 0, f"{name}: the emulator stopped instead of computing: {stderr[-2000:]}"
    expected = reference_varlen_results(q, k, v, grad_out, cu_q, cu_k, **kwargs)
    assert _misses_reference(results, expected, q.dtype), f"{name}: every result matches; the emulation missed it"


def test_varlen_of_one_sequence_is_bitwise_the_dense_call(emulation_binary, tmp_path):
    """One sequence packed is the dense (1, H, L, D) call: the same kernels, the same bits."""
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_case(torch.bfloat16, 64, 2, 1, [97], [130], "packed",
                                                         dict(causal=True))
    status, stderr, packed = run_emulated_varlen(emulation_binary, tmp_path / "varlen", q, k, v, grad_out, cu_q, cu_k,
                                                 **kwargs)
    assert status == 0, stderr
    dense = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v, grad_out)]
    status, stderr, results = run_emulated(emulation_binary, tmp_path / "dense", *dense, scale=kwargs["scale"],
                                           window_right=0, diagonal_offset=130 - 97)
    assert status == 0, stderr
    assert torch.equal(_bits(packed["out"]), _bits(results["out"][0].transpose(0, 1)))
    assert torch.equal(_bits(packed["lse"]), _bits(results["lse"][0]))
    for name in ("dq", "dk", "dv"):
        assert torch.equal(_bits(packed[name]), _bits(results[name][0].transpose(0, 1))), name


# ---- plain process: the ops' autograd wiring, on CPU kernels that run the emulation ----


@pytest.fixture(scope="module")
def emulated_cpu_ops(emulation_binary, tmp_path_factory):
    """CPU implementations of pyattn::cuda_attention_fwd/bwd that run the kernels in the emulation, so that
    setup_context, the backward op, gradient routing and opcheck run here through the real op registrations."""
    if not attention_cuda.EXTENSION_OPS_LOADED:
        pytest.skip("the extension's attention ops are not loaded")
    assert attention_cuda.VARLEN_OPS_LOADED, "the extension predates cuda_attention_varlen_fwd: rebuild it"
    folders = iter(tmp_path_factory.mktemp("emulated_ops") / str(n) for n in range(10**6))

    def run(q, k, v, grad_out, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset, softcap,
            deterministic):
        status, stderr, results = run_emulated(
            emulation_binary, next(folders), q.detach(), k.detach(), v.detach(),
            None if grad_out is None else grad_out.detach().contiguous(), scale=scale, window_left=window_left,
            window_right=window_right, diagonal_offset=diagonal_offset, softcap=softcap,
            alibi_slopes=None if alibi_slopes is None else alibi_slopes.detach(),
            mask=None if mask is None else mask.detach(), deterministic=deterministic)
        assert status == 0, stderr
        return results

    def like(layout_of, values):
        return attention_cuda.new_attention_output(layout_of, values.shape[-1]).copy_(values)

    def forward(q, k, v, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset, softcap,
                deterministic):
        results = run(q, k, v, None, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset, softcap,
                      deterministic)
        return like(q, results["out"]), results["lse"].clone()

    def backward(grad_out, q, k, v, out, lse, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset,
                 softcap, deterministic):
        # The emulation recomputes its forward: the same kernels on the same inputs give this out and lse.
        results = run(q, k, v, grad_out, mask, alibi_slopes, scale, window_left, window_right, diagonal_offset,
                      softcap, deterministic)
        return like(q, results["dq"]), like(k, results["dk"]), like(v, results["dv"])

    def run_varlen(q, k, v, grad_out, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k, scale,
                   window_left, window_right, diagonal_offset, align_to_end, softcap, deterministic):
        status, stderr, results = run_emulated_varlen(
            emulation_binary, next(folders), q.detach(), k.detach(), v.detach(),
            None if grad_out is None else grad_out.detach().contiguous(), cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale, window_left=window_left,
            window_right=window_right, diagonal_offset=diagonal_offset, align_to_end=align_to_end, softcap=softcap,
            alibi_slopes=None if alibi_slopes is None else alibi_slopes.detach(), deterministic=deterministic)
        assert status == 0, stderr
        return results

    def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options):
        results = run_varlen(q, k, v, None, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options)
        return results["out"].clone(), results["lse"].clone()

    def varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options):
        results = run_varlen(q, k, v, grad_out, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *options)
        return results["dq"].clone(), results["dk"].clone(), results["dv"].clone()

    library = torch.library.Library("pyattn", "IMPL")
    library.impl("cuda_attention_fwd", forward, "CPU")
    library.impl("cuda_attention_bwd", backward, "CPU")
    if attention_cuda.VARLEN_OPS_LOADED:
        library.impl("cuda_attention_varlen_fwd", varlen_forward, "CPU")
        library.impl("cuda_attention_varlen_bwd", varlen_backward, "CPU")
    yield torch.ops.pyattn
    library._destroy()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_autograd_through_the_ops_matches_reference_on_emulated_cpu_kernels(emulated_cpu_ops, layout):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 40, 70, 64, torch.float16, layout=layout))
    slopes = torch.rand(4)
    out, lse = emulated_cpu_ops.cuda_attention_fwd(q, k, v, None, slopes, 0.125, 16, 0, 30, 0.0, True)
    assert not lse.requires_grad  # marked non-differentiable, as flash-attn's
    assert (out.stride(1) < out.stride(2)) == (layout == "bshd")
    grad_out = random_tensor(*out.shape, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = reference_results(q, k, v, grad_out, scale=0.125, window_left=16, window_right=0, diagonal_offset=30,
                                 alibi_slopes=slopes)
    assert_close(out, expected["out"], RTOL[torch.float16], "out")
    for name, grad in zip(("dq", "dk", "dv"), grads):
        assert_close(grad, expected[name], RTOL[torch.float16], name)
        assert grad.shape == {"dq": q, "dk": k, "dv": v}[name].shape


def test_opcheck_on_emulated_cpu_kernels(emulated_cpu_ops):
    """Schema, fake kernels (shapes and strides against the real op's), autograd registration, AOT dispatch."""
    q, k, v = _qkv(1, 2, 1, 24, 40, 64, torch.bfloat16, layout="bshd")
    q.requires_grad_()
    mask = torch.rand(1, 1, 24, 40) > 0.2
    torch.library.opcheck(emulated_cpu_ops.cuda_attention_fwd.default,
                          (q, k, v, mask, None, 0.125, -1, -1, 0, 0.0, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_varlen_autograd_through_the_ops_matches_reference_on_emulated_cpu_kernels(emulated_cpu_ops):
    """setup_context saves cu_seqlens and the options by schema name; the backward op gets them back."""
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_case(torch.bfloat16, 64, 4, 2, [20, 1, 0, 45], [33, 0, 5, 45],
                                                         "packed", dict(causal=True, alibi="batch"))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = emulated_cpu_ops.cuda_attention_varlen_fwd(
        q, k, v, cu_q, cu_k, kwargs["alibi_slopes"], kwargs["max_seqlen_q"], kwargs["max_seqlen_k"], kwargs["scale"],
        kwargs["window_left"], kwargs["window_right"], 0, True, 0.0, False)
    assert not lse.requires_grad and lse.shape == (4, q.shape[0])
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = reference_varlen_results(q, k, v, grad_out, cu_q, cu_k, **kwargs)
    assert_close(out, expected["out"], RTOL[torch.bfloat16], "out")
    for name, grad in zip(("dq", "dk", "dv"), grads):
        assert_close(grad, expected[name], RTOL[torch.bfloat16], name)


def test_varlen_opcheck_on_emulated_cpu_kernels(emulated_cpu_ops):
    q, k, v, _grad_out, cu_q, cu_k, kwargs = _varlen_case(torch.float16, 64, 2, 1, [9, 0, 24], [16, 3, 24], "packed",
                                                          dict(causal=True))
    q.requires_grad_()
    torch.library.opcheck(emulated_cpu_ops.cuda_attention_varlen_fwd.default,
                          (q, k, v, cu_q, cu_k, None, 24, 24, kwargs["scale"], -1, 0, 0, True, 0.0, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# Planted bugs: (name, file under csrc/, the line as it is, the line with the bug, how it must be caught).
# "wrong": the run completes and some result misses the reference; "error: <text>": the emulator stops with
# that message; "conflicts": results right, but ldmatrix bank conflicts (the swizzle is what prevents them).
PLANTED_BUGS = [
    ("mma A fragment registers swapped", "attention/device.cuh", "a1 = a[1], a2 = a[2]", "a1 = a[2], a2 = a[1]",
     "wrong"),
    ("ldmatrix lane-to-row map of B operands", "attention/attention_common.cuh",
     "row0 + (lane & 7) + ((lane >> 4) << 3), chunk0 + ((lane >> 3) & 1)",
     "row0 + (lane & 7) + (((lane >> 3) & 1) << 3), chunk0 + (lane >> 4)", "wrong"),
    ("V read without ldmatrix .trans", "attention/attention_forward.cuh",
     "ldmatrix_x4_trans(b, rows_first<ROW_CHUNKS>(v_tile", "ldmatrix_x4(b, rows_first<ROW_CHUNKS>(v_tile", "wrong"),
    ("accumulator element to row map (causal mask)", "attention/attention_forward.cuh",
     "rows[e >> 1], j, crosses_window", "rows[e & 1], j, crosses_window", "wrong"),
    ("quad reduction shuffles the wrong lanes", "attention/attention_forward.cuh",
     "    sum += shfl_xor(sum, 2);", "    sum += shfl_xor(sum, 4);", "wrong"),
    ("P^T fragment registers in the backward", "attention/attention_backward.cuh",
     "dst[nt / 2][(nt & 1) * 2 + r] =", "dst[nt / 2][r * 2 + (nt & 1)] =", "wrong"),
    ("cp.async.wait_group one group short", "attention/attention_forward.cuh",
     "cp_async_wait<STAGES - 2>();  // tile n", "cp_async_wait<STAGES - 1>();  // tile n",
     "error: cp.async into it is in flight"),
    ("no __syncthreads after the wait", "attention/attention_forward.cuh",
     "    syncthreads();                // ... and everyone's", "    // ... and everyone's",
     "error: a missing __syncthreads"),
    ("no __syncthreads between dS^T stores and the dQ reads", "attention/attention_backward.cuh",
     "      syncthreads();\n      constexpr int M_TILES", "      constexpr int M_TILES",
     "error: a missing __syncthreads"),
    ("cp.async writes unswizzled, ldmatrix reads swizzled", "attention/attention_common.cuh",
     "cp_async_16(tile + tile_offset<kRowChunks>(row, chunk), source, valid);",
     "cp_async_16(tile + uint32_t(row * kRowChunks + chunk) * 16u, source, valid);", "wrong"),
    ("no swizzle at all", "attention/attention_common.cuh", "(chunk ^ ((row / kRowsPerLine) & kMask))", "chunk",
     "conflicts"),
]


def _probe_case():
    """fp16 hd 64, GQA, L = 97 (a partial query tile), S = 200 (4 key tiles through the 3-stage ring), causal
    bottom-right, fused-atomic dQ: exercises every primitive of the forward and backward."""
    return _emulation_case(torch.float16, 64, 1, 2, 1, 97, 200, "bhsd", dict(causal=True))


def _misses_reference(results, expected, dtype) -> list[str]:
    rtol = RTOL[dtype]
    missed = [name for name in ("out", "dq", "dk", "dv") if not relative_error(results[name], expected[name]) <= rtol]
    finite = torch.isfinite(expected["lse"])
    if not relative_error(results["lse"][finite], expected["lse"][finite]) <= 1e-5:
        missed.append("lse")
    return missed


def test_probe_case_passes_unmutated(emulation_binary, tmp_path):
    q, k, v, grad_out, kwargs = _probe_case()
    status, stderr, results = run_emulated(emulation_binary, tmp_path, q, k, v, grad_out, **kwargs)
    assert status == 0, stderr
    assert _misses_reference(results, reference_results(q, k, v, grad_out, **kwargs), q.dtype) == []
    assert results["stats"]["ldmatrix_conflict_wavefronts"] == 0


@pytest.mark.parametrize("bug", PLANTED_BUGS, ids=[bug[0] for bug in PLANTED_BUGS])
def test_emulation_catches_planted_bug(tmp_path, bug):
    name, path, original, planted, catch = bug
    sources = tmp_path / "csrc"
    shutil.copytree(CSRC / "attention", sources / "attention")
    text = (sources / path).read_text()
    assert text.count(original) == 1, f"{path} changed shape: {original!r} is no longer there once; update the bug"
    (sources / path).write_text(text.replace(original, planted))
    binary = _build_emulation(sources, tmp_path / "mutant", "-DPYATTN_EMULATION_HEAD_DIM_64_ONLY")
    q, k, v, grad_out, kwargs = _probe_case()
    status, stderr, results = run_emulated(binary, tmp_path / "case", q, k, v, grad_out, **kwargs)
    if catch.startswith("error: "):
        assert status == 3 and "emulator error" in stderr and catch[len("error: "):] in stderr, (
            f"{name}: expected an emulator error ({catch}), got status {status}: {stderr[-2000:]}")
        return
    assert status == 0, f"{name}: the emulator stopped instead of computing: {stderr[-2000:]}"
    missed = _misses_reference(results, reference_results(q, k, v, grad_out, **kwargs), q.dtype)
    if catch == "wrong":
        assert missed, f"{name}: every result still matches the reference; the emulation missed the bug"
    else:
        assert missed == [] and results["stats"]["ldmatrix_conflict_wavefronts"] > 0, (
            f"{name}: expected right results with bank conflicts, got misses {missed} and "
            f"{results['stats']['ldmatrix_conflict_wavefronts']} conflict wavefronts")


# ---- GPU: the real kernels ----

@pytest.fixture
def poisoned_cuda_allocator():
    """Fill the caching allocator's free blocks with NaN, so an element a kernel never writes fails."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [poison_(torch.empty((1 << 18) - 256, device="cuda")) for _ in range(16)]
    blocks.append(poison_(torch.empty(1 << 27, device="cuda")))
    torch.cuda.synchronize()
    del blocks


def _cuda_inputs(case, seed=0):
    _name, dtype, *shape = case
    q, k, v, grad_out, kwargs = _emulation_case(dtype, *shape, seed=seed)
    move = {name: (value.cuda() if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    return [t.cuda() for t in (q, k, v, grad_out)], move


def _cuda_op_results(q, k, v, grad_out, kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    deterministic = kwargs.get("deterministic", False)
    out, lse = torch.ops.pyattn.cuda_attention_fwd(
        q, k, v, kwargs.get("mask"), kwargs.get("alibi_slopes"), kwargs["scale"], kwargs.get("window_left", -1),
        kwargs.get("window_right", -1), kwargs.get("diagonal_offset", 0), kwargs.get("softcap", 0.0), deterministic)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


@pytest.mark.requires_cuda
@pytest.mark.parametrize("case", EMULATION_CASES, ids=[case[0] for case in EMULATION_CASES])
def test_cuda_kernels_match_float64_reference(ops, case, poisoned_cuda_allocator):
    (q, k, v, grad_out), kwargs = _cuda_inputs(case)
    results = {name: t.cpu() for name, t in _cuda_op_results(q, k, v, grad_out, kwargs).items()}
    cpu_kwargs = {name: (value.cpu() if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    expected = reference_results(q.cpu(), k.cpu(), v.cpu(), grad_out.cpu(), **cpu_kwargs)
    assert_matches_reference(results, expected, q.dtype)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("options", [dict(causal=True), dict(window=(64, 32), softcap=20.0), dict()],
                         ids=["causal", "window-softcap", "plain"])
def test_cuda_matches_triton_directly(ops, dtype, head_dim, options):
    """Two independent implementations of the same semantics: out, lse and every gradient, bshd layout."""
    q, k, v = (t.cuda().requires_grad_() for t in _qkv(2, 8, 2, 1000, 1037, head_dim, dtype, layout="bshd"))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, D) views: flash_attention's default layout
    grad_out = random_tensor(*q.shape, dtype=dtype, device="cuda")
    results = {}
    for backend in ("cuda", "triton"):
        with pyattn.use_backend(backend):
            out, lse = flash_attention(q, k, v, return_lse=True, **options)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[backend] = (out, lse, *grads)
    for name, ours, theirs in zip(("out", "lse", "dq", "dk", "dv"), results["cuda"], results["triton"]):
        assert_close(ours.float(), theirs.float(), 2 * RTOL[dtype] if name != "lse" else 1e-5, f"cuda vs triton {name}")


def _cuda_varlen_op_results(q, k, v, grad_out, cu_seqlens_q, cu_seqlens_k, kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.pyattn.cuda_attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, kwargs.get("alibi_slopes"), kwargs["max_seqlen_q"], kwargs["max_seqlen_k"],
        kwargs["scale"], kwargs["window_left"], kwargs["window_right"], kwargs.get("diagonal_offset", 0),
        kwargs["align_to_end"], kwargs.get("softcap", 0.0), kwargs["deterministic"])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def _cuda_varlen_inputs(case, seed=0):
    _name, dtype, *shape = case
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_case(dtype, *shape, seed=seed)
    move = {name: (value.cuda() if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    return [t.cuda() for t in (q, k, v, grad_out, cu_q, cu_k)], move


@pytest.mark.requires_cuda
@pytest.mark.parametrize("case", VARLEN_CASES, ids=[case[0] for case in VARLEN_CASES])
def test_cuda_varlen_kernels_match_float64_reference(ops, case, poisoned_cuda_allocator):
    (q, k, v, grad_out, cu_q, cu_k), kwargs = _cuda_varlen_inputs(case)
    results = {name: t.cpu() for name, t in _cuda_varlen_op_results(q, k, v, grad_out, cu_q, cu_k, kwargs).items()}
    cpu_kwargs = {name: (value.cpu() if isinstance(value, torch.Tensor) else value) for name, value in kwargs.items()}
    expected = reference_varlen_results(q.cpu(), k.cpu(), v.cpu(), grad_out.cpu(), cu_q, cu_k, **cpu_kwargs)
    assert_matches_reference(results, expected, q.dtype)


# Ragged lengths of every kind against Triton: a 0, a 1, L_b < S_b and L_b > S_b, several tiles, mid-tile ends.
_GPU_LENGTHS_Q, _GPU_LENGTHS_K = [1000, 0, 1, 517, 2048, 77], [1037, 5, 1, 300, 2048, 0]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("options", [dict(causal=True), dict(window_size=(64, 32), softcap=20.0, alibi=True), dict()],
                         ids=["causal", "window-softcap-alibi", "plain"])
def test_cuda_varlen_matches_triton_directly(ops, dtype, head_dim, options):
    """flash_attention_varlen on both backends: out, lse (Hq, total_q) and every gradient."""
    options = dict(options)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
                  for lengths in (_GPU_LENGTHS_Q, _GPU_LENGTHS_K))
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(len(_GPU_LENGTHS_Q), 8, device="cuda")
    q = random_tensor(sum(_GPU_LENGTHS_Q), 8, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    k, v = (random_tensor(sum(_GPU_LENGTHS_K), 2, head_dim, dtype=dtype, device="cuda", requires_grad=True)
            for _ in range(2))
    grad_out = random_tensor(*q.shape, dtype=dtype, device="cuda")
    results = {}
    for backend in ("cuda", "triton"):
        with pyattn.use_backend(backend):
            out, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(_GPU_LENGTHS_Q), max(_GPU_LENGTHS_K),
                                              return_lse=True, **options)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[backend] = (out, lse, *grads)
    for name, ours, theirs in zip(("out", "lse", "dq", "dk", "dv"), results["cuda"], results["triton"]):
        if name == "lse":
            assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), "lse: -inf rows differ"
            finite = torch.isfinite(theirs)
            ours, theirs = ours[finite], theirs[finite]
        assert_close(ours.float(), theirs.float(), 2 * RTOL[dtype] if name != "lse" else 1e-5, f"cuda vs triton {name}")


@pytest.mark.requires_cuda
def test_auto_picks_cuda_for_varlen_on_a_gpu(ops):
    q, k, v, _grad_out, cu_q, cu_k, kwargs = _varlen_case(torch.bfloat16, 128, 4, 2, [70, 0, 1, 300], [80, 2, 1, 300],
                                                          "packed", dict(causal=True))
    q, k, v, cu_q, cu_k = (t.cuda() for t in (q, k, v, cu_q, cu_k))
    text = pyattn.explain("flash_attention_varlen", q, k, v, cu_q, cu_k, 300, 300, causal=True)
    assert text.splitlines()[-1].strip() == "auto picks: cuda/sm80", text
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, 300, 300, causal=True)
    expected = reference_varlen_results(q.cpu(), k.cpu(), v.cpu(), None, cu_q, cu_k, **kwargs)
    assert_close(out.cpu(), expected["out"], RTOL[torch.bfloat16])


@pytest.mark.requires_cuda
def test_deterministic_varlen_backward_is_bit_reproducible_on_the_gpu(ops):
    case = ("", torch.bfloat16, 128, 8, 2, [700, 0, 1, 333], [900, 4, 1, 333], "packed",
            dict(causal=True, deterministic=True))
    (q, k, v, grad_out, cu_q, cu_k), kwargs = _cuda_varlen_inputs(case)
    first, second = (_cuda_varlen_op_results(q, k, v, grad_out, cu_q, cu_k, kwargs) for _ in range(2))
    for name in ("dq", "dk", "dv"):
        assert torch.equal(_bits(first[name]), _bits(second[name])), name


@pytest.mark.requires_cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_opcheck(ops, deterministic):
    q, k, v, grad_out, cu_q, cu_k, kwargs = _varlen_case(torch.float16, 64, 4, 2, [65, 0, 1, 80], [80, 3, 1, 40],
                                                         "padded", dict(causal=True, alibi="heads"))
    q, k, v, grad_out, cu_q, cu_k = (t.cuda() for t in (q, k, v, grad_out, cu_q, cu_k))
    q.requires_grad_()
    slopes = kwargs["alibi_slopes"].cuda()
    options = (80, 80, kwargs["scale"], -1, 0, 0, True, 0.0, deterministic)
    torch.library.opcheck(ops.cuda_attention_varlen_fwd.default, (q, k, v, cu_q, cu_k, slopes, *options))
    out, lse = ops.cuda_attention_varlen_fwd(q, k, v, cu_q, cu_k, slopes, *options)
    torch.library.opcheck(ops.cuda_attention_varlen_bwd.default,
                          (grad_out, q.detach(), k, v, out.detach(), lse, cu_q, cu_k, slopes, *options))


@pytest.mark.requires_cuda
def test_auto_picks_cuda_for_sdpa_on_a_gpu(ops):
    q, k, v = _qkv(2, 4, 4, 128, 128, 64, torch.float16, device="cuda")
    text = pyattn.explain("scaled_dot_product_attention", q, k, v, is_causal=True)
    assert text.splitlines()[-1].strip() == "auto picks: cuda/sm80", text
    out = scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close(out, expected, RTOL[torch.float16])


@pytest.mark.requires_cuda
def test_deterministic_backward_is_bit_reproducible_on_the_gpu(ops):
    case = ("", torch.bfloat16, 128, 2, 8, 2, 700, 900, "bhsd", dict(causal=True, deterministic=True))
    (q, k, v, grad_out), kwargs = _cuda_inputs(case)
    first, second = (_cuda_op_results(q, k, v, grad_out, kwargs) for _ in range(2))
    for name in ("dq", "dk", "dv"):
        assert torch.equal(_bits(first[name]), _bits(second[name])), name


@pytest.mark.requires_cuda
@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck(ops, deterministic):
    q, k, v = (t.cuda() for t in _qkv(1, 4, 2, 65, 80, 64, torch.float16, layout="bshd"))
    q.requires_grad_()
    mask = (torch.rand(1, 1, 65, 80, device="cuda") > 0.2)
    slopes = torch.rand(4, device="cuda")
    arguments = (q, k, v, mask, slopes, 0.125, -1, 0, 15, 0.0, deterministic)
    torch.library.opcheck(ops.cuda_attention_fwd.default, arguments)
    out, lse = ops.cuda_attention_fwd(*arguments)
    grad_out = random_tensor(*out.shape, dtype=out.dtype, device="cuda")
    torch.library.opcheck(ops.cuda_attention_bwd.default,
                          (grad_out, q.detach(), k, v, out.detach(), lse, mask, slopes, 0.125, -1, 0, 15, 0.0,
                           deterministic))


@pytest.mark.requires_cuda
def test_compile_fullgraph_reaches_the_cuda_ops(ops):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def recording_compiler(graph_module, example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)

    def attend(q, k, v):
        return flash_attention(q, k, v, causal=True, layout="bhsd")

    compiled = torch.compile(attend, fullgraph=True,
                             backend=aot_autograd(fw_compiler=recording_compiler, bw_compiler=recording_compiler))
    q, k, v = (t.cuda().requires_grad_() for t in _qkv(2, 4, 4, 100, 100, 128, torch.bfloat16))
    out = compiled(q, k, v)
    out.sum().backward()
    assert any("cuda_attention_fwd" in name for name in seen) and any("cuda_attention_bwd" in name for name in seen)
    with pyattn.use_backend("reference"):
        expected = attend(q.detach().double(), k.detach().double(), v.detach().double())
    assert_close(out.detach().cpu(), expected.cpu(), RTOL[torch.bfloat16])
    assert math.isfinite(q.grad.float().sum().item())


# ---- plain process: the built kernels' resources ----


def test_built_attention_kernels_do_not_spill(ops):
    """cuobjdump -res-usage of pyattn._C: every attention kernel, for sm_80 and sm_90a, uses no stack or local
    memory (no spills) and at most 255 registers (the table in docs/attention.md)."""
    from pyattn import _C
    from pyattn.build_info import _find_cuobjdump

    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump to read the extension's resource usage")
    listing = subprocess.run([cuobjdump, "-res-usage", _C.__file__], capture_output=True, text=True).stdout
    usage, arch, function = {}, None, None
    for line in listing.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith(" Function "):
            function = line.split()[1].rstrip(":")
        elif line.startswith("  REG:") and function is not None and "attention" in function:
            usage[(arch, function)] = dict(field.split(":", 1) for field in line.split())
            function = None
    kernels = {name for _arch, name in usage}
    assert len(kernels) == 4 * 5, sorted(kernels)  # (fp16, bf16) x (64, 128) x 5 kernels
    for (arch_name, name), fields in usage.items():
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", (arch_name, name, fields)
        assert int(fields["REG"]) <= 255, (arch_name, name, fields)
    assert {arch_name for arch_name, _ in usage} >= {"sm_80"}  # cuobjdump 12.x prints sm_90a as sm_90
