"""``python -m pyattn.build_info``: what was built and what can run here.

Prints the backends' status and, when the extension is built, the GPU architectures its
binary holds (read with cuobjdump), so a CPU-only build still shows that sm_90a code exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess


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


def extension_architectures() -> list[str] | None:
    """The sm_XX targets of the cubins inside pyattn._C (None when unknown)."""
    try:
        from pyattn import _C
    except ImportError:
        return None
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        return None
    listing = subprocess.run([cuobjdump, "--list-elf", _C.__file__], capture_output=True, text=True).stdout
    return sorted({token.split(".")[-2] for token in listing.split() if token.endswith(".cubin") and ".sm_" in token})


def main() -> None:
    import torch

    import pyattn

    print(f"pyattn {pyattn.__version__} | torch {torch.__version__} (CUDA {torch.version.cuda})")
    for name, status in pyattn.backend_status().items():
        print(f"  backend {name:<9} {status}")
    arches = extension_architectures()
    if arches is not None:
        print(f"  extension pyattn._C holds cubins for: {', '.join(arches) or 'none'}")


if __name__ == "__main__":
    main()
