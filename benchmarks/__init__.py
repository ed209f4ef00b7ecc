"""Benchmarks for mppo-kernels: a pytest-benchmark suite (``pytest benchmarks --benchmark-only``) and a
provider comparison script (``python -m benchmarks.compare``). Not part of the installed package."""
