"""The attention API on the Triton backend: functional calls, custom ops, torch.compile.

Each test runs on "cpu" under the Triton interpreter (marked ``interpreter``: its own pytest process
with TRITON_INTERPRET=1) and on "cuda" where a GPU is (marked ``requires_cuda``: the plain process).
Results are compared with the same call on the reference backend in float64, with the dtype's bound
from the table in conftest; the interpreter's fp32 dot, like tf32, gets ``RTOL_TF32``. bf16 runs on
the GPU only: the interpreter's bf16 arithmetic is wrong.
"""

from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn.functional import flash_attention, flash_attention_varlen, scaled_dot_product_attention
from pyattn.ops import attention_triton as attention_ops
from tests.conftest import RTOL, RTOL_TF32, assert_close, poison_, random_tensor

DEVICES = [pytest.param("cpu", marks=pytest.mark.interpreter), pytest.param("cuda", marks=pytest.mark.requires_cuda)]
# (device, dtype): bf16 on the GPU only, since the interpreter's bf16 arithmetic is wrong.
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, marks=pytest.mark.interpreter, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, marks=pytest.mark.interpreter, id="cpu-fp16"),
    *(pytest.param("cuda", dtype, marks=pytest.mark.requires_cuda, id=f"cuda-{name}")
      for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"))),
]
TOLERANCE = {**RTOL, torch.float32: RTOL_TF32}


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fill every float tensor the launchers allocate with NaN, so an element a kernel never writes fails."""
    count = {"allocations": 0}

    def poisoning(allocate):
        def allocate_poisoned(*args, **kwargs):
            tensor = allocate(*args, **kwargs)
            if not tensor.is_floating_point():
                return tensor
            count["allocations"] += 1
            return poison_(tensor)

        return allocate_poisoned

    monkeypatch.setattr(torch, "empty", poisoning(torch.empty))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoning(torch.Tensor.new_empty))
    return count


def _compare_with_reference(call, tensors, dtype, device, poisoned_allocations, name="output"):
    """``call(*tensors)`` on Triton in ``dtype`` vs on the reference in float64: output and gradients."""
    ours = [tensor.to(device, dtype).requires_grad_() for tensor in tensors]
    theirs = [tensor.double().requires_grad_() for tensor in tensors]
    allocations_before = poisoned_allocations["allocations"]
    with pyattn.use_backend("triton"):
        out = call(*ours)
        grad_out = random_tensor(*out.shape)
        grads = torch.autograd.grad(out, ours, grad_out.to(device, dtype))
    assert poisoned_allocations["allocations"] > allocations_before, "the launchers' outputs were not poisoned"
    with pyattn.use_backend("reference"):
        expected = call(*theirs)
        expected_grads = torch.autograd.grad(expected, theirs, grad_out.double())
    rtol = TOLERANCE[dtype]
    assert_close(out.cpu(), expected, rtol, name=name)
    for grad_name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert_close(grad.cpu(), expected_grad, rtol, name=f"{name}: grad {grad_name}")


# ---------------------------------------------------------------------------------------------
# functional calls on the Triton backend vs the reference


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize(
    "case",
    ["plain", "causal L<S", "causal L>S", "bool mask (B,1,1,S)", "float mask (1,H,L,S)", "bool mask (L,S) gqa"],
)
def test_sdpa_matches_reference(case, device, dtype, poisoned_allocations):
    seqlen_q, seqlen_k = (13, 20) if "L<S" in case else (20, 13) if "L>S" in case else (17, 17)
    heads_k = 1 if "gqa" in case else 2
    tensors = (random_tensor(2, 2, seqlen_q, 16), random_tensor(2, heads_k, seqlen_k, 16),
               random_tensor(2, heads_k, seqlen_k, 24))
    options = dict(is_causal="causal" in case, enable_gqa="gqa" in case)
    mask = None
    if case.startswith("bool mask (B,1,1,S)"):
        mask = torch.rand(2, 1, 1, seqlen_k, device=device) > 0.3
    elif case.startswith("float mask"):
        mask = random_tensor(1, 2, seqlen_q, seqlen_k, device=device)
    elif case.startswith("bool mask (L,S)"):
        mask = torch.rand(seqlen_q, seqlen_k, device=device) > 0.3
        mask[3] = False  # a row no key takes part in: output 0, gradient 0

    def call(q, k, v):
        attn_mask = mask
        if mask is not None and mask.is_floating_point():
            attn_mask = mask.to(q.device, q.dtype)
        elif mask is not None:
            attn_mask = mask.to(q.device)
        return scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **options)

    _compare_with_reference(call, tensors, dtype, device, poisoned_allocations)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize(
    "options",
    [
        dict(causal=True),
        dict(window=(4, 2)),
        dict(causal=True, window=(5, -1), softcap=3.0),
        dict(alibi="heads", causal=True),
        dict(alibi="batch_heads", scale=0.3, deterministic=True),
        dict(causal=True, layout="bshd"),
    ],
    ids=lambda options: ",".join(options),
)
def test_flash_matches_reference(options, device, dtype, poisoned_allocations):
    options = dict(options)
    batch, heads, heads_k, seqlen_q, seqlen_k = 2, 4, 2, 11, 19
    alibi = options.pop("alibi", None)
    if alibi is not None:
        shape = (heads,) if alibi == "heads" else (batch, heads)
        options["alibi_slopes"] = (torch.rand(shape) + 0.1).to(device)
    if options.get("layout") == "bshd":
        shapes = [(batch, seqlen_q, heads, 16), (batch, seqlen_k, heads_k, 16), (batch, seqlen_k, heads_k, 32)]
    else:
        shapes = [(batch, heads, seqlen_q, 16), (batch, heads_k, seqlen_k, 16), (batch, heads_k, seqlen_k, 32)]

    def call(q, k, v):
        slopes = options.get("alibi_slopes")
        arguments = {"layout": "bhsd", **options, "alibi_slopes": None if slopes is None else slopes.to(q.device)}
        return flash_attention(q, k, v, **arguments)

    _compare_with_reference(call, [random_tensor(*shape) for shape in shapes], dtype, device, poisoned_allocations)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_lse_matches_reference(device):
    q, k, v = random_tensor(1, 2, 9, 16), random_tensor(1, 2, 5, 16), random_tensor(1, 2, 5, 16)
    with pyattn.use_backend("triton"):
        _, lse = flash_attention(q.to(device), k.to(device), v.to(device), causal=True, return_lse=True, layout="bhsd")
    with pyattn.use_backend("reference"):
        _, expected = flash_attention(q.double(), k.double(), v.double(), causal=True, return_lse=True, layout="bhsd")
    assert lse.dtype == torch.float32 and not lse.requires_grad
    lse = lse.cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected))  # rows 0..3 see no key (L > S, bottom-right)
    finite = torch.isfinite(expected)
    assert_close(lse[finite], expected[finite], RTOL_TF32, name="lse")


# lengths_q = [5, 17, 1] throughout. With lengths_k [9, 4, 6] seqlen_k - seqlen_q is 4, -13, 5: each sequence is
# aligned at its own bottom-right corner, and under causal rows 0..12 of the second see no key.
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize(
    "lengths_k,options",
    [([5, 17, 1], dict()), ([9, 4, 6], dict()), ([5, 17, 1], dict(causal=True)),
     ([7, 19, 3], dict(causal=True, window=(3, -1), alibi=True)),  # seqlen_k - seqlen_q = 2 in every sequence
     ([9, 4, 6], dict(causal=True)), ([9, 30, 6], dict(window=(3, 2))),
     ([9, 4, 6], dict(causal=True, window=(6, -1), alibi=True)), ([2, 30, 9], dict(alibi=True, deterministic=True))],
    ids=["ragged", "k-lengths-differ", "causal", "causal-window-alibi", "causal-per-sequence-corner",
         "window-per-sequence-corner", "causal-window-alibi-per-sequence-corner", "alibi-per-sequence-corner"],
)
def test_varlen_matches_reference(lengths_k, options, device, dtype, poisoned_allocations):
    lengths_q = [5, 17, 1]
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(len(lengths_q), 4, device=device) + 0.1
    cu_seqlens_q = torch.tensor([0, 5, 22, 23], dtype=torch.int32, device=device)
    cu_seqlens_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    tensors = (random_tensor(sum(lengths_q), 4, 16), random_tensor(sum(lengths_k), 2, 16),
               random_tensor(sum(lengths_k), 2, 24))

    def call(q, k, v):
        slopes = options.get("alibi_slopes")
        return flash_attention_varlen(q, k, v, cu_seqlens_q.to(q.device), cu_seqlens_k.to(q.device), max(lengths_q),
                                      max(lengths_k), **{**options, "alibi_slopes": None if slopes is None else
                                                         slopes.to(q.device)})

    _compare_with_reference(call, tensors, dtype, device, poisoned_allocations)


def _causal_varlen_inputs(device):
    """seqlen_k - seqlen_q = 4, -13, 5: rows 0..12 of the second sequence (packed rows 5..17) see no key."""
    lengths_q, lengths_k = [5, 17, 1], [9, 4, 6]
    cu_seqlens_q = torch.tensor([0, 5, 22, 23], dtype=torch.int32, device=device)
    cu_seqlens_k = torch.tensor([0, 9, 13, 19], dtype=torch.int32, device=device)
    q, k, v = (random_tensor(total, heads, 16, device=device, requires_grad=True)
               for total, heads in ((sum(lengths_q), 4), (sum(lengths_k), 2), (sum(lengths_k), 2)))
    return q, k, v, cu_seqlens_q, cu_seqlens_k, max(lengths_q), max(lengths_k)


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_rows_that_see_no_key_are_zero(device, poisoned_allocations):
    q, k, v, *layout = _causal_varlen_inputs(device)
    with pyattn.use_backend("triton"):
        out, lse = flash_attention_varlen(q, k, v, *layout, causal=True, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), random_tensor(*out.shape, device=device))
    blind = torch.zeros(q.shape[0], dtype=torch.bool, device=device)
    blind[5:18] = True
    assert (out[blind] == 0).all() and torch.isfinite(out).all()
    assert torch.isneginf(lse[:, blind]).all() and torch.isfinite(lse[:, ~blind]).all()
    assert all(torch.isfinite(grad).all() for grad in grads) and (grads[0][blind] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_varlen_causal_reads_no_lengths_on_the_host(device):
    # fullgraph=True fails on a graph break, such as a branch on cu_seqlens' values read on the host.
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k = _causal_varlen_inputs(device)

    def attend(q, k, v, cu_seqlens_q, cu_seqlens_k):  # the lengths are graph inputs, as in training loops
        return flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    grad_out = random_tensor(q.shape[0], 4, 16, device=device)
    with pyattn.use_backend("triton"):
        out = compiled(q, k, v, cu_seqlens_q, cu_seqlens_k)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        expected = attend(q, k, v, cu_seqlens_q, cu_seqlens_k)
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    assert_close(out, expected, RTOL[torch.float32])
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert_close(grad, expected_grad, RTOL[torch.float32], name=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_matches_torch(device, batch_first, poisoned_allocations):
    """need_weights=False on the Triton backend (fp32) vs torch's module in float64, masks and gradients."""
    theirs = torch.nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=batch_first, dtype=torch.float64)
    ours = pyattn.nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=batch_first, device=device)
    ours.load_state_dict(theirs.state_dict())
    shape_q, shape_k = ((2, 7, 32), (2, 11, 32)) if batch_first else ((7, 2, 32), (11, 2, 32))
    query, key = random_tensor(*shape_q), random_tensor(*shape_k)
    padding = torch.rand(2, 11) > 0.7
    padding[:, 0] = False
    blocked = torch.rand(7, 11) > 0.7
    grad_out = random_tensor(*shape_q)
    results = []
    for module, dtype, module_device in ((ours, torch.float32, device), (theirs, torch.float64, "cpu")):
        inputs = [tensor.to(module_device, dtype).requires_grad_() for tensor in (query, key)]
        with pyattn.use_backend("triton" if module is ours else "reference"):
            out, _ = module(inputs[0], inputs[1], inputs[1], key_padding_mask=padding.to(module_device),
                            attn_mask=blocked.to(module_device), need_weights=False)
            grads = torch.autograd.grad(out, inputs, grad_out.to(module_device, dtype))
        results.append((out.cpu(), *(grad.cpu() for grad in grads)))
    assert poisoned_allocations["allocations"] > 0
    for name, ours_result, their_result in zip(("output", "grad query", "grad key"), *results):
        assert_close(ours_result, their_result, RTOL_TF32, name=name)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_reproducible_and_equal_to_the_reference_with_the_kernels_pattern(device, poisoned_allocations):
    import pyattn.kernels.attention as kernels

    dropout_p, seqlen_q, seqlen_k = 0.3, 12, 16
    tensors = (random_tensor(1, 2, seqlen_q, 16), random_tensor(1, 2, seqlen_k, 16), random_tensor(1, 2, seqlen_k, 16))
    ours = [tensor.to(device).requires_grad_() for tensor in tensors]
    torch.manual_seed(5)
    seed = int(attention_ops._draw_dropout_seed(dropout_p))
    keep = kernels.attention_dropout_keep_mask(1, 2, seqlen_q, seqlen_k, dropout_p=dropout_p, seed=seed,
                                               device=device)
    with pyattn.use_backend("triton"):
        torch.manual_seed(5)
        out = flash_attention(*ours, dropout_p=dropout_p, layout="bhsd")
        torch.manual_seed(5)
        again = flash_attention(*ours, dropout_p=dropout_p, layout="bhsd")
        different = flash_attention(*ours, dropout_p=dropout_p, layout="bhsd")
        grad_out = random_tensor(*out.shape, device=device)
        grads = torch.autograd.grad(out, ours, grad_out)
    assert torch.equal(out, again) and not torch.equal(out, different)
    from pyattn.reference.attention import attention

    theirs = [tensor.double().requires_grad_() for tensor in tensors]
    expected, _ = attention(*theirs, scale=0.25, dropout_p=dropout_p, dropout_keep_mask=keep.cpu())
    expected_grads = torch.autograd.grad(expected, theirs, grad_out.cpu().double())
    assert_close(out.cpu(), expected, RTOL_TF32)
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert_close(grad.cpu(), expected_grad, RTOL_TF32, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# dispatch on this process's devices


@pytest.mark.parametrize("device", DEVICES)
def test_auto_picks_triton_and_falls_back_for_what_it_cannot_serve(device):
    q, k, v = (random_tensor(1, 2, 5, 16, device=device) for _ in range(3))
    report = pyattn.explain("scaled_dot_product_attention", q, k, v)
    float64 = pyattn.explain("scaled_dot_product_attention", q.double(), k.double(), v.double())
    if device == "cpu":  # the interpreter serves only a forced triton: auto runs PyTorch's own kernels
        assert report.endswith("auto picks: torch") and float64.endswith("auto picks: torch")
    else:
        assert "auto picks: triton" in report or "auto picks: cuda" in report
        assert float64.endswith("auto picks: torch")  # no fp64 kernel: torch's own SDPA serves it exactly
    mask = random_tensor(5, 5, device=device, requires_grad=True)  # the kernels give no gradient for a mask
    with pyattn.use_backend("triton"), pytest.raises(pyattn.BackendUnavailableError, match="mask_grad"):
        scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ---------------------------------------------------------------------------------------------
# the custom ops themselves


def _op_arguments(device, varlen=False, dropout=False, requires_grad=True):
    if varlen:
        q, k, v = random_tensor(9, 2, 16), random_tensor(11, 1, 16), random_tensor(11, 1, 16)
        cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 6, 11], dtype=torch.int32, device=device)
        mask, alibi, max_q, max_k = None, torch.rand(2, device=device), 5, 6
    else:
        q, k, v = random_tensor(2, 2, 7, 16), random_tensor(2, 1, 9, 16), random_tensor(2, 1, 9, 16)
        cu_q = cu_k = None
        mask = (torch.rand(2, 1, 1, 9, device=device) > 0.2).expand(2, 2, 7, 9)
        alibi, max_q, max_k = torch.rand(2, 2, device=device), 0, 0
    q, k, v = (tensor.to(device).requires_grad_(requires_grad) for tensor in (q, k, v))
    seed = torch.tensor(1234, dtype=torch.int64) if dropout else None
    # varlen: causal at each sequence's bottom-right corner (6 - 4 and 5 - 5); dense: offset 2.
    diagonal_offset, align_to_end = (0, True) if varlen else (2, False)
    # (scale, window_left, window_right, diagonal_offset, align_to_end, softcap, dropout_p, max_seqlen_q/k)
    options = (0.25, -1, 0, diagonal_offset, align_to_end, 0.0, 0.2 if dropout else 0.0, max_q, max_k)
    return (q, k, v, mask, alibi, cu_q, cu_k, seed, *options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen,dropout", [(False, False), (False, True), (True, False)])
def test_opcheck_forward(device, varlen, dropout):
    arguments = _op_arguments(device, varlen, dropout)
    torch.library.opcheck(torch.ops.pyattn.triton_attention_fwd.default, (*arguments, False, False))  # use_tma off


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen,deterministic", [(False, True), (True, False)])
def test_opcheck_backward(device, varlen, deterministic):
    q, k, v, mask, alibi, cu_q, cu_k, seed, *options = _op_arguments(device, varlen, requires_grad=False)
    out, lse = torch.ops.pyattn.triton_attention_fwd(q, k, v, mask, alibi, cu_q, cu_k, seed, *options, deterministic,
                                                     False)
    grad_out = random_tensor(*out.shape, device=device)
    torch.library.opcheck(torch.ops.pyattn.triton_attention_bwd.default,
                          (grad_out, q, k, v, out, lse, mask, alibi, cu_q, cu_k, seed, *options, deterministic))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_reaches_the_triton_ops(device):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    targets = []

    def recording_compiler(graph_module, example_inputs):
        """aot_eager that also records which functions the forward and backward graphs call."""
        targets.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)

    module = pyattn.nn.MultiheadAttention(32, 2, batch_first=True, device=device).eval()
    query = random_tensor(2, 9, 32, device=device, requires_grad=True)
    attend = lambda x: module(x, x, x, need_weights=False)[0]  # noqa: E731
    compiled = torch.compile(attend, fullgraph=True,
                             backend=aot_autograd(fw_compiler=recording_compiler, bw_compiler=recording_compiler))
    torch._dynamo.reset()
    with pyattn.use_backend("triton"):
        out = compiled(query)
        (grad,) = torch.autograd.grad(out, query, torch.ones_like(out))
        expected = attend(query)
        (expected_grad,) = torch.autograd.grad(expected, query, torch.ones_like(expected))
    assert "pyattn.triton_attention_fwd.default" in targets
    assert "pyattn.triton_attention_bwd.default" in targets
    assert_close(out, expected, RTOL[torch.float32])
    assert_close(grad, expected_grad, RTOL[torch.float32], name="grad query")


