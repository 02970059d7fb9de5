"""Attention functional API (in progress)."""

REQUEST_BUILDERS: dict = {}


def scaled_dot_product_attention(*args, **kwargs):
    raise NotImplementedError


def flash_attention(*args, **kwargs):
    raise NotImplementedError


def flash_attention_varlen(*args, **kwargs):
    raise NotImplementedError
