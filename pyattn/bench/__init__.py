"""Benchmark CLI (in progress)."""
