"""pyattn.nn.MultiheadAttention against torch.nn.MultiheadAttention (float64, CPU, reference backend)."""

from __future__ import annotations

import pytest
import torch

import pyattn
from tests.conftest import RTOL, assert_close, random_tensor

F64 = torch.float64
RTOL64 = RTOL[F64]
EMBED, HEADS, BATCH, SEQLEN_Q, SEQLEN_K = 8, 2, 3, 4, 6


@pytest.fixture(autouse=True)
def _reference_backend():
    with pyattn.use_backend("reference"):
        yield


def _modules(from_pyattn=False, **kwargs):
    """A torch and a pyattn module with the same weights, copied one way or the other."""
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, dtype=F64, **kwargs)
    ours = pyattn.nn.MultiheadAttention(EMBED, HEADS, dtype=F64, **kwargs)
    if from_pyattn:
        theirs.load_state_dict(ours.state_dict())
    else:
        ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _inputs(batched=True, batch_first=False, kdim=EMBED, vdim=EMBED, requires_grad=False):
    def make(length, features):
        if not batched:
            shape = (length, features)
        else:
            shape = (BATCH, length, features) if batch_first else (length, BATCH, features)
        return random_tensor(*shape, dtype=F64, requires_grad=requires_grad)

    return make(SEQLEN_Q, EMBED), make(SEQLEN_K, kdim), make(SEQLEN_K, vdim)


def _padding_mask(kind, batched=True):
    padded = torch.rand((BATCH, SEQLEN_K) if batched else (SEQLEN_K,)) > 0.6
    padded[..., 0] = False  # every query keeps a key: torch gives NaN otherwise
    return padded if kind == "bool" else torch.zeros(padded.shape, dtype=F64).masked_fill(padded, float("-inf"))


def _attn_mask(kind, dims, batched=True):
    heads = BATCH * HEADS if batched else HEADS
    shape = (SEQLEN_Q, SEQLEN_K) if dims == 2 else (heads, SEQLEN_Q, SEQLEN_K)
    if kind == "bool":
        blocked = torch.rand(shape) > 0.6
        blocked[..., 0] = False
        return blocked
    return random_tensor(*shape, dtype=F64)


def _assert_same_result(theirs_result, ours_result):
    assert_close(ours_result[0], theirs_result[0], RTOL64, name="output")
    if theirs_result[1] is None:
        assert ours_result[1] is None
    else:
        assert_close(ours_result[1], theirs_result[1], RTOL64, name="weights")


CONSTRUCTIONS = [
    dict(),
    dict(batch_first=True),
    dict(kdim=5, vdim=7),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, batch_first=True),
    dict(bias=False),
    dict(bias=False, kdim=5, vdim=3, add_zero_attn=True),
]


