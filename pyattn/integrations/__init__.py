"""Integrations with other libraries (each optional: importing this package imports none of them).

``pyattn.integrations.transformers.register()`` makes ``attn_implementation="pyattn"`` available to
Hugging Face transformers models.
"""
