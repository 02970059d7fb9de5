"""Runnable examples: ``python -m pyattn.examples.generate`` (a GPT-2 decoding through pyattn's KV cache)."""