@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("construction", CONSTRUCTIONS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_matches_torch(construction, batched, need_weights, average):
    theirs, ours = _modules(**construction)
    query, key, value = _inputs(batched, construction.get("batch_first", False), construction.get("kdim", EMBED),
                                construction.get("vdim", EMBED))
    masks = dict(key_padding_mask=_padding_mask("bool", batched), attn_mask=_attn_mask("bool", 3, batched))
    arguments = dict(need_weights=need_weights, average_attn_weights=average)
    _assert_same_result(theirs(query, key, value, **arguments), ours(query, key, value, **arguments))
    _assert_same_result(theirs(query, key, value, **masks, **arguments), ours(query, key, value, **masks, **arguments))


@pytest.mark.parametrize("padding", [None, "bool", "float"])
@pytest.mark.parametrize("attn", [None, ("bool", 2), ("bool", 3), ("float", 2), ("float", 3)], ids=str)
@pytest.mark.parametrize("need_weights", [True, False])
def test_masks(padding, attn, need_weights):
    theirs, ours = _modules(add_bias_kv=True)
    query, key, value = _inputs()
    masks = dict(key_padding_mask=None if padding is None else _padding_mask(padding),
                 attn_mask=None if attn is None else _attn_mask(*attn))
    _assert_same_result(theirs(query, key, value, need_weights=need_weights, **masks),
                        ours(query, key, value, need_weights=need_weights, **masks))


@pytest.mark.parametrize("seqlen_k", [SEQLEN_Q, SEQLEN_K])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_with_its_mask(seqlen_k, with_padding, need_weights):
    theirs, ours = _modules()
    query = random_tensor(SEQLEN_Q, BATCH, EMBED, dtype=F64)
    key = value = random_tensor(seqlen_k, BATCH, EMBED, dtype=F64)
    causal = torch.ones(SEQLEN_Q, seqlen_k, dtype=torch.bool).triu(1)  # True = may not attend (top-left)
    padding = None
    if with_padding:
        padding = torch.zeros(BATCH, seqlen_k, dtype=torch.bool)
        padding[:, -1] = True
    arguments = dict(key_padding_mask=padding, attn_mask=causal, is_causal=True, need_weights=need_weights)
    _assert_same_result(theirs(query, key, value, **arguments), ours(query, key, value, **arguments))


def test_is_causal_needs_attn_mask():
    _, ours = _modules()
    query, key, value = _inputs()
    with pytest.raises(ValueError, match="attn_mask is required"):
        ours(query, key, value, is_causal=True)


def test_state_dict_interchanges_both_ways():
    for construction in CONSTRUCTIONS:
        theirs, ours = _modules(from_pyattn=True, **construction)
        assert list(theirs.state_dict()) == list(ours.state_dict())
        query, key, value = _inputs(batch_first=construction.get("batch_first", False),
                                    kdim=construction.get("kdim", EMBED), vdim=construction.get("vdim", EMBED))
        _assert_same_result(theirs(query, key, value), ours(query, key, value))


@pytest.mark.parametrize("construction", CONSTRUCTIONS[:5], ids=str)
def test_initialisation_draws_like_torch(construction):
    torch.manual_seed(7)
    theirs = torch.nn.MultiheadAttention(EMBED, HEADS, **construction)
    torch.manual_seed(7)
    ours = pyattn.nn.MultiheadAttention(EMBED, HEADS, **construction)
    for (name, their_tensor), (our_name, our_tensor) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert name == our_name and torch.equal(their_tensor, our_tensor), name
    assert type(ours.out_proj) is type(theirs.out_proj)
    ours.reset_parameters()
    for name, parameter in ours.named_parameters():
        if name.endswith("weight") or name.startswith("bias_"):  # the biases of the projections are zeros
            assert not torch.equal(parameter, theirs.get_parameter(name)), f"{name} not re-drawn"


def test_extra_repr():
    text = repr(pyattn.nn.MultiheadAttention(16, 4, dropout=0.1, kdim=8, vdim=8, bias=False, batch_first=True))
    assert "embed_dim=16, num_heads=4, dropout=0.1, kdim=8, vdim=8, bias=False, batch_first=True" in text
    assert "(out_proj)" in text


def test_gradients_match_torch():
    theirs, ours = _modules(add_bias_kv=True, kdim=5, vdim=7)
    query, key, value = _inputs(kdim=5, vdim=7, requires_grad=True)
    masks = dict(key_padding_mask=_padding_mask("bool"), attn_mask=_attn_mask("float", 2))
    grad_out = random_tensor(SEQLEN_Q, BATCH, EMBED, dtype=F64)
    for need_weights in (True, False):
        gradients = []
        for module in (theirs, ours):
            out, _ = module(query, key, value, need_weights=need_weights, **masks)
            inputs = (query, key, value, *module.parameters())
            gradients.append(torch.autograd.grad(out, inputs, grad_out))
        names = ["query", "key", "value", *(name for name, _ in ours.named_parameters())]
        for name, their_grad, our_grad in zip(names, *gradients):
            assert_close(our_grad, their_grad, RTOL64, name=f"grad {name} (need_weights={need_weights})")


def test_fully_masked_query_gives_bias_not_nan():
    _, ours = _modules()
    query, key, value = _inputs(requires_grad=True)
    padding = torch.zeros(BATCH, SEQLEN_K, dtype=torch.bool)
    padding[1] = True  # batch element 1 has no key at all
    for need_weights in (True, False):
        out, _ = ours(query, key, value, key_padding_mask=padding, need_weights=need_weights)
        assert torch.isfinite(out).all()
        assert_close(out[:, 1], ours.out_proj.bias.expand(SEQLEN_Q, EMBED), RTOL64, name="masked output")
        out.sum().backward()
        assert torch.isfinite(query.grad).all() and torch.isfinite(key.grad).all()


# ---------------------------------------------------------------------------------------------
# dropout


def test_dropout_only_in_training():
    theirs, ours = _modules(dropout=0.5)
    query, key, value = _inputs()
    theirs.eval(), ours.eval()
    for need_weights in (True, False):
        _assert_same_result(theirs(query, key, value, need_weights=need_weights),
                            ours(query, key, value, need_weights=need_weights))
    ours.train()
    assert not torch.equal(ours(query, key, value)[0], theirs(query, key, value)[0])


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_is_reproducible_with_manual_seed(need_weights):
    _, ours = _modules(dropout=0.3)
    query, key, value = _inputs()
    torch.manual_seed(3)
    first = ours(query, key, value, need_weights=need_weights)[0]
    torch.manual_seed(3)
    second = ours(query, key, value, need_weights=need_weights)[0]
    third = ours(query, key, value, need_weights=need_weights)[0]
    assert torch.equal(first, second) and not torch.equal(second, third)


def test_dropout_statistics_of_the_weights():
    dropout_p = 0.25
    _, ours = _modules(dropout=dropout_p)
    query = random_tensor(32, 8, EMBED, dtype=F64)
    key = value = random_tensor(48, 8, EMBED, dtype=F64)
    ours.eval()
    _, weights = ours(query, key, value, average_attn_weights=False)
    ours.train()
    _, dropped = ours(query, key, value, average_attn_weights=False)
    kept = dropped != 0
    tolerance = 5 * (dropout_p * (1 - dropout_p) / kept.numel()) ** 0.5
    assert abs((1 - kept.double().mean().item()) - dropout_p) < tolerance
    assert_close(dropped[kept], weights[kept] / (1 - dropout_p), RTOL64, name="kept weights")


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_preserves_the_expected_output(need_weights):
    _, ours = _modules(dropout=0.2)
    query, key, value = _inputs()
    ours.eval()
    expected = ours(query, key, value, need_weights=need_weights)[0]
    ours.train()
    draws = torch.stack([ours(query, key, value, need_weights=need_weights)[0] for _ in range(200)])
    # The mean of 200 draws is ~3.5% off (seeded); a missing 1/(1-p) rescale would be 20% off.
    assert_close(draws.mean(0), expected, 0.1, name="mean over dropout draws")


# ---------------------------------------------------------------------------------------------
# routing and validation


def test_the_module_goes_through_dispatch(monkeypatch):
    monkeypatch.setattr("pyattn._triton._INTERPRETER", False)
    _, ours = _modules()
    query, key, value = _inputs()
    with pyattn.use_backend("triton"):  # no GPU here: a forced triton serves neither path
        with pytest.raises(pyattn.BackendUnavailableError, match="cannot serve op=multihead_attention"):
            ours(query, key, value, need_weights=True)
        with pytest.raises(pyattn.BackendUnavailableError, match="cannot serve op=multihead_attention"):
            ours(query, key, value, need_weights=False)
    for backend in ("torch", "reference"):
        with pyattn.use_backend(backend):
            ours(query, key, value, need_weights=True)
    padding = torch.zeros(BATCH, key.shape[0], dtype=torch.bool)
    with pyattn.use_backend("auto"):
        text = pyattn.explain(ours, query, key, value, key_padding_mask=padding)
        assert "torch/module       no: unsupported features: mask" in text and text.endswith("auto picks: torch/sdpa")
        assert pyattn.explain(ours, query, key, value).endswith("auto picks: torch/module")  # torch's own, exact
    assert isinstance(ours, torch.nn.MultiheadAttention)  # a true drop-in: isinstance checks hold


def test_unmasked_calls_run_torchs_own_forward_and_equal_pyattns_path():
    theirs, ours = _modules()
    query, key, value = _inputs()
    with pyattn.use_backend("torch"):
        got = ours(query, key, value, average_attn_weights=False)
    with pyattn.use_backend("reference"):
        expected = ours(query, key, value, average_attn_weights=False)
    for g, e in zip(got, expected):
        assert_close(g, e, 1e-10)


def test_need_weights_torch_variant_equals_reference():
    _, ours = _modules()
    query, key, value = _inputs()
    padding = torch.zeros(BATCH, key.shape[0], dtype=torch.bool)
    padding[0] = True  # batch 0: every key masked out: output 0 and weights 0 on both backends
    results = {}
    for backend in ("torch", "reference"):
        with pyattn.use_backend(backend):
            results[backend] = ours(query, key, value, key_padding_mask=padding, average_attn_weights=False)
    for got, want in zip(results["torch"], results["reference"]):
        assert torch.isfinite(got).all()
        assert_close(got, want, 1e-6)
    assert (results["torch"][1][0] == 0).all()


def _bad_calls():
    _, ours = _modules()
    query, key, value = _inputs()
    return [
        ("query dims", lambda: ours(query[None], key, value), ValueError, "query must be unbatched 2-D"),
        ("key dims", lambda: ours(query, key[0], value), ValueError, "key must be 3-D too"),
        ("query features", lambda: ours(query[..., :4], key, value), ValueError, "query must have 8 features"),
        ("value length", lambda: ours(query, key, value[:2]), ValueError, "key's shape"),
        ("key batch", lambda: ours(query, key[:, :1], value[:, :1]), ValueError, "key has batch size 1"),
        ("padding shape", lambda: ours(query, key, value, key_padding_mask=torch.zeros(BATCH, 2, dtype=torch.bool)),
         ValueError, "key_padding_mask must have shape (3, 6)"),
        ("attn_mask shape", lambda: ours(query, key, value, attn_mask=torch.zeros(BATCH, 4, 6, dtype=torch.bool)),
         ValueError, "attn_mask must have shape (4, 6) or (6, 4, 6)"),
        ("mask dtype", lambda: ours(query, key, value, attn_mask=torch.zeros(4, 6, dtype=torch.int32)), TypeError,
         "attn_mask must be bool"),
        ("not a tensor", lambda: ours(query, None, value), TypeError, "key must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[case[0] for case in _bad_calls()])
def test_validation_error_names_the_argument(case):
    _, call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_constructor_validation():
    with pytest.raises(ValueError, match="embed_dim 10 must be divisible by num_heads 4"):
        pyattn.nn.MultiheadAttention(10, 4)
    with pytest.raises(ValueError, match="dropout must be in"):
        pyattn.nn.MultiheadAttention(8, 2, dropout=1.5)
