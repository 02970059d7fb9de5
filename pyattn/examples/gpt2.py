"""GPT-2 in plain PyTorch whose attention runs on pyattn's KV cache, with Hugging Face's parameter names.

The blocks are GPT-2's (pre-LayerNorm, fused QKV projection, GELU (tanh) MLP, tied LM head); the state_dict keys
are those of ``transformers.GPT2LMHeadModel`` (``transformer.h.0.attn.c_attn.weight``, Conv1D weights stored
(in, out)), so a local GPT-2 checkpoint loads with :func:`load_checkpoint`. Attention has two paths:

* ``forward(tokens, cache)``: the new tokens' keys/values are appended to a :class:`pyattn.nn.KVCache` and the
  queries attend through it (``KVCache.attend``: pyattn's decode kernels, causal at the bottom-right);
* ``forward(tokens)``: no cache, plain PyTorch attention over the whole sequence (the "eager" baseline that
  ``--check`` compares against).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pyattn.nn import KVCache


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


CONFIGS = {
    "gpt2-tiny": GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4),
    "gpt2-small-random": GPT2Config(vocab_size=4096, n_positions=512, n_embd=256, n_layer=4, n_head=8),
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
}


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), as its checkpoints keep it."""

    def __init__(self, in_features: int, out_features: int, init_std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, init_std: float):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd, init_std)
        self.c_proj = Conv1D(config.n_embd, config.n_embd, init_std)

    def forward(self, x, cache: KVCache | None):
        batch, length, _ = x.shape
        q, k, v = self.c_attn(x).split(self.config.n_embd, dim=-1)
        shape = (batch, length, self.config.n_head, self.config.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)  # (B, L, H, D): flash-attn's layout
        if cache is not None:
            out = cache.attend(q, k, v, self.layer_idx)
        else:  # eager: the whole sequence, causal, plain PyTorch
            scores = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) / math.sqrt(self.config.head_dim)
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = torch.einsum("bhij,bjhd->bihd", weights, v.float()).to(x.dtype)
        return self.c_proj(out.reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config, init_std: float):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd, init_std)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd, init_std)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, init_std: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx, init_std)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, init_std)

    def forward(self, x, cache):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, config: GPT2Config, init_std: float):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config, i, init_std) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        nn.init.normal_(self.wte.weight, std=init_std)
        nn.init.normal_(self.wpe.weight, std=init_std)


class GPT2(nn.Module):
    """``init_std``: the normal init of every weight (GPT-2's 0.02; a random model for testing wants larger
    weights, whose greedy tokens depend on attention instead of repeating one token)."""

    def __init__(self, config: GPT2Config, init_std: float = 0.02):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config, init_std)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2's

    def new_cache(self, batch_size: int, max_seqlen: int, *, block_size: int | None = None) -> KVCache:
        c = self.config
        weight = self.transformer.wte.weight
        return KVCache(c.n_layer, batch_size, max_seqlen, c.n_head, c.head_dim, block_size=block_size,
                       dtype=weight.dtype, device=weight.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, L, vocab) of ``tokens`` (B, L): appended to ``cache`` after what it holds, or (no cache) the
        whole sequence from position 0."""
        start = 0 if cache is None else cache.lengths[0]
        length = tokens.shape[1]
        if start + length > self.config.n_positions:
            raise ValueError(f"GPT2: {start + length} positions exceed n_positions {self.config.n_positions}")
        positions = torch.arange(start, start + length, device=tokens.device)
        x = self.transformer.wte(tokens) + self.transformer.wpe(positions)
        if cache is not None:
            cache.reserve(length)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.advance(length)
        return self.lm_head(self.transformer.ln_f(x))


def load_checkpoint(path: str) -> tuple[GPT2Config, dict]:
    """(config, state_dict) of a local GPT-2 checkpoint: a directory with config.json and model.safetensors or
    pytorch_model.bin (a ``GPT2LMHeadModel`` or ``GPT2Model`` save), or one such weights file."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    config = GPT2Config()
    config_path = os.path.join(directory, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as handle:
            raw = json.load(handle)
        fields = {name: raw[name] for name in GPT2Config.__dataclass_fields__ if name in raw}
        config = GPT2Config(**fields)
    if os.path.isdir(path):
        candidates = [os.path.join(path, name) for name in ("model.safetensors", "pytorch_model.bin")]
        files = [candidate for candidate in candidates if os.path.exists(candidate)]
        if not files:
            raise FileNotFoundError(f"load_checkpoint: no model.safetensors or pytorch_model.bin in {path}")
        path = files[0]
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}": value
             for key, value in state.items()}
    state = {key: value for key, value in state.items() if not key.endswith((".attn.bias", ".attn.masked_bias"))}
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    return config, state
