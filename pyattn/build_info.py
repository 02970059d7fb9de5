"""``python -m pyattn.build_info``: what was built and what can run here.

Prints the backends' status and, when the extension is built, the GPU architectures of the cubins its
binary holds, read from each cubin's own ELF header — not from cuobjdump's listing, whose names depend
on the cuobjdump version (CUDA 12.8's, which Triton 3.6 bundles, prints an sm_90a cubin of a CUDA 13
build as ``sm_90``). So a CPU-only build still shows that sm_90a code exists.

How a cubin says its architecture (measured on ptxas 12.9 and 13.0 output, constants as in LLVM's
``BinaryFormat/ELF.h``):

* ``e_ident[EI_ABIVERSION]`` < 8 (CUDA <= 12.x, "V1"): the SM number is the low byte of ``e_flags``
  (``EF_CUDA_SM`` 0xff) and the arch-specific ``a`` is ``EF_CUDA_ACCELERATORS_V1`` (0x800): ptxas 12.9
  writes 0x5a055a for sm_90 and 0x5a0d5a for sm_90a.
* ``e_ident[EI_ABIVERSION]`` >= 8 (CUDA 13, "V2"): the SM number is bits 8-15 (``EF_CUDA_SM_MASK`` 0xff00)
  and ``a`` may be ``EF_CUDA_ACCELERATORS`` (0x8) — but ptxas 13.0 writes 0x6005a04 for sm_90 and sm_90a
  alike and marks ``a`` only in the ``.nv.compat`` section, attribute 0x09 (1 for sm_90a, sm_100a,
  sm_120a; 0 otherwise). Both are read.

The cubins come from the extension's fatbin: the ELF images embedded in the shared object (nvcc leaves
them uncompressed by default), or, where none is found there (a compressed fatbin), from
``cuobjdump -xelf all`` in a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile

EM_CUDA = 190
EI_ABIVERSION = 8
ABI_V2 = 8  # CUDA 13's ELF ABI version: SM number in bits 8-15 of e_flags
EF_CUDA_SM = 0xFF
EF_CUDA_ACCELERATORS_V1 = 0x800
EF_CUDA_SM_MASK_V2 = 0xFF00
EF_CUDA_ACCELERATORS_V2 = 0x8
NV_COMPAT_ACCELERATOR = 0x09  # .nv.compat attribute: arch-specific ("a") target


def _find_cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton ships (some toolkits lack it)."""
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    try:
        import triton.backends.nvidia as triton_nvidia

        candidates.append(os.path.join(os.path.dirname(triton_nvidia.__file__), "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((path for path in candidates if path and os.path.isfile(path)), None)


# ------------------------------------------------------------------------------------ the ELF header


def _is_cuda_elf(image: bytes, offset: int = 0) -> bool:
    return (len(image) >= offset + 64 and image[offset:offset + 4] == b"\x7fELF" and image[offset + 4] == 2
            and struct.unpack_from("<H", image, offset + 18)[0] == EM_CUDA)


def _sections(image: bytes) -> dict[str, bytes]:
    """Section name -> contents of a 64-bit little-endian ELF image (empty when the table is unreadable)."""
    try:
        shoff = struct.unpack_from("<Q", image, 0x28)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
        headers = [struct.unpack_from("<IIQQQQ", image, shoff + i * shentsize) for i in range(shnum)]
        names_offset = headers[shstrndx][4]
        sections = {}
        for name, kind, _flags, _address, offset, size in headers:
            start = names_offset + name
            label = image[start:image.index(b"\0", start)].decode(errors="replace")
            sections[label] = b"" if kind == 8 else image[offset:offset + size]  # SHT_NOBITS holds nothing
        return sections
    except (struct.error, IndexError, ValueError):
        return {}


def _compat_attributes(section: bytes) -> dict[int, int]:
    """The ``.nv.compat`` records: (format u8, attribute u8, value...); formats 1-3 take 4 bytes (value in
    bytes 2-3), format 4 a u16 size and that many bytes of data."""
    attributes, position = {}, 0
    while position + 4 <= len(section):
        kind, attribute = section[position], section[position + 1]
        (value,) = struct.unpack_from("<H", section, position + 2)
        if kind in (1, 2, 3):
            attributes[attribute] = value & 0xFF if kind == 2 else value
            position += 4
        elif kind == 4:
            position += 4 + value
        else:
            break
    return attributes


def cubin_architecture(image: bytes) -> str | None:
    """``"sm_80"``, ``"sm_90a"``, ... from a cubin's ELF header (and ``.nv.compat``), or None if ``image``
    is not a CUDA ELF."""
    if not _is_cuda_elf(image):
        return None
    (flags,) = struct.unpack_from("<I", image, 48)
    if image[EI_ABIVERSION] >= ABI_V2:
        sm, accelerated = (flags & EF_CUDA_SM_MASK_V2) >> 8, bool(flags & EF_CUDA_ACCELERATORS_V2)
    else:
        sm, accelerated = flags & EF_CUDA_SM, bool(flags & EF_CUDA_ACCELERATORS_V1)
    compat = _sections(image).get(".nv.compat")
    if compat and _compat_attributes(compat).get(NV_COMPAT_ACCELERATOR, 0):
        accelerated = True
    return f"sm_{sm}{'a' if accelerated else ''}"


def _elf_size(image: bytes, offset: int) -> int:
    """Bytes spanned by the ELF image at ``offset``: its headers and every section with contents."""
    shoff = struct.unpack_from("<Q", image, offset + 0x28)[0]
    phoff = struct.unpack_from("<Q", image, offset + 0x20)[0]
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, offset + 0x36)
    end = max(shoff + shentsize * shnum, phoff + phentsize * phnum, 64)
    for i in range(shnum):
        _name, kind, _flags, _address, section_offset, size = struct.unpack_from(
            "<IIQQQQ", image, offset + shoff + i * shentsize)
        if kind != 8:
            end = max(end, section_offset + size)
    return end


# ------------------------------------------------------------------------------------ the extension


def embedded_cubins(binary: bytes) -> list[bytes]:
    """The CUDA ELF images found inside a host binary's (uncompressed) fatbin."""
    images = []
    for match in re.finditer(rb"\x7fELF\x02\x01\x01", binary):
        start = match.start()
        if _is_cuda_elf(binary, start):
            try:
                images.append(binary[start:start + _elf_size(binary, start)])
            except struct.error:
                continue
    return images


def extracted_cubins(path: str, folder: str) -> list[str]:
    """``cuobjdump -xelf all path`` into ``folder``: the extracted cubins' paths (empty without cuobjdump)."""
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        return []
    subprocess.run([cuobjdump, "-xelf", "all", os.path.abspath(path)], cwd=folder, capture_output=True, text=True)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".cubin"))


