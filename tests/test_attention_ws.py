"""The warp-specialised Hopper forward (``kernels/attention/forward_ws.py``): against the float64 reference on
CPU through the Triton interpreter (which runs its device-side descriptors; warp specialisation itself is a
compiler transform, checked by the compile test: ``test_triton_compile.py``), its eligibility rule and its
refusals, the scoping of its scratch allocator, and its place in dispatch (forced only). The ``requires_sm90``
tests at the end run it on an H100 in the plain process.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import INTERPRET, RTOL, assert_close, random_tensor, relative_error

pytest.importorskip("triton", reason="triton is not installed")

import pyattn  # noqa: E402
from pyattn.kernels import attention as kernels  # noqa: E402
from pyattn.kernels.attention import launch  # noqa: E402
from pyattn.reference.attention import attention as reference_attention  # noqa: E402
# poisoned_outputs: the kernels tests' autouse fixture (NaN-filled outputs), applied here by being imported.
from tests.test_attention_kernels import check_against_reference, make_inputs, poisoned_outputs  # noqa: E402,F401


class _Forbidden:
    def __init__(self, what):
        self.what = what

    def __getitem__(self, grid):
        raise AssertionError(f"the {self.what} forward ran although warp_specialize=True selected forward_ws")


@pytest.fixture
def forced_ws(monkeypatch):
    """The other forwards unreachable, so that no silent fallback can pass."""
    monkeypatch.setattr(launch.FORWARD, "interpreter", _Forbidden("pointer"))
    monkeypatch.setattr(launch.FORWARD_TMA, "interpreter", _Forbidden("TMA"))


# Ragged lengths (the last key tile mostly past the sequence: MASK_KEYS), lengths that are multiples of 128 (no
# per-score mask at all when not causal), GQA/MQA, Dv ≠ D, causal top-left and bottom-right, and rows that see no key.
WS_CASES = {
    "noncausal-L17-S129-d64": ((1, 2, 2, 17, 129, 64, 64), {}),
    "noncausal-gqa-L129-S17-d128": ((2, 4, 2, 129, 17, 128, 128), {}),
    "noncausal-S128-unmasked-d64": ((1, 2, 1, 40, 128, 64, 64), {}),
    "causal-top-left-gqa-L129-S129-d64": ((1, 4, 2, 129, 129, 64, 64), dict(window_right=0)),
    "causal-bottom-right-L17-S129-d128": ((1, 2, 1, 17, 129, 128, 128), dict(window_right=0, diagonal_offset=112)),
    "causal-S128-d64-dv128": ((1, 2, 2, 48, 128, 64, 128), dict(window_right=0, diagonal_offset=80)),
    "causal-rows-without-keys-L33-S20": ((1, 2, 2, 33, 20, 64, 64), dict(window_right=0, diagonal_offset=-13)),
    "right-window-mqa-d64": ((1, 4, 1, 33, 47, 64, 64), dict(window_right=5, diagonal_offset=14)),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", WS_CASES)
def test_ws_forward_matches_reference(name, forced_ws):
    shape, options = WS_CASES[name]
    q, k, v = make_inputs(*shape, torch.float16)  # fp16/bf16 only; bf16 arithmetic only on the GPU
    check_against_reference(q, k, v, scale=shape[5] ** -0.5, warp_specialize=True, **options)


@pytest.mark.interpreter
def test_ws_masks_keys_exactly_where_the_length_needs_it(forced_ws, monkeypatch):
    """MASK_KEYS follows the key length (off only at multiples of 128, which every BLOCK_N divides), and is needed:
    with it forced off, a ragged length's zero-filled keys enter the softmax and the output is wrong."""
    q, k, v = make_inputs(1, 2, 2, 17, 129, 64, 64, torch.float16)
    for seqlen_k, masked in ((129, True), (128, False), (256, False), (200, True), (64, True)):
        keys = k.new_empty(1, 2, seqlen_k, 64)
        shape = launch._check_inputs("test", q, keys, keys, None, None, None, None, 0, 0, 0.0, 0.0, 0)
        out, lse = launch._forward_outputs(q, keys, shape, False)
        _, constexprs = launch._forward_ws_arguments(q, keys, keys, out, lse, shape, scale=0.1, window_right=-1,
                                                     diagonal_offset=0)
        assert constexprs["MASK_KEYS"] is masked, seqlen_k
    real = launch._forward_ws_arguments

    def unmasked(*args, **kwargs):
        positional, constexprs = real(*args, **kwargs)
        return positional, dict(constexprs, MASK_KEYS=False)

    monkeypatch.setattr(launch, "_forward_ws_arguments", unmasked)
    out, _ = kernels.attention_forward(q, k, v, scale=0.125, warp_specialize=True)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), scale=0.125)
    assert relative_error(out, ref) > 3 * RTOL[torch.float16], "the key mask is not what keeps the output right"


