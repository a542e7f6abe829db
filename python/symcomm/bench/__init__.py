"""Benchmarks: python -m symcomm.bench --help (run under torchrun)."""