def extension_cubins() -> list[bytes] | None:
    """The cubins of pyattn._C (None when it is not importable)."""
    try:
        from pyattn import _C
    except ImportError:
        return None
    with open(_C.__file__, "rb") as handle:
        images = embedded_cubins(handle.read())
    if not images:  # a compressed fatbin: let cuobjdump unpack it
        with tempfile.TemporaryDirectory() as folder:
            for cubin in extracted_cubins(_C.__file__, folder):
                with open(cubin, "rb") as handle:
                    images.append(handle.read())
    return images


def extension_architectures() -> list[str] | None:
    """The sm_XX[a] targets of the cubins inside pyattn._C, from their ELF headers (None when unknown)."""
    images = extension_cubins()
    if images is None or not images:
        return None
    return sorted({arch for arch in map(cubin_architecture, images) if arch is not None})


def sass_functions(cubin_path: str) -> dict[str, str]:
    """Kernel name -> its SASS, from ``cuobjdump -sass`` of one cubin file (empty without cuobjdump)."""
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        return {}
    listing = subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True, text=True).stdout
    functions, name = {}, None
    for line in listing.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            name = header.group(1)
            functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    return functions


def main() -> None:
    import torch

    import pyattn

    print(f"pyattn {pyattn.__version__} | torch {torch.__version__} (CUDA {torch.version.cuda})")
    for name, status in pyattn.backend_status().items():
        print(f"  backend {name:<9} {status}")
    arches = extension_architectures()
    if arches is not None:
        print(f"  extension pyattn._C holds cubins for: {', '.join(arches) or 'none'} (from their ELF headers)")


if __name__ == "__main__":
    main()
