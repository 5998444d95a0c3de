"""Benchmarks for convbn_pass: ``python -m benchmarks.run --help`` (see benchmarks/README.md)."""