@pytest.mark.interpreter
def test_ws_forward_equals_pointer_forward_closely():
    """Same online softmax, other tiles and loop: the two forwards agree far inside fp16's bound."""
    q, k, v = make_inputs(2, 2, 1, 65, 100, 128, 128, torch.float16)
    options = dict(scale=0.1, window_right=0, diagonal_offset=35)
    pointer, pointer_lse = kernels.attention_forward(q, k, v, **options)
    ws, ws_lse = kernels.attention_forward(q, k, v, warp_specialize=True, **options)
    assert relative_error(ws, pointer.double()) <= RTOL[torch.float16] / 4
    assert_close(ws_lse, pointer_lse.double(), 1e-5, "lse")


def _misaligned_rows():
    return random_tensor(1, 2, 65, 68, dtype=torch.float16)[..., :64]  # rows of 136 bytes: off the 16-byte grid


# (name, change to the eligible call, the reason's words)
WS_REFUSALS = [
    ("fp32", lambda q, k, v, o: ((q.float(), k.float(), v.float()), o), "dtype torch.float32 is not supported"),
    ("head-dim-32", lambda q, k, v, o: ((q[..., :32], k[..., :32], v), o), "head dim 32; the warp-specialised"),
    ("head-dim-96", lambda q, k, v, o: ((q[..., :96], k[..., :96], v), o), "head dim 96"),
    ("misaligned", lambda q, k, v, o: ((_misaligned_rows(), k, v), o), "not 16-byte aligned"),
    ("mask", lambda q, k, v, o: ((q, k, v), dict(o, mask=torch.ones(1, 2, 65, 65, dtype=torch.bool))), "a mask"),
    ("left-window", lambda q, k, v, o: ((q, k, v), dict(o, window_left=4, window_right=0)), "a left window"),
    ("softcap", lambda q, k, v, o: ((q, k, v), dict(o, softcap=5.0)), "softcap"),
    ("alibi", lambda q, k, v, o: ((q, k, v), dict(o, alibi_slopes=torch.ones(2))), "ALiBi"),
    ("dropout", lambda q, k, v, o: ((q, k, v), dict(o, dropout_p=0.1, seed=3)), "dropout"),
    ("negative-scale", lambda q, k, v, o: ((q, k, v), dict(o, scale=-0.1)), "scale -0.1"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("name,change,message", WS_REFUSALS, ids=[case[0] for case in WS_REFUSALS])
def test_ws_forced_on_an_ineligible_call_raises_the_reason(name, change, message, forced_ws):
    q, k, v = make_inputs(1, 2, 2, 65, 65, 64, 64, torch.float16)
    if name == "head-dim-96" or name == "head-dim-32":
        q, k, v = make_inputs(1, 2, 2, 65, 65, 128, 64, torch.float16)
    (q, k, v), options = change(q, k, v, dict(scale=0.125))
    with pytest.raises(ValueError, match=f"warp_specialize=True, but .*{message}"):
        kernels.attention_forward(q, k, v, warp_specialize=True, **options)


@pytest.mark.interpreter
def test_ws_flags_are_checked():
    q, k, v = make_inputs(1, 2, 2, 17, 17, 64, 64, torch.float16)
    with pytest.raises(TypeError, match="warp_specialize must be a bool"):
        kernels.attention_forward(q, k, v, scale=0.125, warp_specialize=1)
    with pytest.raises(ValueError, match="use_tma and warp_specialize exclude each other"):
        kernels.attention_forward(q, k, v, scale=0.125, use_tma=True, warp_specialize=True)
    cu = torch.tensor([0, 17], dtype=torch.int32)
    with pytest.raises(ValueError, match="warp_specialize=True, but the varlen layout"):
        kernels.attention_forward(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), scale=0.125,
                                  cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=17, max_seqlen_k=17,
                                  warp_specialize=True)


def test_ws_rule_reads_metadata_only():
    """The rule runs on meta tensors (dispatch and torch.compile's tracing ask it) and names the capability."""
    q = torch.empty(2, 8, 1024, 128, dtype=torch.bfloat16, device="meta")
    assert kernels.warp_specialized_unsupported_reason(q, q, q, varlen=False, capability=(9, 0)) is None
    assert "compute capability >= 9.0" in kernels.warp_specialized_unsupported_reason(q, q, q, varlen=False,
                                                                                       capability=(8, 0))
    assert "compute capability >= 9.0" in kernels.warp_specialized_unsupported_reason(q, q, q, varlen=False,
                                                                                       capability=None)


@pytest.mark.interpreter
def test_ws_scratch_allocator_leaves_the_callers_allocator_alone(forced_ws):
    """The descriptors' scratch allocator is set in a copy of the caller's context: after the call the caller's
    Triton allocator is the one it had (here: its own), not the launcher's."""
    import triton
    from triton.runtime import _allocation

    def callers_allocator(size, alignment, stream):
        raise AssertionError("the caller's allocator was used by the launch")

    triton.set_allocator(callers_allocator)
    try:
        seen = []
        launch._run_with_descriptor_scratch(torch.device("cpu"),
                                            lambda: seen.append(_allocation._allocator.get()(64, 128, None)))
        assert seen and seen[0].numel() == 64 and seen[0].dtype == torch.int8
        assert _allocation._allocator.get() is callers_allocator
        q, k, v = make_inputs(1, 2, 2, 17, 33, 64, 64, torch.float16)
        kernels.attention_forward(q, k, v, scale=0.125, warp_specialize=True)
        assert _allocation._allocator.get() is callers_allocator
    finally:
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)


