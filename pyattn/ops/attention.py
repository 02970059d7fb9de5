"""Attention ops: reference registration and the Triton custom ops with their autograd."""
