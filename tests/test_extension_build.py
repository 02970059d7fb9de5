"""The CUDA extension: built (where a toolkit is present) for sm_90a and sm_80, importable, and its cubins'
architectures read from their own ELF headers, so that sm_90a says sm_90a whichever cuobjdump is around."""

from __future__ import annotations

import os
import struct
import tempfile

import pytest

from pyattn import _extension, build_info
from pyattn.build_info import cubin_architecture, extension_architectures
from tests.conftest import TOOLKIT_PRESENT

needs_toolkit = pytest.mark.skipif(not TOOLKIT_PRESENT,
                                   reason="no CUDA toolkit on this machine (or PYATTN_SKIP_CUDA_BUILD=1): the extension is not built")


def _wanted_arches() -> list[str]:
    return [f"sm_{arch}" for arch in os.environ.get("PYATTN_CUDA_ARCH", "80;90a").replace(",", ";").split(";") if arch]


@needs_toolkit
def test_extension_is_built_with_cuda_kernels():
    module = _extension.extension_module()
    assert module.built_with_cuda


@needs_toolkit
def test_extension_holds_sm90a_and_sm80_code():
    arches = extension_architectures()
    if arches is None:
        pytest.skip("the extension's cubins could not be found")
    for arch in _wanted_arches():
        assert arch in arches, f"pyattn._C lacks {arch} code; it holds {arches}"


# ---- the ELF header decoding, on synthetic cubins with the flags ptxas writes ----


def _cubin(abi_version: int, flags: int, compat: bytes | None = None) -> bytes:
    """A minimal 64-bit CUDA ELF: the header, a section-name table and optionally a .nv.compat section."""
    names = b"\0.shstrtab\0" + (b".nv.compat\0" if compat is not None else b"")
    body = names + (compat or b"")
    section_offset = 64 + len(body) + (-len(body)) % 8
    sections = [bytes(64)]  # the null section
    sections.append(struct.pack("<IIQQQQIIQQ", 1, 3, 0, 0, 64, len(names), 0, 0, 1, 0))
    if compat is not None:
        sections.append(struct.pack("<IIQQQQIIQQ", 11, 0x70000086, 0, 0, 64 + len(names), len(compat), 0, 0, 4, 0))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0x41 if abi_version >= 8 else 0x33, abi_version]) + bytes(7)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, build_info.EM_CUDA, 1, 0, 0, section_offset, flags, 64, 56, 0,
                                 64, len(sections), 1)
    return header + body + bytes((-len(body)) % 8) + b"".join(sections)


def _compat(accelerated: bool) -> bytes:
    """.nv.compat as ptxas 13.0 writes it: attribute 0x09 first (1 for an "a" target), then the others and
    a sized record (format 4)."""
    rest = "02020300" "02050500" "03070101" "02030000" "02060100" "040b0800" "0000000000000000"
    return bytes([2, 9, int(accelerated), 0]) + bytes.fromhex(rest)


@pytest.mark.parametrize(
    "abi_version,flags,compat,expected",
    [
        (7, 0x5A055A, None, "sm_90"),    # ptxas 12.9, sm_90: EF_CUDA_SM = 0x5a, virtual SM 0x5a << 16
        (7, 0x5A0D5A, None, "sm_90a"),   # ptxas 12.9, sm_90a: EF_CUDA_ACCELERATORS_V1 (0x800) set
        (7, 0x500550, None, "sm_80"),
        (8, 0x6005A04, False, "sm_90"),  # ptxas 13.0, sm_90: SM in bits 8-15, .nv.compat attribute 9 = 0
        (8, 0x6005A04, True, "sm_90a"),  # ptxas 13.0, sm_90a: the same e_flags; .nv.compat attribute 9 = 1
        (8, 0x6005004, False, "sm_80"),
        (8, 0x6006402, True, "sm_100a"),
        (8, 0x600640A, None, "sm_100a"),  # EF_CUDA_ACCELERATORS (0x8) of the V2 layout, as LLVM defines it
    ],
)
def test_cubin_architecture_reads_both_elf_layouts(abi_version, flags, compat, expected):
    image = _cubin(abi_version, flags, None if compat is None else _compat(compat))
    assert cubin_architecture(image) == expected


def test_cubin_architecture_is_none_for_other_files():
    assert cubin_architecture(b"\x7fELF" + bytes(60)) is None
    assert cubin_architecture(b"PTX") is None


def test_embedded_cubins_are_found_inside_a_host_binary():
    images = [_cubin(8, 0x6005A04, _compat(True)), _cubin(7, 0x500550)]
    host = b"\x7fELF\x02\x01\x01\x00" + bytes(100) + images[0] + bytes(37) + images[1] + bytes(11)
    found = build_info.embedded_cubins(host)
    assert found == images and [cubin_architecture(i) for i in found] == ["sm_90a", "sm_80"]


# ---- the built extension: both extraction paths agree, and the tensor-core kernels are in sm_90a ----


def _extracted(folder: str) -> dict[str, bytes]:
    from pyattn import _C

    paths = build_info.extracted_cubins(_C.__file__, folder)
    if not paths:
        pytest.skip("no cuobjdump to extract the extension's cubins with")
    result = {}
    for path in paths:
        with open(path, "rb") as handle:
            result[path] = handle.read()
    return result


@needs_toolkit
def test_cuobjdump_extraction_and_the_fatbin_scan_agree():
    _extension.extension_module()
    with tempfile.TemporaryDirectory() as folder:
        extracted = sorted(cubin_architecture(image) for image in _extracted(folder).values())
    scanned = sorted(cubin_architecture(image) for image in build_info.extension_cubins())
    assert extracted == scanned and set(scanned) >= set(_wanted_arches())


@needs_toolkit
def test_tensor_core_kernels_are_in_the_sm90a_cubins():
    """The LSTM's WMMA kernels and the attention's mma.sync kernels compile to HMMA in the sm_90a cubins
    (and the sm_80 ones): the architecture read from the ELF header is the code that holds them."""
    _extension.extension_module()
    if "sm_90a" not in _wanted_arches():
        pytest.skip("PYATTN_CUDA_ARCH does not include 90a")
    with_hmma: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for path, image in _extracted(folder).items():
            functions = build_info.sass_functions(path)
            if not functions:
                pytest.skip("cuobjdump cannot disassemble the extension's cubins")
            arch = cubin_architecture(image)
            with_hmma.setdefault(arch, set()).update(name for name, sass in functions.items() if "HMMA" in sass)
    for arch in ("sm_90a", "sm_80"):
        kernels = with_hmma.get(arch, set())
        assert any("lstm_persistent_forward_kernel" in name and "half" in name for name in kernels), (arch, kernels)
        assert any("lstm_step_backward_kernel" in name for name in kernels), (arch, kernels)
        for kernel in ("attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"):
            for element in ("Fp16", "Bf16"):
                assert any(kernel in name and element in name for name in kernels), (arch, kernel, element)