def test_auto_never_picks_ws_and_says_why():
    q = torch.empty(2, 8, 1024, 128, dtype=torch.bfloat16, device="meta")
    text = pyattn.explain("scaled_dot_product_attention", q, q, q, is_causal=True, assume="sm_90")
    line = next(line for line in text.splitlines() if line.strip().startswith("triton/ws"))
    assert "served only when forced by name" in line, text
    assert "auto picks: triton/ws" not in text


@pytest.mark.interpreter
def test_forced_ws_serves_sdpa_forward_and_backward():
    """Forced by name through the public API (interpreter: CPU tensors), forward and gradients match the reference
    (the backward is the shared Triton backward on the WS forward's out and lse)."""
    q, k, v = (x.requires_grad_() for x in make_inputs(1, 4, 2, 33, 47, 64, 64, torch.float16))
    with pyattn.use_backend("triton/ws"):
        out = pyattn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = random_tensor(*out.shape, dtype=out.dtype)
    out.backward(grad)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, _ = reference_attention(*leaves, scale=64 ** -0.5, window_right=0)
    ref.backward(grad.double())
    assert_close(out, ref.detach(), RTOL[torch.float16], "out")
    for name, got, leaf in zip("qkv", (q.grad, k.grad, v.grad), leaves):
        assert_close(got, leaf.grad, RTOL[torch.float16], f"d{name}")


@pytest.mark.interpreter
def test_forced_ws_refuses_a_masked_call_by_name():
    q, k, v = make_inputs(1, 2, 2, 17, 17, 64, 64, torch.float16)
    mask = torch.ones(17, 17, dtype=torch.bool)
    with pyattn.use_backend("triton/ws"), pytest.raises(pyattn.BackendUnavailableError,
                                                        match="triton/ws: unsupported features: mask"):
        pyattn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# --------------------------------------------------------------------------------------------
# GPU (plain pytest process, an sm_90 device)
# --------------------------------------------------------------------------------------------

WS_GPU_SHAPES = [(2, 8, 8, 1024, 1024, 128, 128), (1, 4, 2, 1000, 1037, 64, 64), (1, 2, 2, 515, 515, 256, 256)]


@pytest.mark.requires_cuda
@pytest.mark.requires_sm90
@pytest.mark.skipif(INTERPRET, reason="GPU test: run it in the plain process, without TRITON_INTERPRET")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("shape", WS_GPU_SHAPES, ids=lambda s: "B{}_H{}_Hk{}_L{}_S{}_D{}_Dv{}".format(*s))
def test_gpu_ws_forward_matches_reference_and_pointer_forward(shape, causal, dtype):
    q, k, v = (x.cuda() for x in make_inputs(*shape, dtype))
    call = dict(scale=shape[5] ** -0.5, **(dict(window_right=0, diagonal_offset=shape[4] - shape[3]) if causal else {}))
    assert kernels.warp_specialized_unsupported_reason(q, k, v, varlen=False,
                                                       capability=torch.cuda.get_device_capability()) is None
    out, lse = kernels.attention_forward(q, k, v, warp_specialize=True, **call)
    pointer, _ = kernels.attention_forward(q, k, v, **call)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), **call)
    assert_close(out, ref, RTOL[dtype], "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite)
    assert_close(lse[finite], ref_lse[finite], RTOL[torch.float32], "lse")
    assert relative_error(out, pointer.double()) <= RTOL[dtype] / 4
