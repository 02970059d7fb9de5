"""LSTM ops of the CUDA extension (pyattn._C): fake kernels, autograd, dispatch registration."""
