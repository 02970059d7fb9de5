"""``attn_implementation="pyattn"`` in transformers: greedy ``generate()`` gives the tokens of "eager" and "sdpa"
for tiny randomly initialised Llama (GQA), Mistral (sliding window shorter than the generation), GPT-2 and
Gemma-2 (softcap, alternating sliding layers), with DynamicCache and StaticCache; prefill runs on
``pyattn.flash_attention`` and decode steps on ``pyattn.flash_attention_with_kvcache``; padded batches take the
masked path and still match."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'pyattn[transformers]')")

import pyattn  # noqa: E402
from pyattn.integrations import transformers as pyattn_hf  # noqa: E402

pyattn_hf.register()

VOCAB = 96


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _mistral():
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                        sliding_window=6)
    return transformers.MistralForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def _gemma2():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=64, sliding_window=5, attn_logit_softcapping=2.0,
                                       final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    return transformers.Gemma2ForCausalLM(config)


MODELS = {"llama": _llama, "mistral": _mistral, "gpt2": _gpt2, "gemma2": _gemma2}


def _model(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    model.generation_config.pad_token_id = 0
    return model


def _generate(model, implementation, input_ids, attention_mask=None, cache="dynamic", new_tokens=10):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                             cache_implementation=cache)
    return out[:, input_ids.shape[1]:]


@pytest.fixture
def routes(monkeypatch):
    """Counts the calls the integration makes to each pyattn entry point."""
    counts = {"flash_attention": 0, "flash_attention_with_kvcache": 0, "scaled_dot_product_attention": 0}

    def spy(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(pyattn, "flash_attention", spy("flash_attention", pyattn.flash_attention))
    monkeypatch.setattr(pyattn, "flash_attention_with_kvcache",
                        spy("flash_attention_with_kvcache", pyattn.flash_attention_with_kvcache))
    monkeypatch.setattr(pyattn_hf, "scaled_dot_product_attention",
                        spy("scaled_dot_product_attention", pyattn_hf.scaled_dot_product_attention))
    return counts


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_tokens_equal_eager_and_sdpa(name, cache, routes):
    model = _model(name)
    input_ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    eager = _generate(model, "eager", input_ids, cache=cache)
    if name != "gemma2":  # transformers' sdpa refuses softcap
        assert torch.equal(_generate(model, "sdpa", input_ids, cache=cache), eager)
    routes.update(dict.fromkeys(routes, 0))
    ours = _generate(model, "pyattn", input_ids, cache=cache)
    assert torch.equal(ours, eager), f"{name}/{cache}: pyattn {ours.tolist()} != eager {eager.tolist()}"
    layers = model.config.num_hidden_layers
    assert routes["flash_attention_with_kvcache"] >= 9 * layers, routes  # every decode step of every layer
    if cache == "dynamic":
        assert routes["flash_attention"] == layers, routes  # the prefill
    assert routes["scaled_dot_product_attention"] == 0, routes


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_left_padded_batch_takes_the_masked_path(name, routes):
    model = _model(name)
    input_ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :2], attention_mask[0, :2] = 0, 0  # row 0 is left-padded
    eager = _generate(model, "eager", input_ids, attention_mask, new_tokens=6)
    routes.update(dict.fromkeys(routes, 0))
    assert torch.equal(_generate(model, "pyattn", input_ids, attention_mask, new_tokens=6), eager)
    assert routes["flash_attention_with_kvcache"] == 0  # padding: no prefix lengths, the exact mask instead
    if name == "llama":
        assert routes["scaled_dot_product_attention"] > 0


def test_from_config_with_attn_implementation():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="pyattn")
    assert model.config._attn_implementation == "pyattn"


def test_mask_function_returns_lengths_for_plain_causal_and_the_mask_otherwise():
    from transformers import masking_utils

    lengths = pyattn_hf.attention_mask(2, 1, 10, q_offset=9, kv_offset=0,
                                       mask_function=masking_utils.causal_mask_function)
    assert lengths.dtype == torch.int32 and lengths.shape == (2, 1, 1, 1) and lengths.flatten().tolist() == [10, 10]
    static = pyattn_hf.attention_mask(2, 1, 32, q_offset=torch.tensor(4), kv_offset=0,
                                      mask_function=masking_utils.causal_mask_function,
                                      attention_mask=torch.ones(2, 5, dtype=torch.bool))
    assert static.flatten().tolist() == [5, 5]  # a StaticCache: 5 of its 32 positions are filled
    padded = torch.ones(2, 5, dtype=torch.bool)
    padded[1, 0] = False
    mask = pyattn_hf.attention_mask(2, 1, 5, q_offset=4, kv_offset=0,
                                    mask_function=masking_utils.causal_mask_function, attention_mask=padded)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 1, 5) and not mask[1, 0, 0, 0]
    sliding = masking_utils.sliding_window_causal_mask_function(3)
    assert pyattn_hf._is_plain_causal(sliding)
    assert not pyattn_hf._is_plain_causal(masking_utils.and_masks(masking_utils.causal_mask_function,
                                                                  masking_utils.causal_mask_function))


@pytest.mark.parametrize("name", ["mistral", "gemma2", "llama"])
def test_decode_logits_match_eager_past_the_window(name, routes):
    """Logits of decode steps beyond the sliding window, pyattn vs eager (fp32): the window, softcap and GQA are
    applied on the KV-cache path itself, not only in the tokens that happen to win."""
    model = _model(name)
    input_ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    steps = torch.randint(1, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    logits = {}
    for implementation in ("eager", "pyattn"):
        model.set_attn_implementation(implementation)
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            out = [model(input_ids, cache=cache, use_cache=True).logits[:, -1]]
            for t in range(steps.shape[1]):
                out.append(model(steps[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1])
        logits[implementation] = torch.stack(out)
    assert routes["flash_attention_with_kvcache"] == 4 * model.config.num_hidden_layers
    error = (logits["pyattn"] - logits["eager"]).norm() / logits["eager"].norm()
    assert error < 1e-5, f"{name}: relative error of the logits {error:.2e}"
