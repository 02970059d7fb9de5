"""Build pyattn and its extension ``pyattn._C`` (CUDA kernels for sm_80 and sm_90a).

Environment:
  PYATTN_SKIP_CUDA_BUILD=1   build no extension (pyattn then runs its reference and triton backends)
  PYATTN_CUDA_ARCH="80;90a"  the SM list to generate code for (default: 80 and 90a)
  CUDA_HOME                  the toolkit; otherwise found from nvcc's real location
  MAX_JOBS                   parallel compile jobs (honoured by torch's ninja build)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(message: str) -> None:
    print(f"pyattn setup: {message}", file=sys.stderr, flush=True)


def find_cuda_home() -> str | None:
    """CUDA_HOME, else the toolkit folder of the real nvcc (PATH's nvcc may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as handle:
            head = handle.read(4096)
        if head.startswith(b"#!"):  # a wrapper script: take the nvcc path it execs
            for token in head.decode(errors="ignore").split():
                if token.endswith("/nvcc") and os.path.isfile(token):
                    real = os.path.realpath(token)
                    break
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def gencode_flags() -> list[str]:
    arches = os.environ.get("PYATTN_CUDA_ARCH", "80;90a").replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip() for a in arches)):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("PYATTN_SKIP_CUDA_BUILD", "0") == "1":
        log("PYATTN_SKIP_CUDA_BUILD=1: building no extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        log("torch is not importable at build time: building no extension (use --no-build-isolation)")
        return [], {}
    cuda_home = find_cuda_home()
    if torch.version.cuda is None or cuda_home is None or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        log(f"no CUDA toolkit (torch CUDA {torch.version.cuda}, CUDA_HOME {cuda_home}): building no extension")
        return [], {}
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch read CUDA_HOME at import time
    library_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    if not sources:
        return [], {}
    gencode = gencode_flags()
    log(f"building pyattn._C with CUDA {torch.version.cuda} from {cuda_home}: {' '.join(gencode)}")
    # The Makefile shows ninja's "[done/total]" lines as they come; this says what the total is made of.
    log(
        f"{len(sources)} sources ({sum(path.endswith('.cu') for path in sources)} .cu) with ninja, "
        f"MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}: minutes; PYATTN_SKIP_CUDA_BUILD=1 skips it"
    )
    nvcc_version = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
    ).stdout.strip().splitlines()[-1:]
    log(f"nvcc: {' '.join(nvcc_version)}")
    extension = cpp_extension.CUDAExtension(
        name="pyattn._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        library_dirs=library_dirs,
        define_macros=[("PYATTN_WITH_CUDA", "1")],
        # No -std flag: torch adds the C++ standard its own headers need (newer torch needs C++20).
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", *gencode],
        },
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    # Every subpackage of pyattn/, and kernels/ installed as pyattn.kernels (with its own subpackages).
    packages=find_packages(include=["pyattn", "pyattn.*"])
    + ["pyattn.kernels"] + [f"pyattn.kernels.{name}" for name in find_packages("kernels")],
    package_dir={"pyattn.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