@pytest.mark.parametrize("device", DEVICES)
def test_flash_bshd_output_is_contiguous_in_bshd(device):
    # flash-attn users reshape the (B, L, H, Dv) output to (B, L, H·Dv) with .view: it must be contiguous.
    q, k, v = (random_tensor(2, 7, 3, 16).to(device) for _ in range(3))
    with pyattn.use_backend("triton"):
        out = flash_attention(q, k, v, causal=True, layout="bshd")
    assert out.shape == (2, 7, 3, 16) and out.is_contiguous()
    out.view(2, 7, 48)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attention_default_layout_is_bshd_on_triton(device):
    q, k, v = (random_tensor(2, 24, heads, 16, device=device) for heads in (4, 2, 2))  # (batch, seqlen, nheads, d)
    with pyattn.use_backend("triton"):
        out = flash_attention(q, k, v, causal=True)
    with pyattn.use_backend("reference"):
        expected = flash_attention(q.double(), k.double(), v.double(), causal=True)
    assert out.shape == (2, 24, 4, 16)
    assert_close(out, expected.to(out.dtype), TOLERANCE[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_algorithms_reach_the_triton_backward(device, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the Triton backward gets ``deterministic=True`` (the
    separate dQ kernel, no atomics) from SDPA and flash_attention alike, and repeats bit for bit; a GQA call's
    dK/dV slices stay deterministic too (their fp32 partials are summed in a fixed order)."""
    import pyattn.kernels.attention as kernels  # what the Triton op calls

    seen = []
    backward = kernels.attention_backward
    monkeypatch.setattr(kernels, "attention_backward", lambda *a, **kw: seen.append(kw["deterministic"]) or backward(
        *a, **kw))
    q = random_tensor(1, 4, 40, 32).to(device).requires_grad_()
    k = random_tensor(1, 2, 40, 32).to(device).requires_grad_()
    v = random_tensor(1, 2, 40, 32).to(device).requires_grad_()
    grad_out = random_tensor(1, 4, 40, 32).to(device)
    calls = [lambda: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
             lambda: flash_attention(q, k, v, causal=True, layout="bhsd")]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pyattn.use_backend("triton"):
            for call in calls:
                grads = [torch.autograd.grad(call(), (q, k, v), grad_out) for _ in range(2)]
                assert all(torch.equal(a, b) for a, b in zip(*grads)), "deterministic backward is not reproducible"
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [True] * 4
