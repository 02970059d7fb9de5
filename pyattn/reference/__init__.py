"""Plain-PyTorch reference implementations: the ground truth (float64-capable) and the CPU path."""
