"""``python -m pyattn.examples.generate``: runs on CPU with --check (contiguous and paged caches, a batch), loads
a local checkpoint (its own save, and a transformers GPT2LMHeadModel's with equal logits), and exits 1 when the
tokens differ from eager attention's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pyattn.examples import generate
from pyattn.examples.gpt2 import CONFIGS, GPT2, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*arguments, timeout=240):
    return subprocess.run([sys.executable, "-m", "pyattn.examples.generate", *arguments], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("extra", [[], ["--paged", "--block-size", "4", "--batch", "2"]], ids=["contiguous", "paged"])
def test_generate_on_cpu_with_check(extra):
    result = _run("--model", "gpt2-tiny", "--prompt", "decode me", "--max-new-tokens", "12", "--check", *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens/s" in result.stdout and "cache memory" in result.stdout
    assert "check: ok" in result.stdout
    assert ("paged, block_size=4" if extra else "contiguous") in result.stdout


def test_check_mismatch_exits_nonzero(monkeypatch, capsys):
    monkeypatch.setattr(generate, "generate_eager", lambda model, prompt, n: torch.zeros(prompt.shape[0], n,
                                                                                         dtype=torch.long))
    assert generate.main(["--model", "gpt2-tiny", "--prompt", "xy", "--max-new-tokens", "4", "--check"]) == 1
    assert "MISMATCH" in capsys.readouterr().err


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT2(CONFIGS["gpt2-tiny"], init_std=0.3)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    fields = dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    config, state = load_checkpoint(str(tmp_path))
    assert config == CONFIGS["gpt2-tiny"]
    result = _run("--checkpoint", str(tmp_path), "--prompt", "abc", "--max-new-tokens", "6", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_loads_a_transformers_gpt2_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4,
                                                              n_positions=64)).eval()
    hf.save_pretrained(tmp_path)
    config, state = load_checkpoint(str(tmp_path))
    ours = GPT2(config)
    ours.load_state_dict(state)
    ours.eval()
    tokens = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        want = hf(tokens).logits
        got_eager = ours(tokens)
        cache = ours.new_cache(2, 10)
        got_cached = torch.cat([ours(tokens[:, :6], cache), ours(tokens[:, 6:8], cache), ours(tokens[:, 8:], cache)], 1)
    assert torch.allclose(got_eager, want, atol=1e-5), (got_eager - want).abs().max()
    assert torch.allclose(got_cached, want, atol=1e-5), (got_cached - want).abs().max()
