"""Generate with a GPT-2 whose attention runs on pyattn's KV cache and kernels.

    python -m pyattn.examples.generate --model gpt2-tiny --prompt "Hello" --max-new-tokens 32 --check
    python -m pyattn.examples.generate --checkpoint ./gpt2 --prompt "Hello" --device cuda --dtype bf16 --paged

The model is built from a named config with random weights, or from a local checkpoint (``--checkpoint``: a
directory holding config.json and model.safetensors or pytorch_model.bin, as ``GPT2LMHeadModel.save_pretrained``
writes; nothing is downloaded). Prompts are tokenised by the checkpoint's tokenizer when transformers is installed
and the directory has one, else as UTF-8 bytes (token id = byte, modulo the vocabulary). Greedy decoding: a
prefill of the prompt through the cache, then one token per step. Prints the tokens, the prefill time, the
decode rate in tokens/s, the cache's memory and the pyattn variant that served the decode step. ``--check``
regenerates with plain PyTorch attention over the whole sequence, no cache, and exits 1 if a token differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import pyattn
from pyattn.examples.gpt2 import CONFIGS, GPT2, load_checkpoint

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Random weights this large make greedy tokens depend on the context (at GPT-2's 0.02 one token repeats), so that
# --check compares something.
RANDOM_INIT_STD = 0.3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pyattn.examples.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-tiny", choices=sorted(CONFIGS),
                        help="config of a randomly initialised model (ignored with --checkpoint)")
    parser.add_argument("--checkpoint", help="local GPT-2 checkpoint directory or weights file")
    parser.add_argument("--prompt", default="The KV cache", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="copies of the prompt generated together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--paged", action="store_true", help="a paged cache (block table + block allocator)")
    parser.add_argument("--block-size", type=int, default=16, help="positions per block of a paged cache")
    parser.add_argument("--backend", default=None, help="force a pyattn backend (auto, triton, torch, reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true",
                        help="compare the tokens with eager attention (no cache); exit 1 on a mismatch")
    return parser.parse_args(argv)


def build_model(args) -> GPT2:
    torch.manual_seed(args.seed)
    if args.checkpoint:
        config, state = load_checkpoint(args.checkpoint)
        model = GPT2(config)
        model.load_state_dict(state)
    else:
        model = GPT2(CONFIGS[args.model], init_std=RANDOM_INIT_STD)
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()


def tokenizer_for(args):
    """(encode, decode): the checkpoint's tokenizer where transformers can load it locally, else UTF-8 bytes."""
    if args.checkpoint and os.path.isdir(args.checkpoint):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
            return tokenizer.encode, tokenizer.decode
        except Exception:  # no transformers, or no tokenizer files: bytes
            pass
    return None, None


@torch.no_grad()
def generate_cached(model: GPT2, prompt: torch.Tensor, new_tokens: int, *, block_size: int | None):
    """Greedy tokens (B, new_tokens) through a KVCache; returns (tokens, cache, prefill s, decode s)."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens, block_size=block_size)
    synchronize = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    token = model(prompt, cache)[:, -1].argmax(-1, keepdim=True)
    synchronize()
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = model(token, cache)[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    synchronize()
    return torch.cat(tokens, 1), cache, prefill, time.perf_counter() - start


@torch.no_grad()
def generate_eager(model: GPT2, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy tokens with plain PyTorch attention over the whole sequence at every step (no cache)."""
    sequence = prompt
    for _ in range(new_tokens):
        token = model(sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, token], 1)
    return sequence[:, prompt.shape[1]:]


def decode_variant(model: GPT2, cache, device) -> str:
    """The pyattn variant that serves one decode step of this model and cache."""
    c = model.config
    q = torch.empty(cache.batch_size, 1, c.n_head, c.head_dim, device=device, dtype=cache.k.dtype)
    request = pyattn.functional.REQUEST_BUILDERS["flash_attention_with_kvcache"](
        q, cache.k[0], cache.v[0], q, q, cache_seqlens=cache.seqlens, block_table=cache.block_table, causal=True)
    return pyattn._dispatch.choose(request).qualified_name


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        print("--max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    model = build_model(args)
    encode, decode = tokenizer_for(args)
    vocab = model.config.vocab_size
    ids = encode(args.prompt) if encode else [byte % vocab for byte in args.prompt.encode()]
    prompt = torch.tensor([ids] * args.batch, device=args.device)
    if prompt.shape[1] + args.max_new_tokens > model.config.n_positions:
        print(f"prompt ({prompt.shape[1]} tokens) + {args.max_new_tokens} new tokens exceed the model's "
              f"{model.config.n_positions} positions", file=sys.stderr)
        return 2
    block_size = args.block_size if args.paged else None
    backend = args.backend or pyattn._dispatch.default_backend()
    with pyattn.use_backend(backend):
        tokens, cache, prefill, decode_seconds = generate_cached(model, prompt, args.max_new_tokens,
                                                                 block_size=block_size)
        variant = decode_variant(model, cache, args.device)
    name = args.checkpoint or args.model
    c = model.config
    print(f"model: {name} ({c.n_layer} layers, {c.n_head} heads × {c.head_dim}, vocab {vocab}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) on {args.device} {args.dtype}")
    print(f"cache: {cache.extra_repr()}")
    print(f"decode attention: {variant}")
    print(f"tokens: {tokens[0].tolist()}")
    if decode:
        print(f"text: {args.prompt}{decode(tokens[0].tolist())}")
    decoded = args.batch * (args.max_new_tokens - 1)
    rate = decoded / decode_seconds if decode_seconds > 0 and decoded else float("nan")
    print(f"prefill: {prompt.shape[1]} tokens × {args.batch} in {prefill * 1e3:.1f} ms; decode: {decoded} tokens in "
          f"{decode_seconds * 1e3:.1f} ms = {rate:.1f} tokens/s; cache memory {cache.memory_bytes / 2**20:.2f} MiB")
    if args.check:
        eager = generate_eager(model, prompt, args.max_new_tokens)
        if not torch.equal(eager, tokens):
            where = (eager != tokens).nonzero()[0].tolist()
            print(f"check: MISMATCH with eager attention at (row, step) {where}: cached {tokens[0].tolist()} vs "
                  f"eager {eager[0].tolist()}", file=sys.stderr)
            return 1
        print(f"check: ok, {tokens.numel()} tokens equal eager attention's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
