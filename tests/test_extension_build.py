"""The CUDA extension: built (where a toolkit is present) for sm_90a and sm_80, and importable."""

from __future__ import annotations

import os
import shutil

import pytest

from pyattn import _extension
from pyattn.build_info import extension_architectures

TOOLKIT_PRESENT = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))


@pytest.mark.skipif(not TOOLKIT_PRESENT, reason="no CUDA toolkit on this machine: the extension is not built")
def test_extension_is_built_with_cuda_kernels():
    module = _extension.extension_module()
    assert module.built_with_cuda


@pytest.mark.skipif(not TOOLKIT_PRESENT, reason="no CUDA toolkit on this machine: the extension is not built")
def test_extension_holds_sm90a_and_sm80_code():
    arches = extension_architectures()
    if arches is None:
        pytest.skip("no cuobjdump found to list the extension's cubins")
    wanted = [f"sm_{arch}" for arch in os.environ.get("PYATTN_CUDA_ARCH", "80;90a").replace(",", ";").split(";") if arch]
    for arch in wanted:
        assert arch in arches, f"pyattn._C lacks {arch} code; it holds {arches}"
